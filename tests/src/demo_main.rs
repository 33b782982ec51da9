//! What the demos (`cargo xtask demo`, `cargo xtask demo-fleet`) share: running the
//! demo on a worker thread while Ctrl-C only sets a flag that every wait checks
//! (the current step is cut short and the lab torn down), and a second Ctrl-C
//! that removes the lab's namespaces at once.
//!
//! Exit status of [`main`]: 0 when every step worked, 1 when one failed, 130 when
//! interrupted.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// Set by the signal thread on SIGINT/SIGTERM; every wait of a demo checks it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// SIGINT/SIGTERM received so far.
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

/// An error once the demo has been interrupted.
pub fn interrupted() -> Result<()> {
    if is_interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Whether the demo has been interrupted.
pub fn is_interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Runs `demo` (true: every step passed) on a worker thread; see the module docs.
/// `name` prefixes the messages (`demo`, `demo-fleet`).
pub fn main(name: &str, demo: fn() -> Result<bool>) -> ExitCode {
    if !crate::require_root() {
        eprintln!("{name}: needs root (network namespaces, XDP)");
        return ExitCode::FAILURE;
    }
    // SIGINT/SIGTERM only set a flag (handlers, not a blocked mask: the agent and
    // the tools the demo runs must get their own signals as usual).
    // SAFETY: installs an async-signal-safe handler (one atomic add).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
    }
    let worker = std::thread::spawn(demo);
    let mut seen = 0;
    while !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        let signals = SIGNALS.load(Ordering::Relaxed);
        if signals > seen {
            seen = signals;
            INTERRUPTED.store(true, Ordering::Relaxed);
            if signals == 1 {
                eprintln!("\n{name}: interrupted; stopping the agent and removing the lab...");
            } else {
                eprintln!("{name}: interrupted again; removing the lab namespaces now");
                force_cleanup();
                return ExitCode::from(130);
            }
        }
    }
    let result = worker.join();
    if is_interrupted() {
        eprintln!("{name}: interrupted; nothing left behind");
        return ExitCode::from(130);
    }
    match result {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        Ok(Ok(false)) => ExitCode::FAILURE,
        Ok(Err(e)) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("{name}: the demo thread panicked");
            ExitCode::FAILURE
        }
    }
}

/// After a second Ctrl-C: kill what runs in the namespaces of this process's labs
/// and delete them.
fn force_cleanup() {
    let Ok(entries) = std::fs::read_dir(crate::lab::NETNS_RUN_DIR) else {
        return;
    };
    let prefix = crate::lab::own_netns_prefix();
    for name in entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
    {
        if let Ok(out) = std::process::Command::new("ip")
            .args(["netns", "pids", &name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<libc::pid_t>()
                    && pid != std::process::id() as libc::pid_t
                {
                    // SAFETY: plain syscall on a pid listed in our lab's namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .status();
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::Relaxed);
}

/// For the demos' tests: runs the demo binary `bin`; `on_line` sees each output line
/// (stderr lines prefixed `stderr: `) and may return a signal to send it. Kills it
/// and panics when it runs longer than `limit`. Returns the exit code, the whole
/// output and the pid.
pub fn run_demo(
    bin: &str,
    limit: Duration,
    mut on_line: impl FnMut(&str) -> Option<i32>,
) -> (Option<i32>, String, u32) {
    let mut child = Command::new(bin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the demo");
    let pid = child.id();
    let (tx, rx) = mpsc::channel::<String>();
    let out = child.stdout.take().expect("piped stdout");
    let err = child.stderr.take().expect("piped stderr");
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
    let deadline = Instant::now() + limit;
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
            panic!("the demo did not end within {limit:?}:\n{output}");
        }
    }
    let status = child.wait().expect("waiting for the demo");
    (status.code(), output, pid)
}

/// Namespaces of the process `pid` still present.
pub fn leftover_namespaces(pid: u32) -> Vec<String> {
    std::fs::read_dir(crate::lab::NETNS_RUN_DIR)
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&format!("fwd-{pid}-")))
                .collect()
        })
        .unwrap_or_default()
}
