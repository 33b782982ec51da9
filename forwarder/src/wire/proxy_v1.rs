//! PROXY protocol version 1: the human-readable header.
//!
//! One line of US-ASCII, at most 107 bytes including the CRLF, exactly as in
//! HAProxy's `doc/proxy-protocol.txt`, section 2.1:
//!
//! ```text
//! PROXY TCP4 <src-ip> <dst-ip> <src-port> <dst-port>\r\n
//! PROXY TCP6 <src-ip> <dst-ip> <src-port> <dst-port>\r\n
//! PROXY UNKNOWN[ <anything>]\r\n
//! ```
//!
//! The parser is strict, as the document asks ("any sequence which does not
//! exactly match the protocol must be discarded"):
//!
//! * exactly one space between fields, none before the CRLF (except after
//!   `UNKNOWN`, whose rest of line is ignored);
//! * IPv4: four decimal numbers 0–255 separated by single dots, no leading zeros;
//! * IPv6: colon-separated groups of 1–4 hex digits (either case), at most one
//!   `::` standing for at least one zero group, 128 bits in total; the dotted
//!   IPv4 tail (`::ffff:1.2.3.4`) is not hex groups and is rejected;
//! * ports: decimal 0–65535, no leading zeros;
//! * a lone CR or LF, or no CRLF within the first 107 bytes, is an error.
//!
//! The emitter writes IPv6 addresses in RFC 5952 canonical form (lower case,
//! longest run of zero groups compressed), always as hex groups.
//!
//! PROXY v1 is variable-length text, so unlike the binary headers it has no
//! fixed-offset view: [`Repr::parse`] reads straight from the byte slice.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use super::{Error, Result};

/// What every v1 header starts with: `PROXY` and exactly one space.
pub const SIGNATURE: &[u8; 6] = b"PROXY ";

/// The longest valid header, CRLF included
/// (`PROXY UNKNOWN` with two full IPv6 addresses and ports).
pub const MAX_LEN: usize = 107;

/// The meaning of a PROXY v1 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Repr {
    /// `PROXY TCP4 …`: TCP over IPv4.
    Tcp4 {
        src: SocketAddrV4,
        dst: SocketAddrV4,
    },
    /// `PROXY TCP6 …`: TCP over IPv6. Flow info and scope are not carried.
    Tcp6 {
        src: SocketAddrV6,
        dst: SocketAddrV6,
    },
    /// `PROXY UNKNOWN`: the receiver uses the connection's own addresses.
    Unknown,
}

/// Find the end of the header line at the start of `buf`.
///
/// Returns the header length including the CRLF. Fails with
/// [`Error::BadSignature`] if `buf` does not start with `PROXY `,
/// [`Error::Malformed`] on a lone CR or LF or when no CRLF ends the line within
/// [`MAX_LEN`] bytes, and [`Error::Truncated`] when a CRLF may still come.
pub fn header_len(buf: &[u8]) -> Result<usize> {
    let sig_len = buf.len().min(SIGNATURE.len());
    if buf[..sig_len] != SIGNATURE[..sig_len] {
        return Err(Error::BadSignature);
    }
    let window = &buf[..buf.len().min(MAX_LEN)];
    for i in SIGNATURE.len()..window.len() {
        match window[i] {
            b'\r' => {
                return match window.get(i + 1) {
                    Some(b'\n') => Ok(i + 2),
                    Some(_) => Err(Error::Malformed),
                    // The LF may still come, unless it would be byte 108.
                    None if window.len() == MAX_LEN => Err(Error::Malformed),
                    None => Err(Error::Truncated),
                };
            }
            b'\n' => return Err(Error::Malformed),
            _ => {}
        }
    }
    if window.len() == MAX_LEN {
        Err(Error::Malformed)
    } else {
        Err(Error::Truncated)
    }
}

/// Parse the header at the start of `buf`: see [`Repr::parse`].
pub fn parse(buf: &[u8]) -> Result<(Repr, usize)> {
    Repr::parse(buf)
}

impl Repr {
    /// Parse the header at the start of `buf`, which may hold more data after it.
    ///
    /// Returns the header and its length including the CRLF; the proxied data
    /// starts at that offset. Errors as in [`header_len`], then
    /// [`Error::BadFamily`] for a protocol other than `TCP4`, `TCP6` or
    /// `UNKNOWN`, and [`Error::Malformed`] for any other deviation.
    pub fn parse(buf: &[u8]) -> Result<(Repr, usize)> {
        let len = header_len(buf)?;
        // header_len() guarantees SIGNATURE.len() + 2 <= len <= buf.len().
        let line = buf.get(SIGNATURE.len()..len - 2).ok_or(Error::Malformed)?;
        let mut fields = line.split(|&b| b == b' ');
        let v6 = match fields.next() {
            Some(b"UNKNOWN") => return Ok((Repr::Unknown, len)),
            Some(b"TCP4") => false,
            Some(b"TCP6") => true,
            Some(b"") | None => return Err(Error::Malformed),
            Some(_) => return Err(Error::BadFamily),
        };
        let mut next = || fields.next().ok_or(Error::Malformed);
        let (src, dst, sport, dport) = (next()?, next()?, next()?, next()?);
        if fields.next().is_some() {
            return Err(Error::Malformed);
        }
        let sport = parse_decimal(sport, u16::MAX.into()).ok_or(Error::Malformed)? as u16;
        let dport = parse_decimal(dport, u16::MAX.into()).ok_or(Error::Malformed)? as u16;
        let repr = if v6 {
            let src = parse_ipv6(src).ok_or(Error::Malformed)?;
            let dst = parse_ipv6(dst).ok_or(Error::Malformed)?;
            Repr::Tcp6 {
                src: SocketAddrV6::new(src, sport, 0, 0),
                dst: SocketAddrV6::new(dst, dport, 0, 0),
            }
        } else {
            let src = parse_ipv4(src).ok_or(Error::Malformed)?;
            let dst = parse_ipv4(dst).ok_or(Error::Malformed)?;
            Repr::Tcp4 {
                src: SocketAddrV4::new(src, sport),
                dst: SocketAddrV4::new(dst, dport),
            }
        };
        Ok((repr, len))
    }

    /// The client (source) address, if the header carries one.
    pub fn source(&self) -> Option<SocketAddr> {
        match *self {
            Repr::Tcp4 { src, .. } => Some(src.into()),
            Repr::Tcp6 { src, .. } => Some(src.into()),
            Repr::Unknown => None,
        }
    }

    /// The proxy-side (destination) address, if the header carries one.
    pub fn destination(&self) -> Option<SocketAddr> {
        match *self {
            Repr::Tcp4 { dst, .. } => Some(dst.into()),
            Repr::Tcp6 { dst, .. } => Some(dst.into()),
            Repr::Unknown => None,
        }
    }

    /// Length of the emitted header in bytes, CRLF included (at most 104).
    pub fn buffer_len(&self) -> usize {
        self.to_string().len()
    }

    /// Append the header line, CRLF included, to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.to_string().as_bytes());
    }

    /// The header line, CRLF included, as a fresh vector.
    pub fn emit_to_vec(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

/// Formats the exact header line, CRLF included.
impl fmt::Display for Repr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Repr::Tcp4 { src, dst } => write!(
                f,
                "PROXY TCP4 {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            ),
            Repr::Tcp6 { src, dst } => write!(
                f,
                "PROXY TCP6 {} {} {} {}\r\n",
                Canonical6(src.ip()),
                Canonical6(dst.ip()),
                src.port(),
                dst.port()
            ),
            Repr::Unknown => f.write_str("PROXY UNKNOWN\r\n"),
        }
    }
}

/// An IPv6 address in RFC 5952 form, never with a dotted IPv4 tail
/// (std's `Display` writes `::ffff:1.2.3.4`, which v1 does not allow).
struct Canonical6<'a>(&'a Ipv6Addr);

impl fmt::Display for Canonical6<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let segs = self.0.segments();
        // Longest run of zero groups, the first one on a tie.
        let (mut best_start, mut best_len) = (0, 0);
        let mut i = 0;
        while i < segs.len() {
            if segs[i] == 0 {
                let start = i;
                while i < segs.len() && segs[i] == 0 {
                    i += 1;
                }
                if i - start > best_len {
                    (best_start, best_len) = (start, i - start);
                }
            } else {
                i += 1;
            }
        }
        let groups = |f: &mut fmt::Formatter<'_>, segs: &[u16]| -> fmt::Result {
            for (i, seg) in segs.iter().enumerate() {
                if i > 0 {
                    f.write_str(":")?;
                }
                write!(f, "{seg:x}")?;
            }
            Ok(())
        };
        // RFC 5952 4.2.2: a single zero group is not compressed.
        if best_len >= 2 {
            groups(f, &segs[..best_start])?;
            f.write_str("::")?;
            groups(f, &segs[best_start + best_len..])
        } else {
            groups(f, &segs)
        }
    }
}

/// A decimal number 0..=max with no sign, no leading zeros and at most 5 digits.
fn parse_decimal(s: &[u8], max: u32) -> Option<u32> {
    if s.is_empty() || s.len() > 5 || (s.len() > 1 && s[0] == b'0') {
        return None;
    }
    let mut value: u32 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u32::from(b - b'0');
    }
    (value <= max).then_some(value)
}

/// An IPv4 address: exactly four decimal octets, no leading zeros.
fn parse_ipv4(s: &[u8]) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split(|&b| b == b'.');
    for octet in &mut octets {
        *octet = parse_decimal(parts.next()?, 255)? as u8;
    }
    match parts.next() {
        Some(_) => None,
        None => Some(Ipv4Addr::from(octets)),
    }
}

/// An IPv6 address as hex groups with at most one `::`; see the module docs.
fn parse_ipv6(s: &[u8]) -> Option<Ipv6Addr> {
    // "ffff:" * 7 + "ffff" is the longest form.
    if s.is_empty() || s.len() > 39 {
        return None;
    }
    let mut segs = [0u16; 8];
    match find_double_colon(s) {
        None => {
            if parse_groups(s, &mut segs)? != 8 {
                return None;
            }
        }
        Some(at) => {
            let (head, tail) = (&s[..at], &s[at + 2..]);
            if find_double_colon(tail).is_some() {
                return None;
            }
            let mut tail_segs = [0u16; 8];
            let n_head = parse_groups(head, &mut segs)?;
            let n_tail = parse_groups(tail, &mut tail_segs)?;
            // "::" must stand for at least one zero group.
            if n_head + n_tail > 7 {
                return None;
            }
            segs[8 - n_tail..].copy_from_slice(&tail_segs[..n_tail]);
        }
    }
    Some(Ipv6Addr::from(segs))
}

fn find_double_colon(s: &[u8]) -> Option<usize> {
    s.windows(2).position(|w| w == b"::")
}

/// Parse `a:b:c` (or nothing) into `out`, returning the number of groups.
fn parse_groups(s: &[u8], out: &mut [u16; 8]) -> Option<usize> {
    if s.is_empty() {
        return Some(0);
    }
    let mut n = 0;
    for group in s.split(|&b| b == b':') {
        if group.is_empty() || group.len() > 4 || n == out.len() {
            return None;
        }
        let mut value: u16 = 0;
        for &b in group {
            let digit = char::from(b).to_digit(16)?;
            value = (value << 4) | digit as u16;
        }
        out[n] = value;
        n += 1;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::test_util::Rng;

    fn v4(ip: [u8; 4], port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(ip), port)
    }

    fn v6(ip: &str, port: u16) -> SocketAddrV6 {
        SocketAddrV6::new(ip.parse().expect("test address"), port, 0, 0)
    }

    const DOC_EXAMPLE: &[u8] = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
    const MAX_TCP4: &[u8] = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
    const MAX_TCP6: &[u8] = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
        ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    const MAX_UNKNOWN: &[u8] = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
        ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    const TCP6: &[u8] = b"PROXY TCP6 2001:db8::1 2001:db8::10 56324 443\r\n";
    const SHORT_UNKNOWN: &[u8] = b"PROXY UNKNOWN\r\n";

    fn all_valid() -> Vec<&'static [u8]> {
        vec![
            DOC_EXAMPLE,
            MAX_TCP4,
            MAX_TCP6,
            MAX_UNKNOWN,
            TCP6,
            SHORT_UNKNOWN,
            b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
            b"PROXY TCP6 :: ::1 0 1\r\n",
        ]
    }

    fn parse_err(s: &[u8]) -> Error {
        match Repr::parse(s) {
            Ok(r) => panic!("{:?} parsed as {r:?}", String::from_utf8_lossy(s)),
            Err(e) => e,
        }
    }

    #[test]
    fn doc_lengths() {
        // The worst cases listed in proxy-protocol.txt section 2.1.
        assert_eq!(MAX_TCP4.len(), 56);
        assert_eq!(MAX_TCP6.len(), 104);
        assert_eq!(SHORT_UNKNOWN.len(), 15);
        assert_eq!(MAX_UNKNOWN.len(), MAX_LEN);
    }

    #[test]
    fn parse_doc_example_with_following_data() {
        let mut buf = DOC_EXAMPLE.to_vec();
        buf.extend_from_slice(b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n");
        let (repr, len) = Repr::parse(&buf).expect("parse");
        assert_eq!(
            repr,
            Repr::Tcp4 {
                src: v4([192, 168, 0, 1], 56324),
                dst: v4([192, 168, 0, 11], 443),
            }
        );
        assert_eq!(len, DOC_EXAMPLE.len());
        assert_eq!(&buf[len..len + 3], b"GET");
        assert_eq!(parse(&buf), Ok((repr, len)));
    }

    #[test]
    fn parse_tcp6() {
        assert_eq!(
            Repr::parse(TCP6),
            Ok((
                Repr::Tcp6 {
                    src: v6("2001:db8::1", 56324),
                    dst: v6("2001:db8::10", 443),
                },
                TCP6.len()
            ))
        );
    }

    #[test]
    fn parse_max_lines() {
        assert_eq!(
            Repr::parse(MAX_TCP4),
            Ok((
                Repr::Tcp4 {
                    src: v4([255; 4], 65535),
                    dst: v4([255; 4], 65535),
                },
                56
            ))
        );
        let all_f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        assert_eq!(
            Repr::parse(MAX_TCP6),
            Ok((
                Repr::Tcp6 {
                    src: v6(all_f, 65535),
                    dst: v6(all_f, 65535),
                },
                104
            ))
        );
        assert_eq!(Repr::parse(MAX_UNKNOWN), Ok((Repr::Unknown, MAX_LEN)));
    }

    #[test]
    fn parse_unknown_ignores_rest_of_line() {
        for line in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN \r\n",
            b"PROXY UNKNOWN whatever  you\tlike\r\n",
            b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UNKNOWN \xff\xfe\r\n",
        ] {
            assert_eq!(Repr::parse(line), Ok((Repr::Unknown, line.len())));
        }
    }

    #[test]
    fn parse_ports_edges() {
        for (port, text) in [(0u16, "0"), (1, "1"), (10, "10"), (65535, "65535")] {
            let line = format!("PROXY TCP4 1.2.3.4 5.6.7.8 {text} {text}\r\n");
            let (repr, _) = Repr::parse(line.as_bytes()).expect("parse");
            assert_eq!(repr.source().map(|s| s.port()), Some(port));
            assert_eq!(repr.destination().map(|s| s.port()), Some(port));
        }
    }

    #[test]
    fn parse_ipv6_forms() {
        for (text, want) in [
            ("::", "::"),
            ("::1", "::1"),
            ("1::", "1::"),
            ("1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"),
            ("1::8", "1::8"),
            ("1:2:3:4:5:6::8", "1:2:3:4:5:6:0:8"),
            ("::2:3:4:5:6:7:8", "0:2:3:4:5:6:7:8"),
            ("1:2:3:4:5:6:7::", "1:2:3:4:5:6:7:0"),
            ("2001:DB8::AbCd", "2001:db8::abcd"),
            ("0000:0000:0000:0000:0000:0000:0000:0001", "::1"),
            ("::ffff:c000:201", "::ffff:192.0.2.1"),
            ("fe80::1:0:0:1", "fe80::1:0:0:1"),
        ] {
            let want: Ipv6Addr = want.parse().expect("std parse");
            assert_eq!(parse_ipv6(text.as_bytes()), Some(want), "{text}");
        }
    }

    #[test]
    fn reject_bad_ipv6() {
        for text in [
            "",
            ":",
            ":::",
            "1:::2",
            "1::2::3",
            "::1::",
            "1:2:3:4:5:6:7",
            "1:2:3:4:5:6:7:8:9",
            "1:2:3:4:5:6:7:8::",
            "::1:2:3:4:5:6:7:8",
            "1:2:3:4::5:6:7:8",
            ":1:2:3:4:5:6:7:8",
            "1:2:3:4:5:6:7:8:",
            ":1::",
            "::1:",
            "12345::",
            "g::",
            "::ffff:192.0.2.1",
            "::1.2.3.4",
            "fe80::1%eth0",
            "[::1]",
            " ::1",
            "+1::",
            "0000:0000:0000:0000:0000:0000:0000:00001",
        ] {
            assert_eq!(parse_ipv6(text.as_bytes()), None, "{text:?}");
        }
    }

    #[test]
    fn reject_bad_ipv4() {
        for text in [
            "",
            "1",
            "1.2.3",
            "1.2.3.4.5",
            "1.2.3.",
            ".1.2.3",
            "1..2.3",
            "256.1.1.1",
            "1.1.1.256",
            "01.2.3.4",
            "1.2.3.04",
            "00.0.0.0",
            "1.2.3.4 ",
            "+1.2.3.4",
            "-1.2.3.4",
            "0x1.2.3.4",
            "1.2.3.1000",
            "1.2.3.99999",
            "1.2.3.4294967297",
            "::1",
        ] {
            assert_eq!(parse_ipv4(text.as_bytes()), None, "{text:?}");
        }
        assert_eq!(parse_ipv4(b"0.0.0.0"), Some(Ipv4Addr::UNSPECIFIED));
        assert_eq!(
            parse_ipv4(b"10.200.3.9"),
            Some(Ipv4Addr::new(10, 200, 3, 9))
        );
    }

    #[test]
    fn reject_bad_ports() {
        for text in [
            "", "65536", "99999", "100000", "00", "01", "0443", "-1", "+1", "1a", " 1", "1 ",
        ] {
            assert_eq!(parse_decimal(text.as_bytes(), 65535), None, "{text:?}");
            let line = format!("PROXY TCP4 1.2.3.4 5.6.7.8 {text} 1\r\n");
            assert_eq!(parse_err(line.as_bytes()), Error::Malformed, "{line:?}");
            let line = format!("PROXY TCP4 1.2.3.4 5.6.7.8 1 {text}\r\n");
            assert_eq!(parse_err(line.as_bytes()), Error::Malformed, "{line:?}");
        }
    }

    #[test]
    fn reject_bad_lines() {
        for line in [
            // spacing
            &b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n"[..],
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8  1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1  2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
            b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n",
            b"PROXY \r\n",
            b"PROXY  UNKNOWN\r\n",
            // field count
            b"PROXY TCP4\r\n",
            b"PROXY TCP4 \r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            // family mismatch
            b"PROXY TCP4 ::1 ::2 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 ::2 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n",
            // addresses
            b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.256 1 2\r\n",
            b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.\xc8 1 2\r\n",
        ] {
            assert_eq!(
                parse_err(line),
                Error::Malformed,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn reject_unknown_protocols() {
        for line in [
            &b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"[..],
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP44 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UNKNOWNX\r\n",
            b"PROXY unknown\r\n",
            b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert_eq!(
                parse_err(line),
                Error::BadFamily,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn reject_bad_signatures() {
        for line in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY\r\n",
            b"PROXY\tTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b" PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"X",
            b"PROX\r",
            b"\r\n\r\n\0\r\nQUIT\n",
        ] {
            assert_eq!(
                parse_err(line),
                Error::BadSignature,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn reject_bad_line_endings() {
        for line in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\r",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\n 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r 2\r\n",
            b"PROXY UNKNOWN\n",
            b"PROXY UNKNOWN \r \r\n",
            b"PROXY \n",
        ] {
            let want = if line.ends_with(b"2\r") {
                Error::Truncated
            } else {
                Error::Malformed
            };
            assert_eq!(
                Repr::parse(line),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn length_limit() {
        // Exactly 107 bytes with CRLF: fine. One more: too long.
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(MAX_LEN - 2, b'x');
        line.extend_from_slice(b"\r\n");
        assert_eq!(Repr::parse(&line), Ok((Repr::Unknown, MAX_LEN)));
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(MAX_LEN - 1, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(long.len(), MAX_LEN + 1);
        assert_eq!(Repr::parse(&long), Err(Error::Malformed));
        // CR as byte 107: the LF would be byte 108, too late, whether or not it came.
        assert_eq!(Repr::parse(&long[..MAX_LEN]), Err(Error::Malformed));
        // No CRLF: the line may still end while fewer than 107 bytes have come.
        let mut open = b"PROXY UNKNOWN ".to_vec();
        open.resize(MAX_LEN - 1, b'x');
        assert_eq!(Repr::parse(&open), Err(Error::Truncated));
        open.push(b'x');
        assert_eq!(Repr::parse(&open), Err(Error::Malformed));
        open.extend_from_slice(b"\r\n");
        assert_eq!(Repr::parse(&open), Err(Error::Malformed));
        // CR as byte 106 with nothing after it: the LF may still come.
        let mut cr = b"PROXY UNKNOWN ".to_vec();
        cr.resize(MAX_LEN - 2, b'x');
        cr.push(b'\r');
        assert_eq!(Repr::parse(&cr), Err(Error::Truncated));
    }

    #[test]
    fn every_truncation_is_rejected() {
        for valid in all_valid() {
            for len in 0..valid.len() {
                assert_eq!(
                    Repr::parse(&valid[..len]),
                    Err(Error::Truncated),
                    "{:?}",
                    String::from_utf8_lossy(&valid[..len])
                );
                assert_eq!(header_len(&valid[..len]), Err(Error::Truncated));
            }
            assert_eq!(header_len(valid), Ok(valid.len()));
        }
    }

    #[test]
    fn emit_exact() {
        let doc = Repr::Tcp4 {
            src: v4([192, 168, 0, 1], 56324),
            dst: v4([192, 168, 0, 11], 443),
        };
        assert_eq!(doc.emit_to_vec(), DOC_EXAMPLE);
        assert_eq!(doc.buffer_len(), DOC_EXAMPLE.len());
        let mut out = b"prefix:".to_vec();
        doc.emit(&mut out);
        assert_eq!(&out[7..], DOC_EXAMPLE);
        assert_eq!(doc.to_string().as_bytes(), DOC_EXAMPLE);

        let tcp6 = Repr::Tcp6 {
            src: v6("2001:db8::1", 56324),
            dst: v6("2001:db8::10", 443),
        };
        assert_eq!(tcp6.emit_to_vec(), TCP6);
        assert_eq!(Repr::Unknown.emit_to_vec(), SHORT_UNKNOWN);
        assert_eq!(Repr::Unknown.buffer_len(), 15);
        let max6 = Repr::Tcp6 {
            src: v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            dst: v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        };
        assert_eq!(max6.emit_to_vec(), MAX_TCP6);
        assert_eq!(max6.buffer_len(), 104);
    }

    #[test]
    fn emit_tcp6_ignores_flowinfo_and_scope() {
        let ip: Ipv6Addr = "fe80::1".parse().expect("a");
        let r = Repr::Tcp6 {
            src: SocketAddrV6::new(ip, 1, 9, 3),
            dst: SocketAddrV6::new(ip, 2, 9, 3),
        };
        assert_eq!(r.emit_to_vec(), b"PROXY TCP6 fe80::1 fe80::1 1 2\r\n");
    }

    #[test]
    fn canonical_ipv6_rfc5952() {
        for (addr, want) in [
            ("::", "::"),
            ("::1", "::1"),
            ("1::", "1::"),
            ("2001:db8::1", "2001:db8::1"),
            // 4.2.2: one zero group is not compressed.
            ("2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"),
            // 4.2.3: the longest run; the first one on a tie.
            ("2001:0:0:1:0:0:0:1", "2001:0:0:1::1"),
            ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
            // 4.3: lower case.
            ("2001:DB8::ABCD", "2001:db8::abcd"),
            // Never a dotted tail.
            ("::ffff:192.0.2.1", "::ffff:c000:201"),
            ("::192.0.2.1", "::c000:201"),
            ("1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"),
            ("0:0:1:0:0:0:0:0", "0:0:1::"),
        ] {
            let ip: Ipv6Addr = addr.parse().expect("std parse");
            assert_eq!(Canonical6(&ip).to_string(), want, "{addr}");
        }
    }

    #[test]
    fn canonical_ipv6_matches_std_and_round_trips() {
        let mut rng = Rng::new(0x7631);
        for _ in 0..20_000 {
            // Many zero groups, so that compression gets exercised.
            let mut segs = [0u16; 8];
            for seg in &mut segs {
                *seg = match rng.below(4) {
                    0 | 1 => 0,
                    2 => rng.below(16) as u16,
                    _ => rng.next_u64() as u16,
                };
            }
            let ip = Ipv6Addr::from(segs);
            let ours = Canonical6(&ip).to_string();
            let std = ip.to_string();
            if !std.contains('.') {
                assert_eq!(ours, std);
            }
            assert_eq!(parse_ipv6(ours.as_bytes()), Some(ip), "{ours}");
            let full = segs.map(|s| format!("{s:04X}")).join(":");
            assert_eq!(parse_ipv6(full.as_bytes()), Some(ip), "{full}");
        }
    }

    #[test]
    fn round_trips() {
        let mut rng = Rng::new(0x7632);
        for _ in 0..5_000 {
            let repr = if rng.below(2) == 0 {
                Repr::Tcp4 {
                    src: v4((rng.next_u64() as u32).to_be_bytes(), rng.next_u64() as u16),
                    dst: v4((rng.next_u64() as u32).to_be_bytes(), rng.next_u64() as u16),
                }
            } else {
                let mut a = [0u8; 16];
                a.copy_from_slice(&rng.bytes(16));
                let mut b = [0u8; 16];
                b[15] = rng.next_u64() as u8;
                Repr::Tcp6 {
                    src: SocketAddrV6::new(a.into(), rng.next_u64() as u16, 0, 0),
                    dst: SocketAddrV6::new(b.into(), rng.next_u64() as u16, 0, 0),
                }
            };
            let mut bytes = repr.emit_to_vec();
            assert_eq!(bytes.len(), repr.buffer_len());
            assert!(bytes.len() <= MAX_LEN);
            bytes.extend_from_slice(b"data");
            assert_eq!(Repr::parse(&bytes), Ok((repr, repr.buffer_len())));
        }
        assert_eq!(
            Repr::parse(&Repr::Unknown.emit_to_vec()),
            Ok((Repr::Unknown, 15))
        );
    }

    #[test]
    fn accessors() {
        let (r, _) = Repr::parse(DOC_EXAMPLE).expect("parse");
        assert_eq!(r.source(), Some("192.168.0.1:56324".parse().expect("a")));
        assert_eq!(
            r.destination(),
            Some("192.168.0.11:443".parse().expect("a"))
        );
        let (r, _) = Repr::parse(TCP6).expect("parse");
        assert_eq!(r.source(), Some("[2001:db8::1]:56324".parse().expect("a")));
        assert_eq!(
            r.destination(),
            Some("[2001:db8::10]:443".parse().expect("a"))
        );
        assert_eq!(Repr::Unknown.source(), None);
        assert_eq!(Repr::Unknown.destination(), None);
    }

    #[test]
    fn no_panic_on_any_input() {
        let mut rng = Rng::new(0x7633);
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        for base in all_valid() {
            for len in 0..=base.len() {
                inputs.push(base[..len].to_vec());
            }
            for _ in 0..2000 {
                inputs.push(rng.mutate(base));
            }
        }
        let alphabet = b"PROXY TCP46UNK:.0123456789abcdefABCDEF\r\n";
        for _ in 0..5000 {
            let len = rng.below(130);
            inputs.push(rng.bytes(len));
            let mut text = b"PROXY ".to_vec();
            text.extend((0..len).map(|_| alphabet[rng.below(alphabet.len())]));
            inputs.push(text);
        }
        for input in &inputs {
            if let Ok((repr, len)) = Repr::parse(input) {
                assert!(len <= input.len() && len <= MAX_LEN);
                assert_eq!(&input[len - 2..len], b"\r\n");
                // Whatever we accept we can emit, and that parses the same.
                let again = repr.emit_to_vec();
                assert_eq!(Repr::parse(&again), Ok((repr, again.len())));
            }
        }
    }
}
