//! The TCP engines (`[agent] tcp_engine`, docs/tcp.md "Engines"): with `io_uring`
//! (and with the default, `auto`, where the kernel allows a ring) connections of
//! plain apps go through the agent's ring, in its own thread (the ring's completion
//! counter moves with every connection); `epoll`, `auto` with `tcp_splice = "on"`,
//! and a kernel that refuses io_uring (a seccomp filter, as in containers) open no
//! ring and still serve every connection. Every other TCP test runs on the default
//! and once more on `epoll` in `cargo xtask test` (its "tcp (epoll)" pass).
//!
//! Root, after `cargo build -p forwarder`: `cargo test -p forwarder-tests --test tcp_engine`.

mod tcp_support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use forwarder_tests::agent::{AgentOptions, AgentProcess};
use forwarder_tests::{EDGE_CLIENT_V4, Lab, ORIGIN_V4, require_root};
use tcp_support::*;

const WAIT: Duration = Duration::from_secs(10);
/// Short connections sent through the ring.
const CONNECTIONS: u64 = 200;

fn sa(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The agent's io_uring instances: (fd, completions so far: `CqTail` of its fdinfo).
fn rings(agent: &AgentProcess) -> Vec<(String, u64)> {
    let dir = format!("/proc/{}/fd", agent.pid());
    let mut rings = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.to_string_lossy() != "anon_inode:[io_uring]" {
            continue;
        }
        let fd = entry.file_name().to_string_lossy().to_string();
        let info = std::fs::read_to_string(format!("/proc/{}/fdinfo/{fd}", agent.pid())).unwrap();
        let tail = info
            .lines()
            .find_map(|l| l.strip_prefix("CqTail:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no CqTail in the fdinfo of a ring:\n{info}"));
        rings.push((fd, tail));
    }
    rings
}

/// The names of the agent's threads.
fn threads(agent: &AgentProcess) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{}/task", agent.pid()))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect()
}

/// One short exchange: `hello` up, the origin's `ok:hello` down, then both close.
fn exchange(lab: &Lab, edge: SocketAddr) -> SocketAddr {
    let mut client = client_connect(lab, edge, WAIT).unwrap();
    let local = client.local_addr().unwrap();
    client.write_all(b"hello").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (reply, err) = read_all(&mut client);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(reply, b"ok:hello");
    local
}

fn answer(mut stream: std::net::TcpStream) {
    let mut request = Vec::new();
    if stream.read_to_end(&mut request).is_ok() {
        let mut reply = b"ok:".to_vec();
        reply.extend_from_slice(&request);
        let _ = stream.write_all(&reply);
    }
}

/// The agent's config with exactly these `[agent]` settings (whatever the test
/// pass's environment says) and one plain app on `port`.
fn agent_config(lab: &Lab, settings: &str, port: u16) -> String {
    let [ec, eo] = lab.edge_ifaces();
    format!(
        "[agent]\ninterfaces = [\"{ec}\", \"{eo}\"]\nevent_log = \"-\"\n{settings}\n\
         [[apps]]\nid = \"plain\"\nprotocol = \"tcp/{port}\"\n\
         origin_direct = [\"tcp://10.0.2.2:{port}\"]\n"
    )
}

/// Starts the agent with `settings`, sends `n` short connections through it and
/// checks each one's bytes and events; returns the agent.
fn run(port: u16, settings: &str, options: &AgentOptions, n: u64) -> (Lab, AgentProcess) {
    let lab = Lab::new().unwrap();
    serve(origin_listener(&lab, sa(ORIGIN_V4, port)), answer);
    let agent =
        AgentProcess::start_with(&lab, &agent_config(&lab, settings, port), options).unwrap();
    let before = rings(&agent);
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(exchange(&lab, sa(EDGE_CLIENT_V4, port)));
    }
    let evs = wait_events(&agent, "plain", WAIT, |evs| {
        evs.iter().filter(|e| e.event() == "disconnect").count() as u64 == n
    });
    for client in &clients {
        let d = event_for(&evs, "disconnect", *client).expect("disconnect event");
        assert_eq!(d.status(), 200, "{d:?}");
        assert_eq!(d.num("ClientBytes"), Some(5));
        assert_eq!(d.num("OriginBytes"), Some(8));
        assert!(event_for(&evs, "connect", *client).is_some());
    }
    let after = rings(&agent);
    if !after.is_empty() {
        // Each connection completes at least accept, connect (and its timeout), two
        // receives with data, two with EOF, two sends, a half-close and two closes,
        // on whichever ring accepted it.
        let total = |rings: &[(String, u64)]| rings.iter().map(|r| r.1).sum::<u64>();
        let done = total(&after).wrapping_sub(total(&before));
        assert!(done >= n * 10, "{done} completions for {n} connections");
    }
    (lab, agent)
}

/// A ring per CPU the agent may run on, each in its own thread; on a kernel that
/// refuses io_uring (where this test process cannot set up the agent's ring
/// either), epoll with the log line that says why.
fn on_the_ring(agent: &AgentProcess) {
    if !forwarder::tcp::io_uring_available() {
        eprintln!("this kernel refuses io_uring: checking the fallback instead");
        on_epoll(agent);
        assert!(agent.logs().contains("the kernel refused an io_uring"));
        return;
    }
    assert!(
        agent.logs().contains("TCP engine: io_uring"),
        "{}",
        agent.logs()
    );
    let ring_threads = threads(agent).iter().filter(|t| *t == "tcp-uring").count();
    let cpus = std::thread::available_parallelism().unwrap().get().min(8);
    assert_eq!(ring_threads, cpus, "a ring thread per CPU");
    assert_eq!(rings(agent).len(), cpus, "a ring per CPU");
}

fn on_epoll(agent: &AgentProcess) {
    assert!(
        agent.logs().contains("TCP engine: epoll"),
        "{}",
        agent.logs()
    );
    assert!(!threads(agent).iter().any(|t| t == "tcp-uring"));
    assert!(rings(agent).is_empty(), "no ring");
}

#[test]
fn io_uring_carries_plain_apps_on_its_ring() {
    init();
    if !require_root() {
        return;
    }
    let (_lab, agent) = run(
        7401,
        "tcp_engine = \"io_uring\"",
        &AgentOptions::default(),
        CONNECTIONS,
    );
    on_the_ring(&agent);
}

#[test]
fn auto_is_io_uring_where_the_kernel_allows_it() {
    init();
    if !require_root() {
        return;
    }
    let (_lab, agent) = run(7402, "", &AgentOptions::default(), 20);
    on_the_ring(&agent);
}

#[test]
fn epoll_and_auto_with_splicing_open_no_ring() {
    init();
    if !require_root() {
        return;
    }
    let (_lab, agent) = run(7403, "tcp_engine = \"epoll\"", &AgentOptions::default(), 20);
    on_epoll(&agent);
    drop(agent);
    let (_lab, agent) = run(7404, "tcp_splice = \"on\"", &AgentOptions::default(), 20);
    on_epoll(&agent);
}

#[test]
fn a_kernel_that_refuses_io_uring_leaves_every_connection_on_epoll() {
    init();
    if !require_root() {
        return;
    }
    let options = AgentOptions {
        without_io_uring: true,
        ..AgentOptions::default()
    };
    // Asked for by name: a warning says why it is not used.
    let (_lab, agent) = run(7405, "tcp_engine = \"io_uring\"", &options, 20);
    on_epoll(&agent);
    let logs = agent.logs();
    assert!(
        logs.contains("WARN") && logs.contains("the kernel refused an io_uring"),
        "{logs}"
    );
    drop(agent);
    let (_lab, agent) = run(7406, "", &options, 20);
    on_epoll(&agent);
}

#[test]
fn connections_that_wait_for_buffers_lose_no_byte() {
    init();
    if !require_root() {
        return;
    }
    // Two receive buffers per ring for eight connections moving 4 MB each way at
    // once: receives wait for buffers to come back (ENOBUFS) and must resume in
    // order.
    const LEN: u64 = 4 * 1024 * 1024;
    const PARALLEL: u64 = 8;
    let lab = Lab::new().unwrap();
    let listener = origin_listener(&lab, sa(ORIGIN_V4, 7407));
    let agent = two_buffer_agent(&lab, 7407, None);
    on_the_ring(&agent);
    assert!(
        agent.logs().contains("at most 2 receive buffers"),
        "{}",
        agent.logs()
    );
    // The origin: for each connection, its own stream down and the client's summed.
    let origin = std::thread::spawn(move || {
        let mut sums = Vec::new();
        for seed in 0..PARALLEL {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = stream.try_clone().unwrap();
            let rx = std::thread::spawn(move || receive_sum(&mut reader).unwrap());
            let tx = std::thread::spawn(move || {
                let mut writer = stream;
                let sent = send_random(&mut writer, 100 + seed, LEN).unwrap();
                writer.shutdown(Shutdown::Write).unwrap();
                sent
            });
            sums.push((tx, rx));
        }
        sums.into_iter()
            .map(|(tx, rx)| (tx.join().unwrap(), rx.join().unwrap()))
            .collect::<Vec<_>>()
    });
    let clients: Vec<_> = (0..PARALLEL)
        .map(|seed| {
            let client = client_connect(&lab, sa(EDGE_CLIENT_V4, 7407), WAIT).unwrap();
            let mut reader = client.try_clone().unwrap();
            let rx = std::thread::spawn(move || receive_sum(&mut reader).unwrap());
            let tx = std::thread::spawn(move || {
                let mut writer = client;
                let sent = send_random(&mut writer, seed, LEN).unwrap();
                writer.shutdown(Shutdown::Write).unwrap();
                sent
            });
            (tx, rx)
        })
        .collect();
    let mut up_sent = Vec::new();
    let mut down_received = Vec::new();
    for (tx, rx) in clients {
        up_sent.push(tx.join().unwrap());
        down_received.push(rx.join().unwrap());
    }
    let at_origin = origin.join().unwrap();
    // Connections reach the origin in any order: compare as sets of sums.
    let mut up_received: Vec<_> = at_origin.iter().map(|(_, rx)| *rx).collect();
    let mut down_sent: Vec<_> = at_origin.iter().map(|(tx, _)| *tx).collect();
    for v in [
        &mut up_sent,
        &mut up_received,
        &mut down_sent,
        &mut down_received,
    ] {
        v.sort();
    }
    assert_eq!(up_received, up_sent, "client -> origin differs");
    assert_eq!(down_received, down_sent, "origin -> client differs");
    assert!(up_sent.iter().all(|s| s.1 == LEN));
    let evs = wait_events(&agent, "plain", WAIT, |evs| {
        evs.iter().filter(|e| e.event() == "disconnect").count() as u64 == PARALLEL
    });
    for d in evs.iter().filter(|e| e.event() == "disconnect") {
        assert_eq!(d.status(), 200, "{d:?}");
        assert_eq!(d.num("ClientBytes"), Some(LEN));
        assert_eq!(d.num("OriginBytes"), Some(LEN));
    }
    // The case this test is for did happen (on a kernel that allows the ring).
    assert!(
        !forwarder::tcp::io_uring_available() || agent.logs().contains("a receive waits for one"),
        "no receive ever waited for a buffer"
    );
}

/// The agent on `tcp_engine = "io_uring"` with two receive buffers per ring and
/// the ring's debug log (it says when a receive waits for a buffer), on `cpus`.
fn two_buffer_agent(lab: &Lab, port: u16, cpus: Option<Vec<usize>>) -> AgentProcess {
    let options = AgentOptions {
        env: vec![
            ("FORWARDER_TCP_URING_BUFFERS".into(), "2".into()),
            ("RUST_LOG".into(), "info,forwarder::tcp::uring=debug".into()),
        ],
        cpus,
        ..AgentOptions::default()
    };
    AgentProcess::start_with(
        lab,
        &agent_config(lab, "tcp_engine = \"io_uring\"", port),
        &options,
    )
    .unwrap()
}

/// Writes to `stream` until a write has blocked for `stall` (the path behind it is
/// full): the bytes written.
fn fill(stream: &mut std::net::TcpStream, stall: Duration) -> u64 {
    stream.set_write_timeout(Some(stall)).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let mut written = 0u64;
    // Bounded: 64 MiB fills any path of this lab many times over.
    while written < 64 << 20 {
        match stream.write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    written
}

/// A buffer that comes back at a connection's end (not at a send's end) rearms a
/// receive that waits for one. One ring (the agent on one CPU) with two buffers:
/// connection X holds both, each in a send that cannot finish (neither peer
/// reads); connection Y's receive then waits for a buffer. X's client resets: X
/// ends and its buffers come back, with no send left anywhere to rearm Y, whose
/// exchange must still complete. (Before the loop rearmed waiting receives every
/// turn, Y waited for ever.)
#[test]
fn a_buffer_freed_by_a_connection_end_rearms_a_waiting_receive() {
    init();
    if !require_root() || !forwarder::tcp::io_uring_available() {
        return;
    }
    let lab = Lab::new().unwrap();
    let listener = origin_listener(&lab, sa(ORIGIN_V4, 7408));
    let agent = two_buffer_agent(&lab, 7408, Some(vec![0]));
    assert_eq!(
        threads(&agent).iter().filter(|t| *t == "tcp-uring").count(),
        1,
        "one ring"
    );
    let stall = Duration::from_secs(1);
    // X: both peers write and never read, until each write blocks.
    let origin_x = std::thread::spawn({
        let listener = listener.try_clone().unwrap();
        move || {
            let (mut stream, _) = listener.accept().unwrap();
            let written = fill(&mut stream, stall);
            (stream, written)
        }
    });
    let mut client_x = client_connect(&lab, sa(EDGE_CLIENT_V4, 7408), WAIT).unwrap();
    let client_written = fill(&mut client_x, stall);
    let (origin_x_stream, origin_written) = origin_x.join().unwrap();
    assert!(client_written > 0 && origin_written > 0);
    // Y: its receive finds no buffer.
    let origin_y = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).unwrap();
        stream.write_all(b"ok").unwrap();
        got.len()
    });
    let mut client_y = client_connect(&lab, sa(EDGE_CLIENT_V4, 7408), WAIT).unwrap();
    client_y.write_all(&[7u8; 1000]).unwrap();
    client_y.shutdown(Shutdown::Write).unwrap();
    agent
        .wait_log("a receive waits for one", WAIT)
        .expect("Y's receive waits for a buffer");
    // X's client resets: X ends, and both buffers come back.
    set_linger_zero(&client_x);
    drop(client_x);
    client_y.set_read_timeout(Some(WAIT)).unwrap();
    let mut answer = Vec::new();
    client_y
        .read_to_end(&mut answer)
        .expect("Y's answer (a receive left waiting beside free buffers?)");
    assert_eq!(answer, b"ok");
    assert_eq!(origin_y.join().unwrap(), 1000);
    drop(origin_x_stream);
}
