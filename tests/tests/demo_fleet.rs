//! The fleet demo (`cargo xtask demo-fleet`, tests/src/bin/demo-fleet.rs) end to
//! end: it passes every step by itself within its time limit and leaves no
//! namespace behind, also when it is interrupted with Ctrl-C in the middle.

use std::time::Duration;

use forwarder_tests::demo_main::{leftover_namespaces, run_demo};
use forwarder_tests::require_root;

const DEMO: &str = env!("CARGO_BIN_EXE_demo-fleet");
const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn demo_fleet_passes_every_step_and_cleans_up() {
    if !require_root() {
        return;
    }
    let (code, output, pid) = run_demo(DEMO, LIMIT, |_| None);
    assert_eq!(code, Some(0), "{output}");
    for line in [
        "edge1: kill -9 the agent",
        "UDP flows resumed on a survivor with the same origin and SPP client: 60/60",
        "[ok] resilient nexthops: black hole",
        "[ok] plain multipath: black hole",
        "demo-fleet: 4/4 steps passed in",
        "fleet removed",
    ] {
        assert!(output.contains(line), "missing {line:?} in:\n{output}");
    }
    assert_eq!(leftover_namespaces(pid), Vec::<String>::new());
}

#[test]
fn demo_fleet_interrupted_leaves_nothing_behind() {
    if !require_root() {
        return;
    }
    let mut sent = false;
    let (code, output, pid) = run_demo(DEMO, LIMIT, |line| {
        // Ctrl-C while the first fleet carries traffic.
        (!sent && line.contains("UDP flows (Simple Proxy Protocol)")).then(|| {
            sent = true;
            libc::SIGINT
        })
    });
    assert!(sent, "the demo never reached its traffic:\n{output}");
    assert_eq!(code, Some(130), "{output}");
    assert!(
        output.contains("demo-fleet: interrupted; nothing left behind"),
        "{output}"
    );
    assert!(!output.contains("demo-fleet: 4/4"), "{output}");
    assert_eq!(leftover_namespaces(pid), Vec::<String>::new(), "{output}");
}
