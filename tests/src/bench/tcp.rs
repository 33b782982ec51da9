//! TCP scenarios: `tcp-throughput` (iperf3), `tcp-connrate` (short connections per
//! second) and `syn-flood` (legitimate connections while hping3 floods SYNs), each
//! comparing the forwarder's TCP proxy with HAProxy (`mode tcp`, `option
//! splice-auto`) and, where it makes sense, the direct routed path.
//!
//! Topology, the same for every variant: the agent runs with XDP on `ec` and `eo`
//! whatever the variant (HAProxy's port is in `pass`, the direct path is not
//! addressed to the edge), so every packet crosses the same XDP program. All four
//! veths have native XDP (the agent on the edge, the XDP_PASS stub on `cl`/`oe`) and
//! threaded NAPI: the edge's threads, the agent and HAProxy on the edge CPU; the
//! client's and origin's threads and programs on the generator CPU.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::agent::{AgentProc, Proc};
use super::sys::{self, TempDir};
use super::{Metric, Options, Scenario, Target, Variant};
use forwarder_tests::{EDGE_CLIENT_V4, Lab, Links, NsTask, ORIGIN_V4, Peers};

/// Origin ports: iperf3 server, echo server.
pub(super) const IPERF_PORT: u16 = 5201;
pub(super) const ECHO_PORT: u16 = 8000;
/// The apps with `tcp_fastpath = "xdp"` listen on the origin port + this (same
/// origins).
const XDP_OFFSET: u16 = 1;
/// HAProxy listens on the origin port + this.
const HAPROXY_OFFSET: u16 = 10000;
/// The `uring_floor` measurement proxy listens on the echo port + this.
const FLOOR_OFFSET: u16 = 20000;
/// Bytes each short connection sends and gets back.
const ECHO_LEN: usize = 64;
/// Concurrent connections of the connection-rate client.
const CONCURRENCY: usize = 8;

/// The two proxies a scenario compares, each with why it cannot run (if so).
pub(super) struct Proxies {
    pub(super) agent: Option<AgentProc>,
    pub(super) haproxy: Result<Proc, String>,
    pub(super) forwarder: Result<(), String>,
    /// The `uring_floor` proxy (`tcp-connrate` only).
    pub(super) floor: Result<Proc, String>,
}

impl Proxies {
    /// The proxy process of `variant` (none for `direct`).
    pub(super) fn pid(&self, variant: &str) -> Option<u32> {
        match uncapped(variant) {
            "forwarder" | "forwarder-xdp" => self.agent.as_ref()?.pid(),
            "haproxy" => self.haproxy.as_ref().ok().map(|p| p.child.id()),
            "uring-floor" => self.floor.as_ref().ok().map(|p| p.child.id()),
            _ => None,
        }
    }

    pub(super) fn unavailable(&self, variant: &str) -> Option<String> {
        match uncapped(variant) {
            "forwarder" | "forwarder-xdp" => self.forwarder.clone().err(),
            "haproxy" => self.haproxy.as_ref().err().cloned(),
            "uring-floor" => self.floor.as_ref().err().cloned(),
            _ => None,
        }
    }

    /// Stops HAProxy and the agent.
    pub(super) fn stop(&mut self) {
        self.haproxy = Err(String::new());
        if let Some(agent) = self.agent.take() {
            let _ = agent.stop();
        }
    }
}

/// The shared TCP topology of one scenario.
pub(super) struct TcpLab {
    lab: Lab,
    proxies: Proxies,
    _echo: NsTask<()>,
    iperf: Option<Proc>,
    dir: TempDir,
}

impl TcpLab {
    /// The lab with the iperf3 server (which must be installed).
    pub(super) fn with_iperf(opts: &Options, links: Links) -> Result<TcpLab> {
        if !sys::have("iperf3") {
            bail!("iperf3 not installed");
        }
        TcpLab::new(opts, true, links)
    }

    pub(super) fn new(opts: &Options, with_iperf: bool, links: Links) -> Result<TcpLab> {
        let lab = proxy_lab(opts, links)?;
        let dir = TempDir::new("tcp")?;
        let echo = start_echo(&lab, opts.gen_cpu)?;
        let iperf = if with_iperf && sys::have("iperf3") {
            let port = IPERF_PORT.to_string();
            Some(Proc::spawn(
                lab.origin(),
                opts.gen_cpu,
                "iperf3",
                &["-s", "-p", &port],
                dir.path().join("iperf3-server.log"),
            )?)
        } else {
            None
        };
        let [ec, eo] = lab.edge_ifaces();
        // `FORWARDER_BENCH_TCP_SPLICE=on|off|auto`: the agent's engine (diagnostics;
        // the default is the agent's own default).
        let engine = std::env::var("FORWARDER_BENCH_TCP_SPLICE")
            .ok()
            .filter(|e| ["on", "off", "auto"].contains(&e.as_str()))
            .map(|e| format!("tcp_splice = \"{e}\"\n"))
            .unwrap_or_default();
        // `FORWARDER_BENCH_TCP_ENGINE=epoll|io_uring`: the agent's `tcp_engine`
        // (the default is the agent's own default).
        let engine = engine
            + &std::env::var("FORWARDER_BENCH_TCP_ENGINE")
                .ok()
                .filter(|e| ["epoll", "io_uring"].contains(&e.as_str()))
                .map(|e| format!("tcp_engine = \"{e}\"\n"))
                .unwrap_or_default();
        let config = format!(
            "[agent]\ninterfaces = [\"{ec}\", \"{eo}\"]\n{engine}\
             pass = [\"tcp/{}\", \"tcp/{}\", \"tcp/{}\"]\n\n\
             [[apps]]\nid = \"iperf\"\nprotocol = \"tcp/{IPERF_PORT}\"\n\
             origin_direct = [\"tcp://{ORIGIN_V4}:{IPERF_PORT}\"]\n\n\
             [[apps]]\nid = \"echo\"\nprotocol = \"tcp/{ECHO_PORT}\"\n\
             origin_direct = [\"tcp://{ORIGIN_V4}:{ECHO_PORT}\"]\n\n\
             [[apps]]\nid = \"iperf-xdp\"\nprotocol = \"tcp/{}\"\n\
             origin_direct = [\"tcp://{ORIGIN_V4}:{IPERF_PORT}\"]\ntcp_fastpath = \"xdp\"\n\n\
             [[apps]]\nid = \"echo-xdp\"\nprotocol = \"tcp/{}\"\n\
             origin_direct = [\"tcp://{ORIGIN_V4}:{ECHO_PORT}\"]\ntcp_fastpath = \"xdp\"\n",
            IPERF_PORT + HAPROXY_OFFSET,
            ECHO_PORT + HAPROXY_OFFSET,
            ECHO_PORT + FLOOR_OFFSET,
            IPERF_PORT + XDP_OFFSET,
            ECHO_PORT + XDP_OFFSET
        );
        let agent = start_pinned_agent(&lab, &config, opts)?;
        let mut tl = TcpLab {
            lab,
            proxies: Proxies {
                agent: Some(agent),
                haproxy: Err(String::new()),
                forwarder: Ok(()),
                floor: Err("not started".into()),
            },
            _echo: echo,
            iperf,
            dir,
        };
        tl.proxies.haproxy = tl.start_haproxy(opts).map_err(|e| format!("{e:#}"));
        if tl.proxies.haproxy.is_ok()
            && let Err(e) = tl.echo_probe(SocketAddr::from((
                EDGE_CLIENT_V4,
                ECHO_PORT + HAPROXY_OFFSET,
            )))
        {
            tl.proxies.haproxy = Err(format!("HAProxy does not relay: {e:#}"));
        }
        tl.proxies.forwarder = tl
            .echo_probe(SocketAddr::from((EDGE_CLIENT_V4, ECHO_PORT)))
            .map_err(|e| {
                format!("the forwarder's TCP proxy does not relay (connect + echo through {EDGE_CLIENT_V4}:{ECHO_PORT}): {e:#}")
            });
        Ok(tl)
    }

    /// The `uring_floor` proxy (built beside this binary: `cargo xtask bench`
    /// builds every binary of forwarder-tests) on the echo port + `FLOOR_OFFSET`.
    fn start_floor(&self, opts: &Options) -> Result<Proc> {
        let bin = std::env::current_exe()?.with_file_name("uring_floor");
        if !bin.is_file() {
            bail!(
                "{} not built (cargo build --release -p forwarder-tests --bin uring_floor)",
                bin.display()
            );
        }
        let port = ECHO_PORT + FLOOR_OFFSET;
        let mut p = Proc::spawn(
            self.lab.edge(),
            opts.edge_cpu,
            &bin.display().to_string(),
            &[
                &format!("{EDGE_CLIENT_V4}:{port}"),
                &format!("{ORIGIN_V4}:{ECHO_PORT}"),
            ],
            self.dir.path().join("uring-floor.log"),
        )?;
        let addr = SocketAddr::from((EDGE_CLIENT_V4, port));
        let up = super::wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
            self.echo_probe(addr).ok()
        });
        p.check_running("uring_floor")?;
        if up.is_none() {
            bail!("uring_floor does not relay through {addr}");
        }
        Ok(p)
    }

    fn start_haproxy(&self, opts: &Options) -> Result<Proc> {
        let config = format!(
            "global\n    maxconn 4000\n    nbthread 1\n\n\
             defaults\n    mode tcp\n    option splice-auto\n    timeout connect 5s\n    \
             timeout client 60s\n    timeout server 60s\n\n\
             listen iperf\n    bind {EDGE_CLIENT_V4}:{}\n    server origin {ORIGIN_V4}:{IPERF_PORT}\n\n\
             listen echo\n    bind {EDGE_CLIENT_V4}:{}\n    server origin {ORIGIN_V4}:{ECHO_PORT}\n",
            IPERF_PORT + HAPROXY_OFFSET,
            ECHO_PORT + HAPROXY_OFFSET
        );
        start_haproxy(
            &self.lab,
            self.dir.path(),
            opts.edge_cpu,
            &config,
            ECHO_PORT + HAPROXY_OFFSET,
        )
    }

    /// One connect + echo from the client, 3 s at most.
    fn echo_probe(&self, addr: SocketAddr) -> Result<()> {
        self.lab.client().block_on(async move {
            tokio::time::timeout(Duration::from_secs(3), echo_once(addr))
                .await
                .context("timed out after 3 s")?
        })?
    }

    /// CPU seconds the proxy of `variant` spent while `run` ran, and its result.
    pub(super) fn with_proxy_cpu<T>(
        &self,
        variant: &str,
        run: impl FnOnce() -> Result<T>,
    ) -> Result<(T, Option<f64>)> {
        with_process_cpu(self.proxies.pid(variant), run)
    }

    pub(super) fn variant_addr(&self, variant: &str, port: u16) -> Result<SocketAddr> {
        Ok(match uncapped(variant) {
            "forwarder-xdp" => {
                if let Err(e) = &self.proxies.forwarder {
                    bail!("{e}");
                }
                SocketAddr::from((EDGE_CLIENT_V4, port + XDP_OFFSET))
            }
            "forwarder" => {
                if let Err(e) = &self.proxies.forwarder {
                    bail!("{e}");
                }
                SocketAddr::from((EDGE_CLIENT_V4, port))
            }
            "haproxy" => SocketAddr::from((EDGE_CLIENT_V4, port + HAPROXY_OFFSET)),
            "uring-floor" => SocketAddr::from((EDGE_CLIENT_V4, port + FLOOR_OFFSET)),
            "direct" => SocketAddr::from((ORIGIN_V4, port)),
            other => bail!("unknown variant {other}"),
        })
    }

    pub(super) fn unavailable(&self, variant: &str) -> Option<String> {
        self.proxies.unavailable(variant)
    }

    /// The proxy process of `variant` (none for `direct`).
    pub(super) fn proxy_pid(&self, variant: &str) -> Option<u32> {
        self.proxies.pid(variant)
    }

    pub(super) fn lab(&self) -> &Lab {
        &self.lab
    }

    /// Packets received and sent by the edge's two veths so far (every packet of
    /// both legs, counted once per leg it crosses).
    fn edge_packets(&self) -> Result<u64> {
        let mut total = 0;
        for ifname in self.lab.edge_ifaces() {
            for stat in ["rx_packets", "tx_packets"] {
                total += sys::link_stat(self.lab.edge(), ifname, stat)?;
            }
        }
        Ok(total)
    }

    /// The origin's iperf3 server process.
    pub(super) fn iperf_server_pid(&self) -> Option<u32> {
        self.iperf.as_ref().map(|p| p.child.id())
    }

    /// The agent's `tcp_fastpath = "xdp"` connections so far by outcome
    /// (`forwarder_tcp_fastpath_connections`: `spliced`, or why not).
    pub(super) fn fastpath_outcomes(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        let agent = self.proxies.agent.as_ref().context("no agent")?;
        Ok(agent.stats()?.tcp_fastpath)
    }

    pub(super) fn finish(mut self) {
        self.iperf = None;
        self.proxies.stop();
    }
}

/// A lab for comparing proxies, with wire-like peers on `links`: many short
/// connections possible (`tcp_tw_reuse`, a wide port range in client and edge),
/// XDP_PASS stubs on the client and origin veths (or the wires' redirects), all
/// their NAPI threads on the generator CPU.
pub(super) fn proxy_lab(opts: &Options, links: Links) -> Result<Lab> {
    let lab = Lab::with_links(Peers::WireLike, links)?;
    for ns in [lab.client(), lab.edge()] {
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    }
    lab.attach_pass_stubs()?;
    for (ns, ifname) in lab.generator_ifaces() {
        sys::threaded_napi(ns, &ifname, opts.gen_cpu)?;
    }
    Ok(lab)
}

/// The agent with `config` on the edge CPU, and the edge veths' NAPI threads there.
pub(super) fn start_pinned_agent(lab: &Lab, config: &str, opts: &Options) -> Result<AgentProc> {
    let agent = AgentProc::start(lab, config, opts.edge_cpu)?;
    let [ec, eo] = lab.edge_ifaces();
    sys::threaded_napi(lab.edge(), ec, opts.edge_cpu)?;
    sys::threaded_napi(lab.edge(), eo, opts.edge_cpu)?;
    Ok(agent)
}

/// HAProxy in `edge` on `cpu` with `config` (written to `dir`), once it listens on
/// `port`.
pub(super) fn start_haproxy(
    lab: &Lab,
    dir: &std::path::Path,
    cpu: usize,
    config: &str,
    port: u16,
) -> Result<Proc> {
    if !sys::have("haproxy") {
        bail!("haproxy not installed");
    }
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, config)?;
    let cfg_s = cfg.display().to_string();
    let mut p = Proc::spawn(
        lab.edge(),
        cpu,
        "haproxy",
        &["-db", "-f", &cfg_s],
        dir.join("haproxy.log"),
    )?;
    let port = format!("sport = :{port}");
    let up = super::wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
        lab.edge()
            .run("ss", &["-Hltn", &port])
            .ok()
            .filter(|s| !s.trim().is_empty())
    });
    p.check_running("haproxy")?;
    if up.is_none() {
        bail!("haproxy did not listen within 10 s");
    }
    Ok(p)
}

/// CPU seconds process `pid` spent while `run` ran (`None` without a pid), and
/// `run`'s result.
pub(super) fn with_process_cpu<T>(
    pid: Option<u32>,
    run: impl FnOnce() -> Result<T>,
) -> Result<(T, Option<f64>)> {
    let before = pid.map(sys::process_cpu_seconds).transpose()?;
    let out = run()?;
    let cpu = match (pid, before) {
        (Some(pid), Some(before)) => Some(sys::process_cpu_seconds(pid)? - before),
        _ => None,
    };
    Ok((out, cpu))
}

/// Suffix of a variant run under the CPU cap.
const CAPPED: &str = "-capped";

/// The variant without its `-capped` suffix (same proxy, same address).
pub(super) fn uncapped(variant: &str) -> &str {
    variant.strip_suffix(CAPPED).unwrap_or(variant)
}

/// Context switches of process `pid` so far, all its threads: (voluntary: it
/// slept, e.g. in epoll_wait, and was woken; involuntary: it was preempted).
fn context_switches(pid: u32) -> Result<(u64, u64)> {
    let (mut voluntary, mut involuntary) = (0, 0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            let value = |l: &str| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            };
            if line.starts_with("voluntary_ctxt_switches:") {
                voluntary += value(line).unwrap_or(0);
            } else if line.starts_with("nonvoluntary_ctxt_switches:") {
                involuntary += value(line).unwrap_or(0);
            }
        }
    }
    Ok((voluntary, involuntary))
}

/// What one round cost: the proxy process's CPU (`None` without one), the busy
/// time of the whole edge CPU and of the generator CPU (`/proc/stat`), in seconds,
/// and the round's wall time.
pub(super) struct RoundCpu {
    pub(super) proxy: Option<f64>,
    pub(super) edge: f64,
    pub(super) generator: f64,
    pub(super) wall: f64,
}

impl RoundCpu {
    /// Busy share of the edge and the generator CPU, in %.
    pub(super) fn busy_percent(&self) -> (f64, f64) {
        let wall = self.wall.max(1e-9);
        (self.edge * 100.0 / wall, self.generator * 100.0 / wall)
    }
}

/// Runs `run` with the CPU it costs measured (see [`RoundCpu`]); with
/// `FORWARDER_BENCH_PERF=DIR` set, `perf record -e cpu-clock -g` of the proxy
/// process meanwhile, into `DIR/TAG.data` (of the whole edge CPU instead, every
/// variant, with `FORWARDER_BENCH_PERF_EDGE=1`).
pub(super) fn with_round_cpu<T>(
    pid: Option<u32>,
    opts: &Options,
    tag: &str,
    run: impl FnOnce() -> Result<T>,
) -> Result<(T, RoundCpu)> {
    let edge = std::env::var_os("FORWARDER_BENCH_PERF_EDGE").is_some();
    let perf = match (pid, std::env::var_os("FORWARDER_BENCH_PERF")) {
        (_, Some(dir)) if edge => {
            let cpu = opts.edge_cpu.to_string();
            start_perf(&["-a", "-C", &cpu], std::path::Path::new(&dir), tag)
        }
        (Some(pid), Some(dir)) => {
            start_perf(&["-p", &pid.to_string()], std::path::Path::new(&dir), tag)
        }
        _ => None,
    };
    let start = Instant::now();
    let edge0 = sys::cpu_busy_seconds(opts.edge_cpu)?;
    let gen0 = sys::cpu_busy_seconds(opts.gen_cpu)?;
    let result = with_process_cpu(pid, run);
    let edge = sys::cpu_busy_seconds(opts.edge_cpu)? - edge0;
    let generator = sys::cpu_busy_seconds(opts.gen_cpu)? - gen0;
    let wall = start.elapsed().as_secs_f64();
    if let Some(perf) = perf {
        stop_perf(perf);
    }
    let (out, proxy) = result?;
    Ok((
        out,
        RoundCpu {
            proxy,
            edge,
            generator,
            wall,
        },
    ))
}

/// `perf record` of `target` (`-p PID`, `-a -C CPU`) into `dir/TAG.data`.
fn start_perf(target: &[&str], dir: &std::path::Path, tag: &str) -> Option<std::process::Child> {
    let out = dir.join(format!("{tag}.data"));
    let child = std::process::Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-g"])
        .args(target)
        .arg("-o")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match child {
        Ok(child) => {
            // perf needs a moment to attach.
            std::thread::sleep(Duration::from_millis(300));
            Some(child)
        }
        Err(e) => {
            eprintln!("   perf record: {e}");
            None
        }
    }
}

/// Stops the `perf record` this bench started (SIGINT, then at most 10 s).
fn stop_perf(mut child: std::process::Child) {
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A tokio server in `origin` on `ORIGIN_V4:port`, pinned to `cpu`, serving every
/// connection with `handle` on a task of its own.
pub(super) fn start_origin_server<F, Fut>(
    lab: &Lab,
    port: u16,
    cpu: usize,
    handle: F,
) -> Result<NsTask<()>>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = lab
        .origin()
        .run_in(move || std::net::TcpListener::bind((ORIGIN_V4, port)))??;
    listener.set_nonblocking(true)?;
    lab.origin().spawn_async(async move {
        let _ = sys::pin(0, cpu);
        let Ok(listener) = TcpListener::from_std(listener) else {
            return;
        };
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(handle(s));
        }
    })
}

/// The origin's echo server: reads `ECHO_LEN` bytes, writes them back, closes.
fn start_echo(lab: &Lab, cpu: usize) -> Result<NsTask<()>> {
    start_origin_server(lab, ECHO_PORT, cpu, |mut s| async move {
        let mut buf = [0u8; ECHO_LEN];
        if s.read_exact(&mut buf).await.is_ok() {
            let _ = s.write_all(&buf).await;
        }
        let _ = s.shutdown().await;
    })
}

/// Connect, send `ECHO_LEN` bytes, read them back and the close.
async fn echo_once(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect(addr).await.context("connect")?;
    s.set_nodelay(true)?;
    let out = [0x42u8; ECHO_LEN];
    s.write_all(&out).await.context("write")?;
    let mut back = [0u8; ECHO_LEN];
    s.read_exact(&mut back).await.context("read")?;
    if back != out {
        bail!("echo differs");
    }
    let mut rest = [0u8; 1];
    let n = s.read(&mut rest).await.context("read EOF")?;
    if n != 0 {
        bail!("extra bytes after the echo");
    }
    Ok(())
}

fn tcp_variants(direct: bool, capped: bool) -> Vec<Variant> {
    let mut v = vec![
        Variant {
            name: "forwarder",
            label: "forwarder TCP proxy",
        },
        Variant {
            name: "haproxy",
            label: "HAProxy mode tcp, splice-auto",
        },
    ];
    if direct {
        v.push(Variant {
            name: "direct",
            label: "direct, routed by the edge (no proxy)",
        });
    }
    if capped {
        v.push(Variant {
            name: "forwarder-capped",
            label: "forwarder TCP proxy, process capped at 15% of a CPU",
        });
        v.push(Variant {
            name: "haproxy-capped",
            label: "HAProxy, process capped at 15% of a CPU",
        });
    }
    v
}

/// The CPU-cap state of a scenario with `-capped` variants, and how busy the two
/// CPUs were in each variant's rounds (for the report's note on what the limit
/// was).
#[derive(Default)]
struct Capping {
    /// Whether budgets can be set here (`sys::CpuBudget::available`).
    cap: Option<Result<(), String>>,
    busy: std::collections::BTreeMap<String, Vec<(f64, f64)>>,
}

impl Capping {
    fn prepare(&mut self) {
        self.cap = Some(sys::CpuBudget::available().map_err(|e| format!("{e:#}")));
    }

    fn unavailable(&self, variant: &str) -> Option<String> {
        if !variant.ends_with(CAPPED) {
            return None;
        }
        match &self.cap {
            Some(Ok(_)) => None,
            Some(Err(e)) => Some(format!("no CPU cap: {e}")),
            None => Some("no CPU cap".into()),
        }
    }

    /// Records one round's busy shares (edge, generator) of `variant`.
    fn record(&mut self, variant: &str, cpu: &RoundCpu) {
        self.busy
            .entry(variant.to_string())
            .or_default()
            .push(cpu.busy_percent());
    }

    /// Per variant, what limited it, from the median busy shares: a CPU at 90 %
    /// or more was the limit; with neither, a capped proxy's budget was.
    fn limit_note(&self) -> String {
        let mut parts = Vec::new();
        for (variant, rounds) in &self.busy {
            let edge: Vec<f64> = rounds.iter().map(|r| r.0).collect();
            let generator: Vec<f64> = rounds.iter().map(|r| r.1).collect();
            let (edge, generator) = (
                sys::median_min_max(&edge).0,
                sys::median_min_max(&generator).0,
            );
            let limit = match (edge >= 90.0, generator >= 90.0) {
                (true, true) => "both CPUs (the lab)",
                (true, false) => "the edge CPU",
                (false, true) => "the generator CPU, not the proxy",
                (false, false) if variant.ends_with(CAPPED) => "the proxy's CPU budget",
                (false, false) => "neither CPU (latency, or the proxy)",
            };
            parts.push(format!(
                "{variant}: {limit} (edge {edge:.0} %, generator {generator:.0} % busy)"
            ));
        }
        // The direct path costs the edge a quarter to a half of its CPU: a busy
        // edge there means something else ran on the machine.
        let disturbed = self
            .busy
            .get("direct")
            .map(|rounds| rounds.iter().map(|r| r.0).collect::<Vec<f64>>())
            .map(|edge| sys::median_min_max(&edge).0)
            .filter(|&edge| edge >= 75.0)
            .map(|edge| {
                format!(
                    " DISTURBED RUN: the edge CPU was {edge:.0} % busy on the direct path, \
                     which costs it 25–50 %: something else ran on the machine."
                )
            })
            .unwrap_or_default();
        format!(
            "What limited each variant (median busy; 90 % or more counts as the limit): {}.{disturbed}",
            parts.join("; ")
        )
    }

    /// Holds the proxy of `variant` in the cap while the guard lives (capped
    /// variants only).
    fn hold(&self, variant: &str, pid: Option<u32>) -> Result<Option<sys::CpuBudget>> {
        if !variant.ends_with(CAPPED) {
            return Ok(None);
        }
        if !matches!(self.cap, Some(Ok(()))) {
            bail!("no CPU cap");
        }
        let pid = pid.context("a capped variant without a proxy process")?;
        sys::CpuBudget::proxy(variant, pid).map(Some)
    }
}

/// The metrics every TCP round reports beside its rate: the proxy's CPU and the
/// whole edge CPU's per `per`, and how busy the edge and generator CPUs were.
fn cpu_metrics(per: &'static str, edge_per: &'static str) -> Vec<Metric> {
    vec![
        Metric {
            name: "proxy_cpu",
            unit: per,
            higher_is_better: false,
        },
        Metric {
            name: "edge_cpu_busy",
            unit: edge_per,
            higher_is_better: false,
        },
        Metric {
            name: "edge_busy",
            unit: "% edge CPU busy",
            higher_is_better: false,
        },
        Metric {
            name: "gen_busy",
            unit: "% generator CPU busy",
            higher_is_better: false,
        },
    ]
}

/// The values of [`cpu_metrics`] for a round that moved `units` (MB, connections).
fn cpu_values(cpu: &RoundCpu, units: f64) -> Vec<f64> {
    let units = units.max(1e-9);
    let (edge_busy, gen_busy) = cpu.busy_percent();
    vec![
        cpu.proxy.map_or(f64::NAN, |p| p * 1e6 / units),
        cpu.edge * 1e6 / units,
        edge_busy,
        gen_busy,
    ]
}

/// The report's note on the CPU columns.
fn cpu_note(opts: &Options) -> String {
    format!(
        "CPU columns: proxy = utime + stime of the proxy process (/proc/PID/stat); edge = \
         busy time of the whole edge CPU {} (/proc/stat: user, nice, system, irq, \
         softirq, steal: the proxy, the edge's NAPI threads, and whatever else runs \
         there); busy % = the edge's and the generator's (CPU {}) busy time over the \
         round. A generator CPU near 100 % means the generator, not the proxy, was the \
         limit. `-capped` variants: the proxy process (all its threads) in a cgroup \
         with a CFS quota of {:.0} % of one CPU per {} ms (sys::CpuBudget), the same \
         budget for both proxies; softirq work (the edge's NAPI threads) is not charged \
         to it.",
        opts.edge_cpu,
        opts.gen_cpu,
        sys::PROXY_CPU_SHARE * 100.0,
        sys::PROXY_CPU_PERIOD.as_millis()
    )
}

pub(super) fn pinning_note(opts: &Options) -> String {
    format!(
        "Pinned: edge NAPI threads (ec, eo), the agent and HAProxy on CPU {}; client \
         and origin NAPI threads (cl, oe, XDP_PASS stubs), clients, servers and \
         generators on CPU {}. The agent's XDP program is attached on ec/eo in every \
         variant (HAProxy's ports are in `pass`; the direct path is not addressed to \
         the edge).",
        opts.edge_cpu, opts.gen_cpu
    )
}

// ---------------------------------------------------------------------------------

/// Scenario `tcp-throughput`.
#[derive(Default)]
pub struct TcpThroughput {
    tl: Option<TcpLab>,
    capping: Capping,
}

impl TcpThroughput {
    fn seconds(opts: &Options) -> u64 {
        iperf_seconds(opts)
    }
}

/// How long one iperf3 run lasts.
pub(super) fn iperf_seconds(opts: &Options) -> u64 {
    opts.duration(Duration::from_secs(3), Duration::from_secs(1))
        .as_secs()
        .max(1)
}

/// One iperf3 stream client → `addr` for `secs`, from the client namespace on
/// CPU `gen_cpu` (30 s at most).
pub(super) fn iperf_client(
    lab: &Lab,
    addr: SocketAddr,
    secs: u64,
    gen_cpu: usize,
) -> std::process::Command {
    let secs = secs.to_string();
    let gen_cpu = gen_cpu.to_string();
    lab.client().cmd(
        "timeout",
        &[
            "30",
            "nice",
            "-n",
            "-20",
            "taskset",
            "-c",
            &gen_cpu,
            "iperf3",
            "-c",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
            "-t",
            &secs,
            "-f",
            "m",
        ],
    )
}

/// Mbit/s of the `receiver` summary line of iperf3's text output (`-f m`).
pub(super) fn iperf_receiver_mbps(out: &str) -> Result<f64> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with("receiver"))
        .with_context(|| format!("no receiver line in iperf3 output:\n{out}"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| *w == "Mbits/sec")
        .with_context(|| format!("no Mbits/sec in {line:?}"))?;
    words
        .get(i.wrapping_sub(1))
        .context("no number before Mbits/sec")?
        .parse()
        .context("parsing iperf3's rate")
}

impl Scenario for TcpThroughput {
    fn name(&self) -> &'static str {
        "tcp-throughput"
    }

    fn title(&self) -> &'static str {
        "TCP bulk throughput through the edge (iperf3, one stream)"
    }

    fn metrics(&self) -> Vec<Metric> {
        let mut m = vec![Metric {
            name: "throughput",
            unit: "Gbit/s",
            higher_is_better: true,
        }];
        m.extend(cpu_metrics("µs proxy CPU/MB", "µs edge CPU busy/MB"));
        m.push(Metric {
            name: "packets",
            unit: "packets/MB at the edge",
            higher_is_better: false,
        });
        m
    }

    fn variants(&self) -> Vec<Variant> {
        tcp_variants(true, true)
    }

    fn baseline(&self) -> &'static str {
        "haproxy"
    }

    fn targets(&self) -> Vec<Target> {
        vec![
            Target {
                text: "TCP throughput ≥ 1.2× HAProxy, same CPU budget (both capped)",
                variant: "forwarder-capped",
                vs: Some("haproxy-capped"),
                metric: "throughput",
                bound: 1.2,
                at_least: true,
            },
            Target {
                text: "TCP throughput ≥ 1.2× HAProxy, uncapped (bounded by the direct path)",
                variant: "forwarder",
                vs: Some("haproxy"),
                metric: "throughput",
                bound: 1.2,
                at_least: true,
            },
        ]
    }

    fn prepare(&mut self, opts: &Options) -> Result<()> {
        self.capping.prepare();
        self.tl = Some(TcpLab::with_iperf(opts, Links::Direct)?);
        Ok(())
    }

    fn unavailable(&mut self, variant: &str, _opts: &Options) -> Option<String> {
        self.capping
            .unavailable(variant)
            .or_else(|| self.tl.as_ref()?.unavailable(variant))
    }

    fn measure(&mut self, variant: &str, round: usize, opts: &Options) -> Result<Vec<f64>> {
        let tl = self.tl.as_ref().context("no lab")?;
        let addr = tl.variant_addr(variant, IPERF_PORT)?;
        let secs = TcpThroughput::seconds(opts);
        let mut cmd = iperf_client(&tl.lab, addr, secs, opts.gen_cpu);
        let pid = tl.proxies.pid(variant);
        let capped = self.capping.hold(variant, pid)?;
        let tag = format!("tcp-throughput-{variant}-{round}");
        let packets0 = tl.edge_packets()?;
        let (out, cpu) = with_round_cpu(pid, opts, &tag, || {
            forwarder_tests::OutputOk::output_ok(&mut cmd).context("iperf3 client")
        })?;
        let packets = tl.edge_packets()?.saturating_sub(packets0);
        drop(capped);
        self.capping.record(variant, &cpu);
        let mbps = iperf_receiver_mbps(&out)?;
        // Megabytes moved: the receiver's rate over the run.
        let megabytes = mbps * secs as f64 / 8.0;
        let mut values = vec![mbps / 1000.0];
        values.extend(cpu_values(&cpu, megabytes));
        values.push(packets as f64 / megabytes.max(1e-9));
        Ok(values)
    }

    fn notes(&self, opts: &Options) -> Vec<String> {
        vec![
            format!(
                "iperf3 -c … -t {} (one TCP stream, client → origin), receiver-side rate. \
                 packets/MB: what the edge's veths ec and eo received and sent during the \
                 run (both legs, data and ACKs; a routed packet crosses both) per MB \
                 received.",
                TcpThroughput::seconds(opts)
            ),
            cpu_note(opts),
            self.capping.limit_note(),
            pinning_note(opts),
        ]
    }

    fn finish(&mut self) {
        if let Some(tl) = self.tl.take() {
            tl.finish();
        }
    }
}

// ---------------------------------------------------------------------------------

/// Scenario `tcp-connrate`.
#[derive(Default)]
pub struct TcpConnRate {
    tl: Option<TcpLab>,
    capping: Capping,
}

impl TcpConnRate {
    fn duration(opts: &Options) -> Duration {
        opts.duration(Duration::from_secs(2), Duration::from_millis(500))
    }
}

/// Runs `CONCURRENCY` loops of connect + echo + close against `addr` for `duration`
/// from the client namespace; returns (successes, failures, elapsed).
pub(super) fn conn_loop(
    lab: &Lab,
    addr: SocketAddr,
    duration: Duration,
    cpu: usize,
) -> Result<(u64, u64, Duration)> {
    lab.client().block_on(async move {
        let _ = sys::pin(0, cpu);
        let start = Instant::now();
        let deadline = start + duration;
        let mut tasks = Vec::new();
        for _ in 0..CONCURRENCY {
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, 0u64);
                // Bounded in time and in count.
                for _ in 0..10_000_000u64 {
                    if Instant::now() >= deadline {
                        break;
                    }
                    match tokio::time::timeout(Duration::from_secs(2), echo_once(addr)).await {
                        Ok(Ok(())) => ok += 1,
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            }));
        }
        let (mut ok, mut failed) = (0, 0);
        for t in tasks {
            let (o, f) = t.await.unwrap_or((0, 1));
            ok += o;
            failed += f;
        }
        (ok, failed, start.elapsed())
    })
}

impl Scenario for TcpConnRate {
    fn name(&self) -> &'static str {
        "tcp-connrate"
    }

    fn title(&self) -> &'static str {
        "short TCP connections per second (connect, 64-byte echo, close)"
    }

    fn metrics(&self) -> Vec<Metric> {
        let mut m = vec![Metric {
            name: "conn_rate",
            unit: "conn/s",
            higher_is_better: true,
        }];
        m.extend(cpu_metrics("µs proxy CPU/conn", "µs edge CPU busy/conn"));
        m.push(Metric {
            name: "packets",
            unit: "packets/conn at the edge",
            higher_is_better: false,
        });
        m.push(Metric {
            name: "wakeups",
            unit: "proxy wake-ups/conn",
            higher_is_better: false,
        });
        m.push(Metric {
            name: "preempted",
            unit: "proxy preemptions/conn",
            higher_is_better: false,
        });
        m
    }

    fn variants(&self) -> Vec<Variant> {
        let mut v = tcp_variants(true, true);
        v.extend([
            Variant {
                name: "uring-floor",
                label: "io_uring floor: a minimal proxy (tests/src/bin/uring_floor.rs)",
            },
            Variant {
                name: "uring-floor-capped",
                label: "io_uring floor, process capped at 15% of a CPU",
            },
        ]);
        v
    }

    fn baseline(&self) -> &'static str {
        "haproxy"
    }

    fn targets(&self) -> Vec<Target> {
        vec![
            Target {
                text: "TCP connections/s ≥ 1.1× HAProxy",
                variant: "forwarder",
                vs: Some("haproxy"),
                metric: "conn_rate",
                bound: 1.1,
                at_least: true,
            },
            Target {
                text: "TCP connections/s ≥ 1.1× HAProxy, same CPU budget (both capped)",
                variant: "forwarder-capped",
                vs: Some("haproxy-capped"),
                metric: "conn_rate",
                bound: 1.1,
                at_least: true,
            },
        ]
    }

    fn prepare(&mut self, opts: &Options) -> Result<()> {
        self.capping.prepare();
        let mut tl = TcpLab::new(opts, false, Links::Direct)?;
        tl.proxies.floor = tl.start_floor(opts).map_err(|e| format!("{e:#}"));
        self.tl = Some(tl);
        Ok(())
    }

    fn unavailable(&mut self, variant: &str, _opts: &Options) -> Option<String> {
        self.capping
            .unavailable(variant)
            .or_else(|| self.tl.as_ref()?.unavailable(variant))
    }

    fn measure(&mut self, variant: &str, round: usize, opts: &Options) -> Result<Vec<f64>> {
        let tl = self.tl.as_ref().context("no lab")?;
        let addr = tl.variant_addr(variant, ECHO_PORT)?;
        let pid = tl.proxies.pid(variant);
        let capped = self.capping.hold(variant, pid)?;
        let tag = format!("tcp-connrate-{variant}-{round}");
        let packets0 = tl.edge_packets()?;
        let switches0 = pid.map(context_switches).transpose()?;
        let ((ok, failed, elapsed), cpu) = with_round_cpu(pid, opts, &tag, || {
            conn_loop(&tl.lab, addr, TcpConnRate::duration(opts), opts.gen_cpu)
        })?;
        let packets = tl.edge_packets()?.saturating_sub(packets0);
        drop(capped);
        self.capping.record(variant, &cpu);
        let switches = match (pid, switches0) {
            (Some(pid), Some((v0, i0))) => {
                let (v, i) = context_switches(pid)?;
                (
                    v.saturating_sub(v0) as f64 / ok.max(1) as f64,
                    i.saturating_sub(i0) as f64 / ok.max(1) as f64,
                )
            }
            _ => (f64::NAN, f64::NAN),
        };
        if ok == 0 {
            bail!("no connection succeeded ({failed} failed)");
        }
        if failed > ok / 100 {
            eprintln!(
                "   {variant}: {failed} of {} connections failed",
                ok + failed
            );
        }
        let mut values = vec![ok as f64 / elapsed.as_secs_f64()];
        values.extend(cpu_values(&cpu, ok as f64));
        values.push(packets as f64 / ok as f64);
        values.push(switches.0);
        values.push(switches.1);
        Ok(values)
    }

    fn notes(&self, opts: &Options) -> Vec<String> {
        vec![
            format!(
                "Client: {CONCURRENCY} concurrent loops (tokio, one thread) of connect, write \
                 {ECHO_LEN} bytes, read them back, read EOF, close, for {:.1} s; origin: a \
                 tokio echo server that closes after answering. packets/conn: what the \
                 edge's veths ec and eo received and sent during the round, per connection \
                 (a routed packet crosses both: the direct path counts each twice). \
                 wake-ups / preemptions: the proxy process's voluntary / involuntary \
                 context switches (/proc/PID/task/*/status) per connection.",
                TcpConnRate::duration(opts).as_secs_f64()
            ),
            "uring-floor: not a product, a measurement (tests/src/bin/uring_floor.rs): a \
             minimal proxy whose per-connection syscalls (accept, connect, recv, send, \
             shutdown, close) go to io_uring in batches. It does less than the agent (no \
             getsockname, origin choice, timeouts, PROXY header, RST passing, events or \
             counters): read it as the floor an io_uring engine could reach."
                .to_string(),
            cpu_note(opts),
            self.capping.limit_note(),
            pinning_note(opts),
        ]
    }

    fn finish(&mut self) {
        if let Some(tl) = self.tl.take() {
            tl.finish();
        }
    }
}

// ---------------------------------------------------------------------------------

/// Scenario `syn-flood`.
#[derive(Default)]
pub struct SynFlood {
    tl: Option<TcpLab>,
}

impl SynFlood {
    fn duration(opts: &Options) -> Duration {
        opts.duration(Duration::from_secs(3), Duration::from_secs(1))
    }
}

/// Legitimate connections at a fixed pace (one every 10 ms) during `duration`, each
/// allowed 3 s: (success ratio %, median ms, p99 ms of the successful ones).
fn paced_probes(
    lab: &Lab,
    addr: SocketAddr,
    duration: Duration,
    cpu: usize,
) -> Result<(f64, f64, f64, usize)> {
    lab.client().block_on(async move {
        let _ = sys::pin(0, cpu);
        let attempts = (duration.as_millis() / 10).max(1) as usize;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut tasks = Vec::with_capacity(attempts);
        for _ in 0..attempts {
            tick.tick().await;
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                match tokio::time::timeout(Duration::from_secs(3), echo_once(addr)).await {
                    Ok(Ok(())) => Some(t.elapsed()),
                    _ => None,
                }
            }));
        }
        let mut lat: Vec<f64> = Vec::new();
        for t in tasks {
            if let Ok(Some(d)) = t.await {
                lat.push(d.as_secs_f64() * 1000.0);
            }
        }
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                f64::NAN
            } else {
                lat[((lat.len() - 1) as f64 * p).round() as usize]
            }
        };
        (
            lat.len() as f64 * 100.0 / attempts as f64,
            pct(0.5),
            pct(0.99),
            attempts,
        )
    })
}

impl Scenario for SynFlood {
    fn name(&self) -> &'static str {
        "syn-flood"
    }

    fn title(&self) -> &'static str {
        "legitimate connections during a SYN flood (hping3 --flood -S --rand-source)"
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric {
                name: "success",
                unit: "% legit ok",
                higher_is_better: true,
            },
            Metric {
                name: "latency_p50",
                unit: "ms p50",
                higher_is_better: false,
            },
            Metric {
                name: "latency_p99",
                unit: "ms p99",
                higher_is_better: false,
            },
            Metric {
                name: "flood",
                unit: "kpps SYN",
                higher_is_better: true,
            },
        ]
    }

    fn variants(&self) -> Vec<Variant> {
        tcp_variants(false, false)
    }

    fn baseline(&self) -> &'static str {
        "haproxy"
    }

    fn targets(&self) -> Vec<Target> {
        vec![Target {
            text: "legitimate success during a SYN flood ≥ 99%",
            variant: "forwarder",
            vs: None,
            metric: "success",
            bound: 99.0,
            at_least: true,
        }]
    }

    fn prepare(&mut self, opts: &Options) -> Result<()> {
        self.tl = Some(TcpLab::new(opts, false, Links::Direct)?);
        Ok(())
    }

    fn unavailable(&mut self, variant: &str, _opts: &Options) -> Option<String> {
        if !sys::have("hping3") {
            return Some("hping3 not installed".into());
        }
        self.tl.as_ref()?.unavailable(variant)
    }

    fn measure(&mut self, variant: &str, _round: usize, opts: &Options) -> Result<Vec<f64>> {
        let tl = self.tl.as_ref().context("no lab")?;
        let addr = tl.variant_addr(variant, ECHO_PORT)?;
        let duration = SynFlood::duration(opts);
        let ec = tl.lab.ifaces().edge_client.clone();
        let rx0 = sys::link_stat(tl.lab.edge(), &ec, "rx_packets")?;
        let t0 = Instant::now();
        // Bounded twice: `timeout` and the NsChild dropped at the end of this scope.
        let limit = format!("{}", duration.as_secs() + 2);
        let port = addr.port().to_string();
        let ip = addr.ip().to_string();
        let mut flood = Proc::spawn(
            tl.lab.client(),
            opts.gen_cpu,
            "timeout",
            &[
                "-s",
                "INT",
                &limit,
                "hping3",
                "--flood",
                "-q",
                "-S",
                "-p",
                &port,
                "--rand-source",
                &ip,
            ],
            tl.dir.path().join("hping3.log"),
        )?;
        std::thread::sleep(Duration::from_millis(300));
        flood.check_running("hping3")?;
        let probes = paced_probes(&tl.lab, addr, duration, opts.gen_cpu);
        let rx1 = sys::link_stat(tl.lab.edge(), &ec, "rx_packets")?;
        let elapsed = t0.elapsed();
        drop(flood);
        let (success, p50, p99, _) = probes?;
        let kpps = rx1.saturating_sub(rx0) as f64 / elapsed.as_secs_f64() / 1000.0;
        Ok(vec![success, p50, p99, kpps])
    }

    fn notes(&self, opts: &Options) -> Vec<String> {
        vec![
            format!(
                "hping3 --flood -S --rand-source (bounded by timeout) from the client \
                 namespace during {:.1} s, legitimate connect + 64-byte echo every 10 ms, \
                 each allowed 3 s (a dropped SYN costs a 1 s retransmission and shows in \
                 p99). Spoofed sources have no route back: the edge has no default route, \
                 so SYN-ACKs die in the edge. SYN cookies are the kernel default \
                 (net.ipv4.tcp_syncookies=1) for both proxies. 'kpps SYN' is what ec \
                 received during the round.",
                SynFlood::duration(opts).as_secs_f64()
            ),
            pinning_note(opts),
        ]
    }

    fn finish(&mut self) {
        if let Some(tl) = self.tl.take() {
            tl.finish();
        }
    }
}
