//! A small synchronous rtnetlink client: a `netlink-sys` socket carrying
//! `netlink-packet-route` messages, for the few requests the agent makes (route
//! lookups, managed neighbours, address and link dumps) and for the route/link
//! change events that bump the route epoch.
//!
//! Synchronous on purpose: the callers are plain functions, called from async
//! code (where a nested runtime would panic) and from threads that entered another
//! network namespace (`setns`). A socket belongs to the network namespace of the
//! thread that opens it, so each public function of the agent opens a fresh one
//! rather than keeping one around.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{Context as _, bail};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
    NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NlasIterator,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// `struct nlmsghdr`.
const HEADER_LEN: usize = 16;
/// `struct ifinfomsg`, before a link message's attributes.
const IFINFOMSG_LEN: usize = 16;
/// `IFLA_IFNAME`.
const IFLA_IFNAME: u16 = 3;
/// `NLMSGERR_ATTR_MSG`: the kernel's explanation in an extended ack.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// How long the kernel may take to answer one request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// A dump interrupted by a concurrent change (`NLM_F_DUMP_INTR`) is retried this
/// many times before its possibly inconsistent result is used.
const DUMP_ATTEMPTS: usize = 3;

/// The kernel refused a request: the errno and, when it gave one, its explanation
/// (extended ack).
#[derive(Debug)]
pub struct KernelError {
    pub errno: i32,
    pub message: Option<String>,
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // io::Error says "Network is unreachable (os error 101)": keep the words.
        let text = io::Error::from_raw_os_error(self.errno).to_string();
        let text = text
            .split_once(" (os error")
            .map_or(text.as_str(), |(words, _)| words);
        f.write_str(text)?;
        if let Some(message) = &self.message {
            write!(f, " ({message})")?;
        }
        Ok(())
    }
}

impl std::error::Error for KernelError {}

/// One message of a reply: its type (`RTM_*`) and its payload after the netlink
/// header, for the caller to parse.
#[derive(Debug)]
pub struct Reply {
    pub message_type: u16,
    pub payload: Vec<u8>,
}

/// A route netlink socket connected to the kernel, in the network namespace of the
/// thread that opened it.
pub struct Rtnl {
    socket: Socket,
    sequence: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    pub fn open() -> anyhow::Result<Rtnl> {
        let mut socket = Socket::new(NETLINK_ROUTE).context("opening a route netlink socket")?;
        socket
            .bind_auto()
            .context("binding a route netlink socket")?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .context("connecting a route netlink socket to the kernel")?;
        // Best effort: older kernels answer without the explanation or with the
        // whole request echoed, both of which are handled.
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        set_receive_timeout(&socket, REPLY_TIMEOUT)?;
        Ok(Rtnl {
            socket,
            sequence: 0,
            buf: Vec::with_capacity(1 << 16),
        })
    }

    /// Sends `message` and waits for the kernel's acknowledgement, returning the
    /// messages that came before it (a lookup's answer). A refusal is a
    /// `KernelError`.
    pub fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> anyhow::Result<Vec<Reply>> {
        let (replies, _) = self.exchange(message, flags | NLM_F_ACK, false)?;
        Ok(replies)
    }

    /// Dumps every object of a kind (`message` is the `RTM_GET*` request that
    /// selects it).
    pub fn dump(&mut self, message: RouteNetlinkMessage) -> anyhow::Result<Vec<Reply>> {
        let mut attempt = 1;
        loop {
            let (replies, interrupted) = self.exchange(message.clone(), NLM_F_DUMP, true)?;
            if !interrupted || attempt >= DUMP_ATTEMPTS {
                return Ok(replies);
            }
            attempt += 1;
        }
    }

    fn exchange(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
        dump: bool,
    ) -> anyhow::Result<(Vec<Reply>, bool)> {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket
            .send(&bytes, 0)
            .context("sending a netlink request")?;

        let mut replies = Vec::new();
        let mut interrupted = false;
        loop {
            self.receive()?;
            let mut offset = 0;
            while offset + HEADER_LEN <= self.buf.len() {
                let rest = &self.buf[offset..];
                let length = u32_at(rest, 0)? as usize;
                if length < HEADER_LEN || length > rest.len() {
                    bail!(
                        "malformed netlink message (length {length}, {} bytes left)",
                        rest.len()
                    );
                }
                let message_type = u16_at(rest, 4)?;
                let message_flags = u16_at(rest, 6)?;
                let message_sequence = u32_at(rest, 8)?;
                let payload = &rest[HEADER_LEN..length];
                offset += align4(length);
                if message_sequence != sequence {
                    continue; // the answer to an earlier request that gave up
                }
                if message_flags & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                match message_type {
                    NLMSG_NOOP => {}
                    NLMSG_OVERRUN => bail!("the netlink reply overran"),
                    NLMSG_ERROR => {
                        let errno = i32_at(payload, 0)?;
                        if errno == 0 {
                            return Ok((replies, interrupted));
                        }
                        return Err(error_from_ack(errno, message_flags, payload).into());
                    }
                    NLMSG_DONE if dump => {
                        // A dump that failed half-way says so here.
                        let errno = if payload.len() >= 4 {
                            i32_at(payload, 0)?
                        } else {
                            0
                        };
                        if errno != 0 {
                            let message = if message_flags & NLM_F_ACK_TLVS != 0 {
                                ack_message(payload.get(4..).unwrap_or_default())
                            } else {
                                None
                            };
                            return Err(KernelError {
                                errno: errno.saturating_abs(),
                                message,
                            }
                            .into());
                        }
                        return Ok((replies, interrupted));
                    }
                    _ => replies.push(Reply {
                        message_type,
                        payload: payload.to_vec(),
                    }),
                }
            }
        }
    }

    /// Receives one datagram into `self.buf`, however large.
    fn receive(&mut self) -> anyhow::Result<()> {
        loop {
            self.buf.clear();
            let size = match self
                .socket
                .recv(&mut self.buf, libc::MSG_PEEK | libc::MSG_TRUNC)
            {
                Ok(size) => size,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    bail!("the kernel did not answer a netlink request within {REPLY_TIMEOUT:?}")
                }
                Err(err) => return Err(err).context("receiving a netlink reply"),
            };
            self.buf.clear();
            self.buf.reserve(size);
            match self.socket.recv(&mut self.buf, 0) {
                Ok(_) => return Ok(()),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err).context("receiving a netlink reply"),
            }
        }
    }
}

fn set_receive_timeout(socket: &Socket, timeout: Duration) -> anyhow::Result<()> {
    let value = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the fd is open for the socket's life and `value` is a valid timeval
    // of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const value).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("setting a netlink receive timeout");
    }
    Ok(())
}

/// The error an `NLMSG_ERROR` carries: errno, then the request's header (alone when
/// capped) and, with extended acks, attributes such as the kernel's message.
fn error_from_ack(errno: i32, flags: u16, payload: &[u8]) -> KernelError {
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        let request_len = if flags & NLM_F_CAPPED != 0 {
            Some(HEADER_LEN)
        } else {
            u32_at(payload, 4).ok().map(|len| align4(len as usize))
        };
        if let Some(attributes) = request_len.and_then(|len| payload.get(4 + len..)) {
            message = ack_message(attributes);
        }
    }
    KernelError {
        errno: errno.saturating_abs(),
        message,
    }
}

fn ack_message(attributes: &[u8]) -> Option<String> {
    NlasIterator::new(attributes)
        .filter_map(Result::ok)
        .find(|nla| nla.kind() == NLMSGERR_ATTR_MSG)
        .map(|nla| c_string(nla.value()))
        .filter(|text| !text.is_empty())
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn bytes_at<const N: usize>(buf: &[u8], offset: usize) -> anyhow::Result<[u8; N]> {
    buf.get(offset..offset + N)
        .and_then(|b| <[u8; N]>::try_from(b).ok())
        .with_context(|| format!("netlink message too short ({} bytes)", buf.len()))
}

fn u16_at(buf: &[u8], offset: usize) -> anyhow::Result<u16> {
    bytes_at(buf, offset).map(u16::from_ne_bytes)
}

fn u32_at(buf: &[u8], offset: usize) -> anyhow::Result<u32> {
    bytes_at(buf, offset).map(u32::from_ne_bytes)
}

fn i32_at(buf: &[u8], offset: usize) -> anyhow::Result<i32> {
    bytes_at(buf, offset).map(i32::from_ne_bytes)
}

/// Every link of the namespace: index → name. Parsed by hand (index and
/// `IFLA_IFNAME` only), so a link attribute this crate version does not know
/// cannot make the whole dump fail.
pub fn link_names(rtnl: &mut Rtnl) -> anyhow::Result<BTreeMap<u32, String>> {
    let request = RouteNetlinkMessage::GetLink(Default::default());
    let mut names = BTreeMap::new();
    for reply in rtnl.dump(request).context("listing links (RTM_GETLINK)")? {
        if reply.message_type != libc::RTM_NEWLINK {
            continue;
        }
        let index = u32_at(&reply.payload, 4).context("link message")?;
        let Some(attributes) = reply.payload.get(IFINFOMSG_LEN..) else {
            continue;
        };
        if let Some(name) = NlasIterator::new(attributes)
            .filter_map(Result::ok)
            .find(|nla| nla.kind() == IFLA_IFNAME)
            .map(|nla| c_string(nla.value()))
        {
            names.insert(index, name);
        }
    }
    Ok(names)
}

/// The name of interface `index` in the calling thread's network namespace.
pub fn interface_name(index: u32) -> anyhow::Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write.
    let name = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if name.is_null() {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("no interface with index {index}"));
    }
    // SAFETY: on success if_indextoname wrote a NUL-terminated name into `buf`.
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}

/// Runs tests in a network namespace of their own, so they can change links,
/// addresses and routes without touching the host's.
#[cfg(test)]
pub(crate) mod test_netns {
    use std::process::Command;

    /// Runs `f` on a thread that entered a new, empty network namespace (only `lo`,
    /// brought up), which disappears when the thread ends. `None` (the test is
    /// skipped) without the privilege to make one.
    pub fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let thread = std::thread::spawn(move || {
            // SAFETY: unshare only changes this thread's network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!(
                    "skipped: cannot make a network namespace: {}",
                    std::io::Error::last_os_error()
                );
                return None;
            }
            ip(&["link", "set", "lo", "up"]);
            Some(f())
        });
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// An address written in a test.
    pub fn addr(text: &str) -> std::net::IpAddr {
        text.parse().expect("test address")
    }

    /// Runs `ip ARGS` in the calling thread's network namespace (a child process
    /// inherits the namespace of the thread that starts it).
    pub fn ip(args: &[&str]) {
        let output = Command::new("ip")
            .args(args)
            .output()
            .expect("running ip (iproute2)");
        assert!(
            output.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A veth pair, `veth0` (192.0.2.1/24, 2001:db8::1/64, default routes via
    /// 192.0.2.254 and 2001:db8::fe) and `veth1` (no address), both up.
    pub fn veth_lab() {
        ip(&[
            "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
        ]);
        ip(&["link", "set", "veth0", "up"]);
        ip(&["link", "set", "veth1", "up"]);
        ip(&["addr", "add", "192.0.2.1/24", "dev", "veth0"]);
        ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8::1/64",
            "dev",
            "veth0",
            "nodad",
        ]);
        ip(&[
            "route",
            "add",
            "default",
            "via",
            "192.0.2.254",
            "dev",
            "veth0",
        ]);
        ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8::fe",
            "dev",
            "veth0",
        ]);
    }
}
