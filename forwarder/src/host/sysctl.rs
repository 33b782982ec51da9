//! The sysctls the agent changes, each journaled with its original value before it
//! is written ([`HostState::set_sysctl`]). All of them are per network namespace,
//! written in the agent's own.

use anyhow::Context as _;
use log::info;

use super::state::{HostState, SysctlRecord};

/// `net.ipv4.tcp_syncookies`: 1 = send cookies when a listener's SYN queue overflows.
pub const SYNCOOKIES: &str = "/proc/sys/net/ipv4/tcp_syncookies";
/// `net.core.somaxconn`: the cap on every listen backlog.
pub const SOMAXCONN: &str = "/proc/sys/net/core/somaxconn";

/// `net.<family>.conf.<interface>.forwarding` (`family`: `ipv4` or `ipv6`).
pub fn forwarding_sysctl(family: &str, interface: &str) -> String {
    format!("/proc/sys/net/{family}/conf/{interface}/forwarding")
}

/// The dotted name of a sysctl path, for the log (`net.core.somaxconn`).
fn dotted(path: &str) -> String {
    path.strip_prefix("/proc/sys/")
        .map_or_else(|| path.to_string(), |key| key.replace('/', "."))
}

fn read_sysctl(path: &str) -> std::io::Result<String> {
    std::fs::read_to_string(path).map(|text| text.trim().to_string())
}

impl HostState {
    /// Writes `value` to the sysctl `path` unless it holds it already. The value it
    /// had before the agent's first change of it is journaled first. Returns the
    /// value replaced, if any.
    pub fn set_sysctl(&mut self, path: &str, value: &str) -> anyhow::Result<Option<String>> {
        let current = read_sysctl(path).with_context(|| format!("reading {path}"))?;
        if current == value {
            return Ok(None);
        }
        let journal = self.journal_mut();
        match journal.sysctls.iter_mut().find(|r| r.path == path) {
            Some(record) => record.set = value.to_string(),
            None => journal.sysctls.push(SysctlRecord {
                path: path.to_string(),
                original: current.clone(),
                set: value.to_string(),
            }),
        }
        self.save()?;
        std::fs::write(path, value).with_context(|| format!("writing {value} to {path}"))?;
        Ok(Some(current))
    }

    /// The kernel's route-lookup helper for XDP refuses interfaces without
    /// forwarding enabled (`BPF_FIB_LKUP_RET_FWD_DISABLED`, even for output
    /// lookups), so the UDP fast path needs `forwarding=1` on the interfaces it
    /// sends from, for each family its UDP apps use. Each change is logged and put
    /// back on exit.
    pub fn enable_forwarding(
        &mut self,
        interfaces: &[String],
        ipv4: bool,
        ipv6: bool,
    ) -> anyhow::Result<()> {
        for interface in interfaces {
            for (wanted, family) in [(ipv4, "ipv4"), (ipv6, "ipv6")] {
                if !wanted {
                    continue;
                }
                let path = forwarding_sysctl(family, interface);
                if let Some(previous) = self
                    .set_sysctl(&path, "1")
                    .with_context(|| format!("enabling forwarding on {interface}"))?
                {
                    info!(
                        "{interface}: set net.{family}.conf.{interface}.forwarding=1 (was \
                         {previous}): the XDP UDP fast path needs it; it is restored on exit"
                    );
                }
            }
        }
        Ok(())
    }

    /// For TCP apps' listeners: turns SYN cookies on (value 1) if they are off, and
    /// raises `net.core.somaxconn` to `backlog` if it is lower, with a log line for
    /// each change; both are put back on exit. A value of 2 (cookies always) is left
    /// alone: cookies are on either way.
    pub fn prepare_tcp_listeners(&mut self, backlog: i32) -> anyhow::Result<()> {
        if read_sysctl(SYNCOOKIES)
            .with_context(|| format!("reading {SYNCOOKIES}"))?
            .as_str()
            == "0"
        {
            self.set_sysctl(SYNCOOKIES, "1")?;
            info!(
                "net.ipv4.tcp_syncookies: 0 -> 1 (SYN cookies when a listener's SYN queue \
                 overflows; restored on exit)"
            );
        }
        let somaxconn: i64 = read_sysctl(SOMAXCONN)
            .with_context(|| format!("reading {SOMAXCONN}"))?
            .parse()
            .context("net.core.somaxconn is not a number")?;
        if somaxconn < i64::from(backlog) {
            self.set_sysctl(SOMAXCONN, &backlog.to_string())?;
            info!(
                "net.core.somaxconn: {somaxconn} -> {backlog} (the TCP apps' listen backlog; \
                 restored on exit)"
            );
        }
        Ok(())
    }
}

/// Puts a journaled sysctl back to its original value, if it still holds the
/// agent's value. Returns what was done, for the log.
pub(crate) fn restore_sysctl(record: &SysctlRecord) -> anyhow::Result<String> {
    let name = dotted(&record.path);
    let current = match read_sysctl(&record.path) {
        Ok(current) => current,
        // The interface (and its sysctls) went away.
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Ok(format!("{name}: gone (its interface was removed)"));
        }
        Err(err) => return Err(err).with_context(|| format!("reading {}", record.path)),
    };
    if current == record.original {
        return Ok(format!("{name}={current} (already the original value)"));
    }
    if current != record.set {
        return Ok(format!(
            "{name}={current} left as it is: changed by someone else since the agent set {}",
            record.set
        ));
    }
    std::fs::write(&record.path, &record.original)
        .with_context(|| format!("writing {} to {}", record.original, record.path))?;
    Ok(format!(
        "restored {name}={} (the agent had set {})",
        record.original, record.set
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_for_the_log() {
        assert_eq!(dotted(SOMAXCONN), "net.core.somaxconn");
        assert_eq!(
            dotted(&forwarding_sysctl("ipv6", "eth0")),
            "net.ipv6.conf.eth0.forwarding"
        );
        assert_eq!(dotted("/tmp/x"), "/tmp/x");
    }

    #[test]
    fn forwarding_is_enabled_and_restored_in_a_namespace() {
        let Some(()) = crate::host::netlink::test_netns::in_new_netns(|| {
            crate::host::netlink::test_netns::veth_lab();
            let dir = std::env::temp_dir().join(format!(
                "fwd-sysctl-test-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let v4 = forwarding_sysctl("ipv4", "veth0");
            let v6 = forwarding_sysctl("ipv6", "veth0");
            std::fs::write(&v4, "0").expect("v4 forwarding off");
            std::fs::write(&v6, "0").expect("v6 forwarding off");
            std::fs::write(SOMAXCONN, "1000").expect("somaxconn");
            std::fs::write(SYNCOOKIES, "0").expect("syncookies");
            let mut state = HostState::acquire(&dir, None).expect("lock");
            state
                .enable_forwarding(&["veth0".to_string()], true, true)
                .expect("forwarding");
            state.prepare_tcp_listeners(65535).expect("tcp sysctls");
            for path in [&v4, &v6] {
                assert_eq!(read_sysctl(path).expect("read"), "1");
            }
            assert_eq!(read_sysctl(SOMAXCONN).expect("read"), "65535");
            assert_eq!(read_sysctl(SYNCOOKIES).expect("read"), "1");
            state.restore();
            for path in [&v4, &v6] {
                assert_eq!(read_sysctl(path).expect("read"), "0");
            }
            assert_eq!(read_sysctl(SOMAXCONN).expect("read"), "1000");
            assert_eq!(read_sysctl(SYNCOOKIES).expect("read"), "0");
            assert!(!state.journal_path().exists());
            drop(state);
            let _ = std::fs::remove_dir_all(&dir);
        }) else {
            return;
        };
    }
}
