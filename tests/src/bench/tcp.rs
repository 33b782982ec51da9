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
use forwarder_tests::{EDGE_CLIENT_V4, Lab, NsTask, ORIGIN_V4};

/// Origin ports: iperf3 server, echo server.
pub(super) const IPERF_PORT: u16 = 5201;
pub(super) const ECHO_PORT: u16 = 8000;
/// The apps with `tcp_fastpath = "xdp"` listen on the origin port + this (same
/// origins).
const XDP_OFFSET: u16 = 1;
/// HAProxy listens on the origin port + this.
const HAPROXY_OFFSET: u16 = 10000;
/// Bytes each short connection sends and gets back.
const ECHO_LEN: usize = 64;
/// Concurrent connections of the connection-rate client.
const CONCURRENCY: usize = 8;

/// The two proxies a scenario compares, each with why it cannot run (if so).
pub(super) struct Proxies {
    pub(super) agent: Option<AgentProc>,
    pub(super) haproxy: Result<Proc, String>,
    pub(super) forwarder: Result<(), String>,
}

impl Proxies {
    /// The proxy process of `variant` (none for `direct`).
    pub(super) fn pid(&self, variant: &str) -> Option<u32> {
        match variant {
            "forwarder" | "forwarder-xdp" => self.agent.as_ref()?.pid(),
            "haproxy" => self.haproxy.as_ref().ok().map(|p| p.child.id()),
            _ => None,
        }
    }

    pub(super) fn unavailable(&self, variant: &str) -> Option<String> {
        match variant {
            "forwarder" | "forwarder-xdp" => self.forwarder.clone().err(),
            "haproxy" => self.haproxy.as_ref().err().cloned(),
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
    pub(super) fn with_iperf(opts: &Options) -> Result<TcpLab> {
        if !sys::have("iperf3") {
            bail!("iperf3 not installed");
        }
        TcpLab::new(opts, true)
    }

    pub(super) fn new(opts: &Options, with_iperf: bool) -> Result<TcpLab> {
        let lab = proxy_lab(opts)?;
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
        let config = format!(
            "[agent]\ninterfaces = [\"{ec}\", \"{eo}\"]\n\
             pass = [\"tcp/{}\", \"tcp/{}\"]\n\n\
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
        Ok(match variant {
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
            "direct" => SocketAddr::from((ORIGIN_V4, port)),
            other => bail!("unknown variant {other}"),
        })
    }

    pub(super) fn unavailable(&self, variant: &str) -> Option<String> {
        self.proxies.unavailable(variant)
    }

    pub(super) fn lab(&self) -> &Lab {
        &self.lab
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

/// A lab for comparing proxies: many short connections possible (`tcp_tw_reuse`, a
/// wide port range in client and edge), XDP_PASS stubs on the client and origin
/// veths, their NAPI threads on the generator CPU.
pub(super) fn proxy_lab(opts: &Options) -> Result<Lab> {
    let lab = Lab::new()?;
    for ns in [lab.client(), lab.edge()] {
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    }
    lab.attach_pass_stubs()?;
    sys::threaded_napi(lab.client(), &lab.ifaces().client, opts.gen_cpu)?;
    sys::threaded_napi(lab.origin(), &lab.ifaces().origin, opts.gen_cpu)?;
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

fn tcp_variants(direct: bool) -> Vec<Variant> {
    let mut v = vec![
        Variant {
            name: "forwarder",
            label: "forwarder TCP proxy (splice)",
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
    v
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
        vec![
            Metric {
                name: "throughput",
                unit: "Gbit/s",
                higher_is_better: true,
            },
            Metric {
                name: "proxy_cpu",
                unit: "µs CPU/MB",
                higher_is_better: false,
            },
        ]
    }

    fn variants(&self) -> Vec<Variant> {
        tcp_variants(true)
    }

    fn baseline(&self) -> &'static str {
        "haproxy"
    }

    fn targets(&self) -> Vec<Target> {
        vec![Target {
            text: "TCP throughput ≥ 1.0× HAProxy",
            variant: "forwarder",
            vs: Some("haproxy"),
            metric: "throughput",
            bound: 1.0,
            at_least: true,
        }]
    }

    fn prepare(&mut self, opts: &Options) -> Result<()> {
        self.tl = Some(TcpLab::with_iperf(opts)?);
        Ok(())
    }

    fn unavailable(&mut self, variant: &str, _opts: &Options) -> Option<String> {
        self.tl.as_ref()?.unavailable(variant)
    }

    fn measure(&mut self, variant: &str, _round: usize, opts: &Options) -> Result<Vec<f64>> {
        let tl = self.tl.as_ref().context("no lab")?;
        let addr = tl.variant_addr(variant, IPERF_PORT)?;
        let mut cmd = iperf_client(&tl.lab, addr, TcpThroughput::seconds(opts), opts.gen_cpu);
        let (out, cpu) = tl.with_proxy_cpu(variant, || {
            forwarder_tests::OutputOk::output_ok(&mut cmd).context("iperf3 client")
        })?;
        let mbps = iperf_receiver_mbps(&out)?;
        let mut values = vec![mbps / 1000.0];
        if let Some(cpu) = cpu {
            // Megabytes moved: the receiver's rate over the run.
            let megabytes = mbps * TcpThroughput::seconds(opts) as f64 / 8.0;
            values.push(cpu * 1e6 / megabytes.max(1e-9));
        }
        Ok(values)
    }

    fn notes(&self, opts: &Options) -> Vec<String> {
        vec![
            format!(
                "iperf3 -c … -t {} (one TCP stream, client → origin), receiver-side rate.",
                TcpThroughput::seconds(opts)
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

// ---------------------------------------------------------------------------------

/// Scenario `tcp-connrate`.
#[derive(Default)]
pub struct TcpConnRate {
    tl: Option<TcpLab>,
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
        vec![
            Metric {
                name: "conn_rate",
                unit: "conn/s",
                higher_is_better: true,
            },
            Metric {
                name: "proxy_cpu",
                unit: "µs CPU/conn",
                higher_is_better: false,
            },
        ]
    }

    fn variants(&self) -> Vec<Variant> {
        tcp_variants(true)
    }

    fn baseline(&self) -> &'static str {
        "haproxy"
    }

    fn targets(&self) -> Vec<Target> {
        vec![Target {
            text: "TCP connections/s ≥ 1.0× HAProxy",
            variant: "forwarder",
            vs: Some("haproxy"),
            metric: "conn_rate",
            bound: 1.0,
            at_least: true,
        }]
    }

    fn prepare(&mut self, opts: &Options) -> Result<()> {
        self.tl = Some(TcpLab::new(opts, false)?);
        Ok(())
    }

    fn unavailable(&mut self, variant: &str, _opts: &Options) -> Option<String> {
        self.tl.as_ref()?.unavailable(variant)
    }

    fn measure(&mut self, variant: &str, _round: usize, opts: &Options) -> Result<Vec<f64>> {
        let tl = self.tl.as_ref().context("no lab")?;
        let addr = tl.variant_addr(variant, ECHO_PORT)?;
        let ((ok, failed, elapsed), cpu) = tl.with_proxy_cpu(variant, || {
            conn_loop(&tl.lab, addr, TcpConnRate::duration(opts), opts.gen_cpu)
        })?;
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
        if let Some(cpu) = cpu {
            values.push(cpu * 1e6 / ok as f64);
        }
        Ok(values)
    }

    fn notes(&self, opts: &Options) -> Vec<String> {
        vec![
            format!(
                "Client: {CONCURRENCY} concurrent loops (tokio, one thread) of connect, write \
                 {ECHO_LEN} bytes, read them back, read EOF, close, for {:.1} s; origin: a \
                 tokio echo server that closes after answering.",
                TcpConnRate::duration(opts).as_secs_f64()
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
        tcp_variants(false)
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
        self.tl = Some(TcpLab::new(opts, false)?);
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
