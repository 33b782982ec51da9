//! "Fragmentation needed" (ICMP type 3 code 4) and "packet too big" (ICMPv6 type 2)
//! back to a client whose datagram would exceed the path MTU towards the origin
//! once the proxy header is added: built in place from the client's frame and sent
//! back out of the interface it came in by (XDP_TX), rate-limited per CPU. The
//! datagram itself is still dropped and counted as `too_big`.
//!
//! The message quotes the client's IP header and the first 8 bytes after it (the
//! UDP header), which is what the client's stack needs to find its socket.

use aya_ebpf::{
    EbpfContext as _,
    bindings::xdp_action,
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    macros::map,
    maps::PerCpuArray,
    programs::XdpContext,
};

use crate::{
    csum,
    parse::{ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, Packet, ptr_at, ptr_at_mut},
};

/// Messages per second each CPU may send, and the burst it may save up.
const PER_SECOND: u64 = 100;
const BURST: u64 = 10;
const TTL: u8 = 64;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
/// Quoted bytes: the client's IPv4 header (no options) or IPv6 header, and 8 more.
const QUOTE_V4: usize = 20 + 8;
const QUOTE_V6: usize = 40 + 8;

/// A token bucket per CPU: `tokens` (scaled by 1e9) as of `at_ns`.
#[repr(C)]
pub struct Bucket {
    tokens: u64,
    at_ns: u64,
}

#[map]
static ICMP_BUCKET: PerCpuArray<Bucket> = PerCpuArray::with_max_entries(1, 0);

/// Takes a token; false when this CPU has sent its share lately.
#[inline(always)]
fn allowed() -> bool {
    let Some(b) = ICMP_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions (this path is rare).
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's slot.
    let b = unsafe { &mut *b };
    let elapsed = now.saturating_sub(b.at_ns).min(BURST * 1_000_000_000);
    let tokens = (b.tokens + elapsed * PER_SECOND).min(BURST * 1_000_000_000);
    b.at_ns = now;
    if tokens < 1_000_000_000 {
        b.tokens = tokens;
        return false;
    }
    b.tokens = tokens - 1_000_000_000;
    true
}

/// Turns the client's frame into the ICMP message telling it that datagrams of at
/// most `usable` bytes (L3) get through, and returns XDP_TX; or returns None (the
/// caller drops the datagram) when the rate limit says no, the frame is tagged or
/// carries IPv4 options, or the helpers refuse.
#[inline(always)]
pub fn too_big(ctx: &XdpContext, pkt: &Packet, usable: u16) -> Option<u32> {
    let l3 = ETH_HLEN;
    let v4 = pkt.family == 4;
    // Only untagged frames reach the fast path; IPv4 options make the quote's
    // length variable: no message then.
    if pkt.vlan_tags != 0 || (v4 && pkt.l4 != l3 + 20) {
        return None;
    }
    if !allowed() {
        return None;
    }
    let (outer, quote) = if v4 { (20, QUOTE_V4) } else { (40, QUOTE_V6) };
    let macs = ptr_at::<[u8; 12]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at; copied before the bytes are overwritten.
    let macs = unsafe { *macs };
    // Room for the new Ethernet header, outer IP header and ICMP header in front of
    // the client's IP header, which stays where it is as the start of the quote.
    let grow = (outer + 8) as i32;
    // SAFETY: the helper checks the headroom.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -grow) } != 0 {
        return None;
    }
    let len = ctx.data_end() - ctx.data();
    let want = ETH_HLEN + outer + 8 + quote;
    if len < want {
        return None;
    }
    // SAFETY: the helper checks the new tail.
    if unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, -((len - want) as i32)) } != 0 {
        return None;
    }
    let icmp_len = (8 + quote) as u16;
    let eth = ptr_at_mut::<[u8; ETH_HLEN]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at_mut; packet memory, exclusively ours.
    let eth = unsafe { &mut *eth };
    eth[0..6].copy_from_slice(&macs[6..12]);
    eth[6..12].copy_from_slice(&macs[0..6]);
    let ether_type = if v4 { ETH_P_IPV4 } else { ETH_P_IPV6 };
    eth[12..14].copy_from_slice(&ether_type.to_be_bytes());
    let icmp_off = ETH_HLEN + outer;
    if v4 {
        let h = ptr_at_mut::<[u8; 20]>(ctx, ETH_HLEN)?;
        // SAFETY: as above.
        let h = unsafe { &mut *h };
        let total = 20 + icmp_len;
        h[0] = 0x45;
        h[1] = 0;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[4..8].copy_from_slice(&[0, 0, 0x40, 0]);
        h[8] = TTL;
        h[9] = PROTO_ICMP;
        h[10..12].copy_from_slice(&[0, 0]);
        // From the edge address the client wrote to, back to the client.
        h[12..16].copy_from_slice(&pkt.dst[12..16]);
        h[16..20].copy_from_slice(&pkt.src[12..16]);
        let c = csum::finish(csum::sum_words(h));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let m = ptr_at_mut::<[u8; 8 + QUOTE_V4]>(ctx, icmp_off)?;
        // SAFETY: as above.
        let m = unsafe { &mut *m };
        // Type 3 (destination unreachable), code 4 (fragmentation needed), unused,
        // next-hop MTU.
        m[0..8].copy_from_slice(&[3, 4, 0, 0, 0, 0, 0, 0]);
        m[6..8].copy_from_slice(&usable.to_be_bytes());
        let c = csum::finish(csum::sum_words(m));
        m[2..4].copy_from_slice(&c.to_be_bytes());
    } else {
        let h = ptr_at_mut::<[u8; 40]>(ctx, ETH_HLEN)?;
        // SAFETY: as above.
        let h = unsafe { &mut *h };
        h[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
        h[4..6].copy_from_slice(&icmp_len.to_be_bytes());
        h[6] = PROTO_ICMPV6;
        h[7] = TTL;
        h[8..24].copy_from_slice(&pkt.dst);
        h[24..40].copy_from_slice(&pkt.src);
        let m = ptr_at_mut::<[u8; 8 + QUOTE_V6]>(ctx, icmp_off)?;
        // SAFETY: as above.
        let m = unsafe { &mut *m };
        // Type 2 (packet too big), code 0, MTU (32 bits).
        m[0..8].copy_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
        m[6..8].copy_from_slice(&usable.to_be_bytes());
        let sum = csum::combine(0, csum::native_addrs(6, &pkt.dst, &pkt.src))
            + icmp_len as u64
            + PROTO_ICMPV6 as u64
            + csum::sum_words(m);
        m[2..4].copy_from_slice(&csum::finish(sum).to_be_bytes());
    }
    Some(xdp_action::XDP_TX)
}
