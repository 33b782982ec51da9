//! The validated config model (SPEC §2) and the parsers of its small string types
//! (`tcp/22`, `40000-59999`, `udp://10.0.0.5:27015`, `198.51.100.0/24`).
//!
//! Every type here holds only values that passed validation; the parsers return a
//! plain-English reason on failure, which the validator turns into a [`super::Problem`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

/// The whole, validated configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub agent: AgentConfig,
    pub firewall: FirewallConfig,
    pub access_rules: Vec<AccessRule>,
    pub apps: Vec<App>,
}

/// `[agent]`: where the datapath attaches and how the agent behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Interfaces XDP attaches to; never empty.
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    /// Empty means every address carried by `interfaces` (see `Config::resolve_edge_addresses`).
    pub edge_addresses: Vec<IpAddr>,
    /// Host services reachable on the edge addresses (neither proxied nor dropped).
    pub pass: Vec<PortSpec>,
    pub metrics_listen: Option<SocketAddr>,
    /// `"-"` means stdout, anything else is a file path.
    pub event_log: Option<String>,
    pub udp_idle_timeout: Duration,
    pub udp_nat_ports: PortRange,
    /// New UDP flows one client source (/32, or /64 for IPv6) may open per second;
    /// `None`: no limit.
    pub udp_new_flows_per_source: Option<u32>,
    pub tcp_idle_timeout: Duration,
    pub tcp_splice: TcpSplice,
    pub tcp_engine: TcpEngine,
}

/// What drives the agent's TCP connections (`tcp_engine`): see docs/tcp.md, "Engines".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TcpEngine {
    /// `io_uring` where the kernel allows a ring and `tcp_splice` is not `"on"`,
    /// else `epoll`.
    #[default]
    Auto,
    /// tokio's readiness loop (epoll): a task per connection.
    Epoll,
    /// A thread per CPU whose io_uring carries every per-connection syscall of apps
    /// without TLS (TLS apps' connections are handed to epoll; `tcp_fastpath =
    /// "xdp"` ones at their handoff).
    IoUring,
}

impl TcpEngine {
    pub const ALL: [TcpEngine; 3] = [TcpEngine::Auto, TcpEngine::Epoll, TcpEngine::IoUring];

    pub fn as_str(self) -> &'static str {
        match self {
            TcpEngine::Auto => "auto",
            TcpEngine::Epoll => "epoll",
            TcpEngine::IoUring => "io_uring",
        }
    }

    /// Whether the agent tries the io_uring engine, given `tcp_splice` (which
    /// only the epoll engine does).
    pub fn tries_io_uring(self, splice: TcpSplice) -> bool {
        match self {
            TcpEngine::Auto => !splice.splices(),
            TcpEngine::Epoll => false,
            TcpEngine::IoUring => true,
        }
    }
}

impl fmt::Display for TcpEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TcpEngine {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_keyword(text, &Self::ALL, |s| s.as_str())
    }
}

/// How the agent moves a TCP connection's bytes (`tcp_splice`): see docs/tcp.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TcpSplice {
    /// The agent's choice: copying through a per-thread buffer (measured cheaper
    /// than splicing wherever the NIC does no scatter-gather, and no pipes held).
    #[default]
    Auto,
    /// `splice(2)` through a pipe per direction.
    On,
    /// Copying through a per-thread buffer.
    Off,
}

impl TcpSplice {
    pub const ALL: [TcpSplice; 3] = [TcpSplice::Auto, TcpSplice::On, TcpSplice::Off];

    pub fn as_str(self) -> &'static str {
        match self {
            TcpSplice::Auto => "auto",
            TcpSplice::On => "on",
            TcpSplice::Off => "off",
        }
    }

    /// Whether connections splice (else they copy).
    pub fn splices(self) -> bool {
        self == TcpSplice::On
    }
}

impl fmt::Display for TcpSplice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TcpSplice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_keyword(text, &Self::ALL, |s| s.as_str())
    }
}

impl AgentConfig {
    pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_UDP_NAT_PORTS: PortRange = PortRange {
        low: 40000,
        high: 59999,
    };
    pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

    /// An agent on `interfaces` with every optional key at its default.
    pub fn with_interfaces(interfaces: Vec<String>) -> Self {
        Self {
            interfaces,
            xdp_mode: XdpMode::default(),
            edge_addresses: Vec::new(),
            pass: Vec::new(),
            metrics_listen: None,
            event_log: None,
            udp_idle_timeout: Self::DEFAULT_UDP_IDLE_TIMEOUT,
            udp_nat_ports: Self::DEFAULT_UDP_NAT_PORTS,
            udp_new_flows_per_source: None,
            tcp_idle_timeout: Self::DEFAULT_TCP_IDLE_TIMEOUT,
            tcp_splice: TcpSplice::default(),
            tcp_engine: TcpEngine::default(),
        }
    }
}

/// How XDP is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic (skb) mode.
    #[default]
    Auto,
    Driver,
    Skb,
}

impl XdpMode {
    pub const ALL: [XdpMode; 3] = [XdpMode::Auto, XdpMode::Driver, XdpMode::Skb];

    pub fn as_str(self) -> &'static str {
        match self {
            XdpMode::Auto => "auto",
            XdpMode::Driver => "driver",
            XdpMode::Skb => "skb",
        }
    }
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for XdpMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_keyword(text, &Self::ALL, |mode| mode.as_str())
    }
}

/// Transport protocol of an app, a `pass` entry or an origin scheme.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// The IP protocol number (`IPPROTO_TCP` / `IPPROTO_UDP`).
    pub fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_keyword(text, &Self::ALL, |protocol| protocol.as_str())
    }
}

/// An inclusive, non-empty range of ports within 1–65535 (`low <= high`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    /// `low..=high`, or `None` when the range is empty or includes port 0.
    pub fn new(low: u16, high: u16) -> Option<Self> {
        (low >= 1 && low <= high).then_some(Self { low, high })
    }

    /// A range of exactly one port; `None` for port 0.
    pub fn single(port: u16) -> Option<Self> {
        Self::new(port, port)
    }

    /// Number of ports in the range (1 to 65535). A `PortRange` is never empty.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u32 {
        u32::from(self.high) - u32::from(self.low) + 1
    }

    pub fn is_single(&self) -> bool {
        self.low == self.high
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.low <= other.high && other.low <= self.high
    }

    pub fn iter(&self) -> RangeInclusive<u16> {
        self.low..=self.high
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single() {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// `PORT` or `LOW-HIGH`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (low, high) = match text.split_once('-') {
            Some((low, high)) => (parse_port(low)?, parse_port(high)?),
            None => {
                let port = parse_port(text)?;
                (port, port)
            }
        };
        PortRange::new(low, high)
            .ok_or_else(|| format!("range '{text}' is reversed: LOW must not be greater than HIGH"))
    }
}

/// One port number, 1–65535, with a reason that says which rule it broke.
fn parse_port(text: &str) -> Result<u16, String> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(format!("'{text}' is not a port number (ports are 1-65535)"));
    }
    // `080` is 80 to us and octal or a typo to a reader: say which one is meant.
    if text.len() > 1 && text.starts_with('0') {
        return Err(format!(
            "'{text}' has a leading zero; write the port as {}",
            text.trim_start_matches('0')
        ));
    }
    match text.parse::<u32>() {
        Ok(0) => Err("port 0 is not allowed (ports are 1-65535)".to_string()),
        Ok(port) => u16::try_from(port)
            .map_err(|_| format!("port {port} is out of range (ports are 1-65535)")),
        Err(_) => Err(format!("port {text} is out of range (ports are 1-65535)")),
    }
}

/// `PROTO/PORT` or `PROTO/LOW-HIGH`, as in an app's `protocol` or an `agent.pass` entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub ports: PortRange,
}

impl PortSpec {
    pub fn overlaps(&self, other: &PortSpec) -> bool {
        self.protocol == other.protocol && self.ports.overlaps(&other.ports)
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.protocol, self.ports)
    }
}

impl FromStr for PortSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let Some((protocol, ports)) = text.split_once('/') else {
            return Err(format!(
                "'{text}' is not PROTO/PORT or PROTO/LOW-HIGH (e.g. \"tcp/22\", \"udp/5000-5010\")"
            ));
        };
        Ok(PortSpec {
            protocol: protocol.parse()?,
            ports: ports.parse()?,
        })
    }
}

/// `[firewall]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FirewallConfig {
    /// Verdict for a source no access rule matches.
    pub default: RuleAction,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub enum RuleAction {
    #[default]
    Allow,
    Block,
}

impl RuleAction {
    pub const ALL: [RuleAction; 2] = [RuleAction::Allow, RuleAction::Block];

    pub fn as_str(self) -> &'static str {
        match self {
            RuleAction::Allow => "allow",
            RuleAction::Block => "block",
        }
    }
}

impl fmt::Display for RuleAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RuleAction {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_keyword(text, &Self::ALL, |action| action.as_str())
    }
}

/// What an access rule's `value` names: one address or a prefix.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum RuleTarget {
    Ip,
    IpRange,
}

impl RuleTarget {
    pub const ALL: [RuleTarget; 2] = [RuleTarget::Ip, RuleTarget::IpRange];

    pub fn as_str(self) -> &'static str {
        match self {
            RuleTarget::Ip => "ip",
            RuleTarget::IpRange => "ip_range",
        }
    }
}

impl fmt::Display for RuleTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RuleTarget {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_keyword(text, &Self::ALL, |target| target.as_str())
    }
}

/// One `[[access_rules]]` entry (Spectrum's IP Access rules, allow and block only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRule {
    pub mode: RuleAction,
    pub target: RuleTarget,
    /// As written in the file; also the `rule` label of the hit counter metric.
    pub value: String,
    /// Network address; host bits are always clear.
    pub addr: IpAddr,
    /// 0–32 for IPv4, 0–128 for IPv6; a `target = "ip"` rule is always a full-length prefix.
    pub prefix_len: u8,
}

impl AccessRule {
    /// Whether `client` lies inside this rule's prefix.
    pub fn matches(&self, client: IpAddr) -> bool {
        match (self.addr, client) {
            (IpAddr::V4(network), IpAddr::V4(client)) => {
                let mask = prefix_mask_v4(self.prefix_len);
                u32::from(client) & mask == u32::from(network)
            }
            (IpAddr::V6(network), IpAddr::V6(client)) => {
                let mask = prefix_mask_v6(self.prefix_len);
                u128::from(client) & mask == u128::from(network)
            }
            _ => false,
        }
    }
}

pub(crate) fn prefix_mask_v4(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0)
}

pub(crate) fn prefix_mask_v6(prefix_len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix_len.min(128)))
        .unwrap_or(0)
}

/// A parsed `ADDRESS/PREFIX` (or bare `ADDRESS`, meaning a full-length prefix).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
    /// Whether the text carried an explicit `/N`.
    pub explicit_len: bool,
}

impl Prefix {
    /// The address with its host bits cleared.
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(addr) => {
                IpAddr::V4(Ipv4Addr::from(u32::from(addr) & prefix_mask_v4(self.len)))
            }
            IpAddr::V6(addr) => {
                IpAddr::V6(Ipv6Addr::from(u128::from(addr) & prefix_mask_v6(self.len)))
            }
        }
    }
}

impl FromStr for Prefix {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr_text, len_text) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| format!("'{addr_text}' is not an IPv4 or IPv6 address"))?;
        let max_len: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len_text {
            None => max_len,
            Some(len_text) => match len_text.parse::<u8>() {
                Ok(len) if len_text.bytes().all(|byte| byte.is_ascii_digit()) && len <= max_len => {
                    len
                }
                _ => {
                    return Err(format!(
                        "prefix length '/{len_text}' is out of range (0-{max_len} for {})",
                        IpFamily::of(addr)
                    ));
                }
            },
        };
        // `::ffff:a.b.c.d/96+n` is `a.b.c.d/n`: IPv4 clients match IPv4 rules only.
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
            && len >= 96
        {
            return Ok(Prefix {
                addr: IpAddr::V4(v4),
                len: len - 96,
                explicit_len: len_text.is_some(),
            });
        }
        Ok(Prefix {
            addr,
            len,
            explicit_len: len_text.is_some(),
        })
    }
}

/// IPv4 or IPv6.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(addr: IpAddr) -> IpFamily {
        match addr {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

/// One `[[apps]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    /// Unique among apps; defaults to `"<proto>-<ports>"`, e.g. `udp-27015`, `tcp-6000-6010`.
    pub id: String,
    pub protocol: Protocol,
    /// Edge port(s) clients connect to.
    pub ports: PortRange,
    /// Empty means every edge address.
    pub edge_ips: Vec<IpAddr>,
    /// Never empty; every origin has as many ports as `ports`.
    pub origins: Vec<Origin>,
    pub proxy_protocol: ProxyProtocol,
    /// Whether `[[access_rules]]` / `[firewall]` apply to this app.
    pub ip_firewall: bool,
    /// UDP apps: new flows admitted per second (`None`: no limit).
    pub udp_new_flows_per_second: Option<u32>,
    /// TCP apps: Edge TLS Termination (`tls` and the `tls_*` keys).
    pub tls: super::tls::AppTls,
    /// `[apps.health_check]`: origins that fail it get no new connections or flows.
    pub health_check: Option<HealthCheck>,
    /// TCP apps: whether established connections are handed to the XDP splice
    /// (docs/tcp.md); `Off` keeps every byte on the socket path.
    pub tcp_fastpath: TcpFastpath,
}

/// `tcp_fastpath`: where the bytes of an established TCP connection go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcpFastpath {
    /// Through the agent's sockets (splice/copy), as always.
    #[default]
    Off,
    /// Translated packet by packet in XDP once both legs are quiet and eligible.
    Xdp,
}

impl TcpFastpath {
    pub const ALL: [TcpFastpath; 2] = [TcpFastpath::Off, TcpFastpath::Xdp];

    pub const fn as_str(self) -> &'static str {
        match self {
            TcpFastpath::Off => "off",
            TcpFastpath::Xdp => "xdp",
        }
    }
}

impl FromStr for TcpFastpath {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_keyword(text, &Self::ALL, |s| s.as_str())
    }
}

/// How an app's origins are checked (`[apps.health_check]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Time between the starts of two checks of one origin.
    pub interval: Duration,
    /// How long one check may take (at most `interval`).
    pub timeout: Duration,
    /// Consecutive successes that bring a down origin back.
    pub rise: u32,
    /// Consecutive failures that take an up origin out.
    pub fall: u32,
    /// UDP apps: the datagram sent and the reply expected. TCP apps: `None` (a
    /// check is a TCP connect).
    pub probe: Option<UdpProbe>,
}

impl HealthCheck {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
    pub const DEFAULT_RISE: u32 = 2;
    pub const DEFAULT_FALL: u32 = 3;
    /// Upper bound of `rise` and `fall`.
    pub const MAX_COUNT: u32 = 100;
    /// Shortest `interval`.
    pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
}

/// A UDP health check's datagram and the reply it expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpProbe {
    pub send: Vec<u8>,
    /// The reply must begin with these bytes; empty: any reply will do.
    pub expect: Vec<u8>,
}

impl App {
    /// The id an app gets when the file gives none.
    pub fn default_id(spec: &PortSpec) -> String {
        format!("{}-{}", spec.protocol, spec.ports)
    }

    /// The app's `protocol` key (`udp/27015`).
    pub fn port_spec(&self) -> PortSpec {
        PortSpec {
            protocol: self.protocol,
            ports: self.ports,
        }
    }

    /// The IP family shared by all origins; `None` only for a TCP app mixing families.
    /// For a UDP app this is always `Some` (validation rejects a mix, SPEC §5).
    pub fn family(&self) -> Option<IpFamily> {
        let first = IpFamily::of(self.origins.first()?.addr);
        self.origins
            .iter()
            .all(|origin| IpFamily::of(origin.addr) == first)
            .then_some(first)
    }

    /// The origin port for a packet sent to `edge_port`: edge `LOW+k` goes to origin
    /// `OLOW+k` (Spectrum semantics). Validation guarantees both ranges have the same
    /// length, so for an `edge_port` inside `self.ports` the result is inside `origin.ports`.
    pub fn origin_port(&self, origin: &Origin, edge_port: u16) -> u16 {
        debug_assert!(
            self.ports.contains(edge_port),
            "edge port {edge_port} outside app {}",
            self.id
        );
        let offset = edge_port.saturating_sub(self.ports.low);
        origin
            .ports
            .low
            .saturating_add(offset)
            .min(origin.ports.high)
    }

    /// Whether the app is served on `edge_addr` (no `edge_ips` means every edge address).
    pub fn serves_edge_address(&self, edge_addr: IpAddr) -> bool {
        self.edge_ips.is_empty() || self.edge_ips.contains(&edge_addr)
    }
}

/// One `origin_direct` entry, without its scheme (which always equals the app's protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin {
    pub addr: IpAddr,
    pub ports: PortRange,
    /// Share of new connections and flows, relative to the app's other origins
    /// (`weight` in the table form; 1 for a plain URL). 0: none while another
    /// origin can take them.
    pub weight: u32,
}

/// An origin's label (`forwarder origins`, metrics): `ADDR:PORTS`, IPv6 in brackets.
pub fn origin_label(addr: IpAddr, ports: PortRange) -> String {
    match addr {
        IpAddr::V4(addr) => format!("{addr}:{ports}"),
        IpAddr::V6(addr) => format!("[{addr}]:{ports}"),
    }
}

impl Origin {
    /// Weight of an origin given as a plain URL.
    pub const DEFAULT_WEIGHT: u32 = 1;
    /// Largest `weight`.
    pub const MAX_WEIGHT: u32 = 1000;

    /// The origin without its scheme, `10.0.0.5:22` or `[2001:db8::5]:8100-8199`:
    /// its name in `forwarder origins`, `drain`, metrics and events, and the
    /// identity its place in the origin table is derived from.
    pub fn label(&self) -> String {
        origin_label(self.addr, self.ports)
    }

    /// Whether `other` is the same address and ports (whatever the weights).
    pub fn same_place(&self, other: &Origin) -> bool {
        self.addr == other.addr && self.ports == other.ports
    }

    /// The URL form used in `origin_direct`, e.g. `tcp://[2001:db8::5]:8100-8199`.
    pub fn to_url(&self, protocol: Protocol) -> String {
        format!("{protocol}://{}", self.label())
    }

    /// Parses `SCHEME://IPV4:PORTS` or `SCHEME://[IPV6]:PORTS`; returns the scheme too,
    /// so the caller can compare it with the app's protocol.
    pub fn parse_url(text: &str) -> Result<(Protocol, Origin), String> {
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(format!(
                "'{text}' is not SCHEME://IP:PORT (e.g. \"udp://10.0.0.5:27015\")"
            ));
        };
        let protocol: Protocol = scheme
            .parse()
            .map_err(|_| format!("unknown scheme '{scheme}' in '{text}', expected tcp or udp"))?;
        let (addr, ports) = if let Some(bracketed) = rest.strip_prefix('[') {
            let Some((host, after)) = bracketed.split_once(']') else {
                return Err(format!("missing ']' after the IPv6 address in '{text}'"));
            };
            let Some(ports) = after.strip_prefix(':') else {
                return Err(format!("missing :PORT after the address in '{text}'"));
            };
            let addr: Ipv6Addr = host
                .parse()
                .map_err(|_| format!("'{host}' in '{text}' is not an IPv6 address"))?;
            // `[::ffff:a.b.c.d]` is `a.b.c.d`: judged as IPv4.
            (IpAddr::V6(addr).to_canonical(), ports)
        } else {
            let Some((host, ports)) = rest.rsplit_once(':') else {
                return Err(format!("missing :PORT after the address in '{text}'"));
            };
            if host.contains(':') {
                return Err(format!(
                    "IPv6 address in '{text}' must be in brackets, e.g. \"{scheme}://[2001:db8::5]:80\""
                ));
            }
            let addr: Ipv4Addr = host.parse().map_err(|_| {
                format!("'{host}' in '{text}' is not an IP address (host names / origin_dns are not supported)")
            })?;
            (IpAddr::V4(addr), ports)
        };
        let ports: PortRange = ports.parse()?;
        Ok((
            protocol,
            Origin {
                addr,
                ports,
                weight: Origin::DEFAULT_WEIGHT,
            },
        ))
    }
}

/// Which client-address header the origin receives: one type for the config, the
/// plan and the XDP program (`forwarder_common::ProxyMode`).
pub use forwarder_common::ProxyMode as ProxyProtocol;

/// Whether `proxy` exists for `protocol` (v1 is TCP only, simple is UDP only).
pub fn proxy_supports(proxy: ProxyProtocol, protocol: Protocol) -> bool {
    match protocol {
        Protocol::Tcp => proxy.for_tcp(),
        Protocol::Udp => proxy.for_udp(),
    }
}

/// Parses one of a fixed set of lower-case keywords, listing them on failure.
pub(super) fn parse_keyword<T: Copy>(
    text: &str,
    choices: &[T],
    name: impl Fn(T) -> &'static str,
) -> Result<T, String> {
    choices
        .iter()
        .copied()
        .find(|&choice| name(choice) == text)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|&choice| name(choice)).collect();
            format!("'{text}' is not one of {}", names.join(", "))
        })
}
