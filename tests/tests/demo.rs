//! The demo (`cargo xtask demo`, tests/src/bin/demo.rs) end to end: it passes every
//! step by itself within a minute and leaves no namespace behind, also when it is
//! interrupted with Ctrl-C (SIGINT) in the middle.

use std::time::{Duration, Instant};

use forwarder_tests::demo_main::{leftover_namespaces, run_demo};
use forwarder_tests::require_root;

const DEMO: &str = env!("CARGO_BIN_EXE_demo");
const LIMIT: Duration = Duration::from_secs(90);

#[test]
fn demo_passes_every_step_and_cleans_up() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let (code, output, pid) = run_demo(DEMO, LIMIT, |_| None);
    assert_eq!(code, Some(0), "{output}");
    for line in [
        "[ok] UDP + Simple Proxy Protocol: the origin saw the real client 10.0.1.2:",
        "[ok] TCP + PROXY v2: nginx saw the real client 10.0.1.2",
        "[ok] FTP passive: 2097152 bytes downloaded intact",
        "[ok] port scan: 300 SYNs to 300 ports, 300 dropped (no_app)",
        "[ok] blocked client:",
        "[ok] stats table and metrics shown",
        "demo: 6/6 steps passed in",
        "agent stopped (exit status: 0)",
        "lab removed",
    ] {
        assert!(output.contains(line), "missing {line:?} in:\n{output}");
    }
    assert!(!output.contains("[FAIL]"), "{output}");
    assert!(started.elapsed() < Duration::from_secs(60), "{output}");
    assert_eq!(leftover_namespaces(pid), Vec::<String>::new());
}

#[test]
fn demo_interrupted_leaves_nothing_behind() {
    if !require_root() {
        return;
    }
    let mut sent = false;
    let (code, output, pid) = run_demo(DEMO, LIMIT, |line| {
        // Ctrl-C once the agent runs and the first step has started.
        (!sent && line.contains("[1/6]")).then(|| {
            sent = true;
            libc::SIGINT
        })
    });
    assert!(sent, "the demo never reached its first step:\n{output}");
    assert_eq!(code, Some(130), "{output}");
    assert!(
        output.contains("demo: interrupted; nothing left behind"),
        "{output}"
    );
    assert!(!output.contains("demo: 6/6"), "{output}");
    assert_eq!(leftover_namespaces(pid), Vec::<String>::new(), "{output}");
}
