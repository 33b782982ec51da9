//! `tcp_fastpath = "xdp"` end to end with real peers (docs/tcp.md, "XDP splice"):
//! the agent accepts, connects the origin, hands the quiet connection to XDP and
//! retires its sockets; the bytes then go through the translation only. A large
//! transfer each way keeps its checksums (also with loss injected on each leg),
//! half-close works both ways, RST both ways ends the connection with the right
//! status, an ineligible connection (timestamps on one leg only) falls back to the
//! socket path and still works.
//!
//! The handoff is tried once a connection has moved `HANDOFF_AFTER` bytes on the
//! socket path (docs/tcp.md): the bulk transfers are spliced while they run (the
//! connection held, its queues drained, then handed over), the small exchanges
//! first send `WARM` bytes; a connection that stays below the threshold is never
//! handed over (`short`). Whether a connection was spliced
//! is read from the agent's log (one line per handoff or fallback, with the
//! reason), and the spliced path is checked to carry the bytes: the edge has no
//! socket of the connection any more while data still flows.
//!
//! Root, after `cargo build -p forwarder`: `cargo test -p forwarder-tests --test tcp_splice`.

mod tcp_support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use forwarder::tcp::handoff::HANDOFF_AFTER;
use forwarder_tests::agent::AgentProcess;
use forwarder_tests::{
    EDGE_CLIENT_V4, EDGE_CLIENT_V6, Lab, Links, ORIGIN_V4, ORIGIN_V6, Peers, require_root,
};
use tcp_support::*;

const WAIT: Duration = Duration::from_secs(20);
/// How long the fastpath-off test lets the connection sit before it looks.
const QUIET: Duration = Duration::from_millis(500);
/// Bytes each way of the bulk transfers (see docs/tcp.md, Tests, for the size).
const BULK: u64 = 1 << 30;
/// What a small exchange sends first so that its connection is handed over.
const WARM: usize = HANDOFF_AFTER as usize + 16 * 1024;

fn app(id: &str, port: u16, origin: SocketAddr) -> String {
    let origin = match origin {
        SocketAddr::V4(a) => format!("tcp://{a}"),
        SocketAddr::V6(a) => format!("tcp://{a}"),
    };
    format!(
        "[[apps]]\nid = \"{id}\"\nprotocol = \"tcp/{port}\"\norigin_direct = [\"{origin}\"]\n\
         tcp_fastpath = \"xdp\"\n"
    )
}

/// A lab whose edge veth peers carry the XDP stub (redirected frames are only
/// delivered to a veth with a program), and the agent with `apps`.
fn lab_and_agent(apps: &str) -> (Lab, AgentProcess) {
    lab_and_agent_on(Links::Direct, apps)
}

/// Like `lab_and_agent`, the edge joined to its peers by `links`.
fn lab_and_agent_on(links: Links, apps: &str) -> (Lab, AgentProcess) {
    let lab = Lab::with_links(Peers::WireLike, links).unwrap();
    lab.attach_pass_stubs().expect("pass stubs");
    let agent = start_agent(&lab, apps);
    (lab, agent)
}

/// Waits until the agent logged the handoff (or the fallback) of `client`.
fn wait_log(agent: &AgentProcess, client: SocketAddr, what: &str) -> String {
    let needle = format!("{client} {what}");
    let deadline = Instant::now() + WAIT;
    loop {
        let log = agent.stderr();
        if let Some(line) = log.lines().find(|l| l.contains(&needle)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no '{needle}' in the agent's log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The edge's TCP sockets towards `port` (`ss`, in the edge namespace).
fn edge_sockets(lab: &Lab, port: u16) -> usize {
    let out = lab
        .edge()
        .run("ss", &["-Htn", "state", "established"])
        .expect("ss");
    out.lines()
        .filter(|l| l.contains(&format!(":{port} ")))
        .count()
}

/// Both ways at once, `BULK` bytes each, checksums compared; returns the
/// client's local address.
fn bulk_both_ways(
    lab: &Lab,
    agent: &AgentProcess,
    edge: SocketAddr,
    origin: SocketAddr,
) -> SocketAddr {
    let listener = origin_listener(lab, origin);
    let origin_side = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut reader = stream.try_clone().unwrap();
        let rx = std::thread::spawn(move || receive_sum(&mut reader).unwrap());
        let mut writer = stream;
        let sent = send_random(&mut writer, 2, BULK).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
        (sent, rx.join().unwrap())
    });
    // Both ways from the start: the handoff takes the connection while busy.
    let client = client_connect(lab, edge, WAIT).unwrap();
    let local = client.local_addr().unwrap();
    let mut reader = client.try_clone().unwrap();
    let rx = std::thread::spawn(move || receive_sum(&mut reader).unwrap());
    let mut writer = client;
    let started = Instant::now();
    let tx = std::thread::spawn(move || {
        let sent = send_random(&mut writer, 1, BULK).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
        sent
    });
    wait_log(agent, local, "spliced in XDP");
    // The agent's sockets are retired: nothing of the connection at the edge,
    // while the transfer goes on.
    assert_eq!(edge_sockets(lab, edge.port()), 0, "no socket at the edge");
    let sent = tx.join().unwrap();
    let received = rx.join().unwrap();
    let (origin_sent, origin_received) = origin_side.join().unwrap();
    eprintln!(
        "{} MB each way through the XDP splice in {:?}",
        BULK >> 20,
        started.elapsed()
    );
    assert_eq!(sent.1, BULK);
    assert_eq!(origin_received, sent, "client -> origin differs");
    assert_eq!(received, origin_sent, "origin -> client differs");
    local
}

#[test]
fn bulk_both_ways_through_a_spliced_connection_ipv4_and_ipv6() {
    init();
    if !require_root() {
        return;
    }
    let v4 = SocketAddr::new(ORIGIN_V4.into(), 7101);
    let v6 = SocketAddr::new(ORIGIN_V6.into(), 7102);
    let (lab, agent) = lab_and_agent(&format!(
        "{}\n{}",
        app("bulk4", 7101, v4),
        app("bulk6", 7102, v6)
    ));
    for (id, edge, origin) in [
        ("bulk4", SocketAddr::new(EDGE_CLIENT_V4.into(), 7101), v4),
        ("bulk6", SocketAddr::new(EDGE_CLIENT_V6.into(), 7102), v6),
    ] {
        let local = bulk_both_ways(&lab, &agent, edge, origin);
        let d = wait_disconnect(&agent, id, local, WAIT);
        assert_eq!(d.status(), 200, "{d:?}");
        // Payload bytes the edge forwarded: retransmissions count too.
        assert!(d.num("ClientBytes").unwrap() >= BULK, "{d:?}");
        assert!(d.num("OriginBytes").unwrap() >= BULK, "{d:?}");
        assert_eq!(d.origin(), Some(origin));
    }
    let stats = agent.stats().unwrap();
    assert_eq!(
        stats.tcp_fastpath.get("spliced"),
        Some(&2),
        "{:?}",
        stats.tcp_fastpath
    );
}

/// The benchmarks' NIC-like links (docs/lab.md): the edge's XDP receives XDP frames
/// instead of skbs, and the translation redirects them on. The same bytes arrive.
#[test]
fn bulk_both_ways_through_a_spliced_connection_on_nic_like_links() {
    init();
    if !require_root() {
        return;
    }
    let origin = SocketAddr::new(ORIGIN_V4.into(), 7103);
    let (lab, agent) = lab_and_agent_on(Links::NicLike, &app("nic", 7103, origin));
    let edge = SocketAddr::new(EDGE_CLIENT_V4.into(), 7103);
    let local = bulk_both_ways(&lab, &agent, edge, origin);
    let d = wait_disconnect(&agent, "nic", local, WAIT);
    assert_eq!(d.status(), 200, "{d:?}");
    assert!(d.num("ClientBytes").unwrap() >= BULK, "{d:?}");
    assert!(d.num("OriginBytes").unwrap() >= BULK, "{d:?}");
    let stats = agent.stats().unwrap();
    assert_eq!(stats.tcp_fastpath.get("spliced"), Some(&1));
}

#[test]
fn loss_on_each_leg_is_recovered_end_to_end() {
    init();
    if !require_root() {
        return;
    }
    let origin = SocketAddr::new(ORIGIN_V4.into(), 7103);
    let (lab, agent) = lab_and_agent(&app("lossy", 7103, origin));
    // 1% of the TCP segments lost into and out of the client and the origin (nft:
    // this kernel has no netem): each leg loses data and ACKs both ways, which
    // only the end hosts can recover. Handshakes are spared: a lost SYN or SYN-ACK
    // is retransmitted after 1 s, which the tests' 1 s origin connect timeout
    // would take for a dead origin (522), not what this test is about.
    for ns in [lab.client(), lab.origin()] {
        for cmd in [
            "add table inet loss",
            "add chain inet loss out { type filter hook output priority 0; }",
            "add chain inet loss in { type filter hook input priority 0; }",
            "add rule inet loss out tcp flags & syn == 0 numgen random mod 100 0 counter drop",
            "add rule inet loss in tcp flags & syn == 0 numgen random mod 100 0 counter drop",
        ] {
            ns.run("nft", &[cmd]).expect("nft loss rule");
        }
    }
    let listener = origin_listener(&lab, origin);
    const LEN: u64 = 20 * 1024 * 1024;
    let origin_side = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let got = receive_sum(&mut stream).unwrap();
        let sent = send_random(&mut stream, 4, LEN).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        (got, sent)
    });
    let mut client =
        client_connect(&lab, SocketAddr::new(EDGE_CLIENT_V4.into(), 7103), WAIT).unwrap();
    let local = client.local_addr().unwrap();
    let sent = send_random(&mut client, 3, LEN).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let received = receive_sum(&mut client).unwrap();
    let (origin_got, origin_sent) = origin_side.join().unwrap();
    // Handed over while the client's bytes flowed (held, drained, spliced).
    wait_log(&agent, local, "spliced in XDP");
    // The loss was real: each namespace's rules dropped segments.
    for ns in [lab.client(), lab.origin()] {
        let rules = ns.run("nft", &["list", "table", "inet", "loss"]).unwrap();
        assert!(!rules.contains("packets 0 "), "no loss injected:\n{rules}");
    }
    assert_eq!(origin_got, sent, "client -> origin differs");
    assert_eq!(received, origin_sent, "origin -> client differs");
    let d = wait_disconnect(&agent, "lossy", local, WAIT);
    assert_eq!(d.status(), 200, "{d:?}");
}

#[test]
fn half_close_both_ways() {
    init();
    if !require_root() {
        return;
    }
    let origin = SocketAddr::new(ORIGIN_V4.into(), 7104);
    let (lab, agent) = lab_and_agent(&app("half", 7104, origin));
    let listener = origin_listener(&lab, origin);
    // After a first `WARM` bytes (the handoff), the origin half-closes first and
    // keeps reading; then the client does.
    let (spliced_tx, spliced_rx) = std::sync::mpsc::channel::<()>();
    let origin_side = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut warm = vec![0u8; WARM];
        s.read_exact(&mut warm).unwrap();
        spliced_rx.recv_timeout(WAIT).unwrap();
        s.write_all(b"origin done").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let (request, err) = read_all(&mut s);
        assert!(err.is_none(), "{err:?}");
        request
    });
    let mut client =
        client_connect(&lab, SocketAddr::new(EDGE_CLIENT_V4.into(), 7104), WAIT).unwrap();
    let local = client.local_addr().unwrap();
    client.write_all(&vec![0u8; WARM]).unwrap();
    wait_log(&agent, local, "spliced in XDP");
    spliced_tx.send(()).unwrap();
    let (reply, err) = read_all(&mut client);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        reply, b"origin done",
        "the origin's half-close reached the client"
    );
    // After the origin's FIN the client can still send, and then close.
    client.write_all(&[b'x'; 100_000]).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let request = origin_side.join().unwrap();
    assert_eq!(
        request.len(),
        100_000,
        "the client's bytes after the origin's FIN"
    );
    let d = wait_disconnect(&agent, "half", local, WAIT);
    assert_eq!(d.status(), 200, "{d:?}");
    assert_eq!(d.num("ClientBytes"), Some(WARM as u64 + 100_000), "{d:?}");
    assert_eq!(d.num("OriginBytes"), Some(11), "{d:?}");
}

#[test]
fn rst_either_way_reaches_the_other_peer_with_its_status() {
    init();
    if !require_root() {
        return;
    }
    let origin = SocketAddr::new(ORIGIN_V4.into(), 7105);
    let (lab, agent) = lab_and_agent(&app("rst", 7105, origin));
    let listener = origin_listener(&lab, origin);
    let (tx, rx) = std::sync::mpsc::channel();
    serve(listener, move |mut s: TcpStream| {
        let mut warm = vec![0u8; WARM];
        s.read_exact(&mut warm).unwrap();
        let mut hello = [0u8; 5];
        s.read_exact(&mut hello).unwrap();
        if &hello == b"reset" {
            // The origin resets.
            s.write_all(b"bye").unwrap();
            std::thread::sleep(Duration::from_millis(200));
            set_linger_zero(&s);
            return;
        }
        s.write_all(b"ok").unwrap();
        let (_, err) = read_all(&mut s);
        let _ = tx.send(err.map(|e| e.kind()));
    });
    let edge = SocketAddr::new(EDGE_CLIENT_V4.into(), 7105);

    // The client resets: the origin gets the RST, status 499.
    let mut client = client_connect(&lab, edge, WAIT).unwrap();
    let local = client.local_addr().unwrap();
    client.write_all(&vec![0u8; WARM]).unwrap();
    wait_log(&agent, local, "spliced in XDP");
    client.write_all(b"hello").unwrap();
    let mut ok = [0u8; 2];
    client.read_exact(&mut ok).unwrap();
    set_linger_zero(&client);
    drop(client);
    let origin_saw = rx.recv_timeout(WAIT).expect("origin connection ended");
    assert_eq!(
        origin_saw,
        Some(ErrorKind::ConnectionReset),
        "origin got the RST"
    );
    assert_eq!(wait_disconnect(&agent, "rst", local, WAIT).status(), 499);

    // The origin resets: the client gets the RST, status 444.
    let mut client = client_connect(&lab, edge, WAIT).unwrap();
    let local = client.local_addr().unwrap();
    client.write_all(&vec![0u8; WARM]).unwrap();
    wait_log(&agent, local, "spliced in XDP");
    client.write_all(b"reset").unwrap();
    let (data, err) = read_all(&mut client);
    assert_eq!(data, b"bye");
    let err = err.expect("the client must see a reset, not a clean end");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    let d = wait_disconnect(&agent, "rst", local, WAIT);
    assert_eq!(d.status(), 444, "{d:?}");
    assert_eq!(d.num("ClientBytes"), Some(WARM as u64 + 5));
    assert_eq!(d.num("OriginBytes"), Some(3));
}

#[test]
fn an_ineligible_connection_falls_back_to_the_socket_path() {
    init();
    if !require_root() {
        return;
    }
    let origin = SocketAddr::new(ORIGIN_V4.into(), 7106);
    let (lab, agent) = lab_and_agent(&app("fallback", 7106, origin));
    // The client offers no timestamps; the origin leg has them.
    lab.client()
        .run("sysctl", &["-qw", "net.ipv4.tcp_timestamps=0"])
        .expect("sysctl in client");
    warm_echo_falls_back(&lab, &agent, origin, 7106, "fallback", "timestamps_differ");
}

/// `WARM` bytes through the app `app` on edge port `port` to an echoing origin at
/// `origin`: enough for a handoff to be tried (held, then found ineligible for
/// `reason`). The connection then stays on the socket path: the echo comes back
/// whole, disconnect 200 with exact byte counts, `reason` counted, nothing spliced.
fn warm_echo_falls_back(
    lab: &Lab,
    agent: &AgentProcess,
    origin: SocketAddr,
    port: u16,
    app: &str,
    reason: &str,
) {
    let listener = origin_listener(lab, origin);
    serve(listener, |mut s: TcpStream| {
        let (request, _) = read_all(&mut s);
        s.write_all(&request).unwrap();
    });
    let mut client =
        client_connect(lab, SocketAddr::new(EDGE_CLIENT_V4.into(), port), WAIT).unwrap();
    let local = client.local_addr().unwrap();
    let fill = port as u8;
    client.write_all(&vec![fill; WARM]).unwrap();
    let line = wait_log(agent, local, "stays on the socket path");
    assert!(line.contains(reason), "{line}");
    client.shutdown(Shutdown::Write).unwrap();
    let (echo, err) = read_all(&mut client);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(echo, vec![fill; WARM]);
    let d = wait_disconnect(agent, app, local, WAIT);
    assert_eq!(d.status(), 200, "{d:?}");
    assert_eq!(d.num("ClientBytes"), Some(WARM as u64));
    assert_eq!(d.num("OriginBytes"), Some(WARM as u64));
    let stats = agent.stats().unwrap();
    assert_eq!(stats.tcp_fastpath.get(reason), Some(&1));
    assert_eq!(stats.tcp_fastpath.get("spliced"), Some(&0));
}

#[test]
fn a_narrower_origin_path_falls_back_to_the_socket_path() {
    init();
    if !require_root() {
        return;
    }
    // The origin side's link carries 1400 bytes: the 1448-byte segments the client
    // may send (MSS 1460 offered on a 1500 link) would not fit it untouched.
    let lab = Lab::new().unwrap();
    lab.attach_pass_stubs().expect("pass stubs");
    let ifaces = lab.ifaces().clone();
    lab.edge()
        .run("ip", &["link", "set", &ifaces.edge_origin, "mtu", "1400"])
        .expect("mtu at the edge");
    lab.origin()
        .run("ip", &["link", "set", &ifaces.origin, "mtu", "1400"])
        .expect("mtu at the origin");
    let origin = SocketAddr::new(ORIGIN_V4.into(), 7114);
    let agent = start_agent(&lab, &app("narrow", 7114, origin));
    warm_echo_falls_back(&lab, &agent, origin, 7114, "narrow", "mss_too_big");
}

#[test]
fn fastpath_off_keeps_the_socket_path() {
    init();
    if !require_root() {
        return;
    }
    let origin = SocketAddr::new(ORIGIN_V4.into(), 7107);
    let apps = "[[apps]]\nid = \"plain\"\nprotocol = \"tcp/7107\"\n\
                origin_direct = [\"tcp://10.0.2.2:7107\"]\n";
    let (lab, agent) = lab_and_agent(apps);
    let listener = origin_listener(&lab, origin);
    serve(listener, |mut s: TcpStream| {
        let (request, _) = read_all(&mut s);
        s.write_all(&request).unwrap();
    });
    let mut client =
        client_connect(&lab, SocketAddr::new(EDGE_CLIENT_V4.into(), 7107), WAIT).unwrap();
    let local = client.local_addr().unwrap();
    std::thread::sleep(QUIET);
    // The agent's own two sockets carry the connection.
    assert_eq!(
        edge_sockets(&lab, 7107),
        2,
        "client and origin sockets at the edge"
    );
    client.write_all(&[9u8; 50_000]).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (echo, err) = read_all(&mut client);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(echo, vec![9u8; 50_000]);
    let d = wait_disconnect(&agent, "plain", local, WAIT);
    assert_eq!(d.status(), 200, "{d:?}");
    assert_eq!(d.num("ClientBytes"), Some(50_000));
    let log = agent.stderr();
    assert!(
        !log.contains("spliced in XDP") && !log.contains("stays on the socket path"),
        "no handoff attempted:\n{log}"
    );
    let stats = agent.stats().unwrap();
    assert!(
        stats.tcp_fastpath.values().all(|n| *n == 0),
        "{:?}",
        stats.tcp_fastpath
    );
}

#[test]
fn a_client_that_speaks_first_is_spliced_after_the_first_exchange() {
    init();
    if !require_root() {
        return;
    }
    const LEN: u64 = 50 * 1024 * 1024;
    let origin = SocketAddr::new(ORIGIN_V4.into(), 7108);
    let (lab, agent) = lab_and_agent(&app("first", 7108, origin));
    let listener = origin_listener(&lab, origin);
    let origin_side = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut request = [0u8; 5];
        s.read_exact(&mut request).unwrap();
        assert_eq!(&request, b"hello");
        s.write_all(b"world").unwrap();
        // The client's go-ahead comes once it has the answer.
        let mut go = [0u8; 2];
        s.read_exact(&mut go).unwrap();
        let sent = send_random(&mut s, 5, LEN).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let (rest, _) = read_all(&mut s);
        (sent, rest.len())
    });
    let mut client =
        client_connect(&lab, SocketAddr::new(EDGE_CLIENT_V4.into(), 7108), WAIT).unwrap();
    let local = client.local_addr().unwrap();
    client.write_all(b"hello").unwrap();
    let mut answer = [0u8; 5];
    client.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"world");
    client.write_all(b"go").unwrap();
    let received = receive_sum(&mut client).unwrap();
    // Handed over during the origin's bulk, after the exchange.
    wait_log(&agent, local, "spliced in XDP");
    client.shutdown(Shutdown::Write).unwrap();
    let (sent, rest) = origin_side.join().unwrap();
    assert_eq!(received, sent, "origin -> client differs");
    assert_eq!(rest, 0);
    let d = wait_disconnect(&agent, "first", local, WAIT);
    assert_eq!(d.status(), 200, "{d:?}");
    // The request, its answer and the go-ahead went through the agent, the rest
    // through XDP.
    assert_eq!(d.num("ClientBytes"), Some(7), "{d:?}");
    assert!(d.num("OriginBytes").unwrap() >= LEN + 5, "{d:?}");
}

#[test]
fn a_short_connection_is_not_handed_over() {
    init();
    if !require_root() {
        return;
    }
    let origin = SocketAddr::new(ORIGIN_V4.into(), 7109);
    let (lab, agent) = lab_and_agent(&app("short", 7109, origin));
    let listener = origin_listener(&lab, origin);
    serve(listener, |mut s: TcpStream| {
        let mut request = [0u8; 64];
        s.read_exact(&mut request).unwrap();
        s.write_all(&request).unwrap();
    });
    let mut client =
        client_connect(&lab, SocketAddr::new(EDGE_CLIENT_V4.into(), 7109), WAIT).unwrap();
    let local = client.local_addr().unwrap();
    client.write_all(&[5u8; 64]).unwrap();
    let (echo, err) = read_all(&mut client);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(echo, vec![5u8; 64]);
    drop(client);
    let d = wait_disconnect(&agent, "short", local, WAIT);
    assert_eq!(d.status(), 200, "{d:?}");
    assert_eq!(d.num("ClientBytes"), Some(64));
    assert_eq!(d.num("OriginBytes"), Some(64));
    // Below the threshold: no handoff tried (no hold, no repair), counted.
    let stats = agent.stats().unwrap();
    assert_eq!(
        stats.tcp_fastpath.get("short"),
        Some(&1),
        "{:?}",
        stats.tcp_fastpath
    );
    assert_eq!(stats.tcp_fastpath.get("spliced"), Some(&0));
    let log = agent.stderr();
    assert!(!log.contains("spliced in XDP"), "{log}");
}

/// An origin for the block test: after the warm-up bytes it echoes what it reads;
/// while `poke` is set and nothing arrives it sends 4 bytes of its own every
/// 100 ms. How its connection failed goes to `ended`.
fn echo_after_warm(
    lab: &Lab,
    origin: SocketAddr,
    poke: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ended: std::sync::mpsc::Sender<ErrorKind>,
) {
    let listener = origin_listener(lab, origin);
    serve(listener, move |mut s: TcpStream| {
        let mut warm = vec![0u8; WARM];
        s.read_exact(&mut warm).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let deadline = Instant::now() + WAIT + WAIT;
        let mut buf = [0u8; 64];
        let kind = loop {
            if Instant::now() > deadline {
                break ErrorKind::TimedOut;
            }
            match s.read(&mut buf) {
                Ok(0) => break ErrorKind::UnexpectedEof,
                Ok(n) => {
                    if let Err(e) = s.write_all(&buf[..n]) {
                        break e.kind();
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if poke.load(std::sync::atomic::Ordering::Relaxed)
                        && let Err(e) = s.write_all(b"poke")
                    {
                        break e.kind();
                    }
                }
                Err(e) => break e.kind(),
            }
        };
        let _ = ended.send(kind);
    });
}

/// A spliced connection, warmed up and answering; the client's local address.
fn spliced_echo(lab: &Lab, agent: &AgentProcess, edge: SocketAddr) -> (TcpStream, SocketAddr) {
    let mut client = client_connect(lab, edge, WAIT).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    let local = client.local_addr().unwrap();
    client.write_all(&vec![0u8; WARM]).unwrap();
    wait_log(agent, local, "spliced in XDP");
    let mut echo = [0u8; 4];
    client.write_all(b"ping").unwrap();
    client.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping");
    (client, local)
}

#[test]
fn a_reload_that_blocks_the_client_ends_its_spliced_connections() {
    init();
    if !require_root() {
        return;
    }
    // "guarded" has ip_firewall (the default), "open" has it off: the new rule
    // concerns only the first one's connection.
    let (guarded_origin, open_origin) = (
        SocketAddr::new(ORIGIN_V4.into(), 7111),
        SocketAddr::new(ORIGIN_V4.into(), 7112),
    );
    let apps = format!(
        "{}\n{}ip_firewall = false\n",
        app("guarded", 7111, guarded_origin),
        app("open", 7112, open_origin)
    );
    let (lab, agent) = lab_and_agent(&apps);
    let poke = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (guarded_ended, guarded_end) = std::sync::mpsc::channel();
    echo_after_warm(&lab, guarded_origin, poke.clone(), guarded_ended);
    let (open_ended, open_end) = std::sync::mpsc::channel();
    let no_poke = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    echo_after_warm(&lab, open_origin, no_poke, open_ended);
    let (mut guarded, guarded_local) =
        spliced_echo(&lab, &agent, SocketAddr::new(EDGE_CLIENT_V4.into(), 7111));
    let (mut open, _) = spliced_echo(&lab, &agent, SocketAddr::new(EDGE_CLIENT_V4.into(), 7112));

    // The reload blocks the client's address.
    let blocked = format!(
        "{apps}\n[[access_rules]]\nmode = \"block\"\ntarget = \"ip\"\nvalue = \"{}\"\n",
        forwarder_tests::CLIENT_V4
    );
    agent.write_config(&config(&lab, "", &blocked)).unwrap();
    agent.sighup();
    let d = wait_disconnect(&agent, "guarded", guarded_local, WAIT);
    assert_eq!(d.status(), 403, "{d:?}");
    assert_eq!(d.num("ClientBytes"), Some(WARM as u64 + 4), "{d:?}");
    assert_eq!(d.num("OriginBytes"), Some(4), "{d:?}");
    let log = agent.stderr();
    assert!(
        log.contains("reload: 1 spliced TCP connections of clients the access rules now block"),
        "{log}"
    );

    // What the client sends now meets the firewall.
    let firewall_before = forwarder_tests::agent::drops(&agent.stats().unwrap(), "firewall");
    guarded.write_all(b"late").unwrap();
    let deadline = Instant::now() + WAIT;
    while forwarder_tests::agent::drops(&agent.stats().unwrap(), "firewall") == firewall_before {
        assert!(
            Instant::now() < deadline,
            "the client's late segment was not dropped by the firewall"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The origin's next segment finds no socket at the edge any more: reset.
    poke.store(true, std::sync::atomic::Ordering::Relaxed);
    let kind = guarded_end
        .recv_timeout(WAIT + WAIT + WAIT)
        .expect("the guarded origin's connection ended");
    assert_eq!(kind, ErrorKind::ConnectionReset, "origin side");

    // The connection of the app without ip_firewall goes on, still spliced.
    let mut echo = [0u8; 4];
    open.write_all(b"more").unwrap();
    open.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"more");
    assert!(open_end.try_recv().is_err(), "the open app's origin ended");
    assert_eq!(
        edge_sockets(&lab, 7112),
        0,
        "the open app's connection is spliced"
    );
}

#[test]
fn the_sweep_ends_an_idle_spliced_connection_and_a_drained_one() {
    init();
    if !require_root() {
        return;
    }
    let origin = SocketAddr::new(ORIGIN_V4.into(), 7113);
    let edge = SocketAddr::new(EDGE_CLIENT_V4.into(), 7113);
    let apps = app("sweep", 7113, origin);
    let lab = Lab::new().unwrap();
    lab.attach_pass_stubs().expect("pass stubs");
    let mut agent = forwarder_tests::agent::AgentProcess::start(
        &lab,
        &config(&lab, "tcp_idle_timeout = \"1s\"\n", &apps),
    )
    .expect("starting forwarder run");
    let (ended, _end) = std::sync::mpsc::channel();
    echo_after_warm(
        &lab,
        origin,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        ended,
    );

    // Idle: nothing moves for tcp_idle_timeout, the sweep sees the entry counters
    // stand still and ends the connection (497, the bytes so far).
    let (_idle, idle_local) = spliced_echo(&lab, &agent, edge);
    let quiet_since = Instant::now();
    let d = wait_disconnect(&agent, "sweep", idle_local, WAIT);
    assert!(
        quiet_since.elapsed() >= Duration::from_millis(900),
        "ended before the idle timeout: {:?}",
        quiet_since.elapsed()
    );
    assert_eq!(d.status(), 497, "{d:?}");
    assert_eq!(d.num("ClientBytes"), Some(WARM as u64 + 4), "{d:?}");
    assert_eq!(d.num("OriginBytes"), Some(4), "{d:?}");

    // Drained: a spliced connection still open when the agent stops ends with the
    // drain (999, as on the socket path), its bytes counted. An agent with the
    // default idle timeout, so that the drain (1 s) is what ends it.
    let status = agent.stop().unwrap();
    assert!(status.success(), "{status}\n{}", agent.logs());
    let mut agent = start_agent(&lab, &apps);
    let (mut open, open_local) = spliced_echo(&lab, &agent, edge);
    let mut echo = [0u8; 4];
    open.write_all(b"more").unwrap();
    open.read_exact(&mut echo).unwrap();
    // SAFETY: plain kill(2) to our own child.
    unsafe { libc::kill(agent.pid() as libc::pid_t, libc::SIGTERM) };
    let status = agent.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status}\n{}", agent.logs());
    let d = wait_disconnect(&agent, "sweep", open_local, WAIT);
    assert_eq!(d.status(), 999, "{d:?}");
    assert_eq!(d.num("ClientBytes"), Some(WARM as u64 + 8), "{d:?}");
    assert_eq!(d.num("OriginBytes"), Some(8), "{d:?}");
}

#[test]
fn a_short_connection_reset_by_the_client_is_reset_at_the_origin() {
    init();
    if !require_root() {
        return;
    }
    // Below the handoff threshold a tcp_fastpath app's bytes go through the copy
    // engine under the handoff's watch: a client's RST there must still reach the
    // origin as an RST and end with 499, as on the socket path.
    let origin = SocketAddr::new(ORIGIN_V4.into(), 7115);
    let (lab, agent) = lab_and_agent(&app("shortrst", 7115, origin));
    let listener = origin_listener(&lab, origin);
    let (local, origin_saw) = hello_then_client_reset(
        &lab,
        listener,
        SocketAddr::new(EDGE_CLIENT_V4.into(), 7115),
        WAIT,
    );
    assert_eq!(
        origin_saw,
        Some(ErrorKind::ConnectionReset),
        "the origin must get the client's RST"
    );
    let d = wait_disconnect(&agent, "shortrst", local, WAIT);
    assert_eq!(d.status(), 499, "{d:?}");
    assert_eq!(d.num("ClientBytes"), Some(5), "{d:?}");
    assert_eq!(d.num("OriginBytes"), Some(2), "{d:?}");
}

/// An origin that sends past the handoff threshold and half-closes at once, while
/// the client is still open: the copy engine pauses at the threshold with the
/// origin's last bytes and FIN unread or on their way. Whether the handoff then
/// finds the origin closed (`not_quiet`) or reaches a quiet point before the FIN
/// arrives and splices, every byte arrives once, in order, and the client's reply
/// after the EOF reaches the origin.
#[test]
fn an_origin_that_half_closes_at_the_threshold_loses_no_byte() {
    init();
    if !require_root() {
        return;
    }
    const ANSWER: usize = HANDOFF_AFTER as usize + 44 * 1024;
    let pattern = |len: usize| -> Vec<u8> { (0..len).map(|i| (i * 13 % 251) as u8).collect() };
    let origin = SocketAddr::new(ORIGIN_V4.into(), 7116);
    let (lab, agent) = lab_and_agent(&app("halfclose-at", 7116, origin));
    let listener = origin_listener(&lab, origin);
    let (got_tx, got_rx) = std::sync::mpsc::channel();
    serve(listener, move |mut s: TcpStream| {
        s.write_all(&pattern(ANSWER)).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let (reply, err) = read_all(&mut s);
        let _ = got_tx.send((reply, err.map(|e| e.kind())));
    });
    let mut client =
        client_connect(&lab, SocketAddr::new(EDGE_CLIENT_V4.into(), 7116), WAIT).unwrap();
    let local = client.local_addr().unwrap();
    let (answer, err) = read_all(&mut client);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(answer.len(), ANSWER);
    assert!(answer == pattern(ANSWER), "the answer differs");
    client.write_all(b"bye").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (reply, err) = got_rx.recv_timeout(WAIT).expect("the origin's read");
    assert_eq!(err, None);
    assert_eq!(reply, b"bye");
    let d = wait_disconnect(&agent, "halfclose-at", local, WAIT);
    assert_eq!(d.status(), 200, "{d:?}");
    assert_eq!(d.num("ClientBytes"), Some(3), "{d:?}");
    assert_eq!(d.num("OriginBytes"), Some(ANSWER as u64), "{d:?}");
    // A handoff was due (the threshold was crossed) and was tried once.
    let stats = agent.stats().unwrap();
    let tried = ["spliced", "not_quiet"]
        .iter()
        .filter_map(|o| stats.tcp_fastpath.get(*o))
        .sum::<u64>();
    assert_eq!(tried, 1, "{:?}", stats.tcp_fastpath);
    assert_eq!(stats.tcp_fastpath.get("short"), Some(&0));
}
