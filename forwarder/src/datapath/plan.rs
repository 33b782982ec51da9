//! Turns a validated config into the exact contents of the datapath maps.
//!
//! Pure (no syscalls): the loader writes a `Plan` into the maps, and a reload writes
//! the difference between two plans. Everything per-config happens here so that the
//! XDP program does one lookup per question per packet.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use anyhow::{Context as _, bail};
use forwarder_common::{
    APP_PASS, AppInfo, MAGLEV_LANES, MAX_APPS, MAX_EDGE_ADDRS, MAX_MAGLEV_SLOTS, MAX_ORIGINS,
    MAX_PORT_ENTRIES, MAX_RULES, OriginInfo, OriginPortKey, PortKey, RULE_ALLOW, RULE_BLOCK,
    RuleVerdict, Settings, maglev_table_size,
};

use crate::config::{
    Config, IpFamily, Protocol, ProxyProtocol, RuleAction, TcpFastpath, prefix_mask_v4,
    prefix_mask_v6,
};
use crate::lb::Availability;
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
    /// `APPS[i]`; `app_ids[i]` names it (empty for an unused index: indices are
    /// stable across reloads, see [`Plan::rebuild`]).
    pub apps: Vec<AppInfo>,
    pub app_ids: Vec<String>,
    pub origins: Vec<OriginInfo>,
    /// Every (protocol, origin address, origin port) → app index.
    pub origin_ports: BTreeMap<OriginPortKeyOrd, u32>,
    /// (prefix length, network) → verdict. Allow beats block at the same prefix.
    pub rules_v4: BTreeMap<(u32, [u8; 4]), RuleVerdict>,
    pub rules_v6: BTreeMap<(u32, [u8; 16]), RuleVerdict>,
    /// `RULE_HITS[i]` belongs to the access rule whose value is `rule_labels[i]`
    /// (empty for an unused index).
    pub rule_labels: Vec<String>,
    /// The UDP apps' origin tables by first `MAGLEV` slot (`AppInfo::table_first`),
    /// each `AppInfo::table_size` long; slices start on a `MAGLEV_LANES` boundary so
    /// no map value holds slots of two apps.
    pub maglev: BTreeMap<u32, Vec<u16>>,
    /// Removed apps and the index each had (see [`Plan::rebuild`]).
    pub retired_apps: BTreeMap<String, u32>,
    /// Removed access rules, by (value, occurrence of that value), and their index.
    pub retired_rules: BTreeMap<(String, u32), u32>,
    /// App indices given to another app than before: zero their counters first.
    pub reset_app_slots: Vec<u32>,
    /// Rule indices given to another rule than before: zero their hit counters first.
    pub reset_rule_slots: Vec<u32>,
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
        route_to: impl FnMut(IpAddr) -> anyhow::Result<OriginRoute>,
    ) -> anyhow::Result<Plan> {
        Plan::rebuild(None, config, edges, route_to, &Availability::default())
    }

    /// Like [`Plan::build`], for a reload over `previous` (the plan in the maps):
    /// indices stay where they were, because flows, counters and the TCP sockmap
    /// refer to them.
    ///
    /// * An app that still exists (same id) keeps its index, so its counters go on
    ///   and its live flows stay its own; a removed app's index is *retired*: only
    ///   the same id, re-added later, gets it back. New apps take indices never used
    ///   before; only when all `MAX_APPS` have been used is a retired index given to
    ///   another app, and then `reset_app_slots` says which counters to zero first.
    /// * An app with as many origins as before keeps its slots in `ORIGINS` (their
    ///   contents may change); otherwise it gets fresh slots and its old ones are
    ///   left as they were for the flows that still point at them.
    /// * Access rules keep their hit counter by value (`reset_rule_slots` as above);
    ///   edge addresses keep their index.
    /// * A UDP app keeps its origin table's slots when its table size and origin
    ///   count are as before; otherwise it gets slots no app uses now, so the table
    ///   is complete before `APPS` points at it. `availability` says which origins
    ///   the tables leave out (health, drain).
    pub fn rebuild(
        previous: Option<&Plan>,
        config: &Config,
        edges: &[IpAddr],
        mut route_to: impl FnMut(IpAddr) -> anyhow::Result<OriginRoute>,
        availability: &Availability,
    ) -> anyhow::Result<Plan> {
        let empty = Plan::default();
        let previous = previous.unwrap_or(&empty);
        let mut plan = Plan {
            settings: Settings {
                firewall_default: match config.firewall.default {
                    RuleAction::Allow => RULE_ALLOW,
                    RuleAction::Block => RULE_BLOCK,
                },
                nat_port_low: config.agent.udp_nat_ports.low,
                nat_port_high: config.agent.udp_nat_ports.high,
                // Live UDP flows are classified again under every new plan.
                generation: previous.settings.generation.wrapping_add(1).max(1),
                new_flows_per_source: config.agent.udp_new_flows_per_source.unwrap_or(0),
            },
            ..Plan::default()
        };
        let unique_edges: BTreeSet<IpAddr> = edges.iter().copied().collect();
        let wanted_edges: Vec<[u8; 16]> = unique_edges.iter().map(|e| addr16(*e)).collect();
        let edge_len = previous
            .edge_addrs
            .values()
            .map(|i| i + 1)
            .max()
            .unwrap_or(0);
        plan.edge_addrs = assign(
            &wanted_edges,
            &previous.edge_addrs,
            &BTreeMap::new(),
            edge_len,
            MAX_EDGE_ADDRS,
            "edge addresses",
        )?
        .index;
        let edge_index = |addr: &IpAddr| plan.edge_addrs.get(&addr16(*addr)).copied();

        if config.apps.len() > MAX_APPS as usize {
            bail!(
                "{} apps configured; the datapath holds at most {MAX_APPS}",
                config.apps.len()
            );
        }
        let previous_apps: BTreeMap<String, u32> = indexed(&previous.app_ids);
        let wanted_apps: Vec<String> = config.apps.iter().map(|a| a.id.clone()).collect();
        let app_slots = assign(
            &wanted_apps,
            &previous_apps,
            &previous.retired_apps,
            previous.apps.len() as u32,
            MAX_APPS,
            "apps",
        )?;
        let mut ports = BTreeMap::new();
        let mut apps = vec![UNUSED_APP; app_slots.len as usize];
        let mut app_ids = vec![String::new(); app_slots.len as usize];
        // Slots of removed apps keep their old contents (flows may still name them);
        // nothing refers to them in PORTS or ORIGIN_PORTS any more.
        let mut origins = previous.origins.clone();
        let mut origins_used: BTreeSet<u32> = BTreeSet::new();
        let mut origin_ports = BTreeMap::new();
        let mut udp_return_modes: BTreeMap<OriginPortKeyOrd, (bool, String)> = BTreeMap::new();
        // Where each app's origins go: the same slots as before when it has as many.
        let mut origin_firsts = Vec::with_capacity(config.apps.len());
        let mut fresh = Vec::new();
        for app in &config.apps {
            let count = app.origins.len() as u32;
            let kept = previous_apps
                .get(&app.id)
                .and_then(|i| previous.apps.get(*i as usize))
                .filter(|info| u32::from(info.origin_count) == count)
                .map(|info| info.origin_first);
            match kept {
                Some(first) => origins_used.extend(first..first + count),
                None => fresh.push(origin_firsts.len()),
            }
            origin_firsts.push(kept);
        }
        let mut origins_len = origins.len() as u32;
        for position in fresh {
            let count = config.apps[position].origins.len() as u32;
            let first = free_range(&origins_used, origins_len, count, MAX_ORIGINS)
                .with_context(|| format!("more than {MAX_ORIGINS} origins configured"))?;
            origins_used.extend(first..first + count);
            origins_len = origins_len.max(first + count);
            origin_firsts[position] = Some(first);
        }
        let table_slices = table_slices(previous, &previous_apps, config)?;
        for (app, origin_first) in config.apps.iter().zip(origin_firsts) {
            let app_index = app_slots.index[&app.id];
            let origin_first = origin_first.unwrap_or_default();
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
            for (k, origin) in app.origins.iter().enumerate() {
                let route = route_to(origin.addr).with_context(|| {
                    format!("app '{}': no route to origin {}", app.id, origin.addr)
                })?;
                let info = OriginInfo {
                    addr: addr16(origin.addr),
                    local: addr16(route.local),
                    ifindex: route.ifindex,
                    port_low: origin.ports.low,
                    family: if origin.addr.is_ipv4() { 4 } else { 6 },
                    _pad: 0,
                    app: app_index,
                };
                let slot = (origin_first + k as u32) as usize;
                if slot >= origins.len() {
                    origins.resize(slot + 1, UNUSED_ORIGIN);
                }
                origins[slot] = info;
                for port in origin.ports.low..=origin.ports.high {
                    let key = OriginPortKeyOrd {
                        addr: addr16(origin.addr),
                        proto,
                        port,
                    };
                    let simple = !app.proxy_protocol.udp_returns_via_nat();
                    if let Some((other_simple, other_id)) =
                        udp_return_modes.insert(key, (simple, app.id.clone()))
                        && proto == forwarder_common::PROTO_UDP
                        && other_simple != simple
                    {
                        // The return path reads replies from one origin port one way:
                        // SPP header or NAT port, not both.
                        bail!(
                            "apps '{other_id}' and '{}' share UDP origin {}:{port} but only one \
                             uses proxy_protocol = \"simple\"; give them different origin ports",
                            app.id,
                            origin.addr
                        );
                    }
                    origin_ports.insert(key, app_index);
                }
            }
            let (table_first, table_size) = table_slices[&app.id];
            if table_size > 0 {
                plan.maglev
                    .insert(table_first, crate::lb::table(app, availability));
            }
            apps[app_index as usize] = AppInfo {
                edge_port_low: app.ports.low,
                origin_count: app.origins.len() as u16,
                origin_first,
                proto,
                proxy: app.proxy_protocol.code(),
                ip_firewall: app.ip_firewall as u8,
                tcp_fastpath: (app.tcp_fastpath == TcpFastpath::Xdp) as u8,
                new_flows_per_second: app.udp_new_flows_per_second.unwrap_or(0),
                table_first,
                table_size,
            };
            app_ids[app_index as usize] = app.id.clone();
        }
        if ports.len()
            + config
                .agent
                .pass
                .iter()
                .map(|p| p.ports.len() as usize * plan.edge_addrs.len())
                .sum::<usize>()
            > MAX_PORT_ENTRIES as usize
        {
            bail!(
                "the apps and pass entries need more than {MAX_PORT_ENTRIES} (edge address, \
                 protocol, port) entries on this host's edge addresses; use fewer ports or \
                 edge addresses"
            );
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
        // A rule is known by its value (and which occurrence of that value it is).
        let rule_key = |labels: &[String]| -> Vec<(String, u32)> {
            let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
            labels
                .iter()
                .map(|label| {
                    let n = seen.entry(label.as_str()).or_insert(0);
                    *n += 1;
                    (label.clone(), *n - 1)
                })
                .collect()
        };
        let previous_rules: BTreeMap<(String, u32), u32> = rule_key(&previous.rule_labels)
            .into_iter()
            .zip(0u32..)
            .filter(|((label, _), _)| !label.is_empty())
            .collect();
        let values: Vec<String> = config
            .access_rules
            .iter()
            .map(|r| r.value.clone())
            .collect();
        let wanted_rules = rule_key(&values);
        let rule_slots = assign(
            &wanted_rules,
            &previous_rules,
            &previous.retired_rules,
            previous.rule_labels.len() as u32,
            MAX_RULES,
            "access rules",
        )?;
        plan.rule_labels = vec![String::new(); rule_slots.len as usize];
        for (rule, key) in config.access_rules.iter().zip(&wanted_rules) {
            let rule_index = rule_slots.index[key];
            let verdict = RuleVerdict {
                action: match rule.mode {
                    RuleAction::Allow => RULE_ALLOW,
                    RuleAction::Block => RULE_BLOCK,
                },
                rule: rule_index,
            };
            let prefix = u32::from(rule.prefix_len);
            match rule.addr {
                IpAddr::V4(v4) => merge_rule(&mut plan.rules_v4, (prefix, v4.octets()), verdict),
                IpAddr::V6(v6) => merge_rule(&mut plan.rules_v6, (prefix, v6.octets()), verdict),
            }
            plan.rule_labels[rule_index as usize] = rule.value.clone();
        }

        plan.ports = ports;
        plan.apps = apps;
        plan.app_ids = app_ids;
        plan.retired_apps = app_slots.retired;
        plan.reset_app_slots = app_slots.reset;
        plan.retired_rules = rule_slots.retired;
        plan.reset_rule_slots = rule_slots.reset;
        plan.origins = origins;
        plan.origin_ports = origin_ports;
        Ok(plan)
    }

    /// App id → index of every configured app (unused slots have no id).
    pub fn app_indices(&self) -> BTreeMap<String, u32> {
        indexed(&self.app_ids)
    }
}

/// `APPS[i]` of an index no app uses: no origins, no protocol.
const UNUSED_APP: AppInfo = AppInfo {
    edge_port_low: 0,
    origin_count: 0,
    origin_first: 0,
    proto: 0,
    proxy: ProxyProtocol::Off.code(),
    ip_firewall: 0,
    tcp_fastpath: 0,
    new_flows_per_second: 0,
    table_first: 0,
    table_size: 0,
};

/// `ORIGINS[i]` of a slot never used.
const UNUSED_ORIGIN: OriginInfo = OriginInfo {
    addr: [0; 16],
    local: [0; 16],
    port_low: 0,
    family: 0,
    _pad: 0,
    app: 0,
    ifindex: 0,
};

impl Plan {
    /// This plan with its origin tables rebuilt for `availability` (an origin went
    /// down, came back, was drained): same slots, same generation, so live flows
    /// are not classified again and only changed table values are written.
    pub fn with_availability(&self, config: &Config, availability: &Availability) -> Plan {
        let mut plan = self.clone();
        let indices = indexed(&self.app_ids);
        for app in &config.apps {
            let Some(info) = indices
                .get(&app.id)
                .and_then(|i| self.apps.get(*i as usize))
            else {
                continue;
            };
            if info.table_size > 0 {
                plan.maglev
                    .insert(info.table_first, crate::lb::table(app, availability));
            }
        }
        plan
    }
}

/// Where each UDP app's origin table goes in `MAGLEV`: (first slot, size), size 0
/// for TCP apps and apps with one origin. Kept from `previous` when the size and
/// the origin count are the same (the table's offsets then stay valid while it
/// is rewritten); otherwise a range that neither a kept slice nor any slice of
/// `previous` uses.
fn table_slices(
    previous: &Plan,
    previous_apps: &BTreeMap<String, u32>,
    config: &Config,
) -> anyhow::Result<BTreeMap<String, (u32, u32)>> {
    let lanes = MAGLEV_LANES;
    let reserved = |size: u32| size.div_ceil(lanes) * lanes;
    let mut slices = BTreeMap::new();
    let mut used: Vec<(u32, u32)> = previous
        .apps
        .iter()
        .filter(|a| a.table_size > 0)
        .map(|a| (a.table_first, reserved(a.table_size)))
        .collect();
    let mut fresh = Vec::new();
    for app in &config.apps {
        let size = match app.protocol {
            Protocol::Udp => maglev_table_size(app.origins.len() as u32),
            Protocol::Tcp => 0,
        };
        if size == 0 {
            slices.insert(app.id.clone(), (0, 0));
            continue;
        }
        let kept = previous_apps
            .get(&app.id)
            .and_then(|i| previous.apps.get(*i as usize))
            .filter(|a| a.table_size == size && usize::from(a.origin_count) == app.origins.len());
        match kept {
            Some(a) => {
                slices.insert(app.id.clone(), (a.table_first, size));
            }
            None => fresh.push((app.id.clone(), size)),
        }
    }
    for (id, size) in fresh {
        used.sort_unstable();
        let mut start = 0u32;
        for &(first, len) in &used {
            if first >= start + reserved(size) {
                break;
            }
            start = start.max(first + len);
        }
        if start + reserved(size) > MAX_MAGLEV_SLOTS {
            bail!(
                "the UDP apps' origin tables need more than {MAX_MAGLEV_SLOTS} slots \
                 (while a reload changes them, old and new tables exist together)"
            );
        }
        used.push((start, reserved(size)));
        slices.insert(id, (start, size));
    }
    Ok(slices)
}

/// Name → index of the non-empty names of `names`.
fn indexed(names: &[String]) -> BTreeMap<String, u32> {
    names
        .iter()
        .zip(0u32..)
        .filter(|(name, _)| !name.is_empty())
        .map(|(name, i)| (name.clone(), i))
        .collect()
}

/// Indices given out by [`assign`].
#[derive(Debug)]
struct Slots<K> {
    index: BTreeMap<K, u32>,
    retired: BTreeMap<K, u32>,
    /// One past the highest index ever given out.
    len: u32,
    /// Indices used before by something else: their counters start from zero.
    reset: Vec<u32>,
}

/// Stable indices for `wanted` (distinct keys) given the previous assignment: kept
/// keys keep theirs, re-added (retired) keys get theirs back, new keys get indices
/// above every index used so far (`len`), and only when `max` is reached reuse a
/// free index (one no retired key holds, if possible).
fn assign<K: Ord + Clone>(
    wanted: &[K],
    previous: &BTreeMap<K, u32>,
    previous_retired: &BTreeMap<K, u32>,
    previous_len: u32,
    max: u32,
    what: &str,
) -> anyhow::Result<Slots<K>> {
    let mut index = BTreeMap::new();
    let mut taken = BTreeSet::new();
    for key in wanted {
        if let Some(&i) = previous.get(key).or_else(|| previous_retired.get(key))
            && i < max
            && taken.insert(i)
        {
            index.insert(key.clone(), i);
        }
    }
    let mut retired: BTreeMap<K, u32> = previous_retired
        .iter()
        .chain(previous.iter())
        .filter(|(k, i)| !index.contains_key(*k) && !taken.contains(*i))
        .map(|(k, i)| (k.clone(), *i))
        .collect();
    let mut len = previous_len.max(taken.last().map_or(0, |i| i + 1));
    let mut reset = Vec::new();
    for key in wanted {
        if index.contains_key(key) {
            continue;
        }
        let i = if len < max {
            len += 1;
            len - 1
        } else {
            let held: BTreeSet<u32> = retired.values().copied().collect();
            let free = (0..max).find(|i| !taken.contains(i) && !held.contains(i));
            let i = free
                .or_else(|| (0..max).find(|i| !taken.contains(i)))
                .with_context(|| format!("more than {max} {what} configured"))?;
            retired.retain(|_, r| *r != i);
            reset.push(i);
            i
        };
        taken.insert(i);
        index.insert(key.clone(), i);
    }
    Ok(Slots {
        index,
        retired,
        len,
        reset,
    })
}

/// The first index of `count` consecutive free indices: above `len` (never used) if
/// that fits under `max`, else the first gap among `used`.
fn free_range(used: &BTreeSet<u32>, len: u32, count: u32, max: u32) -> Option<u32> {
    if len + count <= max {
        return Some(len);
    }
    let mut start = 0;
    for &u in used {
        if u >= start + count {
            break;
        }
        start = start.max(u + 1);
    }
    (start + count <= max).then_some(start)
}

impl Plan {
    /// Whether the access rules block `client`, as the XDP program decides for a
    /// packet of an app with `ip_firewall = true` (`policy::firewall` in the eBPF
    /// crate): the longest matching prefix, else `[firewall].default`. For what the
    /// datapath does not see: spliced TCP connections (their segments bypass the
    /// classifier), which a reload's new block rule must end by hand.
    pub fn firewall_blocks(&self, client: IpAddr) -> bool {
        let longest = match client {
            IpAddr::V4(v4) => longest_match(&self.rules_v4, |len, net| {
                u32::from(v4) & prefix_mask_v4(len as u8) == u32::from_be_bytes(*net)
            }),
            IpAddr::V6(v6) => longest_match(&self.rules_v6, |len, net| {
                u128::from(v6) & prefix_mask_v6(len as u8) == u128::from_be_bytes(*net)
            }),
        };
        match longest {
            Some(verdict) => verdict.action == RULE_BLOCK,
            None => self.settings.firewall_default == RULE_BLOCK,
        }
    }
}

/// The verdict of the longest prefix in `rules` that `covers` the client.
fn longest_match<N>(
    rules: &BTreeMap<(u32, N), RuleVerdict>,
    covers: impl Fn(u32, &N) -> bool,
) -> Option<RuleVerdict> {
    rules
        .iter()
        .filter(|((len, net), _)| covers(*len, net))
        .max_by_key(|((len, _), _)| *len)
        .map(|(_, verdict)| *verdict)
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
        assert_eq!(plan.apps[0].proxy, ProxyProtocol::Simple.code());
    }

    #[test]
    fn the_firewall_verdict_of_a_client_is_the_longest_prefix_else_the_default() {
        let toml = format!(
            "{BASE}[firewall]\ndefault = \"allow\"\n\
             [[access_rules]]\nmode = \"block\"\ntarget = \"ip_range\"\nvalue = \"10.0.1.0/24\"\n\
             [[access_rules]]\nmode = \"allow\"\ntarget = \"ip_range\"\nvalue = \"10.0.1.128/25\"\n\
             [[access_rules]]\nmode = \"block\"\ntarget = \"ip\"\nvalue = \"10.0.1.200\"\n\
             [[access_rules]]\nmode = \"block\"\ntarget = \"ip_range\"\nvalue = \"2001:db8:80::/41\"\n"
        );
        let plan = plan_for(&toml, &["10.0.1.1"]);
        let blocks = |ip: &str| plan.firewall_blocks(ip.parse().unwrap());
        assert!(blocks("10.0.1.7"), "the /24 blocks");
        assert!(!blocks("10.0.1.130"), "the longer /25 allows");
        assert!(blocks("10.0.1.200"), "the /32 inside the /25 blocks");
        assert!(!blocks("10.0.2.1"), "no rule: the default allows");
        assert!(blocks("2001:db8:80::1"), "a /41 ends inside a byte");
        assert!(blocks("2001:db8:ff::1"), "still inside the /41");
        assert!(!blocks("2001:db8:0::1"), "outside the /41");
        let closed = plan_for(
            &format!("{BASE}[firewall]\ndefault = \"block\"\n"),
            &["10.0.1.1"],
        );
        assert!(closed.firewall_blocks("192.0.2.1".parse().unwrap()));
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

    fn replan(previous: &Plan, toml: &str, edges: &[&str]) -> Plan {
        let config = Config::parse(toml).expect("valid config");
        let edges: Vec<IpAddr> = edges.iter().map(|e| e.parse().unwrap()).collect();
        Plan::rebuild(
            Some(previous),
            &config,
            &edges,
            |origin| {
                Ok(OriginRoute {
                    local: IpAddr::V4(Ipv4Addr::new(10, 0, 2, 1)),
                    dev: "eo".into(),
                    ifindex: 7,
                    next_hop: origin,
                })
            },
            &Availability::default(),
        )
        .expect("plan")
    }

    fn app(id: &str, port: u16, origins: &[&str]) -> String {
        let origins: Vec<String> = origins
            .iter()
            .map(|o| format!("\"udp://{o}:{port}\""))
            .collect();
        format!(
            "[[apps]]\nid = \"{id}\"\nprotocol = \"udp/{port}\"\norigin_direct = [{}]\n",
            origins.join(", ")
        )
    }

    fn rule(value: &str) -> String {
        format!("[[access_rules]]\nmode = \"block\"\ntarget = \"ip_range\"\nvalue = \"{value}\"\n")
    }

    #[test]
    fn reload_keeps_indices_of_kept_apps_origins_rules_and_edges() {
        let edges = ["10.0.1.1", "10.0.2.1"];
        let first = plan_for(
            &format!(
                "{BASE}{}{}{}{}{}",
                rule("10.0.5.0/24"),
                rule("10.0.6.0/24"),
                app("a", 5000, &["10.0.2.2"]),
                app("b", 5001, &["10.0.2.2", "10.0.2.3"]),
                app("c", 5002, &["10.0.2.2"]),
            ),
            &edges,
        );
        let idx = |p: &Plan, id: &str| p.app_indices()[id];
        assert_eq!(
            (idx(&first, "a"), idx(&first, "b"), idx(&first, "c")),
            (0, 1, 2)
        );
        assert_eq!(first.origins.len(), 4);

        // New app first in the file, "a" removed, "b" with another origin (same
        // count), "c" with one more origin, rules reordered and one added.
        let second = replan(
            &first,
            &format!(
                "{BASE}{}{}{}{}{}{}",
                rule("10.0.7.0/24"),
                rule("10.0.6.0/24"),
                rule("10.0.5.0/24"),
                app("new", 5003, &["10.0.2.9"]),
                app("b", 5001, &["10.0.2.2", "10.0.2.4"]),
                app("c", 5002, &["10.0.2.2", "10.0.2.5"]),
            ),
            &["10.0.2.1", "10.0.1.1", "10.0.3.1"],
        );
        assert_eq!(idx(&second, "b"), 1);
        assert_eq!(idx(&second, "c"), 2);
        assert_eq!(idx(&second, "new"), 3, "never-used index, not a's");
        assert_eq!(second.app_ids[0], "", "a's slot is unused");
        assert_eq!(second.retired_apps.get("a"), Some(&0));
        assert!(second.reset_app_slots.is_empty());
        // b keeps its origin slots 1..3 (contents updated); c moves to fresh slots
        // and its old slot keeps its old contents for flows still naming it.
        assert_eq!(second.apps[1].origin_first, 1);
        assert_eq!(second.origins[2].addr, addr16("10.0.2.4".parse().unwrap()));
        assert_eq!(second.origins[3], first.origins[3]);
        assert_eq!(second.apps[2].origin_count, 2);
        assert!(second.apps[2].origin_first >= 4);
        assert_eq!(
            second.origins[0], first.origins[0],
            "a's origin slot untouched"
        );
        // Rules keep their hit counters by value; the new one gets a fresh index.
        assert_eq!(second.rule_labels[0], "10.0.5.0/24");
        assert_eq!(second.rule_labels[1], "10.0.6.0/24");
        assert_eq!(second.rule_labels[2], "10.0.7.0/24");
        // Edge addresses keep their index; the new one gets the next.
        for (addr, i) in &first.edge_addrs {
            assert_eq!(second.edge_addrs.get(addr), Some(i));
        }
        assert_eq!(second.edge_addrs[&addr16("10.0.3.1".parse().unwrap())], 2);

        // "a" comes back: same index as before (its counters continue).
        let third = replan(
            &second,
            &format!(
                "{BASE}{}{}",
                app("a", 5000, &["10.0.2.2"]),
                app("b", 5001, &["10.0.2.2", "10.0.2.4"])
            ),
            &edges,
        );
        assert_eq!(idx(&third, "a"), 0);
        assert_eq!(idx(&third, "b"), 1);
        assert!(third.reset_app_slots.is_empty());
        assert_eq!(third.retired_apps.get("c"), Some(&2));
        assert_eq!(third.retired_apps.get("new"), Some(&3));
        assert!(third.rule_labels.iter().all(String::is_empty));
        assert_eq!(third.retired_rules.len(), 3);
        // Nothing of a removed app remains in the lookup maps.
        assert!(third.ports.values().all(|a| *a == 0 || *a == 1));
        assert!(third.origin_ports.values().all(|a| *a == 0 || *a == 1));
    }

    #[test]
    fn indices_are_reused_only_when_all_are_used_and_then_reset() {
        let keys = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let first = assign(
            &keys(&["a", "b", "c"]),
            &BTreeMap::new(),
            &BTreeMap::new(),
            0,
            3,
            "x",
        )
        .unwrap();
        assert_eq!(first.len, 3);
        // "b" removed, "d" added: the only free index is b's, given with a reset.
        let second = assign(
            &keys(&["a", "c", "d"]),
            &first.index,
            &first.retired,
            first.len,
            3,
            "x",
        )
        .unwrap();
        assert_eq!(second.index["d"], 1);
        assert_eq!(second.reset, vec![1]);
        assert!(second.retired.is_empty());
        assert!(
            assign(
                &keys(&["a", "c", "d", "e"]),
                &second.index,
                &second.retired,
                3,
                3,
                "x"
            )
            .is_err()
        );
        assert_eq!(free_range(&BTreeSet::from([0, 1, 4]), 5, 2, 6), Some(2));
        assert_eq!(free_range(&BTreeSet::from([0, 1, 4]), 5, 3, 6), None);
        assert_eq!(free_range(&BTreeSet::new(), 5, 1, 6), Some(5));
    }

    #[test]
    fn origin_tables_keep_their_slots_while_their_size_and_origins_count_hold() {
        let edges = ["10.0.1.1"];
        let a = app("a", 5000, &["10.0.2.2", "10.0.2.3"]);
        let b = app("b", 5001, &["10.0.2.4", "10.0.2.5", "10.0.2.6"]);
        let single = app("c", 5002, &["10.0.2.7"]);
        let first = plan_for(&format!("{BASE}{a}{b}{single}"), &edges);
        let info = |plan: &Plan, id: &str| {
            let i = plan.app_ids.iter().position(|x| x == id).unwrap();
            plan.apps[i]
        };
        let (ia, ib, ic) = (info(&first, "a"), info(&first, "b"), info(&first, "c"));
        assert_eq!(
            (ia.table_size, ib.table_size, ic.table_size),
            (4093, 4093, 0)
        );
        assert_eq!(ia.table_first % MAGLEV_LANES, 0);
        assert_eq!(ib.table_first % MAGLEV_LANES, 0);
        assert!(ia.table_first + 4096 <= ib.table_first || ib.table_first + 4096 <= ia.table_first);
        assert_eq!(first.maglev.len(), 2);
        assert!(first.maglev[&ib.table_first].iter().all(|&o| o < 3));

        // b loses an origin: a fresh slice beside every slice in use now, so the
        // running table is whole until APPS points at the new one.
        let b2 = app("b", 5001, &["10.0.2.4", "10.0.2.5"]);
        let second = replan(&first, &format!("{BASE}{a}{b2}{single}"), &edges);
        let (ja, jb) = (info(&second, "a"), info(&second, "b"));
        assert_eq!(ja.table_first, ia.table_first, "a keeps its slots");
        assert_ne!(jb.table_first, ib.table_first);
        for old in [ia.table_first, ib.table_first] {
            assert!(jb.table_first >= old + 4096 || jb.table_first + 4096 <= old);
        }
        assert!(second.maglev[&jb.table_first].iter().all(|&o| o < 2));

        // Availability changes the tables only: same slots, same generation.
        let config = Config::parse(&format!("{BASE}{a}{b2}{single}")).unwrap();
        let mut availability = Availability::default();
        availability
            .down
            .insert(("a".to_string(), "10.0.2.2:5000".to_string()));
        let third = second.with_availability(&config, &availability);
        assert_eq!(third.settings, second.settings);
        assert_eq!(third.apps, second.apps);
        assert!(third.maglev[&ja.table_first].iter().all(|&o| o == 1));
        assert_eq!(
            third.maglev[&jb.table_first],
            second.maglev[&jb.table_first]
        );
    }
}
