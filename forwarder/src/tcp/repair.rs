//! Reading a connected TCP socket's sequence state with `TCP_REPAIR` (the kernel's
//! checkpoint/restore interface, as CRIU uses it) and retiring the socket without a
//! segment on the wire: the socket half of the XDP splice handoff (docs/tcp.md,
//! "XDP splice"). Needs `CAP_NET_ADMIN`.
//!
//! Observed on Linux 6.18 (a loopback pair, `unshare -n`): the queue sequence
//! numbers of one end equal the other's; a socket closed while in repair mode
//! sends nothing (the peer stays established) and the peer's next segment is
//! answered with an RST by the kernel, which no longer has a socket for it.

use std::io;
use std::mem::{MaybeUninit, size_of};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use super::fastpath::LegState;

// From linux/tcp.h (not all in the libc crate).
const TCP_REPAIR: libc::c_int = 19;
const TCP_REPAIR_QUEUE: libc::c_int = 20;
const TCP_QUEUE_SEQ: libc::c_int = 21;
const TCP_TIMESTAMP: libc::c_int = 24;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
/// Leaves repair mode without the window probe `TCP_REPAIR = 0` sends.
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;

/// `setsockopt(IPPROTO_TCP, option, value)`.
pub(crate) fn setsockopt_int(fd: RawFd, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: valid fd; pointer to an int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            option,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `getsockopt(IPPROTO_TCP, option)` of a 4-byte value.
pub(crate) fn getsockopt_u32(fd: RawFd, option: libc::c_int) -> io::Result<u32> {
    getsockopt_at(fd, libc::IPPROTO_TCP, option)
}

/// `getsockopt(level, option)` of a 4-byte value.
fn getsockopt_at(fd: RawFd, level: libc::c_int, option: libc::c_int) -> io::Result<u32> {
    let mut value = 0u32;
    let mut len = size_of::<u32>() as libc::socklen_t;
    // SAFETY: valid fd; pointer to a u32 and its length.
    let rc =
        unsafe { libc::getsockopt(fd, level, option, (&mut value as *mut u32).cast(), &mut len) };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn tcp_info(fd: RawFd) -> io::Result<libc::tcp_info> {
    let mut info = MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd; pointer to a tcp_info and its length; zeroed is valid.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised, then filled by the kernel.
    Ok(unsafe { info.assume_init() })
}

/// Bytes queued on the socket: not yet read (`SIOCINQ`), or not yet acknowledged
/// by the peer (`SIOCOUTQ`).
fn queued(fd: RawFd, request: libc::Ioctl) -> io::Result<u32> {
    let mut n: libc::c_int = 0;
    // SAFETY: valid fd; the ioctl writes one int.
    let rc = unsafe { libc::ioctl(fd, request, &mut n) };
    if rc == 0 {
        Ok(n.max(0) as u32)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether the peer's FIN has arrived (`CLOSE_WAIT` or later): a half-closed
/// connection cannot be handed over (its FIN would sit in the retired socket).
pub fn peer_closed(sock: &impl AsRawFd) -> io::Result<bool> {
    // include/net/tcp_states.h: ESTABLISHED, FIN_WAIT1, FIN_WAIT2 (libc has no names).
    const STILL_OPEN_FROM_THE_PEER: [u8; 3] = [1, 4, 5];
    let state = tcp_info(sock.as_raw_fd())?.tcpi_state;
    Ok(!STILL_OPEN_FROM_THE_PEER.contains(&state))
}

/// Whether the socket is quiet: nothing unread, nothing unacknowledged.
pub fn is_quiet(sock: &impl AsRawFd) -> io::Result<bool> {
    let fd = sock.as_raw_fd();
    Ok(queued(fd, libc::FIONREAD)? == 0 && queued(fd, libc::TIOCOUTQ)? == 0)
}

/// Puts the socket in repair mode and reads its state. The socket stays in repair
/// mode: the caller then [`retire`]s it or [`resume`]s it.
pub fn enter_and_read(
    sock: &impl AsRawFd,
    local: SocketAddr,
    peer: SocketAddr,
    ifindex: u32,
) -> io::Result<LegState> {
    let fd = sock.as_raw_fd();
    let info = tcp_info(fd)?;
    setsockopt_int(fd, TCP_REPAIR, 1)?;
    let read = || -> io::Result<LegState> {
        let (snd_nxt, rcv_nxt) = queue_seqs(sock)?;
        let ts_clock = getsockopt_u32(fd, TCP_TIMESTAMP)?;
        let options = info.tcpi_options;
        // tcpi_snd_wscale:4, tcpi_rcv_wscale:4 share one byte (snd in the low half).
        let wscales = info.tcpi_snd_rcv_wscale;
        Ok(LegState {
            local,
            peer,
            snd_nxt,
            rcv_nxt,
            wscale: options & TCPI_OPT_WSCALE != 0,
            snd_wscale: wscales & 0x0f,
            rcv_wscale: wscales >> 4,
            timestamps: options & TCPI_OPT_TIMESTAMPS != 0,
            sack: options & TCPI_OPT_SACK != 0,
            ts_clock,
            urgent: false,
            ifindex,
            advmss: info.tcpi_advmss,
            path_mtu: path_mtu(fd, local).unwrap_or(0),
        })
    };
    read().inspect_err(|_| {
        let _ = resume(sock);
    })
}

/// The MTU of a connected socket's route (`IP_MTU`, `IPV6_MTU`, by the family of
/// its local address). An IPv4 client accepted on the agent's IPv6 socket may
/// give an error here; callers take 0, not known.
fn path_mtu(fd: RawFd, local: SocketAddr) -> io::Result<u32> {
    match local {
        SocketAddr::V4(_) => getsockopt_at(fd, libc::IPPROTO_IP, libc::IP_MTU),
        SocketAddr::V6(_) => getsockopt_at(fd, libc::IPPROTO_IPV6, libc::IPV6_MTU),
    }
}

/// The send and receive queue sequence numbers of a socket in repair mode.
pub fn queue_seqs(sock: &impl AsRawFd) -> io::Result<(u32, u32)> {
    let fd = sock.as_raw_fd();
    setsockopt_int(fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
    let snd = getsockopt_u32(fd, TCP_QUEUE_SEQ)?;
    setsockopt_int(fd, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
    let rcv = getsockopt_u32(fd, TCP_QUEUE_SEQ)?;
    Ok((snd, rcv))
}

/// Takes the socket out of repair mode: it carries on as before (the fallback
/// when the connection is not spliced after all).
pub fn resume(sock: &impl AsRawFd) -> io::Result<()> {
    setsockopt_int(sock.as_raw_fd(), TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
}

/// Retires a socket that is in repair mode: `connect(AF_UNSPEC)` disconnects it
/// (`tcp_disconnect`, which in repair mode sends neither FIN nor RST) and takes it
/// out of the kernel's connection table, so the connection lives on in the XDP
/// splice only. The fd stays open until its owner drops it (the connection task
/// keeps its `TcpStream`s to the end; closing a disconnected socket sends nothing).
pub fn retire(sock: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: an all-zero sockaddr with family AF_UNSPEC; valid fd.
    let rc = unsafe {
        let mut addr: libc::sockaddr = std::mem::zeroed();
        addr.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(
            sock.as_raw_fd(),
            &addr,
            size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use super::*;

    fn root() -> bool {
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// A connected loopback pair that has exchanged `n` bytes each way.
    fn pair(n: usize) -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut a, _) = listener.accept().unwrap();
        for s in [&c, &a] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let mut buf = vec![0u8; n];
        c.write_all(&vec![1u8; n]).unwrap();
        a.read_exact(&mut buf).unwrap();
        a.write_all(&vec![2u8; n]).unwrap();
        c.read_exact(&mut buf).unwrap();
        (c, a)
    }

    /// The peer's FIN, and only that, makes a socket peer-closed; our own
    /// half-close does not.
    #[test]
    fn peer_closed_is_the_peers_fin() {
        let (c, a) = pair(10);
        assert!(!peer_closed(&a).unwrap());
        a.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!peer_closed(&a).unwrap(), "our own FIN (FIN_WAIT2)");
        assert!(peer_closed(&c).unwrap(), "the peer's FIN (CLOSE_WAIT)");
    }

    #[test]
    fn the_state_of_one_end_matches_the_other_and_resume_carries_on() {
        if !root() {
            eprintln!("skipping: TCP_REPAIR needs CAP_NET_ADMIN");
            return;
        }
        let (mut c, mut a) = pair(3000);
        // The last ACK may still be on its way on a loaded machine.
        for _ in 0..100 {
            if is_quiet(&c).unwrap() && is_quiet(&a).unwrap() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(is_quiet(&c).unwrap() && is_quiet(&a).unwrap(), "both quiet");
        let (cl, al) = (c.local_addr().unwrap(), a.local_addr().unwrap());
        let cs = enter_and_read(&c, cl, al, 1).unwrap();
        let as_ = enter_and_read(&a, al, cl, 1).unwrap();
        assert_eq!(
            cs.snd_nxt, as_.rcv_nxt,
            "client's next byte = acceptor's expected"
        );
        assert_eq!(as_.snd_nxt, cs.rcv_nxt, "and the other way");
        // Linux defaults on loopback: every option on both ends.
        assert!(cs.timestamps && cs.sack && cs.wscale);
        assert_eq!(cs.snd_wscale, as_.rcv_wscale);
        assert_eq!(cs.rcv_wscale, as_.snd_wscale);
        resume(&c).unwrap();
        resume(&a).unwrap();
        c.write_all(b"again").unwrap();
        let mut buf = [0u8; 5];
        a.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"again", "the socket path works after resume");
    }

    #[test]
    fn a_retired_socket_sends_nothing_and_the_kernel_resets_the_peer_later() {
        if !root() {
            eprintln!("skipping: TCP_REPAIR needs CAP_NET_ADMIN");
            return;
        }
        let (mut c, a) = pair(100);
        let (cl, al) = (c.local_addr().unwrap(), a.local_addr().unwrap());
        enter_and_read(&a, al, cl, 1).unwrap();
        retire(&a).unwrap();
        // No FIN arrived: a read times out instead of returning 0.
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 1];
        let err = c.read(&mut buf).expect_err("no FIN, no data");
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{err}"
        );
        // The peer's next segment finds no socket: the kernel answers with RST.
        c.write_all(b"x").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let err = c.read(&mut buf).expect_err("reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        // Closing the retired socket's fd sends nothing either.
        drop(a);
    }
}
