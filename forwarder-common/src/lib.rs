//! Map keys, values and constants shared by the XDP/sk_lookup programs and the agent.
//!
//! Every type here is `#[repr(C)]`, padded explicitly (no implicit holes, so the
//! kernel's hashing of keys never sees uninitialised bytes) and `Copy`. With the
//! `user` feature they implement `aya::Pod` so the agent can read and write them.
//!
//! Addresses are always 16 bytes: IPv6 as is, IPv4 as the IPv4-mapped IPv6 address
//! `::ffff:a.b.c.d` (the same encoding the Simple Proxy Protocol header uses), so one
//! key type serves both families. Ports are stored in host byte order.
#![no_std]

/// IP protocol numbers used as `proto` fields.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Capacity of the maps the agent fills from the config.
pub const MAX_APPS: u32 = 4096;
pub const MAX_ORIGINS: u32 = 16384;
pub const MAX_EDGE_ADDRS: u32 = 1024;
pub const MAX_RULES: u32 = 16384;
pub const MAX_PORT_ENTRIES: u32 = 1 << 20;
/// Capacity of `MAGLEV`, in slots (all UDP apps' origin tables together).
pub const MAX_MAGLEV_SLOTS: u32 = 1 << 22;
/// Slots per `MAGLEV` value: the kernel rounds array values up to 8 bytes, so four
/// 16-bit slots share one.
pub const MAGLEV_LANES: u32 = 4;
/// One `MAGLEV` value: four slots, each an origin's offset in its app's origins.
pub type MaglevEntry = [u16; MAGLEV_LANES as usize];

/// The size of an app's origin table (a prime, as Maglev needs) for `origins`
/// configured origins: at least ~400 slots per origin, so weights are honoured to
/// well under 1% and removing an origin moves little more than its own clients
/// (up to 163 origins; beyond, 65521 slots shared). 0 for one origin (nothing to
/// choose). The size depends on the configured count only, so health and drain
/// never change it; it changes when the count crosses 10, 40 or 163.
pub const fn maglev_table_size(origins: u32) -> u32 {
    match origins {
        0 | 1 => 0,
        2..=10 => 4093,
        11..=40 => 16381,
        _ => 65521,
    }
}

/// The hash a UDP flow's origin is chosen by: FNV-1a over the client address and
/// port. The XDP program picks slot `hash % table_size`; the agent computes the same
/// to move flows off an origin that went down.
#[inline(always)]
pub fn flow_hash(client: &[u8; 16], client_port: u16) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in client {
        h = (h ^ *b as u32).wrapping_mul(0x0100_0193);
    }
    for b in client_port.to_be_bytes() {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    h
}

/// Capacity of the table of assured UDP flows (`FLOWS`: flows whose client spoke
/// again after the origin answered). Never evicted by the datapath: only the agent
/// ends these flows (idle timeout, reload).
pub const MAX_FLOWS: u32 = 262_144;
/// Capacity of the table of new UDP flows (`NEW_FLOWS`: not yet assured). An LRU:
/// a flood of one-way flows churns this table and nothing else.
pub const MAX_NEW_FLOWS: u32 = 65_536;
/// Capacity of `NAT_PORTS`: one claim per (origin-side address, port) in use.
pub const MAX_NAT_CLAIMS: u32 = MAX_FLOWS + MAX_NEW_FLOWS;
/// Capacity of `SOURCE_WINDOWS` (per-source new-flow limit): an LRU, so a flood
/// of random sources forgets old ones rather than failing.
pub const MAX_SOURCE_WINDOWS: u32 = 65_536;

/// `PortTarget::app` value of a `pass` entry: hand the packet to the kernel as is.
pub const APP_PASS: u32 = u32::MAX;

/// Why a packet was dropped; the index into the per-CPU `DROPS` counter array.
/// The order and names are the metric label values of SPEC §6.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    Malformed = 0,
    Fragment = 1,
    Icmp = 2,
    Protocol = 3,
    NoApp = 4,
    Firewall = 5,
    SppInvalid = 6,
    NoFlow = 7,
    TooBig = 8,
    /// A reply for a live flow that did not arrive on the interface the route to
    /// the flow's origin uses, or not from that route's next-hop MAC.
    Spoofed = 9,
    /// Not in SPEC §6's list: the origin (or, on the way back, the client) has no
    /// route or no resolved neighbour from the XDP program's point of view.
    NoRoute = 10,
    /// Not in SPEC §6's list: a client source (its /32, or /64 for IPv6) opened
    /// more new UDP flows in the current second than `udp_new_flows_per_source`.
    SourceLimit = 11,
    /// Not in SPEC §6's list: the first datagram of a new UDP flow of an app that
    /// already admitted `udp_new_flows_per_second` new flows this second.
    FlowLimit = 12,
}

impl DropReason {
    pub const COUNT: usize = 13;
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::Malformed,
        DropReason::Fragment,
        DropReason::Icmp,
        DropReason::Protocol,
        DropReason::NoApp,
        DropReason::Firewall,
        DropReason::SppInvalid,
        DropReason::NoFlow,
        DropReason::TooBig,
        DropReason::Spoofed,
        DropReason::NoRoute,
        DropReason::SourceLimit,
        DropReason::FlowLimit,
    ];

    /// The `reason` label value.
    pub const fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Fragment => "fragment",
            DropReason::Icmp => "icmp",
            DropReason::Protocol => "protocol",
            DropReason::NoApp => "no_app",
            DropReason::Firewall => "firewall",
            DropReason::SppInvalid => "spp_invalid",
            DropReason::NoFlow => "no_flow",
            DropReason::TooBig => "too_big",
            DropReason::Spoofed => "spoofed",
            DropReason::NoRoute => "no_route",
            DropReason::SourceLimit => "source_limit",
            DropReason::FlowLimit => "flow_limit",
        }
    }
}

/// Traffic direction of an app counter: `APP_STATS[app * 2 + direction]`.
pub const DIR_INGRESS: u32 = 0;
pub const DIR_EGRESS: u32 = 1;

/// Which client-address header an app's origin receives: the config's
/// `proxy_protocol`, the agent's plan and the XDP program's `AppInfo::proxy` (as
/// its `code`) all use this one type.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ProxyMode {
    /// Nothing: TCP is spliced as is; UDP is plain NAT.
    #[default]
    Off = 0,
    /// HAProxy PROXY v1 (text); TCP only.
    V1 = 1,
    /// HAProxy PROXY v2 (binary); TCP and UDP (UDP: on a flow's first datagram).
    V2 = 2,
    /// Cloudflare Simple Proxy Protocol; UDP only, on every datagram.
    Simple = 3,
}

impl ProxyMode {
    pub const ALL: [ProxyMode; 4] = [
        ProxyMode::Off,
        ProxyMode::V1,
        ProxyMode::V2,
        ProxyMode::Simple,
    ];

    /// The config keyword.
    pub const fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Off => "off",
            ProxyMode::V1 => "v1",
            ProxyMode::V2 => "v2",
            ProxyMode::Simple => "simple",
        }
    }

    /// The byte stored in `AppInfo::proxy`.
    pub const fn code(self) -> u8 {
        self as u8
    }

    pub const fn from_code(code: u8) -> Option<ProxyMode> {
        match code {
            0 => Some(ProxyMode::Off),
            1 => Some(ProxyMode::V1),
            2 => Some(ProxyMode::V2),
            3 => Some(ProxyMode::Simple),
            _ => None,
        }
    }

    /// Whether TCP apps can use it (SPP is UDP only).
    pub const fn for_tcp(self) -> bool {
        !matches!(self, ProxyMode::Simple)
    }

    /// Whether UDP apps can use it (v1 is TCP only).
    pub const fn for_udp(self) -> bool {
        !matches!(self, ProxyMode::V1)
    }

    /// Whether a UDP app's replies come back through a NAT port (plain NAT and v2)
    /// rather than naming their flow in an SPP header.
    pub const fn udp_returns_via_nat(self) -> bool {
        !matches!(self, ProxyMode::Simple)
    }
}

impl core::fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `proxy_protocol` keyword that is not one of `ProxyMode::ALL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownProxyMode;

impl core::fmt::Display for UnknownProxyMode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("not one of off, v1, v2, simple")
    }
}

impl core::str::FromStr for ProxyMode {
    type Err = UnknownProxyMode;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        ProxyMode::ALL
            .into_iter()
            .find(|m| m.as_str() == text)
            .ok_or(UnknownProxyMode)
    }
}

/// `PORT_HINTS[hint_index(proto, port)]` bits: a cheap array lookup that lets the
/// XDP program drop a packet for an unconfigured port without any hash lookup.
/// Some app or `pass` entry of that protocol uses the port as its edge port.
pub const HINT_EDGE_PORT: u8 = 1;
/// Some origin of that protocol uses the port as its source port (return traffic).
pub const HINT_ORIGIN_PORT: u8 = 2;
/// TCP: the port is an edge or origin port of an app with `tcp_fastpath = "xdp"`,
/// so a segment on it may belong to a spliced connection (`SPLICES`).
pub const HINT_SPLICE: u8 = 4;
pub const PORT_HINTS_LEN: u32 = 2 * 65536;

/// Index into `PORT_HINTS`: TCP ports first, then UDP ports.
#[inline(always)]
pub const fn hint_index(proto: u8, port: u16) -> u32 {
    ((proto == PROTO_UDP) as u32) << 16 | port as u32
}

/// How many IPv4 edge addresses `EDGE_V4_LIST` holds inline.
pub const EDGE_V4_INLINE: usize = 8;

/// `EDGE_V4_LIST[0]`: up to `EDGE_V4_INLINE` IPv4 edge addresses compared inline
/// (a few compares beat a hash lookup); with more, `count` is `u32::MAX` and the
/// program uses the `EDGE_ADDRS_V4` hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EdgeV4List {
    pub count: u32,
    /// Addresses as their 4 network-order bytes read as a native u32.
    pub addrs: [u32; EDGE_V4_INLINE],
    pub index: [u32; EDGE_V4_INLINE],
}

/// The largest ifindex whose packets `IFACE_STATS` counts (it is an array indexed
/// by ifindex, so the per-packet count costs no hash lookup).
pub const MAX_IFINDEX: u32 = 4096;

/// Key of `PORTS`: which app (or `pass` entry) owns (protocol, edge address, port).
/// `edge` is the index the agent gave the edge address in `EDGE_ADDRS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub edge: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `PORTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortTarget {
    /// Index into `APPS`, or `APP_PASS`.
    pub app: u32,
}

/// Value of `EDGE_ADDRS` (key: the 16-byte address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgeAddr {
    pub index: u32,
}

/// Value of `APPS[app]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppInfo {
    /// First edge port of the app; edge port `edge_port_low + k` maps to origin
    /// port `origin.port_low + k`.
    pub edge_port_low: u16,
    pub origin_count: u16,
    /// Index of the app's first origin in `ORIGINS`; its origins are consecutive.
    pub origin_first: u32,
    pub proto: u8,
    /// `ProxyMode::code`.
    pub proxy: u8,
    /// 1 when `[[access_rules]]`/`[firewall]` apply to this app.
    pub ip_firewall: u8,
    /// TCP: 1 when the app's established connections may be spliced in XDP
    /// (`tcp_fastpath = "xdp"`).
    pub tcp_fastpath: u8,
    /// UDP: new flows the app admits per second (`udp_new_flows_per_second`);
    /// 0: no limit.
    pub new_flows_per_second: u32,
    /// UDP: the app's origin table is `MAGLEV` slots `table_first ..
    /// table_first + table_size` (`maglev_table_size`); 0 slots: the first origin.
    pub table_first: u32,
    pub table_size: u32,
}

/// Value of `ORIGINS[i]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginInfo {
    /// The origin's address.
    pub addr: [u8; 16],
    /// The agent's own source address towards this origin (resolved by the agent
    /// from the routing table at config time, never per packet).
    pub local: [u8; 16],
    pub port_low: u16,
    /// 4 or 6.
    pub family: u8,
    pub _pad: u8,
    /// The app this origin belongs to.
    pub app: u32,
    /// The interface the route to the origin leaves by (resolved by the agent); the
    /// XDP program's route lookup for the origin is done as output from it.
    pub ifindex: u32,
}

/// Key of `ORIGIN_PORTS`: a (protocol, origin address, origin port) the agent talks to.
/// Packets *from* such a source are return traffic (SPEC §3 step 2).
// align(4): the XDP program copies and compares it in 4-byte words.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OriginPortKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `ORIGIN_PORTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginPortTarget {
    pub app: u32,
}

/// Value of the access-rule LPM tries `RULES_V4` / `RULES_V6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleVerdict {
    /// `RULE_ALLOW` or `RULE_BLOCK`.
    pub action: u32,
    /// Index into the per-CPU `RULE_HITS` counters.
    pub rule: u32,
}

pub const RULE_ALLOW: u32 = 0;
pub const RULE_BLOCK: u32 = 1;

/// `SETTINGS[0]`: global knobs of the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// `RULE_ALLOW` or `RULE_BLOCK`: verdict when no access rule matches.
    pub firewall_default: u32,
    /// Source ports of the agent towards origins for plain-NAT UDP flows.
    pub nat_port_low: u16,
    pub nat_port_high: u16,
    /// Bumped by the agent on every applied config (written after all other maps):
    /// a UDP flow classified under another generation is classified again.
    pub generation: u32,
    /// New UDP flows a client source (/32, or /64 for IPv6) may open per second;
    /// 0: no limit.
    pub new_flows_per_source: u32,
}

/// `ROUTE_EPOCH[0]`: bumped by the agent when routes, neighbours, addresses or links
/// change (and periodically); a `RouteCache` of another epoch is looked up again.
pub const ROUTE_EPOCH_INDEX: u32 = 0;

/// A cached route result: where a flow's datagrams leave and with which MACs.
/// Valid while `epoch` equals `ROUTE_EPOCH[0]`; `epoch` 0 means "never filled" (the
/// agent starts the epoch at 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RouteCache {
    pub ifindex: u32,
    pub epoch: u32,
    /// The largest L3 length the FIB lookup of this epoch accepted (the MTU check):
    /// a longer datagram is looked up again.
    pub mtu_ok: u16,
    pub _pad: u16,
    /// Next hop's MAC (destination of frames sent by this route) and ours.
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
}

/// Per-CPU counters of one app in one direction (`APP_STATS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// Key of `FLOWS`: one UDP flow, as the client sees it.
// align(4): the XDP program copies and compares it in 4-byte words.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client: [u8; 16],
    pub edge: [u8; 16],
    pub client_port: u16,
    pub edge_port: u16,
}

/// Value of `FLOWS`. Counters are updated with atomic adds from every CPU.
///
/// There is no per-packet timestamp: the agent sees a flow is idle when its
/// packet counts stop moving between scans.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowState {
    /// `bpf_ktime_get_ns()` of the first packet.
    pub first_seen_ns: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub app: u32,
    /// Index into `ORIGINS`.
    pub origin: u32,
    pub origin_port: u16,
    /// The agent's source port towards the origin (plain NAT: from `udp_nat_ports`;
    /// SPP and v2: the edge port).
    pub local_port: u16,
    /// `FLOW_*` bits.
    pub flags: u32,
    /// The interface the client's first datagram arrived on: the route lookup
    /// towards the client is done as output from it.
    pub client_ifindex: u32,
    /// `Settings::generation` the flow was classified under.
    pub generation: u32,
    /// The access rule the client matched (`RULE_NONE`: none), counted per packet.
    pub rule: u32,
    /// `ADMISSION_*`: how far the flow has come towards being assured.
    pub admission: u32,
    /// Cached egress towards the client (towards the origin: `ORIGIN_ROUTES`).
    pub to_client: RouteCache,
}

/// `FlowState::rule` when no access rule matched (or the app has no firewall).
pub const RULE_NONE: u32 = u32::MAX;

/// `FlowState::flags`: the PROXY v2 header has been sent on this flow (v2 sends it
/// once).
pub const FLOW_V2_HEADER_SENT: u32 = 1;
/// The flow's app uses SPP (replies carry the flow in their header; no NAT port).
pub const FLOW_SPP: u32 = 2;
/// The flow's app uses PROXY v2 (a NAT port, and a header on the first datagram).
pub const FLOW_V2: u32 = 4;

/// `FlowState::admission` of a flow in `NEW_FLOWS` the origin has not answered.
pub const ADMISSION_NEW: u32 = 0;
/// A flow in `NEW_FLOWS` the origin has answered: the client's next datagram
/// promotes it to `FLOWS` (the conntrack rule for UDP: traffic after a reply).
pub const ADMISSION_REPLIED: u32 = 1;
/// A flow in `FLOWS` (assured).
pub const ADMISSION_ASSURED: u32 = 2;

/// Value of `NAT_PORTS`: who holds an origin-side port, and how firmly. `state`
/// is changed only by compare-and-swap, so exactly one CPU wins a port that is
/// being reclaimed or promoted.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatClaim {
    pub owner: FlowKey,
    pub _pad: u32,
    /// `CLAIM_*`.
    pub state: u64,
}

/// `NatClaim::state`: claimed by a flow whose first datagram is being sent (not
/// yet in a table): never reclaimed.
pub const CLAIM_PENDING: u64 = 1;
/// Held by a flow in `NEW_FLOWS`, or left by one the LRU evicted: reclaimable
/// when the pool runs out (an orphan — owner in no table — at once).
pub const CLAIM_NEW: u64 = 2;
/// Held by an assured flow: never reclaimed; the agent releases it when the flow
/// ends.
pub const CLAIM_ASSURED: u64 = 3;

/// Per-CPU counters of flow admission, indexed by `FlowCounter`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowCounter {
    /// A new flow entered `NEW_FLOWS`.
    Admitted = 0,
    /// A flow moved from `NEW_FLOWS` to `FLOWS`.
    Promoted = 1,
    /// A new flow was removed to free its NAT port for another new flow.
    Reclaimed = 2,
    /// A flow was removed because a reload gave its port to another app or mode.
    Replaced = 3,
    /// A promotion failed because `FLOWS` was full (the flow stays new).
    AssuredFull = 4,
}

impl FlowCounter {
    pub const COUNT: usize = 5;
}

/// Key of `SOURCE_WINDOWS`: a client source, IPv4 /32 as `ff ff ff ff a b c d`,
/// IPv6 as its first 8 bytes (/64).
pub type SourceKey = [u8; 8];

/// Value of `SOURCE_WINDOWS` and `APP_WINDOWS`: new flows the source (or app)
/// opened in the one-second window that began at `start_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SourceWindow {
    pub start_ns: u64,
    pub count: u64,
}

/// Key of `NAT_PORTS`: the agent's (local address, local port) of a plain-NAT or v2
/// flow. Ports are unique per local address among live flows; the value names the
/// flow, whose origin is checked against the reply's sender.
// align(4): the XDP program copies and compares it in 4-byte words.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NatKey {
    pub local: [u8; 16],
    pub local_port: u16,
    pub _pad: u16,
}

// ---- TCP splicing in XDP (docs/tcp.md, "XDP splice") ------------------------------

/// Capacity of `SPLICES`: two entries (one per direction) per spliced connection.
pub const MAX_SPLICES: u32 = 131_072;

/// Key of `SPLICES`: one direction of a spliced connection, as its segments arrive
/// (source = the sending peer). Addresses 16 bytes as everywhere (IPv4-mapped).
// align(4): copied and compared in 4-byte words, as `FlowKey`.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SpliceKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

/// Value of `SPLICES`: how a segment arriving as the key says leaves on the other
/// leg. Written by the agent at splice time; the program writes only the counters,
/// `seen`, the timestamp learning (`ts_learn`, `tsval_delta`, the other entry's
/// `tsecr_delta`) and `route`.
///
/// Sequence arithmetic is modulo 2^32: the outgoing sequence number is
/// `seq + seq_delta`, the acknowledgement (and every SACK edge) `ack + ack_delta`.
/// The entry of the other direction holds the negated deltas.
///
/// Timestamps: neither peer's clock can be read from the agent's sockets (TCP_REPAIR
/// gives a socket's own clock, not the peer's last TSval), so the offset is learnt
/// from the first segment: while `ts_learn` is 1, `tsval_delta` holds the clock of
/// the agent's socket on the outgoing leg at splice time (the "base"); the first
/// segment with a timestamp option leaves with TSval = base (so the receiver's PAWS
/// check, which last saw that socket's clock, passes), `tsval_delta` becomes
/// `base - TSval` and the other entry's `tsecr_delta` its negation, so echoes map
/// back exactly.
///
/// No clock is read per segment: the agent finds an idle connection by counters
/// that stopped moving between its scans, as it does for UDP flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SpliceEntry {
    /// The segment leaves from `src`:`sport` to `dst`:`dport`.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// 4 or 6 (both legs are of one family: see docs/tcp.md, eligibility).
    pub family: u8,
    /// `SPLICE_*` bits (written by the agent only).
    pub flags: u8,
    /// The window field arrives scaled by `2^wscale_in` (the sender's shift on the
    /// incoming leg) and leaves scaled by `2^wscale_out` (the shift the receiver
    /// on the outgoing leg applies). 0..=14.
    pub wscale_in: u8,
    pub wscale_out: u8,
    pub seq_delta: u32,
    pub ack_delta: u32,
    /// Added to the TSval / TSecr of the timestamp option (when `SPLICE_TIMESTAMPS`).
    pub tsval_delta: u32,
    pub tsecr_delta: u32,
    /// Interface the route to `dst` is looked up from (the agent's choice at
    /// splice time: the interface the leg's socket used).
    pub ifindex: u32,
    /// App index (for `APP_STATS`).
    pub app: u32,
    /// Cached egress towards `dst` (filled by the program, see `RouteCache`).
    pub route: RouteCache,
    /// Segments and payload bytes translated in this direction.
    pub packets: u64,
    pub bytes: u64,
    /// `SEEN_*` bits, set by the program.
    pub seen: u8,
    /// 1 until the timestamp offset is learnt (see above).
    pub ts_learn: u8,
    pub _pad: [u8; 6],
}

/// `SpliceEntry::flags`: both legs negotiated timestamps; rewrite TSval/TSecr.
pub const SPLICE_TIMESTAMPS: u8 = 1;
/// Both legs negotiated SACK; rewrite SACK blocks (without it they are left as is,
/// and an entry never sees one).
pub const SPLICE_SACK: u8 = 2;
/// This entry carries the client's segments to the origin (`DIR_INGRESS` in
/// `APP_STATS`); without it, the origin's to the client.
pub const SPLICE_TO_ORIGIN: u8 = 4;
/// Held, not spliced yet: the agent is bringing a busy connection to a quiet
/// point (docs/tcp.md, "XDP splice"). Segments carrying data, SYN or FIN are
/// dropped (counted `Held`; the peer retransmits them, into the splice once it is
/// in place or to the socket if the handoff falls back); pure ACKs and RSTs pass to
/// the socket, which still owns the connection. Nothing else of the entry is used.
pub const SPLICE_HOLD: u8 = 8;

/// `SpliceEntry::seen`: a FIN has been translated in this direction.
pub const SEEN_FIN: u8 = 1;
/// An RST has been translated in this direction; the agent removes both entries
/// and reports the connection reset.
pub const SEEN_RST: u8 = 2;

/// Per-CPU splice counters (`SPLICE_COUNTERS`), by index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpliceCounter {
    /// Segments translated and sent.
    Translated = 0,
    /// Segments of a spliced connection dropped: malformed (IP options, bad data
    /// offset, truncated options) or no route. Never passed to the kernel, which
    /// has no socket for them any more and would answer with an RST.
    Dropped = 1,
    /// Segments with data, SYN or FIN dropped while their connection was held
    /// (`SPLICE_HOLD`) on its way to a handoff.
    Held = 2,
}

impl SpliceCounter {
    pub const COUNT: usize = 3;
}

/// PROXY v2 (HAProxy's proxy-protocol.txt §2.2): the 12-byte signature, then
/// version/command, family/transport, a 16-bit address length and the addresses.
pub const PROXY_V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Length of the fixed part (signature, version/command, family, length).
pub const PROXY_V2_FIXED_LEN: usize = 16;
/// Version 2, command PROXY.
pub const PROXY_V2_VER_CMD_PROXY: u8 = 0x21;
/// Family/transport bytes of a UDP datagram's header (INET or INET6, DGRAM).
pub const PROXY_V2_INET_DGRAM: u8 = 0x12;
pub const PROXY_V2_INET6_DGRAM: u8 = 0x22;
/// Address block lengths: two addresses and two ports.
pub const PROXY_V2_ADDR_LEN_V4: usize = 12;
pub const PROXY_V2_ADDR_LEN_V6: usize = 36;
/// PROXY v2 header lengths in front of a UDP datagram (signature + fixed part +
/// addresses).
pub const PROXY_V2_LEN_V4: usize = PROXY_V2_FIXED_LEN + PROXY_V2_ADDR_LEN_V4;
pub const PROXY_V2_LEN_V6: usize = PROXY_V2_FIXED_LEN + PROXY_V2_ADDR_LEN_V6;

/// Simple Proxy Protocol: header length, magic and field offsets (SPEC §5):
/// magic, client address, proxy address (16 bytes each, IPv4 mapped), client port,
/// proxy port; all in network byte order.
pub const SPP_HEADER_LEN: usize = 38;
pub const SPP_MAGIC: u16 = 0x56EC;
pub const SPP_CLIENT_ADDR: usize = 2;
pub const SPP_PROXY_ADDR: usize = 18;
pub const SPP_CLIENT_PORT: usize = 34;
pub const SPP_PROXY_PORT: usize = 36;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is repr(C), Copy, made only of integers and byte arrays,
    // with explicit padding fields, so any bit pattern is valid and there are no holes.
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for PortTarget {}
    unsafe impl aya::Pod for EdgeAddr {}
    unsafe impl aya::Pod for AppInfo {}
    unsafe impl aya::Pod for OriginInfo {}
    unsafe impl aya::Pod for OriginPortKey {}
    unsafe impl aya::Pod for OriginPortTarget {}
    unsafe impl aya::Pod for RuleVerdict {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for NatKey {}
    unsafe impl aya::Pod for NatClaim {}
    unsafe impl aya::Pod for SourceWindow {}
    unsafe impl aya::Pod for EdgeV4List {}
    unsafe impl aya::Pod for RouteCache {}
    unsafe impl aya::Pod for SpliceKey {}
    unsafe impl aya::Pod for SpliceEntry {}
    // `MaglevEntry` is `[u16; 4]`: aya implements `Pod` for arrays of `Pod` already.
}

/// Encodes an IPv4 address (network-order octets) as IPv4-mapped IPv6.
#[inline(always)]
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<PortKey>(), 8);
        assert_eq!(size_of::<AppInfo>(), 24);
        assert_eq!(size_of::<OriginInfo>(), 44);
        assert_eq!(size_of::<OriginPortKey>(), 20);
        assert_eq!(size_of::<FlowKey>(), 36);
        assert_eq!(size_of::<RouteCache>(), 24);
        assert_eq!(size_of::<FlowState>(), 96);
        assert_eq!(size_of::<SpliceKey>(), 36);
        assert_eq!(size_of::<SpliceEntry>(), 112);
        assert_eq!(size_of::<NatKey>(), 20);
        assert_eq!(size_of::<Settings>(), 16);
        assert_eq!(size_of::<NatClaim>(), 48);
        assert_eq!(size_of::<SourceWindow>(), 16);
    }

    #[test]
    fn drop_reason_labels_follow_the_spec_order() {
        let labels: [&str; DropReason::COUNT] = DropReason::ALL.map(DropReason::label);
        assert_eq!(
            labels,
            [
                "malformed",
                "fragment",
                "icmp",
                "protocol",
                "no_app",
                "firewall",
                "spp_invalid",
                "no_flow",
                "too_big",
                "spoofed",
                "no_route",
                "source_limit",
                "flow_limit"
            ]
        );
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    #[test]
    fn proxy_modes_round_trip_their_codes_and_keywords() {
        for m in ProxyMode::ALL {
            assert_eq!(ProxyMode::from_code(m.code()), Some(m));
            assert_eq!(m.as_str().parse::<ProxyMode>(), Ok(m));
        }
        assert_eq!(ProxyMode::from_code(4), None);
        assert_eq!("spp".parse::<ProxyMode>(), Err(UnknownProxyMode));
        assert_eq!(
            ProxyMode::ALL.map(ProxyMode::code),
            [0, 1, 2, 3],
            "the codes are map values: they never change"
        );
        assert!(!ProxyMode::Simple.for_tcp() && !ProxyMode::V1.for_udp());
        assert!(ProxyMode::V2.udp_returns_via_nat() && !ProxyMode::Simple.udp_returns_via_nat());
    }

    #[test]
    fn v4_mapped_encoding() {
        assert_eq!(
            v4_mapped([192, 0, 2, 10]),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 10]
        );
    }
}
