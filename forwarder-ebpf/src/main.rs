//! The forwarder's kernel side: the XDP datapath (`xdp_forwarder`), the sk_lookup
//! steering of TCP apps (`sk_lookup_steer`) and a trivial `xdp_pass` program (veth
//! peer stub and benchmark baseline).
#![no_std]
#![no_main]

mod counters;
mod maps;
mod parse;
mod policy;
mod steer;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use forwarder_common::{DIR_INGRESS, DropReason};

use crate::{
    counters::{count_app, count_interface, drop},
    parse::{Parsed, parse},
    policy::{Decision, decide_edge, edge_index, is_neighbour_discovery},
};

#[xdp]
pub fn xdp_forwarder(ctx: XdpContext) -> u32 {
    count_interface(&ctx);
    classify(&ctx)
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> u32 {
    let pkt = match parse(ctx) {
        Parsed::NotIp => return xdp_action::XDP_PASS,
        Parsed::Malformed { dst: None } => return drop(DropReason::Malformed),
        // Unparseable beyond the destination: drop only what is addressed to us.
        Parsed::Malformed { dst: Some(dst) } => {
            return match edge_index(&dst) {
                Some(_) => drop(DropReason::Malformed),
                None => xdp_action::XDP_PASS,
            };
        }
        Parsed::Ip(pkt) => pkt,
    };
    if is_neighbour_discovery(&pkt) {
        return xdp_action::XDP_PASS;
    }
    let Some(edge) = edge_index(&pkt.dst) else {
        return xdp_action::XDP_PASS;
    };
    match decide_edge(&pkt, edge) {
        Decision::Pass => xdp_action::XDP_PASS,
        Decision::Drop(reason) => drop(reason),
        Decision::TcpApp { app } => {
            count_app(app, DIR_INGRESS, 0);
            xdp_action::XDP_PASS
        }
        // The UDP fast path is not wired in yet: hand datagrams to the kernel.
        Decision::UdpApp { app, .. } => {
            count_app(app, DIR_INGRESS, 0);
            xdp_action::XDP_PASS
        }
        Decision::UdpReturn { .. } => xdp_action::XDP_PASS,
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
