//! Routes and neighbours towards origins, resolved once per config (never per
//! packet): the XDP program needs the agent's source address and the egress
//! interface for each origin, and a resolved neighbour (MAC) for the next hop.
//!
//! Both are asked of the kernel over route netlink (`crate::netlink`), in the
//! calling thread's network namespace: a route lookup (`RTM_GETROUTE`, as
//! `ip route get` does) and a *managed* neighbour entry (`RTM_NEWNEIGH` with
//! `NTF_EXT_MANAGED`, as `ip neigh replace … managed`; kernel 5.16 or later),
//! which the kernel itself keeps resolved, so the XDP route lookup always finds a
//! MAC without the agent sending anything to origins.
//!
//! While the agent runs, `follow_route_changes` bumps the datapath's route epoch
//! on every route, neighbour, address or link change the kernel announces
//! (netlink multicast) and every `ROUTE_REFRESH_INTERVAL` as a backstop, so flows
//! re-run their route lookup after a change.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context as _;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE, Parseable as _};
use netlink_packet_route::neighbour::{
    NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteNextHop, RouteVia,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::netlink::{Rtnl, interface_name};
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

fn family_of(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn route_ip(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn via_ip(via: &RouteVia) -> Option<IpAddr> {
    match via {
        RouteVia::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteVia::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The gateway a route's (or next hop's) attributes name: `RTA_GATEWAY`, or
/// `RTA_VIA` for a gateway of the other family.
fn gateway_of(attributes: &[RouteAttribute]) -> Option<IpAddr> {
    attributes.iter().find_map(|attribute| match attribute {
        RouteAttribute::Gateway(addr) => route_ip(addr),
        RouteAttribute::Via(via) => via_ip(via),
        _ => None,
    })
}

/// The kernel's route lookup for `addr` (what `ip route get ADDR` shows), in the
/// caller's network namespace.
pub fn route_to(addr: IpAddr) -> anyhow::Result<OriginRoute> {
    let mut request = RouteMessage::default();
    request.header.address_family = family_of(addr);
    request.header.destination_prefix_length = if addr.is_ipv4() { 32 } else { 128 };
    request.header.flags = RouteFlags::LookupTable;
    request
        .attributes
        .push(RouteAttribute::Destination(addr.into()));
    let replies = Rtnl::open()
        .with_context(|| format!("looking up the route to {addr}"))?
        .request(RouteNetlinkMessage::GetRoute(request), 0)
        .with_context(|| format!("no route to {addr}"))?;
    let reply = replies
        .into_iter()
        .find(|reply| reply.message_type == libc::RTM_NEWROUTE)
        .with_context(|| format!("the lookup of the route to {addr} returned no route"))?;
    let route = RouteMessage::parse(reply.payload.as_slice())
        .with_context(|| format!("parsing the route to {addr}"))?;
    let mut local = None;
    let mut oif = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::PrefSource(src) => local = route_ip(src),
            RouteAttribute::Oif(index) => oif = Some(*index),
            _ => {}
        }
    }
    let local = local.with_context(|| format!("the route to {addr} has no source address"))?;
    let ifindex = oif.with_context(|| format!("the route to {addr} has no output interface"))?;
    let dev = interface_name(ifindex)
        .with_context(|| format!("naming the output interface of the route to {addr}"))?;
    Ok(OriginRoute {
        local,
        dev,
        ifindex,
        next_hop: gateway_of(&route.attributes).unwrap_or(addr),
    })
}

/// The neighbour message for `neighbour` (address and interface).
pub(crate) fn neighbour_message(neighbour: &Neighbour) -> anyhow::Result<NeighbourMessage> {
    let mut message = NeighbourMessage::default();
    message.header.family = family_of(neighbour.addr);
    message.header.ifindex = ifindex(&neighbour.dev)?;
    message
        .attributes
        .push(NeighbourAttribute::Destination(neighbour.addr.into()));
    Ok(message)
}

/// Makes the kernel keep `neighbour`'s entry resolved (managed): what
/// `ip neigh replace ADDR dev DEV managed` sends, an entry created or replaced in
/// state `NUD_NONE` with the `NTF_EXT_MANAGED` extended flag.
pub fn keep_neighbour_resolved(neighbour: &Neighbour) -> anyhow::Result<()> {
    let what = || {
        format!(
            "could not install a managed neighbour for {} on {}",
            neighbour.addr, neighbour.dev
        )
    };
    let mut message = neighbour_message(neighbour).with_context(what)?;
    message.header.state = NeighbourState::None;
    message
        .attributes
        .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
    Rtnl::open()
        .with_context(what)?
        .request(
            RouteNetlinkMessage::NewNeighbour(message),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .with_context(what)?;
    Ok(())
}

/// Removes a managed entry installed by `keep_neighbour_resolved` (on shutdown or
/// when nothing needs it any more). The kernel re-learns it on demand.
pub fn release_neighbour(neighbour: &Neighbour) {
    let result = neighbour_message(neighbour).and_then(|mut message| {
        // What `ip neigh del` sends; the state does not select anything.
        message.header.state = NeighbourState::Permanent;
        Rtnl::open()?.request(RouteNetlinkMessage::DelNeighbour(message), 0)
    });
    if let Err(err) = result {
        log::debug!(
            "releasing the neighbour {} on {}: {err:#}",
            neighbour.addr,
            neighbour.dev
        );
    }
}

/// The default gateways reachable through `interface` (both families): the next
/// hops of replies to clients that are not on a local subnet. These are the
/// gateways of the main table's default routes out of `interface` (what
/// `ip route show default dev IF` lists), including the next hops on `interface`
/// of multipath default routes. An interface that does not exist has none.
pub fn default_gateways(interface: &str) -> anyhow::Result<Vec<Neighbour>> {
    let Ok(index) = ifindex(interface) else {
        return Ok(Vec::new());
    };
    let replies = Rtnl::open()
        .and_then(|mut rtnl| rtnl.dump(RouteNetlinkMessage::GetRoute(RouteMessage::default())))
        .with_context(|| format!("listing the default routes of {interface}"))?;
    let mut out = Vec::new();
    for reply in replies {
        if reply.message_type != libc::RTM_NEWROUTE {
            continue;
        }
        // rtm_family, then rtm_dst_len: skip other families and non-default
        // routes before parsing.
        let family = reply.payload.first().copied().map(i32::from);
        if !matches!(family, Some(libc::AF_INET | libc::AF_INET6))
            || reply.payload.get(1).copied() != Some(0)
        {
            continue;
        }
        let route = RouteMessage::parse(reply.payload.as_slice())
            .with_context(|| format!("parsing a default route of {interface}"))?;
        if !is_main_table(&route) || route.header.flags.contains(RouteFlags::Cloned) {
            continue;
        }
        let mut gateways = Vec::new();
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Oif(oif) if *oif == index => {
                    gateways.extend(gateway_of(&route.attributes));
                }
                RouteAttribute::MultiPath(next_hops) => {
                    gateways.extend(
                        next_hops
                            .iter()
                            .filter(|hop: &&RouteNextHop| hop.interface_index == index)
                            .filter_map(|hop| gateway_of(&hop.attributes)),
                    );
                }
                _ => {}
            }
        }
        for gateway in gateways {
            let neighbour = Neighbour {
                addr: gateway,
                dev: interface.to_string(),
            };
            if !out.contains(&neighbour) {
                out.push(neighbour);
            }
        }
    }
    // IPv4 first, as before.
    out.sort_by_key(|n| n.addr.is_ipv6());
    Ok(out)
}

fn is_main_table(route: &RouteMessage) -> bool {
    let table = route
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table));
    table == u32::from(libc::RT_TABLE_MAIN)
}

/// How often the route epoch is bumped even when nothing announced a change: the
/// bound on how long a flow keeps a stale route should a change go unannounced (or
/// the subscription to announcements fail).
pub const ROUTE_REFRESH_INTERVAL: Duration = Duration::from_millis(250);

/// Announcements closer together than this are followed by one bump: a burst of
/// changes (a link going down takes its addresses, routes and neighbours with it)
/// costs at most one bump per `EVENT_COALESCING`.
pub const EVENT_COALESCING: Duration = Duration::from_millis(10);

/// The route netlink groups whose announcements bump the route epoch: links,
/// addresses, routes and neighbours of both families.
const ROUTE_EVENT_GROUPS: u32 = (libc::RTMGRP_LINK
    | libc::RTMGRP_IPV4_IFADDR
    | libc::RTMGRP_IPV6_IFADDR
    | libc::RTMGRP_IPV4_ROUTE
    | libc::RTMGRP_IPV6_ROUTE
    | libc::RTMGRP_NEIGH) as u32;

/// A subscription to the kernel's route, neighbour, address and link change
/// announcements, in the network namespace of the thread that made it.
pub struct RouteEvents {
    socket: tokio::io::unix::AsyncFd<netlink_sys::Socket>,
    buf: Vec<u8>,
}

impl RouteEvents {
    /// Needs a tokio runtime with IO enabled.
    pub fn subscribe() -> anyhow::Result<RouteEvents> {
        let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)
            .context("opening a route netlink socket")?;
        socket
            .bind(&netlink_sys::SocketAddr::new(0, ROUTE_EVENT_GROUPS))
            .context("subscribing to route, neighbour, address and link changes")?;
        socket
            .set_non_blocking(true)
            .context("making the netlink socket non-blocking")?;
        // SAFETY: the socket owns its fd, which stays open (and the one `as_raw_fd`
        // returns) until the socket, owned by the AsyncFd, is dropped with it.
        let socket = unsafe { tokio::io::unix::AsyncFd::register(socket) }
            .map_err(std::io::Error::from)
            .context("registering the netlink socket with the runtime")?;
        Ok(RouteEvents {
            socket,
            buf: Vec::with_capacity(8192),
        })
    }

    /// Waits for the next announcement(s): returns once at least one came, after
    /// reading what else is already queued. A lost announcement (the socket's
    /// queue overflowed) counts as one.
    pub async fn changed(&mut self) -> std::io::Result<()> {
        /// Bounds the reading of a burst before the caller gets to act on it.
        const MAX_READS: usize = 64;
        loop {
            let mut guard = self.socket.readable().await?;
            let mut changed = false;
            for _ in 0..MAX_READS {
                self.buf.clear();
                // Only the arrival matters: a longer message is cut, which is fine.
                match guard.get_inner().recv(&mut self.buf, 0) {
                    Ok(_) => changed = true,
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        break;
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(err) if err.raw_os_error() == Some(libc::ENOBUFS) => changed = true,
                    Err(err) => return Err(err),
                }
            }
            if changed {
                return Ok(());
            }
        }
    }
}

/// The next announcement, or never without a subscription.
async fn next_change(events: &mut Option<RouteEvents>) -> std::io::Result<()> {
    match events {
        Some(events) => events.changed().await,
        None => std::future::pending().await,
    }
}

/// Owns the route epoch for the agent's life, so every flow's next datagram after
/// a change of routes or neighbours is sent by a fresh `bpf_fib_lookup`: bumps it
/// on each change the kernel announces (route, neighbour, address or link, at most
/// once per `EVENT_COALESCING`) and every `ROUTE_REFRESH_INTERVAL` regardless.
/// Subscribes in the network namespace of the runtime's threads; if it cannot,
/// warns and keeps the timer alone.
pub async fn follow_route_changes(mut epoch: crate::datapath::RouteEpoch) {
    let mut events = match RouteEvents::subscribe() {
        Ok(events) => Some(events),
        Err(err) => {
            log::warn!(
                "cannot follow route changes as they happen ({err:#}): flows pick up a \
                 route change within {ROUTE_REFRESH_INTERVAL:?}"
            );
            None
        }
    };
    let mut tick = tokio::time::interval(ROUTE_REFRESH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_bump = tokio::time::Instant::now();
    let mut pending = false;
    loop {
        let coalesced_until = last_bump + EVENT_COALESCING;
        tokio::select! {
            _ = tick.tick() => {}
            changed = next_change(&mut events) => match changed {
                Ok(()) if tokio::time::Instant::now() < coalesced_until => {
                    pending = true;
                    continue;
                }
                Ok(()) => {}
                Err(err) => {
                    log::warn!(
                        "following route changes failed ({err}): flows pick up a route \
                         change within {ROUTE_REFRESH_INTERVAL:?}"
                    );
                    events = None;
                    continue;
                }
            },
            _ = tokio::time::sleep_until(coalesced_until), if pending => {}
        }
        pending = false;
        last_bump = tokio::time::Instant::now();
        if let Err(err) = epoch.bump() {
            log::error!("bumping the route epoch failed: {err:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use netlink_packet_route::neighbour::NeighbourAddress;

    use super::*;
    use crate::host::netlink::test_netns::{addr, in_new_netns, ip, veth_lab};

    #[test]
    fn loopback_routes_through_lo() {
        let route = route_to(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("route to 127.0.0.1");
        assert_eq!(
            route,
            OriginRoute {
                local: IpAddr::V4(Ipv4Addr::LOCALHOST),
                dev: "lo".to_string(),
                ifindex: ifindex("lo").expect("lo"),
                next_hop: IpAddr::V4(Ipv4Addr::LOCALHOST),
            }
        );
    }

    #[test]
    fn ipv6_loopback_routes_through_lo() {
        let has_ipv6 = crate::config::interface_addresses()
            .expect("interface addresses")
            .get("lo")
            .is_some_and(|addrs| addrs.contains(&IpAddr::V6(Ipv6Addr::LOCALHOST)));
        if !has_ipv6 {
            eprintln!("skipped: no ::1 on lo");
            return;
        }
        let route = route_to(IpAddr::V6(Ipv6Addr::LOCALHOST)).expect("route to ::1");
        assert_eq!(route.dev, "lo");
        assert_eq!(route.local, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(route.next_hop, IpAddr::V6(Ipv6Addr::LOCALHOST));
    }

    #[test]
    fn no_route_says_why() {
        let Some(result) = in_new_netns(|| route_to(addr("10.9.9.9"))) else {
            return;
        };
        let err = result.expect_err("an empty namespace has no route to 10.9.9.9");
        assert_eq!(
            format!("{err:#}"),
            "no route to 10.9.9.9: Network is unreachable"
        );
    }

    #[test]
    fn routes_gateways_and_managed_neighbours_in_a_namespace() {
        let Some(()) = in_new_netns(|| {
            veth_lab();
            let veth0 = ifindex("veth0").expect("veth0");
            assert_eq!(
                route_to(addr("198.51.100.7")).expect("route via the gateway"),
                OriginRoute {
                    local: addr("192.0.2.1"),
                    dev: "veth0".to_string(),
                    ifindex: veth0,
                    next_hop: addr("192.0.2.254"),
                }
            );
            assert_eq!(
                route_to(addr("192.0.2.9")).expect("on-link route"),
                OriginRoute {
                    local: addr("192.0.2.1"),
                    dev: "veth0".to_string(),
                    ifindex: veth0,
                    next_hop: addr("192.0.2.9"),
                }
            );
            let v6 = route_to(addr("2001:db8:1::7")).expect("IPv6 route via the gateway");
            assert_eq!(
                (v6.local, v6.next_hop),
                (addr("2001:db8::1"), addr("2001:db8::fe"))
            );

            let gateways = |dev: &str| default_gateways(dev).expect("default gateways");
            let on_veth0 = |a: &str| Neighbour {
                addr: addr(a),
                dev: "veth0".to_string(),
            };
            assert_eq!(
                gateways("veth0"),
                [on_veth0("192.0.2.254"), on_veth0("2001:db8::fe")]
            );
            assert_eq!(gateways("veth1"), []);
            assert_eq!(gateways("no-such-interface"), []);
            // A default route of another table is not the main table's.
            ip(&[
                "route",
                "add",
                "default",
                "via",
                "192.0.2.253",
                "dev",
                "veth0",
                "table",
                "100",
            ]);
            assert_eq!(gateways("veth0").len(), 2);

            let gateway = on_veth0("192.0.2.254");
            keep_neighbour_resolved(&gateway).expect("managed neighbour");
            keep_neighbour_resolved(&gateway).expect("replacing it is fine");
            assert_eq!(managed_neighbours(), [addr("192.0.2.254")]);
            release_neighbour(&gateway);
            assert_eq!(managed_neighbours(), Vec::<IpAddr>::new());

            let err = keep_neighbour_resolved(&Neighbour {
                addr: addr("192.0.2.254"),
                dev: "no-such-interface".to_string(),
            })
            .expect_err("no such interface");
            assert!(
                format!("{err:#}").starts_with(
                    "could not install a managed neighbour for 192.0.2.254 on no-such-interface"
                ),
                "{err:#}"
            );
        }) else {
            return;
        };
    }

    async fn wait(events: &mut RouteEvents) {
        tokio::time::timeout(Duration::from_secs(2), events.changed())
            .await
            .expect("an announcement within 2 s")
            .expect("reading announcements");
    }

    async fn quiet(events: &mut RouteEvents) {
        let changed = tokio::time::timeout(Duration::from_millis(50), events.changed()).await;
        assert!(changed.is_err(), "no announcement without a change");
    }

    #[test]
    fn kernel_refusals_carry_the_kernels_explanation() {
        let Some(err) = in_new_netns(|| {
            veth_lab();
            let gateway = Neighbour {
                addr: addr("192.0.2.254"),
                dev: "veth0".to_string(),
            };
            let mut message = neighbour_message(&gateway).expect("veth0");
            message.header.state = NeighbourState::Permanent;
            message
                .attributes
                .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
            Rtnl::open()
                .expect("netlink")
                .request(
                    RouteNetlinkMessage::NewNeighbour(message),
                    NLM_F_CREATE | NLM_F_REPLACE,
                )
                .expect_err("a permanent entry cannot be managed")
        }) else {
            return;
        };
        let kernel = err
            .downcast_ref::<crate::host::netlink::KernelError>()
            .expect("a kernel error");
        assert_eq!(kernel.errno, libc::EINVAL);
        assert!(
            format!("{err}").starts_with("Invalid argument ("),
            "the kernel's explanation follows: {err}"
        );
    }

    /// The managed neighbour entries of the namespace.
    fn managed_neighbours() -> Vec<IpAddr> {
        let replies = Rtnl::open()
            .expect("netlink")
            .dump(RouteNetlinkMessage::GetNeighbour(
                NeighbourMessage::default(),
            ))
            .expect("neighbour dump");
        let mut managed = Vec::new();
        for reply in replies {
            let message = NeighbourMessage::parse(reply.payload.as_slice()).expect("neighbour");
            let is_managed = message.attributes.iter().any(|a| {
                matches!(a, NeighbourAttribute::ExtFlags(f) if f.contains(NeighbourExtFlags::Managed))
            });
            for attribute in &message.attributes {
                match attribute {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) if is_managed => {
                        managed.push(IpAddr::V4(*v4))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) if is_managed => {
                        managed.push(IpAddr::V6(*v6))
                    }
                    _ => {}
                }
            }
        }
        managed
    }

    #[test]
    fn announces_address_route_and_link_changes() {
        let Some(()) = in_new_netns(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let mut events = RouteEvents::subscribe().expect("subscription");
                quiet(&mut events).await;
                ip(&[
                    "link", "add", "vethA", "type", "veth", "peer", "name", "vethB",
                ]);
                wait(&mut events).await;
                ip(&["addr", "add", "192.0.2.9/32", "dev", "lo"]);
                wait(&mut events).await;
                ip(&["route", "add", "198.51.100.0/24", "dev", "lo"]);
                wait(&mut events).await;
            });
        }) else {
            return;
        };
    }
}
