//! Routes and neighbours towards origins, resolved once per config (never per
//! packet): the XDP program needs the agent's source address and the egress
//! interface for each origin, and a resolved neighbour (MAC) for the next hop.
//!
//! Both come from iproute2 (`ip -j route get`, `ip neigh replace … managed`): a
//! *managed* neighbour entry is kept resolved by the kernel itself, so the XDP
//! route lookup always finds a MAC, without the agent sending anything to origins.

use std::net::IpAddr;
use std::process::Command;

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::datapath::ifindex;

/// How the host reaches one origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginRoute {
    /// The agent's source address towards the origin.
    pub local: IpAddr,
    /// Egress interface name and index.
    pub dev: String,
    pub ifindex: u32,
    /// The neighbour whose MAC frames to the origin carry (gateway or the origin).
    pub next_hop: IpAddr,
}

/// A neighbour the XDP fast path sends to: an origin's next hop, or a gateway
/// towards clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub addr: IpAddr,
    pub dev: String,
}

impl OriginRoute {
    pub fn neighbour(&self) -> Neighbour {
        Neighbour {
            addr: self.next_hop,
            dev: self.dev.clone(),
        }
    }
}

#[derive(Deserialize)]
struct RouteGet {
    dev: String,
    prefsrc: Option<IpAddr>,
    gateway: Option<IpAddr>,
}

/// `ip -j route get ADDR` in the caller's network namespace.
pub fn route_to(addr: IpAddr) -> anyhow::Result<OriginRoute> {
    let output = Command::new("ip")
        .args(["-j", "route", "get", &addr.to_string()])
        .output()
        .context("running `ip route get` (iproute2 is required)")?;
    if !output.status.success() {
        bail!(
            "no route to {addr}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let routes: Vec<RouteGet> =
        serde_json::from_slice(&output.stdout).context("parsing `ip -j route get`")?;
    let route = routes
        .into_iter()
        .next()
        .context("`ip route get` returned no route")?;
    let local = route
        .prefsrc
        .with_context(|| format!("the route to {addr} has no source address"))?;
    Ok(OriginRoute {
        local,
        ifindex: ifindex(&route.dev)?,
        next_hop: route.gateway.unwrap_or(addr),
        dev: route.dev,
    })
}

/// Makes the kernel keep `neighbour`'s entry resolved (managed).
pub fn keep_neighbour_resolved(neighbour: &Neighbour) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args([
            "neigh",
            "replace",
            &neighbour.addr.to_string(),
            "dev",
            &neighbour.dev,
            "managed",
        ])
        .output()
        .context("running `ip neigh replace`")?;
    if !output.status.success() {
        bail!(
            "could not install a managed neighbour for {} on {}: {}",
            neighbour.addr,
            neighbour.dev,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Removes a managed entry installed by `keep_neighbour_resolved` (on shutdown or
/// when nothing needs it any more). The kernel re-learns it on demand.
pub fn release_neighbour(neighbour: &Neighbour) {
    let _ = Command::new("ip")
        .args([
            "neigh",
            "del",
            &neighbour.addr.to_string(),
            "dev",
            &neighbour.dev,
        ])
        .output();
}

/// A sysctl the agent changed, to put back on shutdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlChange {
    pub path: String,
    pub previous: String,
}

/// The kernel's route-lookup helper for XDP refuses interfaces without forwarding
/// enabled (`BPF_FIB_LKUP_RET_FWD_DISABLED`, even for output lookups), so the UDP
/// fast path needs `forwarding=1` on the interfaces it sends from, for each family
/// its UDP apps use. Returns what was changed (each change is logged).
pub fn enable_forwarding(
    interfaces: &[String],
    ipv4: bool,
    ipv6: bool,
) -> anyhow::Result<Vec<SysctlChange>> {
    let mut changes = Vec::new();
    for interface in interfaces {
        for (wanted, family) in [(ipv4, "ipv4"), (ipv6, "ipv6")] {
            if !wanted {
                continue;
            }
            let path = format!("/proc/sys/net/{family}/conf/{interface}/forwarding");
            let previous = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {path}"))?
                .trim()
                .to_string();
            if previous == "1" {
                continue;
            }
            std::fs::write(&path, "1").with_context(|| format!("enabling {path}"))?;
            log::info!(
                "{interface}: set net.{family}.conf.{interface}.forwarding=1 (was {previous}): \
                 the XDP UDP fast path needs it; it is restored on exit"
            );
            changes.push(SysctlChange { path, previous });
        }
    }
    Ok(changes)
}

/// Puts back what `enable_forwarding` changed.
pub fn restore_sysctls(changes: &[SysctlChange]) {
    for change in changes {
        if let Err(err) = std::fs::write(&change.path, &change.previous) {
            log::warn!("restoring {} failed: {err}", change.path);
        }
    }
}

/// The default gateways reachable through `interface` (both families): the next
/// hops of replies to clients that are not on a local subnet.
pub fn default_gateways(interface: &str) -> anyhow::Result<Vec<Neighbour>> {
    let mut out = Vec::new();
    for family in ["-4", "-6"] {
        let output = Command::new("ip")
            .args(["-j", family, "route", "show", "default", "dev", interface])
            .output()
            .context("running `ip route show default`")?;
        if !output.status.success() {
            continue;
        }
        #[derive(Deserialize)]
        struct DefaultRoute {
            gateway: Option<IpAddr>,
        }
        let routes: Vec<DefaultRoute> = serde_json::from_slice(&output.stdout).unwrap_or_default();
        for gateway in routes.into_iter().filter_map(|r| r.gateway) {
            out.push(Neighbour {
                addr: gateway,
                dev: interface.to_string(),
            });
        }
    }
    Ok(out)
}

/// How often the route epoch is bumped even when nothing announced a change: the
/// bound on how long a flow keeps a stale route (a route, neighbour or link change
/// is followed within this time).
pub const ROUTE_REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Owns the route epoch for the agent's life: bumps it every
/// `ROUTE_REFRESH_INTERVAL`, so every flow's next datagram after a change of
/// routes or neighbours is sent by a fresh `bpf_fib_lookup`.
pub async fn follow_route_changes(mut epoch: crate::datapath::RouteEpoch) {
    let mut tick = tokio::time::interval(ROUTE_REFRESH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(err) = epoch.bump() {
            log::error!("bumping the route epoch failed: {err:#}");
        }
    }
}
