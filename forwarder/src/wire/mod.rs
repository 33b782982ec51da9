//! Codecs for the headers the forwarder puts in front of proxied traffic.
//!
//! Written in the style of smoltcp's `wire` module. Each binary header has two
//! layers:
//!
//! * a typed *view* over a byte buffer (`Header<T: AsRef<[u8]>>`), with
//!   `new_unchecked`, `new_checked` (length checks only), a getter for every
//!   field, a setter for every field when `T: AsMut<[u8]>`, and `payload()`;
//! * a high-level `Repr` with `parse(&Header<&T>)`, `buffer_len()` and
//!   `emit(&mut Header<&mut T>)`.
//!
//! | module       | header                                   | used by                  |
//! |--------------|------------------------------------------|--------------------------|
//! | [`spp`]      | Simple Proxy Protocol (38 bytes, binary) | UDP apps, `simple`       |
//! | [`proxy_v1`] | PROXY protocol v1 (one text line)        | TCP apps, `v1`           |
//! | [`proxy_v2`] | PROXY protocol v2 (binary, TLVs)         | TCP and UDP apps, `v2`   |
//!
//! PROXY v1 is a line of text, so it has no fixed-offset view: its `Repr`
//! parses straight from a byte slice and emits into a `Vec<u8>`.
//!
//! Every parser takes untrusted bytes and never panics on any input: it returns
//! an [`Error`] instead. [`Error::Truncated`] always means "more bytes could
//! still make this a valid header"; every other error is final.
//!
//! The layouts, with byte diagrams and references, are in `docs/wire.md`.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};

pub mod proxy_v1;
pub mod proxy_v2;
pub mod spp;

pub use proxy_v2::{Command, Transport};

/// Byte ranges of header fields, shared by the binary codecs.
mod field {
    pub type Field = core::ops::Range<usize>;
    pub type Rest = core::ops::RangeFrom<usize>;
}

/// Why a header could not be parsed (or, for [`proxy_header`], built).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Error {
    /// The buffer ends before the header does; more bytes could complete it.
    Truncated,
    /// Simple Proxy Protocol: the magic number is not `0x56EC`.
    BadMagic,
    /// PROXY v1/v2: the buffer does not start with the protocol signature.
    BadSignature,
    /// PROXY v2: the version nibble is not 2.
    BadVersion,
    /// PROXY v2: the command nibble is neither LOCAL nor PROXY.
    BadCommand,
    /// PROXY v2: unknown address family nibble; PROXY v1: unknown protocol
    /// token (neither `TCP4`, `TCP6` nor `UNKNOWN`).
    BadFamily,
    /// PROXY v2: unknown transport nibble; or a transport that the requested
    /// header cannot carry (PROXY v1 is TCP only).
    BadTransport,
    /// PROXY v2: the length field is too small for the announced address
    /// family, or (when emitting) the address block and TLVs exceed 65535 bytes.
    BadLength,
    /// The header does not follow its grammar (PROXY v1 syntax, a PROXY v2
    /// TLV running past the header, a v1 line longer than 107 bytes, ...).
    Malformed,
    /// PROXY v1 needs source and destination of the same address family.
    MixedFamilies,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::Truncated => "header truncated",
            Error::BadMagic => "bad Simple Proxy Protocol magic",
            Error::BadSignature => "bad PROXY protocol signature",
            Error::BadVersion => "bad PROXY protocol version",
            Error::BadCommand => "bad PROXY protocol command",
            Error::BadFamily => "bad or unsupported address family",
            Error::BadTransport => "bad or unsupported transport protocol",
            Error::BadLength => "header length field inconsistent with its contents",
            Error::Malformed => "malformed header",
            Error::MixedFamilies => "source and destination address families differ",
        })
    }
}

impl std::error::Error for Error {}

/// The result type of every codec in this module.
pub type Result<T> = core::result::Result<T, Error>;

/// Which PROXY protocol header [`proxy_header`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyKind {
    /// Human-readable PROXY v1 (TCP only).
    V1,
    /// Binary PROXY v2.
    V2,
}

/// Build the PROXY header that tells an origin who the client was.
///
/// `client` is the client's address and port, `edge` the edge address and
/// port the client connected to; the header has command PROXY. IPv4-mapped
/// IPv6 addresses (`::ffff:a.b.c.d`, as a dual-stack socket reports IPv4
/// peers) are first turned back into IPv4, so an IPv4 client is always
/// presented as IPv4.
///
/// * [`ProxyKind::V1`]: `PROXY TCP4 …\r\n` or `PROXY TCP6 …\r\n`. Only
///   [`Transport::Stream`] ([`Error::BadTransport`] otherwise), and both
///   addresses must then be of one family ([`Error::MixedFamilies`] otherwise).
/// * [`ProxyKind::V2`]: family INET or INET6, protocol STREAM or DGRAM
///   ([`Transport::Unspec`] is [`Error::BadTransport`]). If the families differ,
///   the IPv4 one is written as IPv4-mapped IPv6 and the family is INET6.
pub fn proxy_header(
    kind: ProxyKind,
    transport: Transport,
    client: SocketAddr,
    edge: SocketAddr,
) -> Result<Vec<u8>> {
    let client = unmap_socket_addr(client);
    let edge = unmap_socket_addr(edge);
    match kind {
        ProxyKind::V1 => {
            if transport != Transport::Stream {
                return Err(Error::BadTransport);
            }
            let repr = match (client, edge) {
                (SocketAddr::V4(src), SocketAddr::V4(dst)) => proxy_v1::Repr::Tcp4 { src, dst },
                (SocketAddr::V6(src), SocketAddr::V6(dst)) => proxy_v1::Repr::Tcp6 { src, dst },
                _ => return Err(Error::MixedFamilies),
            };
            Ok(repr.emit_to_vec())
        }
        ProxyKind::V2 => {
            if transport == Transport::Unspec {
                return Err(Error::BadTransport);
            }
            proxy_v2::Repr::proxy(transport, client, edge).emit_to_vec()
        }
    }
}

/// A parsed PROXY header of either version, see [`parse_proxy_header`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyHeader {
    V1(proxy_v1::Repr),
    V2(proxy_v2::Repr),
}

/// Parse a PROXY v1 or v2 header at the start of `buf`, telling the versions
/// apart by their signatures as proxy-protocol.txt section 2.2 describes.
///
/// Returns the header and its length in bytes; the proxied data starts there.
pub fn parse_proxy_header(buf: &[u8]) -> Result<(ProxyHeader, usize)> {
    match buf.first() {
        None => Err(Error::Truncated),
        Some(&b) if b == proxy_v2::SIGNATURE[0] => {
            proxy_v2::parse(buf).map(|(repr, len)| (ProxyHeader::V2(repr), len))
        }
        Some(_) => proxy_v1::parse(buf).map(|(repr, len)| (ProxyHeader::V1(repr), len)),
    }
}

/// `addr` as IPv6: IPv4 becomes IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
pub(crate) fn to_ipv6(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// `addr` with an IPv4-mapped IPv6 address turned back into IPv4.
pub(crate) fn unmap_ip(addr: Ipv6Addr) -> IpAddr {
    match addr.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(addr),
    }
}

/// A socket address with an IPv4-mapped IPv6 address turned back into IPv4.
pub(crate) fn unmap_socket_addr(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => SocketAddr::new(unmap_ip(*v6.ip()), v6.port()),
        v4 => v4,
    }
}

/// A socket address as IPv6, IPv4 mapped; flow info and scope are dropped.
pub(crate) fn to_socket_addr_v6(addr: SocketAddr) -> SocketAddrV6 {
    SocketAddrV6::new(to_ipv6(addr.ip()), addr.port(), 0, 0)
}

#[cfg(test)]
pub(crate) mod test_util {
    /// A small deterministic PRNG (xorshift64*) for the no-panic tests.
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed | 1)
        }

        pub fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }

        pub fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next_u64() as u8).collect()
        }

        /// `base` with a few random bytes overwritten, then cut at a random length.
        pub fn mutate(&mut self, base: &[u8]) -> Vec<u8> {
            let mut v = base.to_vec();
            if v.is_empty() {
                return v;
            }
            for _ in 0..=self.below(3) {
                let i = self.below(v.len());
                v[i] = self.next_u64() as u8;
            }
            let cut = self.below(v.len() + 1);
            v.truncate(cut.max(v.len() / 2));
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn v4(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    const V2_SIG: [u8; 12] = [
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
    ];

    #[test]
    fn error_display_is_distinct_and_nonempty() {
        let all = [
            Error::Truncated,
            Error::BadMagic,
            Error::BadSignature,
            Error::BadVersion,
            Error::BadCommand,
            Error::BadFamily,
            Error::BadTransport,
            Error::BadLength,
            Error::Malformed,
            Error::MixedFamilies,
        ];
        let texts: Vec<String> = all.iter().map(ToString::to_string).collect();
        for (i, t) in texts.iter().enumerate() {
            assert!(!t.is_empty());
            assert!(!texts[..i].contains(t), "duplicate message {t}");
        }
        let boxed: Box<dyn std::error::Error> = Box::new(Error::Truncated);
        assert_eq!(boxed.to_string(), "header truncated");
    }

    #[test]
    fn proxy_header_v1_tcp4() {
        let h = proxy_header(
            ProxyKind::V1,
            Transport::Stream,
            v4("192.0.2.1:56324"),
            v4("198.51.100.10:443"),
        );
        assert_eq!(
            h.as_deref(),
            Ok(&b"PROXY TCP4 192.0.2.1 198.51.100.10 56324 443\r\n"[..])
        );
    }

    #[test]
    fn proxy_header_v1_tcp6() {
        let h = proxy_header(
            ProxyKind::V1,
            Transport::Stream,
            v4("[2001:db8::1]:56324"),
            v4("[2001:db8::10]:443"),
        );
        assert_eq!(
            h.as_deref(),
            Ok(&b"PROXY TCP6 2001:db8::1 2001:db8::10 56324 443\r\n"[..])
        );
    }

    #[test]
    fn proxy_header_v1_unmaps_ipv4_mapped() {
        let h = proxy_header(
            ProxyKind::V1,
            Transport::Stream,
            v4("[::ffff:192.0.2.1]:1000"),
            v4("198.51.100.10:443"),
        );
        assert_eq!(
            h.as_deref(),
            Ok(&b"PROXY TCP4 192.0.2.1 198.51.100.10 1000 443\r\n"[..])
        );
    }

    #[test]
    fn proxy_header_v1_rejects_mixed_families() {
        for (c, e) in [
            ("192.0.2.1:1", "[2001:db8::10]:443"),
            ("[2001:db8::1]:1", "198.51.100.10:443"),
        ] {
            assert_eq!(
                proxy_header(ProxyKind::V1, Transport::Stream, v4(c), v4(e)),
                Err(Error::MixedFamilies)
            );
        }
    }

    #[test]
    fn proxy_header_v1_rejects_non_tcp() {
        for t in [Transport::Dgram, Transport::Unspec] {
            assert_eq!(
                proxy_header(ProxyKind::V1, t, v4("192.0.2.1:1"), v4("192.0.2.2:2")),
                Err(Error::BadTransport)
            );
        }
    }

    #[test]
    fn proxy_header_v2_tcp4_exact() {
        let h = proxy_header(
            ProxyKind::V2,
            Transport::Stream,
            v4("192.0.2.1:56324"),
            v4("198.51.100.10:443"),
        )
        .expect("v2 header");
        let mut want = V2_SIG.to_vec();
        want.extend_from_slice(&[
            0x21, 0x11, 0x00, 0x0c, 0xc0, 0x00, 0x02, 0x01, 0xc6, 0x33, 0x64, 0x0a, 0xdc, 0x04,
            0x01, 0xbb,
        ]);
        assert_eq!(h, want);
    }

    #[test]
    fn proxy_header_v2_udp4_exact() {
        let h = proxy_header(
            ProxyKind::V2,
            Transport::Dgram,
            v4("192.0.2.1:56324"),
            v4("198.51.100.10:443"),
        )
        .expect("v2 header");
        assert_eq!(&h[..12], &V2_SIG);
        assert_eq!(&h[12..16], &[0x21, 0x12, 0x00, 0x0c]);
        assert_eq!(h.len(), 28);
    }

    #[test]
    fn proxy_header_v2_mixed_families_use_inet6_mapped() {
        let h = proxy_header(
            ProxyKind::V2,
            Transport::Stream,
            v4("192.0.2.1:56324"),
            v4("[2001:db8::10]:443"),
        )
        .expect("v2 header");
        let mut want = V2_SIG.to_vec();
        want.extend_from_slice(&[0x21, 0x21, 0x00, 0x24]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1]);
        want.extend_from_slice(&[
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ]);
        want.extend_from_slice(&[0xdc, 0x04, 0x01, 0xbb]);
        assert_eq!(h, want);

        // The other way round too.
        let h = proxy_header(
            ProxyKind::V2,
            Transport::Dgram,
            v4("[2001:db8::1]:1"),
            v4("198.51.100.10:2"),
        )
        .expect("v2 header");
        assert_eq!(&h[12..16], &[0x21, 0x22, 0x00, 0x24]);
        assert_eq!(
            &h[32..48],
            &Ipv4Addr::new(198, 51, 100, 10).to_ipv6_mapped().octets()
        );
    }

    #[test]
    fn proxy_header_v2_both_mapped_is_inet() {
        let h = proxy_header(
            ProxyKind::V2,
            Transport::Stream,
            v4("[::ffff:192.0.2.1]:1"),
            v4("[::ffff:192.0.2.2]:2"),
        )
        .expect("v2 header");
        assert_eq!(&h[12..16], &[0x21, 0x11, 0x00, 0x0c]);
    }

    #[test]
    fn proxy_header_v2_rejects_unspec_transport() {
        assert_eq!(
            proxy_header(
                ProxyKind::V2,
                Transport::Unspec,
                v4("192.0.2.1:1"),
                v4("192.0.2.2:2")
            ),
            Err(Error::BadTransport)
        );
    }

    #[test]
    fn proxy_header_round_trips_through_parse_proxy_header() {
        let c = v4("192.0.2.1:56324");
        let e = v4("198.51.100.10:443");
        let mut v1 = proxy_header(ProxyKind::V1, Transport::Stream, c, e).expect("v1");
        let v1_len = v1.len();
        v1.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(
            parse_proxy_header(&v1),
            Ok((
                ProxyHeader::V1(proxy_v1::Repr::Tcp4 {
                    src: SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 56324),
                    dst: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 443),
                }),
                v1_len
            ))
        );
        let mut v2 = proxy_header(ProxyKind::V2, Transport::Stream, c, e).expect("v2");
        let v2_len = v2.len();
        v2.extend_from_slice(b"payload");
        assert_eq!(
            parse_proxy_header(&v2),
            Ok((
                ProxyHeader::V2(proxy_v2::Repr::proxy(Transport::Stream, c, e)),
                v2_len
            ))
        );
    }

    #[test]
    fn parse_proxy_header_errors() {
        assert_eq!(parse_proxy_header(b""), Err(Error::Truncated));
        assert_eq!(parse_proxy_header(b"\r"), Err(Error::Truncated));
        assert_eq!(parse_proxy_header(b"P"), Err(Error::Truncated));
        assert_eq!(
            parse_proxy_header(b"\r\n\r\n\0\r\nQUIX"),
            Err(Error::BadSignature)
        );
        assert_eq!(
            parse_proxy_header(b"GET / HTTP/1.1\r\n"),
            Err(Error::BadSignature)
        );
        assert_eq!(
            parse_proxy_header(b"\x16\x03\x01"),
            Err(Error::BadSignature)
        );
    }

    #[test]
    fn mapping_helpers() {
        let a: Ipv6Addr = "::ffff:192.0.2.1".parse().expect("addr");
        assert_eq!(unmap_ip(a), IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
        // IPv4-compatible (deprecated) addresses stay IPv6.
        let c: Ipv6Addr = "::192.0.2.1".parse().expect("addr");
        assert_eq!(unmap_ip(c), IpAddr::V6(c));
        assert_eq!(to_ipv6(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))), a);
        assert_eq!(to_ipv6(IpAddr::V6(c)), c);
        let s = SocketAddr::V6(SocketAddrV6::new(a, 7, 5, 3));
        assert_eq!(unmap_socket_addr(s), v4("192.0.2.1:7"));
        assert_eq!(
            to_socket_addr_v6(s),
            SocketAddrV6::new(a, 7, 0, 0),
            "flow info and scope are dropped"
        );
    }
}
