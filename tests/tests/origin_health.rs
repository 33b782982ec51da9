//! Origin load balancing with real origins (SPEC §5a, docs/config.md "Origins"):
//! health checks that take a stopped nginx (TCP) or UDP echo origin out and bring
//! it back, UDP flows moving to a surviving origin with the same client in the SPP
//! header, `forwarder drain` / `enable`, `forwarder origins`, the per-origin
//! metrics, and weights honoured over 1,000 real connections.
//!
//! Build the agent first (`cargo build -p forwarder`), or run through
//! `cargo xtask test`.

mod tcp_support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use forwarder_tests::agent::{AgentProcess, forwarder_bin};
use forwarder_tests::spp_origin::{EchoMode, EchoOrigin};
use forwarder_tests::{
    EDGE_CLIENT_V4, EDGE_CLIENT_V6, Lab, NsChild, ORIGIN_V4, Peers, require_root,
};
use tcp_support::*;

const WAIT: Duration = Duration::from_secs(10);
/// The agent's metrics listener (inside the lab's edge namespace).
const METRICS: &str = "127.0.0.1:9481";
/// The checks of these tests: every 200 ms, down after 2 failures, up after 2 passes.
const CHECK: &str =
    "[apps.health_check]\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n";
/// interval × fall, plus one interval for where in its period the origin died,
/// plus scheduling slack on a loaded 2-core machine (one run with two other
/// builds going took over 1 s). Still well short of anything a wrong reading of the
/// settings would give (the default 5 s interval, or `fall` counted in seconds).
const FAILOVER_BOUND: Duration = Duration::from_millis(200 * 2 + 200 + 1400);

/// A second origin address beside `ORIGIN_V4`.
const ORIGIN_B: &str = "10.0.2.3";

/// An nginx stream origin on `addr` answering every connection with `name`.
fn nginx(lab: &Lab, dir: &TempDir, addr: SocketAddr, name: &str) -> NsChild {
    let d = dir.path().display();
    let conf = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         pid {d}/nginx.pid;\nerror_log {d}/error.log info;\nworker_processes 1;\n\
         events {{ worker_connections 64; }}\n\
         stream {{ server {{ listen {addr}; return \"{name}\\n\"; }} }}\n"
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let cmd = lab.origin().nginx(dir.path());
    let child = lab.origin().spawn(cmd).unwrap();
    wait_listening(lab, addr, WAIT);
    child
}

/// Connects from the client (bound to `from`) to `dst` and reads the origin's name.
fn ask_from(lab: &Lab, from: IpAddr, dst: SocketAddr) -> std::io::Result<String> {
    let mut stream = lab
        .client()
        .block_on(async move {
            let socket = match dst {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.bind(SocketAddr::new(from, 0))?;
            let stream =
                tokio::time::timeout(Duration::from_secs(5), socket.connect(dst)).await??;
            stream.into_std()
        })
        .expect("runtime in client")?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply.trim().to_string())
}

/// Every event of `app` (TCP or UDP) so far.
fn all_events(agent: &AgentProcess, app: &str) -> Vec<Ev> {
    events(agent)
        .into_iter()
        .filter(|e| e.str("Application") == Some(app))
        .collect()
}

/// Waits for the `n`th event of `kind` of `app` and returns it with when it was seen.
fn wait_event(agent: &AgentProcess, app: &str, kind: &str, n: usize) -> (Ev, Instant) {
    let deadline = Instant::now() + WAIT;
    loop {
        let evs: Vec<Ev> = all_events(agent, app)
            .into_iter()
            .filter(|e| e.event() == kind)
            .collect();
        if evs.len() >= n {
            return (evs[n - 1].clone(), Instant::now());
        }
        if Instant::now() >= deadline {
            panic!(
                "no {kind} #{n} of {app} within {WAIT:?}: {:#?}\n{}",
                all_events(agent, app),
                agent.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `forwarder origins --json` (or `drain`/`enable`) against the agent: (exit
/// success, stdout, stderr).
fn cli(agent: &AgentProcess, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(forwarder_bin().unwrap())
        .args(args)
        .arg("--control")
        .arg(agent.control_path())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The row of `origin` of `app` in `forwarder origins --json`.
fn origin_row(agent: &AgentProcess, app: &str, origin: &str) -> serde_json::Value {
    let (ok, out, err) = cli(agent, &["origins", "--json"]);
    assert!(ok, "forwarder origins failed: {err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    rows.into_iter()
        .find(|r| r["app"] == app && r["origin"] == origin)
        .unwrap_or_else(|| panic!("no row for {app} {origin} in {out}"))
}

#[test]
fn a_stopped_nginx_origin_is_taken_out_and_comes_back_after_rise() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    lab.add_origin_address(&format!("{ORIGIN_B}/24")).unwrap();
    let a = SocketAddr::new(ORIGIN_V4.into(), 7200);
    let b = SocketAddr::new(ORIGIN_B.parse().unwrap(), 7200);
    let (dir_a, dir_b) = (TempDir::new("nginx-a"), TempDir::new("nginx-b"));
    let mut nginx_a = nginx(&lab, &dir_a, a, "a");
    let mut nginx_b = nginx(&lab, &dir_b, b, "b");
    let apps = format!(
        "[[apps]]\nid = \"web\"\nprotocol = \"tcp/7200\"\n\
         origin_direct = [\"tcp://{a}\", \"tcp://{b}\"]\n{CHECK}"
    );
    let agent = AgentProcess::start(
        &lab,
        &config(&lab, &format!("metrics_listen = \"{METRICS}\"\n"), &apps),
    )
    .unwrap();
    let edge = SocketAddr::new(EDGE_CLIENT_V4.into(), 7200);
    let client: IpAddr = forwarder_tests::CLIENT_V4.into();
    // One client always lands on one origin (the table's pick for its address).
    let first = ask_from(&lab, client, edge).unwrap();
    assert_eq!(ask_from(&lab, client, edge).unwrap(), first);
    let (picked, picked_addr, other, other_name) = match first.as_str() {
        "a" => (&mut nginx_a, a, b, "b"),
        _ => (&mut nginx_b, b, a, "a"),
    };
    let picked_label = picked_addr.to_string();

    // Its origin stops: out within interval × fall, with the check's status.
    let stopped = Instant::now();
    picked.kill().unwrap();
    let (down, seen) = wait_event(&agent, "web", "originDown", 1);
    let took = seen - stopped;
    assert!(took <= FAILOVER_BOUND, "taken out after {took:?}");
    assert_eq!(down.status(), 521, "refused: {down:?}");
    assert_eq!(down.origin(), Some(picked_addr));
    assert_eq!(down.num("HealthyOrigins"), Some(1));
    let row = origin_row(&agent, "web", &picked_label);
    assert_eq!(
        (row["health"].as_str(), row["selected"].as_bool()),
        (Some("down"), Some(false))
    );
    assert!(row["checks"].as_u64().unwrap() >= 3, "{row}");
    // New connections of that client go to the other origin at once: the dead one
    // is not tried first (its connect failures stay as they were).
    let failures_before = row["connect_failures"].clone();
    for _ in 0..5 {
        assert_eq!(ask_from(&lab, client, edge).unwrap(), other_name);
    }
    let row = origin_row(&agent, "web", &picked_label);
    assert_eq!(row["connect_failures"], failures_before, "{row}");
    assert_eq!(
        origin_row(&agent, "web", &other.to_string())["health"],
        "up"
    );
    let metrics = scrape(&lab);
    assert!(
        metrics.contains(&format!(
            "forwarder_origin_up{{app=\"web\",origin=\"{picked_label}\"}} 0"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("forwarder_app_origins_up{app=\"web\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "forwarder_origin_health_check_duration_seconds_count{{app=\"web\",origin=\"{picked_label}\"}}"
        )),
        "{metrics}"
    );

    // It comes back: up again after `rise` passes, and the client returns to it.
    let dir = if picked_addr == a { &dir_a } else { &dir_b };
    let restarted = Instant::now();
    let _again = nginx(&lab, dir, picked_addr, &first);
    let (up, seen) = wait_event(&agent, "web", "originUp", 1);
    assert!(
        seen - restarted <= FAILOVER_BOUND,
        "back after {:?}",
        seen - restarted
    );
    assert_eq!((up.status(), up.num("HealthyOrigins")), (200, Some(2)));
    assert_eq!(ask_from(&lab, client, edge).unwrap(), first);

    // Every origin down: said so (HealthyOrigins 0), and new connections are still
    // tried everywhere (fail open): they end with the origins' own status.
    let mut others_child = if picked_addr == a { nginx_b } else { nginx_a };
    others_child.kill().unwrap();
    drop(_again);
    let (_, _) = wait_event(&agent, "web", "originDown", 2);
    let (last, _) = wait_event(&agent, "web", "originDown", 3);
    assert_eq!(last.num("HealthyOrigins"), Some(0), "{last:?}");
    assert!(
        ask_from(&lab, client, edge)
            .map(|r| r.is_empty())
            .unwrap_or(true)
    );
    let evs = wait_events(&agent, "web", WAIT, |e| {
        e.iter().any(|e| e.event() == "originError")
    });
    let error = evs.iter().find(|e| e.event() == "originError").unwrap();
    assert_eq!(error.status(), 521, "{error:?}");
    assert!(scrape(&lab).contains("forwarder_app_origins_up{app=\"web\"} 0"));
}

/// The agent's `/metrics` text (its listener is in the lab's edge namespace).
fn scrape(lab: &Lab) -> String {
    let mut stream = lab
        .edge()
        .run_in(|| TcpStream::connect(METRICS))
        .unwrap()
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// Sends `payload` to the edge and returns the reply (panics with what the
/// origins and the agent saw when none comes).
fn roundtrip(
    client: &std::net::UdpSocket,
    edge: SocketAddr,
    payload: &[u8],
    agent: &AgentProcess,
    origins: &[Option<EchoOrigin>],
) -> Vec<u8> {
    client.send_to(payload, edge).unwrap();
    let mut buf = [0u8; 2048];
    match client.recv_from(&mut buf) {
        Ok((n, _)) => buf[..n].to_vec(),
        Err(e) => panic!(
            "no reply to {payload:?} through the edge: {e}\ndrops {:?}\norigins {:?}\n{}",
            agent.stats().map(|s| s.drops),
            origins
                .iter()
                .flatten()
                .map(|o| (o.local_addr(), o.received(), o.invalid()))
                .collect::<Vec<_>>(),
            agent.logs()
        ),
    }
}

#[test]
fn udp_flows_move_off_a_dead_origin_with_the_same_client_in_the_spp_header() {
    init();
    if !require_root() {
        return;
    }
    for peers in Peers::BOTH {
        flows_move_off_a_dead_origin(peers);
    }
}

fn flows_move_off_a_dead_origin(peers: Peers) {
    let lab = Lab::with_peers(peers).unwrap();
    // XDP redirects into the veths: their peers need a program to receive.
    lab.attach_pass_stubs().unwrap();
    lab.add_origin_address(&format!("{ORIGIN_B}/24")).unwrap();
    let a = SocketAddr::new(ORIGIN_V4.into(), 7300);
    let b = SocketAddr::new(ORIGIN_B.parse().unwrap(), 7300);
    let start = |addr| EchoOrigin::start_with(lab.origin(), addr, EchoMode::Spp, false).unwrap();
    let mut origins = [Some(start(a)), Some(start(b))];
    let apps = format!(
        "[[apps]]\nid = \"game\"\nprotocol = \"udp/7300\"\nproxy_protocol = \"simple\"\n\
         origin_direct = [\"udp://{a}\", \"udp://{b}\"]\n{CHECK}send = \"ping\"\nexpect = \"ping\"\n"
    );
    let agent = AgentProcess::start(&lab, &config(&lab, "", &apps)).unwrap();
    let edge = SocketAddr::new(EDGE_CLIENT_V4.into(), 7300);
    let client = lab
        .client()
        .udp_socket("10.0.1.2:0".parse().unwrap(), Duration::from_secs(2))
        .unwrap();
    let me = client.local_addr().unwrap();
    assert_eq!(
        roundtrip(&client, edge, b"hello", &agent, &origins),
        b"hello"
    );
    // The origin that has the flow (probes come from the agent, not from `me`).
    let has = |o: &Option<EchoOrigin>| {
        o.as_ref()
            .is_some_and(|o| o.received().iter().any(|r| r.client() == Some(me)))
    };
    let serving = if has(&origins[0]) { 0 } else { 1 };
    assert!(has(&origins[serving]));
    let survivor = 1 - serving;
    // Both origins were probed with an SPP header naming the agent's socket.
    for o in origins.iter().flatten() {
        assert!(
            o.received().iter().any(|r| r
                .client()
                .is_some_and(|c| c.ip() == IpAddr::from([10, 0, 2, 1]))),
            "probes reach {}",
            o.local_addr()
        );
    }

    let stopped = Instant::now();
    origins[serving] = None;
    let (down, seen) = wait_event(&agent, "game", "originDown", 1);
    assert!(
        seen - stopped <= FAILOVER_BOUND,
        "taken out after {:?}",
        seen - stopped
    );
    assert_eq!(down.num("HealthyOrigins"), Some(1));
    assert!(
        [521, 522].contains(&down.status()),
        "port unreachable or no reply: {down:?}"
    );
    // The same flow (same client port) now reaches the survivor, which sees the
    // same client address and port in the SPP header.
    assert_eq!(
        roundtrip(&client, edge, b"after", &agent, &origins),
        b"after"
    );
    let got = origins[survivor].as_ref().unwrap().received();
    let last = got
        .iter()
        .rev()
        .find(|r| r.client() == Some(me))
        .expect("the flow moved");
    assert_eq!(last.client(), Some(me));
    assert!(
        agent.logs().contains("UDP flows moved off origin"),
        "{}",
        agent.logs()
    );
    // The flow was moved, not ended and opened again: one connect event (the
    // scan writes it within a second), and no disconnect.
    let connects = || {
        all_events(&agent, "game")
            .into_iter()
            .filter(|e| e.client() == Some(me))
            .map(|e| e.event().to_string())
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + WAIT;
    while connects().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(connects(), ["connect"]);

    // Back after rise.
    let addr = if serving == 0 { a } else { b };
    origins[serving] = Some(start(addr));
    let (up, _) = wait_event(&agent, "game", "originUp", 1);
    assert_eq!(up.num("HealthyOrigins"), Some(2));
}

#[test]
fn a_drained_origin_finishes_its_connections_and_takes_no_new_ones() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    lab.add_origin_address(&format!("{ORIGIN_B}/24")).unwrap();
    let a = SocketAddr::new(ORIGIN_V4.into(), 7400);
    let b = SocketAddr::new(ORIGIN_B.parse().unwrap(), 7400);
    // Each origin says its name, then echoes.
    for (addr, name) in [(a, "a"), (b, "b")] {
        serve(origin_listener(&lab, addr), move |mut s| {
            let _ = s.write_all(format!("{name}\n").as_bytes());
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    let apps = format!(
        "[[apps]]\nid = \"svc\"\nprotocol = \"tcp/7400\"\norigin_direct = [\"tcp://{a}\", \"tcp://{b}\"]\n"
    );
    let agent = start_agent(&lab, &apps);
    let edge = SocketAddr::new(EDGE_CLIENT_V4.into(), 7400);
    let mut open = client_connect(&lab, edge, WAIT).unwrap();
    let mut name = [0u8; 2];
    open.read_exact(&mut name).unwrap();
    let (drained, other, other_addr) = if &name == b"a\n" {
        (a, "b", b)
    } else {
        (b, "a", a)
    };

    let (ok, out, err) = cli(&agent, &["drain", "svc", &drained.to_string()]);
    assert!(ok, "drain: {err}");
    assert!(out.contains("drained"), "{out}");
    let row = origin_row(&agent, "svc", &drained.to_string());
    assert_eq!(
        (row["drained"].as_bool(), row["selected"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(
        row["live"], 1,
        "the open connection is still counted: {row}"
    );
    // The open connection goes on.
    open.write_all(b"still here").unwrap();
    let mut echo = [0u8; 10];
    open.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"still here");
    // New ones go to the other origin.
    for _ in 0..5 {
        let mut s = client_connect(&lab, edge, WAIT).unwrap();
        let mut n = [0u8; 2];
        s.read_exact(&mut n).unwrap();
        assert_eq!(n[0], other.as_bytes()[0]);
    }
    // A reload keeps the drain.
    agent.sighup();
    agent
        .wait_stats(WAIT, |s| s.agent.reloads_applied == 1)
        .expect("the reload is applied");
    let row = origin_row(&agent, "svc", &drained.to_string());
    assert_eq!(row["drained"], true, "drained after a reload: {row}");
    let mut s = client_connect(&lab, edge, WAIT).unwrap();
    let mut n = [0u8; 2];
    s.read_exact(&mut n).unwrap();
    assert_eq!(
        n[0],
        other.as_bytes()[0],
        "still not picked after the reload"
    );
    // The last origin not drained cannot be drained.
    let (ok, _, err) = cli(&agent, &["drain", "svc", &other_addr.to_string()]);
    assert!(!ok, "draining the last origin must fail");
    assert!(err.contains("last origin"), "{err}");
    let (ok, _, err) = cli(&agent, &["drain", "svc", "10.9.9.9:7400"]);
    assert!(!ok && err.contains("has no origin"), "{err}");
    // Enabled again: the client's pick is back.
    let (ok, _, err) = cli(&agent, &["enable", "svc", &drained.to_string()]);
    assert!(ok, "enable: {err}");
    let mut s = client_connect(&lab, edge, WAIT).unwrap();
    let mut n = [0u8; 2];
    s.read_exact(&mut n).unwrap();
    assert_eq!(n, name);
    drop(open);
}

#[test]
fn weights_are_honoured_within_10_percent_over_1000_connections() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    lab.add_origin_address(&format!("{ORIGIN_B}/24")).unwrap();
    let a = SocketAddr::new(ORIGIN_V4.into(), 7500);
    let b = SocketAddr::new(ORIGIN_B.parse().unwrap(), 7500);
    for (addr, name) in [(a, "a"), (b, "b")] {
        serve(origin_listener(&lab, addr), move |mut s| {
            let _ = s.write_all(name.as_bytes());
        });
    }
    let apps = format!(
        "[[apps]]\nid = \"w\"\nprotocol = \"tcp/7500\"\n\
         origin_direct = [\"tcp://{a}\", {{ address = \"tcp://{b}\", weight = 3 }}]\n"
    );
    let agent = start_agent(&lab, &apps);
    // 1,000 clients: the origin is picked per client address.
    let ifname = lab.ifaces().client.clone();
    let clients: Vec<Ipv6Addr> = (0..1000u16)
        .map(|i| Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 1, i))
        .collect();
    let lines: Vec<String> = clients
        .iter()
        .map(|c| format!("addr add {c}/64 dev {ifname} nodad"))
        .collect();
    lab.client().ip_batch(&lines).unwrap();
    let edge = SocketAddr::new(EDGE_CLIENT_V6.into(), 7500);
    let mut b_count = 0;
    for c in &clients {
        let reply = ask_from(&lab, IpAddr::V6(*c), edge).unwrap();
        if reply == "b" {
            b_count += 1;
        } else {
            assert_eq!(reply, "a");
        }
    }
    // Weight 3 of 4: 750 of 1,000, within 10%.
    assert!(
        (675..=825).contains(&b_count),
        "{b_count} of 1000 went to the weight-3 origin"
    );
    let row = origin_row(&agent, "w", &b.to_string());
    assert_eq!(row["connections"], b_count);
    assert_eq!(row["weight"], 3);
}
