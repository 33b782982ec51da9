//! The UDP flow tables and flow admission.
//!
//! A flow begins in `NEW_FLOWS` (an LRU of its own). When the origin has answered
//! and the client then speaks again (the conntrack rule for UDP: traffic after a
//! reply), it is promoted to `FLOWS`, which the datapath never evicts from: a
//! flood of one-way flows (spoofed sources) churns `NEW_FLOWS` and nothing else.
//!
//! Plain-NAT and v2 flows hold an origin-side port of `udp_nat_ports`
//! (`NAT_PORTS`). A free port is taken first; when none of the probed ports is
//! free, the port of a flow the origin never answered — or of one the LRU already
//! forgot — is reclaimed, never that of an assured flow. Every change of a claim's
//! state is a compare-and-swap, so exactly one CPU wins a port being reclaimed or
//! promoted.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns, programs::XdpContext};
use forwarder_common::{
    ADMISSION_ASSURED, ADMISSION_NEW, AppInfo, CLAIM_ASSURED, CLAIM_NEW, CLAIM_PENDING, FLOW_SPP,
    FLOW_V2, FlowCounter, FlowKey, FlowState, MAGLEV_LANES, NatClaim, NatKey, ProxyMode,
    RouteCache, SourceKey, SourceWindow,
};

use crate::{
    counters::count_flow,
    maps::{APP_WINDOWS, FLOWS, MAGLEV, NAT_PORTS, NEW_FLOWS, ORIGINS, SETTINGS, SOURCE_WINDOWS},
    parse::Packet,
};

/// How many ports of `udp_nat_ports` a new flow tries for a free one; only when
/// all of them are held is the pool taken to be running out and one reclaimed.
const NAT_PORT_PROBES: u32 = 8;

/// Length of a per-source new-flow window.
const SOURCE_WINDOW_NS: u64 = 1_000_000_000;

/// Writes the client-side 4-tuple of `pkt` into `key`.
#[inline(always)]
pub fn stage_key(pkt: &Packet, key: &mut FlowKey) {
    key.client = pkt.src;
    key.edge = pkt.dst;
    key.client_port = pkt.sport;
    key.edge_port = pkt.dport;
}

/// The live flow for `key`, assured or new (its `admission` says which table).
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<*mut FlowState> {
    match FLOWS.get_ptr_mut(key) {
        Some(flow) => Some(flow),
        None => NEW_FLOWS.get_ptr_mut(key),
    }
}

/// The assured flow for `key`.
#[inline(always)]
pub fn lookup_assured(key: &FlowKey) -> Option<*mut FlowState> {
    FLOWS.get_ptr_mut(key)
}

/// The clock, read once per new flow (never per packet).
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Whether the client source of `pkt` (its /32, or /64 for IPv6) may open another
/// flow in this second under `udp_new_flows_per_source` (always, when 0). The
/// count is approximate across CPUs (a window reset may race an increment).
#[inline(always)]
pub fn within_source_limit(pkt: &Packet, now: u64) -> bool {
    let Some(settings) = SETTINGS.get(0) else {
        return true;
    };
    let limit = settings.new_flows_per_source as u64;
    if limit == 0 {
        return true;
    }
    let s = &pkt.src;
    let key: SourceKey = if pkt.family == 4 {
        [0xff, 0xff, 0xff, 0xff, s[12], s[13], s[14], s[15]]
    } else {
        [s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]
    };
    let Some(window) = SOURCE_WINDOWS.get_ptr_mut(&key) else {
        let fresh = SourceWindow {
            start_ns: now,
            count: 1,
        };
        let _ = SOURCE_WINDOWS.insert(&key, &fresh, 0);
        return true;
    };
    // SAFETY: a live map value.
    unsafe { admit_in_window(window, now, limit) }
}

/// Whether app `app` (`info`) may admit another new flow in this second under
/// `udp_new_flows_per_second` (always, when 0): a flood of new flows then costs
/// its origin at most that many, and its live flows nothing.
#[inline(always)]
pub fn within_app_limit(app: u32, info: &AppInfo, now: u64) -> bool {
    let limit = info.new_flows_per_second as u64;
    if limit == 0 {
        return true;
    }
    match APP_WINDOWS.get_ptr_mut(app) {
        // SAFETY: a live map value.
        Some(window) => unsafe { admit_in_window(window, now, limit) },
        None => true,
    }
}

/// Counts one new flow in `window` (a one-second window, restarted when over) and
/// says whether it is within `limit`. Approximate across CPUs: a restart may race
/// an increment.
#[inline(always)]
unsafe fn admit_in_window(window: *mut SourceWindow, now: u64, limit: u64) -> bool {
    // SAFETY: the caller passes a live map value; the count is shared by every CPU.
    unsafe {
        if now.wrapping_sub((*window).start_ns) >= SOURCE_WINDOW_NS {
            (*window).start_ns = now;
            (*window).count = 1;
            return true;
        }
        crate::udp::atomic_add(&raw mut (*window).count, 1);
        (*window).count <= limit
    }
}

/// Prepares the flow for `key` in `state` (app `app`, classified under
/// `generation` with access rule `rule`, first seen at `now`): picks its origin
/// from the app's origin table by a hash of the client address and port, and its local port (plain NAT and v2: a
/// port of `udp_nat_ports`, claimed now as pending; `nat` then names the claim and
/// `claim` holds its value). The flow enters `NEW_FLOWS` only once its first
/// datagram has left (`insert`). `None` when the app has no origin or no NAT port
/// could be had.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn prepare(
    ctx: &XdpContext,
    state: &mut FlowState,
    nat: &mut NatKey,
    claim: &mut NatClaim,
    key: &FlowKey,
    app: u32,
    info: &AppInfo,
    generation: u32,
    rule: u32,
    now: u64,
) -> Option<()> {
    if info.origin_count == 0 {
        return None;
    }
    let hash = flow_hash(key);
    let origin_index = info.origin_first + origin_offset(info, hash);
    let origin = ORIGINS.get(origin_index)?;
    let origin_port = origin.port_low + (key.edge_port - info.edge_port_low);
    let simple = info.proxy == ProxyMode::Simple.code();
    let local_port = if simple {
        // SPP replies carry the flow in their header: one local port serves all.
        key.edge_port
    } else {
        nat.local = origin.local;
        claim_nat_port(nat, claim, key, hash)?
    };
    state.first_seen_ns = now;
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
    state.admission = ADMISSION_NEW;
    state.to_client = RouteCache::default();
    Some(())
}

/// Inserts the prepared flow `state` into `NEW_FLOWS`, its first datagram having
/// left and being counted in it, and turns its pending NAT claim into a held one.
/// If another CPU created the flow meanwhile, theirs stays: the datagram is added
/// to its counters, and the NAT port this CPU claimed is given back if theirs is
/// another one.
#[inline(always)]
pub fn insert(key: &FlowKey, state: &FlowState, nat: &mut NatKey) {
    if NEW_FLOWS.insert(key, state, BPF_NOEXIST as u64).is_ok() {
        count_flow(FlowCounter::Admitted);
        if state.flags & FLOW_SPP == 0 {
            nat.local_port = state.local_port;
            if let Some(held) = NAT_PORTS.get_ptr_mut(&*nat) {
                // SAFETY: a live map value. Ours unless lost to a racing first
                // datagram of the same flow that failed (then the flow gets no
                // replies and ends idle).
                unsafe { compare_and_swap(&raw mut (*held).state, CLAIM_PENDING, CLAIM_NEW) };
            }
        }
        return;
    }
    let Some(theirs) = lookup(key) else {
        return;
    };
    // SAFETY: a live map value; atomic adds and one field read.
    unsafe {
        crate::udp::atomic_add(&raw mut (*theirs).packets_in, state.packets_in);
        crate::udp::atomic_add(&raw mut (*theirs).bytes_in, state.bytes_in);
        if (*theirs).local_port != state.local_port {
            release_pending(key, nat, state);
        }
    }
}

/// Gives back what a prepared flow claimed (its NAT port) when its first datagram
/// did not leave: then there is no flow.
#[inline(always)]
pub fn abandon(key: &FlowKey, state: &FlowState, nat: &mut NatKey) {
    release_pending(key, nat, state);
}

/// Removes the live flow `key` because a reload gave its port to another app or
/// mode (`flow` is its value; `nat.local` must hold its origin's local address).
/// An assured flow's NAT port is released; a new flow's is left as an orphan,
/// which the next flow that probes it takes.
#[inline(always)]
pub fn remove(key: &FlowKey, nat: &mut NatKey, flow: *const FlowState) {
    // SAFETY: a live map value; plain reads.
    let (admission, flags, local_port) =
        unsafe { ((*flow).admission, (*flow).flags, (*flow).local_port) };
    if admission == ADMISSION_ASSURED {
        if flags & FLOW_SPP == 0 {
            nat.local_port = local_port;
            release_if(nat, key, CLAIM_ASSURED);
        }
        let _ = FLOWS.remove(key);
    } else if NEW_FLOWS.remove(key).is_ok() {
        count_flow(FlowCounter::Replaced);
    }
}

/// Promotes the new flow `flow` (of `key`), which the origin has answered, to
/// `FLOWS`; `buffer` is scratch room for the copy. Returns the flow to use from
/// now on: the assured copy, or `flow` itself when `FLOWS` is full (it stays new)
/// or another CPU is promoting it. `None` when the flow lost its NAT port to a
/// reclaim: it is removed and the datagram starts a new flow.
#[inline(always)]
pub fn promote(
    key: &FlowKey,
    flow: *mut FlowState,
    nat: &mut NatKey,
    buffer: &mut FlowState,
) -> Option<*mut FlowState> {
    // SAFETY: a live map value; plain reads, and a copy of the whole value.
    let (flags, local_port, origin_index) =
        unsafe { ((*flow).flags, (*flow).local_port, (*flow).origin) };
    let nat_held = flags & FLOW_SPP == 0;
    if nat_held {
        let Some(origin) = ORIGINS.get(origin_index) else {
            return Some(flow);
        };
        nat.local = origin.local;
        nat.local_port = local_port;
        nat._pad = 0;
        let held = NAT_PORTS.get_ptr_mut(&*nat);
        // SAFETY: a live map value; the owner is read, the state swapped.
        let ours = held.is_some_and(|h| unsafe { (*h).owner == *key });
        let swapped = match held {
            Some(h) if ours => unsafe {
                compare_and_swap(&raw mut (*h).state, CLAIM_NEW, CLAIM_ASSURED)
            },
            _ => false,
        };
        if !swapped {
            // SAFETY: as above.
            if ours && held.is_some_and(|h| unsafe { (*h).state } == CLAIM_ASSURED) {
                // Another CPU is promoting this flow right now.
                return Some(flow);
            }
            if NEW_FLOWS.remove(key).is_ok() {
                count_flow(FlowCounter::Reclaimed);
            }
            return None;
        }
    }
    // SAFETY: a live map value, copied whole.
    *buffer = unsafe { *flow };
    buffer.admission = ADMISSION_ASSURED;
    if FLOWS.insert(key, &*buffer, BPF_NOEXIST as u64).is_err() {
        if let Some(theirs) = FLOWS.get_ptr_mut(key) {
            return Some(theirs);
        }
        // `FLOWS` is full: the flow stays new, its port reclaimable again.
        count_flow(FlowCounter::AssuredFull);
        if nat_held && let Some(h) = NAT_PORTS.get_ptr_mut(&*nat) {
            // SAFETY: a live map value we swapped to assured above.
            unsafe { compare_and_swap(&raw mut (*h).state, CLAIM_ASSURED, CLAIM_NEW) };
        }
        return Some(flow);
    }
    let _ = NEW_FLOWS.remove(key);
    count_flow(FlowCounter::Promoted);
    FLOWS.get_ptr_mut(key)
}

/// Gives back a pending claim a prepared flow made, if it is still that.
#[inline(always)]
fn release_pending(key: &FlowKey, nat: &mut NatKey, state: &FlowState) {
    if state.flags & FLOW_SPP == 0 {
        nat.local_port = state.local_port;
        release_if(nat, key, CLAIM_PENDING);
    }
}

/// Deletes the claim `nat` if `key` holds it in `state`.
#[inline(always)]
fn release_if(nat: &NatKey, key: &FlowKey, state: u64) {
    let Some(held) = NAT_PORTS.get_ptr_mut(nat) else {
        return;
    };
    // SAFETY: a live map value; plain reads.
    if unsafe { (*held).owner == *key && (*held).state == state } {
        let _ = NAT_PORTS.remove(nat);
    }
}

/// Finds a port of `udp_nat_ports` on `nat.local` for `key` and claims it as
/// pending: a free port (insert-if-absent), an orphaned one, or — when every
/// probed port is held — the port of a flow the origin never answered, whose flow
/// is then removed. `claim` is scratch room for the new claim's value.
#[inline(always)]
fn claim_nat_port(nat: &mut NatKey, claim: &mut NatClaim, key: &FlowKey, hash: u32) -> Option<u16> {
    let settings = SETTINGS.get(0)?;
    let low = settings.nat_port_low as u32;
    let span = (settings.nat_port_high as u32).checked_sub(low)? + 1;
    nat._pad = 0;
    claim.owner = *key;
    claim._pad = 0;
    claim.state = CLAIM_PENDING;
    // Reclaim candidates: the first port held by a flow the origin never answered,
    // and the first held by one it answered (taken only when there is no other).
    let mut unanswered: u32 = 0;
    let mut answered: u32 = 0;
    for probe in 0..NAT_PORT_PROBES {
        // Spread probes over the range (a large odd step visits distinct ports).
        let port = low + (hash.wrapping_add(probe.wrapping_mul(40_503))) % span;
        nat.local_port = port as u16;
        if NAT_PORTS.insert(&*nat, &*claim, BPF_NOEXIST as u64).is_ok() {
            return Some(port as u16);
        }
        let Some(held) = NAT_PORTS.get_ptr_mut(&*nat) else {
            continue;
        };
        // SAFETY: a live map value; plain reads, and a swap of its state.
        unsafe {
            // Ours already (a racing first datagram of the same flow)? Then share it.
            if (*held).owner == *key {
                return Some(port as u16);
            }
            if (*held).state != CLAIM_NEW {
                continue;
            }
            match holder_admission(&(*held).owner, port as u16) {
                // Orphaned: its flow was evicted or ended. Free for the taking.
                None => {
                    if take_over(held, key) {
                        return Some(port as u16);
                    }
                }
                Some(ADMISSION_NEW) if unanswered == 0 => unanswered = port,
                Some(_) if answered == 0 => answered = port,
                Some(_) => {}
            }
        }
    }
    let victim = if unanswered != 0 {
        unanswered
    } else {
        answered
    };
    if victim == 0 {
        return None;
    }
    nat.local_port = victim as u16;
    let held = NAT_PORTS.get_ptr_mut(&*nat)?;
    // SAFETY: a live map value. The victim goes before its port changes hands, so
    // none of its datagrams leaves from a port that is no longer its own.
    unsafe {
        if NEW_FLOWS.remove(&(*held).owner).is_ok() {
            count_flow(FlowCounter::Reclaimed);
        }
        take_over(held, key).then_some(victim as u16)
    }
}

/// The admission state of the new flow `owner` if it is live and holds `port`;
/// `None` when the claim is an orphan. (A claim in state `CLAIM_NEW` never belongs
/// to an assured flow: promotion makes the claim assured before the flow enters
/// `FLOWS`.)
#[inline(always)]
fn holder_admission(owner: &FlowKey, port: u16) -> Option<u32> {
    let flow = NEW_FLOWS.get_ptr_mut(owner)?;
    // SAFETY: plain reads of a live map value.
    unsafe { ((*flow).local_port == port).then_some((*flow).admission) }
}

/// Takes the reclaimable claim `held` for `key` (pending), if no other CPU does
/// first.
#[inline(always)]
unsafe fn take_over(held: *mut NatClaim, key: &FlowKey) -> bool {
    // SAFETY: the caller passes a live map value.
    unsafe {
        if !compare_and_swap(&raw mut (*held).state, CLAIM_NEW, CLAIM_PENDING) {
            return false;
        }
        (*held).owner = *key;
    }
    true
}

/// Atomically replaces `*dst` by `new` if it is `old`; whether it did.
#[inline(always)]
unsafe fn compare_and_swap(dst: *mut u64, old: u64, new: u64) -> bool {
    use core::intrinsics::AtomicOrdering::SeqCst;
    // SAFETY: the caller passes a pointer into a live map value.
    unsafe { core::intrinsics::atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(dst, old, new).1 }
}

/// The flow's hash (forwarder-common's `flow_hash`): stable for its life.
#[inline(always)]
fn flow_hash(key: &FlowKey) -> u32 {
    forwarder_common::flow_hash(&key.client, key.client_port)
}

/// The offset among `info`'s origins that the app's origin table (`MAGLEV`)
/// gives a flow of hash `hash`. An offset the table should never hold (outside the
/// app's origins) falls back to `hash % origin_count`.
#[inline(always)]
fn origin_offset(info: &AppInfo, hash: u32) -> u32 {
    let count = info.origin_count as u32;
    if info.table_size == 0 {
        return 0;
    }
    let slot = info.table_first + hash % info.table_size;
    let offset = match MAGLEV.get(slot / MAGLEV_LANES) {
        Some(entry) => entry[(slot % MAGLEV_LANES) as usize & 3] as u32,
        None => count,
    };
    if offset < count { offset } else { hash % count }
}
