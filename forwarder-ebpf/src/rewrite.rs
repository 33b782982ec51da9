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
    PROXY_V2_VER_CMD_PROXY, RouteCache, SPP_CLIENT_ADDR, SPP_CLIENT_PORT, SPP_HEADER_LEN,
    SPP_MAGIC, SPP_PROXY_ADDR, SPP_PROXY_PORT,
};

use crate::{
    addr, csum,
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
    /// The sender's checksum (completed by `udp::established` if it was partial).
    old_csum: u16,
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
    let strip = if rw.strip_spp { SPP_HEADER_LEN } else { 0 };
    if (old_len as usize) < 8 + strip {
        return Err(DropReason::SppInvalid);
    }
    let payload = old_len as usize - 8 - strip;
    let new_udp_len = (8 + proxy_header_len(rw.add, rw.family) + payload) as u16;
    Ok(Sizes {
        old_len,
        old_csum,
        payload: payload as u64,
        new_udp_len,
        l3_len: ip_header_len(rw.family) as u16 + new_udp_len,
    })
}

/// Rewrites the datagram in place, framed for `route` (its MACs). On error nothing
/// has been changed.
///
/// Packet data starts at an even address (the kernel keeps XDP headroom even and
/// every header length is even; the BPF verifier lets no program test a packet
/// pointer's bits), so headers are read and written in 16-bit words. (Even a
/// misaligned one would only be slower on x86, where the JIT runs them.)
#[inline(always)]
pub fn apply(
    ctx: &XdpContext,
    pkt: &Packet,
    rw: &Rewrite,
    sz: &Sizes,
    route: &RouteCache,
) -> Result<(), DropReason> {
    let l4 = pkt.l4 & 0xfff;
    let strip = if rw.strip_spp { SPP_HEADER_LEN } else { 0 };
    // Sum of the stripped SPP header, read before the bytes go away.
    let mut strip_native = 0u64;
    if rw.strip_spp {
        let Some(h) = ptr_at::<[u16; SPP_HEADER_LEN / 2]>(ctx, l4 + 8) else {
            return Err(DropReason::SppInvalid);
        };
        // SAFETY: bounds checked by ptr_at; 2-byte aligned (see above).
        strip_native = csum::native_words(unsafe { &*h });
    }
    // An IPv4 sender that sent no checksum gets none added (RFC 768 allows it).
    let no_checksum = pkt.family == 4 && sz.old_csum == 0;
    let new_csum = if no_checksum {
        0
    } else {
        // Take the sender's, remove what changes, add what is new. Addresses are
        // summed as read (CPU byte order), the rest as big-endian words; one fold
        // joins them (`csum::combine`).
        let old_lengths = 17 + 2 * sz.old_len as u64;
        let new_lengths = 17 + 2 * sz.new_udp_len as u64;
        let be = (!sz.old_csum) as u64
            + csum::negate(old_lengths + pkt.sport as u64 + pkt.dport as u64)
            + new_lengths
            + rw.sport as u64
            + rw.dport as u64
            + proxy_header_be(rw);
        let native =
            csum::negate(csum::native_addrs(pkt.family, &pkt.src, &pkt.dst) + strip_native)
                + csum::native_addrs(rw.family, rw.src, rw.dst)
                + proxy_header_native(rw);
        match csum::finish(csum::combine(be, native)) {
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
    write_headers(ctx, rw, route, sz.new_udp_len, new_csum).ok_or(DropReason::Malformed)
}

/// The signature's sum, a constant.
const SIGNATURE_SUM: u64 = csum::sum_words(&PROXY_V2_SIGNATURE);

/// Sum of the proxy header `rw.add` as it will be written, but for the addresses
/// (`proxy_header_native`).
#[inline(always)]
fn proxy_header_be(rw: &Rewrite) -> u64 {
    let ports = rw.client_port as u64 + rw.edge_port as u64;
    match rw.add {
        ProxyHeader::None => 0,
        ProxyHeader::Spp => SPP_MAGIC as u64 + ports,
        ProxyHeader::V2 if rw.family == 4 => {
            SIGNATURE_SUM
                + (((PROXY_V2_VER_CMD_PROXY as u64) << 8) | PROXY_V2_INET_DGRAM as u64)
                + PROXY_V2_ADDR_LEN_V4 as u64
                + ports
        }
        ProxyHeader::V2 => {
            SIGNATURE_SUM
                + (((PROXY_V2_VER_CMD_PROXY as u64) << 8) | PROXY_V2_INET6_DGRAM as u64)
                + PROXY_V2_ADDR_LEN_V6 as u64
                + ports
        }
    }
}

/// Sum of the addresses in the proxy header `rw.add`, in the CPU's byte order (SPP
/// carries IPv4 clients IPv4-mapped; PROXY v2 carries them as IPv4).
#[inline(always)]
fn proxy_header_native(rw: &Rewrite) -> u64 {
    match rw.add {
        ProxyHeader::None => 0,
        ProxyHeader::Spp => csum::native_addr(rw.client) + csum::native_addr(rw.edge),
        ProxyHeader::V2 => csum::native_addrs(rw.family, rw.client, rw.edge),
    }
}

/// `N` 16-bit words of packet memory at `offset` (even: see `apply`).
// The packet is this program run's to write, whatever `ctx` is borrowed as.
#[allow(clippy::mut_from_ref)]
#[inline(always)]
fn words_at<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<&mut [u16; N]> {
    // SAFETY: bounds checked by ptr_at_mut; 2-byte aligned; packet memory is ours.
    ptr_at_mut::<[u16; N]>(ctx, offset).map(|p| unsafe { &mut *p })
}

/// A MAC of a `RouteCache` (at offsets 12 and 18 of a 4-byte aligned struct).
#[inline(always)]
fn mac16(m: &[u8; 6]) -> &[u16; 3] {
    // SAFETY: same size; 2-byte aligned inside `RouteCache`.
    unsafe { &*(m as *const [u8; 6] as *const [u16; 3]) }
}

/// Copies `N` words.
#[inline(always)]
fn put<const N: usize>(dst: &mut [u16], src: &[u16; N]) {
    let mut i = 0;
    while i < N {
        dst[i] = src[i];
        i += 1;
    }
}

/// Writes Ethernet, IP, UDP and proxy headers at the (new) start of the frame,
/// straight into packet memory, a 16-bit word at a time.
#[inline(always)]
fn write_headers(
    ctx: &XdpContext,
    rw: &Rewrite,
    route: &RouteCache,
    udp_len: u16,
    udp_csum: u16,
) -> Option<()> {
    let be = u16::to_be;
    let eth = words_at::<7>(ctx, 0)?;
    put(&mut eth[0..3], mac16(&route.dmac));
    put(&mut eth[3..6], mac16(&route.smac));
    eth[6] = be(if rw.family == 4 {
        ETH_P_IPV4
    } else {
        ETH_P_IPV6
    });
    let (src, dst) = (addr::u16s(rw.src), addr::u16s(rw.dst));
    let l4 = if rw.family == 4 {
        let h = words_at::<10>(ctx, ETH_HLEN)?;
        let total = 20 + udp_len;
        h[0] = be(0x4500);
        h[1] = be(total);
        h[2] = 0;
        // DF: the forwarder never fragments (too-big datagrams are dropped).
        h[3] = be(0x4000);
        h[4] = be(((TTL as u16) << 8) | 17);
        h[6] = src[6];
        h[7] = src[7];
        h[8] = dst[6];
        h[9] = dst[7];
        // The header checksum from what was just written (the field counts as 0).
        let fixed = 0x4500u64 + total as u64 + 0x4000 + (((TTL as u64) << 8) | 17);
        let sum = csum::combine(fixed, csum::native_addrs(4, rw.src, rw.dst));
        h[5] = be(csum::finish(sum));
        ETH_HLEN + 20
    } else {
        let h = words_at::<20>(ctx, ETH_HLEN)?;
        h[0] = be(0x6000);
        h[1] = 0;
        h[2] = be(udp_len);
        h[3] = be((17 << 8) | TTL as u16);
        put(&mut h[4..12], src);
        put(&mut h[12..20], dst);
        ETH_HLEN + 40
    };
    let u = words_at::<4>(ctx, l4)?;
    u[0] = be(rw.sport);
    u[1] = be(rw.dport);
    u[2] = be(udp_len);
    u[3] = be(udp_csum);
    let (client, edge) = (addr::u16s(rw.client), addr::u16s(rw.edge));
    match rw.add {
        ProxyHeader::None => {}
        ProxyHeader::Spp => {
            let h = words_at::<{ SPP_HEADER_LEN / 2 }>(ctx, l4 + 8)?;
            h[0] = be(SPP_MAGIC);
            put(&mut h[SPP_CLIENT_ADDR / 2..SPP_PROXY_ADDR / 2], client);
            put(&mut h[SPP_PROXY_ADDR / 2..SPP_CLIENT_PORT / 2], edge);
            h[SPP_CLIENT_PORT / 2] = be(rw.client_port);
            h[SPP_PROXY_PORT / 2] = be(rw.edge_port);
        }
        ProxyHeader::V2 if rw.family == 4 => {
            let h = words_at::<{ PROXY_V2_LEN_V4 / 2 }>(ctx, l4 + 8)?;
            put(&mut h[0..6], &SIGNATURE_WORDS);
            h[6] = be(((PROXY_V2_VER_CMD_PROXY as u16) << 8) | PROXY_V2_INET_DGRAM as u16);
            h[7] = be(PROXY_V2_ADDR_LEN_V4 as u16);
            h[8] = client[6];
            h[9] = client[7];
            h[10] = edge[6];
            h[11] = edge[7];
            h[12] = be(rw.client_port);
            h[13] = be(rw.edge_port);
        }
        ProxyHeader::V2 => {
            let h = words_at::<{ PROXY_V2_LEN_V6 / 2 }>(ctx, l4 + 8)?;
            put(&mut h[0..6], &SIGNATURE_WORDS);
            h[6] = be(((PROXY_V2_VER_CMD_PROXY as u16) << 8) | PROXY_V2_INET6_DGRAM as u16);
            h[7] = be(PROXY_V2_ADDR_LEN_V6 as u16);
            put(&mut h[8..16], client);
            put(&mut h[16..24], edge);
            h[24] = be(rw.client_port);
            h[25] = be(rw.edge_port);
        }
    }
    Some(())
}

/// The PROXY v2 signature as the 16-bit words it is written with.
const SIGNATURE_WORDS: [u16; 6] = {
    let s = PROXY_V2_SIGNATURE;
    let mut w = [0u16; 6];
    let mut i = 0;
    while i < 6 {
        w[i] = u16::from_ne_bytes([s[2 * i], s[2 * i + 1]]);
        i += 1;
    }
    w
};
