//! SPEC §3 with real traffic: `forwarder run` in the lab's `edge` namespace, packets
//! from `client`, exact counter deltas from the agent's control socket.
//!
//! * ports no app claims never reach the edge's stack (listeners bound in `edge`
//!   see nothing), counted as `no_app`, UDP and TCP, also for the other protocol of
//!   an app's port;
//! * a SYN scan of all 65535 ports is dropped except the TCP app's 11 ports and the
//!   `pass` port;
//! * access rules: a blocked /24 and /64 are dropped as `firewall`, a neighbour
//!   outside passes, an allow rule inside the blocked range wins, `ip_firewall =
//!   false` apps ignore the rules, hits are counted per rule;
//! * a `pass` entry keeps a host service on the edge address reachable;
//! * ICMP echo, IPv4 and IPv6 (with neighbour discovery from empty caches), still
//!   works; other ICMP to the edge is dropped as `icmp`.
//!
//! What happens to datagrams accepted for a UDP app (today: passed to the kernel;
//! soon: the XDP fast path) is not asserted here beyond the app's ingress counter.
//! Run as root after `cargo build -p forwarder`:
//! `cargo test -p forwarder-tests --test ingress_policy` (or `cargo xtask test`).

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use forwarder::telemetry::snapshot::StatsSnapshot;
use forwarder_tests::agent::{
    AgentProcess, app_ingress, drops, rule_hits, udp_burst, xdp_attachment,
};
use forwarder_tests::{
    CLIENT_V4, CLIENT_V6, EDGE_CLIENT_V4, EDGE_CLIENT_V6, Lab, Netns, require_root,
};

/// Bound for counters to reach their expected value.
const COUNT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a listener in `edge` is watched for something that must not arrive
/// (after the counters showed every packet handled).
const QUIET: Duration = Duration::from_millis(300);

const UDP_APP: &str = "udp-5000";
const TCP_APP: &str = "tcp-6000-6010";
const OPEN_APP: &str = "open";
const BLOCKED_V4: &str = "10.0.3.0/24";
const ALLOWED_V4: &str = "10.0.3.7";
const BLOCKED_V6: &str = "fd00:3::/64";

fn config(lab: &Lab) -> String {
    let [ec, eo] = lab.edge_ifaces();
    format!(
        r#"[agent]
interfaces = ["{ec}", "{eo}"]
edge_addresses = ["10.0.1.1", "fd00:1::1"]
pass = ["tcp/22"]

[firewall]
default = "allow"

[[access_rules]]
mode = "block"
target = "ip_range"
value = "{BLOCKED_V4}"

[[access_rules]]
mode = "allow"
target = "ip"
value = "{ALLOWED_V4}"

[[access_rules]]
mode = "block"
target = "ip_range"
value = "{BLOCKED_V6}"

[[apps]]
protocol = "udp/5000"
origin_direct = ["udp://10.0.2.2:5000"]
proxy_protocol = "off"

[[apps]]
protocol = "tcp/6000-6010"
origin_direct = ["tcp://10.0.2.2:6000-6010"]

[[apps]]
id = "{OPEN_APP}"
protocol = "udp/5002"
origin_direct = ["udp://10.0.2.2:5002"]
ip_firewall = false
"#
    )
}

/// A lab with the pass stubs (a UDP fast path redirecting into the veths needs them,
/// SPEC §8) and the agent running with [`config`].
fn lab_with_agent() -> (Lab, AgentProcess) {
    let lab = Lab::new().unwrap();
    lab.attach_pass_stubs().unwrap();
    let agent = AgentProcess::start(&lab, &config(&lab)).unwrap();
    let xdp = xdp_attachment(lab.edge(), lab.edge_ifaces()[0]).unwrap();
    assert!(xdp.is_some(), "XDP attached on ec");
    (lab, agent)
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Every drop reason's delta between two snapshots, zeros left out.
fn drop_deltas(before: &StatsSnapshot, after: &StatsSnapshot) -> Vec<(String, u64)> {
    after
        .drops
        .keys()
        .map(|r| (r.clone(), drops(after, r) - drops(before, r)))
        .filter(|(_, d)| *d > 0)
        .collect()
}

/// `count` packets sent and `replies` received, from hping3's statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hping {
    sent: u64,
    replies: u64,
}

/// Runs `hping3 -q ARGS` in `ns`, interrupted (SIGINT: it still prints its
/// statistics) after `limit`; returns what it reports having sent and received.
fn hping3(ns: &Netns, args: &[&str], limit: Duration) -> Hping {
    let limit = format!("{}", limit.as_secs().max(1));
    let mut argv = vec!["-s", "INT", limit.as_str(), "hping3", "-q"];
    argv.extend_from_slice(args);
    let out = ns.cmd("timeout", &argv).output().expect("running hping3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // "65535 packets transmitted, 12 packets received, 100% packet loss"
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| {
            panic!(
                "no statistics from hping3 {args:?} ({}):\n{text}",
                out.status
            )
        });
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(numbers.len() >= 2, "unexpected hping3 statistics: {line}");
    Hping {
        sent: numbers[0],
        replies: numbers[1],
    }
}

/// Makes the client's kernel silent towards the edge: it sends no TCP RST. A SYN-ACK
/// to a raw (hping3) or abandoned SYN would otherwise be answered with a RST, and
/// RSTs to an app port are app ingress packets too: with this, the TCP app's
/// counter counts exactly the SYNs sent, whether or not a listener answers them.
fn client_sends_no_rst(lab: &Lab) {
    lab.client()
        .run(
            "nft",
            &["add table inet fwdtest; \
               add chain inet fwdtest out { type filter hook output priority 0; policy accept; }; \
               add rule inet fwdtest out tcp flags & rst == rst drop"],
        )
        .unwrap();
}

/// Binds a TCP listener in `ns` (non-blocking).
fn tcp_listener(ns: &Netns, addr: SocketAddr) -> TcpListener {
    let listener = ns
        .run_in(|| TcpListener::bind(addr))
        .unwrap()
        .unwrap_or_else(|e| panic!("binding {addr} in {}: {e}", ns.name()));
    listener.set_nonblocking(true).unwrap();
    listener
}

/// Binds a UDP socket in `ns` (non-blocking).
fn udp_socket(ns: &Netns, addr: SocketAddr) -> UdpSocket {
    let socket = ns
        .run_in(|| UdpSocket::bind(addr))
        .unwrap()
        .unwrap_or_else(|e| panic!("binding {addr} in {}: {e}", ns.name()));
    socket.set_nonblocking(true).unwrap();
    socket
}

/// Watches a listener for [`QUIET`]: nothing may be accepted.
#[track_caller]
fn assert_no_connection(listener: &TcpListener) {
    let deadline = Instant::now() + QUIET;
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((_, peer)) => panic!("{:?} accepted a connection from {peer}", listener),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Watches a UDP socket for [`QUIET`]: nothing may arrive.
#[track_caller]
fn assert_no_datagram(socket: &UdpSocket) {
    let deadline = Instant::now() + QUIET;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => panic!("{socket:?} received {n} bytes from {peer}"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("recv: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unconfigured_ports_never_reach_the_edge_stack() {
    if !require_root() {
        return;
    }
    let (lab, agent) = lab_with_agent();
    // Dual-stack listeners on every edge address: whatever got through would land
    // here.
    let udp_5001 = udp_socket(lab.edge(), sa(Ipv6Addr::UNSPECIFIED, 5001));
    // TCP 5000: the UDP app's port, other protocol: no app either.
    let tcp_5000 = tcp_listener(lab.edge(), sa(Ipv6Addr::UNSPECIFIED, 5000));

    // UDP: N datagrams to a port no app claims, over IPv4 and over IPv6.
    const N: u64 = 200;
    let before = agent.stats().unwrap();
    udp_burst(
        lab.client(),
        sa(CLIENT_V4, 0),
        sa(EDGE_CLIENT_V4, 5001),
        N as usize,
        &[0u8; 100],
    )
    .unwrap();
    udp_burst(
        lab.client(),
        sa(CLIENT_V6, 0),
        sa(EDGE_CLIENT_V6, 5001),
        N as usize,
        &[0u8; 100],
    )
    .unwrap();
    let no_app = agent
        .wait_counter(COUNT_TIMEOUT, drops(&before, "no_app") + 2 * N, |s| {
            drops(s, "no_app")
        })
        .unwrap();
    assert_eq!(
        no_app - drops(&before, "no_app"),
        2 * N,
        "udp/5001: no_app drops"
    );
    assert_no_datagram(&udp_5001);

    // TCP: 3 raw SYNs (hping3 never retransmits), none answered.
    let before = agent.stats().unwrap();
    let hping = hping3(
        lab.client(),
        &["-S", "-p", "5000", "-c", "3", "-i", "u10000", "10.0.1.1"],
        Duration::from_secs(20),
    );
    assert_eq!(
        hping,
        Hping {
            sent: 3,
            replies: 0
        },
        "SYNs to tcp/5000"
    );
    let no_app = agent
        .wait_counter(COUNT_TIMEOUT, drops(&before, "no_app") + 3, |s| {
            drops(s, "no_app")
        })
        .unwrap();
    assert_eq!(
        no_app - drops(&before, "no_app"),
        3,
        "tcp/5000: no_app drops"
    );
    let after = agent.stats().unwrap();
    assert_eq!(
        drop_deltas(&before, &after),
        vec![("no_app".to_owned(), 3)],
        "only no_app drops"
    );
    assert_no_connection(&tcp_5000);

    // A real connection attempt, v4 and v6: times out (dropped), not refused.
    let attempts = lab
        .client()
        .run_in(|| {
            [sa(EDGE_CLIENT_V4, 5000), sa(EDGE_CLIENT_V6, 5000)]
                .map(|addr| TcpStream::connect_timeout(&addr, Duration::from_millis(500)))
        })
        .unwrap();
    for attempt in attempts {
        let err = attempt.expect_err("connect to tcp/5000 must fail");
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    }
    assert_no_connection(&tcp_5000);

    // Nothing of this was app traffic.
    let stats = agent.stats().unwrap();
    for app in [UDP_APP, TCP_APP, OPEN_APP] {
        assert_eq!(app_ingress(&stats, app), 0, "{app}: {stats:#?}");
    }
}

#[test]
fn syn_scan_of_every_port_reaches_only_the_app_and_pass_ports() {
    if !require_root() {
        return;
    }
    let (lab, agent) = lab_with_agent();
    client_sends_no_rst(&lab);
    // A host service on the pass port.
    let _ssh = tcp_listener(lab.edge(), sa(EDGE_CLIENT_V4, 22));

    let before = agent.stats().unwrap();
    let started = Instant::now();
    // One SYN to each port 1..=65535 (`++1`: the destination port grows per packet).
    let hping = hping3(
        lab.client(),
        &["-S", "-p", "++1", "-c", "65535", "-i", "u20", "10.0.1.1"],
        Duration::from_secs(120),
    );
    eprintln!("hping3: {hping:?} in {:?}", started.elapsed());
    assert_eq!(hping.sent, 65535, "hping3 sent one SYN per port");

    // 11 app ports + tcp/22 pass the datapath; every other SYN is dropped.
    let expected_no_app = 65535 - 11 - 1;
    let no_app = agent
        .wait_counter(
            Duration::from_secs(10),
            drops(&before, "no_app") + expected_no_app,
            |s| drops(s, "no_app"),
        )
        .unwrap();
    let after = agent.stats().unwrap();
    assert_eq!(
        no_app - drops(&before, "no_app"),
        expected_no_app,
        "no_app drops"
    );
    assert_eq!(
        app_ingress(&after, TCP_APP) - app_ingress(&before, TCP_APP),
        11,
        "{TCP_APP} ingress: one SYN per app port"
    );
    assert_eq!(
        drop_deltas(&before, &after),
        vec![("no_app".to_owned(), expected_no_app)],
        "only no_app drops"
    );
    assert_eq!(app_ingress(&after, UDP_APP), 0);
}

#[test]
fn access_rules_block_a_range_and_an_allow_rule_inside_it_wins() {
    if !require_root() {
        return;
    }
    let (lab, agent) = lab_with_agent();
    client_sends_no_rst(&lab);
    let blocked = lab.add_client_address("10.0.3.5/24").unwrap();
    let allowed = lab.add_client_address("10.0.3.7/24").unwrap();
    let neighbour = lab.add_client_address("10.0.4.5/24").unwrap();
    let blocked6 = lab.add_client_address("fd00:3::5/64").unwrap();

    // UDP app (ip_firewall = true): N datagrams from each client.
    const N: u64 = 50;
    let before = agent.stats().unwrap();
    for src in [blocked, allowed, neighbour] {
        udp_burst(
            lab.client(),
            sa(src, 0),
            sa(EDGE_CLIENT_V4, 5000),
            N as usize,
            b"hello",
        )
        .unwrap();
    }
    let firewall = agent
        .wait_counter(COUNT_TIMEOUT, drops(&before, "firewall") + N, |s| {
            drops(s, "firewall")
        })
        .unwrap();
    let ingress = agent
        .wait_counter(COUNT_TIMEOUT, app_ingress(&before, UDP_APP) + 2 * N, |s| {
            app_ingress(s, UDP_APP)
        })
        .unwrap();
    let after = agent.stats().unwrap();
    assert_eq!(
        firewall - drops(&before, "firewall"),
        N,
        "{blocked} is blocked"
    );
    assert_eq!(
        ingress - app_ingress(&before, UDP_APP),
        2 * N,
        "{allowed} (allow rule) and {neighbour} (no rule) pass"
    );
    assert_eq!(
        rule_hits(&after, BLOCKED_V4) - rule_hits(&before, BLOCKED_V4),
        N
    );
    assert_eq!(
        rule_hits(&after, ALLOWED_V4) - rule_hits(&before, ALLOWED_V4),
        N
    );
    assert_eq!(rule_hits(&after, BLOCKED_V6), 0);
    assert_eq!(
        drop_deltas(&before, &after),
        vec![("firewall".to_owned(), N)]
    );

    // An app with ip_firewall = false ignores the rules (and counts no hits).
    let before = after;
    udp_burst(
        lab.client(),
        sa(blocked, 0),
        sa(EDGE_CLIENT_V4, 5002),
        N as usize,
        b"open",
    )
    .unwrap();
    let ingress = agent
        .wait_counter(COUNT_TIMEOUT, app_ingress(&before, OPEN_APP) + N, |s| {
            app_ingress(s, OPEN_APP)
        })
        .unwrap();
    let after = agent.stats().unwrap();
    assert_eq!(
        ingress - app_ingress(&before, OPEN_APP),
        N,
        "{OPEN_APP} ingress"
    );
    assert_eq!(drop_deltas(&before, &after), vec![]);
    assert_eq!(after.rule_hits, before.rule_hits, "no rule consulted");

    // TCP app: 3 SYNs from the blocked and from the allowed address.
    let before = after;
    let syns_from = |src: &IpAddr| {
        let src = src.to_string();
        let hping = hping3(
            lab.client(),
            &[
                "-S", "-a", &src, "-p", "6000", "-c", "3", "-i", "u10000", "10.0.1.1",
            ],
            Duration::from_secs(20),
        );
        assert_eq!(hping.sent, 3, "SYNs from {src}");
    };
    syns_from(&blocked);
    syns_from(&allowed);
    let firewall = agent
        .wait_counter(COUNT_TIMEOUT, drops(&before, "firewall") + 3, |s| {
            drops(s, "firewall")
        })
        .unwrap();
    let ingress = agent
        .wait_counter(COUNT_TIMEOUT, app_ingress(&before, TCP_APP) + 3, |s| {
            app_ingress(s, TCP_APP)
        })
        .unwrap();
    let after = agent.stats().unwrap();
    assert_eq!(
        firewall - drops(&before, "firewall"),
        3,
        "{blocked} → tcp/6000"
    );
    assert_eq!(
        ingress - app_ingress(&before, TCP_APP),
        3,
        "{allowed} → tcp/6000"
    );
    assert_eq!(
        rule_hits(&after, BLOCKED_V4) - rule_hits(&before, BLOCKED_V4),
        3
    );
    assert_eq!(
        rule_hits(&after, ALLOWED_V4) - rule_hits(&before, ALLOWED_V4),
        3
    );

    // IPv6: one SYN (a connect abandoned before the kernel's first retransmission at
    // 1 s) from the blocked /64 to the TCP app on the IPv6 edge address.
    let before = after;
    let attempt = lab
        .client()
        .block_on(async move {
            let socket = tokio::net::TcpSocket::new_v6()?;
            socket.bind(sa(blocked6, 0))?;
            tokio::time::timeout(
                Duration::from_millis(500),
                socket.connect(sa(EDGE_CLIENT_V6, 6000)),
            )
            .await
            .map_err(std::io::Error::from)?
        })
        .unwrap();
    let err = attempt.expect_err("a blocked client cannot connect");
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    let firewall = agent
        .wait_counter(COUNT_TIMEOUT, drops(&before, "firewall") + 1, |s| {
            drops(s, "firewall")
        })
        .unwrap();
    let after = agent.stats().unwrap();
    assert_eq!(
        firewall - drops(&before, "firewall"),
        1,
        "{blocked6} → [fd00:1::1]:6000"
    );
    assert_eq!(
        rule_hits(&after, BLOCKED_V6) - rule_hits(&before, BLOCKED_V6),
        1
    );
    assert_eq!(app_ingress(&after, TCP_APP), app_ingress(&before, TCP_APP));
}

#[test]
fn a_pass_entry_keeps_a_host_service_reachable() {
    if !require_root() {
        return;
    }
    let (lab, agent) = lab_with_agent();
    // A host "sshd" in edge, on both edge addresses: says hello and closes.
    let listeners = [
        tcp_listener(lab.edge(), sa(EDGE_CLIENT_V4, 22)),
        tcp_listener(lab.edge(), sa(EDGE_CLIENT_V6, 22)),
    ];
    let _server = lab
        .edge()
        .spawn_async(async move {
            let [v4, v6] = listeners.map(|l| tokio::net::TcpListener::from_std(l).unwrap());
            loop {
                let (mut stream, _) = tokio::select! {
                    r = v4.accept() => r.unwrap(),
                    r = v6.accept() => r.unwrap(),
                };
                use tokio::io::AsyncWriteExt as _;
                let _ = stream.write_all(b"hello\n").await;
                let _ = stream.shutdown().await;
            }
        })
        .unwrap();

    let before = agent.stats().unwrap();
    for edge in [IpAddr::V4(EDGE_CLIENT_V4), IpAddr::V6(EDGE_CLIENT_V6)] {
        let greeting = lab
            .client()
            .run_in(move || -> std::io::Result<String> {
                let mut stream = TcpStream::connect_timeout(&sa(edge, 22), Duration::from_secs(3))?;
                stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                stream.write_all(b"SSH-2.0-test\r\n")?;
                let mut text = String::new();
                stream.read_to_string(&mut text)?;
                Ok(text)
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("tcp/22 on {edge}: {e}"));
        assert_eq!(greeting, "hello\n", "from {edge}:22");
    }
    let after = agent.stats().unwrap();
    assert_eq!(drop_deltas(&before, &after), vec![], "nothing dropped");
    for app in [UDP_APP, TCP_APP, OPEN_APP] {
        assert_eq!(app_ingress(&after, app), 0, "pass traffic is no app's");
    }
}

#[test]
fn icmp_echo_and_ipv6_neighbour_discovery_still_work() {
    if !require_root() {
        return;
    }
    let (lab, agent) = lab_with_agent();
    let [ec, _] = lab.edge_ifaces();
    let cl = &lab.ifaces().client;
    let before = agent.stats().unwrap();

    lab.client()
        .run("ping", &["-n", "-c3", "-i0.05", "-W2", "10.0.1.1"])
        .unwrap();

    // Empty neighbour caches on both sides: the client must resolve the edge
    // (multicast NS, unicast NA back) and the edge the client (its NS/NA probes
    // are unicast to the edge address, through XDP).
    lab.client()
        .ip(&["-6", "neigh", "flush", "dev", cl.as_str()])
        .unwrap();
    lab.edge().ip(&["-6", "neigh", "flush", "dev", ec]).unwrap();
    lab.client()
        .run("ping", &["-n", "-6", "-c3", "-i0.05", "-W2", "fd00:1::1"])
        .unwrap();
    let neigh = lab
        .edge()
        .ip(&["-6", "neigh", "show", "dev", ec, &CLIENT_V6.to_string()])
        .unwrap();
    assert!(
        ["REACHABLE", "STALE", "DELAY", "PROBE"]
            .iter()
            .any(|s| neigh.contains(s)),
        "the edge has a neighbour entry for the client: {neigh:?}"
    );
    let neigh = lab
        .client()
        .ip(&["-6", "neigh", "show", "dev", cl.as_str(), "fd00:1::1"])
        .unwrap();
    assert!(
        neigh.contains("lladdr"),
        "the client resolved the edge: {neigh:?}"
    );

    let after = agent.stats().unwrap();
    assert_eq!(drop_deltas(&before, &after), vec![], "echo and ND pass");

    // ICMP that is neither echo nor an error: dropped as `icmp`.
    let before = after;
    let hping = hping3(
        lab.client(),
        &["--icmp-ts", "-c", "2", "-i", "u10000", "10.0.1.1"],
        Duration::from_secs(20),
    );
    assert_eq!(
        hping,
        Hping {
            sent: 2,
            replies: 0
        },
        "ICMP timestamp requests"
    );
    let icmp = agent
        .wait_counter(COUNT_TIMEOUT, drops(&before, "icmp") + 2, |s| {
            drops(s, "icmp")
        })
        .unwrap();
    assert_eq!(icmp - drops(&before, "icmp"), 2, "icmp drops");
}
