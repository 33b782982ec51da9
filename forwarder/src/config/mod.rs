//! The configuration file (SPEC §2): model, validation, `forwarder check-config`.
//!
//! [`Config::parse`] judges the text alone and reports every problem it finds, each
//! naming where (`app 'game' (apps[0])`, `agent`, `access_rules[2]`), which field and
//! why. What only the host can tell (do the interfaces exist, which addresses do they
//! carry) is [`Config::resolve_edge_addresses`], called by `run`.
//! `docs/config.md` documents every key and rule.

mod advice;
mod duration;
mod host;
mod model;
mod raw;
mod tls;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;

pub use duration::{format_duration, parse_duration};
pub use host::interface_addresses;
pub use model::{
    AccessRule, AgentConfig, App, Config, FirewallConfig, HealthCheck, IpFamily, Origin, PortRange,
    PortSpec, Protocol, ProxyProtocol, RuleAction, RuleTarget, TcpEngine, TcpFastpath, TcpSplice,
    UdpProbe, XdpMode, origin_label,
};
pub(crate) use model::{prefix_mask_v4, prefix_mask_v6};
pub(crate) use raw::{RawAccessRule, RawApp, RawCertificate, RawOrigin, app_location};
pub use tls::{AppTls, CertificateFiles, TlsMode, TlsVersion};

use raw::{RawAgent, RawConfig, RawFirewall};

/// One thing wrong with a config: where, which field, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `app 'game' (apps[0])`, `agent`, `firewall`, `access_rules[2]`, or `config` for the
    /// document as a whole.
    pub location: String,
    /// The key, or empty when the problem is about the whole location.
    pub field: String,
    pub reason: String,
}

impl Problem {
    pub fn new(
        location: impl Into<String>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            location: location.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.location, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.location, self.field, self.reason)
        }
    }
}

/// Every problem found in a config; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl ConfigError {
    fn single(
        location: impl Into<String>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            problems: vec![Problem::new(location, field, reason)],
        }
    }
}

impl fmt::Display for ConfigError {
    /// One problem per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (position, problem) in self.problems.iter().enumerate() {
            if position > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parses and validates a config text; the error lists every problem found.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let sections = raw::read_document(text, &mut problems);
        let config = validate::build(&sections, &mut problems);
        // Reading and validating find problems in two passes; list them by place in the file.
        problems.sort_by_key(|problem| location_rank(&problem.location));
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Reads and parses a config file; a read error is a `ConfigError` naming the path.
    /// Relative paths in the TLS keys are taken from the file's directory, and every
    /// certificate, key and CA bundle they name is read and checked as `run` would.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            ConfigError::single(
                path.display().to_string(),
                "",
                format!("cannot read the config file: {error}"),
            )
        })?;
        let mut config = Config::parse(&text)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for app in &mut config.apps {
            tls::resolve_paths(app, base);
        }
        let locations: Vec<String> = config
            .apps
            .iter()
            .enumerate()
            .map(|(index, app)| app_location(Some(&app.id), index))
            .collect();
        let problems = tls::check_files(&config.apps, &locations);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// The config as TOML, with every key written out (defaults included), so that
    /// `Config::parse(&config.to_toml())` gives back an equal `Config`.
    pub fn to_toml(&self) -> String {
        let raw = RawConfig {
            agent: Some(raw_agent(&self.agent)),
            firewall: Some(RawFirewall {
                default: Some(self.firewall.default.to_string()),
            }),
            access_rules: self
                .access_rules
                .iter()
                .map(|rule| RawAccessRule {
                    mode: Some(rule.mode.to_string()),
                    target: Some(rule.target.to_string()),
                    value: Some(rule.value.clone()),
                })
                .collect(),
            apps: self.apps.iter().map(raw_app).collect(),
        };
        // Serializing plain strings, lists and tables cannot fail.
        toml::to_string(&raw).unwrap_or_else(|error| panic!("config serializes to TOML: {error}"))
    }

    /// Checks what only the host can tell (SPEC §2: done by `run`, not `check-config`):
    /// every interface exists (is a key of `addrs_by_interface`), and every
    /// `edge_addresses` / app `edge_ips` entry is carried by one of the interfaces.
    /// Returns the effective edge addresses: `edge_addresses`, or when that is empty all
    /// addresses of the interfaces except IPv6 link-local (fe80::/10), in interface order.
    /// The listed edge addresses (`edge_addresses`, apps' `edge_ips`) that no
    /// interface of the host carries yet. They are accepted — the XDP datapath
    /// serves UDP apps on them as it is, and TCP apps once the kernel has the
    /// address (a VRRP backup becoming master) — and `run` warns about them.
    pub fn absent_edge_addresses(
        &self,
        addrs_by_interface: &BTreeMap<String, Vec<IpAddr>>,
    ) -> Vec<IpAddr> {
        let on_host = |addr: &IpAddr| addrs_by_interface.values().any(|a| a.contains(addr));
        let mut absent = Vec::new();
        let listed = self
            .agent
            .edge_addresses
            .iter()
            .chain(self.apps.iter().flat_map(|a| a.edge_ips.iter()));
        for addr in listed {
            if !on_host(addr) && !absent.contains(addr) {
                absent.push(*addr);
            }
        }
        absent
    }

    pub fn resolve_edge_addresses(
        &self,
        addrs_by_interface: &BTreeMap<String, Vec<IpAddr>>,
    ) -> Result<Vec<IpAddr>, ConfigError> {
        let mut problems = Vec::new();
        let mut carried: Vec<IpAddr> = Vec::new();
        for name in &self.agent.interfaces {
            match addrs_by_interface.get(name) {
                Some(addrs) => {
                    for addr in addrs {
                        if !carried.contains(addr) {
                            carried.push(*addr);
                        }
                    }
                }
                None => problems.push(Problem::new(
                    "agent",
                    "interfaces",
                    format!("interface '{name}' does not exist on this host"),
                )),
            }
        }
        let interfaces = self.agent.interfaces.join(", ");
        // Listed edge addresses may live on any interface of the host — `lo` or a
        // dummy for an anycast/ECMP address while XDP sits on the physical ones
        // (SPEC §5a) — or on none yet (a VRRP backup): see `absent_edge_addresses`.
        let edge_addresses: Vec<IpAddr> = if self.agent.edge_addresses.is_empty() {
            carried
                .into_iter()
                .filter(|addr| !is_ipv6_link_local(addr))
                .collect()
        } else {
            self.agent.edge_addresses.clone()
        };
        if edge_addresses.is_empty() && problems.is_empty() {
            problems.push(Problem::new(
                "agent",
                "interfaces",
                format!(
                    "the interfaces ({interfaces}) carry no usable address to serve as edge address"
                ),
            ));
        }
        if problems.is_empty() {
            Ok(edge_addresses)
        } else {
            Err(ConfigError { problems })
        }
    }
}

/// Orders locations as the file is laid out: document, agent, firewall, access rules,
/// apps (by index). Only locations made by this module are ranked.
fn location_rank(location: &str) -> (u8, usize) {
    let index_after = |marker: &str| {
        let start = location.find(marker)? + marker.len();
        let end = start + location[start..].find(']')?;
        location[start..end].parse::<usize>().ok()
    };
    match location {
        "config" => (0, 0),
        "agent" => (1, 0),
        "firewall" => (2, 0),
        _ => {
            if let Some(index) = index_after("access_rules[") {
                (3, index)
            } else if let Some(index) = index_after("apps[") {
                (4, index)
            } else {
                (0, 0)
            }
        }
    }
}

fn is_ipv6_link_local(addr: &IpAddr) -> bool {
    matches!(addr, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

fn raw_agent(agent: &AgentConfig) -> RawAgent {
    let strings = |items: &[IpAddr]| items.iter().map(ToString::to_string).collect::<Vec<_>>();
    RawAgent {
        interfaces: Some(agent.interfaces.clone()),
        xdp_mode: Some(agent.xdp_mode.to_string()),
        edge_addresses: (!agent.edge_addresses.is_empty()).then(|| strings(&agent.edge_addresses)),
        pass: (!agent.pass.is_empty())
            .then(|| agent.pass.iter().map(ToString::to_string).collect()),
        metrics_listen: agent.metrics_listen.map(|addr| addr.to_string()),
        event_log: agent.event_log.clone(),
        udp_idle_timeout: Some(format_duration(agent.udp_idle_timeout)),
        udp_nat_ports: Some(agent.udp_nat_ports.to_string()),
        udp_new_flows_per_source: agent.udp_new_flows_per_source.map(i64::from),
        tcp_idle_timeout: Some(format_duration(agent.tcp_idle_timeout)),
        tcp_splice: Some(agent.tcp_splice.to_string()),
        tcp_engine: Some(agent.tcp_engine.to_string()),
    }
}

fn raw_app(app: &App) -> RawApp {
    let mut raw = RawApp {
        id: Some(app.id.clone()),
        protocol: Some(app.port_spec().to_string()),
        edge_ips: (!app.edge_ips.is_empty())
            .then(|| app.edge_ips.iter().map(ToString::to_string).collect()),
        origin_direct: Some(
            app.origins
                .iter()
                .map(|origin| {
                    let url = origin.to_url(app.protocol);
                    if origin.weight == Origin::DEFAULT_WEIGHT {
                        RawOrigin::Url(url)
                    } else {
                        RawOrigin::Weighted(raw::RawWeightedOrigin {
                            address: Some(url),
                            weight: Some(i64::from(origin.weight)),
                        })
                    }
                })
                .collect(),
        ),
        proxy_protocol: Some(app.proxy_protocol.to_string()),
        ip_firewall: Some(app.ip_firewall),
        udp_new_flows_per_second: app.udp_new_flows_per_second.map(i64::from),
        health_check: app.health_check.as_ref().map(raw_health_check),
        // Written only when on, so a config without the key reads back without it.
        tcp_fastpath: (app.tcp_fastpath != TcpFastpath::Off)
            .then(|| app.tcp_fastpath.as_str().to_string()),
        ..RawApp::default()
    };
    tls::raw_tls(&app.tls, &mut raw);
    raw
}

fn raw_health_check(check: &HealthCheck) -> raw::RawHealthCheck {
    let (send, expect) = match &check.probe {
        None => (None, None),
        Some(probe) => (
            Some(&probe.send),
            Some(&probe.expect).filter(|e| !e.is_empty()),
        ),
    };
    // Text when the bytes are printable text, else hex.
    let text = |bytes: &Vec<u8>| {
        std::str::from_utf8(bytes)
            .ok()
            .filter(|t| !t.chars().any(char::is_control))
            .map(str::to_string)
    };
    let hex = |bytes: &Vec<u8>| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    raw::RawHealthCheck {
        interval: Some(format_duration(check.interval)),
        timeout: Some(format_duration(check.timeout)),
        rise: Some(i64::from(check.rise)),
        fall: Some(i64::from(check.fall)),
        send: send.and_then(text),
        send_hex: send.filter(|b| text(b).is_none()).map(hex),
        expect: expect.and_then(text),
        expect_hex: expect.filter(|b| text(b).is_none()).map(hex),
    }
}

/// TOML for a list of apps alone (`[[apps]]` tables), as `import-spectrum` prints it.
pub(crate) fn apps_to_toml(apps: &[RawApp]) -> Result<String, toml::ser::Error> {
    toml::to_string(&RawConfig {
        apps: apps.to_vec(),
        ..RawConfig::default()
    })
}

/// TOML for access rules alone (`[[access_rules]]` tables).
pub(crate) fn access_rules_to_toml(rules: &[RawAccessRule]) -> Result<String, toml::ser::Error> {
    toml::to_string(&RawConfig {
        access_rules: rules.to_vec(),
        ..RawConfig::default()
    })
}

/// `run` refused its config (invalid, or not matching this host: interfaces,
/// addresses). `forwarder run` then exits with `EX_CONFIG`, which the systemd unit
/// does not restart on (`RestartPreventExitStatus=78`): restarting cannot fix it.
#[derive(Debug)]
pub struct ConfigRejected(pub String);

/// sysexits.h `EX_CONFIG`.
pub const EX_CONFIG: u8 = 78;

impl std::fmt::Display for ConfigRejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigRejected {}

/// How `check-config` reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Warnings fail the check (exit 1).
    pub strict: bool,
    /// Print the effective config (every key, defaults included) on stdout; the
    /// summary then goes to stderr.
    pub dump: bool,
}

/// `forwarder check-config --config PATH`: exit 0 with a summary on stdout (and
/// any warnings on stderr), or exit 1 with one line per problem on stderr (or per
/// warning, with `--strict`).
pub fn check_config_cli(config: &Path, options: CheckOptions) -> anyhow::Result<ExitCode> {
    match Config::load(config) {
        Ok(parsed) => {
            let warnings = advice::warnings(&parsed);
            for warning in &warnings {
                eprintln!("warning: {warning}");
            }
            if options.strict && !warnings.is_empty() {
                eprintln!(
                    "{}: {} warning{} (--strict)",
                    config.display(),
                    warnings.len(),
                    if warnings.len() == 1 { "" } else { "s" }
                );
                return Ok(ExitCode::from(1));
            }
            if options.dump {
                print!("{}", parsed.to_toml());
                eprintln!("config OK: {}", summary(&parsed));
            } else {
                println!("config OK: {}", summary(&parsed));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            for problem in &error.problems {
                eprintln!("{problem}");
            }
            let count = error.problems.len();
            eprintln!(
                "{}: {count} problem{}",
                config.display(),
                if count == 1 { "" } else { "s" }
            );
            Ok(ExitCode::from(1))
        }
    }
}

/// `3 apps (2 tcp, 1 udp), 2 access rules, 1 pass entry, interfaces eth0`.
fn summary(config: &Config) -> String {
    let count = |number: usize, singular: &str, plural: &str| {
        format!("{number} {}", if number == 1 { singular } else { plural })
    };
    let tcp_apps = config
        .apps
        .iter()
        .filter(|app| app.protocol == Protocol::Tcp)
        .count();
    format!(
        "{} ({tcp_apps} tcp, {} udp), {}, {}, interfaces {}",
        count(config.apps.len(), "app", "apps"),
        config.apps.len() - tcp_apps,
        count(config.access_rules.len(), "access rule", "access rules"),
        count(config.agent.pass.len(), "pass entry", "pass entries"),
        config.agent.interfaces.join(", ")
    )
}
