//! PROXY protocol version 2: the binary header.
//!
//! As in HAProxy's `doc/proxy-protocol.txt`, section 2.2:
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |   0
//! +                                                               +
//! |   Signature 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A (12 bytes)    |   4
//! +                                                               +
//! |                                                               |   8
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Version|Command| Family|Transp.|  Length (bytes that follow)   |  12
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  Address block: INET  src(4) dst(4) sport(2) dport(2)         |  16
//! |                 INET6 src(16) dst(16) sport(2) dport(2)       |
//! |                 UNIX  src(108) dst(108)                       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  TLVs: type(1) length(2) value(length) ..., to 16 + Length    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! Version is 2; command 0 LOCAL, 1 PROXY; family 0 UNSPEC, 1 INET, 2 INET6,
//! 3 UNIX; transport 0 UNSPEC, 1 STREAM, 2 DGRAM. All other values are
//! rejected. The header is `16 + Length` bytes long.
//!
//! [`Repr`] carries addresses only for the TCP/UDP families (`0x11`, `0x12`,
//! `0x21`, `0x22`). For the other valid combinations it falls back to UNSPEC
//! as the document allows: no addresses (the transport nibble is kept), the
//! address block is skipped. TLVs
//! are collected raw when the address block has a defined size (family UNSPEC:
//! none; TCP/UDP; UNIX); with family INET/INET6/UNIX but transport UNSPEC the
//! whole rest is skipped unread.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

use super::field::{Field, Rest};
use super::{Error, Result};

/// The 12-byte signature every v2 header starts with (one home for the layout:
/// `forwarder-common`, which the XDP program writes from too).
pub const SIGNATURE: [u8; 12] = forwarder_common::PROXY_V2_SIGNATURE;

/// Length of the fixed part: signature, version/command, family, length.
pub const HEADER_LEN: usize = forwarder_common::PROXY_V2_FIXED_LEN;

/// The only protocol version this codec knows (high nibble of the byte at offset 12).
pub const VERSION: u8 = 2;

/// Address block length for TCP/UDP over IPv4.
pub const ADDR_LEN_INET: usize = forwarder_common::PROXY_V2_ADDR_LEN_V4;
/// Address block length for TCP/UDP over IPv6.
pub const ADDR_LEN_INET6: usize = forwarder_common::PROXY_V2_ADDR_LEN_V6;
/// Address block length for AF_UNIX.
pub const ADDR_LEN_UNIX: usize = 216;

/// Registered TLV types (proxy-protocol.txt section 2.2).
pub mod tlv_type {
    pub const ALPN: u8 = 0x01;
    pub const AUTHORITY: u8 = 0x02;
    pub const CRC32C: u8 = 0x03;
    pub const NOOP: u8 = 0x04;
    pub const UNIQUE_ID: u8 = 0x05;
    pub const SSL: u8 = 0x20;
    pub const NETNS: u8 = 0x30;
}

mod field {
    use super::{Field, Rest};

    pub const SIGNATURE: Field = 0..12;
    pub const VER_CMD: usize = 12;
    pub const FAM: usize = 13;
    pub const LEN: Field = 14..16;
    pub const ADDR: Rest = LEN.end..;

    pub const IPV4_SRC_ADDR: Field = 16..20;
    pub const IPV4_DST_ADDR: Field = 20..24;
    pub const IPV4_SRC_PORT: Field = 24..26;
    pub const IPV4_DST_PORT: Field = 26..28;

    pub const IPV6_SRC_ADDR: Field = 16..32;
    pub const IPV6_DST_ADDR: Field = 32..48;
    pub const IPV6_SRC_PORT: Field = 48..50;
    pub const IPV6_DST_PORT: Field = 50..52;
}

/// The command (low nibble of the byte at offset 12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Command {
    /// A connection of the proxy's own (health check); the receiver uses the
    /// real endpoints and ignores the addresses.
    Local = 0x0,
    /// A relayed connection; the addresses are the original endpoints.
    Proxy = 0x1,
}

impl TryFrom<u8> for Command {
    type Error = Error;

    fn try_from(value: u8) -> Result<Self> {
        match value {
            0x0 => Ok(Command::Local),
            0x1 => Ok(Command::Proxy),
            _ => Err(Error::BadCommand),
        }
    }
}

impl From<Command> for u8 {
    fn from(value: Command) -> u8 {
        value as u8
    }
}

/// The address family (high nibble of the byte at offset 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AddressFamily {
    Unspec = 0x0,
    Inet = 0x1,
    Inet6 = 0x2,
    Unix = 0x3,
}

impl TryFrom<u8> for AddressFamily {
    type Error = Error;

    fn try_from(value: u8) -> Result<Self> {
        match value {
            0x0 => Ok(AddressFamily::Unspec),
            0x1 => Ok(AddressFamily::Inet),
            0x2 => Ok(AddressFamily::Inet6),
            0x3 => Ok(AddressFamily::Unix),
            _ => Err(Error::BadFamily),
        }
    }
}

impl From<AddressFamily> for u8 {
    fn from(value: AddressFamily) -> u8 {
        value as u8
    }
}

/// The transport protocol (low nibble of the byte at offset 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Transport {
    Unspec = 0x0,
    /// SOCK_STREAM: TCP.
    Stream = 0x1,
    /// SOCK_DGRAM: UDP.
    Dgram = 0x2,
}

impl TryFrom<u8> for Transport {
    type Error = Error;

    fn try_from(value: u8) -> Result<Self> {
        match value {
            0x0 => Ok(Transport::Unspec),
            0x1 => Ok(Transport::Stream),
            0x2 => Ok(Transport::Dgram),
            _ => Err(Error::BadTransport),
        }
    }
}

impl From<Transport> for u8 {
    fn from(value: Transport) -> u8 {
        value as u8
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Unspec => "UNSPEC",
            Transport::Stream => "STREAM",
            Transport::Dgram => "DGRAM",
        })
    }
}

/// Size of the address block for a family and transport, or `None` where the
/// document defines none (INET, INET6 or UNIX with transport UNSPEC).
pub fn address_block_len(family: AddressFamily, transport: Transport) -> Option<usize> {
    match (family, transport) {
        (AddressFamily::Unspec, _) => Some(0),
        (_, Transport::Unspec) => None,
        (AddressFamily::Inet, _) => Some(ADDR_LEN_INET),
        (AddressFamily::Inet6, _) => Some(ADDR_LEN_INET6),
        (AddressFamily::Unix, _) => Some(ADDR_LEN_UNIX),
    }
}

/// A read/write view of a buffer that starts with a PROXY v2 header.
///
/// The fixed-part accessors panic if the buffer is shorter than
/// [`HEADER_LEN`]; the address accessors if it is shorter than the address
/// block of that family. [`Header::new_checked`] rules both out for a header
/// whose family is INET or INET6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Wrap a buffer without checking anything.
    pub const fn new_unchecked(buffer: T) -> Header<T> {
        Header { buffer }
    }

    /// Wrap a buffer after [`Header::check_len`].
    pub fn new_checked(buffer: T) -> Result<Header<T>> {
        let header = Self::new_unchecked(buffer);
        header.check_len()?;
        Ok(header)
    }

    /// Check the lengths: [`Error::Truncated`] if the buffer is shorter than
    /// the fixed part or than `16 + Length`; [`Error::BadLength`] if `Length`
    /// is smaller than the address block of the family and transport given.
    /// Signature and field values are checked by [`Repr::parse`].
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if let Some(block) = self.address_block_len()
            && usize::from(self.addr_len()) < block
        {
            return Err(Error::BadLength);
        }
        if len < self.header_len() {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// Give back the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The 12 signature bytes ([`SIGNATURE`] in a valid header).
    pub fn signature(&self) -> &[u8] {
        &self.buffer.as_ref()[field::SIGNATURE]
    }

    /// The version (high nibble of the byte at offset 12).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_CMD] >> 4
    }

    /// The command (low nibble of the byte at offset 12), see [`Command`].
    pub fn command(&self) -> u8 {
        self.buffer.as_ref()[field::VER_CMD] & 0x0f
    }

    /// The address family (high nibble of the byte at offset 13), see [`AddressFamily`].
    pub fn family(&self) -> u8 {
        self.buffer.as_ref()[field::FAM] >> 4
    }

    /// The transport protocol (low nibble of the byte at offset 13), see [`Transport`].
    pub fn transport(&self) -> u8 {
        self.buffer.as_ref()[field::FAM] & 0x0f
    }

    /// The length field: bytes of the header after the fixed part.
    pub fn addr_len(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::LEN])
    }

    /// Length of the whole header: `16 + Length`.
    pub fn header_len(&self) -> usize {
        HEADER_LEN + usize::from(self.addr_len())
    }

    /// Size of the address block for this header's family and transport, if
    /// both are valid and the document defines one.
    pub fn address_block_len(&self) -> Option<usize> {
        let family = AddressFamily::try_from(self.family()).ok()?;
        let transport = Transport::try_from(self.transport()).ok()?;
        address_block_len(family, transport)
    }

    /// INET: the source address.
    pub fn ipv4_src_addr(&self) -> Ipv4Addr {
        read_ipv4(&self.buffer.as_ref()[field::IPV4_SRC_ADDR])
    }

    /// INET: the destination address.
    pub fn ipv4_dst_addr(&self) -> Ipv4Addr {
        read_ipv4(&self.buffer.as_ref()[field::IPV4_DST_ADDR])
    }

    /// INET: the source port.
    pub fn ipv4_src_port(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::IPV4_SRC_PORT])
    }

    /// INET: the destination port.
    pub fn ipv4_dst_port(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::IPV4_DST_PORT])
    }

    /// INET6: the source address.
    pub fn ipv6_src_addr(&self) -> Ipv6Addr {
        read_ipv6(&self.buffer.as_ref()[field::IPV6_SRC_ADDR])
    }

    /// INET6: the destination address.
    pub fn ipv6_dst_addr(&self) -> Ipv6Addr {
        read_ipv6(&self.buffer.as_ref()[field::IPV6_DST_ADDR])
    }

    /// INET6: the source port.
    pub fn ipv6_src_port(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::IPV6_SRC_PORT])
    }

    /// INET6: the destination port.
    pub fn ipv6_dst_port(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::IPV6_DST_PORT])
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Header<&'a T> {
    /// The TLVs after the address block, up to the end of the header.
    ///
    /// Empty when the address block has no defined size, or the buffer or
    /// length field are too short to hold it. Never panics.
    pub fn tlvs(&self) -> TlvIter<'a> {
        let data = self.buffer.as_ref();
        if data.len() < HEADER_LEN {
            return TlvIter { data: &[] };
        }
        let bytes = self
            .address_block_len()
            .and_then(|block| data.get(HEADER_LEN + block..self.header_len()))
            .unwrap_or_default();
        TlvIter { data: bytes }
    }

    /// The bytes after the header (`16 + Length` onwards).
    pub fn payload(&self) -> &'a [u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    /// Write [`SIGNATURE`] into the signature field.
    pub fn set_signature(&mut self) {
        self.buffer.as_mut()[field::SIGNATURE].copy_from_slice(&SIGNATURE);
    }

    /// Set the version nibble (only the low 4 bits of `value` are used).
    pub fn set_version(&mut self, value: u8) {
        let b = &mut self.buffer.as_mut()[field::VER_CMD];
        *b = (*b & 0x0f) | (value << 4);
    }

    /// Set the command nibble (only the low 4 bits of `value` are used).
    pub fn set_command(&mut self, value: u8) {
        let b = &mut self.buffer.as_mut()[field::VER_CMD];
        *b = (*b & 0xf0) | (value & 0x0f);
    }

    /// Set the address family nibble (only the low 4 bits of `value` are used).
    pub fn set_family(&mut self, value: u8) {
        let b = &mut self.buffer.as_mut()[field::FAM];
        *b = (*b & 0x0f) | (value << 4);
    }

    /// Set the transport nibble (only the low 4 bits of `value` are used).
    pub fn set_transport(&mut self, value: u8) {
        let b = &mut self.buffer.as_mut()[field::FAM];
        *b = (*b & 0xf0) | (value & 0x0f);
    }

    /// Set the length field.
    pub fn set_addr_len(&mut self, value: u16) {
        self.buffer.as_mut()[field::LEN].copy_from_slice(&value.to_be_bytes());
    }

    /// INET: set the source address.
    pub fn set_ipv4_src_addr(&mut self, value: Ipv4Addr) {
        self.buffer.as_mut()[field::IPV4_SRC_ADDR].copy_from_slice(&value.octets());
    }

    /// INET: set the destination address.
    pub fn set_ipv4_dst_addr(&mut self, value: Ipv4Addr) {
        self.buffer.as_mut()[field::IPV4_DST_ADDR].copy_from_slice(&value.octets());
    }

    /// INET: set the source port.
    pub fn set_ipv4_src_port(&mut self, value: u16) {
        self.buffer.as_mut()[field::IPV4_SRC_PORT].copy_from_slice(&value.to_be_bytes());
    }

    /// INET: set the destination port.
    pub fn set_ipv4_dst_port(&mut self, value: u16) {
        self.buffer.as_mut()[field::IPV4_DST_PORT].copy_from_slice(&value.to_be_bytes());
    }

    /// INET6: set the source address.
    pub fn set_ipv6_src_addr(&mut self, value: Ipv6Addr) {
        self.buffer.as_mut()[field::IPV6_SRC_ADDR].copy_from_slice(&value.octets());
    }

    /// INET6: set the destination address.
    pub fn set_ipv6_dst_addr(&mut self, value: Ipv6Addr) {
        self.buffer.as_mut()[field::IPV6_DST_ADDR].copy_from_slice(&value.octets());
    }

    /// INET6: set the source port.
    pub fn set_ipv6_src_port(&mut self, value: u16) {
        self.buffer.as_mut()[field::IPV6_SRC_PORT].copy_from_slice(&value.to_be_bytes());
    }

    /// INET6: set the destination port.
    pub fn set_ipv6_dst_port(&mut self, value: u16) {
        self.buffer.as_mut()[field::IPV6_DST_PORT].copy_from_slice(&value.to_be_bytes());
    }

    /// Everything after the fixed part (address block, TLVs, payload), writable.
    pub fn addr_block_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::ADDR]
    }

    /// The bytes after the header, writable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.header_len();
        &mut self.buffer.as_mut()[start..]
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
            Err(err) => write!(f, "PROXYv2 ({err})"),
        }
    }
}

/// Iterator over the raw TLVs of a header: `(type, value)`.
///
/// Yields one `Err(Error::Malformed)` and stops if a TLV runs past the end of
/// the header.
#[derive(Debug, Clone)]
pub struct TlvIter<'a> {
    data: &'a [u8],
}

impl<'a> Iterator for TlvIter<'a> {
    type Item = Result<(u8, &'a [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        let data = self.data;
        if data.is_empty() {
            return None;
        }
        self.data = &[];
        let [kind, hi, lo, rest @ ..] = data else {
            return Some(Err(Error::Malformed));
        };
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        let (Some(value), Some(after)) = (rest.get(..len), rest.get(len..)) else {
            return Some(Err(Error::Malformed));
        };
        self.data = after;
        Some(Ok((*kind, value)))
    }
}

/// The meaning of a PROXY v2 header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Repr {
    pub command: Command,
    pub transport: Transport,
    /// `(source, destination)`; only for TCP/UDP over IPv4/IPv6.
    /// IPv4-mapped IPv6 addresses are IPv4 (see [`Repr::parse`]).
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// Raw `(type, value)` TLVs, in order.
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

/// An address block ready to be written.
enum Block {
    None,
    Inet(SocketAddrV4, SocketAddrV4),
    Inet6((Ipv6Addr, u16), (Ipv6Addr, u16)),
}

impl Repr {
    /// A PROXY header for a relayed connection, without TLVs.
    pub fn proxy(transport: Transport, src: SocketAddr, dst: SocketAddr) -> Repr {
        Repr {
            command: Command::Proxy,
            transport,
            addresses: Some((src, dst)),
            tlvs: Vec::new(),
        }
    }

    /// A LOCAL header (health check): family and transport UNSPEC, no
    /// addresses, no TLVs.
    pub fn local() -> Repr {
        Repr {
            command: Command::Local,
            transport: Transport::Unspec,
            addresses: None,
            tlvs: Vec::new(),
        }
    }

    /// Parse a header: signature, version, command, family, transport,
    /// lengths, addresses and TLVs, in that order, with the error of the
    /// first check that fails.
    ///
    /// Addresses are read for families `0x11`, `0x12`, `0x21` and `0x22`
    /// only, whatever the command (for LOCAL the receiver must ignore them);
    /// IPv4-mapped IPv6 addresses come back as IPv4. TLVs that run past the
    /// end of the header are [`Error::Malformed`].
    pub fn parse<T: AsRef<[u8]> + ?Sized>(header: &Header<&T>) -> Result<Repr> {
        if header.buffer.as_ref().len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if header.signature() != SIGNATURE {
            return Err(Error::BadSignature);
        }
        if header.version() != VERSION {
            return Err(Error::BadVersion);
        }
        let command = Command::try_from(header.command())?;
        let family = AddressFamily::try_from(header.family())?;
        let transport = Transport::try_from(header.transport())?;
        header.check_len()?;
        let addresses = match (family, transport) {
            (_, Transport::Unspec) => None,
            (AddressFamily::Inet, _) => Some((
                SocketAddr::new(header.ipv4_src_addr().into(), header.ipv4_src_port()),
                SocketAddr::new(header.ipv4_dst_addr().into(), header.ipv4_dst_port()),
            )),
            (AddressFamily::Inet6, _) => Some((
                SocketAddr::new(
                    super::unmap_ip(header.ipv6_src_addr()),
                    header.ipv6_src_port(),
                ),
                SocketAddr::new(
                    super::unmap_ip(header.ipv6_dst_addr()),
                    header.ipv6_dst_port(),
                ),
            )),
            (AddressFamily::Unspec | AddressFamily::Unix, _) => None,
        };
        let tlvs = header
            .tlvs()
            .map(|tlv| tlv.map(|(kind, value)| (kind, value.to_vec())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Repr {
            command,
            transport,
            addresses,
            tlvs,
        })
    }

    /// The address block this repr emits. Addresses are sent only with a
    /// STREAM or DGRAM transport. Both IPv4 (or IPv4-mapped): INET; otherwise
    /// INET6, with an IPv4 one written IPv4-mapped.
    fn block(&self) -> Block {
        let Some((src, dst)) = self.addresses else {
            return Block::None;
        };
        if self.transport == Transport::Unspec {
            return Block::None;
        }
        let (src, dst) = (super::unmap_socket_addr(src), super::unmap_socket_addr(dst));
        match (src, dst) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => Block::Inet(s, d),
            (s, d) => {
                let (s, d) = (super::to_socket_addr_v6(s), super::to_socket_addr_v6(d));
                Block::Inet6((*s.ip(), s.port()), (*d.ip(), d.port()))
            }
        }
    }

    /// Bytes after the fixed part: address block and TLVs.
    fn body_len(&self) -> usize {
        let block = match self.block() {
            Block::None => 0,
            Block::Inet(..) => ADDR_LEN_INET,
            Block::Inet6(..) => ADDR_LEN_INET6,
        };
        block + self.tlvs.iter().map(|(_, v)| 3 + v.len()).sum::<usize>()
    }

    /// The value of the length field, or `None` if the address block and
    /// TLVs do not fit in 65535 bytes.
    fn addr_len(&self) -> Option<u16> {
        u16::try_from(self.body_len()).ok()
    }

    /// Length of the emitted header (fixed part, addresses, TLVs).
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.body_len()
    }

    /// Write the header into the first [`Repr::buffer_len`] bytes of `header`.
    ///
    /// The family byte is `family << 4 | transport`: `0x11`/`0x12` with two
    /// IPv4 addresses, `0x21`/`0x22` otherwise (see [`Repr::parse`] for
    /// mapping); without addresses (or with transport UNSPEC, when addresses
    /// are not sent) the family is UNSPEC.
    ///
    /// # Panics
    ///
    /// If the buffer is shorter than [`Repr::buffer_len`], or the addresses and
    /// TLVs exceed 65535 bytes; [`Repr::emit_to_vec`] checks the latter.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]> + ?Sized>(&self, header: &mut Header<&mut T>) {
        let addr_len = self
            .addr_len()
            .expect("PROXY v2 addresses and TLVs exceed 65535 bytes");
        header.set_signature();
        header.set_version(VERSION);
        header.set_command(self.command.into());
        header.set_transport(self.transport.into());
        header.set_addr_len(addr_len);
        let mut at = HEADER_LEN;
        match self.block() {
            Block::None => header.set_family(AddressFamily::Unspec.into()),
            Block::Inet(src, dst) => {
                header.set_family(AddressFamily::Inet.into());
                header.set_ipv4_src_addr(*src.ip());
                header.set_ipv4_dst_addr(*dst.ip());
                header.set_ipv4_src_port(src.port());
                header.set_ipv4_dst_port(dst.port());
                at += ADDR_LEN_INET;
            }
            Block::Inet6((src, src_port), (dst, dst_port)) => {
                header.set_family(AddressFamily::Inet6.into());
                header.set_ipv6_src_addr(src);
                header.set_ipv6_dst_addr(dst);
                header.set_ipv6_src_port(src_port);
                header.set_ipv6_dst_port(dst_port);
                at += ADDR_LEN_INET6;
            }
        }
        let data = header.buffer.as_mut();
        for (kind, value) in &self.tlvs {
            // addr_len() has checked that every length fits in u16.
            let len = value.len() as u16;
            data[at] = *kind;
            data[at + 1..at + 3].copy_from_slice(&len.to_be_bytes());
            data[at + 3..at + 3 + value.len()].copy_from_slice(value);
            at += 3 + value.len();
        }
    }

    /// The header as a fresh vector; [`Error::BadLength`] if the addresses and
    /// TLVs exceed 65535 bytes.
    pub fn emit_to_vec(&self) -> Result<Vec<u8>> {
        if self.addr_len().is_none() {
            return Err(Error::BadLength);
        }
        let mut buf = vec![0u8; self.buffer_len()];
        self.emit(&mut Header::new_unchecked(&mut buf));
        Ok(buf)
    }
}

impl fmt::Display for Repr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let command = match self.command {
            Command::Local => "LOCAL",
            Command::Proxy => "PROXY",
        };
        write!(f, "PROXYv2 {command} {}", self.transport)?;
        if let Some((src, dst)) = self.addresses {
            write!(f, " {src} -> {dst}")?;
        }
        if !self.tlvs.is_empty() {
            write!(f, " tlvs={}", self.tlvs.len())?;
        }
        Ok(())
    }
}

/// Parse the header at the start of `buf`, which may hold more data after it.
///
/// Suited to a stream: it reports [`Error::BadSignature`], [`Error::BadVersion`],
/// [`Error::BadCommand`], [`Error::BadFamily`] and [`Error::BadTransport`] as
/// soon as the offending byte has arrived, and [`Error::Truncated`] only while
/// what has arrived is a valid beginning. Returns the header and its length.
pub fn parse(buf: &[u8]) -> Result<(Repr, usize)> {
    let sig_len = buf.len().min(SIGNATURE.len());
    if buf[..sig_len] != SIGNATURE[..sig_len] {
        return Err(Error::BadSignature);
    }
    if let Some(&ver_cmd) = buf.get(field::VER_CMD) {
        if ver_cmd >> 4 != VERSION {
            return Err(Error::BadVersion);
        }
        Command::try_from(ver_cmd & 0x0f)?;
    }
    if let Some(&fam) = buf.get(field::FAM) {
        AddressFamily::try_from(fam >> 4)?;
        Transport::try_from(fam & 0x0f)?;
    }
    let header = Header::new_checked(buf)?;
    let repr = Repr::parse(&header)?;
    Ok((repr, header.header_len()))
}

fn read_u16(bytes: &[u8]) -> u16 {
    let mut b = [0u8; 2];
    b.copy_from_slice(bytes);
    u16::from_be_bytes(b)
}

fn read_ipv4(bytes: &[u8]) -> Ipv4Addr {
    let mut b = [0u8; 4];
    b.copy_from_slice(bytes);
    Ipv4Addr::from(b)
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

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn with_sig(rest: &[u8]) -> Vec<u8> {
        let mut v = SIGNATURE.to_vec();
        v.extend_from_slice(rest);
        v
    }

    /// PROXY TCP4 192.0.2.1:56324 -> 198.51.100.10:443, by hand.
    fn tcp4_bytes() -> Vec<u8> {
        with_sig(&[
            0x21, 0x11, 0x00, 0x0c, // v2 PROXY, INET STREAM, len 12
            0xc0, 0x00, 0x02, 0x01, // 192.0.2.1
            0xc6, 0x33, 0x64, 0x0a, // 198.51.100.10
            0xdc, 0x04, 0x01, 0xbb, // 56324, 443
        ])
    }

    /// PROXY UDP4 10.0.0.1:53 -> 10.0.0.2:65535, by hand.
    fn udp4_bytes() -> Vec<u8> {
        with_sig(&[
            0x21, 0x12, 0x00, 0x0c, // v2 PROXY, INET DGRAM, len 12
            0x0a, 0x00, 0x00, 0x01, // 10.0.0.1
            0x0a, 0x00, 0x00, 0x02, // 10.0.0.2
            0x00, 0x35, 0xff, 0xff, // 53, 65535
        ])
    }

    /// PROXY TCP6 [2001:db8::1]:56324 -> [2001:db8::10]:443, by hand.
    fn tcp6_bytes() -> Vec<u8> {
        with_sig(&[
            0x21, 0x21, 0x00, 0x24, // v2 PROXY, INET6 STREAM, len 36
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // 2001:db8::1
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, // 2001:db8::10
            0xdc, 0x04, 0x01, 0xbb, // 56324, 443
        ])
    }

    /// PROXY UDP6 [::1]:0 -> [ff02::1]:1, by hand.
    fn udp6_bytes() -> Vec<u8> {
        with_sig(&[
            0x21, 0x22, 0x00, 0x24, // v2 PROXY, INET6 DGRAM, len 36
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // ::1
            0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // ff02::1
            0x00, 0x00, 0x00, 0x01, // 0, 1
        ])
    }

    /// LOCAL, UNSPEC, no addresses.
    fn local_bytes() -> Vec<u8> {
        with_sig(&[0x20, 0x00, 0x00, 0x00])
    }

    /// TCP4 with a NOOP TLV and an AUTHORITY TLV "example.com".
    fn tcp4_tlv_bytes() -> Vec<u8> {
        let mut v = tcp4_bytes();
        v[15] = 12 + 3 + 3 + 11; // len 29
        v.extend_from_slice(&[0x04, 0x00, 0x00]);
        v.extend_from_slice(&[0x02, 0x00, 0x0b]);
        v.extend_from_slice(b"example.com");
        v
    }

    fn tcp4_repr() -> Repr {
        Repr::proxy(
            Transport::Stream,
            sa("192.0.2.1:56324"),
            sa("198.51.100.10:443"),
        )
    }

    fn udp4_repr() -> Repr {
        Repr::proxy(Transport::Dgram, sa("10.0.0.1:53"), sa("10.0.0.2:65535"))
    }

    fn tcp6_repr() -> Repr {
        Repr::proxy(
            Transport::Stream,
            sa("[2001:db8::1]:56324"),
            sa("[2001:db8::10]:443"),
        )
    }

    fn udp6_repr() -> Repr {
        Repr::proxy(Transport::Dgram, sa("[::1]:0"), sa("[ff02::1]:1"))
    }

    fn tcp4_tlv_repr() -> Repr {
        Repr {
            tlvs: vec![
                (tlv_type::NOOP, vec![]),
                (tlv_type::AUTHORITY, b"example.com".to_vec()),
            ],
            ..tcp4_repr()
        }
    }

    fn known() -> Vec<(Vec<u8>, Repr)> {
        vec![
            (tcp4_bytes(), tcp4_repr()),
            (udp4_bytes(), udp4_repr()),
            (tcp6_bytes(), tcp6_repr()),
            (udp6_bytes(), udp6_repr()),
            (local_bytes(), Repr::local()),
            (tcp4_tlv_bytes(), tcp4_tlv_repr()),
        ]
    }

    fn parse_view(bytes: &[u8]) -> Result<Repr> {
        Repr::parse(&Header::new_unchecked(bytes))
    }

    #[test]
    fn constants() {
        assert_eq!(&SIGNATURE, b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(HEADER_LEN, 16);
        assert_eq!(VERSION, 2);
        assert_eq!(ADDR_LEN_INET, 2 * 4 + 2 * 2);
        assert_eq!(ADDR_LEN_INET6, 2 * 16 + 2 * 2);
        assert_eq!(ADDR_LEN_UNIX, 2 * 108);
        assert_eq!(field::IPV4_DST_PORT.end, HEADER_LEN + ADDR_LEN_INET);
        assert_eq!(field::IPV6_DST_PORT.end, HEADER_LEN + ADDR_LEN_INET6);
        assert_eq!(field::ADDR.start, HEADER_LEN);
    }

    #[test]
    fn enum_values() {
        assert_eq!(u8::from(Command::Local), 0x0);
        assert_eq!(u8::from(Command::Proxy), 0x1);
        assert_eq!(u8::from(AddressFamily::Unspec), 0x0);
        assert_eq!(u8::from(AddressFamily::Inet), 0x1);
        assert_eq!(u8::from(AddressFamily::Inet6), 0x2);
        assert_eq!(u8::from(AddressFamily::Unix), 0x3);
        assert_eq!(u8::from(Transport::Unspec), 0x0);
        assert_eq!(u8::from(Transport::Stream), 0x1);
        assert_eq!(u8::from(Transport::Dgram), 0x2);
        for v in 0..=u8::MAX {
            match Command::try_from(v) {
                Ok(c) => assert_eq!(u8::from(c), v),
                Err(e) => assert!(v > 1 && e == Error::BadCommand),
            }
            match AddressFamily::try_from(v) {
                Ok(f) => assert_eq!(u8::from(f), v),
                Err(e) => assert!(v > 3 && e == Error::BadFamily),
            }
            match Transport::try_from(v) {
                Ok(t) => assert_eq!(u8::from(t), v),
                Err(e) => assert!(v > 2 && e == Error::BadTransport),
            }
        }
    }

    #[test]
    fn address_block_lengths() {
        use AddressFamily::*;
        for t in [Transport::Unspec, Transport::Stream, Transport::Dgram] {
            assert_eq!(address_block_len(Unspec, t), Some(0));
        }
        for (f, n) in [(Inet, 12), (Inet6, 36), (Unix, 216)] {
            assert_eq!(address_block_len(f, Transport::Unspec), None);
            assert_eq!(address_block_len(f, Transport::Stream), Some(n));
            assert_eq!(address_block_len(f, Transport::Dgram), Some(n));
        }
    }

    #[test]
    fn deconstruct_tcp4() {
        let mut bytes = tcp4_bytes();
        bytes.extend_from_slice(b"GET");
        let h = Header::new_checked(&bytes[..]).expect("header");
        assert_eq!(h.signature(), &SIGNATURE);
        assert_eq!(h.version(), 2);
        assert_eq!(h.command(), 1);
        assert_eq!(h.family(), 1);
        assert_eq!(h.transport(), 1);
        assert_eq!(h.addr_len(), 12);
        assert_eq!(h.header_len(), 28);
        assert_eq!(h.address_block_len(), Some(12));
        assert_eq!(h.ipv4_src_addr(), Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(h.ipv4_dst_addr(), Ipv4Addr::new(198, 51, 100, 10));
        assert_eq!(h.ipv4_src_port(), 56324);
        assert_eq!(h.ipv4_dst_port(), 443);
        assert_eq!(h.tlvs().count(), 0);
        assert_eq!(h.payload(), b"GET");
        assert_eq!(h.as_ref(), &bytes[..]);
    }

    #[test]
    fn deconstruct_tcp6() {
        let bytes = tcp6_bytes();
        let h = Header::new_checked(&bytes[..]).expect("header");
        assert_eq!((h.version(), h.command()), (2, 1));
        assert_eq!((h.family(), h.transport()), (2, 1));
        assert_eq!(h.addr_len(), 36);
        assert_eq!(h.header_len(), 52);
        assert_eq!(
            h.ipv6_src_addr(),
            "2001:db8::1".parse::<Ipv6Addr>().expect("a")
        );
        assert_eq!(
            h.ipv6_dst_addr(),
            "2001:db8::10".parse::<Ipv6Addr>().expect("a")
        );
        assert_eq!(h.ipv6_src_port(), 56324);
        assert_eq!(h.ipv6_dst_port(), 443);
        assert_eq!(h.payload(), b"");
    }

    #[test]
    fn deconstruct_udp_and_local() {
        let bytes = udp4_bytes();
        let h = Header::new_checked(&bytes[..]).expect("header");
        assert_eq!(h.transport(), 2);
        assert_eq!(h.ipv4_src_port(), 53);
        assert_eq!(h.ipv4_dst_port(), 65535);
        let bytes = udp6_bytes();
        let h = Header::new_checked(&bytes[..]).expect("header");
        assert_eq!((h.family(), h.transport()), (2, 2));
        assert_eq!(h.ipv6_dst_addr(), "ff02::1".parse::<Ipv6Addr>().expect("a"));
        let bytes = local_bytes();
        let h = Header::new_checked(&bytes[..]).expect("header");
        assert_eq!((h.version(), h.command()), (2, 0));
        assert_eq!((h.family(), h.transport()), (0, 0));
        assert_eq!(h.header_len(), 16);
        assert_eq!(h.address_block_len(), Some(0));
    }

    #[test]
    fn deconstruct_tlvs() {
        let bytes = tcp4_tlv_bytes();
        let h = Header::new_checked(&bytes[..]).expect("header");
        assert_eq!(h.addr_len(), 29);
        let tlvs: Vec<_> = h.tlvs().collect();
        assert_eq!(
            tlvs,
            vec![
                Ok((tlv_type::NOOP, &b""[..])),
                Ok((tlv_type::AUTHORITY, &b"example.com"[..]))
            ]
        );
        assert_eq!(h.payload(), b"");
    }

    #[test]
    fn construct_with_setters() {
        let mut bytes = vec![0xa5u8; 28 + 2];
        let mut h = Header::new_unchecked(&mut bytes[..]);
        h.set_signature();
        h.set_version(2);
        h.set_command(1);
        h.set_family(1);
        h.set_transport(1);
        h.set_addr_len(12);
        h.set_ipv4_src_addr(Ipv4Addr::new(192, 0, 2, 1));
        h.set_ipv4_dst_addr(Ipv4Addr::new(198, 51, 100, 10));
        h.set_ipv4_src_port(56324);
        h.set_ipv4_dst_port(443);
        h.payload_mut().copy_from_slice(b"hi");
        let mut want = tcp4_bytes();
        want.extend_from_slice(b"hi");
        assert_eq!(bytes, want);

        let mut bytes = vec![0u8; 52];
        let mut h = Header::new_unchecked(&mut bytes[..]);
        h.set_signature();
        h.set_version(2);
        h.set_command(1);
        h.set_family(2);
        h.set_transport(1);
        h.set_addr_len(36);
        h.set_ipv6_src_addr("2001:db8::1".parse().expect("a"));
        h.set_ipv6_dst_addr("2001:db8::10".parse().expect("a"));
        h.set_ipv6_src_port(56324);
        h.set_ipv6_dst_port(443);
        assert_eq!(bytes, tcp6_bytes());
    }

    #[test]
    fn nibble_setters_keep_the_other_nibble() {
        let mut bytes = [0u8; 16];
        let mut h = Header::new_unchecked(&mut bytes[..]);
        h.set_version(0xf);
        h.set_command(0x3);
        h.set_family(0x5);
        h.set_transport(0x6);
        assert_eq!((h.version(), h.command()), (0xf, 0x3));
        assert_eq!((h.family(), h.transport()), (0x5, 0x6));
        h.set_command(0x0);
        h.set_transport(0x0);
        assert_eq!((h.version(), h.command()), (0xf, 0x0));
        assert_eq!((h.family(), h.transport()), (0x5, 0x0));
        h.set_version(0x2);
        h.set_family(0x1);
        assert_eq!(bytes[12..14], [0x20, 0x10]);
        // Only the low 4 bits count.
        let mut h = Header::new_unchecked(&mut bytes[..]);
        h.set_command(0xf1);
        h.set_transport(0xf2);
        assert_eq!(bytes[12..14], [0x21, 0x12]);
    }

    #[test]
    fn each_setter_touches_only_its_field() {
        type Setter = fn(&mut Header<&mut [u8]>);
        let cases: [(Field, Setter); 10] = [
            (field::LEN, |h| h.set_addr_len(0xffff)),
            (field::IPV4_SRC_ADDR, |h| {
                h.set_ipv4_src_addr(Ipv4Addr::BROADCAST)
            }),
            (field::IPV4_DST_ADDR, |h| {
                h.set_ipv4_dst_addr(Ipv4Addr::BROADCAST)
            }),
            (field::IPV4_SRC_PORT, |h| h.set_ipv4_src_port(0xffff)),
            (field::IPV4_DST_PORT, |h| h.set_ipv4_dst_port(0xffff)),
            (field::IPV6_SRC_ADDR, |h| {
                h.set_ipv6_src_addr(Ipv6Addr::from([0xff; 16]))
            }),
            (field::IPV6_DST_ADDR, |h| {
                h.set_ipv6_dst_addr(Ipv6Addr::from([0xff; 16]))
            }),
            (field::IPV6_SRC_PORT, |h| h.set_ipv6_src_port(0xffff)),
            (field::IPV6_DST_PORT, |h| h.set_ipv6_dst_port(0xffff)),
            (12..14, |h| {
                h.set_version(0xf);
                h.set_command(0xf);
                h.set_family(0xf);
                h.set_transport(0xf);
            }),
        ];
        for (range, set) in cases {
            let mut bytes = [0u8; 60];
            set(&mut Header::new_unchecked(&mut bytes[..]));
            for (j, b) in bytes.iter().enumerate() {
                let want = if range.contains(&j) { 0xff } else { 0 };
                assert_eq!(*b, want, "field {range:?}, byte {j}");
            }
        }
        let mut bytes = [0u8; 20];
        let mut h = Header::new_unchecked(&mut bytes[..]);
        h.set_signature();
        h.addr_block_mut().fill(0xee);
        assert_eq!(bytes[..12], SIGNATURE);
        assert_eq!(bytes[12..16], [0; 4]);
        assert_eq!(bytes[16..], [0xee; 4]);
    }

    #[test]
    fn parse_known() {
        for (bytes, repr) in known() {
            let h = Header::new_checked(&bytes[..]).expect("header");
            assert_eq!(Repr::parse(&h).as_ref(), Ok(&repr), "{repr}");
            let mut stream = bytes.clone();
            stream.extend_from_slice(b"data");
            assert_eq!(parse(&stream), Ok((repr, bytes.len())));
        }
    }

    #[test]
    fn emit_known() {
        for (bytes, repr) in known() {
            assert_eq!(repr.buffer_len(), bytes.len(), "{repr}");
            assert_eq!(repr.emit_to_vec().as_ref(), Ok(&bytes), "{repr}");
            // emit() writes the header only, leaving the payload alone.
            let mut buf = vec![0u8; bytes.len() + 3];
            buf[bytes.len()..].copy_from_slice(b"xyz");
            repr.emit(&mut Header::new_unchecked(&mut buf[..]));
            assert_eq!(&buf[..bytes.len()], &bytes[..]);
            assert_eq!(&buf[bytes.len()..], b"xyz");
        }
    }

    #[test]
    fn brief_example_tcp4() {
        // TCP4 192.0.2.1:56324 -> 198.51.100.10:443
        let want = [
            0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x21, 0x11,
            0x00, 0x0c, 0xc0, 0x00, 0x02, 0x01, 0xc6, 0x33, 0x64, 0x0a, 0xdc, 0x04, 0x01, 0xbb,
        ];
        assert_eq!(tcp4_repr().emit_to_vec(), Ok(want.to_vec()));
    }

    #[test]
    fn emit_mixed_families_as_inet6() {
        let repr = Repr::proxy(Transport::Stream, sa("192.0.2.1:1"), sa("[2001:db8::10]:2"));
        let bytes = repr.emit_to_vec().expect("emit");
        assert_eq!(bytes.len(), 52);
        assert_eq!(bytes[13], 0x21);
        let h = Header::new_checked(&bytes[..]).expect("header");
        assert_eq!(
            h.ipv6_src_addr(),
            Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped()
        );
        assert_eq!(
            h.ipv6_dst_addr(),
            "2001:db8::10".parse::<Ipv6Addr>().expect("a")
        );
        // Mapped addresses come back as IPv4, so the repr round-trips.
        assert_eq!(Repr::parse(&h), Ok(repr));
    }

    #[test]
    fn emit_mapped_pair_as_inet() {
        let repr = Repr::proxy(
            Transport::Dgram,
            sa("[::ffff:10.0.0.1]:53"),
            sa("[::ffff:10.0.0.2]:65535"),
        );
        assert_eq!(repr.emit_to_vec(), Ok(udp4_bytes()));
    }

    #[test]
    fn parse_inet6_mapped_as_ipv4() {
        let mut bytes = with_sig(&[0x21, 0x22, 0x00, 0x24]);
        bytes.extend_from_slice(&Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().octets());
        bytes.extend_from_slice(&Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped().octets());
        bytes.extend_from_slice(&[0x00, 0x35, 0xff, 0xff]);
        assert_eq!(parse_view(&bytes), Ok(udp4_repr()));
    }

    #[test]
    fn emit_without_addresses() {
        // No addresses: family UNSPEC, transport kept.
        let repr = Repr {
            command: Command::Proxy,
            transport: Transport::Stream,
            addresses: None,
            tlvs: vec![],
        };
        let bytes = repr.emit_to_vec().expect("emit");
        assert_eq!(bytes, with_sig(&[0x21, 0x01, 0x00, 0x00]));
        assert_eq!(parse_view(&bytes), Ok(repr));
        // Transport UNSPEC: addresses are not sent.
        let repr = Repr {
            command: Command::Proxy,
            transport: Transport::Unspec,
            addresses: Some((sa("1.2.3.4:1"), sa("5.6.7.8:2"))),
            tlvs: vec![],
        };
        assert_eq!(repr.buffer_len(), 16);
        let bytes = repr.emit_to_vec().expect("emit");
        assert_eq!(bytes, with_sig(&[0x21, 0x00, 0x00, 0x00]));
        assert_eq!(
            parse_view(&bytes),
            Ok(Repr {
                addresses: None,
                ..repr
            })
        );
    }

    #[test]
    fn local_with_addresses_keeps_them() {
        let mut bytes = tcp4_bytes();
        bytes[12] = 0x20;
        assert_eq!(
            parse_view(&bytes),
            Ok(Repr {
                command: Command::Local,
                ..tcp4_repr()
            })
        );
        let repr = Repr {
            command: Command::Local,
            ..tcp4_repr()
        };
        assert_eq!(repr.emit_to_vec(), Ok(bytes));
    }

    #[test]
    fn local_unspec_with_tlvs() {
        let mut bytes = with_sig(&[0x20, 0x00, 0x00, 0x07]);
        bytes.extend_from_slice(&[0x05, 0x00, 0x04, 1, 2, 3, 4]);
        let repr = Repr {
            tlvs: vec![(tlv_type::UNIQUE_ID, vec![1, 2, 3, 4])],
            ..Repr::local()
        };
        assert_eq!(parse_view(&bytes), Ok(repr.clone()));
        assert_eq!(repr.emit_to_vec(), Ok(bytes));
    }

    #[test]
    fn unix_falls_back_to_unspec() {
        for (fam, transport) in [(0x31, Transport::Stream), (0x32, Transport::Dgram)] {
            let mut bytes = with_sig(&[0x21, fam, 0x00, 216 + 4]);
            bytes.extend_from_slice(&[b'/'; 216]);
            bytes.extend_from_slice(&[0x30, 0x00, 0x01, b'n']);
            assert_eq!(
                parse_view(&bytes),
                Ok(Repr {
                    command: Command::Proxy,
                    transport,
                    addresses: None,
                    tlvs: vec![(tlv_type::NETNS, b"n".to_vec())],
                })
            );
        }
    }

    #[test]
    fn unspec_transport_skips_block_unread() {
        for fam in [0x10, 0x20, 0x30] {
            // Garbage that would be malformed TLVs, were it read.
            let mut bytes = with_sig(&[0x21, fam, 0x00, 0x05]);
            bytes.extend_from_slice(&[0xff; 5]);
            let h = Header::new_checked(&bytes[..]).expect("header");
            assert_eq!(h.address_block_len(), None);
            assert_eq!(h.tlvs().count(), 0);
            assert_eq!(
                Repr::parse(&h),
                Ok(Repr {
                    command: Command::Proxy,
                    transport: Transport::Unspec,
                    addresses: None,
                    tlvs: vec![],
                })
            );
        }
    }

    #[test]
    fn every_family_byte() {
        // A header long enough for any address block, all zero addresses.
        for fam in 0..=u8::MAX {
            let mut bytes = with_sig(&[0x21, fam, 0x00, 216]);
            bytes.resize(16 + 216, 0);
            let got = parse_view(&bytes);
            let (family, transport) = (fam >> 4, fam & 0x0f);
            if family > 3 {
                assert_eq!(got, Err(Error::BadFamily), "{fam:#04x}");
                assert_eq!(parse(&bytes[..14]), Err(Error::BadFamily));
                continue;
            }
            if transport > 2 {
                assert_eq!(got, Err(Error::BadTransport), "{fam:#04x}");
                assert_eq!(parse(&bytes[..14]), Err(Error::BadTransport));
                continue;
            }
            let block = address_block_len(
                AddressFamily::try_from(family).expect("family"),
                Transport::try_from(transport).expect("transport"),
            );
            let repr = match got {
                Ok(repr) => repr,
                // The zero padding after the address block reads as TLVs
                // (type 0, length 0): fine. Anything else is a bug.
                Err(e) => panic!("{fam:#04x}: {e}"),
            };
            assert_eq!(u8::from(repr.transport), transport);
            let want_addrs = match fam {
                0x11 | 0x12 => Some((sa("0.0.0.0:0"), sa("0.0.0.0:0"))),
                0x21 | 0x22 => Some((sa("[::]:0"), sa("[::]:0"))),
                _ => None,
            };
            assert_eq!(repr.addresses, want_addrs, "{fam:#04x}");
            let want_tlvs = match block {
                Some(block) => (216 - block) / 3,
                None => 0,
            };
            assert_eq!(repr.tlvs.len(), want_tlvs, "{fam:#04x}");
        }
    }

    #[test]
    fn every_bad_signature_byte() {
        let good = tcp4_bytes();
        for i in 0..SIGNATURE.len() {
            for v in 0..=u8::MAX {
                if v == SIGNATURE[i] {
                    continue;
                }
                let mut bytes = good.clone();
                bytes[i] = v;
                assert_eq!(
                    parse_view(&bytes),
                    Err(Error::BadSignature),
                    "byte {i} = {v}"
                );
                assert_eq!(parse(&bytes), Err(Error::BadSignature));
                // A stream learns as soon as the bad byte arrives.
                assert_eq!(parse(&bytes[..=i]), Err(Error::BadSignature));
            }
        }
    }

    #[test]
    fn every_bad_version() {
        for version in 0..16u8 {
            let mut bytes = tcp4_bytes();
            bytes[12] = version << 4 | 0x1;
            let got = parse_view(&bytes);
            if version == 2 {
                assert_eq!(got, Ok(tcp4_repr()));
            } else {
                assert_eq!(got, Err(Error::BadVersion), "version {version}");
                assert_eq!(parse(&bytes[..13]), Err(Error::BadVersion));
            }
        }
    }

    #[test]
    fn every_bad_command() {
        for command in 0..16u8 {
            let mut bytes = tcp4_bytes();
            bytes[12] = 0x20 | command;
            let got = parse_view(&bytes);
            match command {
                0 => assert_eq!(got.map(|r| r.command), Ok(Command::Local)),
                1 => assert_eq!(got, Ok(tcp4_repr())),
                _ => {
                    assert_eq!(got, Err(Error::BadCommand), "command {command}");
                    assert_eq!(parse(&bytes[..13]), Err(Error::BadCommand));
                }
            }
        }
    }

    #[test]
    fn every_short_length_field() {
        for (fam, block) in [
            (0x11u8, ADDR_LEN_INET),
            (0x12, ADDR_LEN_INET),
            (0x21, ADDR_LEN_INET6),
            (0x22, ADDR_LEN_INET6),
            (0x31, ADDR_LEN_UNIX),
            (0x32, ADDR_LEN_UNIX),
        ] {
            for len in 0..block as u16 {
                let mut bytes = with_sig(&[0x21, fam]);
                bytes.extend_from_slice(&len.to_be_bytes());
                bytes.resize(16 + ADDR_LEN_UNIX, 0);
                assert_eq!(
                    Header::new_checked(&bytes[..]),
                    Err(Error::BadLength),
                    "{fam:#04x} len {len}"
                );
                assert_eq!(parse_view(&bytes), Err(Error::BadLength));
                // Known to be bad from the fixed part alone: not Truncated.
                assert_eq!(parse(&bytes[..16]), Err(Error::BadLength));
            }
        }
    }

    #[test]
    fn every_truncation_is_rejected() {
        for (bytes, repr) in known() {
            for len in 0..bytes.len() {
                let prefix = &bytes[..len];
                assert_eq!(
                    Header::new_checked(prefix),
                    Err(Error::Truncated),
                    "{repr} len {len}"
                );
                assert_eq!(
                    parse_view(prefix),
                    Err(Error::Truncated),
                    "{repr} len {len}"
                );
                assert_eq!(parse(prefix), Err(Error::Truncated), "{repr} len {len}");
            }
        }
    }

    #[test]
    fn malformed_tlvs() {
        for tail in [
            &[0x04][..],
            &[0x04, 0x00],
            &[0x04, 0x00, 0x01],
            &[0x04, 0x00, 0x05, 1, 2, 3, 4],
            &[0x04, 0xff, 0xff, 1],
            &[0x04, 0x00, 0x00, 0x02],
        ] {
            let mut bytes = tcp4_bytes();
            let len = 12 + tail.len() as u16;
            bytes[14..16].copy_from_slice(&len.to_be_bytes());
            bytes.extend_from_slice(tail);
            // More data after the header does not rescue a TLV.
            bytes.extend_from_slice(&[0; 8]);
            assert_eq!(parse_view(&bytes), Err(Error::Malformed), "{tail:?}");
            assert_eq!(parse(&bytes), Err(Error::Malformed));
            let h = Header::new_checked(&bytes[..]).expect("lengths are fine");
            let items: Vec<_> = h.tlvs().collect();
            assert_eq!(items.last(), Some(&Err(Error::Malformed)));
        }
    }

    #[test]
    fn tlv_iter_on_unchecked_short_buffer_is_empty() {
        let bytes = tcp4_tlv_bytes();
        let h = Header::new_unchecked(&bytes[..30]);
        assert_eq!(h.tlvs().count(), 0);
    }

    #[test]
    fn emit_to_vec_rejects_oversized() {
        let mut repr = tcp4_repr();
        repr.tlvs.push((0xe0, vec![0; 65535 - 12 - 3]));
        let bytes = repr.emit_to_vec().expect("exactly fits");
        assert_eq!(bytes.len(), 16 + 65535);
        assert_eq!(bytes[14..16], [0xff, 0xff]);
        let (back, len) = parse(&bytes).expect("parse");
        assert_eq!((back, len), (repr.clone(), bytes.len()));
        repr.tlvs.push((0xe1, vec![]));
        assert_eq!(repr.emit_to_vec(), Err(Error::BadLength));
        let big = Repr {
            tlvs: vec![(0xe0, vec![0; 70_000])],
            ..Repr::local()
        };
        assert_eq!(big.emit_to_vec(), Err(Error::BadLength));
    }

    #[test]
    fn round_trips() {
        let mut rng = Rng::new(0x7632_0001);
        for _ in 0..5_000 {
            let addr = |rng: &mut Rng| -> SocketAddr {
                let port = rng.next_u64() as u16;
                if rng.below(2) == 0 {
                    SocketAddr::new(Ipv4Addr::from(rng.next_u64() as u32).into(), port)
                } else {
                    let mut b = [0u8; 16];
                    b.copy_from_slice(&rng.bytes(16));
                    // Never IPv4-mapped: those come back as IPv4.
                    b[0] |= 0x20;
                    SocketAddr::new(Ipv6Addr::from(b).into(), port)
                }
            };
            let transport = if rng.below(2) == 0 {
                Transport::Stream
            } else {
                Transport::Dgram
            };
            let addresses = match rng.below(4) {
                0 => None,
                _ => Some((addr(&mut rng), addr(&mut rng))),
            };
            let tlvs = (0..rng.below(4))
                .map(|_| {
                    let len = rng.below(40);
                    (rng.next_u64() as u8, rng.bytes(len))
                })
                .collect();
            let repr = Repr {
                command: if rng.below(2) == 0 {
                    Command::Local
                } else {
                    Command::Proxy
                },
                transport,
                addresses,
                tlvs,
            };
            let mut bytes = repr.emit_to_vec().expect("emit");
            assert_eq!(bytes.len(), repr.buffer_len());
            bytes.extend_from_slice(b"payload");
            assert_eq!(parse(&bytes), Ok((repr.clone(), repr.buffer_len())));
            let h = Header::new_checked(&bytes[..]).expect("header");
            assert_eq!(h.payload(), b"payload");
        }
    }

    #[test]
    fn display() {
        assert_eq!(
            tcp4_repr().to_string(),
            "PROXYv2 PROXY STREAM 192.0.2.1:56324 -> 198.51.100.10:443"
        );
        assert_eq!(Repr::local().to_string(), "PROXYv2 LOCAL UNSPEC");
        assert_eq!(
            tcp4_tlv_repr().to_string(),
            "PROXYv2 PROXY STREAM 192.0.2.1:56324 -> 198.51.100.10:443 tlvs=2"
        );
        let bytes = udp6_bytes();
        assert_eq!(
            Header::new_unchecked(&bytes[..]).to_string(),
            "PROXYv2 PROXY DGRAM [::1]:0 -> [ff02::1]:1"
        );
        assert_eq!(
            Header::new_unchecked(&bytes[..20]).to_string(),
            "PROXYv2 (header truncated)"
        );
    }

    #[test]
    fn no_panic_on_any_input() {
        let mut rng = Rng::new(0x7632_0002);
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        for (base, _) in known() {
            for len in 0..=base.len() {
                inputs.push(base[..len].to_vec());
            }
            for _ in 0..3000 {
                inputs.push(rng.mutate(&base));
            }
        }
        for _ in 0..3000 {
            // Random bytes, and random bytes behind a valid signature.
            let len = rng.below(300);
            inputs.push(rng.bytes(len));
            inputs.push(with_sig(&rng.bytes(len)));
        }
        for input in &inputs {
            let h = Header::new_unchecked(&input[..]);
            let _ = h.to_string();
            let _ = h.tlvs().count();
            if let Ok(repr) = Repr::parse(&h) {
                assert!(h.header_len() <= input.len());
                let _ = h.payload();
                // What we accept re-emits into something that parses the same
                // (UNIX and UNSPEC-transport blocks are not re-emitted).
                let again = repr.emit_to_vec().expect("fits");
                assert_eq!(parse(&again), Ok((repr, again.len())));
            }
            if let Ok((_, len)) = parse(input) {
                assert!(len <= input.len());
            }
        }
    }
}
