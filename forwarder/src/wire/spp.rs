//! Simple Proxy Protocol (SPP), Cloudflare Spectrum's header for UDP.
//!
//! Every datagram towards the origin starts with this 38-byte header, and the
//! origin answers with the same header in front of its reply (SPEC §5):
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |         Magic 0x56EC          |                               |   0
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+                               +
//! |                                                               |   4
//! +                                                               +
//! |                   Client address (16 bytes)                   |   8
//! +                                                               +
//! |                                                               |  12
//! +                               +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                               |                               |  16
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+                               +
//! |                                                               |  20
//! +                                                               +
//! |                   Proxy address (16 bytes)                    |  24
//! +                                                               +
//! |                                                               |  28
//! +                               +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                               |          Client port          |  32
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |          Proxy port           |          Payload ...          |  36
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! All fields are in network byte order. IPv4 addresses are carried as
//! IPv4-mapped IPv6 (`::ffff:a.b.c.d`); [`Repr::parse`] maps them back to IPv4.

use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};

use super::field::{Field, Rest};
use super::{Error, Result};

/// Length of the header in bytes (one home for the layout: `forwarder-common`,
/// which the XDP program writes from too).
pub const HEADER_LEN: usize = forwarder_common::SPP_HEADER_LEN;

/// The magic number in the first two bytes.
pub const MAGIC: u16 = forwarder_common::SPP_MAGIC;

mod field {
    use super::{Field, Rest};
    use forwarder_common::{SPP_CLIENT_ADDR, SPP_CLIENT_PORT, SPP_PROXY_ADDR, SPP_PROXY_PORT};

    pub const MAGIC: Field = 0..SPP_CLIENT_ADDR;
    pub const CLIENT_ADDR: Field = SPP_CLIENT_ADDR..SPP_PROXY_ADDR;
    pub const PROXY_ADDR: Field = SPP_PROXY_ADDR..SPP_CLIENT_PORT;
    pub const CLIENT_PORT: Field = SPP_CLIENT_PORT..SPP_PROXY_PORT;
    pub const PROXY_PORT: Field = SPP_PROXY_PORT..super::HEADER_LEN;
    pub const PAYLOAD: Rest = PROXY_PORT.end..;
}

/// A read/write view of a buffer that starts with a Simple Proxy Protocol header.
///
/// The field accessors panic if the buffer is shorter than [`HEADER_LEN`];
/// [`Header::new_checked`] rules that out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Wrap a buffer without checking its length.
    pub const fn new_unchecked(buffer: T) -> Header<T> {
        Header { buffer }
    }

    /// Wrap a buffer, failing with [`Error::Truncated`] if it is shorter than
    /// [`HEADER_LEN`]. The magic is not checked here; [`Repr::parse`] does.
    pub fn new_checked(buffer: T) -> Result<Header<T>> {
        let header = Self::new_unchecked(buffer);
        header.check_len()?;
        Ok(header)
    }

    /// Check that every field accessor is in bounds.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            Err(Error::Truncated)
        } else {
            Ok(())
        }
    }

    /// Give back the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The magic field ([`MAGIC`] in a valid header).
    pub fn magic(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::MAGIC])
    }

    /// The client address field, as carried (IPv4 is IPv4-mapped IPv6).
    pub fn client_addr(&self) -> Ipv6Addr {
        read_ipv6(&self.buffer.as_ref()[field::CLIENT_ADDR])
    }

    /// The proxy (edge) address field, as carried.
    pub fn proxy_addr(&self) -> Ipv6Addr {
        read_ipv6(&self.buffer.as_ref()[field::PROXY_ADDR])
    }

    /// The client port field.
    pub fn client_port(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::CLIENT_PORT])
    }

    /// The proxy (edge) port field.
    pub fn proxy_port(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::PROXY_PORT])
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Header<&'a T> {
    /// The bytes after the header: the original datagram.
    pub fn payload(&self) -> &'a [u8] {
        &self.buffer.as_ref()[field::PAYLOAD]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    /// Set the magic field.
    pub fn set_magic(&mut self, value: u16) {
        self.buffer.as_mut()[field::MAGIC].copy_from_slice(&value.to_be_bytes());
    }

    /// Set the client address field (use [`Ipv4Addr::to_ipv6_mapped`] for IPv4).
    ///
    /// [`Ipv4Addr::to_ipv6_mapped`]: std::net::Ipv4Addr::to_ipv6_mapped
    pub fn set_client_addr(&mut self, value: Ipv6Addr) {
        self.buffer.as_mut()[field::CLIENT_ADDR].copy_from_slice(&value.octets());
    }

    /// Set the proxy address field.
    pub fn set_proxy_addr(&mut self, value: Ipv6Addr) {
        self.buffer.as_mut()[field::PROXY_ADDR].copy_from_slice(&value.octets());
    }

    /// Set the client port field.
    pub fn set_client_port(&mut self, value: u16) {
        self.buffer.as_mut()[field::CLIENT_PORT].copy_from_slice(&value.to_be_bytes());
    }

    /// Set the proxy port field.
    pub fn set_proxy_port(&mut self, value: u16) {
        self.buffer.as_mut()[field::PROXY_PORT].copy_from_slice(&value.to_be_bytes());
    }

    /// The bytes after the header, writable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Header<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

impl<T: AsRef<[u8]>> fmt::Display for Header<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Repr::parse(&Header::new_unchecked(self.buffer.as_ref())) {
            Ok(repr) => write!(f, "{repr}"),
            Err(err) => write!(f, "SPP ({err})"),
        }
    }
}

/// The meaning of a Simple Proxy Protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Repr {
    /// The client's address and port.
    pub client: SocketAddr,
    /// The edge address and port the client sent to.
    pub proxy: SocketAddr,
}

impl Repr {
    /// Parse a header: checks the length and the magic.
    ///
    /// IPv4-mapped addresses become [`SocketAddr::V4`]; everything else is
    /// [`SocketAddr::V6`] with no flow info and no scope.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(header: &Header<&T>) -> Result<Repr> {
        header.check_len()?;
        if header.magic() != MAGIC {
            return Err(Error::BadMagic);
        }
        Ok(Repr {
            client: SocketAddr::new(super::unmap_ip(header.client_addr()), header.client_port()),
            proxy: SocketAddr::new(super::unmap_ip(header.proxy_addr()), header.proxy_port()),
        })
    }

    /// Length of the emitted header: always [`HEADER_LEN`].
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Write the header into the first [`HEADER_LEN`] bytes of `header`,
    /// leaving the payload alone. IPv4 addresses are written IPv4-mapped;
    /// IPv6 flow info and scope are not carried.
    ///
    /// # Panics
    ///
    /// If the buffer is shorter than [`HEADER_LEN`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]> + ?Sized>(&self, header: &mut Header<&mut T>) {
        header.set_magic(MAGIC);
        header.set_client_addr(super::to_ipv6(self.client.ip()));
        header.set_proxy_addr(super::to_ipv6(self.proxy.ip()));
        header.set_client_port(self.client.port());
        header.set_proxy_port(self.proxy.port());
    }

    /// The header as a fresh 38-byte vector.
    pub fn emit_to_vec(&self) -> Vec<u8> {
        let mut buf = vec![0u8; HEADER_LEN];
        self.emit(&mut Header::new_unchecked(&mut buf));
        buf
    }
}

impl fmt::Display for Repr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SPP client={} proxy={}", self.client, self.proxy)
    }
}

fn read_u16(bytes: &[u8]) -> u16 {
    let mut b = [0u8; 2];
    b.copy_from_slice(bytes);
    u16::from_be_bytes(b)
}

fn read_ipv6(bytes: &[u8]) -> Ipv6Addr {
    let mut b = [0u8; 16];
    b.copy_from_slice(bytes);
    Ipv6Addr::from(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::test_util::Rng;
    use std::net::{Ipv4Addr, SocketAddrV6};

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    /// client 192.0.2.1:56324, proxy 198.51.100.10:443, payload "hi", by hand.
    const V4_BYTES: [u8; 40] = [
        0x56, 0xec, // magic
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // client ::ffff:192.0.2.1
        0x00, 0x00, 0xff, 0xff, 0xc0, 0x00, 0x02, 0x01, //
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // proxy ::ffff:198.51.100.10
        0x00, 0x00, 0xff, 0xff, 0xc6, 0x33, 0x64, 0x0a, //
        0xdc, 0x04, // client port 56324
        0x01, 0xbb, // proxy port 443
        b'h', b'i', // payload
    ];

    /// client [2001:db8::1]:65535, proxy [2001:db8::10]:1, no payload, by hand.
    const V6_BYTES: [u8; 38] = [
        0x56, 0xec, // magic
        0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, // client 2001:db8::1
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, //
        0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, // proxy 2001:db8::10
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, //
        0xff, 0xff, // client port 65535
        0x00, 0x01, // proxy port 1
    ];

    fn v4_repr() -> Repr {
        Repr {
            client: sa("192.0.2.1:56324"),
            proxy: sa("198.51.100.10:443"),
        }
    }

    fn v6_repr() -> Repr {
        Repr {
            client: sa("[2001:db8::1]:65535"),
            proxy: sa("[2001:db8::10]:1"),
        }
    }

    #[test]
    fn constants() {
        assert_eq!(HEADER_LEN, 38);
        assert_eq!(MAGIC, 0x56EC);
        assert_eq!(field::PAYLOAD.start, HEADER_LEN);
    }

    #[test]
    fn deconstruct_v4() {
        let h = Header::new_checked(&V4_BYTES[..]).expect("header");
        assert_eq!(h.magic(), 0x56EC);
        assert_eq!(
            h.client_addr(),
            Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped()
        );
        assert_eq!(
            h.proxy_addr(),
            Ipv4Addr::new(198, 51, 100, 10).to_ipv6_mapped()
        );
        assert_eq!(h.client_port(), 56324);
        assert_eq!(h.proxy_port(), 443);
        assert_eq!(h.payload(), b"hi");
        assert_eq!(h.as_ref(), &V4_BYTES[..]);
    }

    #[test]
    fn deconstruct_v6() {
        let h = Header::new_checked(&V6_BYTES[..]).expect("header");
        assert_eq!(h.magic(), MAGIC);
        assert_eq!(
            h.client_addr(),
            "2001:db8::1".parse::<Ipv6Addr>().expect("a")
        );
        assert_eq!(
            h.proxy_addr(),
            "2001:db8::10".parse::<Ipv6Addr>().expect("a")
        );
        assert_eq!(h.client_port(), 65535);
        assert_eq!(h.proxy_port(), 1);
        assert_eq!(h.payload(), b"");
    }

    #[test]
    fn construct_with_setters() {
        let mut bytes = [0xa5u8; 40];
        let mut h = Header::new_checked(&mut bytes[..]).expect("header");
        h.set_magic(MAGIC);
        h.set_client_addr(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        h.set_proxy_addr(Ipv4Addr::new(198, 51, 100, 10).to_ipv6_mapped());
        h.set_client_port(56324);
        h.set_proxy_port(443);
        h.payload_mut().copy_from_slice(b"hi");
        assert_eq!(h.into_inner(), &V4_BYTES[..]);
    }

    #[test]
    fn each_setter_touches_only_its_field() {
        let ranges = [
            field::MAGIC,
            field::CLIENT_ADDR,
            field::PROXY_ADDR,
            field::CLIENT_PORT,
            field::PROXY_PORT,
        ];
        for (i, range) in ranges.iter().enumerate() {
            let mut bytes = [0u8; 39];
            let mut h = Header::new_unchecked(&mut bytes[..]);
            match i {
                0 => h.set_magic(0xffff),
                1 => h.set_client_addr(Ipv6Addr::from([0xff; 16])),
                2 => h.set_proxy_addr(Ipv6Addr::from([0xff; 16])),
                3 => h.set_client_port(0xffff),
                _ => h.set_proxy_port(0xffff),
            }
            for (j, b) in bytes.iter().enumerate() {
                let want = if range.contains(&j) { 0xff } else { 0 };
                assert_eq!(*b, want, "setter {i}, byte {j}");
            }
        }
    }

    #[test]
    fn parse_v4() {
        let h = Header::new_checked(&V4_BYTES[..]).expect("header");
        assert_eq!(Repr::parse(&h), Ok(v4_repr()));
    }

    #[test]
    fn parse_v6() {
        let h = Header::new_checked(&V6_BYTES[..]).expect("header");
        assert_eq!(Repr::parse(&h), Ok(v6_repr()));
    }

    #[test]
    fn emit_v4() {
        let repr = v4_repr();
        assert_eq!(repr.buffer_len(), HEADER_LEN);
        let mut bytes = [0u8; 40];
        bytes[38..].copy_from_slice(b"hi");
        repr.emit(&mut Header::new_unchecked(&mut bytes[..]));
        assert_eq!(bytes, V4_BYTES);
        assert_eq!(repr.emit_to_vec(), &V4_BYTES[..38]);
    }

    #[test]
    fn emit_v6() {
        assert_eq!(v6_repr().emit_to_vec(), V6_BYTES);
    }

    #[test]
    fn emit_mixed_families() {
        let repr = Repr {
            client: sa("192.0.2.1:56324"),
            proxy: sa("[2001:db8::10]:1"),
        };
        let bytes = repr.emit_to_vec();
        assert_eq!(&bytes[2..18], &V4_BYTES[2..18]);
        assert_eq!(&bytes[18..34], &V6_BYTES[18..34]);
        let h = Header::new_checked(&bytes[..]).expect("header");
        assert_eq!(Repr::parse(&h), Ok(repr));
    }

    #[test]
    fn emit_drops_flowinfo_and_scope() {
        let ip: Ipv6Addr = "fe80::1".parse().expect("a");
        let repr = Repr {
            client: SocketAddr::V6(SocketAddrV6::new(ip, 5, 0x1234, 7)),
            proxy: sa("[2001:db8::10]:1"),
        };
        let bytes = repr.emit_to_vec();
        let back = Repr::parse(&Header::new_checked(&bytes[..]).expect("h")).expect("parse");
        assert_eq!(back.client, SocketAddr::V6(SocketAddrV6::new(ip, 5, 0, 0)));
    }

    #[test]
    fn mapped_ipv6_is_parsed_as_ipv4() {
        // A V6 socket address carrying ::ffff:a.b.c.d is the same on the wire as V4.
        let repr = Repr {
            client: sa("[::ffff:192.0.2.1]:56324"),
            proxy: sa("[::ffff:198.51.100.10]:443"),
        };
        assert_eq!(repr.emit_to_vec(), &V4_BYTES[..38]);
        let h = Header::new_checked(&V4_BYTES[..]).expect("header");
        assert_eq!(Repr::parse(&h), Ok(v4_repr()));
    }

    #[test]
    fn ipv4_compatible_stays_ipv6() {
        let repr = Repr {
            client: sa("[::c000:201]:1"),
            proxy: sa("[::]:0"),
        };
        let bytes = repr.emit_to_vec();
        let h = Header::new_checked(&bytes[..]).expect("header");
        assert_eq!(Repr::parse(&h), Ok(repr));
    }

    #[test]
    fn round_trips() {
        let addrs = [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "192.0.2.1:1",
            "[::]:0",
            "[::1]:53",
            "[2001:db8::1]:443",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        ];
        for c in addrs {
            for p in addrs {
                let repr = Repr {
                    client: sa(c),
                    proxy: sa(p),
                };
                let mut bytes = repr.emit_to_vec();
                bytes.extend_from_slice(b"payload");
                let h = Header::new_checked(&bytes[..]).expect("header");
                assert_eq!(Repr::parse(&h), Ok(repr), "{c} {p}");
                assert_eq!(h.payload(), b"payload");
            }
        }
    }

    #[test]
    fn every_truncation_is_rejected() {
        for len in 0..HEADER_LEN {
            let prefix = &V4_BYTES[..len];
            assert_eq!(
                Header::new_checked(prefix),
                Err(Error::Truncated),
                "len {len}"
            );
            assert_eq!(
                Repr::parse(&Header::new_unchecked(prefix)),
                Err(Error::Truncated),
                "len {len}"
            );
        }
        assert!(Header::new_checked(&V4_BYTES[..HEADER_LEN]).is_ok());
    }

    #[test]
    fn every_bad_magic_is_rejected() {
        let mut bytes = V6_BYTES;
        for magic in 0..=u16::MAX {
            bytes[..2].copy_from_slice(&magic.to_be_bytes());
            let got = Repr::parse(&Header::new_unchecked(&bytes[..]));
            if magic == MAGIC {
                assert_eq!(got, Ok(v6_repr()));
            } else {
                assert_eq!(got, Err(Error::BadMagic), "magic {magic:#06x}");
            }
        }
        // Little-endian magic is the classic mistake.
        let mut swapped = V6_BYTES;
        swapped[..2].copy_from_slice(&[0xec, 0x56]);
        assert_eq!(
            Repr::parse(&Header::new_unchecked(&swapped[..])),
            Err(Error::BadMagic)
        );
    }

    #[test]
    fn display() {
        assert_eq!(
            v4_repr().to_string(),
            "SPP client=192.0.2.1:56324 proxy=198.51.100.10:443"
        );
        assert_eq!(
            Header::new_unchecked(&V4_BYTES[..]).to_string(),
            "SPP client=192.0.2.1:56324 proxy=198.51.100.10:443"
        );
        assert_eq!(
            Header::new_unchecked(&V4_BYTES[..3]).to_string(),
            "SPP (header truncated)"
        );
    }

    #[test]
    fn no_panic_on_any_input() {
        let mut rng = Rng::new(0x5350_5031);
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        for base in [&V4_BYTES[..], &V6_BYTES[..]] {
            for len in 0..=base.len() {
                inputs.push(base[..len].to_vec());
            }
            for _ in 0..2000 {
                inputs.push(rng.mutate(base));
            }
        }
        for _ in 0..2000 {
            let len = rng.below(64);
            inputs.push(rng.bytes(len));
        }
        for input in &inputs {
            let h = Header::new_unchecked(&input[..]);
            let _ = h.to_string();
            if let Ok(repr) = Repr::parse(&h) {
                assert!(input.len() >= HEADER_LEN);
                assert_eq!(repr.emit_to_vec(), &input[..HEADER_LEN]);
                assert_eq!(h.payload(), &input[HEADER_LEN..]);
            }
        }
    }
}
