//! The open-file limit. The agent holds two sockets per proxied TCP connection (two
//! pipes more with `tcp_splice = "on"`), plus its listeners, maps and control
//! sockets: the usual soft limit of 1024 would cap it at a few hundred connections.
//! At start it raises the soft limit to the hard limit (which an unprivileged
//! process may do; the systemd unit sets the hard limit with `LimitNOFILE`).

use std::io;

/// File descriptors kept free of proxied connections: the control socket and its
/// clients, metrics scrapes, listeners, maps and programs, netlink, the event log.
/// The agent refuses connections beyond (soft limit − this) / fds per connection.
pub const RESERVED_FDS: u64 = 256;

/// The soft `RLIMIT_NOFILE` now.
pub fn soft() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit.rlim_cur)
}

/// How many proxied connections fit in `soft_limit` fds at `fds_per_connection`
/// each, with `RESERVED_FDS` kept free.
pub fn connection_capacity(soft_limit: u64, fds_per_connection: u64) -> u64 {
    soft_limit.saturating_sub(RESERVED_FDS) / fds_per_connection.max(1)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (old soft, new soft).
pub fn raise_to_hard() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let old = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above; raising the soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((old, limit.rlim_cur))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_keeps_the_reserve() {
        assert_eq!(connection_capacity(1024, 2), 384);
        assert_eq!(connection_capacity(1024, 6), 128);
        assert_eq!(connection_capacity(100, 2), 0);
    }

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let (_, new) = raise_to_hard().expect("rlimit");
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid out-pointer.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(limit.rlim_cur, limit.rlim_max);
        assert_eq!(new, limit.rlim_cur);
    }
}
