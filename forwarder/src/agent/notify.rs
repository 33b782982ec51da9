//! The systemd notification protocol (`sd_notify(3)`), spoken directly: one
//! datagram per state change to the unix socket in `$NOTIFY_SOCKET` (a path, or
//! an abstract name written with a leading `@`). The unit runs the agent with
//! `Type=notify`: systemd learns when it is ready (`READY=1`), when a reload
//! begins and ends (`RELOADING=1` … `READY=1`, which `Type=notify-reload` on
//! systemd ≥ 253 waits for), what it is doing (`STATUS=`), that it is stopping,
//! and — with `WatchdogSec=` — that its agent thread still answers (`WATCHDOG=1`).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go; `None` outside systemd.
pub struct Notifier {
    socket: UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
}

impl Notifier {
    /// The notifier of `$NOTIFY_SOCKET`, if the agent runs under a service manager.
    pub fn from_env() -> Option<Notifier> {
        let target = std::env::var_os("NOTIFY_SOCKET")?;
        let target = target.to_string_lossy().into_owned();
        let addr = match target.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            }
            None => std::os::unix::net::SocketAddr::from_pathname(&target),
        };
        let addr = match addr {
            Ok(addr) => addr,
            Err(err) => {
                log::warn!("NOTIFY_SOCKET {target:?} is not a socket address: {err}");
                return None;
            }
        };
        match UnixDatagram::unbound() {
            Ok(socket) => Some(Notifier { socket, addr }),
            Err(err) => {
                log::warn!("no socket for systemd notifications: {err}");
                None
            }
        }
    }

    /// Sends `state` (newline-separated `KEY=VALUE` lines). Failures are logged
    /// once in a while, never fatal: the service manager may be gone.
    pub fn send(&self, state: &str) {
        if let Err(err) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            log::debug!("systemd notification {state:?} failed: {err}");
        }
    }

    /// `RELOADING=1` with the monotonic time systemd wants with it.
    pub fn reloading(&self) {
        let usec = crate::udp_flows::monotonic_ns() / 1000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, if it is set for
/// this process (`$WATCHDOG_PID` absent or ours).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID")
        && pid.to_string_lossy() != std::process::id().to_string()
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_reaches_the_socket() {
        let dir = std::env::temp_dir().join(format!("fwd-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            socket: UnixDatagram::unbound().unwrap(),
            addr: std::os::unix::net::SocketAddr::from_pathname(&path).unwrap(),
        };
        notifier.send("READY=1\nSTATUS=serving");
        notifier.reloading();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        let n = listener.recv(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
