//! The listening sockets of TCP apps (the sysctls they rely on, SYN cookies and
//! `somaxconn`, are set by the agent through `crate::host`).
//!
//! Each app has one IPv6 dual-stack socket (`IPV6_V6ONLY` = 0, so IPv4 clients arrive
//! as `::ffff:a.b.c.d`) bound to `[::]:0`. Its own port does not matter: the sk_lookup
//! program hands it every connection for the app's ports on the app's edge addresses
//! (the kernel's `bpf_sk_assign` for sk_lookup accepts an IPv4 connection on an IPv6
//! socket only when the socket is dual-stack, hence the wildcard bind: binding an
//! IPv6 address other than `::` would make the socket IPv6-only).

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        let err = io::Error::last_os_error();
        Err(io::Error::new(err.kind(), format!("{what}: {err}")))
    } else {
        Ok(())
    }
}

fn set_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
    what: &str,
) -> io::Result<()> {
    // SAFETY: valid fd, pointer to a c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(rc, what)
}

/// A non-blocking, dual-stack listening socket on `[::]:0` with `backlog`.
pub fn open(backlog: i32) -> io::Result<TcpListener> {
    // SAFETY: plain socket(2); the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET6,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_TCP,
        )
    };
    check(raw, "socket(AF_INET6, SOCK_STREAM)")?;
    // SAFETY: `raw` is a fresh socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_int(
        &fd,
        libc::IPPROTO_IPV6,
        libc::IPV6_V6ONLY,
        0,
        "IPV6_V6ONLY=0",
    )?;
    set_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "SO_REUSEADDR")?;
    // Accepted sockets inherit it: no setsockopt per connection.
    set_int(&fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1, "TCP_NODELAY")?;
    // SAFETY: all-zero is a valid sockaddr_in6 ([::]:0).
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    // SAFETY: `addr` is a valid sockaddr_in6 of the given length.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    check(rc, "bind([::]:0)")?;
    // SAFETY: valid fd.
    check(unsafe { libc::listen(fd.as_raw_fd(), backlog) }, "listen")?;
    Ok(TcpListener::from(fd))
}

/// Accept errors that concern one connection only (it was reset or aborted before
/// accept got to it); the listener is fine.
pub fn accept_error_is_transient(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    ) || err.kind() == io::ErrorKind::Interrupted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_is_dual_stack_nonblocking_and_listening() {
        let listener = open(128).expect("listener");
        let local = listener.local_addr().expect("local addr");
        assert!(local.is_ipv6());
        assert_ne!(local.port(), 0, "listen autobinds a port");
        let fd = listener.as_raw_fd();
        let mut v6only: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid fd and out pointers.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&mut v6only as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(v6only, 0);
        // IPv4 arrives on it (here through its own port on loopback).
        let port = local.port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect v4");
        let (_, peer) = loop {
            match listener.accept() {
                Ok(pair) => break pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("accept: {e}"),
            }
        };
        assert_eq!(
            crate::wire::unmap_socket_addr(peer),
            client.local_addr().unwrap()
        );
        assert!(
            listener
                .accept()
                .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)
        );
    }

    #[test]
    fn transient_accept_errors() {
        assert!(accept_error_is_transient(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
        assert!(!accept_error_is_transient(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(!accept_error_is_transient(&io::Error::from_raw_os_error(
            libc::EAGAIN
        )));
    }
}
