//! System helpers of the benchmarks: CPU pinning, threaded NAPI, interface counters,
//! SNMP counters, nftables counters, tools, machine facts. Everything that reads or
//! writes namespace state does it inside the lab namespace.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use forwarder_tests::Netns;

/// Number of online CPUs (at least 1).
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Niceness of everything the benchmarks measure (threads, NAPI threads, proxies),
/// so that other work on a shared machine takes less of the measured CPUs.
pub const NICE: i32 = -20;

/// Pins thread `pid` (0: the calling thread) to `cpu` and gives it [`NICE`].
pub fn pin(pid: libc::pid_t, cpu: usize) -> Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = if pid == 0 {
        unsafe { libc::gettid() }
    } else {
        pid
    };
    // SAFETY: plain syscall on a thread id; affects that thread only.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, NICE);
    }
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe {
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
    }
    // SAFETY: valid set of the right size.
    let rc = unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pinning pid {pid} to CPU {cpu}"));
    }
    Ok(())
}

/// `napi/<ifname>…` as the kernel names the thread (comm is cut at 15 bytes).
fn napi_comm_prefix(ifname: &str) -> String {
    let full = format!("napi/{ifname}");
    full.chars().take(15).collect()
}

/// Kernel threads whose name starts with `prefix`.
fn kthreads_named(prefix: &str) -> Vec<libc::pid_t> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        if comm.trim_end().starts_with(prefix) {
            out.push(pid);
        }
    }
    out
}

/// The NAPI threads of `ifname` (threaded NAPI; see `threaded_napi`). Interfaces
/// whose names share the 15-byte prefix share the answer.
pub fn napi_threads(ifname: &str) -> Vec<libc::pid_t> {
    kthreads_named(&napi_comm_prefix(ifname))
}

/// Switches `ifname` (in `ns`) to threaded NAPI and pins its NAPI threads to `cpu`:
/// the interface's receive processing (its XDP program, and the stack after
/// XDP_PASS) then runs on `cpu` instead of on whichever CPU woke it. The interface
/// needs NAPI (a native XDP program on a veth). Returns the pinned thread ids.
///
/// The names are unique per lab and ≤ 11 bytes for the bench's labs, so the
/// 15-byte thread name keeps the role's first letter (`-c`, `-e`, `-o`); `ec` and
/// `eo` may share a prefix, and both always go to the edge CPU.
pub fn threaded_napi(ns: &Netns, ifname: &str, cpu: usize) -> Result<Vec<libc::pid_t>> {
    let path = format!("/sys/class/net/{ifname}/threaded");
    ns.run("sh", &["-c", &format!("echo 1 > {path}")])
        .with_context(|| format!("enabling threaded NAPI on {ifname}"))?;
    let prefix = napi_comm_prefix(ifname);
    let pids = crate::bench::wait_for(Duration::from_secs(3), Duration::from_millis(20), || {
        let pids = kthreads_named(&prefix);
        (!pids.is_empty()).then_some(pids)
    })
    .with_context(|| format!("no NAPI thread {prefix}* appeared for {ifname}"))?;
    for &pid in &pids {
        pin(pid, cpu)?;
    }
    Ok(pids)
}

/// Reads a counter of `/sys/class/net/<ifname>/statistics/` inside `ns`.
pub fn link_stat(ns: &Netns, ifname: &str, stat: &str) -> Result<u64> {
    let out = ns.run(
        "cat",
        &[format!("/sys/class/net/{ifname}/statistics/{stat}")],
    )?;
    out.trim()
        .parse()
        .with_context(|| format!("parsing {ifname} {stat}: {out:?}"))
}

/// A counter of `ethtool -S ifname` in `ns` (e.g. veth's
/// `tx_queue_0_xdp_xmit_errors`).
pub fn ethtool_stat(ns: &Netns, ifname: &str, stat: &str) -> Result<u64> {
    let out = ns.run("ethtool", &["-S", ifname])?;
    out.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .find(|(k, _)| k.trim() == stat)
        .with_context(|| format!("{ifname} has no ethtool counter {stat}"))?
        .1
        .trim()
        .parse()
        .with_context(|| format!("parsing {ifname} {stat}"))
}

/// The MAC address of `ifname` in `ns`.
pub fn mac(ns: &Netns, ifname: &str) -> Result<[u8; 6]> {
    let out = ns.ip(&["-br", "link", "show", "dev", ifname])?;
    let text = out
        .split_whitespace()
        .nth(2)
        .with_context(|| format!("no MAC in {out:?}"))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("bad MAC {text:?}");
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC {text:?}"))?;
    }
    Ok(mac)
}

/// The interface index of `ifname` in `ns`.
pub fn ifindex(ns: &Netns, ifname: &str) -> Result<u32> {
    let name = ifname.to_owned();
    ns.run_in(move || forwarder::datapath::ifindex(&name))?
}

/// One counter of `/proc/net/snmp` (e.g. `("Udp", "NoPorts")`) inside `ns`.
pub fn snmp(ns: &Netns, group: &str, field: &str) -> Result<u64> {
    let text = ns
        .run_in(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))?
        .context("reading /proc/net/snmp")?;
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no {group} lines in /proc/net/snmp");
    };
    let i = names
        .split_whitespace()
        .position(|n| n == field)
        .with_context(|| format!("no {group} {field} in /proc/net/snmp"))?;
    values
        .split_whitespace()
        .nth(i)
        .context("short snmp line")?
        .parse()
        .context("parsing an snmp counter")
}

/// Loads an nftables ruleset (`nft -f -`) inside `ns`.
pub fn nft_load(ns: &Netns, ruleset: &str) -> Result<()> {
    use std::io::Write as _;
    let mut cmd = ns.cmd("nft", &["-f", "-"]);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().context("running nft")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(ruleset.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft -f failed: {}\nruleset:\n{ruleset}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Packets of the named counter `table`/`counter` of family `family` in `ns`.
pub fn nft_counter(ns: &Netns, family: &str, table: &str, counter: &str) -> Result<u64> {
    let out = ns.run("nft", &["list", "counter", family, table, counter])?;
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets" {
            return words
                .next()
                .context("nft: no value after packets")?
                .parse()
                .context("parsing the nft counter");
        }
    }
    bail!("no packets in `nft list counter`: {out:?}")
}

/// Whether `program` is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A fresh private directory for configs and logs, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("fwd-bench-{}-{tag}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Facts about the machine for the report.
#[derive(Debug, Clone)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu_model: String,
    pub load: String,
}

impl Machine {
    pub fn read() -> Machine {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_default();
        let load = std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        Machine {
            nproc: online_cpus(),
            kernel,
            cpu_model,
            load,
        }
    }
}

/// Median, min and max of `v` (NaN when empty).
pub fn median_min_max(v: &[f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (median, s[0], s[n - 1])
}

/// Raises the scheduling weight of this process's autogroup (its session) to
/// [`NICE`] while alive, and puts the old value back on drop. With
/// `kernel.sched_autogroup_enabled`, niceness only ranks threads within a session;
/// against other sessions (other people's builds on a shared machine) only the
/// autogroup's own nice counts. No effect when autogroups are off.
#[derive(Debug)]
pub struct Boost {
    old: Option<i32>,
}

impl Boost {
    pub fn new() -> Boost {
        const PATH: &str = "/proc/self/autogroup";
        let old = std::fs::read_to_string(PATH).ok().and_then(|t| {
            t.split_whitespace()
                .skip_while(|w| *w != "nice")
                .nth(1)
                .and_then(|n| n.parse().ok())
        });
        if old.is_some() && std::fs::write(PATH, NICE.to_string()).is_err() {
            return Boost { old: None };
        }
        Boost { old }
    }

    /// Whether the autogroup was boosted.
    pub fn active(&self) -> bool {
        self.old.is_some()
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        if let Some(old) = self.old {
            let _ = std::fs::write("/proc/self/autogroup", old.to_string());
        }
    }
}

/// utime + stime of process `pid`, in seconds.
pub fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) end with ')'.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14, stime 15.
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// CPU seconds (user + system) of the children this process has waited for
/// (`getrusage(RUSAGE_CHILDREN)`): a finished command's cost, taken before and
/// after it.
pub fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Interrupt and softirq time of CPU `cpu` in seconds (`/proc/stat` irq and
/// softirq): receive and transmit work that ran in no task's name (threaded NAPI
/// runs in its threads and is counted there).
pub fn cpu_irq_seconds(cpu: usize) -> Result<f64> {
    cpu_stat_seconds(cpu, &[5, 6])
}

/// Busy time of CPU `cpu` in seconds (`/proc/stat`: user, nice, system, irq,
/// softirq and steal; idle and iowait left out): what everything pinned there,
/// interrupts and NAPI included, cost.
pub fn cpu_busy_seconds(cpu: usize) -> Result<f64> {
    // user nice system idle iowait irq softirq steal
    cpu_stat_seconds(cpu, &[0, 1, 2, 5, 6, 7])
}

/// The sum of the `/proc/stat` fields `fields` (0: user) of CPU `cpu`, in seconds.
fn cpu_stat_seconds(cpu: usize, fields: &[usize]) -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let name = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .with_context(|| format!("no {name} in /proc/stat"))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let busy: u64 = fields
        .iter()
        .map(|&i| ticks.get(i).copied().unwrap_or(0))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(busy as f64 / hz)
}

/// A CPU budget for a group of tasks while alive: a cgroup of its own with a CFS
/// quota (`share` of one CPU per `period`), the cgroup v1 `cpu` controller or
/// cgroup v2's `cpu.max`. Members are processes (all their threads move) or kernel
/// threads such as threaded NAPI's (cgroup v1 lets them move; v2 keeps most
/// kernel threads in the root, and the budget then fails with the reason). Only
/// the members' own CPU time is charged. Dropping it moves every member back to
/// the cgroup it came from and removes the cgroup.
#[derive(Debug)]
pub struct CpuBudget {
    dir: PathBuf,
    /// Each member and the cgroup it came from.
    members: Vec<(u32, PathBuf)>,
}

/// The share of one CPU every capped proxy gets (`tls`, and the `-capped`
/// variants of `tcp-throughput` and `tcp-connrate`): low enough that the proxy
/// process, not the lab's clients or generator CPU, is the limit.
pub const PROXY_CPU_SHARE: f64 = 0.15;
/// The CFS period of that budget: short, so the proxy runs in short slices
/// instead of the bursts of the 100 ms default.
pub const PROXY_CPU_PERIOD: Duration = Duration::from_millis(10);

impl CpuBudget {
    /// The cgroup hierarchy with the cpu controller: (mount point, whether v2).
    fn hierarchy() -> Result<(PathBuf, bool)> {
        if Path::new("/sys/fs/cgroup/cpu/cgroup.procs").exists() {
            Ok((PathBuf::from("/sys/fs/cgroup/cpu"), false))
        } else if std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"))
        {
            Ok((PathBuf::from("/sys/fs/cgroup"), true))
        } else {
            bail!("no cgroup cpu controller (neither v1 /sys/fs/cgroup/cpu nor v2 cpu.max)")
        }
    }

    /// Whether budgets can be set on this machine (the reason if not).
    pub fn available() -> Result<()> {
        CpuBudget::hierarchy().map(|_| ())
    }

    /// [`PROXY_CPU_SHARE`] of a CPU for process `pid`.
    pub fn proxy(tag: &str, pid: u32) -> Result<CpuBudget> {
        CpuBudget::new(tag, &[pid], PROXY_CPU_SHARE, PROXY_CPU_PERIOD)
    }

    /// `share` of one CPU per `period` for `pids` together (the first names the
    /// cgroup).
    pub fn new(tag: &str, pids: &[u32], share: f64, period: Duration) -> Result<CpuBudget> {
        let first = *pids.first().context("a budget for no task")?;
        let period_us = period.as_micros().max(1000) as u64;
        let quota_us = ((period_us as f64 * share) as u64).max(1000);
        let (mount, v2) = CpuBudget::hierarchy()?;
        let dir = mount.join(format!("forwarder-bench-{tag}-{first}"));
        if v2 {
            // The controller must be enabled for the root's children.
            let _ = std::fs::write(mount.join("cgroup.subtree_control"), "+cpu");
        }
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let mut budget = CpuBudget {
            dir: dir.clone(),
            members: Vec::new(),
        };
        if v2 {
            std::fs::write(dir.join("cpu.max"), format!("{quota_us} {period_us}"))
                .context("cpu.max")?;
        } else {
            std::fs::write(dir.join("cpu.cfs_period_us"), period_us.to_string())
                .context("cpu.cfs_period_us")?;
            std::fs::write(dir.join("cpu.cfs_quota_us"), quota_us.to_string())
                .context("cpu.cfs_quota_us")?;
        }
        for &pid in pids {
            let home = mount.join(own_cgroup(pid, v2)?);
            // Writing the pid to cgroup.procs moves every thread of the process.
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())
                .with_context(|| format!("moving {pid} into {}", dir.display()))?;
            budget.members.push((pid, home));
        }
        Ok(budget)
    }
}

/// The cgroup of the cpu hierarchy task `pid` is in, relative to its mount.
fn own_cgroup(pid: u32, v2: bool) -> Result<String> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("/proc/{pid}/cgroup"))?;
    cgroups
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let wanted = if v2 {
                controllers.is_empty()
            } else {
                controllers.split(',').any(|c| c == "cpu")
            };
            wanted.then(|| path.trim_start_matches('/').to_string())
        })
        .next()
        .with_context(|| format!("task {pid} is in no cgroup of the cpu hierarchy"))
}

impl Drop for CpuBudget {
    fn drop(&mut self) {
        for (pid, home) in &self.members {
            if let Err(e) = std::fs::write(home.join("cgroup.procs"), pid.to_string()) {
                eprintln!("   could not move {pid} back to {}: {e}", home.display());
            }
        }
        // Threads started while in the budget follow the process back; rmdir only
        // succeeds once the cgroup is empty.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
