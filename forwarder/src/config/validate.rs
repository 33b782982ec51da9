//! Raw sections → validated [`Config`], checking every rule of SPEC §2 and collecting
//! every problem rather than stopping at the first.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use super::Problem;
use super::duration::format_duration;
use super::duration::parse_duration;
use super::model::{
    AccessRule, AgentConfig, App, Config, FirewallConfig, HealthCheck, IpFamily, Origin, PortSpec,
    Prefix, Protocol, ProxyProtocol, RuleAction, RuleTarget, TcpEngine, TcpFastpath, TcpSplice,
    UdpProbe, XdpMode, proxy_supports,
};
use super::raw::{
    RawAccessRule, RawAgent, RawApp, RawFirewall, RawHealthCheck, RawOrigin, RawSections,
    RawWeightedOrigin, app_location,
};

/// `proxy_protocol` as the config reader parses it: the error names the keyword
/// given and the ones allowed.
struct ProxyKeyword(ProxyProtocol);

impl FromStr for ProxyKeyword {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.parse::<ProxyProtocol>()
            .map(ProxyKeyword)
            .map_err(|e| format!("'{text}' is {e}"))
    }
}

/// Longest interface name Linux accepts (`IFNAMSIZ` - 1).
const MAX_INTERFACE_NAME_LEN: usize = 15;
/// The largest `udp_new_flows_per_source` and `udp_new_flows_per_second`.
const MAX_NEW_FLOWS_PER_SOURCE: i64 = 1_000_000;

/// Bytes from hex text (`ffff0a`, spaces allowed between bytes).
fn decode_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if digits.is_empty() || !digits.len().is_multiple_of(2) {
        return Err(format!(
            "'{text}' is not hex bytes (an even number of digits 0-9, a-f)"
        ));
    }
    digits
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("'{text}' is not hex bytes (digits 0-9, a-f)"))
        })
        .collect()
}

/// Validates `sections`; the returned config is only meaningful when `problems` stays empty.
pub(crate) fn build(sections: &RawSections, problems: &mut Vec<Problem>) -> Config {
    let mut validator = Validator { problems };
    let agent = match &sections.agent {
        Some(raw) => validator.agent(raw),
        None => AgentConfig::with_interfaces(Vec::new()),
    };
    let firewall = sections
        .firewall
        .as_ref()
        .map(|raw| validator.firewall(raw))
        .unwrap_or_default();

    // Rules keep their index in the file, for messages.
    let access_rules: Vec<(usize, AccessRule)> = sections
        .access_rules
        .iter()
        .enumerate()
        .filter_map(|(index, raw)| Some((index, validator.access_rule(index, raw.as_ref()?)?)))
        .collect();
    validator.duplicate_access_rules(&access_rules);

    let mut apps: Vec<IndexedApp> = Vec::new();
    let mut app_ids: Vec<(usize, String)> = Vec::new();
    for (index, raw) in sections.apps.iter().enumerate() {
        match raw {
            Some(raw) => {
                let checked = validator.app(index, raw, &agent);
                if let Some(id) = &checked.id {
                    app_ids.push((index, id.clone()));
                }
                if let Some(app) = checked.app {
                    apps.push(IndexedApp { index, app });
                }
            }
            None => {
                if let Some(Some(id)) = sections.unread_app_ids.get(index) {
                    app_ids.push((index, id.clone()));
                }
            }
        }
    }
    validator.duplicate_app_ids(&app_ids);
    validator.overlapping_apps(&apps);
    validator.pass_overlaps(&agent, &apps);
    validator.nat_port_overlaps(&agent, &apps);
    validator.udp_return_paths(&apps);
    validator.port_entries(&agent, &apps);
    validator.map_capacities(&agent, access_rules.len(), &apps);

    Config {
        agent,
        firewall,
        access_rules: access_rules.into_iter().map(|(_, rule)| rule).collect(),
        apps: apps.into_iter().map(|indexed| indexed.app).collect(),
    }
}

/// An app together with its position in the file, for messages.
struct IndexedApp {
    index: usize,
    app: App,
}

impl IndexedApp {
    fn location(&self) -> String {
        app_location(Some(&self.app.id), self.index)
    }
}

/// What app validation learnt: the effective id (for the duplicate check, even when
/// the rest is broken) and the app, when its protocol and edge_ips are usable for the
/// cross-app checks. Problems in other fields are recorded and make the config fail.
struct CheckedApp {
    id: Option<String>,
    app: Option<App>,
}

struct Validator<'p> {
    problems: &'p mut Vec<Problem>,
}

impl Validator<'_> {
    fn problem(&mut self, location: &str, field: &str, reason: impl Into<String>) {
        self.problems.push(Problem::new(location, field, reason));
    }

    /// Parses an optional keyword/value with `FromStr`, recording the reason on failure.
    fn parse_or<T: FromStr<Err = String>>(
        &mut self,
        location: &str,
        field: &str,
        text: Option<&String>,
        default: T,
    ) -> T {
        match text.map(|text| text.parse::<T>()) {
            None => default,
            Some(Ok(value)) => value,
            Some(Err(reason)) => {
                self.problem(location, field, reason);
                default
            }
        }
    }

    fn duration_or(&mut self, field: &str, text: Option<&String>, default: Duration) -> Duration {
        match text.map(|text| parse_duration(text)) {
            None => default,
            Some(Ok(duration)) => duration,
            Some(Err(reason)) => {
                self.problem("agent", field, reason);
                default
            }
        }
    }

    /// Parses a list of addresses, reporting bad and repeated entries; `None` if any was bad.
    fn address_list(
        &mut self,
        location: &str,
        field: &str,
        texts: &[String],
    ) -> Option<Vec<IpAddr>> {
        let mut addresses = Vec::with_capacity(texts.len());
        let mut all_parsed = true;
        for text in texts {
            // `::ffff:a.b.c.d` is `a.b.c.d`: judged (and compared) as IPv4.
            match text.parse::<IpAddr>().map(|addr| addr.to_canonical()) {
                Ok(addr) if addresses.contains(&addr) => {
                    self.problem(location, field, format!("{addr} is listed more than once"));
                }
                Ok(addr) if addr.is_unspecified() || addr.is_multicast() => {
                    self.problem(
                        location,
                        field,
                        format!("{addr} cannot be an edge address (unspecified or multicast)"),
                    );
                    all_parsed = false;
                }
                Ok(addr) => addresses.push(addr),
                Err(_) => {
                    self.problem(
                        location,
                        field,
                        format!("'{text}' is not an IPv4 or IPv6 address"),
                    );
                    all_parsed = false;
                }
            }
        }
        all_parsed.then_some(addresses)
    }

    fn agent(&mut self, raw: &RawAgent) -> AgentConfig {
        const AGENT: &str = "agent";
        let mut interfaces: Vec<String> = Vec::new();
        match &raw.interfaces {
            None => self.problem(
                AGENT,
                "interfaces",
                "missing; list at least one interface, e.g. [\"eth0\"]",
            ),
            Some(names) if names.is_empty() => self.problem(
                AGENT,
                "interfaces",
                "empty; list at least one interface, e.g. [\"eth0\"]",
            ),
            Some(names) => {
                for name in names {
                    if let Err(reason) = check_interface_name(name) {
                        self.problem(AGENT, "interfaces", reason);
                    } else if interfaces.contains(name) {
                        self.problem(
                            AGENT,
                            "interfaces",
                            format!("'{name}' is listed more than once"),
                        );
                    } else {
                        interfaces.push(name.clone());
                    }
                }
            }
        }

        let xdp_mode = self.parse_or(AGENT, "xdp_mode", raw.xdp_mode.as_ref(), XdpMode::default());
        let edge_addresses = raw
            .edge_addresses
            .as_deref()
            .and_then(|texts| self.address_list(AGENT, "edge_addresses", texts))
            .unwrap_or_default();

        let mut pass: Vec<PortSpec> = Vec::new();
        for text in raw.pass.iter().flatten() {
            match text.parse::<PortSpec>() {
                Ok(spec) => pass.push(spec),
                Err(reason) => self.problem(AGENT, "pass", reason),
            }
        }

        let metrics_listen =
            raw.metrics_listen
                .as_ref()
                .and_then(|text| match text.parse::<SocketAddr>() {
                    Ok(addr) if addr.port() == 0 => {
                        self.problem(
                            AGENT,
                            "metrics_listen",
                            format!("'{text}' needs a port other than 0"),
                        );
                        None
                    }
                    Ok(addr) => Some(addr),
                    Err(_) => {
                        self.problem(
                    AGENT,
                    "metrics_listen",
                    format!("'{text}' is not IP:PORT (e.g. \"127.0.0.1:9477\" or \"[::1]:9477\")"),
                );
                        None
                    }
                });

        let event_log = raw.event_log.clone();
        if event_log
            .as_deref()
            .is_some_and(|path| path.trim().is_empty())
        {
            self.problem(
                AGENT,
                "event_log",
                "empty; use \"-\" for stdout or a file path",
            );
        }

        let agent = AgentConfig {
            interfaces,
            xdp_mode,
            edge_addresses,
            pass,
            metrics_listen,
            event_log,
            udp_idle_timeout: self.duration_or(
                "udp_idle_timeout",
                raw.udp_idle_timeout.as_ref(),
                AgentConfig::DEFAULT_UDP_IDLE_TIMEOUT,
            ),
            udp_nat_ports: self.parse_or(
                AGENT,
                "udp_nat_ports",
                raw.udp_nat_ports.as_ref(),
                AgentConfig::DEFAULT_UDP_NAT_PORTS,
            ),
            udp_new_flows_per_source: match raw.udp_new_flows_per_source {
                None => None,
                Some(n) if (1..=MAX_NEW_FLOWS_PER_SOURCE).contains(&n) => Some(n as u32),
                Some(n) => {
                    self.problem(
                        AGENT,
                        "udp_new_flows_per_source",
                        format!(
                            "{n} is out of range: new flows per second per client source, \
                             1 to {MAX_NEW_FLOWS_PER_SOURCE} (leave the key out for no limit)"
                        ),
                    );
                    None
                }
            },
            tcp_idle_timeout: self.duration_or(
                "tcp_idle_timeout",
                raw.tcp_idle_timeout.as_ref(),
                AgentConfig::DEFAULT_TCP_IDLE_TIMEOUT,
            ),
            tcp_splice: self.parse_or(
                AGENT,
                "tcp_splice",
                raw.tcp_splice.as_ref(),
                TcpSplice::default(),
            ),
            tcp_engine: self.parse_or(
                AGENT,
                "tcp_engine",
                raw.tcp_engine.as_ref(),
                TcpEngine::default(),
            ),
        };
        // The io_uring engine copies; it has no pipes to splice through.
        if agent.tcp_engine == TcpEngine::IoUring && agent.tcp_splice == TcpSplice::On {
            self.problem(
                AGENT,
                "tcp_splice",
                "\"on\" needs tcp_engine = \"epoll\" (the io_uring engine copies)",
            );
        }
        agent
    }

    fn firewall(&mut self, raw: &RawFirewall) -> FirewallConfig {
        FirewallConfig {
            default: self.parse_or(
                "firewall",
                "default",
                raw.default.as_ref(),
                RuleAction::default(),
            ),
        }
    }

    fn access_rule(&mut self, index: usize, raw: &RawAccessRule) -> Option<AccessRule> {
        let location = format!("access_rules[{index}]");
        let mode = self.required(&location, "mode", raw.mode.as_ref(), "allow or block");
        let target = self.required(&location, "target", raw.target.as_ref(), "ip or ip_range");
        let Some(value) = &raw.value else {
            self.problem(
                &location,
                "value",
                "missing; an address (target ip) or a prefix (target ip_range)",
            );
            return None;
        };
        let prefix = match value.parse::<Prefix>() {
            Ok(prefix) => prefix,
            Err(reason) => {
                self.problem(&location, "value", reason);
                return None;
            }
        };
        let (mode, target) = (mode?, target?);
        let full_len = if prefix.addr.is_ipv4() { 32 } else { 128 };
        match target {
            RuleTarget::Ip if prefix.len != full_len => {
                self.problem(
                    &location,
                    "value",
                    format!("target 'ip' takes one address, not the prefix '{value}'; use target 'ip_range'"),
                );
                return None;
            }
            RuleTarget::IpRange if !prefix.explicit_len => {
                self.problem(
                    &location,
                    "value",
                    format!("target 'ip_range' needs ADDRESS/PREFIX, e.g. '{value}/24'; for one address use target 'ip'"),
                );
                return None;
            }
            // Host bits set is most likely a typo, and guessing the intended range of a
            // firewall rule is risky: reject and name the network the prefix denotes.
            RuleTarget::IpRange if prefix.network() != prefix.addr => {
                self.problem(
                    &location,
                    "value",
                    format!(
                        "'{value}' has host bits set; did you mean '{}/{}'?",
                        prefix.network(),
                        prefix.len
                    ),
                );
                return None;
            }
            _ => {}
        }
        Some(AccessRule {
            mode,
            target,
            value: value.clone(),
            addr: prefix.network(),
            prefix_len: prefix.len,
        })
    }

    /// A required keyword: missing or unknown values are problems.
    fn required<T: FromStr<Err = String>>(
        &mut self,
        location: &str,
        field: &str,
        text: Option<&String>,
        choices: &str,
    ) -> Option<T> {
        let Some(text) = text else {
            self.problem(location, field, format!("missing; one of {choices}"));
            return None;
        };
        text.parse::<T>()
            .map_err(|reason| self.problem(location, field, reason))
            .ok()
    }

    /// Two rules for the same prefix with the same verdict are redundant and would share
    /// one hit counter; an allow and a block for the same prefix are fine (allow wins).
    fn duplicate_access_rules(&mut self, rules: &[(usize, AccessRule)]) {
        for (position, (index, later)) in rules.iter().enumerate() {
            let earlier = rules[..position]
                .iter()
                .map(|(_, rule)| rule)
                .find(|earlier| {
                    earlier.mode == later.mode
                        && earlier.addr == later.addr
                        && earlier.prefix_len == later.prefix_len
                });
            if let Some(earlier) = earlier {
                self.problem(
                    &format!("access_rules[{index}]"),
                    "value",
                    format!(
                        "'{}' repeats the {} rule '{}'",
                        later.value, earlier.mode, earlier.value
                    ),
                );
            }
        }
    }

    fn app(&mut self, index: usize, raw: &RawApp, agent: &AgentConfig) -> CheckedApp {
        // The protocol is needed first: it gives the default id that names the app.
        let parsed_spec: Option<Result<PortSpec, String>> =
            raw.protocol.as_ref().map(|text| text.parse());
        let spec: Option<PortSpec> = parsed_spec.clone().and_then(Result::ok);
        let id = raw
            .id
            .clone()
            .or_else(|| spec.as_ref().map(App::default_id));
        let location = app_location(id.as_deref(), index);

        match parsed_spec {
            None => self.problem(
                &location,
                "protocol",
                "missing; e.g. \"tcp/22\" or \"udp/27000-27100\"",
            ),
            Some(Err(reason)) => self.problem(&location, "protocol", reason),
            Some(Ok(_)) => {}
        }
        if let Some(explicit_id) = &raw.id {
            if explicit_id.trim().is_empty() {
                self.problem(
                    &location,
                    "id",
                    "empty; leave it out for the default \"<proto>-<port>\"",
                );
            } else if explicit_id.chars().any(char::is_control) {
                self.problem(&location, "id", "contains control characters");
            }
        }

        let edge_ips = match &raw.edge_ips {
            None => Some(Vec::new()),
            Some(texts) => self.address_list(&location, "edge_ips", texts),
        };
        if let Some(edge_ips) = &edge_ips
            && !agent.edge_addresses.is_empty()
        {
            for addr in edge_ips
                .iter()
                .filter(|addr| !agent.edge_addresses.contains(addr))
            {
                self.problem(
                    &location,
                    "edge_ips",
                    format!("{addr} is not one of agent.edge_addresses"),
                );
            }
        }

        let origins = spec
            .map(|spec| self.origins(&location, spec, raw.origin_direct.as_deref()))
            .unwrap_or_default();
        if let (Some(spec), Some(edge_ips)) = (spec, &edge_ips) {
            self.udp_families(&location, spec.protocol, edge_ips, &origins);
        }

        let ProxyKeyword(proxy_protocol) = self.parse_or(
            &location,
            "proxy_protocol",
            raw.proxy_protocol.as_ref(),
            ProxyKeyword(ProxyProtocol::default()),
        );
        if let Some(spec) = spec
            && !proxy_supports(proxy_protocol, spec.protocol)
        {
            let reason = match proxy_protocol {
                ProxyProtocol::V1 => "'v1' is TCP only; use 'v2' or 'simple' for UDP",
                _ => "'simple' is UDP only; use 'v1' or 'v2' for TCP",
            };
            self.problem(&location, "proxy_protocol", reason);
        }

        let udp_new_flows_per_second = match raw.udp_new_flows_per_second {
            None => None,
            Some(_) if spec.is_some_and(|s| s.protocol != Protocol::Udp) => {
                self.problem(
                    &location,
                    "udp_new_flows_per_second",
                    "UDP apps only (TCP has SYN cookies and connection limits)",
                );
                None
            }
            Some(n) if (1..=MAX_NEW_FLOWS_PER_SOURCE).contains(&n) => Some(n as u32),
            Some(n) => {
                self.problem(
                    &location,
                    "udp_new_flows_per_second",
                    format!(
                        "{n} is out of range: new flows per second, 1 to \
                         {MAX_NEW_FLOWS_PER_SOURCE} (leave the key out for no limit)"
                    ),
                );
                None
            }
        };
        let tcp_fastpath = self.parse_or(
            &location,
            "tcp_fastpath",
            raw.tcp_fastpath.as_ref(),
            TcpFastpath::Off,
        );
        if tcp_fastpath != TcpFastpath::Off && spec.is_some_and(|s| s.protocol != Protocol::Tcp) {
            self.problem(
                &location,
                "tcp_fastpath",
                "TCP apps only (UDP apps are always forwarded in XDP)",
            );
        }
        let health_check = match (&raw.health_check, spec) {
            (Some(check), Some(spec)) => self.health_check(&location, spec.protocol, check),
            _ => None,
        };
        let tls = super::tls::check(&location, raw, spec.map(|s| s.protocol), self.problems);
        if tcp_fastpath != TcpFastpath::Off && tls.mode != super::tls::TlsMode::Off {
            // XDP rewrites segments as they are: the edge could not decrypt them.
            self.problem(
                &location,
                "tcp_fastpath",
                "\"xdp\" splices the bytes as they are, so it cannot carry an app whose TLS the edge terminates; use tls = \"off\" or tcp_fastpath = \"off\"",
            );
        }
        let app = match (spec, edge_ips) {
            (Some(spec), Some(edge_ips)) => Some(App {
                id: id.clone().unwrap_or_else(|| App::default_id(&spec)),
                protocol: spec.protocol,
                ports: spec.ports,
                edge_ips,
                origins,
                proxy_protocol,
                ip_firewall: raw.ip_firewall.unwrap_or(true),
                udp_new_flows_per_second,
                health_check,
                tls,
                tcp_fastpath,
            }),
            _ => None,
        };
        CheckedApp { id, app }
    }

    /// Parses `origin_direct`: schemes match, port counts match (SPEC: edge `LOW+k` →
    /// origin `OLOW+k`), addresses are usable, no repeats.
    fn origins(
        &mut self,
        location: &str,
        spec: PortSpec,
        entries: Option<&[RawOrigin]>,
    ) -> Vec<Origin> {
        const FIELD: &str = "origin_direct";
        let entries = match entries {
            None => {
                self.problem(
                    location,
                    FIELD,
                    "missing; at least one origin, e.g. \"tcp://10.0.0.5:22\"",
                );
                return Vec::new();
            }
            Some([]) => {
                self.problem(
                    location,
                    FIELD,
                    "empty; at least one origin, e.g. \"tcp://10.0.0.5:22\"",
                );
                return Vec::new();
            }
            Some(entries) => entries,
        };
        let mut origins: Vec<Origin> = Vec::with_capacity(entries.len());
        for entry in entries {
            let Some(text) = entry.url() else {
                self.problem(
                    location,
                    FIELD,
                    "an origin table needs `address`, e.g. { address = \"tcp://10.0.0.5:22\", weight = 3 }",
                );
                continue;
            };
            let (scheme, mut origin) = match Origin::parse_url(text) {
                Ok(parsed) => parsed,
                Err(reason) => {
                    self.problem(location, FIELD, reason);
                    continue;
                }
            };
            if let RawOrigin::Weighted(RawWeightedOrigin {
                weight: Some(weight),
                ..
            }) = entry
            {
                match u32::try_from(*weight) {
                    Ok(w) if w <= Origin::MAX_WEIGHT => origin.weight = w,
                    _ => self.problem(
                        location,
                        FIELD,
                        format!(
                            "weight {weight} of '{text}' is out of range: 0 to {}",
                            Origin::MAX_WEIGHT
                        ),
                    ),
                }
            }
            if scheme != spec.protocol {
                self.problem(
                    location,
                    FIELD,
                    format!(
                        "scheme '{scheme}' does not match protocol '{}'",
                        spec.protocol
                    ),
                );
            }
            if origin.ports.len() != spec.ports.len() {
                // A single origin port for an edge range is refused too (strict Spectrum
                // semantics): every edge port maps to its own origin port.
                self.problem(
                    location,
                    FIELD,
                    format!(
                        "'{text}' has {} port(s) but the app's edge range {} has {}; an origin needs exactly as many ports as the edge (edge LOW+k goes to origin LOW+k)",
                        origin.ports.len(),
                        spec.ports,
                        spec.ports.len()
                    ),
                );
            }
            let addr = origin.addr;
            if addr.is_unspecified() || addr.is_multicast() || is_ipv4_broadcast(addr) {
                self.problem(
                    location,
                    FIELD,
                    format!("{addr} is not a unicast origin address"),
                );
            } else if spec.protocol == Protocol::Udp && addr.is_loopback() {
                // UDP is forwarded by XDP out of an interface; loopback is not reachable that way.
                self.problem(
                    location,
                    FIELD,
                    format!("{addr} is a loopback address, which XDP cannot forward UDP to"),
                );
            }
            if origins.iter().any(|o| o.same_place(&origin)) {
                self.problem(
                    location,
                    FIELD,
                    format!("'{text}' is listed more than once"),
                );
                continue;
            }
            origins.push(origin);
        }
        if !origins.is_empty() && origins.iter().all(|o| o.weight == 0) {
            self.problem(
                location,
                FIELD,
                "every origin has weight 0; at least one needs a weight above 0",
            );
        }
        origins
    }

    /// Parses `[apps.health_check]`: durations, counts, and for UDP apps the probe
    /// (`send`/`send_hex`, `expect`/`expect_hex`).
    fn health_check(
        &mut self,
        location: &str,
        protocol: Protocol,
        raw: &RawHealthCheck,
    ) -> Option<HealthCheck> {
        let start = self.problems.len();
        let duration =
            |v: &mut Self, key: &str, text: Option<&String>, default: Duration| match text
                .map(|text| parse_duration(text))
            {
                None => default,
                Some(Ok(d)) => d,
                Some(Err(reason)) => {
                    v.problem(location, &format!("health_check.{key}"), reason);
                    default
                }
            };
        let interval = duration(
            self,
            "interval",
            raw.interval.as_ref(),
            HealthCheck::DEFAULT_INTERVAL,
        );
        let timeout = duration(
            self,
            "timeout",
            raw.timeout.as_ref(),
            HealthCheck::DEFAULT_TIMEOUT.min(interval),
        );
        if interval < HealthCheck::MIN_INTERVAL {
            self.problem(
                location,
                "health_check.interval",
                format!(
                    "{} is too short; at least {}",
                    format_duration(interval),
                    format_duration(HealthCheck::MIN_INTERVAL)
                ),
            );
        }
        if timeout > interval {
            self.problem(
                location,
                "health_check.timeout",
                format!(
                    "{} is longer than the interval {}; a check must end before the next starts",
                    format_duration(timeout),
                    format_duration(interval)
                ),
            );
        }
        let count = |v: &mut Self, key: &str, value: Option<i64>, default: u32| match value {
            None => default,
            Some(n) if (1..=i64::from(HealthCheck::MAX_COUNT)).contains(&n) => n as u32,
            Some(n) => {
                v.problem(
                    location,
                    &format!("health_check.{key}"),
                    format!(
                        "{n} is out of range: consecutive checks, 1 to {}",
                        HealthCheck::MAX_COUNT
                    ),
                );
                default
            }
        };
        let rise = count(self, "rise", raw.rise, HealthCheck::DEFAULT_RISE);
        let fall = count(self, "fall", raw.fall, HealthCheck::DEFAULT_FALL);
        let send = self.probe_bytes(location, "send", raw.send.as_ref(), raw.send_hex.as_ref());
        let expect = self.probe_bytes(
            location,
            "expect",
            raw.expect.as_ref(),
            raw.expect_hex.as_ref(),
        );
        let probe = match protocol {
            Protocol::Tcp => {
                if send.is_some() || expect.is_some() {
                    self.problem(
                        location,
                        "health_check.send",
                        "a TCP app's health check is a connect; send/expect are for UDP apps",
                    );
                }
                None
            }
            Protocol::Udp => match send {
                Some(send) if send.is_empty() => {
                    self.problem(location, "health_check.send", "empty; a probe needs bytes");
                    None
                }
                Some(send) => Some(UdpProbe {
                    send,
                    expect: expect.unwrap_or_default(),
                }),
                None => {
                    self.problem(
                        location,
                        "health_check.send",
                        "missing; a UDP app's health check sends a probe datagram \
                         (`send` or `send_hex`) and waits for a reply (`expect`: its first bytes)",
                    );
                    None
                }
            },
        };
        (self.problems.len() == start).then_some(HealthCheck {
            interval,
            timeout,
            rise,
            fall,
            probe,
        })
    }

    /// One probe field, as text (`send`) or hex (`send_hex`), not both.
    fn probe_bytes(
        &mut self,
        location: &str,
        key: &str,
        text: Option<&String>,
        hex: Option<&String>,
    ) -> Option<Vec<u8>> {
        match (text, hex) {
            (None, None) => None,
            (Some(text), None) => Some(text.as_bytes().to_vec()),
            (None, Some(hex)) => match decode_hex(hex) {
                Ok(bytes) => Some(bytes),
                Err(reason) => {
                    self.problem(location, &format!("health_check.{key}_hex"), reason);
                    None
                }
            },
            (Some(_), Some(_)) => {
                self.problem(
                    location,
                    &format!("health_check.{key}"),
                    format!("give `{key}` or `{key}_hex`, not both"),
                );
                None
            }
        }
    }

    /// SPEC §5: a UDP app's client and origin side use one family (no v4↔v6 translation).
    fn udp_families(
        &mut self,
        location: &str,
        protocol: Protocol,
        edge_ips: &[IpAddr],
        origins: &[Origin],
    ) {
        if protocol != Protocol::Udp {
            return;
        }
        let Some(first) = origins.first() else {
            return;
        };
        let family = IpFamily::of(first.addr);
        if let Some(other) = origins
            .iter()
            .find(|origin| IpFamily::of(origin.addr) != family)
        {
            self.problem(
                location,
                "origin_direct",
                format!(
                    "a UDP app's origins must share one IP family: {} is {family}, {} is {}",
                    first.addr,
                    other.addr,
                    IpFamily::of(other.addr)
                ),
            );
            return;
        }
        for addr in edge_ips
            .iter()
            .filter(|addr| IpFamily::of(**addr) != family)
        {
            self.problem(
                location,
                "edge_ips",
                format!(
                    "{addr} is {} but the origins are {family}; UDP is not translated between IPv4 and IPv6",
                    IpFamily::of(*addr)
                ),
            );
        }
    }

    fn duplicate_app_ids(&mut self, ids: &[(usize, String)]) {
        let mut first_index_by_id: HashMap<&str, usize> = HashMap::new();
        for (index, id) in ids {
            match first_index_by_id.get(id.as_str()) {
                Some(first_index) => self.problem(
                    &app_location(Some(id), *index),
                    "id",
                    format!("'{id}' is already the id of apps[{first_index}]"),
                ),
                None => {
                    first_index_by_id.insert(id, *index);
                }
            }
        }
    }

    /// Two apps may not claim the same (protocol, edge address, port).
    fn overlapping_apps(&mut self, apps: &[IndexedApp]) {
        for (position, later) in apps.iter().enumerate() {
            for earlier in &apps[..position] {
                let (a, b) = (&earlier.app, &later.app);
                if a.protocol != b.protocol || !a.ports.overlaps(&b.ports) {
                    continue;
                }
                let Some(shared_edges) = shared_edge_addresses(&a.edge_ips, &b.edge_ips) else {
                    continue;
                };
                self.problem(
                    &later.location(),
                    "protocol",
                    format!(
                        "{} overlaps {} ({}) on {shared_edges}",
                        b.port_spec(),
                        earlier.location(),
                        a.port_spec()
                    ),
                );
            }
        }
    }

    /// Replies from one UDP origin port are read one way: an SPP app and a plain
    /// NAT / v2 app may not share an origin address and port (the datapath would
    /// not know which return path a reply takes).
    fn udp_return_paths(&mut self, apps: &[IndexedApp]) {
        let udp: Vec<&IndexedApp> = apps
            .iter()
            .filter(|a| a.app.protocol == Protocol::Udp)
            .collect();
        for (position, later) in udp.iter().enumerate() {
            for earlier in &udp[..position] {
                let (a, b) = (&earlier.app, &later.app);
                if a.proxy_protocol.udp_returns_via_nat() == b.proxy_protocol.udp_returns_via_nat()
                {
                    continue;
                }
                for oa in &a.origins {
                    for ob in b.origins.iter().filter(|ob| ob.addr == oa.addr) {
                        if oa.ports.low <= ob.ports.high && ob.ports.low <= oa.ports.high {
                            self.problem(
                                &later.location(),
                                "origin_direct",
                                format!(
                                    "shares UDP origin {} port(s) {} with {}, but only one of \
                                     the two uses proxy_protocol = \"simple\"; give them \
                                     different origin ports",
                                    ob.addr,
                                    ob.ports,
                                    earlier.location()
                                ),
                            );
                        }
                    }
                }
            }
        }
    }

    /// The datapath's port table holds `MAX_PORT_ENTRIES` (edge address, protocol,
    /// port) entries. Where the edge addresses are known from the file (an app's
    /// `edge_ips`, or `agent.edge_addresses`), a config that needs more is refused
    /// here; otherwise `run` checks it once it knows the host's addresses.
    fn port_entries(&mut self, agent: &AgentConfig, apps: &[IndexedApp]) {
        let all_edges = agent.edge_addresses.len();
        let mut total = 0u64;
        for app in apps {
            let edges = if !app.app.edge_ips.is_empty() {
                app.app.edge_ips.len()
            } else if all_edges > 0 {
                all_edges
            } else {
                return;
            };
            total += edges as u64 * app.app.ports.len() as u64;
        }
        if all_edges > 0 {
            total += agent
                .pass
                .iter()
                .map(|p| all_edges as u64 * p.ports.len() as u64)
                .sum::<u64>();
        }
        let max = u64::from(forwarder_common::MAX_PORT_ENTRIES);
        if total > max {
            self.problem(
                "apps",
                "protocol",
                format!(
                    "the apps and pass entries need {total} (edge address, protocol, port) \
                     entries; the datapath holds {max}: use fewer ports or edge addresses"
                ),
            );
        }
    }

    /// The datapath's other tables: apps, origins (all apps together), access rules
    /// and edge addresses each have a fixed capacity (forwarder-common), which `run`
    /// would refuse to exceed; refused here first.
    fn map_capacities(&mut self, agent: &AgentConfig, rules: usize, apps: &[IndexedApp]) {
        use forwarder_common::{MAX_APPS, MAX_EDGE_ADDRS, MAX_ORIGINS, MAX_RULES};
        let origins: usize = apps.iter().map(|a| a.app.origins.len()).sum();
        let table_slots: usize = apps
            .iter()
            .filter(|a| a.app.protocol == Protocol::Udp)
            .map(|a| forwarder_common::maglev_table_size(a.app.origins.len() as u32) as usize)
            .sum();
        for (location, field, count, max, what) in [
            (
                "apps",
                "origin_direct",
                table_slots,
                forwarder_common::MAX_MAGLEV_SLOTS,
                "origin table slots of UDP apps (4093 per app with 2-10 origins, 16381 up to 40, \
                 65521 beyond)",
            ),
            ("apps", "id", apps.len(), MAX_APPS, "apps"),
            (
                "apps",
                "origin_direct",
                origins,
                MAX_ORIGINS,
                "origins (all apps together)",
            ),
            ("access_rules", "value", rules, MAX_RULES, "access rules"),
            (
                "agent",
                "edge_addresses",
                agent.edge_addresses.len(),
                MAX_EDGE_ADDRS,
                "edge addresses",
            ),
        ] {
            if count > max as usize {
                self.problem(
                    location,
                    field,
                    format!("{count} {what} configured; the datapath holds at most {max}"),
                );
            }
        }
    }

    /// A `pass` entry may not overlap an app of the same protocol (pass applies to
    /// every edge address, so any app port in the range is a conflict).
    fn pass_overlaps(&mut self, agent: &AgentConfig, apps: &[IndexedApp]) {
        for pass in &agent.pass {
            for app in apps
                .iter()
                .filter(|app| pass.overlaps(&app.app.port_spec()))
            {
                self.problem(
                    "agent",
                    "pass",
                    format!(
                        "{pass} overlaps {} ({})",
                        app.location(),
                        app.app.port_spec()
                    ),
                );
            }
        }
    }

    /// The agent's UDP NAT source ports may share an address with the edge (one NIC), so
    /// a reply to a NAT port must never be mistaken for a client packet to an app or a
    /// host service.
    fn nat_port_overlaps(&mut self, agent: &AgentConfig, apps: &[IndexedApp]) {
        let nat = PortSpec {
            protocol: Protocol::Udp,
            ports: agent.udp_nat_ports,
        };
        for app in apps.iter().filter(|app| nat.overlaps(&app.app.port_spec())) {
            self.problem(
                "agent",
                "udp_nat_ports",
                format!(
                    "{} overlaps {} ({})",
                    nat.ports,
                    app.location(),
                    app.app.port_spec()
                ),
            );
        }
        for pass in agent.pass.iter().filter(|pass| nat.overlaps(pass)) {
            self.problem(
                "agent",
                "udp_nat_ports",
                format!("{} overlaps the pass entry {pass}", nat.ports),
            );
        }
    }
}

/// The edge addresses two apps both claim, described for a message; `None` if disjoint.
/// Empty `edge_ips` means every edge address.
fn shared_edge_addresses(a: &[IpAddr], b: &[IpAddr]) -> Option<String> {
    let listed = |addrs: &[IpAddr]| {
        addrs
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (a.is_empty(), b.is_empty()) {
        (true, true) => Some("every edge address".to_string()),
        (true, false) => Some(listed(b)),
        (false, true) => Some(listed(a)),
        (false, false) => {
            let a: BTreeSet<&IpAddr> = a.iter().collect();
            let shared: Vec<IpAddr> = b.iter().filter(|addr| a.contains(addr)).copied().collect();
            (!shared.is_empty()).then(|| listed(&shared))
        }
    }
}

fn is_ipv4_broadcast(addr: IpAddr) -> bool {
    matches!(addr, IpAddr::V4(v4) if v4.is_broadcast())
}

/// Linux interface names: 1–15 bytes, no '/', ':' or whitespace.
fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an interface name is empty".to_string());
    }
    if name.len() > MAX_INTERFACE_NAME_LEN {
        return Err(format!(
            "'{name}' is longer than {MAX_INTERFACE_NAME_LEN} bytes, too long for a Linux interface name"
        ));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!("'{name}' is not a valid interface name"));
    }
    Ok(())
}
