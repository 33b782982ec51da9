//! `cargo xtask demo`: the forwarder at work in a throw-away lab (root).
//!
//! Builds the netns lab (client ↔ edge ↔ origin), runs the real `forwarder run` in
//! the edge namespace with `examples/demo.toml`, and shows, one step at a time:
//! UDP with Simple Proxy Protocol (the origin prints the client it decoded), HTTP
//! with PROXY v2 into nginx, an FTP passive download, a port scan dropped in XDP
//! (hping3), a blocked client and its `clientFiltered` summary, the `forwarder
//! stats` table and a few metrics; then a summary. It ends by itself in well under
//! a minute and leaves nothing behind, also on Ctrl-C (the current step is cut
//! short and the lab torn down; a second Ctrl-C removes the namespaces at once).
//!
//! Exit status: 0 when every step worked, 1 when one failed, 130 when interrupted.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use forwarder_tests::agent::{AgentProcess, forwarder_bin};
use forwarder_tests::demo_main::{interrupted, is_interrupted};
use forwarder_tests::{Lab, Netns, OutputOk as _};

const DEMO_CONFIG: &str = include_str!("../../../examples/demo.toml");
const METRICS: &str = "127.0.0.1:9477";
const EDGE: &str = "10.0.1.1";
const BLOCKED_CLIENT: &str = "10.0.1.200";
const SCAN_PORTS: u16 = 300;

/// Polls `check` until it returns `Some`, for at most `timeout`.
fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let end = Instant::now() + timeout;
    loop {
        interrupted()?;
        if let Some(v) = check()? {
            return Ok(v);
        }
        if Instant::now() >= end {
            bail!("gave up after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn step(n: usize, title: &str) {
    println!("\n\x1b[1m[{n}/6] {title}\x1b[0m");
}

fn say(line: impl AsRef<str>) {
    println!("      {}", line.as_ref());
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("forwarder-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A UDP origin that understands Simple Proxy Protocol: it answers every datagram
/// with the same header and "origin saw client <addr>: <payload>".
fn spp_origin(ns: &Netns) -> Result<()> {
    let socket = ns.run_in(|| UdpSocket::bind("10.0.2.2:5000"))??;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !is_interrupted() {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            let Some(header) = forwarder::wire::spp::Header::new_checked(&buf[..n])
                .ok()
                .filter(|h| h.magic() == forwarder_common::SPP_MAGIC)
            else {
                continue;
            };
            let client = SocketAddr::new(
                header
                    .client_addr()
                    .to_ipv4_mapped()
                    .map_or(header.client_addr().into(), Into::into),
                header.client_port(),
            );
            let text = format!(
                "origin saw client {client}: {}",
                String::from_utf8_lossy(header.payload())
            );
            let mut reply = buf[..forwarder_common::SPP_HEADER_LEN].to_vec();
            reply.extend_from_slice(text.as_bytes());
            let _ = socket.send_to(&reply, from);
        }
    });
    Ok(())
}

fn start_nginx(lab: &Lab, dir: &Path) -> Result<forwarder_tests::NsChild> {
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(&prefix)?;
    let d = prefix.display();
    let conf = format!(
        "pid {d}/nginx.pid;\nerror_log {d}/error.log;\nworker_processes 1;\nuser root;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           server {{\n    listen 10.0.2.2:8080 proxy_protocol;\n    location / {{\n\
               return 200 \"nginx: hello $proxy_protocol_addr:$proxy_protocol_port (from the PROXY v2 header; the TCP peer was $remote_addr)\\n\";\n\
             }}\n  }}\n}}\n"
    );
    std::fs::write(format!("{d}/nginx.conf"), conf)?;
    lab.origin()
        .spawn(lab.origin().nginx(&prefix))
        .context("starting nginx")
}

fn start_vsftpd(lab: &Lab, dir: &Path) -> Result<forwarder_tests::NsChild> {
    let root = dir.join("ftp");
    let empty = dir.join("ftp-empty");
    std::fs::create_dir_all(&root)?;
    std::fs::create_dir_all(&empty)?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
    let file: Vec<u8> = (0..2 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(root.join("demo.bin"), &file)?;
    let conf = format!(
        "listen=YES\nlisten_ipv6=NO\nlisten_address=10.0.2.2\nlisten_port=21\nbackground=NO\n\
         anonymous_enable=YES\nlocal_enable=NO\nno_anon_password=YES\nanon_root={root}\n\
         ftp_username=ftp\nwrite_enable=NO\n\
         pasv_enable=YES\npasv_min_port=20000\npasv_max_port=20020\npasv_address={EDGE}\n\
         port_enable=NO\nconnect_from_port_20=NO\nseccomp_sandbox=NO\n\
         secure_chroot_dir={empty}\nxferlog_enable=NO\nsyslog_enable=NO\n",
        root = root.display(),
        empty = empty.display(),
    );
    let path = dir.join("vsftpd.conf");
    std::fs::write(&path, conf)?;
    let mut cmd = lab
        .origin()
        .cmd("vsftpd", &[path.to_str().context("temp path")?]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    lab.origin().spawn(cmd).context("starting vsftpd")
}

/// Waits until something listens on `addr` in the origin namespace.
fn wait_listening(lab: &Lab, addr: &str) -> Result<()> {
    let addr: SocketAddr = addr.parse()?;
    wait_for(Duration::from_secs(5), || {
        Ok(lab
            .origin()
            .run_in(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)))?
            .ok()
            .map(drop))
    })
    .with_context(|| format!("nothing listens on {addr} in the origin namespace"))
}

fn scrape(lab: &Lab) -> Result<String> {
    let mut stream = lab.edge().run_in(|| TcpStream::connect(METRICS))??;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: forwarder\r\nConnection: close\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

fn curl(ns: &Netns, args: &[&str]) -> Result<String> {
    interrupted()?;
    let mut all = vec!["-sS", "--max-time", "10"];
    all.extend_from_slice(args);
    ns.cmd("curl", &all).output_ok()
}

fn drops(agent: &AgentProcess, reason: &str) -> Result<u64> {
    Ok(forwarder_tests::agent::drops(&agent.stats()?, reason))
}

/// One line of the summary per step.
struct Outcome {
    name: &'static str,
    result: Result<String>,
}

fn run_steps(lab: &Lab, agent: &AgentProcess, dir: &Path) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    let mut record = |name: &'static str, result: Result<String>| {
        match &result {
            Ok(line) => say(format!("\x1b[32mok\x1b[0m: {line}")),
            Err(e) => say(format!("\x1b[31mfailed\x1b[0m: {e:#}")),
        }
        outcomes.push(Outcome { name, result });
        !is_interrupted()
    };

    step(
        1,
        "UDP with Simple Proxy Protocol (app udp-echo, udp/5000, all in XDP)",
    );
    let udp = (|| -> Result<String> {
        let socket = lab.client().run_in(|| UdpSocket::bind("10.0.1.2:0"))??;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        say(format!(
            "client {} sends \"hello\" to {EDGE}:5000",
            socket.local_addr()?
        ));
        let mut buf = [0u8; 2048];
        for _ in 0..3 {
            interrupted()?;
            socket.send_to(b"hello", format!("{EDGE}:5000"))?;
            if let Ok(n) = socket.recv(&mut buf) {
                let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
                say(format!("reply: {reply}"));
                let expected = format!("origin saw client {}", socket.local_addr()?);
                if !reply.starts_with(&expected) {
                    bail!("the origin decoded another client: {reply}");
                }
                return Ok(format!(
                    "UDP + Simple Proxy Protocol: the origin saw the real client {}",
                    socket.local_addr()?
                ));
            }
        }
        bail!("no reply from the UDP app")
    })();
    if !record("udp-spp", udp) {
        return outcomes;
    }

    step(
        2,
        "TCP with PROXY v2 into nginx (app web, tcp/80 -> 10.0.2.2:8080)",
    );
    let web = (|| -> Result<String> {
        say(format!("$ curl http://{EDGE}/   (in the client namespace)"));
        let body = curl(lab.client(), &[&format!("http://{EDGE}/")])?;
        say(body.trim_end());
        if !body.contains("hello 10.0.1.2:") {
            bail!("nginx did not see the client's address: {body}");
        }
        Ok("TCP + PROXY v2: nginx saw the real client 10.0.1.2".to_string())
    })();
    if !record("tcp-proxy-v2", web) {
        return outcomes;
    }

    step(
        3,
        "FTP passive download (apps ftp tcp/21 + ftp-data tcp/20000-20020)",
    );
    let ftp = (|| -> Result<String> {
        let out = dir.join("downloaded.bin");
        say(format!(
            "$ curl --disable-epsv ftp://{EDGE}/demo.bin   (PASV: vsftpd announces {EDGE})"
        ));
        curl(
            lab.client(),
            &[
                "--disable-epsv",
                "--no-ftp-skip-pasv-ip",
                "-o",
                out.to_str().context("temp path")?,
                &format!("ftp://{EDGE}/demo.bin"),
            ],
        )?;
        let got = std::fs::read(&out)?;
        let want = std::fs::read(dir.join("ftp/demo.bin"))?;
        if got != want {
            bail!(
                "the file arrived damaged ({} of {} bytes)",
                got.len(),
                want.len()
            );
        }
        Ok(format!(
            "FTP passive: {} bytes downloaded intact",
            got.len()
        ))
    })();
    if !record("ftp-passive", ftp) {
        return outcomes;
    }

    step(4, "A port scan, dropped in XDP before the kernel sees it");
    let scan = (|| -> Result<String> {
        let before = drops(agent, "no_app")?;
        say(format!(
            "$ hping3 -S -p ++1000 -c {SCAN_PORTS} -i u1000 {EDGE}   (SYNs to ports 1000-{})",
            1000 + SCAN_PORTS - 1
        ));
        interrupted()?;
        let _ = lab
            .client()
            .cmd(
                "hping3",
                &[
                    "-q",
                    "-S",
                    "-p",
                    "++1000",
                    "-c",
                    &SCAN_PORTS.to_string(),
                    "-i",
                    "u1000",
                    EDGE,
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running hping3")?;
        let dropped = wait_for(Duration::from_secs(3), || {
            let d = drops(agent, "no_app")? - before;
            Ok((d >= u64::from(SCAN_PORTS)).then_some(d))
        })
        .context("the scan's SYNs were not all dropped")?;
        say(format!(
            "forwarder_dropped_packets_total{{reason=\"no_app\"}} grew by {dropped}; no SYN-ACK, no RST went back"
        ));
        Ok(format!(
            "port scan: {SCAN_PORTS} SYNs to {SCAN_PORTS} ports, {dropped} dropped (no_app)"
        ))
    })();
    if !record("port-scan", scan) {
        return outcomes;
    }

    step(
        5,
        "A blocked client (10.0.1.200 is in the blocked 10.0.1.128/25)",
    );
    let blocked = (|| -> Result<String> {
        let before = drops(agent, "firewall")?;
        say(format!(
            "$ curl --interface {BLOCKED_CLIENT} --max-time 2 http://{EDGE}/"
        ));
        interrupted()?;
        let status = lab
            .client()
            .cmd(
                "curl",
                &[
                    "-sS",
                    "--interface",
                    BLOCKED_CLIENT,
                    "--max-time",
                    "2",
                    &format!("http://{EDGE}/"),
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if status.success() {
            bail!("the blocked client got an answer");
        }
        let dropped = drops(agent, "firewall")? - before;
        say(format!(
            "curl gave up ({status}); {dropped} SYNs dropped (reason firewall)"
        ));
        say("waiting for the rate-limited clientFiltered summary (one line, every 5 s at most)...");
        let line = wait_for(Duration::from_secs(8), || {
            Ok(agent
                .stdout()
                .lines()
                .find(|l| l.contains("\"clientFiltered\""))
                .map(str::to_owned))
        })
        .context("no clientFiltered event")?;
        say(format!("event: {line}"));
        if dropped == 0 {
            bail!("nothing was dropped");
        }
        Ok(format!(
            "blocked client: {dropped} packets dropped (firewall), one clientFiltered event"
        ))
    })();
    if !record("blocked-client", blocked) {
        return outcomes;
    }

    step(6, "forwarder stats and /metrics");
    let stats = (|| -> Result<String> {
        let bin = forwarder_bin()?;
        let control = agent.control_path().as_os_str().to_owned();
        let mut args: Vec<std::ffi::OsString> = vec![
            bin.into_os_string(),
            "stats".into(),
            "--control".into(),
            control,
        ];
        if std::io::stdout().is_terminal() {
            say("$ forwarder stats --watch   (3 seconds)");
            args.insert(0, "3".into());
            args.push("--watch".into());
            lab.edge().cmd("timeout", &args).status()?;
        } else {
            say("$ forwarder stats");
            let table = lab.edge().cmd(&args[0], &args[1..]).output_ok()?;
            for line in table.lines() {
                say(line);
            }
        }
        let metrics = scrape(lab)?;
        say(format!(
            "$ curl http://{METRICS}/metrics   (in the edge namespace; excerpt)"
        ));
        let mut shown = 0;
        for line in metrics.lines().filter(|l| {
            (l.starts_with("forwarder_dropped_packets_total") && !l.ends_with(" 0"))
                || l.starts_with("forwarder_app_packets_total")
                || l.starts_with("forwarder_connections_total")
                || l.starts_with("forwarder_firewall_rule_hits_total")
        }) {
            say(line);
            shown += 1;
        }
        if shown == 0 {
            bail!("the metrics endpoint shows no forwarder figures");
        }
        Ok("stats table and metrics shown".to_string())
    })();
    record("stats", stats);
    outcomes
}

fn demo() -> Result<bool> {
    let started = Instant::now();
    if let Err(e) = forwarder_tests::cleanup_stale() {
        eprintln!("demo: removing stale lab namespaces: {e:#}");
    }
    println!(
        "\x1b[1mforwarder demo\x1b[0m: building the lab (client <-> edge <-> origin namespaces)"
    );
    let lab = Lab::new()?;
    lab.attach_pass_stubs()?;
    lab.add_client_address(&format!("{BLOCKED_CLIENT}/24"))?;
    let dir = TempDir::new()?;
    let [ec, eo] = lab.edge_ifaces();
    let config = DEMO_CONFIG
        .replace("veth-edge-c", ec)
        .replace("veth-edge-o", eo);

    say("origin: SPP echo on udp/5000, nginx (PROXY v2) on tcp/8080, vsftpd on tcp/21");
    spp_origin(lab.origin())?;
    let _nginx = start_nginx(&lab, &dir.0)?;
    let _vsftpd = start_vsftpd(&lab, &dir.0)?;
    wait_listening(&lab, "10.0.2.2:8080")?;
    wait_listening(&lab, "10.0.2.2:21")?;
    interrupted()?;

    say("edge: forwarder run --config examples/demo.toml (interfaces renamed for this lab)");
    let mut agent = AgentProcess::start(&lab, &config)?;
    for line in agent
        .stderr()
        .lines()
        .filter(|l| l.contains("XDP attached"))
    {
        say(line);
    }
    println!("agent running (pid {})", agent.pid());

    let outcomes = run_steps(&lab, &agent, &dir.0);

    let status = agent.stop()?;
    say(format!(
        "agent stopped ({status}); XDP and sk_lookup detached"
    ));
    drop(agent);
    lab.close()?;
    say("lab removed");

    println!("\n\x1b[1mdemo summary\x1b[0m");
    let mut passed = 0;
    for o in &outcomes {
        match &o.result {
            Ok(line) => {
                passed += 1;
                println!("  [ok] {line}");
            }
            Err(e) => println!("  [FAIL] {}: {e:#}", o.name),
        }
    }
    interrupted()?;
    println!(
        "demo: {passed}/6 steps passed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(passed == 6 && outcomes.len() == 6)
}

fn main() -> ExitCode {
    forwarder_tests::demo_main::main("demo", demo)
}
