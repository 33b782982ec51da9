//! The fleet demo (`cargo xtask demo-fleet`, tests/src/bin/demo-fleet.rs) end to
//! end: it passes every step by itself within its time limit and leaves no
//! namespace behind, also when it is interrupted with Ctrl-C in the middle.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use forwarder_tests::require_root;

const DEMO: &str = env!("CARGO_BIN_EXE_demo-fleet");
const LIMIT: Duration = Duration::from_secs(120);

/// Namespaces of the demo process `pid` still present.
fn leftovers(pid: u32) -> Vec<String> {
    std::fs::read_dir(forwarder_tests::lab::NETNS_RUN_DIR)
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&format!("fwd-{pid}-")))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs the demo; `on_line` sees each output line and may return a signal to send.
/// Returns the exit code, the whole output and the pid.
fn run_demo(mut on_line: impl FnMut(&str) -> Option<i32>) -> (Option<i32>, String, u32) {
    let mut child = Command::new(DEMO)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the demo");
    let pid = child.id();
    let (tx, rx) = mpsc::channel::<String>();
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("stderr: {line}"));
        }
    });
    let deadline = Instant::now() + LIMIT;
    let mut output = String::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if let Some(signal) = on_line(&line) {
                    // SAFETY: plain syscall to our own child.
                    unsafe { libc::kill(pid as libc::pid_t, signal) };
                }
                output.push_str(&line);
                output.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the demo did not end within {LIMIT:?}:\n{output}");
        }
    }
    let status = child.wait().expect("waiting for the demo");
    (status.code(), output, pid)
}

#[test]
fn demo_fleet_passes_every_step_and_cleans_up() {
    if !require_root() {
        return;
    }
    let (code, output, pid) = run_demo(|_| None);
    assert_eq!(code, Some(0), "{output}");
    for line in [
        "kill -9 the agent of edge1",
        "UDP flows resumed on a survivor with the same origin and SPP client: 60/60",
        "[ok] resilient nexthops: black hole",
        "[ok] plain multipath: black hole",
        "demo-fleet: 4/4 steps passed in",
        "fleet removed",
    ] {
        assert!(output.contains(line), "missing {line:?} in:\n{output}");
    }
    assert_eq!(leftovers(pid), Vec::<String>::new());
}

#[test]
fn demo_fleet_interrupted_leaves_nothing_behind() {
    if !require_root() {
        return;
    }
    let mut sent = false;
    let (code, output, pid) = run_demo(|line| {
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
    assert_eq!(leftovers(pid), Vec::<String>::new(), "{output}");
}
