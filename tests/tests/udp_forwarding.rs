//! UDP apps end to end (SPEC §5) in the netns lab: real sockets in `client` and
//! `origin`, the agent's datapath attached to both edge veths in `edge`.
//!
//! The agent is the real `forwarder run` (`forwarder_tests::agent::AgentProcess`;
//! build it first: `cargo build -p forwarder`, or run `cargo xtask test`), with an
//! event log file; counters come from its control socket. Origins are the echo
//! servers of `forwarder_tests::spp_origin`, plus dnsmasq for a real DNS exchange.
//! Every wait is bounded; the assertions are on bytes, counters and events, never on
//! how long anything took (the idle timeout is 60 s except in the expiry test, so no
//! flow ends while a test looks at it).
//!
//! Run: `cargo test -p forwarder-tests --test udp_forwarding` (root).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use forwarder::telemetry::snapshot::StatsSnapshot;
use forwarder::wire::proxy_v2::{Command, Transport};
use forwarder_tests::agent::{AgentProcess, drops};
use forwarder_tests::spp_origin::{ProxyV2EchoOrigin, SppEchoOrigin, UdpEchoOrigin, spp_datagram};
use forwarder_tests::{
    CLIENT_V4, CLIENT_V6, EDGE_CLIENT_V4, EDGE_CLIENT_V6, EDGE_ORIGIN_V4, EDGE_ORIGIN_V6, Lab,
    ORIGIN_V4, ORIGIN_V6, OutputOk as _, Peers, require_root,
};

const ORIGIN2_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
const NAT_LOW: u16 = 40000;
const NAT_HIGH: u16 = 40099;
/// How long a client waits for one reply before sending again.
const REPLY_WAIT: Duration = Duration::from_secs(2);
/// Bound of every "until" loop.
const PATIENCE: Duration = Duration::from_secs(10);
/// `udp_idle_timeout` of the expiry test.
const SHORT_IDLE: &str = "2s";
/// `udp_idle_timeout` elsewhere: no flow may end while a test looks at it.
const LONG_IDLE: &str = "60s";

fn config(ec: &str, eo: &str, idle_timeout: &str, event_log: &str) -> String {
    format!(
        r#"
[agent]
interfaces = ["{ec}", "{eo}"]
udp_idle_timeout = "{idle_timeout}"
udp_nat_ports = "{NAT_LOW}-{NAT_HIGH}"
event_log = "{event_log}"

[[apps]]
id = "spp4"
protocol = "udp/5000"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:5000"]
proxy_protocol = "simple"

[[apps]]
id = "off4"
protocol = "udp/5001"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:5001"]
proxy_protocol = "off"

[[apps]]
id = "v2-4"
protocol = "udp/5002"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:5002"]
proxy_protocol = "v2"

[[apps]]
id = "range4"
protocol = "udp/7000-7009"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:7100-7109"]
proxy_protocol = "simple"

[[apps]]
id = "multi-spp4"
protocol = "udp/5010"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:5010", "udp://10.0.2.3:5010"]
proxy_protocol = "simple"

[[apps]]
id = "multi-off4"
protocol = "udp/5011"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:5011", "udp://10.0.2.3:5011"]
proxy_protocol = "off"

[[apps]]
id = "dns"
protocol = "udp/53"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:53"]
proxy_protocol = "off"

[[apps]]
id = "spp6"
protocol = "udp/5000"
edge_ips = ["fd00:1::1"]
origin_direct = ["udp://[fd00:2::2]:5000"]
proxy_protocol = "simple"

[[apps]]
id = "off6"
protocol = "udp/5001"
edge_ips = ["fd00:1::1"]
origin_direct = ["udp://[fd00:2::2]:5001"]
proxy_protocol = "off"

[[apps]]
id = "v2-6"
protocol = "udp/5002"
edge_ips = ["fd00:1::1"]
origin_direct = ["udp://[fd00:2::2]:5002"]
proxy_protocol = "v2"
"#
    )
}

// ---- the agent: the real `forwarder run` in the edge namespace ---------------------

/// `forwarder run` in `edge` (see `forwarder_tests::agent`), with shorthands.
struct Edge(AgentProcess);

impl Edge {
    fn snapshot(&self) -> StatsSnapshot {
        self.0.stats().expect("agent stats")
    }

    fn drops(&self, reason: &str) -> u64 {
        drops(&self.snapshot(), reason)
    }

    /// Waits until the `reason` drop counter reached `want` and stayed there (bounded,
    /// see `AgentProcess::wait_counter`), then returns its value.
    fn wait_drops(&self, reason: &str, want: u64) -> u64 {
        self.0
            .wait_counter(PATIENCE, want, |s| drops(s, reason))
            .expect("agent stats")
    }

    fn wait(&self, what: &str, done: impl FnMut(&StatsSnapshot) -> bool) -> StatsSnapshot {
        self.0
            .wait_stats(PATIENCE, done)
            .unwrap_or_else(|e| panic!("{what}: {e:#}"))
    }
}

// ---- the setup ----------------------------------------------------------------------

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("fwd-udp-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A lab with a second origin address (10.0.2.3), XDP_PASS stubs on `cl` and `oe`,
/// and the agent on `ec` and `eo` with `config()`.
struct Setup {
    // Field order is drop order: the agent first, then the lab.
    agent: Edge,
    lab: Lab,
    dir: TempDir,
}

impl Setup {
    fn new(idle_timeout: &str, peers: Peers) -> Setup {
        let lab = Lab::with_peers(peers).expect("lab");
        lab.add_origin_address("10.0.2.3/24")
            .expect("second origin address");
        lab.attach_pass_stubs().expect("pass stubs on cl and oe");
        let dir = TempDir::new();
        let events = dir.0.join("events.jsonl");
        let [ec, eo] = lab.edge_ifaces();
        let toml = config(ec, eo, idle_timeout, &events.display().to_string());
        let agent = Edge(AgentProcess::start(&lab, &toml).expect("forwarder run starts"));
        let setup = Setup { agent, lab, dir };
        setup.wait_for_origin_neighbours();
        setup
    }

    /// Neither the client nor the origin dropped a datagram for a bad checksum
    /// (what same-host peers' partial checksums would cause if the forwarder left
    /// them as they came).
    #[track_caller]
    fn assert_no_checksum_errors(&self) {
        assert_eq!(
            self.lab.udp_checksum_errors().expect("nstat"),
            0,
            "UDP checksum errors at the client or origin ({:?} peers)",
            self.lab.peers()
        );
    }

    /// The agent asked the kernel to keep the origins' neighbours resolved; the
    /// first datagram needs their MACs (otherwise it is dropped as `no_route`).
    fn wait_for_origin_neighbours(&self) {
        let deadline = Instant::now() + PATIENCE;
        for addr in ["10.0.2.2", "10.0.2.3", "fd00:2::2"] {
            loop {
                let out = self
                    .lab
                    .edge()
                    .ip(&["neigh", "show", addr])
                    .expect("ip neigh");
                if out.contains("lladdr") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "neighbour {addr} never resolved: {out}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn client_socket(&self, bind: SocketAddr) -> UdpSocket {
        self.lab
            .client()
            .udp_socket(bind, REPLY_WAIT)
            .expect("client socket")
    }

    fn events(&self) -> Vec<BTreeMap<String, String>> {
        let text = std::fs::read_to_string(self.dir.0.join("events.jsonl")).unwrap_or_default();
        text.lines().map(json_fields).collect()
    }
}

/// The fields of one event-log line as text: strings unquoted, numbers and `null`
/// as written.
fn json_fields(line: &str) -> BTreeMap<String, String> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str(line) else {
        return BTreeMap::new();
    };
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect()
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Sends `payload` to `to` and waits for one reply, sending again at most twice if
/// none comes. Returns the reply and its source.
fn exchange(sock: &UdpSocket, to: SocketAddr, payload: &[u8]) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65536];
    for _ in 0..3 {
        sock.send_to(payload, to).expect("client send");
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => return (buf[..n].to_vec(), from),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("client recv: {e}"),
        }
    }
    panic!(
        "no reply from {to} to {} after 3 tries",
        sock.local_addr().unwrap()
    );
}

/// Asserts that nothing is waiting on `sock` right now.
#[track_caller]
fn assert_nothing_received(sock: &UdpSocket, what: &str) {
    sock.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 2048];
    match sock.recv_from(&mut buf) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok((n, from)) => panic!(
            "{what}: the client got {:?} from {from}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => panic!("{what}: recv: {e}"),
    }
    sock.set_nonblocking(false).expect("blocking");
}

fn tagged(client: SocketAddr, payload: &str) -> Vec<u8> {
    format!("{client}|{payload}").into_bytes()
}

// ---- the tests ----------------------------------------------------------------------

/// SPP, IPv4 and IPv6: the origin sees the true client and edge in every header;
/// the client gets the origin's payload from the edge address and port. A port
/// range lands on the right origin ports.
#[test]
fn spp_origin_sees_client_and_edge_and_client_sees_the_edge_wire_like_peers() -> Result<()> {
    spp_origin_sees_client_and_edge_and_client_sees_the_edge(Peers::WireLike)
}

#[test]
fn spp_origin_sees_client_and_edge_and_client_sees_the_edge_same_host_peers() -> Result<()> {
    spp_origin_sees_client_and_edge_and_client_sees_the_edge(Peers::SameHost)
}

fn spp_origin_sees_client_and_edge_and_client_sees_the_edge(peers: Peers) -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::new(LONG_IDLE, peers);
    for (client_ip, edge_ip, origin_ip, local_ip) in [
        (
            IpAddr::from(CLIENT_V4),
            IpAddr::from(EDGE_CLIENT_V4),
            IpAddr::from(ORIGIN_V4),
            IpAddr::from(EDGE_ORIGIN_V4),
        ),
        (
            CLIENT_V6.into(),
            EDGE_CLIENT_V6.into(),
            ORIGIN_V6.into(),
            EDGE_ORIGIN_V6.into(),
        ),
    ] {
        let origin = SppEchoOrigin::start(s.lab.origin(), sa(origin_ip, 5000))?;
        let edge = sa(edge_ip, 5000);
        let socks: Vec<UdpSocket> = (0..3).map(|_| s.client_socket(sa(client_ip, 0))).collect();
        for round in 0..3 {
            for (i, sock) in socks.iter().enumerate() {
                let me = sock.local_addr()?;
                let payload = format!("hello {i} round {round}");
                let (reply, from) = exchange(sock, edge, payload.as_bytes());
                assert_eq!(from, edge, "replies come from the edge address and port");
                assert_eq!(reply, tagged(me, &payload), "the origin's payload");
            }
        }
        let seen = origin.received();
        assert_eq!(seen.len(), 9, "one datagram per request: {seen:?}");
        for r in &seen {
            let h = r.spp.expect("every datagram has an SPP header");
            assert!(
                socks.iter().any(|s| s.local_addr().unwrap() == h.client),
                "SPP client {} is one of ours",
                h.client
            );
            assert_eq!(h.proxy, edge, "SPP proxy is the edge address and port");
            assert_eq!(r.from, sa(local_ip, 5000), "from the agent's origin side");
            assert!(r.payload.starts_with(b"hello "));
        }
        assert_eq!(origin.invalid(), 0);
    }

    // udp/7000-7009 -> 7100-7109: edge port 7000+k reaches origin port 7100+k.
    let ks = [0u16, 3, 4, 9];
    let origins: Vec<SppEchoOrigin> = ks
        .iter()
        .map(|k| SppEchoOrigin::start(s.lab.origin(), sa(ORIGIN_V4, 7100 + k)))
        .collect::<Result<_>>()?;
    let sock = s.client_socket(sa(CLIENT_V4, 0));
    let me = sock.local_addr()?;
    for k in ks {
        let edge = sa(EDGE_CLIENT_V4, 7000 + k);
        let (reply, from) = exchange(&sock, edge, format!("to {k}").as_bytes());
        assert_eq!(from, edge);
        assert_eq!(reply, tagged(me, &format!("to {k}")));
    }
    for (k, origin) in ks.iter().zip(&origins) {
        let pairs = origin.spp_pairs();
        assert_eq!(
            pairs,
            vec![(me, sa(EDGE_CLIENT_V4, 7000 + k))],
            "origin port {} got exactly the datagram for edge port {}",
            7100 + k,
            7000 + k
        );
    }
    let snap = s.agent.snapshot();
    assert_eq!(
        snap.drops.values().sum::<u64>(),
        0,
        "no drops: {:?}",
        snap.drops
    );
    assert_eq!(snap.apps["spp4"].ingress_packets, 9);
    assert_eq!(snap.apps["spp4"].egress_packets, 9);
    assert_eq!(snap.apps["spp6"].ingress_packets, 9);
    assert_eq!(snap.apps["range4"].ingress_packets, 4);
    s.assert_no_checksum_errors();
    Ok(())
}

/// A forged SPP reply naming a client without a flow, and replies from an address of
/// the origin host that is not the flow's origin (SPP and plain NAT), are dropped in
/// XDP: the client never gets them and `no_flow` grows by exactly one each.
#[test]
fn forged_and_foreign_replies_are_dropped_wire_like_peers() -> Result<()> {
    forged_and_foreign_replies_are_dropped(Peers::WireLike)
}

#[test]
fn forged_and_foreign_replies_are_dropped_same_host_peers() -> Result<()> {
    forged_and_foreign_replies_are_dropped(Peers::SameHost)
}

fn forged_and_foreign_replies_are_dropped(peers: Peers) -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::new(LONG_IDLE, peers);
    let origin = SppEchoOrigin::start(s.lab.origin(), sa(ORIGIN_V4, 5000))?;
    let edge = sa(EDGE_CLIENT_V4, 5000);
    let sock = s.client_socket(sa(CLIENT_V4, 0));
    let me = sock.local_addr()?;
    let (reply, _) = exchange(&sock, edge, b"real");
    assert_eq!(reply, tagged(me, "real"));

    // A client socket that never sent anything: no flow.
    let victim = s.client_socket(sa(CLIENT_V4, 0));
    let victim_addr = victim.local_addr()?;
    let before = s.agent.drops("no_flow");
    origin.send_raw(
        &spp_datagram(victim_addr, edge, b"forged"),
        sa(EDGE_ORIGIN_V4, 5000),
    )?;
    assert_eq!(s.agent.wait_drops("no_flow", before + 1), before + 1);
    assert_nothing_received(&victim, "forged SPP reply");
    // And with the live client's own flow under another edge port of no app.
    origin.send_raw(
        &spp_datagram(me, sa(EDGE_CLIENT_V4, 5999), b"forged"),
        sa(EDGE_ORIGIN_V4, 5000),
    )?;
    assert_eq!(s.agent.wait_drops("no_flow", before + 2), before + 2);
    // Bad magic: spp_invalid.
    let invalid_before = s.agent.drops("spp_invalid");
    let mut bad = spp_datagram(me, edge, b"forged");
    bad[0] ^= 0xff;
    origin.send_raw(&bad, sa(EDGE_ORIGIN_V4, 5000))?;
    assert_eq!(
        s.agent.wait_drops("spp_invalid", invalid_before + 1),
        invalid_before + 1
    );
    assert_nothing_received(&sock, "forged replies");

    // SPP app with two origins: the one that is not the flow's origin replays the
    // flow's header.
    let o1 = SppEchoOrigin::start(s.lab.origin(), sa(ORIGIN_V4, 5010))?;
    let o2 = SppEchoOrigin::start(s.lab.origin(), sa(ORIGIN2_V4, 5010))?;
    let edge = sa(EDGE_CLIENT_V4, 5010);
    let (reply, from) = exchange(&sock, edge, b"multi");
    assert_eq!((reply, from), (tagged(me, "multi"), edge));
    let (served, other) = match (o1.count(), o2.count()) {
        (1, 0) => (&o1, &o2),
        (0, 1) => (&o2, &o1),
        counts => panic!("exactly one origin serves the flow: {counts:?}"),
    };
    let header = served.received()[0].spp.expect("SPP header");
    let before = s.agent.drops("no_flow");
    other.send_raw(
        &spp_datagram(header.client, header.proxy, b"not yours"),
        sa(EDGE_ORIGIN_V4, 5010),
    )?;
    assert_eq!(s.agent.wait_drops("no_flow", before + 1), before + 1);
    assert_nothing_received(&sock, "SPP reply from the other origin");

    // Plain NAT app with two origins: the other origin sends to the flow's NAT port.
    let n1 = UdpEchoOrigin::start(s.lab.origin(), sa(ORIGIN_V4, 5011))?;
    let n2 = UdpEchoOrigin::start(s.lab.origin(), sa(ORIGIN2_V4, 5011))?;
    let edge = sa(EDGE_CLIENT_V4, 5011);
    let (reply, from) = exchange(&sock, edge, b"nat");
    assert_eq!(from, edge);
    let (served, other) = match (n1.count(), n2.count()) {
        (1, 0) => (&n1, &n2),
        (0, 1) => (&n2, &n1),
        counts => panic!("exactly one origin serves the flow: {counts:?}"),
    };
    let nat = served.received()[0].from;
    assert_eq!(reply, tagged(nat, "nat"));
    assert_eq!(nat.ip(), IpAddr::from(EDGE_ORIGIN_V4));
    let before = s.agent.drops("no_flow");
    other.send_raw(b"not yours either", nat)?;
    assert_eq!(s.agent.wait_drops("no_flow", before + 1), before + 1);
    assert_nothing_received(&sock, "NAT reply from the other origin");
    // The flow still works for its own origin.
    let (reply, _) = exchange(&sock, edge, b"still");
    assert_eq!(reply, tagged(nat, "still"));
    s.assert_no_checksum_errors();
    Ok(())
}

/// 1,000 flows from distinct source ports at once (in batches of 100 in flight):
/// every one gets its own reply, and the origin saw 1,000 distinct clients.
#[test]
fn a_thousand_concurrent_flows_get_their_own_replies_wire_like_peers() -> Result<()> {
    a_thousand_concurrent_flows_get_their_own_replies(Peers::WireLike)
}

#[test]
fn a_thousand_concurrent_flows_get_their_own_replies_same_host_peers() -> Result<()> {
    a_thousand_concurrent_flows_get_their_own_replies(Peers::SameHost)
}

fn a_thousand_concurrent_flows_get_their_own_replies(peers: Peers) -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const FLOWS: usize = 1000;
    const BATCH: usize = 100;
    let s = Setup::new(LONG_IDLE, peers);
    let origin = SppEchoOrigin::start(s.lab.origin(), sa(ORIGIN_V4, 5000))?;
    let edge = sa(EDGE_CLIENT_V4, 5000);
    let socks: Vec<UdpSocket> = s
        .lab
        .client()
        .run_in(|| {
            (0..FLOWS)
                .map(|_| UdpSocket::bind(sa(CLIENT_V4, 0)))
                .collect::<std::io::Result<Vec<_>>>()
        })?
        .context("1000 client sockets")?;
    let mut buf = [0u8; 2048];
    let mut resent = 0usize;
    for (b, batch) in socks.chunks(BATCH).enumerate() {
        let mut pending: Vec<usize> = (0..batch.len()).collect();
        for attempt in 0..3 {
            if pending.is_empty() {
                break;
            }
            if attempt > 0 {
                resent += pending.len();
            }
            for &i in &pending {
                let id = b * BATCH + i;
                batch[i].send_to(format!("request {id}").as_bytes(), edge)?;
            }
            let mut still = Vec::new();
            for &i in &pending {
                let id = b * BATCH + i;
                let sock = &batch[i];
                sock.set_read_timeout(Some(Duration::from_millis(500)))?;
                match sock.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        let me = sock.local_addr()?;
                        assert_eq!(from, edge, "flow {id}: reply from the edge");
                        assert_eq!(
                            &buf[..n],
                            &tagged(me, &format!("request {id}"))[..],
                            "flow {id}: its own reply"
                        );
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        still.push(i)
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            pending = still;
        }
        assert!(
            pending.is_empty(),
            "batch {b}: {} flows never got a reply",
            pending.len()
        );
    }
    let clients: BTreeSet<SocketAddr> = origin.spp_pairs().into_iter().map(|(c, _)| c).collect();
    assert_eq!(clients.len(), FLOWS, "the origin saw every client");
    assert_eq!(resent, 0, "veth lost no datagram");
    // The agent's flow scan (once a second) counts them.
    let snap = s
        .agent
        .wait("1000 live flows", |s| s.apps["spp4"].live == FLOWS as u64);
    assert_eq!(snap.apps["spp4"].ingress_packets, FLOWS as u64);
    assert_eq!(snap.apps["spp4"].egress_packets, FLOWS as u64);
    assert_eq!(
        snap.drops.values().sum::<u64>(),
        0,
        "no drops: {:?}",
        snap.drops
    );
    s.assert_no_checksum_errors();
    Ok(())
}

/// Plain NAT: the origin sees the agent's origin-side address and a port of
/// `udp_nat_ports`, one per flow, the same for every datagram of a flow. PROXY v2:
/// the first datagram of a flow carries a DGRAM header naming client and edge, the
/// second does not. IPv4 and IPv6.
#[test]
fn plain_nat_ports_and_proxy_v2_on_the_first_datagram_wire_like_peers() -> Result<()> {
    plain_nat_ports_and_proxy_v2_on_the_first_datagram(Peers::WireLike)
}

#[test]
fn plain_nat_ports_and_proxy_v2_on_the_first_datagram_same_host_peers() -> Result<()> {
    plain_nat_ports_and_proxy_v2_on_the_first_datagram(Peers::SameHost)
}

fn plain_nat_ports_and_proxy_v2_on_the_first_datagram(peers: Peers) -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::new(LONG_IDLE, peers);
    for (client_ip, edge_ip, origin_ip, local_ip) in [
        (
            IpAddr::from(CLIENT_V4),
            IpAddr::from(EDGE_CLIENT_V4),
            IpAddr::from(ORIGIN_V4),
            IpAddr::from(EDGE_ORIGIN_V4),
        ),
        (
            CLIENT_V6.into(),
            EDGE_CLIENT_V6.into(),
            ORIGIN_V6.into(),
            EDGE_ORIGIN_V6.into(),
        ),
    ] {
        // Plain NAT, 20 flows, two datagrams each.
        let origin = UdpEchoOrigin::start(s.lab.origin(), sa(origin_ip, 5001))?;
        let edge = sa(edge_ip, 5001);
        let socks: Vec<UdpSocket> = (0..20).map(|_| s.client_socket(sa(client_ip, 0))).collect();
        let mut nat_of = BTreeMap::new();
        for round in 0..2 {
            for (i, sock) in socks.iter().enumerate() {
                let payload = format!("nat {i} {round}");
                let (reply, from) = exchange(sock, edge, payload.as_bytes());
                assert_eq!(from, edge, "reply from the edge address and port");
                let seen = origin.received().pop().expect("origin got it");
                assert_eq!(seen.payload, payload.as_bytes(), "payload untouched");
                assert_eq!(seen.from.ip(), local_ip, "from the agent's origin side");
                assert!(
                    (NAT_LOW..=NAT_HIGH).contains(&seen.from.port()),
                    "source port {} inside udp_nat_ports",
                    seen.from.port()
                );
                assert_eq!(reply, tagged(seen.from, &payload));
                let me = sock.local_addr()?;
                let port = *nat_of.entry(me).or_insert(seen.from.port());
                assert_eq!(port, seen.from.port(), "a flow keeps its NAT port");
            }
        }
        let distinct: HashSet<u16> = nat_of.values().copied().collect();
        assert_eq!(
            distinct.len(),
            socks.len(),
            "one NAT port per flow: {nat_of:?}"
        );

        // PROXY v2.
        let origin = ProxyV2EchoOrigin::start(s.lab.origin(), sa(origin_ip, 5002))?;
        let edge = sa(edge_ip, 5002);
        for _ in 0..3 {
            let sock = s.client_socket(sa(client_ip, 0));
            let me = sock.local_addr()?;
            origin.clear();
            let (reply, from) = exchange(&sock, edge, b"first");
            assert_eq!((reply, from), (tagged(me, "first"), edge));
            let (reply, _) = exchange(&sock, edge, b"second");
            assert_eq!(reply, tagged(me, "second"));
            let seen = origin.received();
            assert_eq!(seen.len(), 2);
            let v2 = seen[0]
                .v2
                .clone()
                .expect("the first datagram has a v2 header");
            assert_eq!(v2.command, Command::Proxy);
            assert_eq!(v2.transport, Transport::Dgram);
            assert_eq!(v2.addresses, Some((me, edge)), "v2 names client and edge");
            assert!(v2.tlvs.is_empty());
            assert_eq!(seen[0].payload, b"first");
            assert_eq!(seen[1].v2, None, "the second datagram has no header");
            assert_eq!(seen[1].payload, b"second");
            assert_eq!(seen[0].from, seen[1].from, "same NAT port");
            assert_eq!(seen[0].from.ip(), local_ip);
            assert!((NAT_LOW..=NAT_HIGH).contains(&seen[0].from.port()));
        }
    }
    let snap = s.agent.snapshot();
    assert_eq!(
        snap.drops.values().sum::<u64>(),
        0,
        "no drops: {:?}",
        snap.drops
    );
    s.assert_no_checksum_errors();
    Ok(())
}

/// Idle flows end after `udp_idle_timeout` (2 s) with a `disconnect` event whose
/// counts are exactly the traffic sent, and the apps' live gauges return to 0.
#[test]
fn idle_flows_expire_with_exact_disconnect_events_wire_like_peers() -> Result<()> {
    idle_flows_expire_with_exact_disconnect_events(Peers::WireLike)
}

#[test]
fn idle_flows_expire_with_exact_disconnect_events_same_host_peers() -> Result<()> {
    idle_flows_expire_with_exact_disconnect_events(Peers::SameHost)
}

fn idle_flows_expire_with_exact_disconnect_events(peers: Peers) -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::new(SHORT_IDLE, peers);
    let spp4 = SppEchoOrigin::start(s.lab.origin(), sa(ORIGIN_V4, 5000))?;
    let off4 = UdpEchoOrigin::start(s.lab.origin(), sa(ORIGIN_V4, 5001))?;
    let v2_4 = ProxyV2EchoOrigin::start(s.lab.origin(), sa(ORIGIN_V4, 5002))?;
    let spp6 = SppEchoOrigin::start(s.lab.origin(), sa(ORIGIN_V6, 5000))?;
    struct Flow {
        app: &'static str,
        proxy: &'static str,
        client: SocketAddr,
        edge: SocketAddr,
        origin: SocketAddr,
        client_bytes: u64,
        origin_bytes: u64,
    }
    let mut flows = Vec::new();
    for (app, proxy, client_ip, edge, origin) in [
        (
            "spp4",
            "simple",
            IpAddr::from(CLIENT_V4),
            sa(EDGE_CLIENT_V4, 5000),
            &*spp4,
        ),
        (
            "off4",
            "off",
            CLIENT_V4.into(),
            sa(EDGE_CLIENT_V4, 5001),
            &*off4,
        ),
        (
            "v2-4",
            "v2",
            CLIENT_V4.into(),
            sa(EDGE_CLIENT_V4, 5002),
            &*v2_4,
        ),
        (
            "spp6",
            "simple",
            CLIENT_V6.into(),
            sa(EDGE_CLIENT_V6, 5000),
            &*spp6,
        ),
    ] {
        let sock = s.client_socket(sa(client_ip, 0));
        let me = sock.local_addr()?;
        let mut client_bytes = 0;
        let mut origin_bytes = 0;
        for payload in ["a", "bb", "ccccccc"] {
            let (reply, from) = exchange(&sock, edge, payload.as_bytes());
            assert_eq!(from, edge);
            // The plain echo tags with the datagram's source (the NAT address).
            let tag = match proxy {
                "off" => origin.received().last().expect("received").from,
                _ => me,
            };
            assert_eq!(reply, tagged(tag, payload));
            client_bytes += payload.len() as u64;
            origin_bytes += reply.len() as u64;
        }
        flows.push(Flow {
            app,
            proxy,
            client: me,
            edge,
            origin: origin.local_addr(),
            client_bytes,
            origin_bytes,
        });
    }
    assert_eq!(s.agent.snapshot().drops.values().sum::<u64>(), 0);

    // Scan until every flow has ended (bounded); connect events come first.
    let deadline = Instant::now() + PATIENCE;
    let disconnects = loop {
        let events = s.events();
        let ended: Vec<_> = events
            .iter()
            .filter(|e| e.get("Event").map(String::as_str) == Some("disconnect"))
            .cloned()
            .collect();
        if ended.len() >= flows.len() {
            break events;
        }
        assert!(
            Instant::now() < deadline,
            "flows did not expire: {events:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    for f in &flows {
        let mine: Vec<&BTreeMap<String, String>> = disconnects
            .iter()
            .filter(|e| e.get("ClientPort") == Some(&f.client.port().to_string()))
            .filter(|e| e.get("ClientIP") == Some(&f.client.ip().to_string()))
            .collect();
        let kinds: Vec<&str> = mine.iter().map(|e| e["Event"].as_str()).collect();
        assert_eq!(kinds, ["connect", "disconnect"], "{}: events", f.app);
        let connect = mine[0];
        assert_eq!(connect["Status"], "0", "{}: connect status", f.app);
        let e = mine[1];
        let want = [
            ("Application", f.app.to_string()),
            ("Protocol", "udp".to_string()),
            ("ProxyProtocol", f.proxy.to_string()),
            ("ClientIP", f.client.ip().to_string()),
            ("ClientPort", f.client.port().to_string()),
            ("ServerIP", f.edge.ip().to_string()),
            ("ServerPort", f.edge.port().to_string()),
            ("OriginIP", f.origin.ip().to_string()),
            ("OriginPort", f.origin.port().to_string()),
            ("ClientBytes", f.client_bytes.to_string()),
            ("OriginBytes", f.origin_bytes.to_string()),
            ("ClientPackets", "3".to_string()),
            ("OriginPackets", "3".to_string()),
            ("Status", "200".to_string()),
        ];
        for (field, value) in want {
            assert_eq!(
                e.get(field),
                Some(&value),
                "{}: disconnect field {field} in {e:?}",
                f.app
            );
        }
        assert!(
            e.get("DisconnectTimestamp")
                .is_some_and(|t| t.ends_with('Z')),
            "{}: DisconnectTimestamp",
            f.app
        );
    }
    // The live gauges are updated at the end of the scan that ended the flows.
    s.agent.wait("no live flows left", |snap| {
        flows.iter().all(|f| snap.apps[f.app].live == 0)
    });
    s.assert_no_checksum_errors();
    Ok(())
}

/// A real client against a real server: `dig` in `client` asks dnsmasq in `origin`
/// through the edge (udp/53, proxy protocol off).
#[test]
fn dig_resolves_through_the_edge_against_dnsmasq_wire_like_peers() -> Result<()> {
    dig_resolves_through_the_edge_against_dnsmasq(Peers::WireLike)
}

#[test]
fn dig_resolves_through_the_edge_against_dnsmasq_same_host_peers() -> Result<()> {
    dig_resolves_through_the_edge_against_dnsmasq(Peers::SameHost)
}

fn dig_resolves_through_the_edge_against_dnsmasq(peers: Peers) -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::new(LONG_IDLE, peers);
    let pid_file = s.dir.0.join("dnsmasq.pid");
    let mut cmd = s.lab.origin().cmd(
        "dnsmasq",
        &[
            "--no-daemon".to_string(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--listen-address=10.0.2.2".into(),
            "--bind-interfaces".into(),
            "--port=53".into(),
            "--address=/example.test/192.0.2.99".into(),
            format!("--pid-file={}", pid_file.display()),
            "--conf-file=/dev/null".into(),
            "--user=root".into(),
        ],
    );
    let log = s.dir.0.join("dnsmasq.log");
    let log_file = std::fs::File::create(&log)?;
    cmd.stdout(log_file.try_clone()?).stderr(log_file);
    let mut dnsmasq = s.lab.origin().spawn(cmd)?;
    // Listening? (bounded)
    let deadline = Instant::now() + PATIENCE;
    loop {
        let out = s.lab.origin().run("ss", &["-Hnlu", "sport = :53"])?;
        if out.contains("10.0.2.2:53") {
            break;
        }
        if let Some(status) = dnsmasq.try_wait()? {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("dnsmasq exited: {status}\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "dnsmasq never listened\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let answer = s
        .lab
        .client()
        .cmd(
            "dig",
            &[
                "@10.0.1.1",
                "-p",
                "53",
                "example.test",
                "+short",
                "+tries=1",
                "+time=2",
            ],
        )
        .output_ok()?;
    assert_eq!(answer.trim(), "192.0.2.99");
    let snap = s.agent.snapshot();
    assert_eq!(snap.apps["dns"].ingress_packets, 1);
    assert_eq!(snap.apps["dns"].egress_packets, 1);
    assert_eq!(
        snap.drops.values().sum::<u64>(),
        0,
        "no drops: {:?}",
        snap.drops
    );
    dnsmasq.terminate(Duration::from_secs(2))?;
    s.assert_no_checksum_errors();
    Ok(())
}

/// Sends `count` UDP datagrams from the client namespace with a forged source
/// (`hping3 -a`): `from` → `to`, carrying `payload`.
fn hping_forged(
    lab: &Lab,
    dir: &TempDir,
    from: SocketAddr,
    to: SocketAddr,
    payload: &[u8],
    count: u32,
) {
    let file = dir.0.join(format!("forged-{}.bin", to.port()));
    std::fs::write(&file, payload).expect("payload file");
    // hping3 exits 1 when nothing answers (the point here): only its own errors
    // (no "packets transmitted" line) fail the test.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", lab.client().name(), "hping3"])
        .args([
            "--udp",
            "-a",
            &from.ip().to_string(),
            "-s",
            &from.port().to_string(),
            "-k",
            "-p",
            &to.port().to_string(),
            "-c",
            &count.to_string(),
            "-i",
            "u20000",
            "-d",
            &payload.len().to_string(),
            "-E",
            &file.display().to_string(),
            &to.ip().to_string(),
        ])
        .output()
        .expect("hping3 runs");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        report.contains(&format!("{count} packets transmitted")),
        "hping3 sent {count} datagrams: {report}"
    );
}

/// From the client side, datagrams with the origin's address and port, to the
/// edge address and port (SPP, naming a live client) and to the NAT port: never
/// delivered to the live clients, counted `spoofed`, and the flows work on.
fn spoofed_replies_from_the_client_side_are_never_delivered(peers: Peers) -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::new(LONG_IDLE, peers);
    let _spp = SppEchoOrigin::start(s.lab.origin(), sa(ORIGIN_V4, 5000))?;
    let nat_origin = UdpEchoOrigin::start(s.lab.origin(), sa(ORIGIN_V4, 5001))?;
    let sock = s.client_socket(sa(CLIENT_V4, 0));
    let me = sock.local_addr()?;
    let spp_edge = sa(EDGE_CLIENT_V4, 5000);
    let (reply, _) = exchange(&sock, spp_edge, b"real");
    assert_eq!(reply, tagged(me, "real"));
    let nat_edge = sa(EDGE_CLIENT_V4, 5001);
    let (reply, _) = exchange(&sock, nat_edge, b"nat");
    let nat = nat_origin.received()[0].from;
    assert_eq!(reply, tagged(nat, "nat"));

    let before = s.agent.drops("spoofed");
    // SPP: to the edge address and port, a header naming the live client.
    hping_forged(
        &s.lab,
        &s.dir,
        sa(ORIGIN_V4, 5000),
        spp_edge,
        &spp_datagram(me, spp_edge, b"forged"),
        3,
    );
    // SPP: to the agent's origin-side address, which the client can route to.
    hping_forged(
        &s.lab,
        &s.dir,
        sa(ORIGIN_V4, 5000),
        sa(EDGE_ORIGIN_V4, 5000),
        &spp_datagram(me, spp_edge, b"forged"),
        3,
    );
    // Plain NAT: to the flow's NAT port.
    hping_forged(&s.lab, &s.dir, sa(ORIGIN_V4, 5001), nat, b"forged", 3);
    assert_eq!(s.agent.wait_drops("spoofed", before + 9), before + 9);
    assert_nothing_received(&sock, "forged replies from the client side");
    let (reply, _) = exchange(&sock, spp_edge, b"still");
    assert_eq!(reply, tagged(me, "still"));
    let (reply, _) = exchange(&sock, nat_edge, b"still");
    assert_eq!(reply, tagged(nat, "still"));
    s.assert_no_checksum_errors();
    Ok(())
}

#[test]
fn spoofed_replies_from_the_client_side_are_never_delivered_wire_like_peers() -> Result<()> {
    spoofed_replies_from_the_client_side_are_never_delivered(Peers::WireLike)
}

#[test]
fn spoofed_replies_from_the_client_side_are_never_delivered_same_host_peers() -> Result<()> {
    spoofed_replies_from_the_client_side_are_never_delivered(Peers::SameHost)
}

/// The origin's MAC changes and the edge learns the new one: a live flow's
/// datagrams (both ways) follow within a second, without a reload — the cached
/// route of every flow is looked up again after each route epoch.
#[test]
fn a_neighbour_mac_change_mid_flow_is_followed_within_a_second() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::new(LONG_IDLE, Peers::WireLike);
    let origin = SppEchoOrigin::start(s.lab.origin(), sa(ORIGIN_V4, 5000))?;
    let sock = s.client_socket(sa(CLIENT_V4, 0));
    let me = sock.local_addr()?;
    let edge = sa(EDGE_CLIENT_V4, 5000);
    let (reply, _) = exchange(&sock, edge, b"before");
    assert_eq!(reply, tagged(me, "before"));

    let oe = s.lab.ifaces().origin.clone();
    let eo = s.lab.ifaces().edge_origin.clone();
    let new_mac = "02:00:00:00:aa:01";
    s.lab
        .origin()
        .ip(&["link", "set", "dev", &oe, "address", new_mac])?;
    s.lab.edge().ip(&[
        "neigh",
        "replace",
        "10.0.2.2",
        "lladdr",
        new_mac,
        "dev",
        &eo,
        "nud",
        "reachable",
    ])?;
    let changed = Instant::now();
    // Datagrams sent meanwhile may go to the old MAC; within a second one must
    // arrive at the new one and its reply come back.
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut buf = [0u8; 2048];
    let mut answered = None;
    while changed.elapsed() < Duration::from_secs(3) {
        sock.send_to(b"after", edge)?;
        if let Ok((n, _)) = sock.recv_from(&mut buf)
            && buf[..n] == tagged(me, "after")[..]
        {
            answered = Some(changed.elapsed());
            break;
        }
    }
    let answered = answered.expect("the flow never followed the new MAC");
    assert!(
        answered < Duration::from_millis(1000),
        "the flow followed the new MAC after {answered:?}"
    );
    assert!(origin.count() >= 2);
    Ok(())
}

#[test]
fn json_fields_reads_event_lines() {
    let f = json_fields(
        r#"{"Timestamp":"2024-01-01T00:00:00.000000Z","Event":"disconnect","ClientIP":"fd00:1::2","ClientPort":40000,"OriginIP":null,"Note":"a\"b,c}"}"#,
    );
    assert_eq!(f["Event"], "disconnect");
    assert_eq!(f["ClientIP"], "fd00:1::2");
    assert_eq!(f["ClientPort"], "40000");
    assert_eq!(f["OriginIP"], "null");
    assert_eq!(f["Note"], "a\"b,c}");
}
