//! Bounds-checked packet access and header parsing into a `Packet` summary.
//!
//! Nothing here decides a verdict on its own except `Parsed::Malformed`: the policy
//! module turns the summary into one, in the order of SPEC §3.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use forwarder_common::{PROTO_TCP, PROTO_UDP};

use crate::addr;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
/// How many VLAN tags are looked through (802.1ad outer + 802.1Q inner).
const MAX_VLAN_TAGS: usize = 2;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
/// IPv6 extension headers walked before the chain counts as malformed.
pub const MAX_IPV6_EXT_HEADERS: usize = 4;
/// No transport header is looked for beyond this offset (the longest legal IPv6
/// chain we walk stays far below it).
const MAX_L4_OFFSET: usize = 4096;

/// A pointer to a `T` at `offset` from the start of the packet, or `None` when the
/// packet is too short. Every packet access goes through here or `ptr_at_mut`.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    ptr_at::<T>(ctx, offset).map(|p| p as *mut T)
}

/// Reads a big-endian u16.
#[inline(always)]
pub fn read_be16(ctx: &XdpContext, offset: usize) -> Option<u16> {
    // SAFETY: ptr_at checked both bytes are inside the packet; [u8; 2] has align 1.
    ptr_at::<[u8; 2]>(ctx, offset).map(|p| u16::from_be_bytes(unsafe { *p }))
}

/// Stores the IPv4 address at `offset` (inside the already bounds-checked header)
/// as IPv4-mapped IPv6, a 16-bit word at a time (packet data is 2-byte aligned).
#[inline(always)]
fn set_mapped(a: &mut [u8; 16], ctx: &XdpContext, offset: usize) {
    let w = addr::u16s_mut(a);
    let Some(p) = ptr_at::<[u16; 2]>(ctx, offset) else {
        return;
    };
    // SAFETY: bounds checked by ptr_at.
    let v4 = unsafe { *p };
    *w = [0, 0, 0, 0, 0, 0xffff, v4[0], v4[1]];
}

/// Stores the IPv6 address at `offset` (inside the already bounds-checked header).
#[inline(always)]
fn set_v6(a: &mut [u8; 16], ctx: &XdpContext, offset: usize) {
    let w = addr::u16s_mut(a);
    let Some(p) = ptr_at::<[u16; 8]>(ctx, offset) else {
        return;
    };
    // SAFETY: bounds checked by ptr_at.
    *w = unsafe { *p };
}

/// What the classifier needs to know about a frame.
/// Addresses first, at 8-byte offsets: copies of them are then word-wide.
#[repr(C)]
pub struct Packet {
    /// Offset of the transport header.
    pub l4: usize,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// 4 or 6.
    pub family: u8,
    /// Transport protocol (after IPv6 extension headers).
    pub proto: u8,
    /// Any fragment, first or not.
    pub fragment: bool,
    /// Source and destination port (TCP/UDP) in host order; ICMP: type and code.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// Number of VLAN tags in front of the IP header.
    pub vlan_tags: u8,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not IPv4/IPv6: none of our business.
    NotIp,
    /// IPv4/IPv6 whose headers cannot be trusted (truncated, bad IHL, bad lengths,
    /// extension header chain too long), destination unknown.
    Malformed,
    /// As `Malformed`, but `Packet::dst` could be read, so the policy can still pass
    /// traffic that is not for an edge address.
    MalformedTo,
    /// `Packet` is filled in.
    Ip,
}

/// Parses the frame into `pkt` (which lives in per-CPU scratch memory: the BPF
/// stack is too small for it and the rewrite state together).
#[inline(always)]
pub fn parse(ctx: &XdpContext, pkt: &mut Packet) -> Parsed {
    let Some(mut ether_type) = read_be16(ctx, 12) else {
        return Parsed::NotIp;
    };
    let mut l3 = ETH_HLEN;
    let mut vlan_tags = 0u8;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        // A VLAN tag: TCI (2 bytes) then the inner ether type.
        match read_be16(ctx, l3 + 2) {
            Some(inner) => ether_type = inner,
            None => return Parsed::NotIp,
        }
        l3 += 4;
        vlan_tags += 1;
    }
    match ether_type {
        ETH_P_IPV4 => parse_ipv4(ctx, pkt, l3, vlan_tags),
        ETH_P_IPV6 => parse_ipv6(ctx, pkt, l3, vlan_tags),
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, pkt: &mut Packet, l3: usize, vlan_tags: u8) -> Parsed {
    // The fixed 20-byte header must be there to read anything at all.
    let Some(hdr) = ptr_at::<[u8; 20]>(ctx, l3) else {
        return Parsed::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let hdr = unsafe { &*hdr };
    set_mapped(&mut pkt.dst, ctx, l3 + 16);
    let malformed = Parsed::MalformedTo;
    if hdr[0] >> 4 != 4 {
        return malformed;
    }
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes([hdr[2], hdr[3]]);
    let available = ctx.data_end() - ctx.data() - l3;
    if ihl < 20 || (tot_len as usize) < ihl || tot_len as usize > available {
        return malformed;
    }
    // Options (IHL > 5) must be fully present too.
    if ptr_at::<u8>(ctx, l3 + ihl - 1).is_none() {
        return malformed;
    }
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    // MF set or a non-zero offset: a fragment (the DF bit is not one).
    let fragment = frag & 0x3fff != 0;
    pkt.l4 = l3 + ihl;
    pkt.family = 4;
    pkt.proto = hdr[9];
    set_mapped(&mut pkt.src, ctx, l3 + 12);
    pkt.fragment = fragment;
    pkt.sport = 0;
    pkt.dport = 0;
    pkt.tcp_flags = 0;
    pkt.vlan_tags = vlan_tags;
    if fragment {
        return Parsed::Ip;
    }
    let l4_len = tot_len as usize - ihl;
    finish_l4(ctx, pkt, l4_len)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, pkt: &mut Packet, l3: usize, vlan_tags: u8) -> Parsed {
    let Some(hdr) = ptr_at::<[u8; 40]>(ctx, l3) else {
        return Parsed::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let hdr = unsafe { &*hdr };
    set_v6(&mut pkt.dst, ctx, l3 + 24);
    let malformed = Parsed::MalformedTo;
    if hdr[0] >> 4 != 6 {
        return malformed;
    }
    let payload_len = u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
    let available = ctx.data_end() - ctx.data() - l3 - 40;
    // Jumbograms (payload length 0 with a hop-by-hop option) are not supported.
    if payload_len > available {
        return malformed;
    }
    set_v6(&mut pkt.src, ctx, l3 + 8);
    let mut next = hdr[6];
    let mut off = l3 + 40;
    let mut fragment = false;
    let mut walked = 0usize;
    while walked < MAX_IPV6_EXT_HEADERS + 1 {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH | IPV6_FRAGMENT => {
                if walked == MAX_IPV6_EXT_HEADERS {
                    // One more extension header than we walk: refuse the chain.
                    return malformed;
                }
                // An explicit bound keeps the verifier's view of `off` small.
                if off > MAX_L4_OFFSET {
                    return malformed;
                }
                let Some(ext) = ptr_at::<[u8; 2]>(ctx, off) else {
                    return malformed;
                };
                // SAFETY: bounds checked by ptr_at.
                let [nh, len_field] = unsafe { *ext };
                let len = match next {
                    // Fragment header: fixed 8 bytes, the second byte is reserved.
                    IPV6_FRAGMENT => {
                        fragment = true;
                        8
                    }
                    // AH counts its length in 4-byte units, minus 2.
                    IPV6_AH => (len_field as usize + 2) * 4,
                    _ => (len_field as usize + 1) * 8,
                };
                off += len;
                if off - (l3 + 40) > payload_len {
                    return malformed;
                }
                next = nh;
                walked += 1;
            }
            _ => break,
        }
    }
    pkt.l4 = off;
    pkt.family = 6;
    pkt.proto = next;
    pkt.fragment = fragment;
    pkt.sport = 0;
    pkt.dport = 0;
    pkt.tcp_flags = 0;
    pkt.vlan_tags = vlan_tags;
    if fragment {
        return Parsed::Ip;
    }
    let l4_len = payload_len - (off - (l3 + 40));
    finish_l4(ctx, pkt, l4_len)
}

/// Reads ports (TCP/UDP) or type/code (ICMP) and checks the transport length.
#[inline(always)]
fn finish_l4(ctx: &XdpContext, pkt: &mut Packet, l4_len: usize) -> Parsed {
    let malformed = Parsed::MalformedTo;
    let l4 = pkt.l4 & 0xffff;
    match pkt.proto {
        PROTO_UDP => {
            let Some(h) = ptr_at::<[u8; 8]>(ctx, l4) else {
                return malformed;
            };
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*h };
            let udp_len = u16::from_be_bytes([h[4], h[5]]) as usize;
            if udp_len < 8 || udp_len > l4_len {
                return malformed;
            }
            pkt.sport = u16::from_be_bytes([h[0], h[1]]);
            pkt.dport = u16::from_be_bytes([h[2], h[3]]);
        }
        PROTO_TCP => {
            let Some(h) = ptr_at::<[u8; 20]>(ctx, l4) else {
                return malformed;
            };
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*h };
            let doff = ((h[12] >> 4) as usize) * 4;
            if doff < 20 || doff > l4_len {
                return malformed;
            }
            pkt.sport = u16::from_be_bytes([h[0], h[1]]);
            pkt.dport = u16::from_be_bytes([h[2], h[3]]);
            pkt.tcp_flags = h[13];
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let Some(h) = ptr_at::<[u8; 4]>(ctx, l4) else {
                return malformed;
            };
            if l4_len < 4 {
                return malformed;
            }
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*h };
            pkt.sport = h[0] as u16;
            pkt.dport = h[1] as u16;
        }
        _ => {}
    }
    Parsed::Ip
}
