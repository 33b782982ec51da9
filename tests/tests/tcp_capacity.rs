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
use tcp_support::{config, init, origin_listener};

const IDLE: usize = 3000;
const SOFT_LIMIT: u64 = 1024;

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
    let held = {
        let stop = stop.clone();
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
    };
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
    let connect_and_greet = move || -> std::io::Result<TcpStream> {
        let mut s = TcpStream::connect_timeout(&edge, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut greeting = [0u8; 3];
        s.read_exact(&mut greeting)?;
        if &greeting != b"hi\n" {
            return Err(std::io::Error::other(format!("greeting {greeting:?}")));
        }
        Ok(s)
    };
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
