//! A random-source UDP flood against the real agent (SPEC §5, issue: hold under
//! floods): `hping3 --flood --rand-source` from the client namespace at a NAT app
//! that shares the NAT port pool and the flow tables with the apps of two
//! legitimate clients, for a bounded time and count.
//!
//! What must hold: the legitimate flows (assured before the flood) keep their
//! flow and their NAT port and get their replies; a legitimate client arriving
//! mid-flood is served; `stats` answers promptly; the event log stays bounded
//! (flow events beyond the budget are summarised); evictions are counted.
//! How fast is for the benchmark (`cargo xtask bench --scenario udp-spoof-flood`);
//! the latency bound here is only "not stuck behind a scan".
//!
//! Run: `cargo test -p forwarder-tests --test udp_flood` (root).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use forwarder::udp_flows::FLOW_EVENTS_PER_INTERVAL;
use forwarder_tests::agent::AgentProcess;
use forwarder_tests::spp_origin::{SppEchoOrigin, UdpEchoOrigin};
use forwarder_tests::{CLIENT_V4, EDGE_CLIENT_V4, Lab, ORIGIN_V4, Peers, require_root};

/// How long the flood lasts (and its packet cap): bounded both ways.
const FLOOD_SECONDS: u32 = 4;
const FLOOD_MAX_PACKETS: u32 = 4_000_000;
/// Waiting for one reply.
const REPLY_WAIT: Duration = Duration::from_millis(500);
/// A stats request slower than this is stuck behind something (the real figure is
/// the benchmark's).
const STATS_BOUND: Duration = Duration::from_millis(500);

fn config(ec: &str, eo: &str, event_log: &str) -> String {
    format!(
        r#"
[agent]
interfaces = ["{ec}", "{eo}"]
udp_idle_timeout = "60s"
udp_nat_ports = "40000-40999"
event_log = "{event_log}"

[[apps]]
id = "spp"
protocol = "udp/5000"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:5000"]
proxy_protocol = "simple"

[[apps]]
id = "nat"
protocol = "udp/5001"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:5001"]
proxy_protocol = "off"

[[apps]]
id = "flooded"
protocol = "udp/5003"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:5003"]
proxy_protocol = "off"
"#
    )
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn client_socket(lab: &Lab) -> Result<UdpSocket> {
    lab.client().udp_socket(sa(CLIENT_V4, 0), REPLY_WAIT)
}

/// One request and its reply (`None` when none came within `REPLY_WAIT`).
fn exchange(sock: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Result<Option<Vec<u8>>> {
    sock.send_to(payload, to)?;
    let mut buf = [0u8; 2048];
    loop {
        match sock.recv_from(&mut buf) {
            // A late reply to an earlier request: skip it.
            Ok((n, _)) if !buf[..n].ends_with(payload) => continue,
            Ok((n, _)) => return Ok(Some(buf[..n].to_vec())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A legitimate client's tally.
#[derive(Default, Debug)]
struct Tally {
    sent: u32,
    answered: u32,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_random_source_flood_leaves_live_flows_and_the_agent_alone_wire_like_peers() -> Result<()> {
    flood(Peers::WireLike)
}

#[test]
fn a_random_source_flood_leaves_live_flows_and_the_agent_alone_same_host_peers() -> Result<()> {
    flood(Peers::SameHost)
}

fn flood(peers: Peers) -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let lab = Lab::with_peers(peers)?;
    lab.attach_pass_stubs()?;
    let dir =
        TempDir(std::env::temp_dir().join(format!("fwd-flood-{}-{peers:?}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0)?;
    let log = dir.0.join("events.jsonl");
    let [ec, eo] = lab.edge_ifaces();
    let agent = AgentProcess::start(&lab, &config(ec, eo, &log.display().to_string()))?;
    let _spp_origin = SppEchoOrigin::start(lab.origin(), sa(ORIGIN_V4, 5000))?;
    let nat_origin = UdpEchoOrigin::start(lab.origin(), sa(ORIGIN_V4, 5001))?;

    // Two legitimate clients, assured before the flood (a reply, then more).
    let spp_edge = sa(EDGE_CLIENT_V4, 5000);
    let nat_edge = sa(EDGE_CLIENT_V4, 5001);
    let spp_client = client_socket(&lab)?;
    let nat_client = client_socket(&lab)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    for (sock, edge) in [(&spp_client, spp_edge), (&nat_client, nat_edge)] {
        let mut replies = 0;
        while replies < 2 {
            if Instant::now() > deadline {
                bail!("no replies before the flood\n{}", agent.logs());
            }
            if exchange(sock, edge, b"before")?.is_some() {
                replies += 1;
            }
        }
    }
    let nat_port = nat_origin
        .received()
        .last()
        .context("the NAT origin saw the client")?
        .from;
    agent
        .wait_stats(Duration::from_secs(5), |s| s.udp_flows.assured >= 2)
        .context("both legitimate flows are assured (the next scan says so)")?;

    // The flood: random sources, to the sibling app, bounded in time and count.
    let flood = lab.client().spawn(lab.client().cmd(
        "timeout",
        &[
            "-s".to_string(),
            "INT".into(),
            FLOOD_SECONDS.to_string(),
            "hping3".into(),
            "--udp".into(),
            "--flood".into(),
            "--rand-source".into(),
            "-c".into(),
            FLOOD_MAX_PACKETS.to_string(),
            "-p".into(),
            "5003".into(),
            "-d".into(),
            "16".into(),
            EDGE_CLIENT_V4.to_string(),
        ],
    ))?;
    std::thread::sleep(Duration::from_millis(500));
    let flood_end = Instant::now() + Duration::from_secs(u64::from(FLOOD_SECONDS) - 1);
    let (mut spp_tally, mut nat_tally) = (Tally::default(), Tally::default());
    let mut slowest_stats = Duration::ZERO;
    let mut newcomer_answered = false;
    let newcomer = client_socket(&lab)?;
    let mut round = 0u32;
    while Instant::now() < flood_end {
        round += 1;
        let payload = format!("during {round}");
        for (sock, edge, tally) in [
            (&spp_client, spp_edge, &mut spp_tally),
            (&nat_client, nat_edge, &mut nat_tally),
        ] {
            tally.sent += 1;
            if exchange(sock, edge, payload.as_bytes())?.is_some() {
                tally.answered += 1;
            }
        }
        if !newcomer_answered && round >= 3 {
            newcomer_answered = exchange(&newcomer, nat_edge, b"newcomer")?.is_some();
        }
        let asked = Instant::now();
        agent.stats()?;
        slowest_stats = slowest_stats.max(asked.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats_during = agent.stats()?;
    drop(flood);
    eprintln!(
        "{peers:?}: spp {spp_tally:?}, nat {nat_tally:?}, slowest stats {slowest_stats:?}, \
         during the flood: {:?}, drops {:?}",
        stats_during.udp_flows, stats_during.drops
    );

    let flooded = stats_during.udp_flows.evicted_table_full
        + stats_during.udp_flows.evicted_port_reclaimed
        + stats_during.udp_flows.new;
    assert!(
        flooded > 10_000,
        "the flood reached the flow tables ({:?})",
        stats_during.udp_flows
    );
    assert!(
        stats_during.udp_flows.evicted_port_reclaimed > 0,
        "the flood exhausted the NAT pool and ports were reclaimed: {:?}",
        stats_during.udp_flows
    );
    assert!(
        newcomer_answered,
        "a new legitimate client mid-flood is served"
    );
    for (what, tally) in [("SPP", &spp_tally), ("NAT", &nat_tally)] {
        assert!(
            tally.answered * 10 >= tally.sent * 9,
            "{what} client answered during the flood: {tally:?}"
        );
    }
    assert!(
        slowest_stats < STATS_BOUND,
        "stats answered within {STATS_BOUND:?} during the flood (slowest {slowest_stats:?})"
    );
    // The NAT client kept its flow and its port.
    let ports: BTreeSet<SocketAddr> = nat_origin
        .received()
        .iter()
        .filter(|r| r.payload.starts_with(b"during") || r.payload == b"before")
        .map(|r| r.from)
        .collect();
    assert_eq!(
        ports,
        BTreeSet::from([nat_port]),
        "the NAT flow kept its port"
    );

    // After the flood: one more scan, then the event log.
    std::thread::sleep(Duration::from_millis(2500));
    let text = std::fs::read_to_string(&log)?;
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("event lines are JSON")?;
    let about = |client: SocketAddr, kind: &str| {
        events
            .iter()
            .filter(|e| {
                e["Event"] == kind
                    && e["ClientIP"] == client.ip().to_string()
                    && e["ClientPort"] == client.port()
            })
            .count()
    };
    for sock in [&spp_client, &nat_client] {
        let me = sock.local_addr()?;
        assert_eq!(
            about(me, "connect"),
            1,
            "{me}: one connect, never re-created"
        );
        assert_eq!(about(me, "disconnect"), 0, "{me}: never closed");
    }
    // Bounded: the flow events of the (at most three) summary intervals the test
    // spans, plus summary lines.
    let bound = 3 * FLOW_EVENTS_PER_INTERVAL as usize + 30;
    assert!(
        events.len() <= bound,
        "{} event lines ({} bytes) for a flood; at most {bound} expected",
        events.len(),
        text.len()
    );
    let summarised: u64 = events
        .iter()
        .filter_map(|e| e.get("Flows").and_then(|f| f.as_u64()))
        .sum();
    assert!(
        summarised > 0,
        "flow events beyond the budget are summarised (Flows)"
    );
    eprintln!(
        "{peers:?}: {} event lines, {} bytes, {summarised} flow events summarised",
        events.len(),
        text.len()
    );
    drop(agent);
    lab.close()?;
    Ok(())
}
