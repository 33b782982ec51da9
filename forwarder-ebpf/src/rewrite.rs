//! Rewriting a datagram in place: the old Ethernet/IP/UDP headers (and, on the way
//! back, the old SPP header) give way to new ones (and, on the way to the origin, a
//! new proxy header), the payload stays where it is, and the UDP checksum is
//! carried over incrementally from the sender's: complete and correct without
//! reading the payload. (A sender that left only the pseudo-header sum, a same-host
//! peer with checksum offload, has had its checksum completed before: see
//! `csum::complete_partial`.)

use aya_ebpf::{EbpfContext as _, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use forwarder_common::{
    DropReason, PROXY_V2_ADDR_LEN_V4, PROXY_V2_ADDR_LEN_V6, PROXY_V2_INET_DGRAM,
    PROXY_V2_INET6_DGRAM, PROXY_V2_LEN_V4, PROXY_V2_LEN_V6, PROXY_V2_SIGNATURE,
    PROXY_V2_VER_CMD_PROXY, SPP_CLIENT_ADDR, SPP_CLIENT_PORT, SPP_HEADER_LEN, SPP_MAGIC,
    SPP_PROXY_ADDR, SPP_PROXY_PORT,
};

use crate::{
    csum,
    parse::{ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, Packet, ptr_at, ptr_at_mut},
};

/// TTL / hop limit of datagrams the forwarder sends: it originates them, as a proxy.
const TTL: u8 = 64;

/// The header put in front of the payload towards the origin.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ProxyHeader {
    None,
    Spp,
    V2,
}

/// One rewrite: the new addresses and ports, what to strip, what to add.
pub struct Rewrite<'a> {
    pub family: u8,
    pub src: &'a [u8; 16],
    pub dst: &'a [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// Strip an SPP header from the front of the payload.
    pub strip_spp: bool,
    /// Header to add in front of the payload.
    pub add: ProxyHeader,
    /// For `add`: the client and edge the header names.
    pub client: &'a [u8; 16],
    pub edge: &'a [u8; 16],
    pub client_port: u16,
    pub edge_port: u16,
}

/// The datagram's sizes before and after the rewrite.
pub struct Sizes {
    old_len: u16,
    /// The sender's checksum (completed by `udp::established` if it was partial)
    /// and pseudo-header sum.
    old_csum: u16,
    old_pseudo: u64,
    /// Payload bytes (proxy headers excluded): what flows count.
    pub payload: u64,
    new_udp_len: u16,
    /// L3 length of the rewritten datagram: what the route's MTU must allow.
    pub l3_len: u16,
}

#[inline(always)]
pub fn proxy_header_len(add: ProxyHeader, family: u8) -> usize {
    match add {
        ProxyHeader::None => 0,
        ProxyHeader::Spp => SPP_HEADER_LEN,
        ProxyHeader::V2 if family == 4 => PROXY_V2_LEN_V4,
        ProxyHeader::V2 => PROXY_V2_LEN_V6,
    }
}

#[inline(always)]
fn ip_header_len(family: u8) -> usize {
    if family == 4 { 20 } else { 40 }
}

/// Reads the old UDP header and works out the new sizes.
#[inline(always)]
pub fn sizes(ctx: &XdpContext, pkt: &Packet, rw: &Rewrite) -> Result<Sizes, DropReason> {
    let l4 = pkt.l4 & 0xfff;
    let Some(old) = ptr_at::<[u8; 8]>(ctx, l4) else {
        return Err(DropReason::Malformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let old = unsafe { &*old };
    let old_len = u16::from_be_bytes([old[4], old[5]]);
    let old_csum = u16::from_be_bytes([old[6], old[7]]);
    // IPv6 forbids a zero UDP checksum; such a datagram is not ours to repair.
    if pkt.family == 6 && old_csum == 0 {
        return Err(DropReason::Malformed);
    }
    let old_pseudo = csum::pseudo_header(pkt.family, &pkt.src, &pkt.dst, old_len);
    let strip = if rw.strip_spp { SPP_HEADER_LEN } else { 0 };
    if (old_len as usize) < 8 + strip {
        return Err(DropReason::SppInvalid);
    }
    let payload = old_len as usize - 8 - strip;
    let new_udp_len = (8 + proxy_header_len(rw.add, rw.family) + payload) as u16;
    Ok(Sizes {
        old_len,
        old_csum,
        old_pseudo,
        payload: payload as u64,
        new_udp_len,
        l3_len: ip_header_len(rw.family) as u16 + new_udp_len,
    })
}

/// Rewrites the datagram in place, framed from `smac` to `dmac`. On error nothing
/// has been changed.
#[inline(always)]
pub fn apply(
    ctx: &XdpContext,
    pkt: &Packet,
    rw: &Rewrite,
    sz: &Sizes,
    dmac: &[u8; 6],
    smac: &[u8; 6],
) -> Result<(), DropReason> {
    let l4 = pkt.l4 & 0xfff;
    let strip = if rw.strip_spp { SPP_HEADER_LEN } else { 0 };
    // Sum of the stripped SPP header, read before the bytes go away.
    let mut strip_sum = 0u64;
    if rw.strip_spp {
        let Some(h) = ptr_at::<[u8; SPP_HEADER_LEN]>(ctx, l4 + 8) else {
            return Err(DropReason::SppInvalid);
        };
        // SAFETY: bounds checked by ptr_at.
        strip_sum = csum::sum_words(unsafe { &*h });
    }
    // An IPv4 sender that sent no checksum gets none added (RFC 768 allows it).
    let no_checksum = pkt.family == 4 && sz.old_csum == 0;
    let new_csum = if no_checksum {
        0
    } else {
        // Take the sender's, remove what changes, add what is new.
        let mut sum = (!sz.old_csum) as u64;
        sum += csum::negate(sz.old_pseudo);
        sum += csum::negate(pkt.sport as u64 + pkt.dport as u64 + sz.old_len as u64);
        sum += csum::negate(strip_sum);
        sum += csum::pseudo_header(rw.family, rw.src, rw.dst, sz.new_udp_len);
        sum += rw.sport as u64 + rw.dport as u64 + sz.new_udp_len as u64;
        sum += proxy_header_sum(rw);
        match csum::finish(sum) {
            0 => 0xffff,
            c => c,
        }
    };

    // Move the packet start so the payload stays where it is.
    let old_hdr = pkt.l4 + 8 + strip;
    let new_hdr = ETH_HLEN + ip_header_len(rw.family) + 8 + proxy_header_len(rw.add, rw.family);
    let delta = old_hdr as i32 - new_hdr as i32;
    // SAFETY: the helper checks the new head against the frame's headroom.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, delta) } != 0 {
        return Err(DropReason::TooBig);
    }
    write_headers(ctx, rw, dmac, smac, sz.new_udp_len, new_csum).ok_or(DropReason::Malformed)
}

/// Sum of the proxy header `rw.add` as it will be written.
#[inline(always)]
fn proxy_header_sum(rw: &Rewrite) -> u64 {
    match rw.add {
        ProxyHeader::None => 0,
        ProxyHeader::Spp => {
            SPP_MAGIC as u64
                + csum::sum_words(rw.client)
                + csum::sum_words(rw.edge)
                + rw.client_port as u64
                + rw.edge_port as u64
        }
        ProxyHeader::V2 => {
            let (fam, len, addrs) = if rw.family == 4 {
                (
                    PROXY_V2_INET_DGRAM,
                    PROXY_V2_ADDR_LEN_V4,
                    csum::sum_words(&[rw.client[12], rw.client[13], rw.client[14], rw.client[15]])
                        + csum::sum_words(&[rw.edge[12], rw.edge[13], rw.edge[14], rw.edge[15]]),
                )
            } else {
                (
                    PROXY_V2_INET6_DGRAM,
                    PROXY_V2_ADDR_LEN_V6,
                    csum::sum_words(rw.client) + csum::sum_words(rw.edge),
                )
            };
            csum::sum_words(&PROXY_V2_SIGNATURE)
                + (((PROXY_V2_VER_CMD_PROXY as u64) << 8) | fam as u64)
                + len as u64
                + addrs
                + rw.client_port as u64
                + rw.edge_port as u64
        }
    }
}

/// Writes Ethernet, IP, UDP and proxy headers at the (new) start of the frame,
/// straight into packet memory.
#[inline(always)]
fn write_headers(
    ctx: &XdpContext,
    rw: &Rewrite,
    dmac: &[u8; 6],
    smac: &[u8; 6],
    udp_len: u16,
    udp_csum: u16,
) -> Option<()> {
    // SAFETY: bounds checked by ptr_at_mut; packet memory, exclusively ours.
    let eth = unsafe { &mut *ptr_at_mut::<[u8; ETH_HLEN]>(ctx, 0)? };
    let ether_type = if rw.family == 4 {
        ETH_P_IPV4
    } else {
        ETH_P_IPV6
    };
    eth[0..6].copy_from_slice(dmac);
    eth[6..12].copy_from_slice(smac);
    eth[12..14].copy_from_slice(&ether_type.to_be_bytes());
    let l4 = if rw.family == 4 {
        // SAFETY: bounds checked by ptr_at_mut; packet memory, exclusively ours.
        let h = unsafe { &mut *ptr_at_mut::<[u8; 20]>(ctx, ETH_HLEN)? };
        h[0] = 0x45;
        h[1] = 0;
        h[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
        h[4] = 0;
        h[5] = 0;
        // DF: the forwarder never fragments (too-big datagrams are dropped).
        h[6] = 0x40;
        h[7] = 0;
        h[8] = TTL;
        h[9] = 17;
        h[12..16].copy_from_slice(&rw.src[12..16]);
        h[16..20].copy_from_slice(&rw.dst[12..16]);
        // The header checksum from what was just written (the field counts as 0).
        let sum = ((0x4500u64 + 20 + udp_len as u64) + 0x4000 + ((TTL as u64) << 8) + 17)
            + csum::sum_words(&[rw.src[12], rw.src[13], rw.src[14], rw.src[15]])
            + csum::sum_words(&[rw.dst[12], rw.dst[13], rw.dst[14], rw.dst[15]]);
        h[10..12].copy_from_slice(&csum::finish(sum).to_be_bytes());
        ETH_HLEN + 20
    } else {
        // SAFETY: bounds checked by ptr_at_mut; packet memory, exclusively ours.
        let h = unsafe { &mut *ptr_at_mut::<[u8; 40]>(ctx, ETH_HLEN)? };
        h[0] = 0x60;
        h[1] = 0;
        h[2] = 0;
        h[3] = 0;
        h[4..6].copy_from_slice(&udp_len.to_be_bytes());
        h[6] = 17;
        h[7] = TTL;
        h[8..24].copy_from_slice(rw.src);
        h[24..40].copy_from_slice(rw.dst);
        ETH_HLEN + 40
    };
    // SAFETY: bounds checked by ptr_at_mut; packet memory, exclusively ours.
    let u = unsafe { &mut *ptr_at_mut::<[u8; 8]>(ctx, l4)? };
    u[0..2].copy_from_slice(&rw.sport.to_be_bytes());
    u[2..4].copy_from_slice(&rw.dport.to_be_bytes());
    u[4..6].copy_from_slice(&udp_len.to_be_bytes());
    u[6..8].copy_from_slice(&udp_csum.to_be_bytes());
    match rw.add {
        ProxyHeader::None => {}
        ProxyHeader::Spp => {
            // SAFETY: bounds checked by ptr_at_mut; packet memory, exclusively ours.
            let h = unsafe { &mut *ptr_at_mut::<[u8; SPP_HEADER_LEN]>(ctx, l4 + 8)? };
            h[0..SPP_CLIENT_ADDR].copy_from_slice(&SPP_MAGIC.to_be_bytes());
            h[SPP_CLIENT_ADDR..SPP_PROXY_ADDR].copy_from_slice(rw.client);
            h[SPP_PROXY_ADDR..SPP_CLIENT_PORT].copy_from_slice(rw.edge);
            h[SPP_CLIENT_PORT..SPP_PROXY_PORT].copy_from_slice(&rw.client_port.to_be_bytes());
            h[SPP_PROXY_PORT..SPP_HEADER_LEN].copy_from_slice(&rw.edge_port.to_be_bytes());
        }
        ProxyHeader::V2 if rw.family == 4 => {
            // SAFETY: bounds checked by ptr_at_mut; packet memory, exclusively ours.
            let h = unsafe { &mut *ptr_at_mut::<[u8; PROXY_V2_LEN_V4]>(ctx, l4 + 8)? };
            h[0..12].copy_from_slice(&PROXY_V2_SIGNATURE);
            h[12] = PROXY_V2_VER_CMD_PROXY;
            h[13] = PROXY_V2_INET_DGRAM;
            h[14..16].copy_from_slice(&(PROXY_V2_ADDR_LEN_V4 as u16).to_be_bytes());
            h[16..20].copy_from_slice(&rw.client[12..16]);
            h[20..24].copy_from_slice(&rw.edge[12..16]);
            h[24..26].copy_from_slice(&rw.client_port.to_be_bytes());
            h[26..28].copy_from_slice(&rw.edge_port.to_be_bytes());
        }
        ProxyHeader::V2 => {
            // SAFETY: bounds checked by ptr_at_mut; packet memory, exclusively ours.
            let h = unsafe { &mut *ptr_at_mut::<[u8; PROXY_V2_LEN_V6]>(ctx, l4 + 8)? };
            h[0..12].copy_from_slice(&PROXY_V2_SIGNATURE);
            h[12] = PROXY_V2_VER_CMD_PROXY;
            h[13] = PROXY_V2_INET6_DGRAM;
            h[14..16].copy_from_slice(&(PROXY_V2_ADDR_LEN_V6 as u16).to_be_bytes());
            h[16..32].copy_from_slice(rw.client);
            h[32..48].copy_from_slice(rw.edge);
            h[48..50].copy_from_slice(&rw.client_port.to_be_bytes());
            h[50..52].copy_from_slice(&rw.edge_port.to_be_bytes());
        }
    }
    Some(())
}
