//! TCP capacity (issue 11): the agent raises its open-file limit at start, and an
//! idle proxied connection costs it two fds (the default copy engine holds no
//! pipes), so an agent started under the usual soft limit of 1024 holds thousands of
//! idle connections and still serves a fresh one.
//!
//! Run: `cargo test -p forwarder-tests --test tcp_capacity` (root).

mod tcp_support;

use std::io::Read as _;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use forwarder_tests::agent::{
    AgentOptions, AgentProcess, CAP_SYS_RESOURCE, has_effective_capability,
};
use forwarder_tests::{EDGE_CLIENT_V4, Lab, ORIGIN_V4, require_root};
use tcp_support::{config, init, origin_listener, set_linger_zero};

const IDLE: usize = 3000;
const SOFT_LIMIT: u64 = 1024;

/// An origin on `listener` that greets every connection with `hi\n` and keeps it
/// open, on one thread, until `stop` (or 120 s); returns how many it held.
fn greeting_origin(
    listener: std::net::TcpListener,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        use std::io::Write as _;
        listener.set_nonblocking(true).expect("nonblocking");
        let mut held = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.write_all(b"hi\n");
                    held.push(s);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        held.len()
    })
}

/// A connection to `edge` that got the origin's greeting through the proxy.
fn greeted(edge: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&edge, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut greeting = [0u8; 3];
    s.read_exact(&mut greeting)?;
    if &greeting != b"hi\n" {
        return Err(std::io::Error::other(format!("greeting {greeting:?}")));
    }
    Ok(s)
}

#[test]
fn an_agent_started_under_a_soft_limit_of_1024_holds_3000_idle_connections() {
    if !require_root() {
        return;
    }
    init();
    // This process holds both ends' sockets: 2 × IDLE fds and more.
    forwarder::fd_limit::raise_to_hard().expect("raising the test's own fd limit");
    let lab = Lab::new().expect("lab");
    let origin_addr = SocketAddr::from((ORIGIN_V4, 7300));
    let listener = origin_listener(&lab, origin_addr);
    // The origin greets every connection and keeps it open, on one thread.
    let stop = Arc::new(AtomicBool::new(false));
    let held = greeting_origin(listener, stop.clone());
    let agent = AgentProcess::start_with_fd_limit(
        &lab,
        &config(
            &lab,
            "",
            "[[apps]]\nid = \"cap\"\nprotocol = \"tcp/7300\"\norigin_direct = [\"tcp://10.0.2.2:7300\"]\n",
        ),
        SOFT_LIMIT,
    )
    .expect("forwarder run starts under a soft fd limit of 1024");
    assert!(
        agent
            .logs()
            .contains(&format!("open-file limit raised from {SOFT_LIMIT}")),
        "the agent says it raised its limit:\n{}",
        agent.logs()
    );

    let edge = SocketAddr::from((EDGE_CLIENT_V4, 7300));
    let connect_and_greet = move || greeted(edge);
    let idle: Vec<TcpStream> = lab
        .client()
        .run_in(move || {
            (0..IDLE)
                .map(|_| connect_and_greet())
                .collect::<std::io::Result<_>>()
        })
        .expect("client thread")
        .expect("every idle connection is proxied to the origin");
    assert_eq!(idle.len(), IDLE);
    // One more, with all of them open.
    let fresh = lab
        .client()
        .run_in(connect_and_greet)
        .expect("client thread")
        .expect("a fresh connection is served while 3000 are held");
    let stats = agent.stats().expect("stats answer at 3001 connections");
    assert_eq!(stats.apps["cap"].live, IDLE as u64 + 1, "live connections");
    drop(fresh);
    drop(idle);
    stop.store(true, Ordering::Relaxed);
    let origin_saw = held.join().expect("origin thread");
    assert_eq!(origin_saw, IDLE + 1, "the origin saw every connection");
}

/// At the open-file capacity (hard limit 1024: (1024 − 256 reserved − the
/// listener's fds) / 2 fds ≈ 382 connections) further connections are refused at
/// once with a RST and counted,
/// while `stats` and `/metrics` still answer and the held connections still work;
/// when some close, new ones are served again.
#[test]
fn at_the_fd_capacity_connections_are_refused_cleanly_and_stats_still_answer() {
    if !require_root() {
        return;
    }
    init();
    forwarder::fd_limit::raise_to_hard().expect("raising the test's own fd limit");
    let lab = Lab::new().expect("lab");
    let listener = origin_listener(&lab, SocketAddr::from((ORIGIN_V4, 7301)));
    let stop = Arc::new(AtomicBool::new(false));
    let held = greeting_origin(listener, stop.clone());
    let agent = AgentProcess::start_with_fd_limits(
        &lab,
        &config(
            &lab,
            "metrics_listen = \"127.0.0.1:9477\"",
            "[[apps]]\nid = \"cap\"\nprotocol = \"tcp/7301\"\norigin_direct = [\"tcp://10.0.2.2:7301\"]\n",
        ),
        1024,
        1024,
    )
    .expect("forwarder run starts with a hard fd limit of 1024");
    // (1024 − 256 reserved − the listener's fds) / fds per connection: 2 copying;
    // splicing 6, and the pipe pool's 64 idle pipes (128 fds) are held back too.
    // The listener: the sockmap's fd and the accepting ones, one on epoll (which
    // splicing takes), one per ring on io_uring (a ring per CPU).
    let splicing = std::env::var(tcp_support::ENGINE_ENV).is_ok_and(|e| e == "on");
    let epoll = splicing
        || std::env::var(tcp_support::TCP_ENGINE_ENV).is_ok_and(|e| e == "epoll")
        || !forwarder::tcp::io_uring_available();
    let rings = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    let listener_fds = 1 + if epoll { 1 } else { rings };
    let capacity: usize = if splicing {
        (1024 - 256 - 128 - listener_fds) / 6
    } else {
        (1024 - 256 - listener_fds) / 2
    };
    let edge = SocketAddr::from((EDGE_CLIENT_V4, 7301));
    let greet = move || greeted(edge);
    let mut idle: Vec<TcpStream> = lab
        .client()
        .run_in(move || {
            (0..capacity)
                .map(|_| greet())
                .collect::<std::io::Result<_>>()
        })
        .expect("client thread")
        .expect("connections up to the capacity are served");
    // Beyond: refused at once (RST: the greeting never comes).
    let refused = lab
        .client()
        .run_in(move || (0..10).filter(|_| greet().is_err()).count())
        .expect("client thread");
    assert_eq!(
        refused, 10,
        "every connection beyond the capacity is refused"
    );
    let stats = agent.stats().expect("stats answer at the capacity");
    assert_eq!(stats.apps["cap"].live, capacity as u64);
    assert_eq!(stats.apps["cap"].refused, 10, "refusals are counted");
    let metrics = lab
        .edge()
        .run_in(|| -> std::io::Result<String> {
            use std::io::Write as _;
            let mut s = TcpStream::connect("127.0.0.1:9477")?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: edge\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        })
        .expect("edge thread")
        .expect("/metrics answers at the capacity");
    assert!(
        metrics.contains("forwarder_tcp_refused_total{app=\"cap\"} 10"),
        "the refusals are in /metrics:\n{metrics}"
    );
    assert!(
        agent.logs().contains("fill the open-file limit"),
        "the refusal is logged:\n{}",
        agent.logs()
    );
    // And summarised in the event log (at most one line per app per 5 s).
    let deadline = Instant::now() + Duration::from_secs(8);
    let summary = loop {
        let found = agent.stdout().lines().find_map(|line| {
            let e: serde_json::Value = serde_json::from_str(line).ok()?;
            (e["Event"] == "clientFiltered" && e["Application"] == "cap").then_some(e)
        });
        if let Some(e) = found {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "no clientFiltered summary of the refusals:\n{}",
            agent.stdout()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(summary["Status"], 503, "{summary}");
    assert_eq!(summary["Flows"], 10, "{summary}");
    assert_eq!(summary["Protocol"], "tcp", "{summary}");
    // Clients that reset five connections (a plain close would only half-close
    // them: the origin holds its side) make room again.
    for s in idle.drain(capacity - 5..) {
        set_linger_zero(&s);
    }
    std::thread::sleep(Duration::from_millis(300));
    lab.client()
        .run_in(greet)
        .expect("client thread")
        .expect("a connection is served again once others closed");
    stop.store(true, Ordering::Relaxed);
    held.join().expect("origin thread");
}

/// Connections of the unprivileged test, and bytes each way per connection.
const CONCURRENT: usize = 1000;
const PER_CONNECTION: usize = 64 * 1024;

/// The bytes connection `n` sends: distinct per connection and position, so a
/// byte delivered on the wrong connection or out of place is caught.
fn pattern(n: usize) -> Vec<u8> {
    (0..PER_CONNECTION)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(n as u32 * 97) as u8
        })
        .collect()
}

/// Started without `CAP_SYS_RESOURCE` (so the per-user pipe limits apply to it, as
/// to an agent run with only the capabilities it needs) and under a soft fd limit
/// of 1024, the agent carries 1,000 concurrent connections, 64 KiB each way on
/// each, every byte checked, with either forwarding engine.
#[test]
fn an_agent_without_cap_sys_resource_carries_1000_concurrent_connections() {
    if !require_root() {
        return;
    }
    init();
    forwarder::fd_limit::raise_to_hard().expect("raising the test's own fd limit");
    let lab = Lab::new().expect("lab");
    let origin_addr = SocketAddr::from((ORIGIN_V4, 7302));
    // An echo origin: every connection's bytes back, to its end.
    let _origin = lab
        .origin()
        .spawn_async(async move {
            // A deep accept queue: a thousand connections arrive at once, and the
            // agent's origin connect timeout in these tests is 1 s.
            let socket = tokio::net::TcpSocket::new_v4().expect("origin socket");
            socket.set_reuseaddr(true).expect("SO_REUSEADDR");
            socket.bind(origin_addr).expect("origin bind");
            let listener = socket.listen(8192).expect("origin listen");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
                });
            }
        })
        .expect("origin task");
    let options = AgentOptions {
        fd_limits: Some((SOFT_LIMIT, Some(16_384))),
        without_cap_sys_resource: true,
        ..Default::default()
    };
    let agent = AgentProcess::start_with(
        &lab,
        &config(
            &lab,
            "",
            "[[apps]]\nid = \"bulk\"\nprotocol = \"tcp/7302\"\norigin_direct = [\"tcp://10.0.2.2:7302\"]\n",
        ),
        &options,
    )
    .expect("forwarder run starts without CAP_SYS_RESOURCE");
    assert!(
        !has_effective_capability(agent.pid(), CAP_SYS_RESOURCE).expect("reading CapEff"),
        "the agent runs without CAP_SYS_RESOURCE"
    );
    let edge = SocketAddr::from((EDGE_CLIENT_V4, 7302));
    let results: Vec<Result<(), String>> = lab
        .client()
        .block_on(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            // All connected first: 1,000 are open at once.
            let mut streams = Vec::with_capacity(CONCURRENT);
            for _ in 0..CONCURRENT {
                let s = tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio::net::TcpStream::connect(edge),
                )
                .await
                .map_err(|_| "connect timed out".to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
                streams.push(s);
            }
            let tasks: Vec<_> = streams
                .into_iter()
                .enumerate()
                .map(|(n, stream)| {
                    tokio::spawn(async move {
                        let stream = stream?;
                        let (mut r, mut w) = stream.into_split();
                        let sent = pattern(n);
                        let writer = tokio::spawn(async move {
                            w.write_all(&sent).await?;
                            w.shutdown().await
                        });
                        let mut got = Vec::with_capacity(PER_CONNECTION);
                        tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut got))
                            .await
                            .map_err(|_| format!("connection {n}: echo timed out"))?
                            .map_err(|e| format!("connection {n}: {e}"))?;
                        writer
                            .await
                            .map_err(|e| e.to_string())?
                            .map_err(|e| format!("connection {n} writing: {e}"))?;
                        if got != pattern(n) {
                            let at = got.iter().zip(pattern(n)).position(|(a, b)| *a != b);
                            return Err(format!(
                                "connection {n}: {} bytes back, first difference at {at:?}",
                                got.len()
                            ));
                        }
                        Ok(())
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap_or_else(|e| Err(e.to_string())));
            }
            out
        })
        .expect("client runtime");
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {CONCURRENT} connections failed, e.g. {:?}\n{}",
        failures.len(),
        failures.iter().take(3).collect::<Vec<_>>(),
        agent.logs()
    );
    let stats = agent
        .wait_stats(Duration::from_secs(10), |s| s.apps["bulk"].live == 0)
        .expect("every connection closed");
    assert_eq!(stats.apps["bulk"].refused, 0, "nothing refused");
    assert_eq!(
        stats.apps["bulk"].ingress_bytes,
        (CONCURRENT * PER_CONNECTION) as u64,
        "every client byte went to the origin"
    );
    assert_eq!(
        stats.apps["bulk"].egress_bytes,
        (CONCURRENT * PER_CONNECTION) as u64,
        "every origin byte went to the client"
    );
}
