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

/// Makes the kernel keep `route.next_hop`'s neighbour entry resolved (managed).
pub fn keep_neighbour_resolved(route: &OriginRoute) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args([
            "neigh",
            "replace",
            &route.next_hop.to_string(),
            "dev",
            &route.dev,
            "managed",
        ])
        .output()
        .context("running `ip neigh replace`")?;
    if !output.status.success() {
        bail!(
            "could not install a managed neighbour for {} on {}: {}",
            route.next_hop,
            route.dev,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Removes a managed entry installed by `keep_neighbour_resolved` (on shutdown or
/// when no origin uses the next hop any more). The kernel re-learns it on demand.
pub fn release_neighbour(route: &OriginRoute) {
    let _ = Command::new("ip")
        .args([
            "neigh",
            "del",
            &route.next_hop.to_string(),
            "dev",
            &route.dev,
        ])
        .output();
}
