//! SYN flood (SPEC §4): while hping3 floods an app port with SYNs from random
//! sources, a legitimate client opens 200 connections that carry data; all succeed,
//! and the origin accepts exactly those 200: half-open connections never reach it.
//!
//! Root, after `cargo build -p forwarder`: `cargo test -p forwarder-tests --test tcp_synflood`.

mod tcp_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use forwarder_tests::{EDGE_CLIENT_V4, Lab, ORIGIN_V4, require_root};
use tcp_support::*;

const CONNECTIONS: usize = 200;
const THREADS: usize = 8;

/// `TcpExtSyncookiesSent` (and friends) in `ns`, from `nstat -az`.
fn nstat(ns: &forwarder_tests::Netns, counter: &str) -> u64 {
    ns.run("nstat", &["-az", counter])
        .ok()
        .and_then(|out| {
            out.lines()
                .find(|l| l.starts_with(counter))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn legitimate_clients_get_through_a_syn_flood() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    let listener = origin_listener(&lab, SocketAddr::new(ORIGIN_V4.into(), 7301));
    serve(listener, move |mut s: TcpStream| {
        counter.fetch_add(1, Ordering::SeqCst);
        let mut buf = [0u8; 64];
        if let Ok(n) = s.read(&mut buf) {
            let _ = s.write_all(&buf[..n]);
        }
    });
    let agent = start_agent(
        &lab,
        "[[apps]]\nid = \"flooded\"\nprotocol = \"tcp/7301\"\norigin_direct = [\"tcp://10.0.2.2:7301\"]\n",
    );
    assert_eq!(
        lab.edge()
            .read_sysctl("net.ipv4.tcp_syncookies")
            .unwrap()
            .trim(),
        "1",
        "the agent keeps SYN cookies on"
    );
    // Random sources. For a flood SYN to stay half-open, the kernel must find a route
    // for its SYN-ACK (without one it drops the request at once and nothing queues):
    // give the edge a default route via an address on the client link where nobody
    // lives. The SYN-ACKs then wait for an ARP answer that never comes; nothing
    // leaves the lab. The SYN queue overflows and cookies take over.
    lab.edge()
        .ip(&[
            "route",
            "add",
            "default",
            "via",
            "10.0.1.99",
            "dev",
            lab.ifaces().edge_client.as_str(),
        ])
        .unwrap();
    let mut cmd = lab.client().cmd(
        "timeout",
        &[
            // Bounded; long enough to fill a 65535-entry SYN queue on a loaded VM.
            "15",
            "hping3",
            "-S",
            "--flood",
            "--rand-source",
            "-p",
            "7301",
            "10.0.1.1",
        ],
    );
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut flood = lab.client().spawn(cmd).unwrap();
    // Start the real clients once the SYN queue has overflowed.
    let deadline = Instant::now() + Duration::from_secs(12);
    while nstat(lab.edge(), "TcpExtSyncookiesSent") == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        nstat(lab.edge(), "TcpExtSyncookiesSent") > 0,
        "the flood did not overflow the SYN queue: no SYN cookies sent"
    );

    let start = Instant::now();
    let lab = Arc::new(lab);
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let lab = lab.clone();
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                for i in 0..CONNECTIONS / THREADS {
                    let msg = format!("hello {t}/{i}");
                    let result = (|| -> std::io::Result<()> {
                        let dst = SocketAddr::new(EDGE_CLIENT_V4.into(), 7301);
                        let mut c = client_connect(&lab, dst, Duration::from_secs(10))?;
                        c.write_all(msg.as_bytes())?;
                        let mut back = vec![0u8; msg.len()];
                        c.read_exact(&mut back)?;
                        assert_eq!(back, msg.as_bytes());
                        Ok(())
                    })();
                    if let Err(e) = result {
                        failures.push(format!("{msg}: {e}"));
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let took = start.elapsed();
    let flood_running = flood.try_wait().unwrap().is_none();
    // The legitimate clients are done: stop the flood rather than wait it out.
    let _ = flood.kill();
    let cookies = nstat(lab.edge(), "TcpExtSyncookiesSent");
    let overflows = nstat(lab.edge(), "TcpExtListenOverflows");
    eprintln!(
        "{CONNECTIONS} connections in {took:?} under flood (flood still running at the end: \
         {flood_running}); SYN cookies sent {cookies}, listen overflows {overflows}"
    );
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    // Flood SYNs never complete a handshake, so the agent never connects for them.
    let evs = wait_events(&agent, "flooded", Duration::from_secs(10), |e| {
        e.iter().filter(|e| e.event() == "disconnect").count() >= CONNECTIONS
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        CONNECTIONS as u64,
        "origin accepts"
    );
    let connects = app_events(&agent, "flooded")
        .iter()
        .filter(|e| e.event() == "connect")
        .count();
    assert_eq!(connects, CONNECTIONS, "connect events");
    assert!(
        evs.iter()
            .all(|e| e.ip("ClientIP") == Some(forwarder_tests::CLIENT_V4.into()))
    );
}
