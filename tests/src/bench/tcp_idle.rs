//! Scenario `tcp-idle`: 100,000 concurrent idle connections proxied by the real
//! agent, started with the shipped unit's open-file limit (`LimitNOFILE=1048576`,
//! soft = hard). The connections are opened once (prepare); each round then checks
//! that a fresh connection is still served and how fast, how fast `stats` and
//! `/metrics` answer, and what the held connections cost the agent (RSS and file
//! descriptors per connection).

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::agent::AgentProc;
use super::{Metric, Options, Scenario, Target, Variant};
use forwarder_tests::{EDGE_CLIENT_V4, Lab, NsTask, ORIGIN_V4};

/// The shipped unit's `LimitNOFILE`.
const UNIT_NOFILE: u64 = 1_048_576;
/// Edge (and origin) ports of the app: connections are spread over them, since one
/// destination offers the client at most ~64,000 source ports.
const PORT_LOW: u16 = 7400;
const PORTS: u16 = 4;
const METRICS: &str = "127.0.0.1:9478";
/// Connections being opened at once while building up.
const IN_FLIGHT: usize = 256;

/// Scenario `tcp-idle`.
#[derive(Default)]
pub struct TcpIdle {
    lab: Option<Lab>,
    agent: Option<AgentProc>,
    origin: Option<NsTask<()>>,
    /// The held client sockets.
    held: Vec<TcpStream>,
    /// Agent RSS (KiB) and open fds before the connections.
    baseline: (u64, u64),
    build_seconds: f64,
    /// The open-file limit the agent got (the unit's, or this machine's hard
    /// limit when lower).
    nofile: u64,
}

/// The connections the scenario aims at.
const GOAL: usize = 100_000;

impl TcpIdle {
    /// `GOAL`, or as many as `nofile` lets both the agent (2 fds per connection,
    /// 256 kept) and this process (client and origin sockets) hold.
    fn connections(opts: &Options, nofile: u64) -> usize {
        let fits = (nofile.saturating_sub(512) / 2) as usize;
        let goal = if opts.quick { 2_000 } else { GOAL };
        goal.min(fits)
    }
}

/// `VmRSS` of `pid`, KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()
        .context("VmRSS is not a number")
}

/// Open file descriptors of `pid`.
fn fd_count(pid: u32) -> Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// Sets this process's open-file limit (soft and hard) to `n`, or, without
/// `CAP_SYS_RESOURCE` to go above the hard limit, soft to the hard limit. Its
/// children (the agent) start with it, as under the unit. Returns the limit.
fn set_nofile(n: u64) -> Result<u64> {
    let limit = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        return Ok(n);
    }
    let (_, hard) = forwarder::fd_limit::raise_to_hard()?;
    Ok(hard)
}

/// A connection through the edge that got the origin's greeting byte.
async fn greeted(edge: SocketAddr) -> Result<tokio::net::TcpStream> {
    use tokio::io::AsyncReadExt as _;
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(edge),
    )
    .await
    .context("connect timed out")??;
    let mut byte = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut byte))
        .await
        .context("no greeting within 10 s")??;
    if byte != *b"h" {
        bail!("greeting {byte:?}");
    }
    Ok(s)
}

impl Scenario for TcpIdle {
    fn name(&self) -> &'static str {
        "tcp-idle"
    }

    fn title(&self) -> &'static str {
        "idle proxied TCP connections (goal 100,000) under the unit's limits"
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric {
                name: "held",
                unit: "connections",
                higher_is_better: true,
            },
            Metric {
                name: "fresh",
                unit: "ms to a greeting",
                higher_is_better: false,
            },
            Metric {
                name: "stats",
                unit: "ms",
                higher_is_better: false,
            },
            Metric {
                name: "metrics",
                unit: "ms",
                higher_is_better: false,
            },
            Metric {
                name: "rss",
                unit: "KiB/conn",
                higher_is_better: false,
            },
            Metric {
                name: "fds",
                unit: "fds/conn",
                higher_is_better: false,
            },
        ]
    }

    fn variants(&self) -> Vec<Variant> {
        vec![Variant {
            name: "forwarder",
            label: "forwarder (copy engine, the default)",
        }]
    }

    fn baseline(&self) -> &'static str {
        "forwarder"
    }

    fn targets(&self) -> Vec<Target> {
        vec![
            Target {
                text: "agent RSS per idle connection ≤ 16 KiB",
                variant: "forwarder",
                vs: None,
                metric: "rss",
                bound: 16.0,
                at_least: false,
            },
            Target {
                text: "stats answers within 100 ms with every connection held",
                variant: "forwarder",
                vs: None,
                metric: "stats",
                bound: 100.0,
                at_least: false,
            },
        ]
    }

    fn prepare(&mut self, opts: &Options) -> Result<()> {
        self.nofile = set_nofile(UNIT_NOFILE)?;
        let lab = Lab::new()?;
        // Source ports for 100,000 connections (lab namespaces only), and deep
        // accept queues at the origin.
        for ns in [lab.client(), lab.edge()] {
            ns.run(
                "sysctl",
                &["-qw", "net.ipv4.ip_local_port_range=1024 65535"],
            )?;
        }
        lab.origin()
            .run("sysctl", &["-qw", "net.core.somaxconn=65535"])?;
        let origin_ports: Vec<SocketAddr> = (0..PORTS)
            .map(|k| SocketAddr::from((ORIGIN_V4, PORT_LOW + k)))
            .collect();
        // The origin greets every connection with one byte and holds it.
        let origin = lab.origin().spawn_async(async move {
            use tokio::io::AsyncWriteExt as _;
            let mut listeners = Vec::new();
            for addr in origin_ports {
                let socket = tokio::net::TcpSocket::new_v4().expect("origin socket");
                socket.set_reuseaddr(true).expect("SO_REUSEADDR");
                socket.bind(addr).expect("origin bind");
                listeners.push(socket.listen(65_535).expect("origin listen"));
            }
            let mut accepts = tokio::task::JoinSet::new();
            for listener in listeners {
                accepts.spawn(async move {
                    let mut held = Vec::new();
                    loop {
                        if let Ok((mut s, _)) = listener.accept().await {
                            let _ = s.write_all(b"h").await;
                            held.push(s);
                        }
                    }
                });
            }
            while accepts.join_next().await.is_some() {}
        })?;
        let [ec, eo] = lab.edge_ifaces();
        let config = format!(
            "[agent]\ninterfaces = [\"{ec}\", \"{eo}\"]\nmetrics_listen = \"{METRICS}\"\n\n\
             [[apps]]\nid = \"idle\"\nprotocol = \"tcp/{PORT_LOW}-{}\"\n\
             origin_direct = [\"tcp://{ORIGIN_V4}:{PORT_LOW}-{}\"]\n",
            PORT_LOW + PORTS - 1,
            PORT_LOW + PORTS - 1,
        );
        let agent = AgentProc::start(&lab, &config, opts.edge_cpu)?;
        let pid = agent.pid().context("agent pid")?;
        self.baseline = (rss_kib(pid)?, fd_count(pid)?);
        let n = TcpIdle::connections(opts, self.nofile);
        let started = Instant::now();
        let held = lab.client().block_on(async move {
            let mut held = Vec::with_capacity(n);
            let mut pending = tokio::task::JoinSet::new();
            let mut next = 0usize;
            while held.len() < n {
                while next < n && pending.len() < IN_FLIGHT {
                    let port = PORT_LOW + (next % usize::from(PORTS)) as u16;
                    pending.spawn(greeted(SocketAddr::from((EDGE_CLIENT_V4, port))));
                    next += 1;
                }
                match pending.join_next().await {
                    Some(Ok(Ok(s))) => held.push(s.into_std()?),
                    Some(Ok(Err(e))) => return Err(e.context(format!("connection {}", held.len()))),
                    Some(Err(e)) => bail!("a connect task failed: {e}"),
                    None => break,
                }
            }
            Ok(held)
        })??;
        self.build_seconds = started.elapsed().as_secs_f64();
        self.held = held;
        self.lab = Some(lab);
        self.agent = Some(agent);
        self.origin = Some(origin);
        Ok(())
    }

    fn measure(&mut self, _variant: &str, _round: usize, opts: &Options) -> Result<Vec<f64>> {
        let lab = self.lab.as_ref().context("no lab")?;
        let agent = self.agent.as_ref().context("no agent")?;
        let pid = agent.pid().context("agent pid")?;
        let n = self.held.len() as f64;
        let asked = Instant::now();
        let fresh = lab
            .client()
            .block_on(greeted(SocketAddr::from((EDGE_CLIENT_V4, PORT_LOW))))??;
        let fresh_ms = asked.elapsed().as_secs_f64() * 1e3;
        drop(fresh);
        let asked = Instant::now();
        let stats = agent.stats()?;
        let stats_ms = asked.elapsed().as_secs_f64() * 1e3;
        let live = stats.apps.get("idle").map_or(0, |a| a.live);
        if (live as usize) < self.held.len() {
            bail!(
                "the agent holds {live} connections, {} expected",
                self.held.len()
            );
        }
        let asked = Instant::now();
        let text = lab.edge().run_in(|| -> Result<String> {
            use std::io::{Read as _, Write as _};
            let mut s = TcpStream::connect(METRICS)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: edge\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        })??;
        let metrics_ms = asked.elapsed().as_secs_f64() * 1e3;
        if !text.contains("forwarder_tcp_connections{app=\"idle\"}") {
            bail!("/metrics has no connection gauge:\n{text}");
        }
        let (rss0, fds0) = self.baseline;
        let rss = rss_kib(pid)?.saturating_sub(rss0) as f64 / n;
        let fds = fd_count(pid)?.saturating_sub(fds0) as f64 / n;
        let _ = opts;
        Ok(vec![n, fresh_ms, stats_ms, metrics_ms, rss, fds])
    }

    fn notes(&self, opts: &Options) -> Vec<String> {
        let mut notes = Vec::new();
        let n = TcpIdle::connections(opts, self.nofile);
        if n < GOAL && !opts.quick {
            notes.push(format!(
                "Held {n}, not {GOAL}: this machine's hard open-file limit is {} and the \
                 bench may not raise it (no CAP_SYS_RESOURCE here), so neither the agent \
                 (2 fds per connection) nor the bench's own clients and origin can hold \
                 more. The per-connection figures do not depend on the count.",
                self.nofile
            ));
        }
        notes.push(format!(
            "The real agent pinned to CPU {}, started with RLIMIT_NOFILE {} soft and \
             hard (the unit's LimitNOFILE is {UNIT_NOFILE}), one TCP app on ports {PORT_LOW}–{} (a client has \
             ~64,000 source ports per destination). {} connections opened {IN_FLIGHT} at a \
             time before the first round ({:.1} s), each greeted by the origin through the \
             proxy, then held idle. Per round: a fresh connection to its greeting, a \
             control-socket stats request, a /metrics scrape, and the agent's VmRSS and \
             open fds above what it had before the connections, per held connection.",
            opts.edge_cpu,
            self.nofile,
            PORT_LOW + PORTS - 1,
            n,
            self.build_seconds,
        ));
        notes
    }

    fn finish(&mut self) {
        self.held.clear();
        self.agent = None;
        self.origin = None;
        self.lab = None;
    }
}
