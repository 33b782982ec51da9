//! TCP splicing (docs/tcp.md, "XDP splice"): a segment of a connection the agent has
//! handed over (`SPLICES` has an entry for its 4-tuple) is translated onto the other
//! leg and sent from here. Addresses and ports are replaced; sequence and
//! acknowledgement numbers, SACK edges and timestamp values move by the entry's
//! fixed offsets; the window is rescaled between the legs' window-scale factors;
//! the TCP checksum is carried over incrementally (the payload is never read) and
//! the IPv4 header checksum is recomputed. The end hosts do congestion control and
//! retransmission end to end: nothing is buffered or answered here.
//!
//! A segment of a spliced connection is never passed to the kernel: its sockets are
//! gone, so the kernel would answer with an RST. What cannot be translated (IP
//! options, extension headers, a bad data offset, options in another layout than
//! `rewrite_options` walks, no route) is dropped and counted
//! (`SpliceCounter::Dropped`).

use aya_ebpf::programs::XdpContext;
use forwarder_common::{
    DIR_EGRESS, DIR_INGRESS, HINT_SPLICE, PROTO_TCP, SEEN_FIN, SEEN_RST, SPLICE_HOLD, SPLICE_SACK,
    SPLICE_TIMESTAMPS, SPLICE_TO_ORIGIN, SpliceCounter, SpliceEntry, SpliceKey,
};

use crate::{
    addr,
    counters::count_app,
    csum,
    maps::{SPLICE_COUNTERS, SPLICES},
    parse::{ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, ptr_at, ptr_at_mut},
    policy::port_hints,
    route_cache::{self, Query},
    scratch::Scratch,
    udp::{atomic_add, transmit},
};

/// Hop limit of translated segments: the forwarder is the segments' sender on each
/// leg, as it was while the sockets lived.
const TTL: u8 = 64;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Most SACK blocks an option holds.
const MAX_SACK_BLOCKS: usize = 4;

/// A segment (untagged, not a fragment) on a port of an app with
/// `tcp_fastpath = "xdp"`: translated and sent if its 4-tuple is spliced. `None`:
/// not spliced, the classifier decides as for any TCP segment.
#[inline(always)]
pub fn established(ctx: &XdpContext, s: &mut Scratch) -> Option<u32> {
    let pkt = &s.pkt;
    if port_hints(PROTO_TCP, pkt.dport) & HINT_SPLICE == 0
        && port_hints(PROTO_TCP, pkt.sport) & HINT_SPLICE == 0
    {
        return None;
    }
    let key = &mut s.splice;
    key.src = pkt.src;
    key.dst = pkt.dst;
    key.sport = pkt.sport;
    key.dport = pkt.dport;
    let entry = SPLICES.get_ptr_mut(key)?;
    // SAFETY: a live map value; `flags` is written by the agent only.
    if unsafe { (*entry).flags } & SPLICE_HOLD != 0 {
        return held(ctx, s);
    }
    Some(match translate(ctx, s, entry) {
        Some(verdict) => verdict,
        None => {
            count(SpliceCounter::Dropped);
            aya_ebpf::bindings::xdp_action::XDP_DROP
        }
    })
}

/// A segment of a held connection (`SPLICE_HOLD`): dropped when it carries data,
/// SYN or FIN (the sender retransmits it); `None` for a pure ACK or an RST, which
/// the classifier passes to the socket as for any established connection (and
/// for what cannot be parsed here: the socket still owns the connection).
#[inline(always)]
fn held(ctx: &XdpContext, s: &Scratch) -> Option<u32> {
    let pkt = &s.pkt;
    let l4 = pkt.l4 & 0xfff;
    let l3_len = l3_length(ctx, pkt.family)? as usize;
    let ip_len = l4.checked_sub(ETH_HLEN)?;
    let h = ptr_at::<[u8; 14]>(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &*h };
    let header_len = ((h[12] >> 4) as usize) * 4;
    let tcp_flags = h[13];
    let carries = l3_len > ip_len + header_len || tcp_flags & (TCP_SYN | TCP_FIN) != 0;
    if !carries || tcp_flags & TCP_RST != 0 {
        return None;
    }
    count(SpliceCounter::Held);
    Some(aya_ebpf::bindings::xdp_action::XDP_DROP)
}

#[inline(always)]
fn count(counter: SpliceCounter) {
    if let Some(c) = SPLICE_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

/// What the translation of one segment needs from its entry, read once.
struct Translation {
    family: u8,
    flags: u8,
    wscale_in: u8,
    wscale_out: u8,
    seq_delta: u32,
    ack_delta: u32,
    sport: u16,
    dport: u16,
}

/// Translates the segment in `s.pkt` by `entry` and returns the verdict that sends
/// it; `None`: dropped (the caller counts it).
#[inline(always)]
fn translate(ctx: &XdpContext, s: &mut Scratch, entry: *mut SpliceEntry) -> Option<u32> {
    // SAFETY: a live map value; plain reads of fields the agent wrote once.
    let t = unsafe {
        Translation {
            family: (*entry).family,
            flags: (*entry).flags,
            wscale_in: (*entry).wscale_in,
            wscale_out: (*entry).wscale_out,
            seq_delta: (*entry).seq_delta,
            ack_delta: (*entry).ack_delta,
            sport: (*entry).sport,
            dport: (*entry).dport,
        }
    };
    let pkt = &s.pkt;
    // Both legs are of the segment's family (eligibility); no IPv4 options and no
    // IPv6 extension headers: the TCP header sits right after a fixed IP header.
    if t.family != pkt.family {
        return None;
    }
    let l4 = if pkt.family == 4 {
        ETH_HLEN + 20
    } else {
        ETH_HLEN + 40
    };
    if pkt.l4 != l4 {
        return None;
    }
    let l3_len = l3_length(ctx, pkt.family)?;
    let ip_len = l4 - ETH_HLEN;
    if (l3_len as usize) < ip_len + 20 {
        return None;
    }
    let tcp_len = l3_len as usize - ip_len;
    let h = ptr_at::<[u8; 20]>(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &*h };
    let header_len = ((h[12] >> 4) as usize) * 4;
    let tcp_flags = h[13];
    if header_len < 20 || header_len > tcp_len {
        return None;
    }
    let payload = (tcp_len - header_len) as u64;

    // A same-host sender may leave only the pseudo-header sum in the field
    // (`CHECKSUM_PARTIAL`); it must be whole before it is carried over, as the
    // receiver of a redirected frame verifies it.
    let old_csum = u16::from_be_bytes([h[16], h[17]]);
    let pseudo =
        csum::transport_pseudo_header(PROTO_TCP, pkt.family, &pkt.src, &pkt.dst, tcp_len as u16);
    let old_csum = if csum::is_partial(old_csum, pseudo) {
        if !csum::complete_partial(ctx.ctx, l4, tcp_len, 16) {
            return None;
        }
        crate::parse::read_be16(ctx, l4 + 16)?
    } else {
        old_csum
    };

    // The route first: a segment that cannot leave changes nothing.
    // SAFETY: `entry` is a live map value; its addresses are not written after
    // the agent inserted it.
    let (src, dst, route, ifindex, app) = unsafe {
        (
            &(*entry).src,
            &(*entry).dst,
            &raw mut (*entry).route,
            (*entry).ifindex,
            (*entry).app,
        )
    };
    let query = Query {
        family: t.family,
        src,
        dst,
        sport: t.sport,
        dport: t.dport,
        ifindex,
        l3_len,
    };
    let epoch = route_cache::current_epoch();
    // SAFETY: `route` is inside a live map value.
    unsafe { route_cache::resolve(ctx, &mut s.fib, route, epoch, &query) }.ok()?;

    let mut sums = Sums::default();
    rewrite_ports_seq_window(ctx, l4, tcp_flags, &t, &mut sums)?;
    let opt_len = header_len - 20;
    if opt_len > 0 {
        rewrite_options(ctx, l4, opt_len, t.flags, t.ack_delta, entry, &mut sums)?;
    }
    let be = (!old_csum) as u64 + csum::negate(sums.sub) + sums.add;
    let native = csum::negate(csum::native_addrs(pkt.family, &pkt.src, &pkt.dst))
        + csum::native_addrs(t.family, src, dst);
    let new_csum = csum::finish(csum::combine(be, native));
    let field = ptr_at_mut::<[u8; 2]>(ctx, l4 + 16)?;
    // SAFETY: bounds checked by ptr_at_mut; packet memory is ours.
    unsafe { *field = new_csum.to_be_bytes() };

    // SAFETY: as above.
    let route = unsafe { &*route };
    write_l2_l3(ctx, t.family, src, dst, route)?;

    // SAFETY: atomic adds on the shared map value; `seen` is a byte of its own
    // that only the program writes, and every CPU that sees a FIN or RST sets the
    // same bit (a lost race loses a bit another segment of the same kind sets).
    unsafe {
        atomic_add(&raw mut (*entry).packets, 1);
        atomic_add(&raw mut (*entry).bytes, payload);
        let seen = (*entry).seen;
        let now =
            seen | if tcp_flags & TCP_FIN != 0 {
                SEEN_FIN
            } else {
                0
            } | if tcp_flags & TCP_RST != 0 {
                SEEN_RST
            } else {
                0
            };
        if now != seen {
            (*entry).seen = now;
        }
    }
    let direction = if t.flags & SPLICE_TO_ORIGIN != 0 {
        DIR_INGRESS
    } else {
        DIR_EGRESS
    };
    count_app(app, direction, payload);
    count(SpliceCounter::Translated);
    Some(transmit(ctx, route.ifindex))
}

/// The IP packet's length from its header (IPv4 total length, IPv6 payload length
/// plus the fixed header), checked against the frame.
#[inline(always)]
fn l3_length(ctx: &XdpContext, family: u8) -> Option<u16> {
    let len = if family == 4 {
        crate::parse::read_be16(ctx, ETH_HLEN + 2)?
    } else {
        crate::parse::read_be16(ctx, ETH_HLEN + 4)?.checked_add(40)?
    };
    let frame = ctx.data_end() - ctx.data();
    if ETH_HLEN + len as usize > frame {
        return None;
    }
    Some(len)
}

/// Checksum bookkeeping of the header rewrite: the big-endian words removed and
/// added (every rewritten field sits at an even offset of the segment).
#[derive(Default)]
struct Sums {
    sub: u64,
    add: u64,
}

/// Replaces ports, sequence and acknowledgement numbers and the window in the
/// fixed TCP header at `l4`.
#[inline(always)]
fn rewrite_ports_seq_window(
    ctx: &XdpContext,
    l4: usize,
    tcp_flags: u8,
    t: &Translation,
    sums: &mut Sums,
) -> Option<()> {
    let h = ptr_at_mut::<[u8; 16]>(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at_mut; packet memory is ours.
    let h = unsafe { &mut *h };
    let old_sport = u16::from_be_bytes([h[0], h[1]]);
    let old_dport = u16::from_be_bytes([h[2], h[3]]);
    h[0..2].copy_from_slice(&t.sport.to_be_bytes());
    h[2..4].copy_from_slice(&t.dport.to_be_bytes());
    sums.sub += old_sport as u64 + old_dport as u64;
    sums.add += t.sport as u64 + t.dport as u64;

    let (sub, add) = shift_u32(h, 4, t.seq_delta);
    sums.sub += sub;
    sums.add += add;
    // Without ACK the field means nothing and is left as sent.
    if tcp_flags & TCP_ACK != 0 {
        let (sub, add) = shift_u32(h, 8, t.ack_delta);
        sums.sub += sub;
        sums.add += add;
    }

    let old_window = u16::from_be_bytes([h[14], h[15]]);
    let window = rescale_window(old_window, t.wscale_in, t.wscale_out);
    h[14..16].copy_from_slice(&window.to_be_bytes());
    sums.sub += old_window as u64;
    sums.add += window as u64;
    Some(())
}

/// The window field `window` (scaled by `2^wscale_in`) as the receiver on the
/// other leg reads it (scaled by `2^wscale_out`), rounded down and capped at the
/// largest field value.
#[inline(always)]
pub fn rescale_window(window: u16, wscale_in: u8, wscale_out: u8) -> u16 {
    let bytes = (window as u64) << (wscale_in & 15);
    let scaled = bytes >> (wscale_out & 15);
    if scaled > 0xffff {
        0xffff
    } else {
        scaled as u16
    }
}

/// Adds `delta` to the big-endian u32 at `at` of `h` (word-aligned in the
/// segment); returns the checksum words removed and added.
#[inline(always)]
fn shift_u32<const N: usize>(h: &mut [u8; N], at: usize, delta: u32) -> (u64, u64) {
    let old = u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let new = old.wrapping_add(delta);
    h[at..at + 4].copy_from_slice(&new.to_be_bytes());
    (word_sum(old), word_sum(new))
}

#[inline(always)]
fn word_sum(v: u32) -> u64 {
    (v >> 16) as u64 + (v & 0xffff) as u64
}

/// The option bytes of the layout RFC 7323 Appendix A recommends and Linux, the
/// BSDs and Windows send on established connections: NOP, NOP, timestamps (TSval
/// at option offset 4, TSecr at 8) ...
const TIMESTAMPS_LAYOUT: [u8; 4] = [1, 1, 8, 10];
const TIMESTAMPS_LAYOUT_LEN: usize = 12;
/// ... then NOP, NOP, SACK (kind 5, its length, then 1–4 blocks of two edges).
const SACK_LAYOUT: [u8; 3] = [1, 1, 5];

/// Rewrites the TCP options at `l4 + 20` (`opt_len` bytes): TSval and TSecr of the
/// timestamp option (learning the TSval offset on the first one, see
/// `SpliceEntry`), both edges of every SACK block.
///
/// Only the aligned layout is walked: `[NOP NOP TS] [NOP NOP SACK]`, each present
/// or not (an option parser walking any layout multiplies the verifier's paths
/// past its limit). Anything else (another order, other options, padding) is
/// refused: passing it on untranslated would hand the receiver wrong timestamps
/// or SACK edges. Every rewritten field is then at an even offset of the segment.
#[inline(always)]
fn rewrite_options(
    ctx: &XdpContext,
    l4: usize,
    opt_len: usize,
    flags: u8,
    ack_delta: u32,
    entry: *mut SpliceEntry,
    sums: &mut Sums,
) -> Option<()> {
    let opts = l4 + 20;
    let mut used = 0usize;
    if flags & SPLICE_TIMESTAMPS != 0 && opt_len >= TIMESTAMPS_LAYOUT_LEN {
        let o = ptr_at_mut::<[u8; TIMESTAMPS_LAYOUT_LEN]>(ctx, opts)?;
        // SAFETY: bounds checked by ptr_at_mut; packet memory is ours.
        let o = unsafe { &mut *o };
        if o[0..4] == TIMESTAMPS_LAYOUT {
            let tsval = u32::from_be_bytes([o[4], o[5], o[6], o[7]]);
            let tsval_delta = timestamp_offset(entry, tsval);
            // SAFETY: a live map value; the other entry may have just written it.
            let tsecr_delta = unsafe { (*entry).tsecr_delta };
            book(sums, shift_u32(o, 4, tsval_delta));
            book(sums, shift_u32(o, 8, tsecr_delta));
            used = TIMESTAMPS_LAYOUT_LEN;
        }
    }
    if flags & SPLICE_SACK != 0 && opt_len >= used + 4 {
        let at = (opts + used) & 0xff;
        let h = ptr_at::<[u8; 4]>(ctx, at)?;
        // SAFETY: bounds checked by ptr_at.
        let h = unsafe { *h };
        let len = h[3] as usize;
        let blocks = len.wrapping_sub(2) / 8;
        if h[0..3] == SACK_LAYOUT
            && len >= 10
            && (len - 2).is_multiple_of(8)
            && blocks <= MAX_SACK_BLOCKS
            && used + 2 + len <= opt_len
        {
            rewrite_sack(ctx, at + 4, blocks, ack_delta, sums)?;
            used += 2 + len;
        }
    }
    if used != opt_len {
        return None;
    }
    Some(())
}

/// Moves both edges of `blocks` SACK blocks (1–4) at `at` by `ack_delta`.
#[inline(always)]
fn rewrite_sack(
    ctx: &XdpContext,
    at: usize,
    blocks: usize,
    ack_delta: u32,
    sums: &mut Sums,
) -> Option<()> {
    let b = ptr_at_mut::<[u8; 8]>(ctx, at & 0xff)?;
    // SAFETY: bounds checked by ptr_at_mut; packet memory is ours.
    let b = unsafe { &mut *b };
    book(sums, shift_u32(b, 0, ack_delta));
    book(sums, shift_u32(b, 4, ack_delta));
    if blocks >= 2 {
        rewrite_sack_block(ctx, at + 8, ack_delta, sums)?;
    }
    if blocks >= 3 {
        rewrite_sack_block(ctx, at + 16, ack_delta, sums)?;
    }
    if blocks >= 4 {
        rewrite_sack_block(ctx, at + 24, ack_delta, sums)?;
    }
    Some(())
}

#[inline(always)]
fn rewrite_sack_block(ctx: &XdpContext, at: usize, ack_delta: u32, sums: &mut Sums) -> Option<()> {
    let b = ptr_at_mut::<[u8; 8]>(ctx, at & 0xff)?;
    // SAFETY: bounds checked by ptr_at_mut; packet memory is ours.
    let b = unsafe { &mut *b };
    book(sums, shift_u32(b, 0, ack_delta));
    book(sums, shift_u32(b, 4, ack_delta));
    Some(())
}

#[inline(always)]
fn book(sums: &mut Sums, (sub, add): (u64, u64)) {
    sums.sub += sub;
    sums.add += add;
}

/// The TSval offset of `entry`, learnt from `tsval` (the first segment's) while
/// `ts_learn` is set: the segment then leaves with the base TSval, and the other
/// direction's entry maps echoes of it back (see `SpliceEntry`). Two CPUs learning
/// at once each write an offset from their own segment; the later one stands, off
/// by the few ticks between them.
#[inline(always)]
fn timestamp_offset(entry: *mut SpliceEntry, tsval: u32) -> u32 {
    // SAFETY: a live map value; plain reads and stores of the learning fields.
    unsafe {
        if (*entry).ts_learn == 0 {
            return (*entry).tsval_delta;
        }
        let delta = (*entry).tsval_delta.wrapping_sub(tsval);
        (*entry).tsval_delta = delta;
        (*entry).ts_learn = 0;
        learnt(entry, delta);
        delta
    }
}

/// Tells the other direction's entry the offset just learnt: echoes of the
/// translated TSval come back through it. A BPF subprogram: the rare path keeps
/// its key off the main program's stack.
#[inline(never)]
fn learnt(entry: *mut SpliceEntry, delta: u32) {
    // SAFETY: a live map value; plain reads.
    let reverse = unsafe {
        SpliceKey {
            // The other direction arrives as this one leaves.
            src: (*entry).dst,
            dst: (*entry).src,
            sport: (*entry).dport,
            dport: (*entry).sport,
        }
    };
    if let Some(other) = SPLICES.get_ptr_mut(&reverse) {
        // SAFETY: a live map value; a plain store of the field only this writes.
        unsafe { (*other).tsecr_delta = delta.wrapping_neg() };
    }
}

/// Writes the Ethernet header for `route` and the IP addresses (and hop limit) of
/// the other leg; recomputes the IPv4 header checksum.
#[inline(always)]
fn write_l2_l3(
    ctx: &XdpContext,
    family: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    route: &forwarder_common::RouteCache,
) -> Option<()> {
    let eth = ptr_at_mut::<[u8; 14]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at_mut.
    let eth = unsafe { &mut *eth };
    eth[0..6].copy_from_slice(&route.dmac);
    eth[6..12].copy_from_slice(&route.smac);
    let ether_type = if family == 4 { ETH_P_IPV4 } else { ETH_P_IPV6 };
    eth[12..14].copy_from_slice(&ether_type.to_be_bytes());
    if family == 4 {
        let h = ptr_at_mut::<[u16; 10]>(ctx, ETH_HLEN)?;
        // SAFETY: bounds checked; packet data is 2-byte aligned (see rewrite.rs).
        let h = unsafe { &mut *h };
        let (src, dst) = (addr::u16s(src), addr::u16s(dst));
        h[6] = src[6];
        h[7] = src[7];
        h[8] = dst[6];
        h[9] = dst[7];
        // TTL in the high byte of word 4, protocol in the low one.
        h[4] = u16::to_be(((TTL as u16) << 8) | PROTO_TCP as u16);
        h[5] = 0;
        let sum = csum::native_words(h);
        h[5] = !csum::fold(sum);
    } else {
        let h = ptr_at_mut::<[u16; 20]>(ctx, ETH_HLEN)?;
        // SAFETY: as above.
        let h = unsafe { &mut *h };
        let (src, dst) = (addr::u16s(src), addr::u16s(dst));
        let mut i = 0;
        while i < 8 {
            h[4 + i] = src[i];
            h[12 + i] = dst[i];
            i += 1;
        }
        // Next header in the high byte of word 3, hop limit in the low one.
        h[3] = u16::to_be(((PROTO_TCP as u16) << 8) | TTL as u16);
    }
    Some(())
}
