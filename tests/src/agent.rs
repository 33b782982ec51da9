//! The real `forwarder run` as a child process in a lab's `edge` namespace, for the
//! integration tests: config in a temporary directory, control socket next to it,
//! stdout/stderr captured to files (printed when a test panics), counters through
//! the control socket, signals, and cleanup on drop.
//!
//! ```no_run
//! # use forwarder_tests::{Lab, agent::AgentProcess};
//! let lab = Lab::new().unwrap();
//! let [ec, eo] = lab.edge_ifaces();
//! let config = format!(
//!     "[agent]\ninterfaces = [\"{ec}\", \"{eo}\"]\n\n[[apps]]\nprotocol = \"udp/5000\"\n\
//!      origin_direct = [\"udp://10.0.2.2:5000\"]\n"
//! );
//! let mut agent = AgentProcess::start(&lab, &config).unwrap();
//! let stats = agent.stats().unwrap();
//! assert!(agent.stop().unwrap().success());
//! ```
//!
//! # Which binary
//!
//! [`forwarder_bin`]: `$FORWARDER_BIN` (set by `cargo xtask test` to the release build
//! it has just made), else `$CARGO_BIN_EXE_forwarder`, else `forwarder` next to the
//! test executable's `deps/` directory (`target/<profile>/forwarder`). Cargo builds a
//! dependency's library for `forwarder-tests`, never its binary: outside `cargo xtask
//! test`, run `cargo build -p forwarder` (same profile as the tests) first. A missing
//! binary fails the test with exactly that advice; a stale one silently tests old
//! code, so rebuild after changing `forwarder/` or `forwarder-ebpf/`.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use forwarder::telemetry::snapshot::StatsSnapshot;

use crate::{Lab, Netns, NsChild};

/// How long [`AgentProcess::start`] waits for the control socket to answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`AgentProcess::stop`] waits for the agent to exit after the signal.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// `--drain` given to the agent: short, so that stopping stays quick in tests.
pub const DRAIN: &str = "1s";

/// Per-process counter for unique temporary directories.
static NEXT_AGENT: AtomicU32 = AtomicU32::new(0);

/// `CAP_SYS_RESOURCE` (linux/capability.h).
pub const CAP_SYS_RESOURCE: libc::c_ulong = 24;

/// Whether process `pid` has capability `cap` in its effective set.
pub fn has_effective_capability(pid: u32, cap: libc::c_ulong) -> Result<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff line")?
        .trim();
    let bits = u64::from_str_radix(hex, 16).context("CapEff is not hex")?;
    Ok(bits & (1 << cap) != 0)
}

/// How to start an agent beyond its config ([`AgentProcess::start_with`]). The
/// defaults are the agent's own temporary directory: `<dir>/control.sock` and
/// `<dir>/state`, so that agents of parallel tests never share a lock or journal.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// `--state-dir`: share one between agents to test the single-instance lock and
    /// the repair after a crash.
    pub state_dir: Option<PathBuf>,
    /// `--control`.
    pub control: Option<PathBuf>,
    /// Soft and (lowered only) hard open-file limits.
    pub fd_limits: Option<(u64, Option<u64>)>,
    /// Run without `CAP_SYS_RESOURCE` (dropped from the bounding set before exec):
    /// what an agent started with only the capabilities it needs sees, e.g. the
    /// per-user pipe limits.
    pub without_cap_sys_resource: bool,
    /// Run under a seccomp filter that fails `io_uring_setup` with `ENOSYS`, as
    /// container runtimes' default profiles do.
    pub without_io_uring: bool,
    /// Extra environment (e.g. `NOTIFY_SOCKET`).
    pub env: Vec<(String, String)>,
    /// The CPUs the agent may run on (`sched_setaffinity` before exec): one CPU
    /// gives one runtime worker, and one io_uring.
    pub cpus: Option<Vec<usize>>,
}

/// The `forwarder` binary the tests run (see the module docs).
pub fn forwarder_bin() -> Result<PathBuf> {
    for var in ["FORWARDER_BIN", "CARGO_BIN_EXE_forwarder"] {
        if let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let path = PathBuf::from(path);
            if !path.is_file() {
                bail!("${var} is {}, which does not exist", path.display());
            }
            return Ok(path);
        }
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    // target/<profile>/deps/<test>-<hash> → target/<profile>/forwarder
    let profile_dir = exe
        .parent()
        .filter(|d| d.file_name().is_some_and(|n| n == "deps"))
        .and_then(Path::parent)
        .or_else(|| exe.parent())
        .context("the test executable has no parent directory")?;
    let path = profile_dir.join("forwarder");
    if !path.is_file() {
        bail!(
            "the forwarder binary is missing: {} does not exist. Cargo does not build a \
             dependency's binary for these tests; run `cargo build -p forwarder` first (with \
             `--release` if the tests run with `--release`), set FORWARDER_BIN, or use \
             `cargo xtask test`, which does both",
            path.display()
        );
    }
    Ok(path)
}

/// A running (or exited) `forwarder run` in the lab's `edge` namespace. Dropping it
/// stops the agent (SIGTERM, then SIGKILL after a grace period) and removes its
/// temporary directory; while a test panics, the agent's output is printed first.
#[derive(Debug)]
pub struct AgentProcess {
    child: NsChild,
    dir: PathBuf,
    config: PathBuf,
    control: PathBuf,
    state_dir: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl AgentProcess {
    /// Writes `config_toml` to a temporary file, starts `forwarder run --config F
    /// --control <dir>/control.sock --state-dir <dir>/state --drain 1s` in `edge`
    /// and waits (up to [`START_TIMEOUT`]) until the control socket answers. Fails,
    /// with the agent's output in the error, if it exits or does not answer in time.
    pub fn start(lab: &Lab, config_toml: &str) -> Result<AgentProcess> {
        Self::start_with(lab, config_toml, &AgentOptions::default())
    }

    /// Like [`AgentProcess::start`], with the agent's soft open-file limit set to
    /// `soft_fd_limit` (the hard limit stays the test process's).
    pub fn start_with_fd_limit(
        lab: &Lab,
        config_toml: &str,
        soft_fd_limit: u64,
    ) -> Result<AgentProcess> {
        let options = AgentOptions {
            fd_limits: Some((soft_fd_limit, None)),
            ..AgentOptions::default()
        };
        Self::start_with(lab, config_toml, &options)
    }

    /// Like [`AgentProcess::start`], with the agent's soft and hard open-file limits
    /// set (the hard one only lowered).
    pub fn start_with_fd_limits(
        lab: &Lab,
        config_toml: &str,
        soft: u64,
        hard: u64,
    ) -> Result<AgentProcess> {
        let options = AgentOptions {
            fd_limits: Some((soft, Some(hard))),
            ..AgentOptions::default()
        };
        Self::start_with(lab, config_toml, &options)
    }

    /// Like [`AgentProcess::start`] with `options`.
    pub fn start_with(
        lab: &Lab,
        config_toml: &str,
        options: &AgentOptions,
    ) -> Result<AgentProcess> {
        Self::start_in(lab.edge(), config_toml, options)
    }

    /// Like [`AgentProcess::start_with`] in any namespace `ns` (e.g. one edge of a
    /// [`Fleet`](crate::lab::Fleet)).
    pub fn start_in(ns: &Netns, config_toml: &str, options: &AgentOptions) -> Result<AgentProcess> {
        let mut agent = Self::spawn_in(ns, config_toml, options)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = agent.child.try_wait()? {
                agent.status = Some(status);
                bail!(
                    "forwarder run exited during start-up ({status})\n{}",
                    agent.logs()
                );
            }
            match forwarder::telemetry::control::request_stats(&agent.control) {
                Ok(_) => return Ok(agent),
                Err(err) if Instant::now() >= deadline => {
                    bail!(
                        "forwarder run did not answer on {} within {START_TIMEOUT:?}: {err:#}\n{}",
                        agent.control.display(),
                        agent.logs()
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Like [`AgentProcess::start`] without waiting for anything: for tests of an
    /// agent that must refuse to start (see [`AgentProcess::wait_exit`]).
    pub fn spawn(lab: &Lab, config_toml: &str) -> Result<AgentProcess> {
        Self::spawn_with(lab, config_toml, &AgentOptions::default())
    }

    /// Like [`AgentProcess::spawn`] with `options`.
    pub fn spawn_with(
        lab: &Lab,
        config_toml: &str,
        options: &AgentOptions,
    ) -> Result<AgentProcess> {
        Self::spawn_in(lab.edge(), config_toml, options)
    }

    /// Like [`AgentProcess::spawn_with`] in any namespace `ns`.
    pub fn spawn_in(ns: &Netns, config_toml: &str, options: &AgentOptions) -> Result<AgentProcess> {
        let bin = forwarder_bin()?;
        let n = NEXT_AGENT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "forwarder-agent-{}-{n}-{}",
            std::process::id(),
            ns.name()
        ));
        // A leftover of a crashed run with the same pid: start afresh.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("forwarder.toml");
        let control = options
            .control
            .clone()
            .unwrap_or_else(|| dir.join("control.sock"));
        let state_dir = options
            .state_dir
            .clone()
            .unwrap_or_else(|| dir.join("state"));
        let stdout = dir.join("stdout.log");
        let stderr = dir.join("stderr.log");
        std::fs::write(&config, config_toml)
            .with_context(|| format!("writing {}", config.display()))?;
        let mut cmd = ns.cmd(
            &bin,
            &[
                "run".as_ref(),
                "--config".as_ref(),
                config.as_os_str(),
                "--control".as_ref(),
                control.as_os_str(),
                "--state-dir".as_ref(),
                state_dir.as_os_str(),
                "--drain".as_ref(),
                DRAIN.as_ref(),
            ],
        );
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout).context("creating the stdout log")?)
            .stderr(File::create(&stderr).context("creating the stderr log")?)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "1")
            .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some((soft, hard)) = options.fd_limits {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: only async-signal-safe calls (getrlimit/setrlimit) between fork
            // and exec; the limit passes through `ip netns exec` to the agent.
            unsafe {
                cmd.pre_exec(move || {
                    let mut limit = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if let Some(hard) = hard {
                        limit.rlim_max = hard.min(limit.rlim_max);
                    }
                    limit.rlim_cur = soft.min(limit.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if let Some(cpus) = &options.cpus {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: a zeroed cpu_set_t filled with CPU_SET; sched_setaffinity is
            // async-signal-safe, and `ip netns exec` and the agent inherit the mask.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            for &cpu in cpus {
                // SAFETY: `set` is a valid cpu_set_t.
                unsafe { libc::CPU_SET(cpu, &mut set) };
            }
            unsafe {
                cmd.pre_exec(move || {
                    if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if options.without_cap_sys_resource {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: prctl is async-signal-safe; it only changes this child's
            // capability bounding set, which `ip netns exec` and the agent inherit.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_RESOURCE, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if options.without_io_uring {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: prctl is async-signal-safe; the filter lives on this stack frame
            // for the call (the kernel copies it); `ip netns exec` and the agent
            // inherit it.
            unsafe {
                cmd.pre_exec(|| {
                    let errno = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
                    let mut filter = [
                        // The syscall number (`seccomp_data.nr`, offset 0).
                        libc::sock_filter {
                            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
                            jt: 0,
                            jf: 0,
                            k: 0,
                        },
                        libc::sock_filter {
                            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                            jt: 0,
                            jf: 1,
                            k: libc::SYS_io_uring_setup as u32,
                        },
                        libc::sock_filter {
                            code: (libc::BPF_RET | libc::BPF_K) as u16,
                            jt: 0,
                            jf: 0,
                            k: errno,
                        },
                        libc::sock_filter {
                            code: (libc::BPF_RET | libc::BPF_K) as u16,
                            jt: 0,
                            jf: 0,
                            k: libc::SECCOMP_RET_ALLOW,
                        },
                    ];
                    let program = libc::sock_fprog {
                        len: filter.len() as u16,
                        filter: filter.as_mut_ptr(),
                    };
                    if libc::prctl(
                        libc::PR_SET_SECCOMP,
                        libc::SECCOMP_MODE_FILTER,
                        &program as *const libc::sock_fprog,
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = ns.spawn(cmd)?;
        Ok(AgentProcess {
            child,
            dir,
            config,
            control,
            state_dir,
            stdout,
            stderr,
            status: None,
        })
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The config file the agent reads (rewrite it, then [`AgentProcess::sighup`]).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The agent's control socket.
    pub fn control_path(&self) -> &Path {
        &self.control
    }

    /// The agent's state directory (`--state-dir`): its lock and its journal of
    /// host changes ([`forwarder::host::JOURNAL_FILE`]).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The journal of host changes, while the agent has one.
    pub fn journal_path(&self) -> PathBuf {
        self.state_dir.join(forwarder::host::JOURNAL_FILE)
    }

    /// Replaces the config file's contents (the agent reads it on SIGHUP).
    pub fn write_config(&self, config_toml: &str) -> Result<()> {
        std::fs::write(&self.config, config_toml)
            .with_context(|| format!("writing {}", self.config.display()))
    }

    /// A snapshot of the agent's counters (`forwarder stats --json`).
    pub fn stats(&self) -> Result<StatsSnapshot> {
        forwarder::telemetry::control::request_stats(&self.control)
            .with_context(|| format!("asking the agent for stats\n{}", self.logs()))
    }

    /// Polls [`AgentProcess::stats`] until `done` holds, for at most `timeout`; returns
    /// the first snapshot for which it holds, or an error showing the last one.
    pub fn wait_stats(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&StatsSnapshot) -> bool,
    ) -> Result<StatsSnapshot> {
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self.stats()?;
            if done(&stats) {
                return Ok(stats);
            }
            if Instant::now() >= deadline {
                bail!("counters did not reach the expected state within {timeout:?}: {stats:#?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGUSR1 (reopen the event log).
    pub fn sigusr1(&self) {
        self.child.signal(libc::SIGUSR1);
    }

    /// Sends SIGHUP (reload).
    pub fn sighup(&self) {
        self.child.signal(libc::SIGHUP);
    }

    /// SIGTERM, then waits up to [`STOP_TIMEOUT`] for the agent to exit; an agent still
    /// running then is killed and reported as an error.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.stop_with(libc::SIGTERM)
    }

    /// Like [`AgentProcess::stop`] with another signal (e.g. `libc::SIGINT`).
    pub fn stop_with(&mut self, signal: libc::c_int) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        self.child.signal(signal);
        self.wait_exit(STOP_TIMEOUT)
    }

    /// `SIGKILL` (what a crash or the OOM killer does: no clean-up at all), then
    /// reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = self.child.kill()?;
        self.status = Some(status);
        Ok(status)
    }

    /// Waits up to `timeout` for the agent to exit by itself. If it does not, it is
    /// killed and an error (with its output) is returned.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.status = Some(status);
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let killed = self.child.kill()?;
                self.status = Some(killed);
                bail!(
                    "forwarder run (pid {}) did not exit within {timeout:?}; killed\n{}",
                    self.child.id(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        if self.status.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.status = Some(status);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// What the agent wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// What the agent wrote to stderr so far (its log).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until the agent's log (stderr) contains `text`, for at most
    /// `timeout`; the error carries both outputs.
    pub fn wait_log(&self, text: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(text) {
            if Instant::now() >= deadline {
                bail!(
                    "no {text:?} in the agent's log within {timeout:?}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Both outputs, labelled, for error messages.
    pub fn logs(&self) -> String {
        format!(
            "--- forwarder stdout ---\n{}--- forwarder stderr ---\n{}--- end ---",
            self.stdout(),
            self.stderr()
        )
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.terminate(Duration::from_secs(5));
        }
        if std::thread::panicking() {
            eprintln!("agent {}:\n{}", self.dir.display(), self.logs());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How long a counter must stay at its expected value before
/// [`AgentProcess::wait_counter`] calls it settled (catches over-counting).
pub const SETTLE: Duration = Duration::from_millis(200);

impl AgentProcess {
    /// Waits (up to `timeout`) until `read(stats)` reaches `target`, then keeps
    /// reading for [`SETTLE`] to see whether it goes beyond; returns the last value
    /// read. Tests assert it equals `target`: an exact count, no sleep as
    /// synchronisation (packets sent before the call are normally counted already;
    /// the wait covers a deferred softirq).
    pub fn wait_counter(
        &self,
        timeout: Duration,
        target: u64,
        read: impl Fn(&StatsSnapshot) -> u64,
    ) -> Result<u64> {
        let stats = match self.wait_stats(timeout, |s| read(s) >= target) {
            Ok(stats) => stats,
            // Report the value seen instead of failing here: the caller's assertion
            // says what was expected.
            Err(_) => return Ok(read(&self.stats()?)),
        };
        let mut value = read(&stats);
        let settle = Instant::now() + SETTLE;
        while Instant::now() < settle && value == target {
            std::thread::sleep(Duration::from_millis(25));
            value = read(&self.stats()?);
        }
        Ok(value)
    }
}

/// The drop counter `reason` (`"no_app"`, `"firewall"`, …) of a snapshot.
pub fn drops(stats: &StatsSnapshot, reason: &str) -> u64 {
    stats.drops.get(reason).copied().unwrap_or(0)
}

/// Ingress packets of app `id` (0 for an unknown id).
pub fn app_ingress(stats: &StatsSnapshot, id: &str) -> u64 {
    stats.apps.get(id).map_or(0, |a| a.ingress_packets)
}

/// Packets the XDP program saw on `ifname` (0 when it is not listed).
pub fn iface_packets(stats: &StatsSnapshot, ifname: &str) -> u64 {
    stats.interfaces.get(ifname).map_or(0, |i| i.packets)
}

/// Hits of the access rule whose value is `rule`.
pub fn rule_hits(stats: &StatsSnapshot, rule: &str) -> u64 {
    stats.rule_hits.get(rule).copied().unwrap_or(0)
}

/// An XDP program on an interface, as `ip link show` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpAttachment {
    /// `xdp` (driver/native), `xdpgeneric` (skb), `xdpoffload` or `xdpmulti`.
    pub mode: String,
    /// `prog/xdp id N` (None when `ip` printed no id, e.g. for `xdpmulti`).
    pub prog_id: Option<u32>,
}

/// The XDP attachment of `ifname` in `ns` (`ip -n <ns> link show dev <ifname>`), or
/// `None` when no XDP program is attached.
pub fn xdp_attachment(ns: &crate::Netns, ifname: &str) -> Result<Option<XdpAttachment>> {
    let out = ns.ip(&["link", "show", "dev", ifname])?;
    Ok(parse_xdp_attachment(&out))
}

fn parse_xdp_attachment(ip_link: &str) -> Option<XdpAttachment> {
    let first = ip_link.lines().next()?;
    let mode = first
        .split_whitespace()
        .find(|w| w.starts_with("xdp"))?
        .to_owned();
    let words: Vec<&str> = ip_link.split_whitespace().collect();
    let prog_id = words
        .windows(3)
        .find(|w| w[0].starts_with("prog/xdp") && w[1] == "id")
        .and_then(|w| w[2].parse().ok());
    Some(XdpAttachment { mode, prog_id })
}

/// Ids of the sk_lookup BPF links attached to the network namespace `ns`, from
/// `bpftool link show` (links are global objects: each netns link names its
/// namespace by inode, `netns_ino`, compared with the inode of `/run/netns/<ns>`).
pub fn sk_lookup_links(ns: &crate::Netns) -> Result<Vec<u32>> {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata(ns.path())
        .with_context(|| format!("stat {}", ns.path().display()))?
        .ino();
    // bpftool lists link ids, then opens each: a link freed in between (another
    // test's process exiting) fails the whole listing with "can't get link by id".
    // Such a race is retried; a persistent failure is an error.
    let mut attempt = 0;
    let out = loop {
        let out = std::process::Command::new("bpftool")
            .args(["link", "show"])
            .output()
            .context("running bpftool link show")?;
        attempt += 1;
        if out.status.success() {
            break out;
        }
        if attempt >= 20 {
            bail!(
                "bpftool link show failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    Ok(parse_sk_lookup_links(
        &String::from_utf8_lossy(&out.stdout),
        ino,
    ))
}

/// Parses `bpftool link show` text: a link starts with `<id>: <type> …` at the
/// start of a line; its further lines are indented.
fn parse_sk_lookup_links(text: &str, netns_ino: u64) -> Vec<u32> {
    let mut links = Vec::new();
    let mut current: Option<(u32, Vec<&str>)> = None;
    let mut finish = |link: Option<(u32, Vec<&str>)>| {
        if let Some((id, words)) = link {
            let sk_lookup = words
                .windows(2)
                .any(|w| w[0] == "attach_type" && w[1] == "sk_lookup");
            let here = words
                .windows(2)
                .any(|w| w[0] == "netns_ino" && w[1].parse() == Ok(netns_ino));
            if sk_lookup && here {
                links.push(id);
            }
        }
    };
    for line in text.lines() {
        let starts_link = !line.starts_with(char::is_whitespace)
            && line
                .split_once(':')
                .is_some_and(|(id, _)| id.parse::<u32>().is_ok());
        if starts_link {
            finish(current.take());
            let (id, rest) = line.split_once(':').unwrap_or_default();
            let id = id.parse().unwrap_or_default();
            current = Some((id, rest.split_whitespace().collect()));
        } else if let Some((_, words)) = current.as_mut() {
            words.extend(line.split_whitespace());
        }
    }
    finish(current.take());
    links
}

/// Sends `count` UDP datagrams with `payload` from a socket bound to `bind` (port 0
/// for any) created inside `ns`, to `dst`. Returns the socket's local address.
pub fn udp_burst(
    ns: &crate::Netns,
    bind: std::net::SocketAddr,
    dst: std::net::SocketAddr,
    count: usize,
    payload: &[u8],
) -> Result<std::net::SocketAddr> {
    let socket = ns
        .run_in(|| std::net::UdpSocket::bind(bind))?
        .with_context(|| format!("binding a UDP socket to {bind} in {}", ns.name()))?;
    for i in 0..count {
        socket
            .send_to(payload, dst)
            .with_context(|| format!("sending datagram {i} to {dst}"))?;
    }
    Ok(socket.local_addr()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_link_xdp() {
        let drv = "7: fhhk-6-ec@if6: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 xdp qdisc noqueue state UP mode DEFAULT group default qlen 1000\n    link/ether 9a:1b:2c:3d:4e:5f brd ff:ff:ff:ff:ff:ff link-netns fwd-1-0-client\n    prog/xdp id 312 name xdp_forwarder tag 0123456789abcdef jited \n";
        assert_eq!(
            parse_xdp_attachment(drv),
            Some(XdpAttachment {
                mode: "xdp".into(),
                prog_id: Some(312)
            })
        );
        let generic = "7: eth0: <UP> mtu 1500 xdpgeneric qdisc noqueue\n    prog/xdp id 9 \n";
        assert_eq!(
            parse_xdp_attachment(generic).map(|a| a.mode),
            Some("xdpgeneric".into())
        );
        let none = "7: fhhk-6-ec@if6: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP\n    link/ether 9a:1b:2c:3d:4e:5f brd ff:ff:ff:ff:ff:ff link-netns fwd-1-0-client\n";
        assert_eq!(parse_xdp_attachment(none), None);
    }

    #[test]
    fn parses_bpftool_sk_lookup_links() {
        let text = "\
12: netns  prog 40  
\tnetns_ino 4026532256  attach_type sk_lookup  
\tpids forwarder(77)
13: xdp  prog 41  
\tifindex fhhk-6-ec(7)  
14: netns  prog 40  
\tnetns_ino 4026532999  attach_type sk_lookup  
15: netns  prog 42  
\tnetns_ino 4026532256  attach_type flow_dissector  
";
        assert_eq!(parse_sk_lookup_links(text, 4026532256), vec![12]);
        assert_eq!(parse_sk_lookup_links(text, 4026532999), vec![14]);
        assert_eq!(parse_sk_lookup_links(text, 1), Vec::<u32>::new());
        assert_eq!(parse_sk_lookup_links("", 1), Vec::<u32>::new());
    }
}
