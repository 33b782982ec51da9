//! `forwarder run` as a process in the lab's `edge` namespace (SPEC §7): it attaches
//! XDP in driver mode to the lab veths, counts real traffic per interface, reloads on
//! SIGHUP, and on SIGTERM/SIGINT exits 0 leaving no XDP program, no sk_lookup link
//! and no control socket behind. A config naming a missing interface, an invalid
//! config, or an interface that cannot take XDP makes it exit non-zero with a message
//! that names the problem, and leaves nothing attached.
//!
//! Run as root after `cargo build -p forwarder`:
//! `cargo test -p forwarder-tests --test agent_lifecycle` (or `cargo xtask test`).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use forwarder_tests::agent::{
    AgentOptions, AgentProcess, app_ingress, drops, iface_packets, sk_lookup_links, udp_burst,
    xdp_attachment,
};
use forwarder_tests::{
    CLIENT_V4, EDGE_CLIENT_V4, EDGE_CLIENT_V6, EDGE_ORIGIN_V4, Lab, ORIGIN_V4, require_root,
};

/// Bound for counters to reach their expected value.
const COUNT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound for an agent that must refuse to start to exit.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(10);

fn config(lab: &Lab, apps: &str) -> String {
    config_with(lab, "", apps)
}

/// `[agent]` with both edge interfaces and `agent_extra` lines, then `apps`.
fn config_with(lab: &Lab, agent_extra: &str, apps: &str) -> String {
    let [ec, eo] = lab.edge_ifaces();
    format!("[agent]\ninterfaces = [\"{ec}\", \"{eo}\"]\n{agent_extra}\n{apps}")
}

const UDP_5000: &str = r#"
[[apps]]
protocol = "udp/5000"
origin_direct = ["udp://10.0.2.2:5000"]
"#;

const TCP_6000: &str = r#"
[[apps]]
protocol = "tcp/6000"
origin_direct = ["tcp://10.0.2.2:6000"]
"#;

const UDP_5001: &str = r#"
[[apps]]
protocol = "udp/5001"
origin_direct = ["udp://10.0.2.2:5001"]
"#;

fn v4(addr: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(addr), port)
}

/// Asserts that nothing of the agent is left in the lab: no XDP program on either
/// edge interface, no sk_lookup link in the edge namespace, no control socket, no
/// journal of host changes (`tests/tests/host_state.rs` checks what it lists).
#[track_caller]
fn assert_nothing_left(lab: &Lab, agent: &AgentProcess) {
    for ifname in lab.edge_ifaces() {
        let xdp = xdp_attachment(lab.edge(), ifname).expect("ip link show");
        assert_eq!(
            xdp, None,
            "{ifname}: XDP still attached after the agent exited"
        );
    }
    let links = sk_lookup_links(lab.edge()).expect("bpftool link show");
    assert!(
        links.is_empty(),
        "sk_lookup links left in the edge namespace: {links:?}"
    );
    assert!(
        !agent.control_path().exists(),
        "control socket {} left behind",
        agent.control_path().display()
    );
    assert!(
        !agent.journal_path().exists(),
        "journal of host changes {} left behind",
        agent.journal_path().display()
    );
}

/// A running agent with a TCP app has its sk_lookup program attached to the edge
/// namespace (so that its absence after exit means something).
#[track_caller]
fn assert_sk_lookup_attached(lab: &Lab) {
    let links = sk_lookup_links(lab.edge()).expect("bpftool link show");
    assert_eq!(
        links.len(),
        1,
        "one sk_lookup link in the edge namespace: {links:?}"
    );
}

/// Both edge interfaces carry the same program in driver mode.
#[track_caller]
fn assert_driver_mode(lab: &Lab) {
    let mut ids = Vec::new();
    for ifname in lab.edge_ifaces() {
        let xdp = xdp_attachment(lab.edge(), ifname)
            .expect("ip link show")
            .unwrap_or_else(|| panic!("{ifname}: no XDP program attached"));
        assert_eq!(
            xdp.mode, "xdp",
            "{ifname}: expected driver mode, got {xdp:?}"
        );
        ids.push(
            xdp.prog_id
                .unwrap_or_else(|| panic!("{ifname}: no prog id in {xdp:?}")),
        );
    }
    assert_eq!(ids[0], ids[1], "the same program on both interfaces");
}

#[test]
fn attaches_in_driver_mode_counts_traffic_and_detaches_on_sigterm() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    lab.attach_pass_stubs().unwrap();
    let mut agent =
        AgentProcess::start(&lab, &config(&lab, &format!("{UDP_5000}{TCP_6000}"))).unwrap();
    assert_driver_mode(&lab);
    assert_sk_lookup_attached(&lab);
    let [ec, eo] = lab.edge_ifaces();

    let before = agent.stats().unwrap();
    assert!(before.interfaces.contains_key(ec), "{before:#?}");
    assert!(before.interfaces.contains_key(eo), "{before:#?}");
    assert!(before.apps.contains_key("udp-5000"), "{before:#?}");

    // ICMP echo to the edge and through it to the origin: the edge answers, and
    // the origin's replies come in on `eo`.
    lab.client()
        .run(
            "ping",
            &["-n", "-c3", "-i0.05", "-W2", &EDGE_CLIENT_V4.to_string()],
        )
        .unwrap();
    lab.client()
        .run(
            "ping",
            &["-n", "-c3", "-i0.05", "-W2", &ORIGIN_V4.to_string()],
        )
        .unwrap();

    // Datagrams to a port no app claims: each one dropped as no_app, exactly.
    const N: u64 = 100;
    let payload = [0x5au8; 64];
    udp_burst(
        lab.client(),
        v4(CLIENT_V4, 0),
        v4(EDGE_CLIENT_V4, 5001),
        N as usize,
        &payload,
    )
    .unwrap();
    let no_app = agent
        .wait_counter(COUNT_TIMEOUT, drops(&before, "no_app") + N, |s| {
            drops(s, "no_app")
        })
        .unwrap()
        - drops(&before, "no_app");
    assert_eq!(no_app, N, "no_app drops for {N} datagrams to udp/5001");

    let after = agent.stats().unwrap();
    let ec_delta = iface_packets(&after, ec) - iface_packets(&before, ec);
    let eo_delta = iface_packets(&after, eo) - iface_packets(&before, eo);
    // 3 echo requests to the edge + 3 through it + N datagrams, at least (ARP and
    // neighbour discovery may add some).
    assert!(
        ec_delta >= N + 6,
        "{ec}: {ec_delta} packets seen, expected >= {}",
        N + 6
    );
    // The origin's 3 echo replies.
    assert!(
        eo_delta >= 3,
        "{eo}: {eo_delta} packets seen, expected >= 3"
    );
    let ec_bytes = after.interfaces[ec].bytes - before.interfaces[ec].bytes;
    let min_bytes = N * (14 + 20 + 8 + payload.len() as u64);
    assert!(
        ec_bytes >= min_bytes,
        "{ec}: {ec_bytes} bytes, expected >= {min_bytes}"
    );
    for reason in after.drops.keys().filter(|r| r.as_str() != "no_app") {
        assert_eq!(
            drops(&after, reason),
            drops(&before, reason),
            "no {reason} drops expected: {after:#?}"
        );
    }

    let status = agent.stop().unwrap();
    assert!(
        status.success(),
        "forwarder run exited with {status}\n{}",
        agent.logs()
    );
    assert_nothing_left(&lab, &agent);
    // The lab works without the agent, as before it started.
    lab.client().ping(IpAddr::V4(ORIGIN_V4)).unwrap();
}

#[test]
fn detaches_cleanly_on_sigint() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let mut agent =
        AgentProcess::start(&lab, &config(&lab, &format!("{UDP_5000}{TCP_6000}"))).unwrap();
    assert_driver_mode(&lab);
    assert_sk_lookup_attached(&lab);
    lab.client().ping(IpAddr::V4(EDGE_CLIENT_V4)).unwrap();
    let status = agent.stop_with(libc::SIGINT).unwrap();
    assert!(
        status.success(),
        "forwarder run exited with {status}\n{}",
        agent.logs()
    );
    assert_nothing_left(&lab, &agent);
}

#[test]
fn sighup_applies_a_new_config_and_keeps_the_old_one_on_error() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let mut agent = AgentProcess::start(&lab, &config(&lab, UDP_5000)).unwrap();
    let prog = xdp_attachment(lab.edge(), lab.edge_ifaces()[0]).unwrap();
    const N: u64 = 20;
    let to_5001 = || {
        udp_burst(
            lab.client(),
            v4(CLIENT_V4, 0),
            v4(EDGE_CLIENT_V4, 5001),
            N as usize,
            b"x",
        )
        .unwrap()
    };

    // Reload with udp/5001 added: its datagrams now belong to the app.
    agent
        .write_config(&config(&lab, &format!("{UDP_5000}{UDP_5001}")))
        .unwrap();
    agent.sighup();
    let before = agent
        .wait_stats(COUNT_TIMEOUT, |s| s.apps.contains_key("udp-5001"))
        .unwrap();
    to_5001();
    let ingress = agent
        .wait_counter(COUNT_TIMEOUT, app_ingress(&before, "udp-5001") + N, |s| {
            app_ingress(s, "udp-5001")
        })
        .unwrap();
    assert_eq!(ingress - app_ingress(&before, "udp-5001"), N);
    assert_eq!(
        drops(&agent.stats().unwrap(), "no_app"),
        drops(&before, "no_app"),
        "datagrams of a reloaded app are not dropped"
    );

    // An invalid config on reload: rejected, the agent keeps running the last good one.
    agent
        .write_config(&config(
            &lab,
            "[[apps]]\nprotocol = \"udp/5001\"\norigin_direct = [\"udp://10.0.2.2:5001\"]\nproxy_protocol = \"v1\"\n",
        ))
        .unwrap();
    agent.sighup();
    agent.wait_log("reload rejected", COUNT_TIMEOUT).unwrap();
    assert!(
        agent.is_running(),
        "an invalid reload must not stop the agent"
    );
    assert!(
        agent.stderr().contains("proxy_protocol"),
        "the rejection names the field\n{}",
        agent.logs()
    );
    let before = agent.stats().unwrap();
    assert!(before.apps.contains_key("udp-5000") && before.apps.contains_key("udp-5001"));
    // The reloads are counted (`forwarder_reloads_total`): one applied, one rejected.
    assert_eq!(
        (
            before.agent.reloads_applied,
            before.agent.reloads_rejected,
            before.agent.last_reload_successful
        ),
        (1, 1, false)
    );
    to_5001();
    let ingress = agent
        .wait_counter(COUNT_TIMEOUT, app_ingress(&before, "udp-5001") + N, |s| {
            app_ingress(s, "udp-5001")
        })
        .unwrap();
    assert_eq!(ingress - app_ingress(&before, "udp-5001"), N);
    // The same program stays attached through reloads.
    assert_eq!(
        xdp_attachment(lab.edge(), lab.edge_ifaces()[0]).unwrap(),
        prog
    );

    let status = agent.stop().unwrap();
    assert!(
        status.success(),
        "forwarder run exited with {status}\n{}",
        agent.logs()
    );
    assert_nothing_left(&lab, &agent);
}

/// Exit code of a config `run` refuses (sysexits `EX_CONFIG`), and of any other
/// failure to start.
const EX_CONFIG: i32 = 78;
const FAILURE: i32 = 1;

/// Spawns an agent that must refuse to start; returns its stderr after asserting the
/// exit code `code` and that nothing was left behind.
fn refused(lab: &Lab, config: &str, code: i32) -> String {
    let mut agent = AgentProcess::spawn(lab, config).unwrap();
    let status = agent.wait_exit(REFUSE_TIMEOUT).unwrap();
    assert_eq!(
        status.code(),
        Some(code),
        "forwarder run should fail with exit code {code}\n{}",
        agent.logs()
    );
    assert_nothing_left(lab, &agent);
    agent.stderr()
}

#[test]
fn refuses_a_missing_interface_naming_it() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let ec = lab.edge_ifaces()[0];
    let stderr = refused(
        &lab,
        &format!("[agent]\ninterfaces = [\"{ec}\", \"nosuch0\"]\n{UDP_5000}"),
        EX_CONFIG,
    );
    assert!(
        stderr.contains("interface 'nosuch0' does not exist"),
        "stderr:\n{stderr}"
    );
}

#[test]
fn refuses_an_invalid_config_naming_the_problem() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let stderr = refused(
        &lab,
        &config(
            &lab,
            "[[apps]]\nid = \"web\"\nprotocol = \"tcp/6000-6010\"\norigin_direct = [\"tcp://10.0.2.2:7000-7005\"]\n",
        ),
        EX_CONFIG,
    );
    assert!(
        stderr.contains("app 'web' (apps[0]): origin_direct:")
            && stderr.contains("has 6 port(s) but the app's edge range 6000-6010 has 11"),
        "stderr:\n{stderr}"
    );
    // (An edge address no interface carries is accepted with a warning since
    // anycast addresses: `an_anycast_edge_address_on_lo_is_served`.)
}

#[test]
fn a_failed_attach_leaves_nothing_attached() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let ec = lab.edge_ifaces()[0];
    // `ec` takes the program; loopback has no native XDP, so the second attach
    // fails after the first succeeded.
    let stderr = refused(
        &lab,
        &format!("[agent]\ninterfaces = [\"{ec}\", \"lo\"]\nxdp_mode = \"driver\"\n{UDP_5000}"),
        FAILURE,
    );
    assert!(
        stderr.contains("attaching XDP to lo in driver mode"),
        "stderr:\n{stderr}"
    );
    // The lab is unharmed.
    lab.client().ping(IpAddr::V4(EDGE_ORIGIN_V4)).unwrap();
    lab.client().ping(IpAddr::V6(EDGE_CLIENT_V6)).unwrap();
}

/// The kernel answers EINVAL, not ENOENT, when an empty sockmap slot is deleted;
/// `Datapath::clear_tcp_listener` must treat that as "already clear" (the TCP proxy
/// clears the slot of every non-TCP app at start and on reload, so otherwise no
/// config with a UDP app can start).
#[test]
fn clearing_an_empty_tcp_listener_slot_is_not_an_error() {
    if !require_root() {
        return;
    }
    let mut datapath = forwarder::datapath::Datapath::load().unwrap();
    // A freshly loaded object: every slot of TCP_LISTENERS is empty.
    datapath
        .clear_tcp_listener(0)
        .expect("clearing an empty listener slot");
}

/// Under systemd (`Type=notify`, `WatchdogSec=`): the agent says `READY=1` once it
/// serves, pings `WATCHDOG=1` at half `$WATCHDOG_USEC` while its agent thread
/// answers, brackets a reload with `RELOADING=1` … `READY=1`, and says `STOPPING=1`
/// on SIGTERM — all on the datagram socket of `$NOTIFY_SOCKET`.
#[test]
fn systemd_hears_ready_watchdog_reloading_and_stopping() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().expect("lab");
    let dir = std::env::temp_dir().join(format!("fwd-notify-{}-{}", std::process::id(), lab.id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let options = AgentOptions {
        env: vec![
            ("NOTIFY_SOCKET".into(), path.display().to_string()),
            ("WATCHDOG_USEC".into(), "400000".into()),
        ],
        ..AgentOptions::default()
    };
    let apps = "[[apps]]\nprotocol = \"udp/5000\"\norigin_direct = [\"udp://10.0.2.2:5000\"]\n";
    let mut agent =
        AgentProcess::start_with(&lab, &config(&lab, apps), &options).expect("agent starts");
    let mut heard: Vec<String> = Vec::new();
    let mut wait_for = |prefix: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 512];
        while std::time::Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                heard.push(message.clone());
                if message.starts_with(prefix) {
                    return message;
                }
            }
        }
        panic!("no {prefix} notification; heard {heard:?}");
    };
    let ready = wait_for("READY=1");
    assert!(ready.contains("STATUS=serving 1 apps"), "{ready}");
    wait_for("WATCHDOG=1");
    wait_for("WATCHDOG=1");
    agent.sighup();
    let reloading = wait_for("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let ready = wait_for("READY=1");
    assert!(ready.contains("last reload applied"), "{ready}");
    assert!(agent.stop().expect("stop").success());
    wait_for("STOPPING=1");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An anycast edge address (SPEC §5a): it lives on `lo` of the edge while XDP sits
/// on the veths, and the agent serves a UDP and a TCP app on it; an edge address on
/// no interface yet (a VRRP backup) is accepted with a warning.
#[test]
fn an_anycast_edge_address_on_lo_is_served() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().expect("lab");
    lab.attach_pass_stubs().expect("pass stubs");
    // On `lo` (this kernel has no dummy driver; a dummy works the same).
    lab.edge()
        .ip(&["addr", "add", "203.0.113.10/32", "dev", "lo"])
        .expect("the anycast address on lo");
    lab.client()
        .ip(&[
            "route",
            "add",
            "203.0.113.10/32",
            "via",
            &EDGE_CLIENT_V4.to_string(),
        ])
        .expect("the client's route to the anycast address");
    let _origin = forwarder_tests::spp_origin::UdpEchoOrigin::start_with(
        lab.origin(),
        SocketAddr::new(ORIGIN_V4.into(), 5000),
        false,
    )
    .expect("origin");
    // A TCP origin that greets and closes.
    let tcp_origin = lab
        .origin()
        .run_in(|| std::net::TcpListener::bind(SocketAddr::new(ORIGIN_V4.into(), 6000)))
        .expect("origin thread")
        .expect("origin listener");
    let greeter = std::thread::spawn(move || {
        use std::io::Write as _;
        if let Ok((mut s, _)) = tcp_origin.accept() {
            let _ = s.write_all(b"hello from the origin");
        }
    });
    let apps = format!(
        "[[apps]]\nprotocol = \"udp/5000\"\norigin_direct = [\"udp://10.0.2.2:5000\"]\n{TCP_6000}"
    );
    let config = config_with(
        &lab,
        "edge_addresses = [\"203.0.113.10\", \"203.0.113.99\"]\n",
        &apps,
    );
    let mut agent =
        AgentProcess::start(&lab, &config).expect("an anycast edge address is accepted");
    assert!(
        agent
            .logs()
            .contains("edge address 203.0.113.99 is on no interface of this host yet"),
        "the absent address is warned about:\n{}",
        agent.logs()
    );
    let sock = lab
        .client()
        .udp_socket(SocketAddr::new(CLIENT_V4.into(), 0), Duration::from_secs(2))
        .expect("client socket");
    let anycast: SocketAddr = "203.0.113.10:5000".parse().unwrap();
    let mut buf = [0u8; 64];
    let reply = (0..5).find_map(|_| {
        sock.send_to(b"anycast", anycast).ok()?;
        let (n, from) = sock.recv_from(&mut buf).ok()?;
        Some((buf[..n].to_vec(), from))
    });
    assert_eq!(
        reply,
        Some((b"anycast".to_vec(), anycast)),
        "served on the anycast address, answered from it\n{}",
        agent.logs()
    );
    // TCP too: the address is local (on lo), so sk_lookup steers it to the app.
    let greeting = lab
        .client()
        .run_in(|| -> std::io::Result<String> {
            use std::io::Read as _;
            let mut s = std::net::TcpStream::connect_timeout(
                &"203.0.113.10:6000".parse().unwrap(),
                Duration::from_secs(5),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        })
        .expect("client thread")
        .expect("a TCP connection to the anycast address");
    assert_eq!(greeting, "hello from the origin");
    greeter.join().expect("origin thread");
    assert!(agent.stop().expect("stop").success());
    lab.close().expect("lab teardown");
}
