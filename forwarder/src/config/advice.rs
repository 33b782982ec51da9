//! Warnings about a valid config: things `run` accepts but an operator most likely
//! did not mean, or that leave little room. `check-config` prints them and fails
//! only with `--strict`.

use forwarder_common::{MAX_APPS, MAX_EDGE_ADDRS, MAX_ORIGINS, MAX_PORT_ENTRIES, MAX_RULES};

use super::model::{Config, Protocol};

/// From this share of a datapath table on, `check-config` warns.
const NEAR_FULL: f64 = 0.9;

/// The warnings for `config`, one line each.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    ssh_lockout(config, &mut out);
    near_capacity(config, &mut out);
    out
}

/// With no `edge_addresses`, every address of the interfaces becomes an edge
/// address, the management address included; XDP then drops SSH to it unless
/// `tcp/22` is passed (or proxied).
fn ssh_lockout(config: &Config, out: &mut Vec<String>) {
    let agent = &config.agent;
    if !agent.edge_addresses.is_empty() {
        return;
    }
    let passed = agent
        .pass
        .iter()
        .any(|p| p.protocol == Protocol::Tcp && p.ports.contains(22));
    let proxied = config
        .apps
        .iter()
        .any(|a| a.protocol == Protocol::Tcp && a.ports.contains(22));
    if !passed && !proxied {
        out.push(format!(
            "agent: pass: every address of {} becomes an edge address (no \
             edge_addresses) and tcp/22 is neither passed nor an app: once XDP is \
             attached, SSH to those addresses is dropped (no_app). If this host is \
             managed over one of them, add pass = [\"tcp/22\"] or list edge_addresses.",
            agent.interfaces.join(", ")
        ));
    }
}

/// Tables of the datapath at 90 % or more.
fn near_capacity(config: &Config, out: &mut Vec<String>) {
    let origins: usize = config.apps.iter().map(|a| a.origins.len()).sum();
    let mut tables = vec![
        ("apps", config.apps.len(), MAX_APPS as usize),
        ("origins", origins, MAX_ORIGINS as usize),
        (
            "access rules",
            config.access_rules.len(),
            MAX_RULES as usize,
        ),
        (
            "edge addresses",
            config.agent.edge_addresses.len(),
            MAX_EDGE_ADDRS as usize,
        ),
    ];
    // Port entries are known when the edge addresses are.
    let edges = config.agent.edge_addresses.len();
    if edges > 0 {
        let ports: usize = config
            .apps
            .iter()
            .map(|a| {
                let n = if a.edge_ips.is_empty() {
                    edges
                } else {
                    a.edge_ips.len()
                };
                n * a.ports.len() as usize
            })
            .sum::<usize>()
            + config
                .agent
                .pass
                .iter()
                .map(|p| edges * p.ports.len() as usize)
                .sum::<usize>();
        tables.push((
            "(edge address, protocol, port) entries",
            ports,
            MAX_PORT_ENTRIES as usize,
        ));
    }
    for (what, used, max) in tables {
        if used as f64 >= NEAR_FULL * max as f64 {
            out.push(format!(
                "capacity: {used} {what} of the datapath's {max} ({:.0} %): little room \
                 for a reload that adds more",
                100.0 * used as f64 / max as f64
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text).expect("valid config")
    }

    const AGENT: &str = "[agent]\ninterfaces = [\"eth0\"]\n";

    #[test]
    fn claiming_every_address_without_passing_ssh_is_warned() {
        let w = warnings(&config(AGENT));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("tcp/22") && w[0].contains("eth0"), "{w:?}");
        for fine in [
            format!("{AGENT}pass = [\"tcp/22\"]\n"),
            format!("{AGENT}pass = [\"tcp/20-30\"]\n"),
            format!("{AGENT}edge_addresses = [\"192.0.2.1\"]\n"),
            format!(
                "{AGENT}[[apps]]\nprotocol = \"tcp/22\"\norigin_direct = [\"tcp://10.0.0.2:22\"]\n"
            ),
        ] {
            assert!(warnings(&config(&fine)).is_empty(), "{fine}");
        }
    }

    #[test]
    fn tables_near_their_capacity_are_warned() {
        let rules = super::super::tests::block_rules((MAX_RULES as usize * 9).div_ceil(10));
        let text = format!("{AGENT}pass = [\"tcp/22\"]\n{rules}");
        let w = warnings(&config(&text));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("capacity: 14746 access rules"), "{w:?}");
    }
}
