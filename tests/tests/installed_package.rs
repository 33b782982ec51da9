//! The Debian package from `cargo xtask dist`, installed (`dpkg -i`) on the test
//! machine: its files are where the unit and the docs say, the unit verifies, the
//! installed example config checks, and the installed binary serves a lab.
//!
//! `cargo xtask test` builds and installs the package, runs this with
//! `FORWARDER_INSTALLED=1` and `FORWARDER_BIN=/usr/bin/forwarder`, then purges it.
//! Without `FORWARDER_INSTALLED=1` the test says so and passes (nothing to check).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use forwarder_tests::agent::AgentProcess;
use forwarder_tests::spp_origin::UdpEchoOrigin;
use forwarder_tests::{CLIENT_V4, EDGE_CLIENT_V4, Lab, ORIGIN_V4, require_root};

fn installed() -> bool {
    let on = std::env::var("FORWARDER_INSTALLED").is_ok_and(|v| v == "1");
    if !on {
        eprintln!("skipping: the package is not installed (cargo xtask test installs it)");
    }
    on
}

#[test]
fn the_installed_package_has_its_files_and_serves() {
    if !installed() || !require_root() {
        return;
    }
    for file in [
        "/usr/bin/forwarder",
        "/lib/systemd/system/forwarder.service",
        "/etc/forwarder/forwarder.toml",
        "/etc/logrotate.d/forwarder",
        "/usr/share/man/man1/forwarder.1.gz",
        "/usr/share/man/man1/forwarder-run.1.gz",
        "/usr/share/bash-completion/completions/forwarder",
        "/usr/share/zsh/vendor-completions/_forwarder",
        "/usr/share/fish/vendor_completions.d/forwarder.fish",
        "/usr/share/doc/forwarder/operations.md",
        "/usr/share/doc/forwarder/copyright",
    ] {
        assert!(Path::new(file).is_file(), "{file} is installed");
    }
    let version = Command::new("/usr/bin/forwarder")
        .arg("--version")
        .output()
        .expect("forwarder --version");
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.starts_with("forwarder ") && version.contains(" ("),
        "version with its commit: {version}"
    );
    // The unit: its binary exists and systemd accepts every line.
    let verify = Command::new("systemd-analyze")
        .args(["verify", "/lib/systemd/system/forwarder.service"])
        .output()
        .expect("systemd-analyze verify");
    assert!(
        verify.status.success(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let unit = std::fs::read_to_string("/lib/systemd/system/forwarder.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/forwarder run"), "{unit}");
    let check = Command::new("/usr/bin/forwarder")
        .args(["check-config", "--config", "/etc/forwarder/forwarder.toml"])
        .output()
        .expect("check-config");
    assert!(
        check.status.success(),
        "the installed example config checks: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    // The installed binary ($FORWARDER_BIN) serves a UDP app in a lab.
    let lab = Lab::new().expect("lab");
    lab.attach_pass_stubs().expect("pass stubs");
    let [ec, eo] = lab.edge_ifaces();
    let config = format!(
        "[agent]\ninterfaces = [\"{ec}\", \"{eo}\"]\n\n[[apps]]\nid = \"echo\"\n\
         protocol = \"udp/5000\"\norigin_direct = [\"udp://{ORIGIN_V4}:5000\"]\n"
    );
    let _origin =
        UdpEchoOrigin::start_with(lab.origin(), SocketAddr::new(ORIGIN_V4.into(), 5000), false)
            .expect("origin");
    let mut agent = AgentProcess::start(&lab, &config).expect("the installed forwarder runs");
    let sock = lab
        .client()
        .udp_socket(SocketAddr::new(CLIENT_V4.into(), 0), Duration::from_secs(2))
        .expect("client socket");
    let edge = SocketAddr::new(EDGE_CLIENT_V4.into(), 5000);
    let mut buf = [0u8; 64];
    let answered = (0..5).any(|_| {
        sock.send_to(b"ping", edge).is_ok()
            && sock.recv(&mut buf).is_ok_and(|n| &buf[..n] == b"ping")
    });
    assert!(answered, "the installed agent forwards\n{}", agent.logs());
    assert!(agent.stop().expect("stop").success());
    lab.close().expect("lab teardown");
}
