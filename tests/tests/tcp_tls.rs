//! Edge TLS termination (Spectrum's `tls` modes) with real clients and origins:
//! `openssl s_client` and `curl` in `client`; nginx (stream and http, plain and
//! TLS) or small Rust servers in `origin`. Test certificates are made at test
//! time with `openssl` (`forwarder::tls::test_pki`).
//!
//! Root, after `cargo build -p forwarder`:
//! `cargo test -p forwarder-tests --test tcp_tls`.

mod tcp_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forwarder::config::CertificateFiles;
use forwarder::tls::test_pki::TestPki;
use forwarder_tests::agent::AgentProcess;
use forwarder_tests::{CLIENT_V4, EDGE_CLIENT_V4, Lab, ORIGIN_V4, require_root};
use tcp_support::*;

const WAIT: Duration = Duration::from_secs(10);

/// The names the edge's certificate carries.
const WEB: &str = "web.example";

/// A CA, the edge's certificate for `web.example` (and the edge address) and
/// the origin's for `origin.example` (and its address), both signed by the CA.
struct Pki {
    pki: TestPki,
    ca: CertificateFiles,
    web: CertificateFiles,
    origin: CertificateFiles,
}

fn pki(tag: &str) -> Pki {
    let pki = TestPki::new(tag);
    let ca = pki.ca("ca");
    let web = pki.leaf("web", &[WEB, "10.0.1.1"], Some(&ca));
    let origin = pki.leaf("origin", &["origin.example", "10.0.2.2"], Some(&ca));
    Pki {
        pki,
        ca,
        web,
        origin,
    }
}

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// `tls_certificates` with one entry.
fn certificates(files: &[&CertificateFiles]) -> String {
    let entries: Vec<String> = files
        .iter()
        .map(|f| {
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                path(&f.cert),
                path(&f.key)
            )
        })
        .collect();
    format!("tls_certificates = [{}]\n", entries.join(", "))
}

/// A TCP app `id` on edge port `port` to `origin_port` on the origin.
fn tls_app(id: &str, (port, origin_port): (u16, u16), mode: &str, extra: &str) -> String {
    format!(
        "[[apps]]\nid = \"{id}\"\nprotocol = \"tcp/{port}\"\norigin_direct = [\"tcp://10.0.2.2:{origin_port}\"]\n\
         tls = \"{mode}\"\n{extra}\n"
    )
}

/// nginx in `origin` with `body` (stream and http blocks); stopped with the lab.
fn start_nginx(
    lab: &Lab,
    dir: &TempDir,
    body: &str,
    ports: &[u16],
) -> forwarder_tests::lab::NsChild {
    let d = dir.path().display();
    let conf = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         pid {d}/nginx.pid;\nerror_log {d}/error.log info;\nworker_processes 1;\n\
         events {{ worker_connections 64; }}\n{body}\n"
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let child = lab.origin().spawn(lab.origin().nginx(dir.path())).unwrap();
    for port in ports {
        wait_listening(lab, SocketAddr::new(ORIGIN_V4.into(), *port), WAIT);
    }
    child
}

/// What `openssl s_client` printed and whether it succeeded.
struct SClient {
    stdout: String,
    stderr: String,
    ok: bool,
}

/// `openssl s_client` from `client` to the edge's `port` with `args`, killed after
/// `seconds`; stdin and stdout piped.
fn spawn_s_client(lab: &Lab, port: u16, seconds: &str, args: &[&str], stderr: Stdio) -> Child {
    let connect = format!("{EDGE_CLIENT_V4}:{port}");
    let mut all = vec![seconds, "openssl", "s_client", "-connect", &connect];
    all.extend_from_slice(args);
    lab.client()
        .cmd("timeout", &all)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("running openssl s_client")
}

/// `openssl s_client` from `client` to the edge's `port`, sending `input` and
/// reading until the server closes.
fn s_client(lab: &Lab, port: u16, args: &[&str], input: &[u8]) -> SClient {
    let mut all = vec!["-ign_eof"];
    all.extend_from_slice(args);
    let mut child = spawn_s_client(lab, port, "20", &all, Stdio::piped());
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    SClient {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        ok: out.status.success(),
    }
}

/// `s_client` for `web.example`, the certificate verified against `ca`; must succeed.
fn s_client_verified(lab: &Lab, agent: &AgentProcess, port: u16, ca: &str) -> SClient {
    let out = s_client(
        lab,
        port,
        &["-servername", WEB, "-CAfile", ca, "-verify_return_error"],
        b"",
    );
    assert!(out.ok, "s_client: {}\n{}", out.stderr, agent.logs());
    out
}

/// `curl` from `client`; stdout, or the error with stderr.
fn curl(lab: &Lab, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["-sS", "--max-time", "20"];
    all.extend_from_slice(args);
    let out = lab.client().cmd("curl", &all).output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `--resolve` making `web.example:PORT` the edge address.
fn resolve(port: u16) -> String {
    format!("{WEB}:{port}:{EDGE_CLIENT_V4}")
}

/// The TLS counters of app `app` once `done` holds for them.
fn wait_tls(
    agent: &AgentProcess,
    app: &str,
    done: impl Fn(&forwarder::telemetry::analytics::TlsStats) -> bool,
) -> forwarder::telemetry::analytics::TlsStats {
    let stats = agent
        .wait_stats(WAIT, |s| {
            s.connections
                .get(app)
                .and_then(|c| c.tls.as_ref())
                .is_some_and(&done)
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.logs()));
    stats.connections[app].tls.clone().unwrap()
}

#[test]
fn flexible_terminates_for_openssl_and_curl_in_front_of_plain_nginx() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let pki = pki("flexible");
    let dir = TempDir::new("tls-flexible");
    let _nginx = start_nginx(
        &lab,
        &dir,
        "stream { server { listen 10.0.2.2:7301; return \"stream-origin\\n\"; } }\n\
         http { access_log off; server { listen 10.0.2.2:7302; location / { return 200 \"http-origin\\n\"; } } }",
        &[7301, 7302],
    );
    let apps = format!(
        "{}{}{}",
        tls_app(
            "stream",
            (7301, 7301),
            "flexible",
            &certificates(&[&pki.web])
        ),
        tls_app("http", (7302, 7302), "flexible", &certificates(&[&pki.web])),
        // The same origin, TLS 1.3 only.
        tls_app(
            "modern",
            (7303, 7302),
            "flexible",
            &format!("{}min_tls_version = \"1.3\"\n", certificates(&[&pki.web]))
        ),
    );
    let agent = start_agent(&lab, &apps);
    let ca = path(&pki.ca.cert);

    // openssl: verified against the CA, for the name the certificate carries.
    let out = s_client_verified(&lab, &agent, 7301, &ca);
    assert!(out.stdout.contains("stream-origin"), "{}", out.stdout);
    assert!(
        out.stdout.contains("Verify return code: 0 (ok)"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("TLSv1.3"), "{}", out.stdout);

    // curl over TLS 1.3 and 1.2, HTTP through to the plain origin.
    let url = format!("https://{WEB}:7302/");
    let r = resolve(7302);
    for version in [&["--tlsv1.3"][..], &["--tlsv1.2", "--tls-max", "1.2"][..]] {
        let mut args = vec!["--cacert", &ca, "--resolve", &r];
        args.extend_from_slice(version);
        args.push(&url);
        assert_eq!(
            curl(&lab, &args).unwrap_or_else(|e| panic!("curl {version:?}: {e}\n{}", agent.logs())),
            "http-origin\n"
        );
    }
    // A TLS 1.2 client of a TLS 1.3-only app: refused, counted.
    let modern = format!("https://{WEB}:7303/");
    let r3 = resolve(7303);
    let refused = curl(
        &lab,
        &[
            "--cacert",
            &ca,
            "--resolve",
            &r3,
            "--tlsv1.2",
            "--tls-max",
            "1.2",
            &modern,
        ],
    );
    assert!(
        refused.is_err(),
        "a TLS 1.2 client got through: {refused:?}"
    );
    assert_eq!(
        curl(&lab, &["--cacert", &ca, "--resolve", &r3, &modern]).unwrap(),
        "http-origin\n"
    );

    // Events: the connect carries the TLS version and SNI, the disconnect is normal.
    let evs = wait_events(&agent, "stream", WAIT, |e| {
        e.iter().any(|e| e.event() == "disconnect")
    });
    let connect = evs.iter().find(|e| e.event() == "connect").unwrap();
    assert_eq!(connect.str("TlsVersion"), Some("TLSv1.3"));
    assert_eq!(connect.str("SNI"), Some(WEB));
    let disconnect = evs.iter().find(|e| e.event() == "disconnect").unwrap();
    assert_eq!(disconnect.status(), 200);
    assert_eq!(
        disconnect.num("OriginBytes"),
        Some(14),
        "\"stream-origin\\n\""
    );
    let http = wait_events(&agent, "http", WAIT, |e| {
        e.iter().filter(|e| e.event() == "connect").count() == 2
    });
    let versions: Vec<&str> = http
        .iter()
        .filter(|e| e.event() == "connect")
        .filter_map(|e| e.str("TlsVersion"))
        .collect();
    assert!(
        versions.contains(&"TLSv1.2") && versions.contains(&"TLSv1.3"),
        "{versions:?}"
    );
    let modern = wait_events(&agent, "modern", WAIT, |e| {
        e.iter().any(|e| e.str("TlsError").is_some())
    });
    let failed = modern.iter().find(|e| e.str("TlsError").is_some()).unwrap();
    assert_eq!(failed.str("TlsError"), Some("protocol_version"));
    assert_eq!(failed.status(), 495);
    let tls = wait_tls(&agent, "modern", |t| {
        t.failures.get("protocol_version") == Some(&1) && t.handshakes.get("TLSv1.3") == Some(&1)
    });
    assert_eq!(tls.handshake_times.count, 1);
}

#[test]
fn full_accepts_a_self_signed_origin_and_passes_alpn_through() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let pki = pki("full");
    let self_signed = pki.pki.leaf("self", &["nobody.invalid"], None);
    let dir = TempDir::new("tls-full");
    let (c, k) = (path(&self_signed.cert), path(&self_signed.key));
    let _nginx = start_nginx(
        &lab,
        &dir,
        &format!(
            "stream {{ server {{ listen 10.0.2.2:7311 ssl; ssl_certificate {c}; ssl_certificate_key {k}; return \"full-origin\\n\"; }} }}\n\
             http {{ access_log off; server {{ listen 10.0.2.2:7312 ssl http2; ssl_certificate {c}; ssl_certificate_key {k}; \
             location / {{ return 200 \"$server_protocol\\n\"; }} }} }}"
        ),
        &[7311, 7312],
    );
    let apps = format!(
        "{}{}",
        tls_app("stream", (7311, 7311), "full", &certificates(&[&pki.web])),
        tls_app("http", (7312, 7312), "full", &certificates(&[&pki.web])),
    );
    let agent = start_agent(&lab, &apps);
    let ca = path(&pki.ca.cert);
    let out = s_client_verified(&lab, &agent, 7311, &ca);
    assert!(out.stdout.contains("full-origin"), "{}", out.stdout);

    // ALPN: the client's offer goes to the origin; the origin's choice comes back.
    let url = format!("https://{WEB}:7312/");
    let r = resolve(7312);
    let h2 = curl(&lab, &["--cacert", &ca, "--resolve", &r, "--http2", &url]);
    assert_eq!(h2.as_deref(), Ok("HTTP/2.0\n"), "{}", agent.logs());
    let h1 = curl(&lab, &["--cacert", &ca, "--resolve", &r, "--http1.1", &url]);
    assert_eq!(h1.as_deref(), Ok("HTTP/1.1\n"));
    let evs = wait_events(&agent, "http", WAIT, |e| {
        e.iter().filter(|e| e.event() == "disconnect").count() == 2
    });
    let alpn: Vec<&str> = evs
        .iter()
        .filter(|e| e.event() == "connect")
        .filter_map(|e| e.str("ALPN"))
        .collect();
    assert_eq!(alpn, ["h2", "http/1.1"]);
}

#[test]
fn strict_validates_the_origin_certificate() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let pki = pki("strict");
    let other_ca = pki.pki.ca("other-ca");
    let dir = TempDir::new("tls-strict");
    let (c, k) = (path(&pki.origin.cert), path(&pki.origin.key));
    let _nginx = start_nginx(
        &lab,
        &dir,
        &format!(
            "stream {{ server {{ listen 10.0.2.2:7321 ssl; ssl_certificate {c}; ssl_certificate_key {k}; return \"strict-origin\\n\"; }} }}\n\
             http {{ access_log off; server {{ listen 10.0.2.2:7323 ssl; ssl_certificate {c}; ssl_certificate_key {k}; \
             location / {{ return 200 \"strict-http\\n\"; }} }} }}"
        ),
        &[7321, 7323],
    );
    let web = certificates(&[&pki.web]);
    let good = format!(
        "{web}tls_origin_ca = \"{}\"\ntls_origin_server_name = \"origin.example\"\n",
        path(&pki.ca.cert)
    );
    let wrong = format!("{web}tls_origin_ca = \"{}\"\n", path(&other_ca.cert));
    let apps = format!(
        "{}{}{}",
        tls_app("good", (7321, 7321), "strict", &good),
        tls_app("wrong", (7322, 7321), "strict", &wrong),
        tls_app("http", (7323, 7323), "strict", &good),
    );
    let agent = start_agent(&lab, &apps);
    let ca = path(&pki.ca.cert);
    let args = ["-servername", WEB, "-CAfile", &ca];
    let out = s_client(&lab, 7321, &args, b"");
    assert!(
        out.stdout.contains("strict-origin"),
        "{}\n{}",
        out.stdout,
        agent.logs()
    );
    // curl, HTTP through both TLS legs.
    let r = resolve(7323);
    let url = format!("https://{WEB}:7323/");
    assert_eq!(
        curl(&lab, &["--cacert", &ca, "--resolve", &r, &url]).as_deref(),
        Ok("strict-http\n"),
        "{}",
        agent.logs()
    );

    // A CA that did not sign the origin's certificate: refused, 526.
    let out = s_client(&lab, 7322, &args, b"");
    assert!(!out.stdout.contains("strict-origin"), "{}", out.stdout);
    let evs = wait_events(&agent, "wrong", WAIT, |e| {
        e.iter().any(|e| e.event() == "originError")
    });
    let error = evs.iter().find(|e| e.event() == "originError").unwrap();
    assert_eq!(error.status(), 526);
    assert_eq!(error.str("TlsError"), Some("origin_bad_certificate"));
    assert_eq!(
        error.origin(),
        Some(SocketAddr::new(ORIGIN_V4.into(), 7321))
    );
    assert!(
        !evs.iter().any(|e| e.event() == "connect"),
        "no connect for a refused origin: {evs:#?}"
    );
    wait_tls(&agent, "wrong", |t| {
        t.failures.get("origin_bad_certificate") == Some(&1)
    });
    let good = wait_events(&agent, "good", WAIT, |e| {
        e.iter().any(|e| e.event() == "disconnect")
    });
    assert!(good.iter().all(|e| e.event() != "originError"), "{good:#?}");
}

#[test]
fn sni_picks_the_certificate_and_strict_sni_refuses_unknown_names() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let pki = pki("sni");
    let a = pki.pki.leaf("a", &["a.example"], Some(&pki.ca));
    let b = pki.pki.leaf("b", &["*.b.example"], Some(&pki.ca));
    let origin = origin_listener(&lab, SocketAddr::new(ORIGIN_V4.into(), 7331));
    serve(origin, |mut s: TcpStream| {
        let _ = s.write_all(b"sni-origin\n");
    });
    let both = certificates(&[&a, &b]);
    let apps = format!(
        "{}{}",
        tls_app("sni", (7331, 7331), "flexible", &both),
        tls_app(
            "strict",
            (7332, 7331),
            "flexible",
            &format!("{both}tls_strict_sni = true\n")
        ),
    );
    let agent = start_agent(&lab, &apps);
    let ca = path(&pki.ca.cert);
    let subject = |port: u16, sni: Option<&str>| -> String {
        let mut args = vec!["-CAfile", &ca];
        match sni {
            Some(name) => args.extend(["-servername", name]),
            None => args.push("-noservername"),
        }
        let out = s_client(&lab, port, &args, b"");
        out.stdout
            .lines()
            .find(|l| l.starts_with("subject="))
            .unwrap_or_else(|| panic!("no certificate: {}\n{}", out.stdout, out.stderr))
            .to_string()
    };
    assert!(subject(7331, Some("a.example")).contains("a.example"));
    assert!(subject(7331, Some("www.b.example")).contains("*.b.example"));
    assert!(
        subject(7331, None).contains("a.example"),
        "no SNI: the first"
    );
    assert!(
        subject(7331, Some("c.example")).contains("a.example"),
        "unknown: the first"
    );
    assert!(subject(7332, Some("www.b.example")).contains("*.b.example"));
    let out = s_client(
        &lab,
        7332,
        &["-CAfile", &ca, "-servername", "c.example"],
        b"",
    );
    assert!(!out.stdout.contains("subject="), "{}", out.stdout);
    let evs = wait_events(&agent, "strict", WAIT, |e| {
        e.iter().any(|e| e.str("TlsError").is_some())
    });
    let refused = evs.iter().find(|e| e.str("TlsError").is_some()).unwrap();
    assert_eq!(refused.str("TlsError"), Some("no_sni_match"));
    assert_eq!(refused.str("SNI"), Some("c.example"));
    assert_eq!(refused.status(), 495);
    assert_eq!(refused.origin(), None, "no origin was contacted");
}

/// An `openssl s_client` left running: its output collected as it comes.
struct OpenClient {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl OpenClient {
    fn start(lab: &Lab, port: u16, args: &[&str]) -> OpenClient {
        let mut child = spawn_s_client(lab, port, "60", args, Stdio::null());
        let stdout = child.stdout.take().unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let sink = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let mut out = sink.lock().unwrap();
                out.push_str(&line);
                out.push('\n');
            }
        });
        OpenClient { child, output }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    fn wait_for(&self, text: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = self.output.lock().unwrap().clone();
            if out.contains(text) {
                return out;
            }
            assert!(Instant::now() < deadline, "{text:?} never came: {out}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for OpenClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_replaced_certificate_serves_new_connections_while_open_ones_continue() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let pki = pki("reload");
    let old = pki.pki.leaf("old", &["old.example"], Some(&pki.ca));
    let new = pki.pki.leaf("new", &["new.example"], Some(&pki.ca));
    let served = CertificateFiles {
        cert: pki.pki.dir().join("served.pem"),
        key: pki.pki.dir().join("served.key"),
    };
    std::fs::copy(&old.cert, &served.cert).unwrap();
    std::fs::copy(&old.key, &served.key).unwrap();
    // An echo origin, line by line, that closes on `quit`.
    let origin = origin_listener(&lab, SocketAddr::new(ORIGIN_V4.into(), 7341));
    serve(origin, |s: TcpStream| {
        let mut w = s.try_clone().unwrap();
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { return };
            if line == "quit" {
                return;
            }
            if w.write_all(format!("echo {line}\n").as_bytes()).is_err() {
                return;
            }
        }
    });
    let agent = start_agent(
        &lab,
        &tls_app(
            "reload",
            (7341, 7341),
            "flexible",
            &certificates(&[&served]),
        ),
    );
    let ca = path(&pki.ca.cert);
    let args = ["-CAfile", &ca, "-servername", "any.example"];
    let mut first = OpenClient::start(&lab, 7341, &args);
    first.send("one\n");
    let out = first.wait_for("echo one");
    assert!(out.contains("subject=CN = old.example"), "{out}");

    // Replaced as certbot and friends do: new files renamed over the old ones.
    let dir = pki.pki.dir();
    std::fs::copy(&new.key, dir.join("next.key")).unwrap();
    std::fs::copy(&new.cert, dir.join("next.pem")).unwrap();
    std::fs::rename(dir.join("next.key"), &served.key).unwrap();
    std::fs::rename(dir.join("next.pem"), &served.cert).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let out = s_client(&lab, 7341, &args, b"ping\nquit\n");
        if out.stdout.contains("subject=CN = new.example") {
            assert!(out.stdout.contains("echo ping"), "{}", out.stdout);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served: {}\n{}",
            out.stdout,
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The connection opened before the change goes on.
    first.send("two\n");
    first.wait_for("echo two");
    let evs = app_events(&agent, "reload");
    assert!(
        evs.iter()
            .all(|e| e.event() != "disconnect" || e.status() == 200),
        "{evs:#?}"
    );
}

#[test]
fn the_proxy_header_reaches_the_origin_ahead_of_tls() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let pki = pki("proxy");
    // Raw: the origin records what comes before the ClientHello, then closes.
    let seen: Arc<Mutex<Vec<u8>>> = Arc::default();
    let record = seen.clone();
    let origin = origin_listener(&lab, SocketAddr::new(ORIGIN_V4.into(), 7351));
    serve(origin, move |mut s: TcpStream| {
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n") && s.read_exact(&mut byte).is_ok() {
            got.push(byte[0]);
        }
        let mut next = [0u8; 3];
        if s.read_exact(&mut next).is_ok() {
            got.extend_from_slice(&next);
        }
        *record.lock().unwrap() = got;
    });
    // nginx: a TLS listener that understands PROXY and reports the client.
    let dir = TempDir::new("tls-proxy");
    let (c, k) = (path(&pki.origin.cert), path(&pki.origin.key));
    let _nginx = start_nginx(
        &lab,
        &dir,
        &format!(
            "stream {{ server {{ listen 10.0.2.2:7352 ssl proxy_protocol; ssl_certificate {c}; ssl_certificate_key {k}; \
             return \"$proxy_protocol_addr:$proxy_protocol_port\\n\"; }} }}"
        ),
        &[7352],
    );
    let extra = format!("{}proxy_protocol = \"v1\"\n", certificates(&[&pki.web]));
    let apps = format!(
        "{}{}",
        tls_app("raw", (7351, 7351), "full", &extra),
        tls_app(
            "nginx",
            (7352, 7352),
            "strict",
            &format!(
                "{extra}tls_origin_ca = \"{}\"\ntls_origin_server_name = \"origin.example\"\n",
                path(&pki.ca.cert)
            )
        ),
    );
    let agent = start_agent(&lab, &apps);
    let ca = path(&pki.ca.cert);
    let _ = s_client(&lab, 7351, &["-servername", WEB, "-CAfile", &ca], b"");
    let deadline = Instant::now() + WAIT;
    let got = loop {
        let got = seen.lock().unwrap().clone();
        if got.len() > 3 {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "the origin saw nothing\n{}",
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = String::from_utf8_lossy(&got[..got.len() - 3]).into_owned();
    assert!(
        text.starts_with(&format!("PROXY TCP4 {CLIENT_V4} {EDGE_CLIENT_V4} "))
            && text.ends_with(" 7351\r\n"),
        "{text:?}"
    );
    assert_eq!(
        &got[got.len() - 3..got.len() - 1],
        &[0x16, 0x03],
        "then a TLS handshake record"
    );

    let out = s_client(&lab, 7352, &["-servername", WEB, "-CAfile", &ca], b"");
    let evs = wait_events(&agent, "nginx", WAIT, |e| {
        e.iter().any(|e| e.event() == "disconnect")
    });
    let client = evs
        .iter()
        .find(|e| e.event() == "connect")
        .unwrap()
        .client()
        .unwrap();
    assert!(
        out.stdout
            .contains(&format!("{}:{}\n", client.ip(), client.port())),
        "nginx reported: {}",
        out.stdout
    );
}

#[test]
fn garbage_instead_of_a_client_hello_is_closed_counted_and_never_reaches_the_origin() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let pki = pki("garbage");
    let origin = origin_listener(&lab, SocketAddr::new(ORIGIN_V4.into(), 7361));
    let reached: Arc<Mutex<u32>> = Arc::default();
    let count = reached.clone();
    serve(origin, move |_s: TcpStream| *count.lock().unwrap() += 1);
    let agent = start_agent(
        &lab,
        &tls_app("garbage", (7361, 7361), "full", &certificates(&[&pki.web])),
    );
    for request in [
        &b"GET / HTTP/1.1\r\nHost: web.example\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3][..],
    ] {
        let mut client =
            client_connect(&lab, SocketAddr::new(EDGE_CLIENT_V4.into(), 7361), WAIT).unwrap();
        client.write_all(request).unwrap();
        let (reply, _) = read_all(&mut client);
        assert!(!reply.starts_with(b"HTTP"), "{reply:?}");
    }
    let evs = wait_events(&agent, "garbage", WAIT, |e| {
        e.iter().filter(|e| e.str("TlsError").is_some()).count() == 2
    });
    for e in &evs {
        assert_eq!(e.event(), "disconnect", "{e:?}");
        assert_eq!(e.str("TlsError"), Some("not_tls"));
        assert_eq!(e.status(), 495);
        assert_eq!(e.origin(), None);
    }
    let tls = wait_tls(&agent, "garbage", |t| t.failures.get("not_tls") == Some(&2));
    assert!(tls.handshakes.is_empty());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(*reached.lock().unwrap(), 0, "the origin was contacted");
}

#[test]
fn a_client_that_stalls_in_the_handshake_is_closed_at_the_timeout() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let pki = pki("stall");
    let origin = origin_listener(&lab, SocketAddr::new(ORIGIN_V4.into(), 7371));
    serve(origin, |_s: TcpStream| {});
    let agent = start_agent(
        &lab,
        &tls_app(
            "stall",
            (7371, 7371),
            "flexible",
            &certificates(&[&pki.web]),
        ),
    );
    // Silent, and the first bytes of a record that never completes.
    for request in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..]] {
        let mut client =
            client_connect(&lab, SocketAddr::new(EDGE_CLIENT_V4.into(), 7371), WAIT).unwrap();
        client.write_all(request).unwrap();
        let started = Instant::now();
        let (reply, _) = read_all(&mut client);
        let waited = started.elapsed();
        assert!(reply.is_empty(), "{reply:?}");
        assert!(
            waited >= Duration::from_millis(1500) && waited < Duration::from_secs(8),
            "closed after {waited:?}, the handshake timeout is {TEST_HANDSHAKE_TIMEOUT}"
        );
    }
    let evs = wait_events(&agent, "stall", WAIT, |e| e.len() == 2);
    for e in &evs {
        assert_eq!((e.event(), e.status()), ("disconnect", 497), "{e:?}");
        assert_eq!(e.str("TlsError"), Some("timeout"));
    }
    wait_tls(&agent, "stall", |t| t.failures.get("timeout") == Some(&2));
}

#[test]
fn the_drain_ends_a_connection_still_in_its_handshake() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let pki = pki("drain");
    let origin = origin_listener(&lab, SocketAddr::new(ORIGIN_V4.into(), 7381));
    serve(origin, |_s: TcpStream| {});
    let mut agent = start_agent(
        &lab,
        &tls_app(
            "drain",
            (7381, 7381),
            "flexible",
            &certificates(&[&pki.web]),
        ),
    );
    // A first byte of a handshake record, then nothing: the agent waits for the rest.
    let mut client =
        client_connect(&lab, SocketAddr::new(EDGE_CLIENT_V4.into(), 7381), WAIT).unwrap();
    client.write_all(&[0x16]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let status = agent.stop().unwrap();
    assert!(status.success(), "{status:?}\n{}", agent.logs());
    // Ended by the drain (1 s), before the handshake timeout (2 s) would have.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let evs = app_events(&agent, "drain");
    assert_eq!(evs.len(), 1, "{evs:#?}");
    assert_eq!((evs[0].event(), evs[0].status()), ("disconnect", 999));
    assert_eq!(evs[0].str("TlsError"), None);
}
