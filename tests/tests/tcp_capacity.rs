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

use forwarder_tests::agent::AgentProcess;
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

/// At the open-file capacity (hard limit 1024: (1024 − 256 reserved) / 2 fds = 384
/// connections) further connections are refused at once with a RST and counted,
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
    const CAPACITY: usize = 384;
    let edge = SocketAddr::from((EDGE_CLIENT_V4, 7301));
    let greet = move || greeted(edge);
    let mut idle: Vec<TcpStream> = lab
        .client()
        .run_in(move || {
            (0..CAPACITY)
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
    assert_eq!(stats.apps["cap"].live, CAPACITY as u64);
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
    // Clients that reset five connections (a plain close would only half-close
    // them: the origin holds its side) make room again.
    for s in idle.drain(CAPACITY - 5..) {
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
