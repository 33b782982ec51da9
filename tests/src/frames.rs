//! Crafted Ethernet frames for `BPF_PROG_TEST_RUN` tests and the benchmarks, with
//! an internet checksum routine of their own (independent of the datapath's).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const EDGE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_GRE: u8 = 47;

/// RFC 1071 ones' complement sum folded to 16 bits (not inverted).
pub fn ones_complement_sum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The internet checksum of `data` (what goes into a header checksum field).
pub fn internet_checksum(data: &[u8]) -> u16 {
    !ones_complement_sum(data, 0)
}

/// Sum of the TCP/UDP pseudo-header.
pub fn pseudo_header_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut bytes = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            bytes.extend_from_slice(&s.octets());
            bytes.extend_from_slice(&d.octets());
            bytes.extend_from_slice(&[0, proto]);
            bytes.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            bytes.extend_from_slice(&s.octets());
            bytes.extend_from_slice(&d.octets());
            bytes.extend_from_slice(&(len as u32).to_be_bytes());
            bytes.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("mixed address families in a pseudo-header"),
    }
    u32::from(ones_complement_sum(&bytes, 0))
}

/// Checksum of a transport segment (header with a zeroed checksum field + payload).
pub fn transport_checksum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let sum = !ones_complement_sum(segment, pseudo_header_sum(src, dst, proto, segment.len()));
    // UDP transmits a computed zero as 0xffff (zero means "no checksum").
    if proto == PROTO_UDP && sum == 0 {
        0xffff
    } else {
        sum
    }
}

/// Does the segment's checksum verify? (IPv4/IPv6 TCP, UDP, ICMPv6.)
pub fn transport_checksum_ok(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> bool {
    ones_complement_sum(segment, pseudo_header_sum(src, dst, proto, segment.len())) == 0xffff
}

pub fn ethernet(ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&EDGE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 header (no options) + payload with a correct header checksum, TTL 64.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_with(src, dst, proto, payload, &[], 0)
}

/// IPv4 with `options` (a multiple of 4 bytes) and the flags/fragment-offset field.
pub fn ipv4_with(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    payload: &[u8],
    options: &[u8],
    frag_field: u16,
) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40);
    let ihl = 20 + options.len();
    let total = ihl + payload.len();
    let mut h = vec![0u8; ihl];
    h[0] = 0x40 | (ihl / 4) as u8;
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    h[6..8].copy_from_slice(&frag_field.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    h[20..].copy_from_slice(options);
    let c = internet_checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An IPv6 header + `ext` (already-encoded extension headers, the first of type
/// `first_next`) + payload, hop limit 64.
pub fn ipv6_with(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    first_next: u8,
    ext: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&((ext.len() + payload.len()) as u16).to_be_bytes());
    h[6] = first_next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h.extend_from_slice(ext);
    h.extend_from_slice(payload);
    h
}

pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    ipv6_with(src, dst, next, &[], payload)
}

/// A generic 8-byte IPv6 extension header (hop-by-hop, routing, destination options)
/// with `next` as its next-header field and padding options.
pub fn ipv6_ext(next: u8) -> [u8; 8] {
    [next, 0, 1, 4, 0, 0, 0, 0]
}

/// An IPv6 fragment header with `offset` (in 8-byte units) and the M flag.
pub fn ipv6_fragment(next: u8, offset: u16, more: bool) -> [u8; 8] {
    let field = (offset << 3) | u16::from(more);
    let f = field.to_be_bytes();
    [next, 0, f[0], f[1], 0, 0, 0x12, 0x34]
}

/// A UDP segment with a correct checksum.
pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut s = Vec::with_capacity(len);
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&(len as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(payload);
    let c = transport_checksum(src, dst, PROTO_UDP, &s);
    s[6..8].copy_from_slice(&c.to_be_bytes());
    s
}

/// A TCP segment (20-byte header) with `flags` (0x02 = SYN) and a correct checksum.
pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut s = vec![0u8; 20];
    s[0..2].copy_from_slice(&sport.to_be_bytes());
    s[2..4].copy_from_slice(&dport.to_be_bytes());
    s[4..8].copy_from_slice(&1000u32.to_be_bytes());
    s[12] = 5 << 4;
    s[13] = flags;
    s[14..16].copy_from_slice(&64240u16.to_be_bytes());
    s.extend_from_slice(payload);
    let c = transport_checksum(src, dst, PROTO_TCP, &s);
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

/// The fields of a TCP segment built by [`tcp_segment`].
#[derive(Clone, Debug)]
pub struct TcpFields<'a> {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// Already encoded, a multiple of 4 bytes (at most 40).
    pub options: &'a [u8],
    pub payload: &'a [u8],
}

/// A TCP segment with options and a correct checksum for `src` → `dst`.
pub fn tcp_segment(src: IpAddr, dst: IpAddr, f: &TcpFields) -> Vec<u8> {
    assert!(f.options.len().is_multiple_of(4) && f.options.len() <= 40);
    let mut s = vec![0u8; 20];
    s[0..2].copy_from_slice(&f.sport.to_be_bytes());
    s[2..4].copy_from_slice(&f.dport.to_be_bytes());
    s[4..8].copy_from_slice(&f.seq.to_be_bytes());
    s[8..12].copy_from_slice(&f.ack.to_be_bytes());
    s[12] = (((20 + f.options.len()) / 4) as u8) << 4;
    s[13] = f.flags;
    s[14..16].copy_from_slice(&f.window.to_be_bytes());
    s.extend_from_slice(f.options);
    s.extend_from_slice(f.payload);
    let c = transport_checksum(src, dst, PROTO_TCP, &s);
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

/// An ICMP (v4) message with a correct checksum.
pub fn icmp4(icmp_type: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![icmp_type, code, 0, 0];
    m.extend_from_slice(body);
    let c = internet_checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// An ICMPv6 message with a correct checksum.
pub fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, icmp_type: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![icmp_type, code, 0, 0];
    m.extend_from_slice(body);
    let c = transport_checksum(src.into(), dst.into(), PROTO_ICMPV6, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// Whole frames for the common cases.
pub fn udp4_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let seg = udp(src.into(), sport, dst.into(), dport, payload);
    ethernet(ETH_P_IPV4, &ipv4(src, dst, PROTO_UDP, &seg))
}

pub fn tcp4_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let seg = tcp(src.into(), sport, dst.into(), dport, flags, &[]);
    ethernet(ETH_P_IPV4, &ipv4(src, dst, PROTO_TCP, &seg))
}

pub fn udp6_frame(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let seg = udp(src.into(), sport, dst.into(), dport, payload);
    ethernet(ETH_P_IPV6, &ipv6(src, dst, PROTO_UDP, &seg))
}

pub fn tcp6_frame(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> Vec<u8> {
    let seg = tcp(src.into(), sport, dst.into(), dport, flags, &[]);
    ethernet(ETH_P_IPV6, &ipv6(src, dst, PROTO_TCP, &seg))
}

/// Inserts an 802.1Q tag (VLAN `vid`) after the MAC addresses.
pub fn vlan_tagged(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
    f.extend_from_slice(&vid.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_known_ipv4_header() {
        // The classic example header from RFC 1071 discussions (checksum 0xb861).
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&h), 0xb861);
    }

    #[test]
    fn built_segments_verify() {
        let s: IpAddr = "10.0.1.2".parse().unwrap();
        let d: IpAddr = "10.0.1.1".parse().unwrap();
        let seg = udp(s, 1234, d, 5000, b"hello");
        assert!(transport_checksum_ok(s, d, PROTO_UDP, &seg));
        let s6: IpAddr = "fd00:1::2".parse().unwrap();
        let d6: IpAddr = "fd00:1::1".parse().unwrap();
        let seg = tcp(s6, 1234, d6, 80, 0x02, b"x");
        assert!(transport_checksum_ok(s6, d6, PROTO_TCP, &seg));
        let ip = ipv4(
            "10.0.1.2".parse().unwrap(),
            "10.0.1.1".parse().unwrap(),
            17,
            &[0; 8],
        );
        assert_eq!(ones_complement_sum(&ip[..20], 0), 0xffff);
    }
}
