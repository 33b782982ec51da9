//! The UDP fast path (SPEC §5): client datagrams are rewritten towards their flow's
//! origin (with an SPP or PROXY v2 header in front when configured) and replies are
//! validated against the flow table and rewritten back to the client, all in XDP.
//!
//! A datagram of a live flow classified under the current config generation takes
//! `established`: one flow lookup replaces the edge, port, app and access-rule
//! lookups, and the route comes from the flow's cache. Everything else goes
//! through the classifier first and lands in `to_origin` / `to_client`.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    programs::XdpContext,
};
use forwarder_common::{
    ADMISSION_NEW, ADMISSION_REPLIED, AppInfo, DIR_EGRESS, DIR_INGRESS, DropReason, FLOW_SPP,
    FLOW_V2, FLOW_V2_HEADER_SENT, FlowState, HINT_EDGE_PORT, HINT_ORIGIN_PORT, PROTO_UDP,
    ProxyMode, RULE_NONE, RouteCache, SPP_CLIENT_ADDR, SPP_CLIENT_PORT, SPP_HEADER_LEN, SPP_MAGIC,
    SPP_PROXY_ADDR, SPP_PROXY_PORT,
};

use crate::{
    counters::{count_app, count_drop, count_rule_hit, drop},
    csum, flow, icmp,
    maps::{APPS, NAT_PORTS, ORIGIN_ROUTES, ORIGINS, SETTINGS},
    parse::{Packet, ptr_at},
    policy::port_hints,
    rewrite::{self, ProxyHeader, Rewrite},
    route_cache::{self, Query, RouteError},
    scratch::Scratch,
};

/// The config generation now in force.
#[inline(always)]
fn generation() -> u32 {
    SETTINGS.get(0).map(|s| s.generation).unwrap_or(0)
}

/// The flow mode bits an app's datagrams get.
#[inline(always)]
fn mode_flags(info: &AppInfo) -> u32 {
    match ProxyMode::from_code(info.proxy) {
        Some(ProxyMode::Simple) => FLOW_SPP,
        Some(ProxyMode::V2) => FLOW_V2,
        _ => 0,
    }
}

/// A datagram (untagged, not a fragment) of a live flow of the current generation,
/// either way: forwarded here. `None`: the classifier decides.
#[inline(always)]
pub fn established(ctx: &XdpContext, s: &mut Scratch) -> Option<u32> {
    let to_app_port = port_hints(PROTO_UDP, s.pkt.dport) & HINT_EDGE_PORT != 0;
    let from_origin_port = port_hints(PROTO_UDP, s.pkt.sport) & HINT_ORIGIN_PORT != 0;
    if !to_app_port && !from_origin_port {
        return None;
    }
    // Every datagram the fast path may rewrite passes here first, so this is the
    // one place a partial checksum is completed (one call site keeps the
    // verifier's work on the summing loop small).
    if !complete_partial_checksum(ctx, &s.pkt) {
        return Some(drop(DropReason::TooBig));
    }
    let generation = generation();
    s.flow_missed = false;
    if to_app_port {
        flow::stage_key(&s.pkt, &mut s.key);
        // A datagram that may also be a reply (its source port is an origin's, as
        // every SPP reply's is) looks in the assured table only: a reply then pays
        // one miss here, not two, and a new flow's datagram still finds its flow
        // in `to_origin`, which looks in both.
        let found = if from_origin_port {
            flow::lookup_assured(&s.key)
        } else {
            flow::lookup(&s.key)
        };
        s.flow_missed = found.is_none() && !from_origin_port;
        if let Some(flow) = found {
            // SAFETY: a live map value; plain reads.
            let (flow_generation, rule) = unsafe { ((*flow).generation, (*flow).rule) };
            if flow_generation == generation {
                // The access rule the client matched counts every packet, as it
                // would if each were classified.
                if rule != RULE_NONE {
                    count_rule_hit(rule);
                }
                match settle(s, flow) {
                    Some(flow) => return Some(forward_to_origin(ctx, s, flow)),
                    // Its NAT port was reclaimed: the datagram starts a new flow.
                    None => s.flow_missed = true,
                }
            }
        }
    }
    if !from_origin_port {
        return None;
    }
    // A reply: SPP names its flow in the header, plain NAT and v2 by the port.
    let (flow, spp) = if spp_flow_key(ctx, &s.pkt, &mut s.key).is_ok()
        && let Some(flow) = flow::lookup(&s.key)
    {
        (flow, true)
    } else {
        let nat = nat_flow(s)?;
        (nat, false)
    };
    // SAFETY: a live map value; plain reads.
    let (flags, flow_generation) = unsafe { ((*flow).flags, (*flow).generation) };
    if (flags & FLOW_SPP != 0) != spp || flow_generation != generation {
        return None;
    }
    Some(forward_to_client(ctx, s, flow))
}

/// A client datagram for `flow`: a new flow the origin has answered is promoted
/// first (see `flow`). `None`: the flow lost its NAT port and is gone.
#[inline(always)]
fn settle(s: &mut Scratch, flow: *mut FlowState) -> Option<*mut FlowState> {
    // SAFETY: a live map value; a plain read.
    if unsafe { (*flow).admission } != ADMISSION_REPLIED {
        return Some(flow);
    }
    flow::promote(&s.key, flow, &mut s.nat, &mut s.flow)
}

/// Completes the UDP checksum in the frame if the sender left only the
/// pseudo-header sum (`CHECKSUM_PARTIAL`); false when the segment is too long to
/// sum (see `csum::MAX_SUMMED_SEGMENT`).
#[inline(always)]
fn complete_partial_checksum(ctx: &XdpContext, pkt: &Packet) -> bool {
    let l4 = pkt.l4 & 0xfff;
    let Some(h) = ptr_at::<[u8; 8]>(ctx, l4) else {
        return true;
    };
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &*h };
    let udp_len = u16::from_be_bytes([h[4], h[5]]);
    let field = u16::from_be_bytes([h[6], h[7]]);
    let pseudo = csum::pseudo_header(pkt.family, &pkt.src, &pkt.dst, udp_len);
    // 0: an IPv4 datagram without checksum (the pseudo-header sum is never 0).
    if field == 0 || !csum::is_partial(field, pseudo) {
        return true;
    }
    csum::complete_partial(ctx.ctx, l4, udp_len as usize, 6)
}

/// The flow a plain-NAT reply's destination port names (its key left in `s.key`).
#[inline(always)]
fn nat_flow(s: &mut Scratch) -> Option<*mut FlowState> {
    let settings = SETTINGS.get(0)?;
    let port = s.pkt.dport;
    if port < settings.nat_port_low || port > settings.nat_port_high {
        return None;
    }
    s.nat.local = s.pkt.dst;
    s.nat.local_port = port;
    s.nat._pad = 0;
    // SAFETY: copied out at once.
    s.key = unsafe { NAT_PORTS.get(&s.nat) }?.owner;
    flow::lookup(&s.key)
}

/// A client datagram for UDP app `app`, classified just now (access rule `rule`).
#[inline(always)]
pub fn to_origin(ctx: &XdpContext, s: &mut Scratch, app: u32, info: &AppInfo, rule: u32) -> u32 {
    // The fast path handles untagged frames; tagged ones go to the kernel.
    if s.pkt.vlan_tags != 0 {
        return xdp_action::XDP_PASS;
    }
    let generation = generation();
    flow::stage_key(&s.pkt, &mut s.key);
    // `established` looked this key up a moment ago; a miss need not be repeated.
    let found = if s.flow_missed {
        None
    } else {
        flow::lookup(&s.key)
    };
    if let Some(flow) = found {
        // SAFETY: a live map value; plain reads and stores of our own fields.
        unsafe {
            if (*flow).app == app && (*flow).flags & (FLOW_SPP | FLOW_V2) == mode_flags(info) {
                (*flow).generation = generation;
                (*flow).rule = rule;
                if let Some(flow) = settle(s, flow) {
                    return forward_to_origin(ctx, s, flow);
                }
            } else {
                // A reload gave the port to another app or mode: the old flow ends
                // (the agent sees it gone) and a new one begins.
                let Some(origin) = ORIGINS.get((*flow).origin) else {
                    return drop(DropReason::NoFlow);
                };
                s.nat.local = origin.local;
                flow::remove(&s.key, &mut s.nat, flow);
            }
        }
    }
    first_datagram(ctx, s, app, info, generation, rule)
}

/// The first datagram of a flow: the flow is prepared in scratch memory, the
/// datagram sent with it, and only then is the flow inserted (with this datagram
/// counted), so a datagram that cannot leave leaves no flow behind.
#[inline(always)]
fn first_datagram(
    ctx: &XdpContext,
    s: &mut Scratch,
    app: u32,
    info: &AppInfo,
    generation: u32,
    rule: u32,
) -> u32 {
    let now = flow::now_ns();
    if !flow::within_source_limit(&s.pkt, now) {
        return drop(DropReason::SourceLimit);
    }
    if !flow::within_app_limit(app, info, now) {
        return drop(DropReason::FlowLimit);
    }
    if flow::prepare(
        ctx,
        &mut s.flow,
        &mut s.nat,
        &mut s.claim,
        &s.key,
        app,
        info,
        generation,
        rule,
        now,
    )
    .is_none()
    {
        return drop(DropReason::NoFlow);
    }
    let state: *mut FlowState = &raw mut s.flow;
    match send_to_origin(ctx, s, state) {
        Ok((payload, ifindex, add)) => {
            s.flow.packets_in = 1;
            s.flow.bytes_in = payload;
            if add == ProxyHeader::V2 {
                s.flow.flags |= FLOW_V2_HEADER_SENT;
            }
            flow::insert(&s.key, &s.flow, &mut s.nat);
            count_app(app, DIR_INGRESS, payload);
            transmit(ctx, ifindex)
        }
        Err(refused) => {
            flow::abandon(&s.key, &s.flow, &mut s.nat);
            refuse(ctx, s, state, refused)
        }
    }
}

/// A datagram from an origin of UDP app `app` (SPEC §3 step 2 recognised it).
#[inline(always)]
pub fn to_client(ctx: &XdpContext, s: &mut Scratch, app: u32) -> u32 {
    if s.pkt.vlan_tags != 0 {
        return xdp_action::XDP_PASS;
    }
    let Some(info) = APPS.get(app) else {
        return drop(DropReason::NoFlow);
    };
    let spp = info.proxy == ProxyMode::Simple.code();
    // A flow's replies come to an app's edge port (SPP) or a NAT port: a datagram
    // to any other port is for a socket of the host (the agent's health probes).
    let flow_port = if spp {
        port_hints(PROTO_UDP, s.pkt.dport) & HINT_EDGE_PORT != 0
    } else {
        SETTINGS.get(0).is_some_and(|settings| {
            (settings.nat_port_low..=settings.nat_port_high).contains(&s.pkt.dport)
        })
    };
    if !flow_port {
        return xdp_action::XDP_PASS;
    }
    let flow = if spp {
        if let Err(reason) = spp_flow_key(ctx, &s.pkt, &mut s.key) {
            return drop(reason);
        }
        flow::lookup(&s.key)
    } else {
        nat_flow(s)
    };
    let Some(flow) = flow else {
        return drop(DropReason::NoFlow);
    };
    forward_to_client(ctx, s, flow)
}

/// Sends the client datagram in `s.pkt` to the origin of the live `flow`.
#[inline(always)]
fn forward_to_origin(ctx: &XdpContext, s: &mut Scratch, flow: *mut FlowState) -> u32 {
    match send_to_origin(ctx, s, flow) {
        Ok((payload, ifindex, add)) => {
            // SAFETY: atomic adds on the shared map value; a plain store of our own
            // field.
            unsafe {
                atomic_add(&raw mut (*flow).packets_in, 1);
                atomic_add(&raw mut (*flow).bytes_in, payload);
                if add == ProxyHeader::V2 {
                    (*flow).flags |= FLOW_V2_HEADER_SENT;
                }
                count_app((*flow).app, DIR_INGRESS, payload);
            }
            transmit(ctx, ifindex)
        }
        Err(refused) => refuse(ctx, s, flow, refused),
    }
}

/// A client datagram that could not be sent to `flow`'s origin: dropped, and when
/// it was too big for the path, answered with an ICMP error telling the client how
/// big a datagram may be (the proxy header's bytes come off the path MTU).
#[inline(always)]
fn refuse(ctx: &XdpContext, s: &Scratch, flow: *const FlowState, refused: Refused) -> u32 {
    let Refused { reason, mtu } = refused;
    if mtu != 0 {
        // SAFETY: `flow` is a live map value or the scratch state.
        let add = proxy_header(unsafe { (*flow).flags });
        let usable = mtu.saturating_sub(rewrite::proxy_header_len(add, s.pkt.family) as u16);
        if let Some(verdict) = icmp::too_big(ctx, &s.pkt, usable) {
            count_drop(reason);
            return verdict;
        }
    }
    drop(reason)
}

/// The header a flow's next datagram to the origin gets.
#[inline(always)]
fn proxy_header(flags: u32) -> ProxyHeader {
    if flags & FLOW_SPP != 0 {
        ProxyHeader::Spp
    } else if flags & (FLOW_V2 | FLOW_V2_HEADER_SENT) == FLOW_V2 {
        ProxyHeader::V2
    } else {
        ProxyHeader::None
    }
}

/// Rewrites the client datagram in `s.pkt` for the origin of `flow` (a live map
/// value or a prepared flow in scratch memory). Returns the payload length, the
/// interface to send it out of and the header added.
#[inline(always)]
fn send_to_origin(
    ctx: &XdpContext,
    s: &mut Scratch,
    flow: *const FlowState,
) -> Result<(u64, u32, ProxyHeader), Refused> {
    // SAFETY: `flow` points into a map value or scratch; fields are read once.
    let (origin_index, origin_port, local_port, flags) = unsafe {
        (
            (*flow).origin,
            (*flow).origin_port,
            (*flow).local_port,
            (*flow).flags,
        )
    };
    let (Some(origin), Some(route)) = (
        ORIGINS.get(origin_index),
        ORIGIN_ROUTES.get_ptr_mut(origin_index),
    ) else {
        return Err(DropReason::NoFlow.into());
    };
    let add = proxy_header(flags);
    let pkt = &s.pkt;
    let rw = Rewrite {
        family: pkt.family,
        src: &origin.local,
        dst: &origin.addr,
        sport: local_port,
        dport: origin_port,
        strip_spp: false,
        add,
        client: &pkt.src,
        edge: &pkt.dst,
        client_port: pkt.sport,
        edge_port: pkt.dport,
    };
    let epoch = route_cache::current_epoch();
    let (payload, ifindex) = send(ctx, pkt, &mut s.fib, &rw, route, origin.ifindex, epoch)?;
    Ok((payload, ifindex, add))
}

/// Sends the origin's datagram in `s.pkt` to the client of `flow` (key in `s.key`),
/// after checking that it comes from the flow's origin: its address and port, by
/// the interface and next hop the route to it uses.
#[inline(always)]
fn forward_to_client(ctx: &XdpContext, s: &mut Scratch, flow: *mut FlowState) -> u32 {
    // SAFETY: reading our own map value.
    let (app, origin_index, origin_port, local_port, flags, client_ifindex) = unsafe {
        (
            (*flow).app,
            (*flow).origin,
            (*flow).origin_port,
            (*flow).local_port,
            (*flow).flags,
            (*flow).client_ifindex,
        )
    };
    // Only the flow's own origin may answer it: the forwarder is never a reflector.
    // Apps may share an origin address and port: the flow says whose reply this is.
    let Some(origin) = ORIGINS.get(origin_index) else {
        return drop(DropReason::NoFlow);
    };
    let pkt = &s.pkt;
    if origin.addr != pkt.src || origin_port != pkt.sport {
        return drop(DropReason::NoFlow);
    }
    let epoch = route_cache::current_epoch();
    // The origin's address proves nothing by itself (XDP runs before rp_filter): the
    // reply must come in where the route to the origin goes out, from its next hop.
    let to_origin = Query {
        family: pkt.family,
        src: &origin.local,
        dst: &origin.addr,
        sport: local_port,
        dport: origin_port,
        ifindex: origin.ifindex,
        l3_len: 0,
    };
    let Some(route) = ORIGIN_ROUTES.get_ptr_mut(origin_index) else {
        return drop(DropReason::NoFlow);
    };
    // SAFETY: a live map value.
    if let Err(e) = unsafe { route_cache::resolve(ctx, &mut s.fib, route, epoch, &to_origin) } {
        return drop(e.reason());
    }
    let Some(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return drop(DropReason::Malformed);
    };
    // SAFETY: bounds checked by ptr_at; `route` as above.
    let (eth, route) = unsafe { (&*eth, &*route) };
    if ctx.ingress_ifindex() as u32 != route.ifindex || eth[6..12] != route.dmac {
        return drop(DropReason::Spoofed);
    }
    let key = &s.key;
    let rw = Rewrite {
        family: pkt.family,
        src: &key.edge,
        dst: &key.client,
        sport: key.edge_port,
        dport: key.client_port,
        strip_spp: flags & FLOW_SPP != 0,
        add: ProxyHeader::None,
        client: &key.client,
        edge: &key.edge,
        client_port: key.client_port,
        edge_port: key.edge_port,
    };
    // SAFETY: `flow` is a live map value.
    let route = unsafe { &raw mut (*flow).to_client };
    let result = send(ctx, pkt, &mut s.fib, &rw, route, client_ifindex, epoch);
    let (payload, ifindex) = match result {
        Ok(sent) => sent,
        Err(Refused { reason, .. }) => return drop(reason),
    };
    // SAFETY: as in forward_to_origin; a plain store of a constant.
    unsafe {
        atomic_add(&raw mut (*flow).packets_out, 1);
        atomic_add(&raw mut (*flow).bytes_out, payload);
        if (*flow).admission == ADMISSION_NEW {
            (*flow).admission = ADMISSION_REPLIED;
        }
    }
    count_app(app, DIR_EGRESS, payload);
    transmit(ctx, ifindex)
}

/// Why a datagram could not be sent: the drop reason and, when the route's MTU
/// was the reason, that MTU (else 0).
struct Refused {
    reason: DropReason,
    mtu: u16,
}

impl From<DropReason> for Refused {
    #[inline(always)]
    fn from(reason: DropReason) -> Refused {
        Refused { reason, mtu: 0 }
    }
}

/// Rewrites the datagram as `rw` says and frames it for `route` (refreshed first
/// when stale, looked up from `ifindex`). Returns the payload length and the
/// interface to send it out of.
#[inline(always)]
fn send(
    ctx: &XdpContext,
    pkt: &Packet,
    fib: &mut FibParams,
    rw: &Rewrite,
    route: *mut RouteCache,
    ifindex: u32,
    epoch: u32,
) -> Result<(u64, u32), Refused> {
    let sz = rewrite::sizes(ctx, pkt, rw)?;
    let query = Query {
        family: rw.family,
        src: rw.src,
        dst: rw.dst,
        sport: rw.sport,
        dport: rw.dport,
        ifindex,
        l3_len: sz.l3_len,
    };
    // SAFETY: the callers pass a cache inside a live flow.
    unsafe { route_cache::resolve(ctx, fib, route, epoch, &query) }.map_err(|e| match e {
        RouteError::TooBig(mtu) => Refused {
            reason: DropReason::TooBig,
            mtu,
        },
        RouteError::NoRoute => DropReason::NoRoute.into(),
    })?;
    // SAFETY: as above.
    let route = unsafe { &*route };
    rewrite::apply(ctx, pkt, rw, &sz, route)?;
    Ok((sz.payload, route.ifindex))
}

/// An atomic add (BPF_ATOMIC): flow counters are shared by every CPU.
#[inline(always)]
pub unsafe fn atomic_add(dst: *mut u64, value: u64) {
    // SAFETY: the caller passes a pointer into a live map value.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            dst, value,
        );
    }
}

/// Out of `ifindex`: back where it came from (XDP_TX) or redirected.
#[inline(always)]
pub fn transmit(ctx: &XdpContext, ifindex: u32) -> u32 {
    if ifindex == ctx.ingress_ifindex() as u32 {
        xdp_action::XDP_TX
    } else {
        // SAFETY: plain helper call.
        unsafe { aya_ebpf::helpers::bpf_redirect(ifindex, 0) as u32 }
    }
}

/// Reads the flow an SPP reply names into `key`, after checking the header is
/// there and whole.
#[inline(always)]
fn spp_flow_key(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &mut forwarder_common::FlowKey,
) -> Result<(), DropReason> {
    let l4 = pkt.l4 & 0xfff;
    let Some(len) = ptr_at::<[u8; 2]>(ctx, l4 + 4) else {
        return Err(DropReason::Malformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let udp_len = u16::from_be_bytes(unsafe { *len }) as usize;
    if udp_len < 8 + SPP_HEADER_LEN {
        return Err(DropReason::SppInvalid);
    }
    let Some(h) = ptr_at::<[u8; SPP_HEADER_LEN]>(ctx, l4 + 8) else {
        return Err(DropReason::SppInvalid);
    };
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &*h };
    if u16::from_be_bytes([h[0], h[1]]) != SPP_MAGIC {
        return Err(DropReason::SppInvalid);
    }
    key.client
        .copy_from_slice(&h[SPP_CLIENT_ADDR..SPP_PROXY_ADDR]);
    key.edge
        .copy_from_slice(&h[SPP_PROXY_ADDR..SPP_CLIENT_PORT]);
    key.client_port = u16::from_be_bytes([h[SPP_CLIENT_PORT], h[SPP_CLIENT_PORT + 1]]);
    key.edge_port = u16::from_be_bytes([h[SPP_PROXY_PORT], h[SPP_PROXY_PORT + 1]]);
    Ok(())
}
