//! Turns a validated config into the exact contents of the datapath maps.
//!
//! Pure (no syscalls): the loader writes a `Plan` into the maps, and a reload writes
//! the difference between two plans. Everything per-config happens here so that the
//! XDP program does one lookup per question per packet.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use anyhow::{Context as _, bail};
use forwarder_common::{
    APP_PASS, AppInfo, MAX_APPS, MAX_ORIGINS, MAX_RULES, OriginInfo, OriginPortKey, PROXY_OFF,
    PROXY_SIMPLE, PROXY_V1, PROXY_V2, PortKey, RULE_ALLOW, RULE_BLOCK, RuleVerdict, Settings,
};

use crate::config::{Config, IpFamily, Protocol, ProxyProtocol, RuleAction};
use crate::route::OriginRoute;

/// 16-byte encoding of any address (IPv4 as IPv4-mapped IPv6).
pub fn addr16(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Map contents for one config.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub settings: Settings,
    /// Edge address → index.
    pub edge_addrs: BTreeMap<[u8; 16], u32>,
    /// Every (edge, protocol, port) → app index or `APP_PASS`.
    pub ports: BTreeMap<PortKeyOrd, u32>,
    /// `APPS[i]`; `app_ids[i]` names it.
    pub apps: Vec<AppInfo>,
    pub app_ids: Vec<String>,
    pub origins: Vec<OriginInfo>,
    /// Every (protocol, origin address, origin port) → app index.
    pub origin_ports: BTreeMap<OriginPortKeyOrd, u32>,
    /// (prefix length, network) → verdict. Allow beats block at the same prefix.
    pub rules_v4: BTreeMap<(u32, [u8; 4]), RuleVerdict>,
    pub rules_v6: BTreeMap<(u32, [u8; 16]), RuleVerdict>,
    /// `RULE_HITS[i]` belongs to the access rule whose value is `rule_labels[i]`.
    pub rule_labels: Vec<String>,
}

/// `PortKey` with an order, for deterministic plans and diffs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortKeyOrd {
    pub edge: u32,
    pub proto: u8,
    pub port: u16,
}

impl PortKeyOrd {
    pub fn key(self) -> PortKey {
        PortKey {
            edge: self.edge,
            port: self.port,
            proto: self.proto,
            _pad: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OriginPortKeyOrd {
    pub addr: [u8; 16],
    pub proto: u8,
    pub port: u16,
}

impl OriginPortKeyOrd {
    pub fn key(self) -> OriginPortKey {
        OriginPortKey {
            addr: self.addr,
            port: self.port,
            proto: self.proto,
            _pad: 0,
        }
    }
}

impl Plan {
    /// Builds the plan for `config` on a host whose effective edge addresses are
    /// `edges`. `route_to(origin)` says how the host reaches an origin (the routing
    /// table's choice; resolved once per config).
    pub fn build(
        config: &Config,
        edges: &[IpAddr],
        mut route_to: impl FnMut(IpAddr) -> anyhow::Result<OriginRoute>,
    ) -> anyhow::Result<Plan> {
        let mut plan = Plan {
            settings: Settings {
                firewall_default: match config.firewall.default {
                    RuleAction::Allow => RULE_ALLOW,
                    RuleAction::Block => RULE_BLOCK,
                },
                nat_port_low: config.agent.udp_nat_ports.low,
                nat_port_high: config.agent.udp_nat_ports.high,
            },
            ..Plan::default()
        };
        let unique_edges: BTreeSet<IpAddr> = edges.iter().copied().collect();
        for (index, edge) in unique_edges.iter().enumerate() {
            plan.edge_addrs.insert(addr16(*edge), index as u32);
        }
        let edge_index = |addr: &IpAddr| plan.edge_addrs.get(&addr16(*addr)).copied();

        if config.apps.len() > MAX_APPS as usize {
            bail!(
                "{} apps configured; the datapath holds at most {MAX_APPS}",
                config.apps.len()
            );
        }
        let mut ports = BTreeMap::new();
        let mut apps = Vec::new();
        let mut app_ids = Vec::new();
        let mut origins = Vec::new();
        let mut origin_ports = BTreeMap::new();
        for (app_index, app) in config.apps.iter().enumerate() {
            let app_index = app_index as u32;
            let proto = app.protocol.ip_proto();
            // UDP never translates between families (SPEC §5): an app listens only on
            // edge addresses of its origins' family.
            let family = match app.protocol {
                Protocol::Udp => app.family(),
                Protocol::Tcp => None,
            };
            let app_edges: Vec<IpAddr> = if app.edge_ips.is_empty() {
                unique_edges
                    .iter()
                    .copied()
                    .filter(|e| family.is_none_or(|f| f == IpFamily::of(*e)))
                    .collect()
            } else {
                app.edge_ips.clone()
            };
            for edge in &app_edges {
                let edge = edge_index(edge).with_context(|| {
                    format!(
                        "app '{}': edge address {edge} is not an edge address",
                        app.id
                    )
                })?;
                for port in app.ports.low..=app.ports.high {
                    ports.insert(PortKeyOrd { edge, proto, port }, app_index);
                }
            }
            let origin_first = origins.len() as u32;
            for origin in &app.origins {
                let route = route_to(origin.addr).with_context(|| {
                    format!("app '{}': no route to origin {}", app.id, origin.addr)
                })?;
                origins.push(OriginInfo {
                    addr: addr16(origin.addr),
                    local: addr16(route.local),
                    ifindex: route.ifindex,
                    port_low: origin.ports.low,
                    family: if origin.addr.is_ipv4() { 4 } else { 6 },
                    _pad: 0,
                    app: app_index,
                });
                for port in origin.ports.low..=origin.ports.high {
                    let key = OriginPortKeyOrd {
                        addr: addr16(origin.addr),
                        proto,
                        port,
                    };
                    origin_ports.insert(key, app_index);
                }
            }
            if origins.len() > MAX_ORIGINS as usize {
                bail!("more than {MAX_ORIGINS} origins configured");
            }
            apps.push(AppInfo {
                edge_port_low: app.ports.low,
                origin_count: app.origins.len() as u16,
                origin_first,
                proto,
                proxy: match app.proxy_protocol {
                    ProxyProtocol::Off => PROXY_OFF,
                    ProxyProtocol::V1 => PROXY_V1,
                    ProxyProtocol::V2 => PROXY_V2,
                    ProxyProtocol::Simple => PROXY_SIMPLE,
                },
                ip_firewall: app.ip_firewall as u8,
                _pad: 0,
            });
            app_ids.push(app.id.clone());
        }
        for pass in &config.agent.pass {
            let proto = pass.protocol.ip_proto();
            for edge in plan.edge_addrs.values() {
                for port in pass.ports.low..=pass.ports.high {
                    ports.insert(
                        PortKeyOrd {
                            edge: *edge,
                            proto,
                            port,
                        },
                        APP_PASS,
                    );
                }
            }
        }

        if config.access_rules.len() > MAX_RULES as usize {
            bail!("more than {MAX_RULES} access rules configured");
        }
        for (rule_index, rule) in config.access_rules.iter().enumerate() {
            let verdict = RuleVerdict {
                action: match rule.mode {
                    RuleAction::Allow => RULE_ALLOW,
                    RuleAction::Block => RULE_BLOCK,
                },
                rule: rule_index as u32,
            };
            let prefix = u32::from(rule.prefix_len);
            match rule.addr {
                IpAddr::V4(v4) => merge_rule(&mut plan.rules_v4, (prefix, v4.octets()), verdict),
                IpAddr::V6(v6) => merge_rule(&mut plan.rules_v6, (prefix, v6.octets()), verdict),
            }
            plan.rule_labels.push(rule.value.clone());
        }

        plan.ports = ports;
        plan.apps = apps;
        plan.app_ids = app_ids;
        plan.origins = origins;
        plan.origin_ports = origin_ports;
        Ok(plan)
    }
}

/// Two rules for the same prefix: allow wins; otherwise the first one written stays.
fn merge_rule<K: Ord>(rules: &mut BTreeMap<K, RuleVerdict>, key: K, verdict: RuleVerdict) {
    match rules.get(&key) {
        Some(existing) if existing.action == RULE_ALLOW || verdict.action == RULE_BLOCK => {}
        _ => {
            rules.insert(key, verdict);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn plan_for(toml: &str, edges: &[&str]) -> Plan {
        let config = Config::parse(toml).expect("valid config");
        let edges: Vec<IpAddr> = edges.iter().map(|e| e.parse().unwrap()).collect();
        Plan::build(&config, &edges, |origin| {
            Ok(OriginRoute {
                local: match origin {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(10, 0, 2, 1)),
                    IpAddr::V6(_) => "fd00:2::1".parse().unwrap(),
                },
                dev: "eo".into(),
                ifindex: 7,
                next_hop: origin,
            })
        })
        .expect("plan")
    }

    const BASE: &str = "[agent]\ninterfaces = [\"eth0\"]\n";

    #[test]
    fn port_range_expands_to_one_entry_per_port_and_edge() {
        let toml = format!(
            "{BASE}pass = [\"tcp/22\"]\n[[apps]]\nprotocol = \"tcp/6000-6010\"\norigin_direct = [\"tcp://10.0.2.2:7000-7010\"]\n"
        );
        let plan = plan_for(&toml, &["10.0.1.1", "10.0.2.1"]);
        // 11 ports × 2 edges, plus tcp/22 pass on both edges.
        assert_eq!(plan.ports.len(), 24);
        let edge0 = plan.edge_addrs[&addr16("10.0.1.1".parse().unwrap())];
        let k = |port| PortKeyOrd {
            edge: edge0,
            proto: 6,
            port,
        };
        assert_eq!(plan.ports.get(&k(6000)), Some(&0));
        assert_eq!(plan.ports.get(&k(6010)), Some(&0));
        assert_eq!(plan.ports.get(&k(6011)), None);
        assert_eq!(plan.ports.get(&k(22)), Some(&APP_PASS));
        assert_eq!(plan.origin_ports.len(), 11);
        assert_eq!(plan.apps[0].edge_port_low, 6000);
        assert_eq!(plan.origins[0].port_low, 7000);
        assert_eq!(plan.origins[0].local, addr16("10.0.2.1".parse().unwrap()));
    }

    #[test]
    fn udp_app_listens_only_on_edges_of_its_origin_family() {
        let toml = format!(
            "{BASE}[[apps]]\nprotocol = \"udp/5000\"\norigin_direct = [\"udp://10.0.2.2:5000\"]\nproxy_protocol = \"simple\"\n"
        );
        let plan = plan_for(&toml, &["10.0.1.1", "fd00:1::1"]);
        assert_eq!(plan.ports.len(), 1);
        assert_eq!(plan.apps[0].proxy, PROXY_SIMPLE);
    }

    #[test]
    fn allow_beats_block_at_the_same_prefix_and_longest_prefix_is_kept_apart() {
        let toml = format!(
            "{BASE}[firewall]\ndefault = \"block\"\n\
             [[access_rules]]\nmode = \"block\"\ntarget = \"ip_range\"\nvalue = \"10.0.1.0/24\"\n\
             [[access_rules]]\nmode = \"allow\"\ntarget = \"ip_range\"\nvalue = \"10.0.1.0/24\"\n\
             [[access_rules]]\nmode = \"allow\"\ntarget = \"ip\"\nvalue = \"10.0.1.7\"\n\
             [[access_rules]]\nmode = \"block\"\ntarget = \"ip_range\"\nvalue = \"2001:db8::/32\"\n"
        );
        let plan = plan_for(&toml, &["10.0.1.1"]);
        assert_eq!(plan.settings.firewall_default, RULE_BLOCK);
        assert_eq!(
            plan.rules_v4.get(&(24, [10, 0, 1, 0])),
            Some(&RuleVerdict {
                action: RULE_ALLOW,
                rule: 1
            })
        );
        assert_eq!(
            plan.rules_v4.get(&(32, [10, 0, 1, 7])).map(|v| v.rule),
            Some(2)
        );
        assert_eq!(plan.rules_v6.len(), 1);
        assert_eq!(plan.rule_labels.len(), 4);
    }

    #[test]
    fn a_full_port_range_plans_quickly() {
        let toml = format!(
            "{BASE}[[apps]]\nprotocol = \"tcp/1-65535\"\norigin_direct = [\"tcp://10.0.2.2:1-65535\"]\n"
        );
        let plan = plan_for(&toml, &["10.0.1.1"]);
        assert_eq!(plan.ports.len(), 65535);
        assert_eq!(plan.origin_ports.len(), 65535);
    }
}
