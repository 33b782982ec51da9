//! The UDP flow table: preparing a flow (origin by hash, NAT port claimed
//! atomically), inserting it once its first datagram has left (or giving its NAT
//! port back when it did not), removing one, and the NAT return path's port map.

use aya_ebpf::{
    bindings::{BPF_EXIST, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
    programs::XdpContext,
};
use forwarder_common::{
    AppInfo, FLOW_SPP, FLOW_V2, FlowKey, FlowState, NatKey, ProxyMode, RouteCache,
};

use crate::{
    maps::{FLOWS, NAT_PORTS, ORIGINS, SETTINGS},
    parse::Packet,
};

/// How many ports of `udp_nat_ports` a new flow tries before giving up.
const NAT_PORT_PROBES: u32 = 8;

/// Writes the client-side 4-tuple of `pkt` into `key`.
#[inline(always)]
pub fn stage_key(pkt: &Packet, key: &mut FlowKey) {
    key.client = pkt.src;
    key.edge = pkt.dst;
    key.client_port = pkt.sport;
    key.edge_port = pkt.dport;
}

/// The live flow for `key`.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<*mut FlowState> {
    FLOWS.get_ptr_mut(key)
}

/// Prepares the flow for `key` in `state` (app `app`, classified under
/// `generation` with access rule `rule`): picks its origin by a hash of the client
/// address and port, and its local port (plain NAT and v2: a free port of
/// `udp_nat_ports`, claimed now; `nat` then names the claim). The flow enters the
/// table only once its first datagram has left (`insert`). `None` when the app has
/// no origin or no NAT port is free.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn prepare(
    ctx: &XdpContext,
    state: &mut FlowState,
    nat: &mut NatKey,
    key: &FlowKey,
    app: u32,
    info: &AppInfo,
    generation: u32,
    rule: u32,
) -> Option<()> {
    if info.origin_count == 0 {
        return None;
    }
    let hash = flow_hash(key);
    let origin_index = info.origin_first + (hash % info.origin_count as u32);
    let origin = ORIGINS.get(origin_index)?;
    let origin_port = origin.port_low + (key.edge_port - info.edge_port_low);
    let simple = info.proxy == ProxyMode::Simple.code();
    let local_port = if simple {
        // SPP replies carry the flow in their header: one local port serves all.
        key.edge_port
    } else {
        nat.local = origin.local;
        claim_nat_port(nat, key, hash)?
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions; once per flow.
    state.first_seen_ns = unsafe { bpf_ktime_get_ns() };
    state.packets_in = 0;
    state.bytes_in = 0;
    state.packets_out = 0;
    state.bytes_out = 0;
    state.app = app;
    state.origin = origin_index;
    state.origin_port = origin_port;
    state.local_port = local_port;
    state.flags = if simple {
        FLOW_SPP
    } else if info.proxy == ProxyMode::V2.code() {
        FLOW_V2
    } else {
        0
    };
    state.client_ifindex = ctx.ingress_ifindex() as u32;
    state.generation = generation;
    state.rule = rule;
    state._pad = 0;
    state.to_client = RouteCache::default();
    Some(())
}

/// Inserts the prepared flow `state`, whose first datagram has left and is counted
/// in it. If another CPU created the flow meanwhile, theirs stays: the datagram is
/// added to its counters, and the NAT port this CPU claimed (`nat`) is given back
/// if theirs is another one.
#[inline(always)]
pub fn insert(key: &FlowKey, state: &FlowState, nat: &mut NatKey) {
    if FLOWS.insert(key, state, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    let Some(theirs) = FLOWS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a live map value; atomic adds and one field read.
    unsafe {
        crate::udp::atomic_add(&raw mut (*theirs).packets_in, state.packets_in);
        crate::udp::atomic_add(&raw mut (*theirs).bytes_in, state.bytes_in);
        if (*theirs).local_port != state.local_port {
            release_claim(key, nat, state.flags, state.local_port);
        }
    }
}

/// Gives back what a prepared flow claimed (its NAT port) when its first datagram
/// did not leave: then there is no flow.
#[inline(always)]
pub fn abandon(key: &FlowKey, state: &FlowState, nat: &mut NatKey) {
    release_claim(key, nat, state.flags, state.local_port);
}

/// Removes the flow `key` and, for a NAT flow, its port claim (`nat.local` must hold
/// the origin's local address).
#[inline(always)]
pub fn remove(key: &FlowKey, nat: &mut NatKey, flags: u32, local_port: u16) {
    release_claim(key, nat, flags, local_port);
    let _ = FLOWS.remove(key);
}

/// Gives back the NAT port `local_port` a flow with `flags` holds (SPP flows hold
/// none) if it is still held for `key`.
#[inline(always)]
fn release_claim(key: &FlowKey, nat: &mut NatKey, flags: u32, local_port: u16) {
    if flags & FLOW_SPP == 0 {
        nat.local_port = local_port;
        release_nat_port(nat, key);
    }
}

/// Gives back the NAT port `nat` if it is still held for `key`.
#[inline(always)]
fn release_nat_port(nat: &NatKey, key: &FlowKey) {
    // SAFETY: copied out at once.
    if unsafe { NAT_PORTS.get(nat) }.is_some_and(|owner| owner == key) {
        let _ = NAT_PORTS.remove(nat);
    }
}

/// Finds a port of `udp_nat_ports` not used by a live flow on `nat.local` and claims
/// it atomically (insert-if-absent), probing a bounded number of candidates.
#[inline(always)]
fn claim_nat_port(nat: &mut NatKey, key: &FlowKey, hash: u32) -> Option<u16> {
    let settings = SETTINGS.get(0)?;
    let low = settings.nat_port_low as u32;
    let span = (settings.nat_port_high as u32).checked_sub(low)? + 1;
    nat._pad = 0;
    for probe in 0..NAT_PORT_PROBES {
        // Spread probes over the range (a large odd step visits distinct ports).
        let port = low + (hash.wrapping_add(probe.wrapping_mul(40_503))) % span;
        nat.local_port = port as u16;
        if NAT_PORTS.insert(&*nat, key, BPF_NOEXIST as u64).is_ok() {
            return Some(port as u16);
        }
        // Already ours (a racing first packet of the same flow)? Then reuse it.
        // SAFETY: copied out at once.
        if unsafe { NAT_PORTS.get(&*nat) }.is_some_and(|owner| owner == key) {
            let _ = NAT_PORTS.insert(&*nat, key, BPF_EXIST as u64);
            return Some(port as u16);
        }
    }
    None
}

/// FNV-1a over the client address and port: stable for a flow's life, spreads
/// clients over origins.
#[inline(always)]
fn flow_hash(key: &FlowKey) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.client {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    for b in key.client_port.to_be_bytes() {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    h
}
