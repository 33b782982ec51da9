//! Origin failures and timeouts (SPEC §4, §6): refused → `originError` 521 and the
//! client's connection closed; blackholed → 522 after the connect timeout;
//! unreachable → 523; the next origin is tried on failure; idle connections end
//! with 497 (client silent) or 445 (origin silent).
//!
//! Root, after `cargo build -p forwarder`: `cargo test -p forwarder-tests --test tcp_errors`.

mod tcp_support;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use forwarder_tests::{EDGE_CLIENT_V4, Lab, ORIGIN_V4, require_root};
use tcp_support::*;

const WAIT: Duration = Duration::from_secs(10);

fn sa(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The client's connection must end (EOF or reset) within `within`, with nothing read.
#[track_caller]
fn assert_closed(client: &mut TcpStream, within: Duration) {
    client.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("read {n} bytes from a connection that should be closed"),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("connection not closed: {e}"),
    }
}

/// Connects to `dst` and expects the agent to close the connection at once: the
/// reset may even beat `connect_timeout`'s own check of the handshake. Returns the
/// single `originError` event of `app`.
fn connect_expect_origin_error(
    lab: &Lab,
    agent: &forwarder_tests::agent::AgentProcess,
    app: &str,
    dst: SocketAddr,
) -> Ev {
    match client_connect(lab, dst, WAIT) {
        Ok(mut client) => assert_closed(&mut client, Duration::from_secs(3)),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }
    let evs = wait_events(agent, app, WAIT, |e| {
        e.iter().any(|e| e.event() == "originError")
    });
    assert_eq!(evs.len(), 1, "exactly one event, no connect: {evs:?}");
    let e = evs[0].clone();
    assert_eq!(e.ip("ClientIP"), Some(forwarder_tests::CLIENT_V4.into()));
    assert_eq!(e.server(), Some(dst));
    e
}

#[test]
fn refused_origin_is_521_and_the_client_is_closed() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let agent = start_agent(
        &lab,
        "[[apps]]\nid = \"down\"\nprotocol = \"tcp/7201\"\norigin_direct = [\"tcp://10.0.2.2:7201\"]\n",
    );
    let e = connect_expect_origin_error(&lab, &agent, "down", sa(EDGE_CLIENT_V4, 7201));
    assert_eq!(e.status(), 521, "{e:?}");
    assert_eq!(e.origin(), Some(sa(ORIGIN_V4, 7201)));
    assert!(e.str("DisconnectTimestamp").is_some());
}

#[test]
fn blackholed_origin_is_522_after_the_connect_timeout() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _listener = origin_listener(&lab, sa(ORIGIN_V4, 7202));
    for cmd in [
        "add table inet fwdtest",
        "add chain inet fwdtest input { type filter hook input priority 0 ; }",
        "add rule inet fwdtest input tcp dport 7202 drop",
    ] {
        lab.origin().run("nft", &[cmd]).unwrap();
    }
    let agent = start_agent(
        &lab,
        "[[apps]]\nid = \"hole\"\nprotocol = \"tcp/7202\"\norigin_direct = [\"tcp://10.0.2.2:7202\"]\n",
    );
    let start = Instant::now();
    let mut client = client_connect(&lab, sa(EDGE_CLIENT_V4, 7202), WAIT).unwrap();
    let local = client.local_addr().unwrap();
    assert_closed(&mut client, Duration::from_secs(5));
    let took = start.elapsed();
    // TEST_CONNECT_TIMEOUT is 1s.
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    let evs = wait_events(&agent, "hole", WAIT, |e| {
        event_for(e, "originError", local).is_some()
    });
    assert_eq!(event_for(&evs, "originError", local).unwrap().status(), 522);
}

#[test]
fn unreachable_origin_is_523() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    // Routable when the agent starts (it checks), then an `unreachable` route in the
    // edge makes connect(2) fail with EHOSTUNREACH.
    let agent = start_agent(
        &lab,
        "[[apps]]\nid = \"nowhere\"\nprotocol = \"tcp/7203\"\norigin_direct = [\"tcp://10.0.2.9:7203\"]\n",
    );
    lab.edge()
        .ip(&["route", "add", "unreachable", "10.0.2.9/32"])
        .unwrap();
    let e = connect_expect_origin_error(&lab, &agent, "nowhere", sa(EDGE_CLIENT_V4, 7203));
    assert_eq!(e.status(), 523, "{e:?}");
}

#[test]
fn the_next_origin_is_tried_when_the_first_refuses() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    serve(
        origin_listener(&lab, sa(ORIGIN_V4, 7205)),
        |mut s: TcpStream| {
            let _ = s.write_all(b"alive\n");
        },
    );
    // A second origin address where nothing listens (refused), put first in this
    // client's hash order.
    lab.add_origin_address("10.0.2.3/24").unwrap();
    let client_ip: IpAddr = forwarder_tests::CLIENT_V4.into();
    let first = (forwarder::tcp::origin::client_hash(client_ip) % 2) as usize;
    let origins = if first == 0 {
        "\"tcp://10.0.2.3:7205\", \"tcp://10.0.2.2:7205\""
    } else {
        "\"tcp://10.0.2.2:7205\", \"tcp://10.0.2.3:7205\""
    };
    let agent = start_agent(
        &lab,
        &format!("[[apps]]\nid = \"two\"\nprotocol = \"tcp/7205\"\norigin_direct = [{origins}]\n"),
    );
    let mut client = client_connect(&lab, sa(EDGE_CLIENT_V4, 7205), WAIT).unwrap();
    let local = client.local_addr().unwrap();
    let (reply, err) = read_all(&mut client);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(reply, b"alive\n");
    drop(client);
    let evs = wait_events(&agent, "two", WAIT, |e| {
        event_for(e, "disconnect", local).is_some()
    });
    assert_eq!(
        event_for(&evs, "connect", local).unwrap().origin(),
        Some(sa(ORIGIN_V4, 7205)),
        "connected to the live origin after the dead one"
    );
    assert!(evs.iter().all(|e| e.event() != "originError"), "{evs:?}");
}

#[test]
fn idle_connections_end_with_497_or_445() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    // The origin never says anything and never closes.
    serve(
        origin_listener(&lab, sa(ORIGIN_V4, 7206)),
        |mut s: TcpStream| {
            let _ = read_all(&mut s);
        },
    );
    let agent = forwarder_tests::agent::AgentProcess::start(
        &lab,
        &config(
            &lab,
            "tcp_idle_timeout = \"1s\"",
            "[[apps]]\nid = \"idle\"\nprotocol = \"tcp/7206\"\norigin_direct = [\"tcp://10.0.2.2:7206\"]\n",
        ),
    )
    .unwrap();
    // Client silent: 497.
    let start = Instant::now();
    let mut quiet = client_connect(&lab, sa(EDGE_CLIENT_V4, 7206), WAIT).unwrap();
    let quiet_local = quiet.local_addr().unwrap();
    // Client asks, origin never answers: 445.
    let mut asking = client_connect(&lab, sa(EDGE_CLIENT_V4, 7206), WAIT).unwrap();
    let asking_local = asking.local_addr().unwrap();
    asking.write_all(b"anyone?").unwrap();
    assert_closed(&mut quiet, Duration::from_secs(4));
    assert_closed(&mut asking, Duration::from_secs(4));
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    let evs = wait_events(&agent, "idle", WAIT, |e| {
        event_for(e, "disconnect", quiet_local).is_some()
            && event_for(e, "disconnect", asking_local).is_some()
    });
    assert_eq!(
        event_for(&evs, "disconnect", quiet_local).unwrap().status(),
        497
    );
    let asked = event_for(&evs, "disconnect", asking_local).unwrap();
    assert_eq!(asked.status(), 445);
    assert_eq!(asked.num("ClientBytes"), Some(7));
}
