//! The forwarder's kernel side: the XDP datapath (`xdp_forwarder`), the sk_lookup
//! steering of TCP apps (`sk_lookup_steer`) and a trivial `xdp_pass` program (veth
//! peer stub and benchmark baseline).
#![no_std]
#![no_main]
// Atomic adds on shared map values: core's atomics lack fetch_add on the BPF target.
#![allow(internal_features)]
#![feature(core_intrinsics)]
// Map keys are passed by reference on purpose: by value they would be copied onto
// the 512-byte BPF stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod addr;
mod counters;
mod csum;
mod flow;
mod icmp;
mod maps;
mod parse;
mod policy;
mod rewrite;
mod route_cache;
mod scratch;
mod steer;
mod tcp_splice;
mod tcp_state;
mod udp;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use forwarder_common::{DIR_INGRESS, DropReason, PROTO_TCP, PROTO_UDP};

use crate::{
    counters::{count_app, count_interface, drop},
    parse::{Parsed, parse},
    policy::{Decision, decide_edge, edge_index, is_neighbour_discovery, udp_return_app},
    scratch::SCRATCH,
};

#[xdp]
pub fn xdp_forwarder(ctx: XdpContext) -> u32 {
    count_interface(&ctx);
    classify(&ctx)
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> u32 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's scratch slot; nothing else uses it while this program runs.
    let scratch = unsafe { &mut *scratch };
    match parse(ctx, &mut scratch.pkt) {
        Parsed::NotIp => return xdp_action::XDP_PASS,
        Parsed::Malformed => return drop(DropReason::Malformed),
        // Unparseable beyond the destination: drop only what is addressed to us.
        Parsed::MalformedTo => {
            return match edge_index(&scratch.pkt.dst) {
                Some(_) => drop(DropReason::Malformed),
                None => xdp_action::XDP_PASS,
            };
        }
        Parsed::Ip => {}
    }
    // Segments of spliced TCP connections first: they are translated whatever the
    // classifier would say (their sockets are gone; see tcp_splice).
    let pkt = &scratch.pkt;
    if pkt.proto == PROTO_TCP
        && !pkt.fragment
        && pkt.vlan_tags == 0
        && let Some(verdict) = tcp_splice::established(ctx, scratch)
    {
        return verdict;
    }
    // Datagrams of live flows first: one flow lookup instead of the classifier's.
    let pkt = &scratch.pkt;
    if pkt.proto == PROTO_UDP
        && !pkt.fragment
        && pkt.vlan_tags == 0
        && let Some(verdict) = udp::established(ctx, scratch)
    {
        return verdict;
    }
    let pkt = &scratch.pkt;
    if is_neighbour_discovery(pkt) {
        return xdp_action::XDP_PASS;
    }
    let Some(edge) = edge_index(&pkt.dst) else {
        // Replies of UDP flows may come to an address that is not an edge address
        // (the agent's origin-side address): recognised here (SPEC §3 step 2).
        if let Some(app) = udp_return_app(pkt) {
            return udp::to_client(ctx, scratch, app);
        }
        return xdp_action::XDP_PASS;
    };
    match decide_edge(pkt, edge) {
        Decision::Pass => xdp_action::XDP_PASS,
        // A segment of a connection opened before a reload removed its app or
        // origin keeps going to the kernel until the connection ends.
        Decision::Drop(DropReason::NoApp)
            if pkt.proto == PROTO_TCP
                && tcp_state::belongs_to_connection(ctx, pkt, &mut scratch.tuple) =>
        {
            xdp_action::XDP_PASS
        }
        Decision::Drop(reason) => drop(reason),
        Decision::TcpApp { app } => {
            count_app(app, DIR_INGRESS, 0);
            xdp_action::XDP_PASS
        }
        Decision::UdpApp { app, info, rule } => udp::to_origin(ctx, scratch, app, &info, rule),
        Decision::UdpReturn { app } => udp::to_client(ctx, scratch, app),
    }
}

/// Trivial program: the lab's stub on veth peers and the benchmarks' baseline.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
