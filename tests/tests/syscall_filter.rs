//! The shipped unit's `SystemCallFilter=` lets through every system call the agent
//! makes: the agent runs under `strace -f -c` through a session that exercises what
//! it does in production (start, UDP and TCP traffic with both forwarding engines,
//! `stats`, `/metrics`, a reload, an event-log reopen, a clean stop), and every
//! system call strace counted must be in the filter's groups as
//! `systemd-analyze syscall-filter` expands them. (There is no systemd to run the
//! agent under the filter itself in this lab.)

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use forwarder_tests::agent::{AgentProcess, forwarder_bin};
use forwarder_tests::spp_origin::UdpEchoOrigin;
use forwarder_tests::{CLIENT_V4, EDGE_CLIENT_V4, Lab, ORIGIN_V4, require_root};

/// The groups and names of the unit's `SystemCallFilter=` lines.
fn unit_filter() -> Vec<String> {
    let unit = include_str!("../../examples/forwarder.service");
    unit.lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
        .flat_map(|l| l.split_whitespace().map(String::from))
        .collect()
}

/// System call names in `group` (recursively), as systemd knows them.
fn expand(group: &str, seen: &mut BTreeSet<String>) -> BTreeSet<String> {
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", group])
        .output()
        .expect("systemd-analyze syscall-filter");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t == group {
            continue;
        }
        if t.starts_with('@') {
            if seen.insert(t.to_string()) {
                names.extend(expand(t, seen));
            }
        } else {
            names.insert(t.to_string());
        }
    }
    names
}

/// The system call names of `strace -c` output files in `dir`.
fn traced(dir: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(dir).expect("trace dir") {
        let path = entry.expect("entry").path();
        if !path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("trace."))
        {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap_or_default().lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            // "% time  seconds  usecs/call  calls  [errors]  syscall"
            if parts.len() >= 5
                && parts[0].chars().next().is_some_and(|c| c.is_ascii_digit())
                && let Some(name) = parts.last()
                && *name != "total"
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// The pid of the `forwarder` process below `pid` (strace's child, maybe behind
/// the `ip netns exec` and shell of the wrapper).
fn agent_under_strace(pid: u32) -> Option<i32> {
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
        if comm.trim() == "forwarder" {
            return i32::try_from(p).ok();
        }
        for task in std::fs::read_dir(format!("/proc/{p}/task")).ok()?.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    None
}

#[test]
fn the_units_system_call_filter_lets_through_everything_the_agent_does() {
    if !require_root() {
        return;
    }
    let filter = unit_filter();
    assert!(!filter.is_empty(), "the unit has a SystemCallFilter= line");
    let mut allowed = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for entry in &filter {
        if entry.starts_with('@') {
            seen.insert(entry.clone());
            allowed.extend(expand(entry, &mut seen));
        } else {
            allowed.insert(entry.clone());
        }
    }
    assert!(
        allowed.len() > 100,
        "systemd-analyze expanded the groups: {allowed:?}"
    );

    // The agent, under strace, through a wrapper named as FORWARDER_BIN (this test
    // binary has this one test, so setting the variable races nothing).
    let dir = std::env::temp_dir().join(format!("fwd-strace-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let real = forwarder_bin().expect("the forwarder binary");
    let wrapper = dir.join("forwarder");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec strace -f -qq -c -o {}/trace.$$ -- {} \"$@\"\n",
            dir.display(),
            real.display()
        ),
    )
    .expect("wrapper");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    // SAFETY: the only test of this binary; nothing else reads the environment yet.
    unsafe { std::env::set_var("FORWARDER_BIN", &wrapper) };

    for engine in ["off", "on"] {
        let lab = Lab::new().expect("lab");
        lab.attach_pass_stubs().expect("pass stubs");
        let _udp_origin =
            UdpEchoOrigin::start_with(lab.origin(), SocketAddr::new(ORIGIN_V4.into(), 5000), false)
                .expect("udp origin");
        let tcp_origin = lab
            .origin()
            .run_in(|| std::net::TcpListener::bind(SocketAddr::new(ORIGIN_V4.into(), 6000)))
            .expect("origin thread")
            .expect("tcp origin");
        let echo = std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            if let Ok((mut s, _)) = tcp_origin.accept() {
                let mut buf = vec![0u8; 256 * 1024];
                let n = s.read(&mut buf).unwrap_or(0);
                let _ = s.write_all(&buf[..n]);
            }
        });
        let events = dir.join(format!("events-{engine}.jsonl"));
        let [ec, eo] = lab.edge_ifaces();
        let config = format!(
            "[agent]\ninterfaces = [\"{ec}\", \"{eo}\"]\ntcp_splice = \"{engine}\"\n\
             metrics_listen = \"127.0.0.1:9479\"\nevent_log = \"{}\"\n\n\
             [[apps]]\nprotocol = \"udp/5000\"\norigin_direct = [\"udp://{ORIGIN_V4}:5000\"]\n\n\
             [[apps]]\nprotocol = \"tcp/6000\"\norigin_direct = [\"tcp://{ORIGIN_V4}:6000\"]\n",
            events.display()
        );
        let mut agent = AgentProcess::start(&lab, &config).expect("the agent starts under strace");
        // UDP.
        let sock = lab
            .client()
            .udp_socket(SocketAddr::new(CLIENT_V4.into(), 0), Duration::from_secs(2))
            .expect("client socket");
        let mut buf = [0u8; 64];
        let edge = SocketAddr::new(EDGE_CLIENT_V4.into(), 5000);
        assert!(
            (0..5).any(|_| sock.send_to(b"x", edge).is_ok() && sock.recv(&mut buf).is_ok()),
            "UDP through the agent"
        );
        // TCP.
        let reply = lab
            .client()
            .run_in(|| -> std::io::Result<Vec<u8>> {
                use std::io::{Read as _, Write as _};
                let mut s = TcpStream::connect_timeout(
                    &SocketAddr::new(EDGE_CLIENT_V4.into(), 6000),
                    Duration::from_secs(5),
                )?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(&[7u8; 1000])?;
                s.shutdown(std::net::Shutdown::Write)?;
                let mut back = Vec::new();
                s.read_to_end(&mut back)?;
                Ok(back)
            })
            .expect("client thread")
            .expect("TCP through the agent");
        assert_eq!(reply.len(), 1000);
        echo.join().expect("origin thread");
        // stats, /metrics, reload, reopen, stop.
        agent.stats().expect("stats");
        lab.edge()
            .run_in(|| -> std::io::Result<()> {
                use std::io::{Read as _, Write as _};
                let mut s = TcpStream::connect("127.0.0.1:9479")?;
                s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
                let mut text = String::new();
                s.read_to_string(&mut text)?;
                Ok(())
            })
            .expect("edge thread")
            .expect("/metrics");
        // Signals to the agent alone: strace, its parent, would take some of them
        // for itself (SIGUSR1 ends it).
        let forwarder = agent_under_strace(agent.pid()).expect("the agent under strace");
        let signal = |sig: libc::c_int| {
            // SAFETY: a plain kill(2) of a process we started.
            unsafe { libc::kill(forwarder, sig) };
        };
        signal(libc::SIGHUP);
        agent
            .wait_stats(Duration::from_secs(10), |s| s.agent.reloads_applied == 1)
            .expect("the reload");
        signal(libc::SIGUSR1);
        std::thread::sleep(Duration::from_millis(300));
        // Then strace ends with the agent.
        signal(libc::SIGTERM);
        agent
            .wait_exit(Duration::from_secs(20))
            .expect("the agent and strace exit");
        assert!(agent.logs().contains("detached; bye"), "{}", agent.logs());
        lab.close().expect("lab teardown");
    }

    let used = traced(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        used.contains("bpf") && used.contains("splice"),
        "strace saw the agent: {used:?}"
    );
    let denied: Vec<&String> = used.iter().filter(|s| !allowed.contains(*s)).collect();
    assert!(
        denied.is_empty(),
        "system calls the unit's SystemCallFilter ({}) would refuse: {denied:?}",
        filter.join(" ")
    );
}
