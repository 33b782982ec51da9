//! PROXY protocol towards real origins (SPEC §4): nginx (`listen … proxy_protocol`)
//! and HAProxy (`bind … accept-proxy`) behind the forwarder report the client's own
//! address and port, for v1 and v2, IPv4 and IPv6 clients; and the raw headers are
//! byte-exact per HAProxy's proxy-protocol.txt.
//!
//! Root, after `cargo build -p forwarder`:
//! `cargo test -p forwarder-tests --test tcp_proxy_protocol`.

mod tcp_support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::Duration;

use forwarder_tests::{EDGE_CLIENT_V4, EDGE_CLIENT_V6, Lab, ORIGIN_V4, require_root};
use tcp_support::*;

const WAIT: Duration = Duration::from_secs(10);

/// Apps: v1 on `base`, v2 on `base + 1`, both to the same ports on 10.0.2.2.
fn apps(base: u16) -> String {
    format!(
        "[[apps]]\nid = \"v1\"\nprotocol = \"tcp/{base}\"\norigin_direct = [\"tcp://10.0.2.2:{base}\"]\nproxy_protocol = \"v1\"\n\n\
         [[apps]]\nid = \"v2\"\nprotocol = \"tcp/{p2}\"\norigin_direct = [\"tcp://10.0.2.2:{p2}\"]\nproxy_protocol = \"v2\"\n",
        p2 = base + 1
    )
}

/// Parses `ADDR:PORT` as the origins print it (IPv6 without brackets).
fn parse_reported(text: &str) -> SocketAddr {
    let text = text.trim();
    let (ip, port) = text
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("bad report {text:?}"));
    let ip: IpAddr = ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .unwrap_or_else(|_| panic!("bad address in {text:?}"));
    SocketAddr::new(
        ip,
        port.parse()
            .unwrap_or_else(|_| panic!("bad port in {text:?}")),
    )
}

/// Connects from the client to each edge address and port, sends `request` and
/// checks that the last line of the reply is the client socket's own address.
fn check_reports(lab: &Lab, ports: [u16; 2], request: &[u8]) {
    for port in ports {
        for edge in [IpAddr::from(EDGE_CLIENT_V4), IpAddr::from(EDGE_CLIENT_V6)] {
            let dst = SocketAddr::new(edge, port);
            let mut client = client_connect(lab, dst, WAIT)
                .unwrap_or_else(|e| panic!("connecting to {dst}: {e}"));
            let local = client.local_addr().unwrap();
            client.write_all(request).unwrap();
            let (reply, err) = read_all(&mut client);
            assert!(err.is_none(), "{dst}: {err:?}");
            let reply = String::from_utf8_lossy(&reply);
            let last = reply.lines().last().unwrap_or_default();
            assert_eq!(
                parse_reported(last),
                local,
                "{dst}: the origin reported {reply:?}"
            );
        }
    }
}

#[test]
fn nginx_sees_the_client_address_v1_v2_ipv4_ipv6() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let dir = TempDir::new("nginx");
    let d = dir.path().display();
    let conf = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         pid {d}/nginx.pid;\nerror_log {d}/error.log info;\nworker_processes 1;\n\
         events {{ worker_connections 64; }}\n\
         stream {{\n\
           server {{ listen 10.0.2.2:7101 proxy_protocol; return \"$proxy_protocol_addr:$proxy_protocol_port\\n\"; }}\n\
           server {{ listen 10.0.2.2:7102 proxy_protocol; return \"$proxy_protocol_addr:$proxy_protocol_port\\n\"; }}\n\
         }}\n"
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let _nginx = lab.origin().spawn(lab.origin().nginx(dir.path())).unwrap();
    wait_listening(&lab, SocketAddr::new(ORIGIN_V4.into(), 7101), WAIT);
    wait_listening(&lab, SocketAddr::new(ORIGIN_V4.into(), 7102), WAIT);
    let agent = start_agent(&lab, &apps(7101));
    check_reports(&lab, [7101, 7102], b"");
    // Every connection has its events, with the PROXY version named.
    let v1 = wait_events(&agent, "v1", WAIT, |e| {
        e.iter().filter(|e| e.event() == "disconnect").count() == 2
    });
    assert!(v1.iter().all(|e| e.str("ProxyProtocol") == Some("v1")));
    let v2 = wait_events(&agent, "v2", WAIT, |e| {
        e.iter().filter(|e| e.event() == "disconnect").count() == 2
    });
    assert!(v2.iter().all(|e| e.str("ProxyProtocol") == Some("v2")));
}

#[test]
fn haproxy_sees_the_client_address_v1_v2_ipv4_ipv6() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let dir = TempDir::new("haproxy");
    let conf = "global\n  maxconn 100\n\
                defaults\n  mode http\n  timeout connect 5s\n  timeout client 10s\n  timeout server 10s\n\
                frontend v1\n  bind 10.0.2.2:7111 accept-proxy\n  http-request return status 200 content-type text/plain lf-string \"%[src]:%[src_port]\\n\"\n\
                frontend v2\n  bind 10.0.2.2:7112 accept-proxy\n  http-request return status 200 content-type text/plain lf-string \"%[src]:%[src_port]\\n\"\n";
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, conf).unwrap();
    let mut cmd = lab
        .origin()
        .cmd("haproxy", &["-db", "-f", path.to_str().unwrap()]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let _haproxy = lab.origin().spawn(cmd).unwrap();
    wait_listening(&lab, SocketAddr::new(ORIGIN_V4.into(), 7111), WAIT);
    wait_listening(&lab, SocketAddr::new(ORIGIN_V4.into(), 7112), WAIT);
    let agent = start_agent(&lab, &apps(7111));
    check_reports(
        &lab,
        [7111, 7112],
        b"GET / HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n",
    );
    wait_events(&agent, "v2", WAIT, |e| {
        e.iter().filter(|e| e.event() == "disconnect").count() == 2
    });
}

/// What a PROXY v2 header for TCP must be, written out by hand from the spec.
fn expected_v2(client: SocketAddr, edge: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, command PROXY
    match (client.ip(), edge.ip()) {
        (IpAddr::V4(c), IpAddr::V4(e)) => {
            h.push(0x11); // AF_INET, STREAM
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&c.octets());
            h.extend_from_slice(&e.octets());
        }
        (IpAddr::V6(c), IpAddr::V6(e)) => {
            h.push(0x21); // AF_INET6, STREAM
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&c.octets());
            h.extend_from_slice(&e.octets());
        }
        _ => panic!("mixed families"),
    }
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&edge.port().to_be_bytes());
    h
}

#[test]
fn raw_headers_are_byte_exact() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    // The origin sends back exactly the header bytes it received, then echoes.
    for port in [7121u16, 7122] {
        serve(
            origin_listener(&lab, SocketAddr::new(ORIGIN_V4.into(), port)),
            |mut s: TcpStream| {
                let mut first = [0u8; 16];
                s.read_exact(&mut first).unwrap();
                let mut header = first.to_vec();
                if first.starts_with(b"PROXY ") {
                    let mut byte = [0u8; 1];
                    while !header.ends_with(b"\r\n") {
                        s.read_exact(&mut byte).unwrap();
                        header.push(byte[0]);
                    }
                } else {
                    let len = u16::from_be_bytes([first[14], first[15]]) as usize;
                    let mut rest = vec![0u8; len];
                    s.read_exact(&mut rest).unwrap();
                    header.extend_from_slice(&rest);
                }
                s.write_all(&header).unwrap();
                let mut payload = [0u8; 4];
                s.read_exact(&mut payload).unwrap();
                s.write_all(&payload).unwrap();
            },
        );
    }
    let _agent = start_agent(&lab, &apps(7121));
    for edge in [IpAddr::from(EDGE_CLIENT_V4), IpAddr::from(EDGE_CLIENT_V6)] {
        for port in [7121u16, 7122] {
            let dst = SocketAddr::new(edge, port);
            let mut client = client_connect(&lab, dst, WAIT).unwrap();
            let local = client.local_addr().unwrap();
            let expected = if port == 7121 {
                let proto = if edge.is_ipv4() { "TCP4" } else { "TCP6" };
                format!(
                    "PROXY {proto} {} {} {} {}\r\n",
                    local.ip(),
                    edge,
                    local.port(),
                    port
                )
                .into_bytes()
            } else {
                expected_v2(local, dst)
            };
            let mut got = vec![0u8; expected.len()];
            client.write_all(b"ping").unwrap();
            client.read_exact(&mut got).unwrap();
            assert_eq!(got, expected, "{dst}: header as the origin received it");
            let mut echo = [0u8; 4];
            client.read_exact(&mut echo).unwrap();
            assert_eq!(&echo, b"ping", "payload follows the header unchanged");
        }
    }
}
