//! `cargo xtask test`: build, unit + CLI tests, then the root-only lab tests.

use std::{
    io::{Read as _, Write as _},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use crate::util::{self, command, display, note, run, step};

/// Totals over the `test result:` lines of one or more `cargo test` runs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// Number of `test result:` lines seen (one per test binary).
    pub binaries: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
        self.binaries += other.binaries;
    }
}

/// Parses libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; ...`.
pub fn parse_test_result(line: &str) -> Option<Counts> {
    let rest = &line[line.find("test result:")? + "test result:".len()..];
    let mut counts = Counts {
        binaries: 1,
        ..Counts::default()
    };
    let mut seen = false;
    for part in rest.split(';') {
        let mut words = part.split_whitespace().rev();
        let (Some(kind), Some(n)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match kind {
            "passed" => counts.passed = n,
            "failed" => counts.failed = n,
            "ignored" => counts.ignored = n,
            _ => continue,
        }
        seen = true;
    }
    seen.then_some(counts)
}

/// Runs `cargo test ...`, passing its stdout through as it comes while adding up the
/// `test result:` lines. Returns whether it succeeded, and the counts.
fn run_cargo_test(cmd: &mut Command) -> Result<(bool, Counts)> {
    note(format!("$ {}", display(cmd)));
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut counts = Counts::default();
    let mut pending = Vec::new();
    let mut buf = [0u8; 8192];
    let mut out = std::io::stdout();
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading cargo test output"),
        };
        let _ = out.write_all(&buf[..n]);
        let _ = out.flush();
        pending.extend_from_slice(&buf[..n]);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            if let Some(c) = parse_test_result(&String::from_utf8_lossy(&line)) {
                counts.add(c);
            }
        }
    }
    if let Some(c) = parse_test_result(&String::from_utf8_lossy(&pending)) {
        counts.add(c);
    }
    let status = child.wait().context("waiting for cargo test")?;
    Ok((status.success(), counts))
}

struct Outcome {
    name: &'static str,
    ok: bool,
    counts: Counts,
    note: String,
}

/// The integration test binaries of the TCP proxy (run with each engine).
const TCP_TESTS: [&str; 7] = [
    "tcp_capacity",
    "tcp_stream",
    "tcp_errors",
    "tcp_lifecycle",
    "tcp_proxy_protocol",
    "tcp_ftp",
    "tcp_synflood",
];

/// Builds the Debian package, installs it, checks the installed files and binary
/// (`installed_package.rs`), and purges it again, whatever the result.
fn package_step() -> Outcome {
    step("test: the Debian package (cargo xtask dist, dpkg -i, installed_package, dpkg -P)");
    let deb = match crate::dist::dist() {
        Ok(deb) => deb,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Outcome {
                name: "package",
                ok: false,
                counts: Counts::default(),
                note: format!("building the package failed: {e:#}"),
            };
        }
    };
    let installed = run(command("dpkg").arg("-i").arg(&deb));
    let outcome = match installed {
        Ok(()) => {
            let mut cmd = command("cargo");
            cmd.env("FORWARDER_INTEGRATION", "1")
                .env("FORWARDER_INSTALLED", "1")
                .env("FORWARDER_BIN", "/usr/bin/forwarder")
                .args([
                    "test",
                    "-p",
                    "forwarder-tests",
                    "--test",
                    "installed_package",
                ]);
            outcome("package", run_cargo_test(&mut cmd))
        }
        Err(e) => Outcome {
            name: "package",
            ok: false,
            counts: Counts::default(),
            note: format!("dpkg -i failed: {e:#}"),
        },
    };
    if let Err(e) = run(command("dpkg").args(["-P", "forwarder"])) {
        eprintln!("warning: purging the test package failed: {e:#}");
    }
    outcome
}

pub fn test() -> Result<()> {
    let mut outcomes = Vec::new();

    step("test 1/3: release build of forwarder (with the eBPF object)");
    let built = crate::build();
    if let Err(e) = &built {
        eprintln!("error: {e:#}");
    }
    outcomes.push(Outcome {
        name: "build",
        ok: built.is_ok(),
        counts: Counts::default(),
        note: String::new(),
    });

    step("test 2/3: unit and CLI tests (no root needed)");
    // forwarder-tests is left out here: step 3 runs all of it.
    let mut cmd = command("cargo");
    cmd.args(["test", "--workspace"])
        .args([
            "--exclude",
            "forwarder-ebpf",
            "--exclude",
            "forwarder-tests",
        ])
        .args(["--lib", "--bins", "--tests"]);
    outcomes.push(outcome("unit+cli", run_cargo_test(&mut cmd)));

    step("test 3/3: integration tests in network namespaces (root)");
    if util::is_root() {
        let mut cmd = command("cargo");
        cmd.env("FORWARDER_INTEGRATION", "1")
            .env("FORWARDER_BIN", util::forwarder_bin())
            .args(["test", "-p", "forwarder-tests", "--", "--test-threads=2"]);
        outcomes.push(outcome("integration", run_cargo_test(&mut cmd)));
        // The TCP tests once more with the other way of moving bytes (the default,
        // `auto`, copies; `on` splices, on the epoll engine): both must pass
        // everything.
        let mut cmd = command("cargo");
        cmd.env("FORWARDER_INTEGRATION", "1")
            .env("FORWARDER_BIN", util::forwarder_bin())
            .env("FORWARDER_TEST_TCP_SPLICE", "on")
            .args(["test", "-p", "forwarder-tests"]);
        for test in TCP_TESTS {
            cmd.args(["--test", test]);
        }
        cmd.args(["--", "--test-threads=2"]);
        outcomes.push(outcome("tcp (splice)", run_cargo_test(&mut cmd)));
        // And on the epoll engine (the default, `auto`, is io_uring here), with the
        // apps io_uring hands to it (TLS, the XDP splice) served by it directly.
        let mut cmd = command("cargo");
        cmd.env("FORWARDER_INTEGRATION", "1")
            .env("FORWARDER_BIN", util::forwarder_bin())
            .env("FORWARDER_TEST_TCP_ENGINE", "epoll")
            .args(["test", "-p", "forwarder-tests"]);
        for test in TCP_TESTS.iter().chain(&["tcp_tls", "tcp_splice"]) {
            cmd.args(["--test", test]);
        }
        cmd.args(["--", "--test-threads=2"]);
        outcomes.push(outcome("tcp (epoll)", run_cargo_test(&mut cmd)));
        outcomes.push(package_step());
    } else {
        eprintln!(
            "error: integration tests need root (network namespaces, XDP); \
             run `cargo xtask test` as root"
        );
        outcomes.push(Outcome {
            name: "integration",
            ok: false,
            counts: Counts::default(),
            note: "not run: needs root".into(),
        });
    }

    let mut total = Counts::default();
    let mut failed_steps = Vec::new();
    let mut parts = Vec::new();
    for o in &outcomes {
        total.add(o.counts);
        let state = if o.ok { "ok" } else { "FAILED" };
        let detail = if !o.note.is_empty() {
            format!(" ({})", o.note)
        } else if o.counts.binaries > 0 {
            format!(
                " ({} passed, {} failed, {} ignored)",
                o.counts.passed, o.counts.failed, o.counts.ignored
            )
        } else {
            String::new()
        };
        parts.push(format!("{} {state}{detail}", o.name));
        if !o.ok {
            failed_steps.push(o.name);
        }
    }
    // A step that failed without a failing test (build error, not root) still counts
    // as a failure in the totals.
    let extra_failures = outcomes
        .iter()
        .filter(|o| !o.ok && o.counts.failed == 0)
        .count() as u64;
    step(format!("test steps: {}", parts.join(", ")));
    println!(
        "summary: {} passed, {} failed, {} skipped",
        total.passed,
        total.failed + extra_failures,
        total.ignored
    );
    if failed_steps.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("cargo xtask test failed: {}", failed_steps.join(", "))
    }
}

fn outcome(name: &'static str, result: Result<(bool, Counts)>) -> Outcome {
    match result {
        Ok((ok, counts)) => Outcome {
            name,
            ok,
            counts,
            note: if !ok && counts.binaries == 0 {
                "did not build or run".into()
            } else {
                String::new()
            },
        },
        Err(e) => {
            eprintln!("error: {e:#}");
            Outcome {
                name,
                ok: false,
                counts: Counts::default(),
                note: "could not run cargo".into(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libtest_summary() {
        let c = parse_test_result(
            "test result: ok. 12 passed; 0 failed; 3 ignored; 0 measured; 0 filtered out; finished in 0.01s\n",
        )
        .unwrap();
        assert_eq!(
            c,
            Counts {
                passed: 12,
                failed: 0,
                ignored: 3,
                binaries: 1
            }
        );
        let c = parse_test_result(
            "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        )
        .unwrap();
        assert_eq!((c.passed, c.failed, c.ignored), (1, 2, 0));
        assert_eq!(parse_test_result("test foo ... ok"), None);
        assert_eq!(parse_test_result("running 3 tests"), None);
    }
}
