//! TCP apps end to end (SPEC §4, §6): 100 MB each way with equal checksums, half-close,
//! port ranges mapped by offset, RST passed on as RST with status 444/499, and the
//! connect/disconnect events with exact byte counts.
//!
//! Root, after `cargo build -p forwarder`: `cargo test -p forwarder-tests --test tcp_stream`.

mod tcp_support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use forwarder_tests::{CLIENT_V4, EDGE_CLIENT_V4, Lab, ORIGIN_V4, require_root};
use tcp_support::*;

const WAIT: Duration = Duration::from_secs(10);

fn sa(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

#[test]
fn bulk_100mb_both_ways_with_equal_checksums() {
    init();
    if !require_root() {
        return;
    }
    const LEN: u64 = 100 * 1024 * 1024;
    let lab = Lab::new().unwrap();
    let listener = origin_listener(&lab, sa(ORIGIN_V4, 7001));
    let agent = start_agent(
        &lab,
        "[[apps]]\nid = \"bulk\"\nprotocol = \"tcp/7001\"\norigin_direct = [\"tcp://10.0.2.2:7001\"]\n",
    );
    // Origin: receives the client's stream and sends its own at the same time.
    let origin = std::thread::spawn(move || {
        let (stream, peer) = listener.accept().unwrap();
        let mut reader = stream.try_clone().unwrap();
        let rx = std::thread::spawn(move || receive_sum(&mut reader).unwrap());
        let mut writer = stream;
        let sent = send_random(&mut writer, 2, LEN).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
        (sent, rx.join().unwrap(), peer)
    });
    let start = Instant::now();
    let client = client_connect(&lab, sa(EDGE_CLIENT_V4, 7001), WAIT).unwrap();
    let local = client.local_addr().unwrap();
    let mut reader = client.try_clone().unwrap();
    let rx = std::thread::spawn(move || receive_sum(&mut reader).unwrap());
    let mut writer = client;
    let sent = send_random(&mut writer, 1, LEN).unwrap();
    writer.shutdown(std::net::Shutdown::Write).unwrap();
    let received = rx.join().unwrap();
    let (origin_sent, origin_received, origin_peer) = origin.join().unwrap();
    eprintln!("200 MB through the forwarder in {:?}", start.elapsed());

    assert_eq!(sent.1, LEN);
    assert_eq!(origin_received, sent, "client -> origin differs");
    assert_eq!(received, origin_sent, "origin -> client differs");
    // The origin sees the agent, not the client.
    assert_ne!(origin_peer.ip(), local.ip());

    let evs = wait_events(&agent, "bulk", WAIT, |e| {
        event_for(e, "disconnect", local).is_some()
    });
    let connect = event_for(&evs, "connect", local).expect("connect event");
    assert_eq!(connect.status(), 0);
    assert_eq!(connect.server(), Some(sa(EDGE_CLIENT_V4, 7001)));
    assert_eq!(connect.origin(), Some(sa(ORIGIN_V4, 7001)));
    assert_eq!(connect.str("ProxyProtocol"), Some("off"));
    assert!(connect.str("ConnectTimestamp").is_some());
    let disconnect = event_for(&evs, "disconnect", local).unwrap();
    assert_eq!(disconnect.status(), 200, "{disconnect:?}");
    assert_eq!(disconnect.num("ClientBytes"), Some(LEN));
    assert_eq!(disconnect.num("OriginBytes"), Some(LEN));
    assert_eq!(disconnect.ip("ClientIP"), Some(CLIENT_V4.into()));
    assert_eq!(
        disconnect.str("ConnectTimestamp"),
        connect.str("ConnectTimestamp")
    );
    assert!(disconnect.str("DisconnectTimestamp").is_some());
    assert_eq!(evs.len(), 2, "one connect, one disconnect: {evs:?}");

    let stats = agent.stats().unwrap();
    let app = &stats.apps["bulk"];
    assert!(
        app.ingress_bytes >= LEN && app.egress_bytes >= LEN,
        "{app:?}"
    );
    assert_eq!(app.live, 0);
}

#[test]
fn half_close_client_still_gets_the_full_reply() {
    init();
    if !require_root() {
        return;
    }
    const REPLY: u64 = 3 * 1024 * 1024;
    let lab = Lab::new().unwrap();
    let listener = origin_listener(&lab, sa(ORIGIN_V4, 7002));
    let agent = start_agent(
        &lab,
        "[[apps]]\nid = \"half\"\nprotocol = \"tcp/7002\"\norigin_direct = [\"tcp://10.0.2.2:7002\"]\n",
    );
    // Origin: reads the request to EOF (the client's FIN), then answers and closes.
    serve(listener, |mut s: TcpStream| {
        let (request, err) = read_all(&mut s);
        assert!(err.is_none());
        s.write_all(format!("got {} bytes\n", request.len()).as_bytes())
            .unwrap();
        send_random(&mut s, 9, REPLY).unwrap();
    });
    let mut client = client_connect(&lab, sa(EDGE_CLIENT_V4, 7002), WAIT).unwrap();
    let local = client.local_addr().unwrap();
    client.write_all(&[b'x'; 1000]).unwrap();
    shutdown_write(&client);
    let mut line = [0u8; 15];
    client.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"got 1000 bytes\n");
    let got = receive_sum(&mut client).unwrap();
    let mut expect = Stream64::new(9);
    let mut buf = vec![0u8; REPLY as usize];
    expect.fill(&mut buf);
    let mut sum = Sum64::new();
    sum.update(&buf);
    assert_eq!(
        got,
        sum.finish(),
        "the reply after the half-close is complete"
    );

    let evs = wait_events(&agent, "half", WAIT, |e| {
        event_for(e, "disconnect", local).is_some()
    });
    let d = event_for(&evs, "disconnect", local).unwrap();
    assert_eq!(d.status(), 200);
    assert_eq!(d.num("ClientBytes"), Some(1000));
    assert_eq!(d.num("OriginBytes"), Some(REPLY + 15));
}

#[test]
fn port_range_maps_by_offset() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    for port in [8100, 8150, 8199] {
        // Each origin port answers with its own number.
        serve(
            origin_listener(&lab, sa(ORIGIN_V4, port)),
            |mut s: TcpStream| {
                let port = s.local_addr().unwrap().port();
                let _ = s.write_all(format!("{port}\n").as_bytes());
            },
        );
    }
    let agent = start_agent(
        &lab,
        "[[apps]]\nid = \"range\"\nprotocol = \"tcp/8000-8099\"\norigin_direct = [\"tcp://10.0.2.2:8100-8199\"]\n",
    );
    for (edge, origin) in [(8099u16, 8199u16), (8000, 8100), (8050, 8150)] {
        let mut client = client_connect(&lab, sa(EDGE_CLIENT_V4, edge), WAIT).unwrap();
        let (reply, err) = read_all(&mut client);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(
            String::from_utf8_lossy(&reply),
            format!("{origin}\n"),
            "edge port {edge}"
        );
        let local = client.local_addr().unwrap();
        drop(client);
        let evs = wait_events(&agent, "range", WAIT, |e| {
            event_for(e, "disconnect", local).is_some()
        });
        let d = event_for(&evs, "disconnect", local).unwrap();
        assert_eq!(d.server(), Some(sa(EDGE_CLIENT_V4, edge)));
        assert_eq!(d.origin(), Some(sa(ORIGIN_V4, origin)));
    }
    // A port outside the range is no app's: XDP drops the SYN.
    let err =
        client_connect(&lab, sa(EDGE_CLIENT_V4, 8100), Duration::from_millis(500)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
}

#[test]
fn origin_rst_is_passed_on_as_rst_with_status_444() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let listener = origin_listener(&lab, sa(ORIGIN_V4, 7003));
    let agent = start_agent(
        &lab,
        "[[apps]]\nid = \"rst\"\nprotocol = \"tcp/7003\"\norigin_direct = [\"tcp://10.0.2.2:7003\"]\n",
    );
    serve(listener, |mut s: TcpStream| {
        let mut hello = [0u8; 5];
        s.read_exact(&mut hello).unwrap();
        s.write_all(b"partial").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        set_linger_zero(&s);
        drop(s);
    });
    let mut client = client_connect(&lab, sa(EDGE_CLIENT_V4, 7003), WAIT).unwrap();
    let local = client.local_addr().unwrap();
    client.write_all(b"hello").unwrap();
    let (data, err) = read_all(&mut client);
    assert_eq!(data, b"partial");
    let err = err.expect("the client must see a reset, not a clean end");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    let evs = wait_events(&agent, "rst", WAIT, |e| {
        event_for(e, "disconnect", local).is_some()
    });
    let d = event_for(&evs, "disconnect", local).unwrap();
    assert_eq!(d.status(), 444, "{d:?}");
    assert_eq!(d.num("ClientBytes"), Some(5));
    assert_eq!(d.num("OriginBytes"), Some(7));
}

#[test]
fn client_rst_is_passed_on_as_rst_with_status_499() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let listener = origin_listener(&lab, sa(ORIGIN_V4, 7004));
    let agent = start_agent(
        &lab,
        "[[apps]]\nid = \"crst\"\nprotocol = \"tcp/7004\"\norigin_direct = [\"tcp://10.0.2.2:7004\"]\n",
    );
    let (local, origin_saw) =
        hello_then_client_reset(&lab, listener, sa(EDGE_CLIENT_V4, 7004), WAIT);
    assert_eq!(
        origin_saw,
        Some(ErrorKind::ConnectionReset),
        "the origin must get a RST"
    );
    let evs = wait_events(&agent, "crst", WAIT, |e| {
        event_for(e, "disconnect", local).is_some()
    });
    let d = event_for(&evs, "disconnect", local).unwrap();
    assert_eq!(d.status(), 499, "{d:?}");
    assert_eq!(d.num("ClientBytes"), Some(5));
    assert_eq!(d.num("OriginBytes"), Some(2));
}
