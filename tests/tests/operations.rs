//! Operating the agent (SPEC §6, §7): the metrics endpoint after known traffic, hot
//! reload under load (SIGHUP and a change of the file), an invalid config on reload,
//! the event log reopened on SIGHUP, `clientFiltered` summaries and the analytics of
//! `forwarder stats`. The real binary runs in the lab's edge namespace
//! ([`AgentProcess`]); every wait is bounded and every assertion is on exact counts.

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use forwarder_tests::agent::AgentProcess;
use forwarder_tests::{Lab, Netns, require_root};

const METRICS: &str = "127.0.0.1:9477";
const PATIENCE: Duration = Duration::from_secs(10);

/// A directory removed on drop (event logs live here, outside the agent's own).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("fwd-ops-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a temporary directory");
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `GET /metrics` from inside the edge namespace.
fn scrape(lab: &Lab) -> Result<String> {
    let mut stream = lab
        .edge()
        .run_in(|| TcpStream::connect(METRICS))?
        .context("connecting to the metrics endpoint")?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: forwarder\r\nConnection: close\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    if !reply.starts_with("HTTP/1.1 200") {
        bail!("metrics endpoint answered: {reply}");
    }
    Ok(reply)
}

/// The value of the sample whose name and labels are exactly `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes until `series` has `value` (bounded), then returns the exposition.
fn wait_sample(lab: &Lab, series: &str, value: f64) -> Result<String> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = scrape(lab)?;
        if sample(&text, series) == Some(value) || Instant::now() >= deadline {
            return Ok(text);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `read` until it contains `needle`, for at most `PATIENCE`.
fn wait_text(what: &str, needle: &str, read: impl Fn() -> String) -> Result<String> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = read();
        if text.contains(needle) {
            return Ok(text);
        }
        if Instant::now() >= deadline {
            bail!("{what} never showed {needle:?}:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A UDP echo server in `ns` that prefixes replies with `tag` (which origin answered).
struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start(ns: &Netns, bind: &str, tag: &'static [u8]) -> Result<Echo> {
        let bind: SocketAddr = bind.parse()?;
        let socket = ns.run_in(move || UdpSocket::bind(bind))??;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let mut reply = tag.to_vec();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        Ok(Echo {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP socket of the client namespace, bound to `bind`.
fn client_socket(lab: &Lab, bind: &str) -> Result<UdpSocket> {
    lab.client()
        .udp_socket(bind.parse()?, Duration::from_secs(2))
}

/// Sends `payload` to `to` and returns the reply (retrying a few times).
fn ask(socket: &UdpSocket, to: &str, payload: &[u8]) -> Result<Vec<u8>> {
    let to: SocketAddr = to.parse()?;
    let mut buf = [0u8; 2048];
    for _ in 0..3 {
        socket.send_to(payload, to)?;
        if let Ok(n) = socket.recv(&mut buf) {
            return Ok(buf[..n].to_vec());
        }
    }
    bail!("no reply from {to}")
}

fn base_agent(ec: &str, eo: &str, log: &Path) -> String {
    format!(
        "[agent]\ninterfaces = [\"{ec}\", \"{eo}\"]\nmetrics_listen = \"{METRICS}\"\n\
         event_log = \"{}\"\nudp_idle_timeout = \"2s\"\n\n",
        log.display()
    )
}

fn udp_app(id: &str, port: u16, origin: &str) -> String {
    format!(
        "[[apps]]\nid = \"{id}\"\nprotocol = \"udp/{port}\"\norigin_direct = [\"udp://{origin}:{port}\"]\n\n"
    )
}

fn tcp_app(id: &str, port: u16, origin: &str) -> String {
    format!(
        "[[apps]]\nid = \"{id}\"\nprotocol = \"tcp/{port}\"\norigin_direct = [\"tcp://{origin}:{port}\"]\n\n"
    )
}

fn events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn metrics_after_known_traffic_are_exact() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let lab = Lab::new()?;
    lab.attach_pass_stubs()?;
    let tmp = TempDir::new("metrics");
    let log = tmp.path("events.log");
    let [ec, eo] = lab.edge_ifaces();
    let config = format!(
        "{}[[access_rules]]\nmode = \"block\"\ntarget = \"ip\"\nvalue = \"10.0.1.200\"\n\n{}",
        base_agent(ec, eo, &log),
        udp_app("echo", 5000, "10.0.2.2")
    );
    let _origin = Echo::start(lab.origin(), "10.0.2.2:5000", b"")?;
    lab.add_client_address("10.0.1.200/24")?;
    let agent = AgentProcess::start(&lab, &config)?;

    // Every reason is there from the start, zeros included.
    let text = scrape(&lab)?;
    for reason in [
        "malformed",
        "fragment",
        "icmp",
        "protocol",
        "no_app",
        "firewall",
        "spp_invalid",
        "no_flow",
        "too_big",
    ] {
        let series = format!("forwarder_dropped_packets_total{{reason=\"{reason}\"}}");
        assert_eq!(sample(&text, &series), Some(0.0), "{series} in\n{text}");
    }
    assert_eq!(
        sample(&text, "forwarder_udp_flows{app=\"echo\"}"),
        Some(0.0)
    );

    // 7 datagrams to a port no app claims.
    let client = client_socket(&lab, "10.0.1.2:0")?;
    for _ in 0..7 {
        client.send_to(b"nobody", "10.0.1.1:6000")?;
    }
    // 5 × 100 bytes through the app, 5 × 100 bytes back.
    for i in 0..5u8 {
        assert_eq!(ask(&client, "10.0.1.1:5000", &[i; 100])?, vec![i; 100]);
    }
    // 3 from a blocked source.
    let blocked = client_socket(&lab, "10.0.1.200:0")?;
    for _ in 0..3 {
        blocked.send_to(b"blocked", "10.0.1.1:5000")?;
    }

    let text = wait_sample(
        &lab,
        "forwarder_dropped_packets_total{reason=\"firewall\"}",
        3.0,
    )?;
    let expect = [
        ("forwarder_dropped_packets_total{reason=\"no_app\"}", 7.0),
        ("forwarder_dropped_packets_total{reason=\"firewall\"}", 3.0),
        ("forwarder_dropped_packets_total{reason=\"malformed\"}", 0.0),
        (
            "forwarder_app_packets_total{app=\"echo\",direction=\"ingress\"}",
            5.0,
        ),
        (
            "forwarder_app_packets_total{app=\"echo\",direction=\"egress\"}",
            5.0,
        ),
        (
            "forwarder_app_bytes_total{app=\"echo\",direction=\"ingress\"}",
            500.0,
        ),
        (
            "forwarder_app_bytes_total{app=\"echo\",direction=\"egress\"}",
            500.0,
        ),
        (
            "forwarder_firewall_rule_hits_total{rule=\"10.0.1.200\"}",
            3.0,
        ),
    ];
    for (series, value) in expect {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
    let text = wait_sample(
        &lab,
        "forwarder_connections_total{app=\"echo\",event=\"connect\",status=\"0\"}",
        1.0,
    )?;
    assert_eq!(
        sample(&text, "forwarder_udp_flows{app=\"echo\"}"),
        Some(1.0),
        "{text}"
    );

    // The flow ends after 2 s idle: one disconnect, one duration.
    let text = wait_sample(
        &lab,
        "forwarder_connections_total{app=\"echo\",event=\"disconnect\",status=\"200\"}",
        1.0,
    )?;
    for (series, value) in [
        (
            "forwarder_connections_total{app=\"echo\",event=\"connect\",status=\"0\"}",
            1.0,
        ),
        (
            "forwarder_connections_total{app=\"echo\",event=\"disconnect\",status=\"200\"}",
            1.0,
        ),
        (
            "forwarder_connection_duration_seconds_count{app=\"echo\"}",
            1.0,
        ),
        ("forwarder_udp_flows{app=\"echo\"}", 0.0),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
    let duration = sample(
        &text,
        "forwarder_connection_duration_seconds_sum{app=\"echo\"}",
    )
    .context("duration sum")?;
    assert!((2.0..10.0).contains(&duration), "flow lasted {duration}s");
    // The agent's own families after real traffic (issue 15): build, start, reloads,
    // flow tables, NAT pool, scan cost.
    for family in [
        "forwarder_build_info{",
        "forwarder_start_time_seconds",
        "forwarder_reloads_total{result=\"applied\"} 0",
        "forwarder_config_last_reload_successful",
        "forwarder_config_applied_timestamp_seconds",
        "forwarder_udp_flow_table_entries{table=\"assured\"}",
        "forwarder_udp_flow_evictions_total{reason=\"table_full\"}",
        "forwarder_udp_flows_promoted_total",
        "forwarder_udp_nat_ports_pool",
        "forwarder_udp_flow_scan_seconds",
    ] {
        assert!(text.contains(family), "{family} in\n{text}");
    }
    assert_eq!(
        sample(&text, "forwarder_udp_flows_promoted_total{}"),
        Some(1.0),
        "the echo flow was answered and spoke again: promoted\n{text}"
    );

    // The blocked packets become one clientFiltered summary, not three lines.
    wait_text("the event log", "clientFiltered", || {
        std::fs::read_to_string(&log).unwrap_or_default()
    })?;
    let filtered: Vec<_> = events(&log)
        .into_iter()
        .filter(|e| e["Event"] == "clientFiltered")
        .collect();
    assert_eq!(filtered.len(), 1, "{filtered:?}");
    assert_eq!(filtered[0]["ClientPackets"], 3);
    assert_eq!(filtered[0]["ClientIP"], "10.0.1.200");
    assert_eq!(filtered[0]["Application"], "echo");
    assert_eq!(filtered[0]["Status"], 403);

    // The same figures through the control socket, with the analytics.
    let stats = agent.stats()?;
    let rows = &stats.analytics.rows;
    let row = |event: &str| {
        rows.iter()
            .find(|r| r.app == "echo" && r.event == event && r.ip_version == 4)
    };
    let connect = row("connect").context("connect row")?;
    let disconnect = row("disconnect").context("disconnect row")?;
    assert_eq!(connect.count, 1);
    assert_eq!(disconnect.count, 1);
    assert_eq!(disconnect.bytes_ingress, 500);
    assert_eq!(disconnect.bytes_egress, 500);
    let ms = disconnect.duration_median.context("a duration")?;
    assert!((2000.0..10000.0).contains(&ms), "{ms} ms");
    assert_eq!(row("clientFiltered").map(|r| r.count), Some(3));
    assert_eq!(stats.analytics.window_seconds, 300);

    // `forwarder stats` shows them as a table.
    let bin = forwarder_tests::agent::forwarder_bin()?;
    let control = agent.control_path().to_owned();
    let table = lab.edge().run(
        &bin,
        &["stats".as_ref(), "--control".as_ref(), control.as_os_str()],
    )?;
    assert!(table.contains("ANALYTICS last 300s"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.trim_start().starts_with("echo") && l.contains("disconnect")),
        "{table}"
    );
    Ok(())
}

/// The client half of a TCP transfer: writes a known byte pattern until told to stop,
/// then half-closes and reads the origin's count and checksum.
fn tcp_writer(stream: TcpStream, stop: Arc<AtomicBool>) -> JoinHandle<Result<(u64, u64, String)>> {
    std::thread::spawn(move || {
        let mut stream = stream;
        let mut sent = 0u64;
        let mut sum = 0u64;
        let chunk: Vec<u8> = (0..16384u32).map(|i| (i % 251) as u8).collect();
        while !stop.load(Ordering::Relaxed) {
            stream.write_all(&chunk)?;
            sent += chunk.len() as u64;
            sum = chunk.iter().fold(sum, |s, b| s.wrapping_add(u64::from(*b)));
            std::thread::sleep(Duration::from_millis(5));
        }
        stream.shutdown(Shutdown::Write)?;
        stream.set_read_timeout(Some(PATIENCE))?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply)?;
        Ok((sent, sum, reply.trim().to_string()))
    })
}

/// A TCP origin that counts and sums everything it reads, answers "COUNT SUM" at
/// the client's FIN. One connection.
fn tcp_counter(ns: &Netns, bind: &str) -> Result<JoinHandle<Result<()>>> {
    let bind: SocketAddr = bind.parse()?;
    let listener = ns.run_in(move || TcpListener::bind(bind))??;
    Ok(std::thread::spawn(move || {
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let (mut count, mut sum) = (0u64, 0u64);
        let mut buf = vec![0u8; 65536];
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            count += n as u64;
            sum = buf[..n]
                .iter()
                .fold(sum, |s, b| s.wrapping_add(u64::from(*b)));
        }
        writeln!(stream, "{count} {sum}")?;
        Ok(())
    }))
}

/// A TCP echo origin (one line per connection) for apps added on reload.
fn tcp_echo(ns: &Netns, bind: &str) -> Result<()> {
    let bind: SocketAddr = bind.parse()?;
    let listener = ns.run_in(move || TcpListener::bind(bind))??;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut line = String::new();
            let mut reader = BufReader::new(&stream);
            if reader.read_line(&mut line).is_ok() {
                let _ = (&stream).write_all(line.as_bytes());
            }
        }
    });
    Ok(())
}

#[test]
fn reload_under_load_loses_nothing() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let lab = Lab::new()?;
    lab.attach_pass_stubs()?;
    lab.add_origin_address("10.0.2.3/24")?;
    let tmp = TempDir::new("reload");
    let log = tmp.path("events.log");
    let [ec, eo] = lab.edge_ifaces();
    let agent_section = base_agent(ec, eo, &log).replace("\"2s\"", "\"30s\"");
    let live = udp_app("live", 5000, "10.0.2.2");
    let victim = udp_app("victim", 5002, "10.0.2.2");
    let other_a = udp_app("other", 5003, "10.0.2.2");
    let other_b = udp_app("other", 5003, "10.0.2.3");
    let bulk = tcp_app("bulk", 6000, "10.0.2.2");
    let extra = udp_app("extra", 5001, "10.0.2.2");
    let web = tcp_app("web", 6001, "10.0.2.2");
    let rule = "[[access_rules]]\nmode = \"block\"\ntarget = \"ip\"\nvalue = \"10.0.1.250\"\n\n";

    let _echoes = [
        Echo::start(lab.origin(), "10.0.2.2:5000", b"")?,
        Echo::start(lab.origin(), "10.0.2.2:5001", b"")?,
        Echo::start(lab.origin(), "10.0.2.2:5002", b"")?,
        Echo::start(lab.origin(), "10.0.2.2:5003", b"a:")?,
        Echo::start(lab.origin(), "10.0.2.3:5003", b"b:")?,
    ];
    let counter = tcp_counter(lab.origin(), "10.0.2.2:6000")?;
    tcp_echo(lab.origin(), "10.0.2.2:6001")?;

    let configs = [
        format!("{agent_section}{live}{victim}{other_a}{bulk}"),
        // 1: an app added, first in the file.
        format!("{agent_section}{extra}{live}{victim}{other_a}{bulk}"),
        // 2: an app removed.
        format!("{agent_section}{extra}{live}{other_a}{bulk}"),
        // 3: an origin changed.
        format!("{agent_section}{extra}{live}{other_b}{bulk}"),
        // 4: a TCP app added.
        format!("{agent_section}{web}{extra}{live}{other_b}{bulk}"),
        // 5: an access rule added.
        format!("{agent_section}{rule}{web}{extra}{live}{other_b}{bulk}"),
    ];
    let mut agent = AgentProcess::start(&lab, &configs[0])?;

    // The victim's flow, alive when its app goes.
    let victim_client = client_socket(&lab, "10.0.1.2:0")?;
    assert_eq!(ask(&victim_client, "10.0.1.1:5002", b"v")?, b"v");

    // Load: one UDP flow (a datagram every 5 ms, each echoed) and one TCP transfer.
    let flow = client_socket(&lab, "10.0.1.2:0")?;
    flow.connect("10.0.1.1:5000")?;
    flow.set_read_timeout(Some(Duration::from_millis(200)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (flow, stop, sent) = (flow.try_clone()?, stop.clone(), sent.clone());
        std::thread::spawn(move || -> Result<()> {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                flow.send(&seq.to_be_bytes())?;
                seq += 1;
                sent.store(seq, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        })
    };
    let receiver = {
        let (flow, stop, sent) = (flow.try_clone()?, stop.clone(), sent.clone());
        std::thread::spawn(move || -> BTreeSet<u64> {
            let mut got = BTreeSet::new();
            let mut buf = [0u8; 64];
            let deadline = || Instant::now() + Duration::from_secs(3);
            let mut quiet_until = deadline();
            loop {
                if let Ok(8) = flow.recv(&mut buf) {
                    got.insert(u64::from_be_bytes(buf[..8].try_into().unwrap()));
                }
                if !stop.load(Ordering::Relaxed) {
                    quiet_until = deadline();
                } else if got.len() as u64 >= sent.load(Ordering::Relaxed)
                    || Instant::now() > quiet_until
                {
                    return got;
                }
            }
        })
    };
    let tcp_stream = lab
        .client()
        .run_in(|| TcpStream::connect("10.0.1.1:6000"))??;
    let tcp_stop = Arc::new(AtomicBool::new(false));
    let writer = tcp_writer(tcp_stream, tcp_stop.clone());
    std::thread::sleep(Duration::from_millis(300));

    // 1 (SIGHUP): the new app answers at once.
    agent.write_config(&configs[1])?;
    agent.sighup();
    wait_text("the agent log", "reload: apps added: extra", || {
        agent.stderr()
    })?;
    let c = client_socket(&lab, "10.0.1.2:0")?;
    assert_eq!(ask(&c, "10.0.1.1:5001", b"x")?, b"x");

    // 2 (the file changes, no signal): the victim's flow ends with its app.
    agent.write_config(&configs[2])?;
    wait_text("the agent log", "reload: apps removed: victim", || {
        agent.stderr()
    })?;
    wait_text("the event log", "disconnect", || {
        events(&log)
            .iter()
            .filter(|e| e["Application"] == "victim")
            .map(|e| e["Event"].to_string())
            .collect::<Vec<_>>()
            .join(",")
    })?;

    // 3 (SIGHUP): the changed origin serves the next flow.
    agent.write_config(&configs[3])?;
    agent.sighup();
    wait_text("the agent log", "reload: apps changed: other", || {
        agent.stderr()
    })?;
    let c = client_socket(&lab, "10.0.1.2:0")?;
    assert_eq!(ask(&c, "10.0.1.1:5003", b"o")?, b"b:o");

    // 4 (file): a new TCP app answers at once.
    agent.write_config(&configs[4])?;
    wait_text("the agent log", "reload: apps added: web", || {
        agent.stderr()
    })?;
    let mut web_conn = lab
        .client()
        .run_in(|| TcpStream::connect("10.0.1.1:6001"))??;
    web_conn.set_read_timeout(Some(PATIENCE))?;
    web_conn.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&web_conn).read_line(&mut line)?;
    assert_eq!(line, "hello\n");

    // 5 (SIGHUP): an access rule.
    agent.write_config(&configs[5])?;
    agent.sighup();
    wait_text(
        "the agent log",
        "reload: access rules changed (0 -> 1)",
        || agent.stderr(),
    )?;

    // An invalid config on SIGHUP: logged like check-config, nothing changes.
    let before = agent.stats()?;
    let invalid = configs[5].replace("udp://10.0.2.2:5001", "tcp://10.0.2.2:5001");
    agent.write_config(&invalid)?;
    agent.sighup();
    let stderr = wait_text("the agent log", "reload rejected", || agent.stderr())?;
    assert!(
        stderr.contains("app 'extra' (apps[1]): origin_direct"),
        "{stderr}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let after = agent.stats()?;
    assert_eq!(
        before.apps.keys().collect::<Vec<_>>(),
        after.apps.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        agent.stderr().matches("reload rejected").count(),
        1,
        "the watcher must not report the same file again"
    );
    let c = client_socket(&lab, "10.0.1.2:0")?;
    assert_eq!(ask(&c, "10.0.1.1:5001", b"still")?, b"still");

    // Stop the load; nothing may be missing.
    stop.store(true, Ordering::Relaxed);
    tcp_stop.store(true, Ordering::Relaxed);
    sender.join().expect("sender")?;
    let got = receiver.join().expect("receiver");
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent > 100, "only {sent} datagrams sent");
    let missing: Vec<u64> = (0..sent).filter(|s| !got.contains(s)).take(20).collect();
    assert!(
        missing.is_empty(),
        "lost datagrams of the live flow: {missing:?}"
    );
    let (bytes, sum, reply) = writer.join().expect("writer")?;
    counter.join().expect("counter")?;
    assert_eq!(
        reply,
        format!("{bytes} {sum}"),
        "the TCP transfer lost bytes"
    );
    assert!(bytes > 200_000, "only {bytes} bytes sent");

    // Counters of the live app continued across the reloads.
    let stats = agent.stats()?;
    let live_app = &stats.apps["live"];
    assert_eq!(live_app.ingress_packets, sent);
    assert_eq!(live_app.egress_packets, sent);
    let live_events: Vec<String> = events(&log)
        .iter()
        .filter(|e| e["Application"] == "live")
        .map(|e| e["Event"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(live_events, ["connect"], "one flow, never restarted");
    assert!(agent.stop()?.success());
    Ok(())
}

#[test]
fn event_log_is_reopened_on_sigusr1_without_a_reload() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let lab = Lab::new()?;
    lab.attach_pass_stubs()?;
    let tmp = TempDir::new("reopen");
    let log = tmp.path("events.log");
    let [ec, eo] = lab.edge_ifaces();
    let config = format!(
        "{}{}",
        base_agent(ec, eo, &log),
        udp_app("echo", 5000, "10.0.2.2")
    );
    let _origin = Echo::start(lab.origin(), "10.0.2.2:5000", b"")?;
    let agent = AgentProcess::start(&lab, &config)?;

    let first = client_socket(&lab, "10.0.1.2:41000")?;
    ask(&first, "10.0.1.1:5000", b"1")?;
    wait_text("the event log", "41000", || {
        std::fs::read_to_string(&log).unwrap_or_default()
    })?;
    // logrotate: move the file away, then SIGUSR1.
    let rotated = tmp.path("events.log.1");
    std::fs::rename(&log, &rotated)?;
    agent.sigusr1();
    wait_text("the agent log", "SIGUSR1: reopening the event log", || {
        agent.stderr()
    })?;
    wait_text("the event log directory", "reopened", || {
        if log.exists() { "reopened" } else { "missing" }.to_string()
    })?;
    let second = client_socket(&lab, "10.0.1.2:42000")?;
    ask(&second, "10.0.1.1:5000", b"2")?;
    wait_text("the new event log", "42000", || {
        std::fs::read_to_string(&log).unwrap_or_default()
    })?;
    let old = std::fs::read_to_string(&rotated)?;
    assert!(old.contains("41000") && !old.contains("42000"), "{old}");
    // The first flow's connect stays in the rotated file (its disconnect, after the
    // idle timeout, may come later in the new one).
    let connects = |path: &Path, port: u64| {
        events(path)
            .iter()
            .filter(|e| e["Event"] == "connect" && e["ClientPort"] == port)
            .count()
    };
    assert_eq!(connects(&rotated, 41000), 1);
    assert_eq!(connects(&log, 41000), 0);
    assert_eq!(connects(&log, 42000), 1);
    // Reopening is not reloading: no reload counted, none logged.
    let stats = agent.stats()?;
    assert_eq!(
        (stats.agent.reloads_applied, stats.agent.reloads_rejected),
        (0, 0)
    );
    assert!(!agent.stderr().contains("reloading"), "{}", agent.stderr());
    // A SIGHUP reloads (and is counted), and does not need to reopen anything.
    agent.sighup();
    let stats = agent.wait_stats(Duration::from_secs(10), |s| s.agent.reloads_applied == 1)?;
    assert!(stats.agent.last_reload_successful);

    // `forwarder stats --watch` into a pipe: one whole table per refresh, no
    // control codes (on a terminal it redraws in place).
    let bin = forwarder_tests::agent::forwarder_bin()?;
    let control = agent.control_path().display().to_string();
    let output = lab
        .edge()
        .cmd(
            "timeout",
            &[
                "2.5".as_ref(),
                bin.as_os_str(),
                "stats".as_ref(),
                "--watch".as_ref(),
                "--interval".as_ref(),
                "500ms".as_ref(),
                "--control".as_ref(),
                agent.control_path().as_os_str(),
            ],
        )
        .output()?;
    let screen = String::from_utf8_lossy(&output.stdout);
    assert!(
        !screen.contains('\x1b'),
        "no control codes into a pipe: {screen:?}"
    );
    let tables = screen
        .lines()
        .filter(|l| l.starts_with("APP ") && l.contains(" PROTO "))
        .count();
    assert!((3..=6).contains(&tables), "{tables} tables: {screen}");
    assert!(
        screen.contains("IN PKT/S"),
        "refreshes after the first show rates: {screen}"
    );
    // `--json --watch`: one JSON object per line; a reader that stops early
    // (`| head -n 2`) ends it quietly, with status 0.
    let script = format!(
        "set -o pipefail; timeout 5 {} stats --json --watch --interval 100ms --control {control} | head -n 2",
        bin.display()
    );
    let output = lab.edge().cmd("bash", &["-c", script.as_str()]).output()?;
    let lines = String::from_utf8_lossy(&output.stdout);
    assert_eq!(lines.lines().count(), 2, "{lines}");
    for line in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        assert!(v["apps"]["echo"].is_object(), "{line}");
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && !stderr.contains("Broken pipe"),
        "a closed pipe ends stats quietly: {:?} {stderr}",
        output.status
    );
    Ok(())
}
