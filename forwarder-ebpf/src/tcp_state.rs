//! Does the kernel hold a connection for this TCP segment? Used only for segments
//! that would otherwise be dropped as `no_app`: a connection the agent accepted (or
//! opened to an origin) before a reload removed its app (or origin) must keep
//! working until it ends, while a flood of stray ACKs to unconfigured ports still
//! dies here. SYNs never get this far: no app, no new connection.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_tuple},
    helpers::{bpf_sk_lookup_tcp, bpf_sk_release},
    programs::XdpContext,
};

use crate::{addr, parse::Packet};

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// `TCP_LISTEN` in the kernel's TCP state numbering.
const TCP_LISTEN: u32 = 10;

/// Whether `pkt` (TCP) belongs to a connection the kernel has a socket for.
/// `tuple` is scratch memory for the lookup key.
#[inline(always)]
pub fn belongs_to_connection(ctx: &XdpContext, pkt: &Packet, tuple: &mut bpf_sock_tuple) -> bool {
    // A connection attempt is not a connection.
    if pkt.tcp_flags & TCP_FLAG_SYN != 0 && pkt.tcp_flags & TCP_FLAG_ACK == 0 {
        return false;
    }
    let size = if pkt.family == 4 {
        tuple.__bindgen_anon_1.ipv4.saddr = addr::v4(&pkt.src);
        tuple.__bindgen_anon_1.ipv4.daddr = addr::v4(&pkt.dst);
        tuple.__bindgen_anon_1.ipv4.sport = pkt.sport.to_be();
        tuple.__bindgen_anon_1.ipv4.dport = pkt.dport.to_be();
        core::mem::size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    } else {
        tuple.__bindgen_anon_1.ipv6.saddr = *addr::u32s(&pkt.src);
        tuple.__bindgen_anon_1.ipv6.daddr = *addr::u32s(&pkt.dst);
        tuple.__bindgen_anon_1.ipv6.sport = pkt.sport.to_be();
        tuple.__bindgen_anon_1.ipv6.dport = pkt.dport.to_be();
        core::mem::size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    };
    // SAFETY: `tuple` is valid memory of `size` bytes; the returned reference is
    // released before returning.
    unsafe {
        let sk = bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return false;
        }
        // A listener matching the port is not a connection of this segment.
        let connected = (*sk).state != TCP_LISTEN;
        bpf_sk_release(sk as *mut _);
        connected
    }
}
