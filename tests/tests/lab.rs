//! Integration tests of the lab itself (root only; see `require_root`).

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    panic::AssertUnwindSafe,
    path::Path,
    process::Command,
    sync::Mutex,
    time::Duration,
};

use forwarder_tests::{
    CLIENT_V4, CLIENT_V6, EDGE_CLIENT_V4, EDGE_CLIENT_V6, EDGE_ORIGIN_V4, EDGE_ORIGIN_V6, Lab,
    Links, Netns, NsTask, ORIGIN_V4, ORIGIN_V6, OutputOk as _, Peers, Role, cleanup_stale,
    require_root,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    time::timeout,
};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn ns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn ns_names(lab: &Lab) -> Vec<String> {
    Role::ALL
        .iter()
        .map(|&r| lab.netns(r).name().to_owned())
        .collect()
}

/// A UDP server in `ns` answering every datagram with `<peer>|<payload>`. The socket is
/// bound before this returns (no race with the first client datagram).
fn udp_echo(ns: &Netns, bind: SocketAddr) -> NsTask<()> {
    let std_sock = ns
        .run_in(|| std::net::UdpSocket::bind(bind))
        .unwrap()
        .unwrap();
    std_sock.set_nonblocking(true).unwrap();
    ns.spawn_async(async move {
        let sock = UdpSocket::from_std(std_sock).unwrap();
        let mut buf = [0u8; 2048];
        loop {
            let (n, peer) = sock.recv_from(&mut buf).await.unwrap();
            let mut reply = format!("{}|", peer.ip()).into_bytes();
            reply.extend_from_slice(&buf[..n]);
            sock.send_to(&reply, peer).await.unwrap();
        }
    })
    .unwrap()
}

/// Sends `payload` from `ns` (bound to `local`) to `server`; returns the reply.
fn udp_ask(ns: &Netns, local: SocketAddr, server: SocketAddr, payload: &[u8]) -> String {
    ns.block_on(async move {
        let sock = UdpSocket::bind(local).await.unwrap();
        sock.send_to(payload, server).await.unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = timeout(IO_TIMEOUT, sock.recv_from(&mut buf))
            .await
            .expect("no UDP reply")
            .unwrap();
        assert_eq!(from, server);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    })
    .unwrap()
}

fn any_port(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, 0)
}

/// A TCP echo server in `ns`; returns once it listens.
fn tcp_echo(ns: &Netns, bind: SocketAddr) -> NsTask<()> {
    let listener = ns
        .run_in(|| std::net::TcpListener::bind(bind))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    ns.spawn_async(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut rd, mut wr) = stream.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    })
    .unwrap()
}

/// Streams `len` bytes through a TCP echo at `server` from `ns`; checks they come back.
fn tcp_roundtrip(ns: &Netns, server: SocketAddr, len: usize) {
    ns.block_on(async move {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let stream = timeout(IO_TIMEOUT, TcpStream::connect(server))
            .await
            .expect("TCP connect timed out")
            .unwrap();
        let (mut rd, mut wr) = stream.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&sent).await.unwrap();
            wr.shutdown().await.unwrap();
        });
        let mut back = Vec::with_capacity(len);
        timeout(IO_TIMEOUT, rd.read_to_end(&mut back))
            .await
            .expect("TCP echo timed out")
            .unwrap();
        writer.await.unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "echoed bytes differ");
    })
    .unwrap();
}

#[test]
fn client_pings_origin_through_edge() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    lab.client().ping(ORIGIN_V4.into()).unwrap();
    lab.client().ping(ORIGIN_V6.into()).unwrap();
    lab.origin().ping(CLIENT_V4.into()).unwrap();
    lab.origin().ping(CLIENT_V6.into()).unwrap();
    lab.client().ping(EDGE_CLIENT_V4.into()).unwrap();
    lab.client().ping(EDGE_CLIENT_V6.into()).unwrap();
    lab.origin().ping(EDGE_ORIGIN_V4.into()).unwrap();
    lab.origin().ping(EDGE_ORIGIN_V6.into()).unwrap();
    // Through `cmd` + `output_ok` as well.
    let out = lab
        .client()
        .cmd("ping", &["-n", "-c1", "-W2", "10.0.2.2"])
        .output_ok()
        .unwrap();
    assert!(out.contains("1 received"), "{out}");
    lab.close().unwrap();
}

#[test]
fn two_labs_at_once_do_not_collide() {
    if !require_root() {
        return;
    }
    let a = Lab::new().unwrap();
    let b = Lab::new().unwrap();
    assert_ne!(a.id(), b.id());
    assert_ne!(a.ifaces(), b.ifaces());
    for name in ns_names(&a).iter().chain(&ns_names(&b)) {
        assert!(ns_exists(name), "{name}");
    }
    // Same addresses in both, fully separate.
    a.client().ping(ORIGIN_V4.into()).unwrap();
    b.client().ping(ORIGIN_V6.into()).unwrap();
    let a_echo = udp_echo(a.origin(), SocketAddr::new(ORIGIN_V4.into(), 7000));
    let b_echo = udp_echo(b.origin(), SocketAddr::new(ORIGIN_V4.into(), 7000));
    let server = SocketAddr::new(ORIGIN_V4.into(), 7000);
    assert_eq!(
        udp_ask(a.client(), any_port(CLIENT_V4.into()), server, b"a"),
        "10.0.1.2|a"
    );
    assert_eq!(
        udp_ask(b.client(), any_port(CLIENT_V4.into()), server, b"b"),
        "10.0.1.2|b"
    );
    a_echo.stop().unwrap();
    b_echo.stop().unwrap();
    let a_names = ns_names(&a);
    drop(a);
    for name in &a_names {
        assert!(!ns_exists(name), "{name}");
    }
    // Dropping one lab leaves the other working.
    b.client().ping(ORIGIN_V4.into()).unwrap();
}

#[test]
fn namespaces_and_veths_are_gone_after_drop() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let names = ns_names(&lab);
    let ifaces = lab.ifaces().clone();
    // Keep the edge namespace itself alive past the drop (an fd is a reference):
    // the veths must still be deleted, not merely unreachable.
    let edge_fd = lab.edge().open().unwrap();
    let edge_path = lab.edge().path();
    // A socket created inside the origin namespace also pins it.
    let origin_sock = lab
        .origin()
        .run_in(|| std::net::UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    drop(lab);
    for name in &names {
        assert!(!ns_exists(name), "{name} still exists");
        let list = Command::new("ip")
            .args(["netns", "list"])
            .output_ok()
            .unwrap();
        assert!(!list.contains(name.as_str()), "{list}");
    }
    assert!(!edge_path.exists());
    let links = std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd as _;
            let rc = unsafe { libc::setns(edge_fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0);
            Command::new("ip")
                .args(["-o", "link", "show"])
                .output_ok()
                .unwrap()
        })
        .join()
        .unwrap()
    });
    assert!(!links.contains(&ifaces.edge_client), "{links}");
    assert!(!links.contains(&ifaces.edge_origin), "{links}");
    drop(origin_sock);
    // Nothing ever existed in the host namespace.
    let host = Command::new("ip")
        .args(["-o", "link", "show"])
        .output_ok()
        .unwrap();
    for ifname in [
        &ifaces.client,
        &ifaces.edge_client,
        &ifaces.edge_origin,
        &ifaces.origin,
    ] {
        assert!(!host.contains(ifname.as_str()), "{ifname} in host: {host}");
    }
}

#[test]
fn namespaces_are_gone_after_a_panic() {
    if !require_root() {
        return;
    }
    let names = Mutex::new(Vec::new());
    let child_pid = Mutex::new(0u32);
    let stray = Mutex::new(None);
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let lab = Lab::new().unwrap();
        *names.lock().unwrap() = ns_names(&lab);
        let child = lab
            .origin()
            .spawn(lab.origin().cmd("sleep", &["1000"]))
            .unwrap();
        *child_pid.lock().unwrap() = child.id();
        // A process started without `spawn` is killed too.
        *stray.lock().unwrap() = Some(lab.client().cmd("sleep", &["1000"]).spawn().unwrap());
        std::thread::sleep(Duration::from_millis(50));
        panic!("deliberate panic inside a lab test");
    }));
    assert!(result.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 3);
    for name in &names {
        assert!(!ns_exists(name), "{name} survived the panic");
    }
    let pid = child_pid.into_inner().unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    let mut stray = stray.into_inner().unwrap().unwrap();
    assert!(!stray.wait().unwrap().success());
}

#[test]
fn pass_stubs_attach_in_driver_mode_and_traffic_flows() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    lab.attach_pass_stubs().unwrap();
    let ifaces = lab.ifaces().clone();
    for (ns, ifname) in [
        (lab.client(), &ifaces.client),
        (lab.origin(), &ifaces.origin),
    ] {
        let show = ns.ip(&["link", "show", ifname.as_str()]).unwrap();
        let first = show.lines().next().unwrap();
        assert!(
            first.split_whitespace().any(|w| w == "xdp"),
            "not in driver mode: {show}"
        );
        assert!(!show.contains("xdpgeneric"), "{show}");
        assert!(show.contains("prog/xdp id"), "{show}");
    }
    // The edge's interfaces have none.
    for ifname in lab.edge_ifaces() {
        let show = lab.edge().ip(&["link", "show", ifname]).unwrap();
        assert!(!show.contains("prog/xdp"), "{show}");
    }
    lab.client().ping(ORIGIN_V4.into()).unwrap();
    lab.client().ping(ORIGIN_V6.into()).unwrap();
    let echo4 = tcp_echo(lab.origin(), SocketAddr::new(ORIGIN_V4.into(), 8080));
    let echo6 = tcp_echo(lab.origin(), SocketAddr::new(ORIGIN_V6.into(), 8080));
    tcp_roundtrip(
        lab.client(),
        SocketAddr::new(ORIGIN_V4.into(), 8080),
        1 << 20,
    );
    tcp_roundtrip(
        lab.client(),
        SocketAddr::new(ORIGIN_V6.into(), 8080),
        1 << 20,
    );

    // Stubs on the edge side too (all four ends with XDP) still route.
    lab.attach_pass_stub(Role::Edge, &ifaces.edge_client)
        .unwrap();
    lab.attach_pass_stub(Role::Edge, &ifaces.edge_origin)
        .unwrap();
    let show = lab
        .edge()
        .ip(&["link", "show", ifaces.edge_origin.as_str()])
        .unwrap();
    assert!(show.contains("prog/xdp id"), "{show}");
    lab.client().ping(ORIGIN_V4.into()).unwrap();
    tcp_roundtrip(
        lab.client(),
        SocketAddr::new(ORIGIN_V6.into(), 8080),
        256 << 10,
    );
    let server = SocketAddr::new(ORIGIN_V6.into(), 7001);
    let udp = udp_echo(lab.origin(), server);
    assert_eq!(
        udp_ask(lab.client(), any_port(CLIENT_V6.into()), server, b"x"),
        "fd00:1::2|x"
    );

    lab.detach_pass_stubs();
    let show = lab
        .client()
        .ip(&["link", "show", ifaces.client.as_str()])
        .unwrap();
    assert!(!show.contains("prog/xdp"), "{show}");
    lab.client().ping(ORIGIN_V4.into()).unwrap();
    drop((echo4, echo6, udp));
}

#[test]
fn tokio_udp_echo_in_origin_answers_client() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    // Server: block_on on a namespace thread of its own, announcing when it is bound.
    let origin = lab.origin().clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        origin
            .block_on(async move {
                let v4 = UdpSocket::bind((ORIGIN_V4, 7000)).await.unwrap();
                let v6 = UdpSocket::bind((ORIGIN_V6, 7000)).await.unwrap();
                ready_tx.send(()).unwrap();
                let mut buf = [0u8; 1500];
                for sock in [&v4, &v6] {
                    let (n, peer) = sock.recv_from(&mut buf).await.unwrap();
                    sock.send_to(&buf[..n], peer).await.unwrap();
                }
            })
            .unwrap();
    });
    ready_rx.recv_timeout(IO_TIMEOUT).unwrap();
    let echoed = lab
        .client()
        .block_on(async {
            let mut out = Vec::new();
            for (local, server) in [
                (
                    any_port(CLIENT_V4.into()),
                    SocketAddr::new(ORIGIN_V4.into(), 7000),
                ),
                (
                    any_port(CLIENT_V6.into()),
                    SocketAddr::new(ORIGIN_V6.into(), 7000),
                ),
            ] {
                let sock = UdpSocket::bind(local).await.unwrap();
                sock.send_to(b"hello", server).await.unwrap();
                let mut buf = [0u8; 64];
                let (n, from) = timeout(IO_TIMEOUT, sock.recv_from(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(from, server);
                out.push(buf[..n].to_vec());
            }
            out
        })
        .unwrap();
    assert_eq!(echoed, vec![b"hello".to_vec(), b"hello".to_vec()]);
    server.join().unwrap();
}

#[test]
fn extra_client_addresses() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let on_link = lab.add_client_address("10.0.1.200/24").unwrap();
    let blocked = lab.add_client_address("10.0.3.5/24").unwrap();
    let neighbour = lab.add_client_address("10.0.4.5/24").unwrap();
    let v6 = lab.add_client_address("fd00:3::5/64").unwrap();
    assert_eq!(blocked, "10.0.3.5".parse::<IpAddr>().unwrap());
    // Edge routes only to the added hosts, not to their whole subnets.
    let route = lab.edge().ip(&["route", "get", "10.0.3.5"]).unwrap();
    assert!(route.contains(&lab.ifaces().edge_client), "{route}");
    assert!(lab.edge().ip(&["route", "get", "10.0.3.6"]).is_err());

    let server4 = SocketAddr::new(ORIGIN_V4.into(), 7000);
    let server6 = SocketAddr::new(ORIGIN_V6.into(), 7000);
    let _e4 = udp_echo(lab.origin(), server4);
    let _e6 = udp_echo(lab.origin(), server6);
    for addr in [on_link, blocked, neighbour] {
        assert_eq!(
            udp_ask(lab.client(), any_port(addr), server4, b"p"),
            format!("{addr}|p")
        );
    }
    assert_eq!(
        udp_ask(lab.client(), any_port(v6), server6, b"p"),
        "fd00:3::5|p"
    );
    // Unbound sockets keep using the lab's main client addresses.
    assert_eq!(
        udp_ask(
            lab.client(),
            any_port("0.0.0.0".parse().unwrap()),
            server4,
            b"d"
        ),
        "10.0.1.2|d"
    );
    assert_eq!(
        udp_ask(lab.client(), any_port("::".parse().unwrap()), server6, b"d"),
        "fd00:1::2|d"
    );
    lab.client()
        .run("ping", &["-n", "-c1", "-W2", "-I", "10.0.3.5", "10.0.2.2"])
        .unwrap();

    // Extra origin addresses too.
    let origin2 = lab.add_origin_address("10.0.5.2/24").unwrap();
    lab.client().ping(origin2).unwrap();
    assert!(lab.add_client_address("10.0.3.5").is_err());
    assert!(lab.add_client_address("nonsense/24").is_err());
}

#[test]
fn lab_is_isolated() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    // Edge: no default route at all.
    assert_eq!(
        lab.edge().ip(&["-4", "route", "show", "default"]).unwrap(),
        ""
    );
    assert_eq!(
        lab.edge().ip(&["-6", "route", "show", "default"]).unwrap(),
        ""
    );
    assert!(lab.edge().ip(&["route", "get", "192.0.2.1"]).is_err());
    assert!(lab.edge().ip(&["route", "get", "2001:db8::1"]).is_err());
    // Client/origin: the only way out is the edge's veth.
    let client_routes = lab.client().ip(&["-4", "route", "show"]).unwrap();
    assert_eq!(client_routes.lines().count(), 2, "{client_routes}");
    assert!(
        client_routes.contains(&format!(
            "default via 10.0.1.1 dev {} src 10.0.1.2",
            lab.ifaces().client
        )),
        "{client_routes}"
    );
    let origin_routes = lab
        .origin()
        .ip(&["-6", "route", "show", "default"])
        .unwrap();
    assert!(
        origin_routes.contains(&format!(
            "default via fd00:2::1 dev {}",
            lab.ifaces().origin
        )),
        "{origin_routes}"
    );
    // Only lo and one veth per outer namespace, two veths on the edge.
    for (role, count) in [(Role::Client, 2), (Role::Edge, 3), (Role::Origin, 2)] {
        let links = lab.netns(role).ip(&["-o", "link", "show"]).unwrap();
        assert_eq!(links.lines().count(), count, "{links}");
    }
}

/// `ethtool -S` counter `name` of `ifname` in `ns`.
fn veth_stat(ns: &Netns, ifname: &str, name: &str) -> u64 {
    let out = ns.run("ethtool", &["-S", ifname]).unwrap();
    out.lines()
        .find_map(|l| {
            let (key, value) = l.trim().split_once(':')?;
            (key == name).then(|| value.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no {name} in ethtool -S {ifname}:\n{out}"))
}

#[test]
fn nic_like_links_hand_the_edge_xdp_frames() {
    if !require_root() {
        return;
    }
    assert!(Lab::with_links(Peers::SameHost, Links::NicLike).is_err());
    let lab = Lab::with_links(Peers::WireLike, Links::NicLike).unwrap();
    assert_eq!(lab.links(), Links::NicLike);
    let ifaces = lab.ifaces().clone();
    // The hosts' addresses are on their own ends of the wires.
    let addrs = lab
        .client()
        .ip(&["addr", "show", "dev", ifaces.client_host.as_str()])
        .unwrap();
    assert!(addrs.contains(&CLIENT_V4.to_string()), "{addrs}");
    let addrs = lab
        .origin()
        .ip(&["addr", "show", "dev", ifaces.origin_host.as_str()])
        .unwrap();
    assert!(addrs.contains(&ORIGIN_V6.to_string()), "{addrs}");
    // Every generator-side end runs a program in driver mode.
    let generator = lab.generator_ifaces();
    assert_eq!(generator.len(), 6);
    for (ns, ifname) in &generator {
        let show = ns.ip(&["link", "show", ifname.as_str()]).unwrap();
        assert!(show.contains("prog/xdp id"), "{show}");
        assert!(!show.contains("xdpgeneric"), "{show}");
    }
    // Frames redirected into `cl` reach the edge only with a program on `ec`.
    lab.attach_pass_stub(Role::Edge, &ifaces.edge_client)
        .unwrap();
    lab.attach_pass_stub(Role::Edge, &ifaces.edge_origin)
        .unwrap();
    let xmit = |ns: &Netns, ifname: &str| veth_stat(ns, ifname, "tx_queue_0_xdp_xmit");
    let (cl0, oe0) = (
        xmit(lab.client(), &ifaces.client),
        xmit(lab.origin(), &ifaces.origin),
    );
    lab.client().ping(ORIGIN_V4.into()).unwrap();
    lab.client().ping(ORIGIN_V6.into()).unwrap();
    let echo = tcp_echo(lab.origin(), SocketAddr::new(ORIGIN_V4.into(), 8080));
    tcp_roundtrip(
        lab.client(),
        SocketAddr::new(ORIGIN_V4.into(), 8080),
        1 << 20,
    );
    // Both directions crossed the wires as XDP frames sent into the edge's veths
    // (`ndo_xdp_xmit` of `cl` and `oe`), not as skbs of the hosts' stacks: well over
    // the 1 MiB's 700-odd segments each way.
    let (cl1, oe1) = (
        xmit(lab.client(), &ifaces.client),
        xmit(lab.origin(), &ifaces.origin),
    );
    assert!(cl1 - cl0 > 700, "cl sent {} XDP frames", cl1 - cl0);
    assert!(oe1 - oe0 > 700, "oe sent {} XDP frames", oe1 - oe0);
    drop(echo);
}

#[test]
fn sysctls_and_offloads() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    assert_eq!(lab.edge().read_sysctl("net.ipv4.ip_forward").unwrap(), "1");
    assert_eq!(
        lab.edge()
            .read_sysctl("net.ipv6.conf.all.forwarding")
            .unwrap(),
        "1"
    );
    for ns in [lab.client(), lab.origin()] {
        assert_eq!(ns.read_sysctl("net.ipv4.ip_forward").unwrap(), "0");
        assert_eq!(ns.read_sysctl("net.ipv6.conf.all.forwarding").unwrap(), "0");
    }
    let ifaces = lab.ifaces().clone();
    for (ns, ifname) in [
        (lab.client(), &ifaces.client),
        (lab.edge(), &ifaces.edge_client),
        (lab.edge(), &ifaces.edge_origin),
        (lab.origin(), &ifaces.origin),
    ] {
        assert_eq!(
            ns.read_sysctl(&format!("net.ipv6.conf.{ifname}.accept_dad"))
                .unwrap(),
            "0"
        );
        assert_eq!(
            ns.read_sysctl(&format!("net.ipv4.conf.{ifname}.rp_filter"))
                .unwrap(),
            "0"
        );
        let k = ns.run("ethtool", &["-k", ifname.as_str()]).unwrap();
        for feature in [
            "rx-checksumming: off",
            "tx-checksumming: off",
            "generic-receive-offload: off",
            "tcp-segmentation-offload: off",
        ] {
            assert!(k.contains(feature), "{ifname}: no {feature:?} in\n{k}");
        }
        // No tentative (DAD) addresses: usable at once.
        let addrs = ns
            .ip(&["-6", "addr", "show", "dev", ifname.as_str()])
            .unwrap();
        assert!(!addrs.contains("tentative"), "{addrs}");
    }
}

#[test]
fn children_are_killed_on_drop() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    // Refuses a command that would run in the host namespace.
    assert!(lab.client().spawn(Command::new("sleep")).is_err());
    assert!(
        lab.client()
            .spawn(lab.origin().cmd("sleep", &["1"]))
            .is_err()
    );

    let client_ino = std::fs::metadata(lab.client().path()).unwrap().ino();
    let child = lab
        .client()
        .spawn(lab.client().cmd("sleep", &["1000"]))
        .unwrap();
    let pid = child.id();
    // `ip netns exec` execs the program: the pid is `sleep` itself, in the namespace.
    std::thread::sleep(Duration::from_millis(100));
    let ns_ino = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .ino();
    assert_eq!(ns_ino, client_ino);
    drop(child);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());

    // A child still held when the lab goes away is killed by the lab.
    let mut held = lab
        .edge()
        .spawn(lab.edge().cmd("sleep", &["1000"]))
        .unwrap();
    let mut terminated = lab
        .origin()
        .spawn(lab.origin().cmd("sleep", &["1000"]))
        .unwrap();
    let status = terminated.terminate(Duration::from_secs(2)).unwrap();
    assert!(!status.success());
    drop(lab);
    let status = held.try_wait().unwrap().expect("child outlived the lab");
    assert!(!status.success());
}

#[test]
fn threads_enter_the_namespace() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let ifaces = lab.ifaces().clone();
    let index = |name: &str| {
        let c = std::ffi::CString::new(name).unwrap();
        unsafe { libc::if_nametoindex(c.as_ptr()) }
    };
    assert_eq!(
        index(&ifaces.edge_client),
        0,
        "edge veth visible in the host"
    );
    assert_ne!(lab.edge().run_in(|| index(&ifaces.edge_client)).unwrap(), 0);
    let edge_ino = std::fs::metadata(lab.edge().path()).unwrap().ino();
    let thread_ino = || std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
    assert_eq!(lab.edge().run_in(thread_ino).unwrap(), edge_ino);
    assert_ne!(thread_ino(), edge_ino);
    let handle = lab.edge().spawn_thread(thread_ino).unwrap();
    assert_eq!(handle.join().unwrap(), edge_ino);

    // Panics inside run_in reach the caller.
    let caught = std::panic::catch_unwind(|| lab.client().run_in(|| panic!("inner")));
    assert!(caught.is_err());

    // An async task can be stopped, or joined.
    let forever = lab
        .origin()
        .spawn_async(std::future::pending::<()>())
        .unwrap();
    assert!(!forever.is_finished());
    assert_eq!(forever.stop().unwrap(), None);
    let done = lab.origin().spawn_async(async { 42 }).unwrap();
    assert_eq!(done.join().unwrap(), 42);

    // output_ok reports stderr.
    let err = lab
        .client()
        .run("ip", &["link", "show", "nonexistent0"])
        .unwrap_err();
    assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
}

#[test]
fn cleanup_stale_removes_namespaces_of_dead_processes() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    // A pid that no longer exists.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    let stale = format!("fwd-{dead_pid}-0-edge");
    Command::new("ip")
        .args(["netns", "add", &stale])
        .output_ok()
        .unwrap();
    // A leftover process inside it, as after a crash.
    let mut leftover = Command::new("ip")
        .args(["netns", "exec", &stale, "sleep", "1000"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // Not a lab name: never touched.
    let foreign = format!("fwdx-{dead_pid}-0-edge");
    Command::new("ip")
        .args(["netns", "add", &foreign])
        .output_ok()
        .unwrap();

    cleanup_stale().unwrap();
    assert!(!ns_exists(&stale));
    assert!(ns_exists(&foreign));
    let status = leftover.wait().unwrap();
    assert!(!status.success());
    // Namespaces of this (live) process stay.
    for name in ns_names(&lab) {
        assert!(ns_exists(&name), "{name}");
    }
    lab.client().ping(ORIGIN_V4.into()).unwrap();
    Command::new("ip")
        .args(["netns", "del", &foreign])
        .output_ok()
        .unwrap();
}
