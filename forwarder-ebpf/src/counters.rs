//! Per-CPU counters: no atomics needed, the agent sums the CPUs at read time.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use forwarder_common::{Counters, DropReason, FlowCounter};

use crate::maps::{APP_STATS, DROPS, FLOW_COUNTERS, IFACE_STATS, RULE_HITS};

/// Counts a drop and returns the verdict, so call sites read `return drop(reason)`.
#[inline(always)]
pub fn drop(reason: DropReason) -> u32 {
    count_drop(reason);
    xdp_action::XDP_DROP
}

/// Counts a dropped datagram whose frame is reused (an ICMP error goes back in it).
#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(c) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

/// Counts a flow admission event.
#[inline(always)]
pub fn count_flow(event: FlowCounter) {
    if let Some(c) = FLOW_COUNTERS.get_ptr_mut(event as u32) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count_app(app: u32, direction: u32, bytes: u64) {
    if let Some(c) = APP_STATS.get_ptr_mut(app.wrapping_mul(2).wrapping_add(direction)) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_rule_hit(rule: u32) {
    if let Some(c) = RULE_HITS.get_ptr_mut(rule) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

/// Counts the frame against its ingress interface.
#[inline(always)]
pub fn count_interface(ctx: &XdpContext) {
    let ifindex = ctx.ingress_ifindex() as u32;
    if let Some(c) = IFACE_STATS.get_ptr_mut(ifindex) {
        let len = (ctx.data_end() - ctx.data()) as u64;
        // SAFETY: per-CPU value.
        unsafe {
            let c: *mut Counters = c;
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}
