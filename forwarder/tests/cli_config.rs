//! `forwarder check-config` and `forwarder import-spectrum`, run as the built binary
//! on the fixtures in tests/configs/ and on the shipped examples.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    manifest_dir().join("tests/configs").join(name)
}

fn forwarder(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forwarder"))
        .args(args)
        // Keep env_logger quiet whatever the caller's environment says.
        .env("RUST_LOG", "off")
        .output()
        .expect("run the forwarder binary")
}

fn check_config(path: &Path) -> Output {
    let path = path.to_str().expect("utf-8 path");
    forwarder(&["check-config", "--config", path])
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("utf-8 output")
}

#[test]
fn check_config_accepts_the_full_config() {
    let output = check_config(&fixture("good.toml"));
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        text(&output.stderr)
    );
    assert_eq!(
        text(&output.stdout),
        "config OK: 4 apps (2 tcp, 2 udp), 3 access rules, 2 pass entries, interfaces eth0, eth1\n"
    );
    assert_eq!(text(&output.stderr), "");
}

#[test]
fn check_config_accepts_the_examples() {
    for (example, summary) in [
        (
            "forwarder.toml",
            "config OK: 2 apps (1 tcp, 1 udp), 3 access rules, 1 pass entry, interfaces eth0\n",
        ),
        (
            "demo.toml",
            "config OK: 4 apps (3 tcp, 1 udp), 1 access rule, 1 pass entry, interfaces veth-edge-c, veth-edge-o\n",
        ),
        (
            "fleet/forwarder.toml",
            "config OK: 2 apps (1 tcp, 1 udp), 0 access rules, 0 pass entries, interfaces fleet-up, fleet-down\n",
        ),
    ] {
        let output = check_config(&manifest_dir().join("../examples").join(example));
        assert_eq!(
            output.status.code(),
            Some(0),
            "{example}: {}",
            text(&output.stderr)
        );
        assert_eq!(text(&output.stdout), summary, "{example}");
    }
}

#[test]
fn check_config_lists_every_problem_and_exits_1() {
    let path = fixture("bad-many.toml");
    let output = check_config(&path);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(text(&output.stdout), "");
    let expected = [
        "agent: udp_idle_timeout: '30' has no unit; expected a number and a unit (ms, s, m, h, d), e.g. \"30s\", \"5m\", \"1h30m\"",
        "agent: pass: tcp/22 overlaps app 'tcp-20-30' (apps[1]) (tcp/20-30)",
        "access_rules[0]: value: '10.0.1.130/25' has host bits set; did you mean '10.0.1.128/25'?",
        "app 'game' (apps[0]): origin_direct: scheme 'tcp' does not match protocol 'udp'",
        "app 'game' (apps[0]): proxy_protocol: 'v1' is TCP only; use 'v2' or 'simple' for UDP",
        "app 'tcp-20-30' (apps[1]): colour: unknown key (line 21); expected one of: id, protocol, edge_ips, origin_direct, proxy_protocol, ip_firewall, udp_new_flows_per_second, health_check, tcp_fastpath, tls, tls_certificates, tls_strict_sni, min_tls_version, tls_origin_ca, tls_origin_server_name",
        "app 'tcp-20-30' (apps[1]): origin_direct: 'tcp://10.0.0.6:20' has 1 port(s) but the app's edge range 20-30 has 11; an origin needs exactly as many ports as the edge (edge LOW+k goes to origin LOW+k)",
        "app 'game' (apps[2]): origin_direct: a UDP app's origins must share one IP family: 10.0.0.5 is IPv4, 2001:db8::5 is IPv6",
        "app 'game' (apps[2]): id: 'game' is already the id of apps[0]",
        "app 'game' (apps[2]): protocol: udp/27015 overlaps app 'game' (apps[0]) (udp/27015) on every edge address",
    ];
    let stderr = text(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines[..lines.len() - 1], expected, "stderr:\n{stderr}");
    assert_eq!(
        lines.last(),
        Some(&format!("{}: 10 problems", path.display()).as_str())
    );
}

#[test]
fn check_config_reports_a_syntax_error_with_its_line() {
    let output = check_config(&fixture("bad-syntax.toml"));
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with("config: TOML syntax error (line 6, column "),
        "stderr:\n{stderr}"
    );
    assert!(
        stderr.ends_with("bad-syntax.toml: 1 problem\n"),
        "stderr:\n{stderr}"
    );
}

#[test]
fn check_config_reports_a_missing_file() {
    let output = check_config(Path::new("/nonexistent/forwarder.toml"));
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with(
            "/nonexistent/forwarder.toml: cannot read the config file: No such file or directory"
        ),
        "stderr:\n{stderr}"
    );
}

#[test]
fn import_spectrum_prints_apps_and_reports_ignored_fields() {
    let output = forwarder(&[
        "import-spectrum",
        fixture("spectrum.json").to_str().expect("utf-8"),
    ]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    let expected_toml =
        std::fs::read_to_string(fixture("spectrum.expected.toml")).expect("expected TOML");
    assert_eq!(text(&output.stdout), expected_toml);
    let ignored: Vec<&str> = stderr
        .lines()
        .map(|line| line.split(':').next().unwrap_or(line))
        .collect();
    // Fields that change nothing here (tls off, Argo off, timestamps, …) are not
    // mentioned; Cloudflare's static edge address is a placeholder to fill in.
    assert_eq!(
        ignored,
        [
            "ignored apps[0].dns",
            "ignored apps[1].dns",
            "ignored apps[2].dns",
            "ignored apps[2].surprise",
            "fill in apps[1].edge_ips",
        ],
        "stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("ignored apps[2].surprise: unknown Spectrum field"),
        "stderr:\n{stderr}"
    );
}

#[test]
fn imported_apps_pass_check_config_with_an_agent_table() {
    let output = forwarder(&[
        "import-spectrum",
        fixture("spectrum.json").to_str().expect("utf-8"),
    ]);
    assert_eq!(output.status.code(), Some(0));
    // The operator fills in the placeholder (this host's edge address).
    let config = format!(
        "[agent]\ninterfaces = [\"eth0\"]\n\n{}",
        text(&output.stdout).replace("EDGE-ADDRESS-OF-THIS-HOST", "192.0.2.10")
    );
    let path = std::env::temp_dir().join(format!("forwarder-imported-{}.toml", std::process::id()));
    std::fs::write(&path, config).expect("write the imported config");
    let checked = check_config(&path);
    let _ = std::fs::remove_file(&path);
    assert_eq!(
        checked.status.code(),
        Some(0),
        "stderr:\n{}",
        text(&checked.stderr)
    );
    assert!(text(&checked.stdout).starts_with("config OK: 3 apps (2 tcp, 1 udp)"));
}

#[test]
fn import_spectrum_skips_an_app_without_origin_direct_and_exits_1() {
    let output = forwarder(&[
        "import-spectrum",
        fixture("spectrum-skipped.json").to_str().expect("utf-8"),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("id = \"direct\""), "stdout:\n{stdout}");
    assert!(!stdout.contains("dns-origin"), "stdout:\n{stdout}");
    assert_eq!(
        text(&output.stderr),
        "ignored apps[0].origin_dns: DNS origins are not supported; use origin_direct\n\
         skipped app 'dns-origin' (apps[0]): no origin_direct (origin_dns is not supported), so the app is left out\n"
    );
}

#[test]
fn import_spectrum_rejects_a_file_that_is_not_spectrum_json() {
    let output = forwarder(&[
        "import-spectrum",
        fixture("good.toml").to_str().expect("utf-8"),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(text(&output.stdout), "");
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with("error: cannot import "),
        "stderr:\n{stderr}"
    );
    assert!(stderr.contains("not valid JSON"), "stderr:\n{stderr}");
}

/// A valid config with a risk (every interface address claimed, SSH not passed):
/// a warning on stderr and exit 0; with `--strict`, exit 1. `--dump` prints the
/// effective config, which parses back to the same config.
#[test]
fn check_config_warns_fails_with_strict_and_dumps_the_effective_config() {
    let dir = std::env::temp_dir().join(format!("fwd-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("risky.toml");
    std::fs::write(
        &path,
        "[agent]\ninterfaces = [\"eth0\"]\n\n[[apps]]\nprotocol = \"udp/27015\"\n\
         origin_direct = [\"udp://10.0.0.5:27015\"]\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let output = forwarder(&["check-config", "--config", p]);
    assert_eq!(output.status.code(), Some(0));
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with("warning: agent: pass:") && stderr.contains("tcp/22"),
        "{stderr}"
    );
    let output = forwarder(&["check-config", "--strict", "--config", p]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("1 warning (--strict)"));
    let output = forwarder(&["check-config", "--dump", "--config", p]);
    assert_eq!(output.status.code(), Some(0));
    let dumped = text(&output.stdout);
    for key in [
        "udp_idle_timeout = \"30s\"",
        "udp_nat_ports = \"40000-59999\"",
        "proxy_protocol = \"off\"",
    ] {
        assert!(dumped.contains(key), "{key} written out:\n{dumped}");
    }
    let again = dir.join("dumped.toml");
    std::fs::write(&again, &dumped).unwrap();
    let output = forwarder(&[
        "check-config",
        "--dump",
        "--config",
        again.to_str().unwrap(),
    ]);
    assert_eq!(text(&output.stdout), dumped, "the dump is a fixed point");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `import-spectrum -` reads stdin; `--agent FILE` puts that file's `[agent]` first
/// and checks the whole config; `--access-rules FILE` converts Cloudflare IP Access
/// rules into `[[access_rules]]`.
#[test]
fn import_spectrum_reads_stdin_and_writes_a_whole_config_with_access_rules() {
    use std::io::Write as _;
    let dir = std::env::temp_dir().join(format!("fwd-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let agent = dir.join("agent.toml");
    std::fs::write(
        &agent,
        "[agent]\ninterfaces = [\"eth0\"]\npass = [\"tcp/2222\"]\n",
    )
    .unwrap();
    let rules = dir.join("rules.json");
    std::fs::write(
        &rules,
        r#"{"result":[{"mode":"block","configuration":{"target":"ip","value":"198.51.100.4"}},
                      {"mode":"js_challenge","configuration":{"target":"ip","value":"192.0.2.9"}}]}"#,
    )
    .unwrap();
    let app = r#"[{"id":"ssh","protocol":"tcp/22","origin_direct":["tcp://192.0.2.1:22"]}]"#;
    let mut child = Command::new(env!("CARGO_BIN_EXE_forwarder"))
        .args(["import-spectrum", "-", "--agent"])
        .arg(&agent)
        .arg("--access-rules")
        .arg(&rules)
        .env("RUST_LOG", "off")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(app.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(
        stderr.contains("skipped access_rules[1] (ip 192.0.2.9): mode \"js_challenge\""),
        "{stderr}"
    );
    let whole = dir.join("whole.toml");
    std::fs::write(&whole, &output.stdout).unwrap();
    let checked = check_config(&whole);
    assert_eq!(checked.status.code(), Some(0), "{}", text(&checked.stderr));
    assert!(
        text(&checked.stdout).starts_with("config OK: 1 app (1 tcp, 0 udp), 1 access rule"),
        "{}",
        text(&checked.stdout)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--log-format json`: the agent's own log lines are JSON objects (a config it
/// refuses still exits 78, its error on the last line as text).
#[test]
fn the_agent_log_can_be_json_lines() {
    let dir = std::env::temp_dir().join(format!("fwd-logjson-{}", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_forwarder"))
        .args([
            "--log-format",
            "json",
            "run",
            "--config",
            "/nonexistent.toml",
        ])
        .arg("--state-dir")
        .arg(&dir)
        .arg("--control")
        .arg(dir.join("control.sock"))
        .env("RUST_LOG", "info")
        .output()
        .expect("forwarder run");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(output.status.code(), Some(78));
    let stderr = text(&output.stderr);
    let first = stderr.lines().next().expect("a log line");
    let line: serde_json::Value =
        serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert_eq!(line["level"], "INFO", "{first}");
    assert!(
        line["ts"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{first}"
    );
    assert!(
        line["msg"]
            .as_str()
            .is_some_and(|m| m.contains("open-file limit")),
        "{first}"
    );
}

/// `check-config` on `config` written to `NAME.toml` in a directory of its own:
/// (exit code, stderr, the directory — gone by then).
fn check_config_text(name: &str, config: &str) -> (Option<i32>, String, PathBuf) {
    let dir = std::env::temp_dir().join(format!("fwd-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).expect("writing the config");
    let output = check_config(&path);
    std::fs::remove_dir_all(&dir).ok();
    (output.status.code(), text(&output.stderr), dir)
}

/// What `run` would refuse about TLS, `check-config` refuses first, naming the
/// app and the field: a certificate file that cannot be read, a CA bundle that
/// cannot be read, `tls` on a UDP app.
#[test]
fn check_config_refuses_unreadable_tls_files_and_tls_on_udp() {
    let web = "[agent]\ninterfaces = [\"eth0\"]\n\n\
               [[apps]]\nid = \"web\"\nprotocol = \"tcp/443\"\norigin_direct = [\"tcp://10.0.0.5:443\"]\n\
               tls = \"strict\"\ntls_certificates = [{ cert = \"missing.pem\", key = \"missing.key\" }]\n\
               tls_origin_ca = \"/nonexistent/ca.pem\"\n";
    // The text alone is judged first: tls on UDP.
    let udp = format!(
        "{web}\n[[apps]]\nid = \"dns\"\nprotocol = \"udp/53\"\n\
         origin_direct = [\"udp://10.0.0.5:53\"]\ntls = \"flexible\"\n"
    );
    let (code, stderr, _) = check_config_text("tls-udp", &udp);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("app 'dns' (apps[1]): tls: TCP apps only"),
        "{stderr}"
    );
    // Without that problem, the files are read (relative to the config's directory).
    let (code, stderr, dir) = check_config_text("tls-files", web);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "app 'web' (apps[0]): tls_certificates[0].cert: cannot read {}",
            dir.join("missing.pem").display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("app 'web' (apps[0]): tls_origin_ca: cannot read /nonexistent/ca.pem"),
        "{stderr}"
    );
}
