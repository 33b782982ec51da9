//! Scenario `udp-spoof-flood`: legitimate UDP flows through the real agent while
//! `hping3 --flood --rand-source` hits a sibling NAT app (same flow tables, same
//! NAT port pool), against the same flows without the flood.
//!
//! Per round: the legitimate clients' delivered ratio (replies / requests, two
//! flows — SPP and plain NAT — assured before the first round, 200 requests/s
//! each), the slowest `stats` answer (polled every 100 ms), event-log bytes
//! written per second, the agent's CPU (utime + stime of the process) and the
//! flood's rate as the edge received it.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::agent::AgentProc;
use super::sys::{self, TempDir};
use super::{Metric, Options, Scenario, Target, Variant};
use forwarder_tests::spp_origin::{SppEchoOrigin, UdpEchoOrigin};
use forwarder_tests::{CLIENT_V4, EDGE_CLIENT_V4, Lab, ORIGIN_V4};

const SPP_PORT: u16 = 7000;
const NAT_PORT: u16 = 7001;
const FLOODED_PORT: u16 = 7003;
/// The same, with `udp_new_flows_per_second = LIMITED_RATE`.
const LIMITED_PORT: u16 = 7004;
const LIMITED_RATE: u32 = 1000;
/// Requests per second of each legitimate client.
const LEGIT_RATE: u32 = 200;
/// Upper bound of the flood's packets per round, whatever the duration.
const FLOOD_MAX_PACKETS: u64 = 50_000_000;

/// Scenario `udp-spoof-flood`.
#[derive(Default)]
pub struct UdpSpoofFlood {
    lab: Option<Lab>,
    agent: Option<AgentProc>,
    origins: Option<(SppEchoOrigin, UdpEchoOrigin)>,
    /// The legitimate clients' sockets (client namespace), flows assured.
    clients: Vec<(UdpSocket, SocketAddr)>,
    dir: Option<TempDir>,
}

impl UdpSpoofFlood {
    fn duration(opts: &Options) -> Duration {
        opts.duration(Duration::from_secs(5), Duration::from_secs(1))
    }

    fn events_path(&self) -> Result<std::path::PathBuf> {
        Ok(self
            .dir
            .as_ref()
            .context("no dir")?
            .path()
            .join("events.jsonl"))
    }
}

/// Sends `LEGIT_RATE` numbered requests per second on each client for `duration`
/// and counts the replies that come back (by number); returns (sent, answered).
fn legit_traffic(clients: &[(UdpSocket, SocketAddr)], duration: Duration) -> Result<(u64, u64)> {
    let mut sent = 0u64;
    let mut answered = 0u64;
    let mut outstanding: Vec<std::collections::HashSet<u64>> =
        vec![Default::default(); clients.len()];
    for (sock, _) in clients {
        sock.set_nonblocking(true)?;
    }
    let interval = Duration::from_secs(1) / LEGIT_RATE;
    let start = Instant::now();
    let end = start + duration;
    let mut next = start;
    let mut n = 0u64;
    let mut buf = [0u8; 2048];
    let mut collect = |outstanding: &mut Vec<std::collections::HashSet<u64>>| -> Result<()> {
        for (i, (sock, _)) in clients.iter().enumerate() {
            loop {
                match sock.recv(&mut buf) {
                    Ok(len) => {
                        // The echo's reply ends with the request's "#<n>".
                        let text = String::from_utf8_lossy(&buf[..len]);
                        if let Some(num) = text.rsplit('#').next().and_then(|s| s.parse().ok())
                            && outstanding[i].remove(&num)
                        {
                            answered += 1;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    };
    while Instant::now() < end {
        if Instant::now() >= next {
            n += 1;
            for (i, (sock, edge)) in clients.iter().enumerate() {
                sock.send_to(format!("legit #{n}").as_bytes(), edge)?;
                outstanding[i].insert(n);
                sent += 1;
            }
            next += interval;
        }
        collect(&mut outstanding)?;
        std::thread::sleep(Duration::from_micros(500));
    }
    // Late replies.
    let grace = Instant::now() + Duration::from_millis(300);
    while Instant::now() < grace {
        collect(&mut outstanding)?;
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((sent, answered))
}

impl Scenario for UdpSpoofFlood {
    fn name(&self) -> &'static str {
        "udp-spoof-flood"
    }

    fn title(&self) -> &'static str {
        "legitimate UDP flows through a random-source flood (hping3 --rand-source)"
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric {
                name: "delivered",
                unit: "%",
                higher_is_better: true,
            },
            Metric {
                name: "reached_origin",
                unit: "%",
                higher_is_better: true,
            },
            Metric {
                name: "stats_slowest",
                unit: "ms",
                higher_is_better: false,
            },
            Metric {
                name: "event_log",
                unit: "KB/s",
                higher_is_better: false,
            },
            Metric {
                name: "agent_cpu",
                unit: "% of a core",
                higher_is_better: false,
            },
            Metric {
                name: "flood",
                unit: "kpps",
                higher_is_better: true,
            },
            Metric {
                name: "ring_dropped",
                unit: "kpps",
                higher_is_better: false,
            },
        ]
    }

    fn variants(&self) -> Vec<Variant> {
        vec![
            Variant {
                name: "quiet",
                label: "legitimate flows alone",
            },
            Variant {
                name: "flood-paced",
                label: "legitimate flows + random-source flood, paced (hping3 -i u10)",
            },
            Variant {
                name: "flood",
                label: "legitimate flows + random-source flood, as fast as hping3 goes",
            },
            Variant {
                name: "flood-limited",
                label: "the same flood at an app with udp_new_flows_per_second = 1000",
            },
        ]
    }

    fn baseline(&self) -> &'static str {
        "quiet"
    }

    fn targets(&self) -> Vec<Target> {
        vec![
            Target {
                text: "legitimate delivered ≥ 99 % during a flood the lab carries (goal 100 %)",
                variant: "flood-paced",
                vs: None,
                metric: "delivered",
                bound: 99.0,
                at_least: true,
            },
            Target {
                text: "legitimate delivered ≥ 99 % during --flood at an app with udp_new_flows_per_second",
                variant: "flood-limited",
                vs: None,
                metric: "delivered",
                bound: 99.0,
                at_least: true,
            },
            Target {
                text: "stats answer within 100 ms during the flood",
                variant: "flood",
                vs: None,
                metric: "stats_slowest",
                bound: 100.0,
                at_least: false,
            },
        ]
    }

    fn unavailable(&mut self, variant: &str, _opts: &Options) -> Option<String> {
        (variant.starts_with("flood") && !sys::have("hping3"))
            .then(|| "hping3 not installed".into())
    }

    fn prepare(&mut self, opts: &Options) -> Result<()> {
        let lab = Lab::new()?;
        lab.attach_pass_stubs()?;
        let dir = TempDir::new("spoof")?;
        let events = dir.path().join("events.jsonl");
        let [ec, eo] = lab.edge_ifaces();
        let app = |id: &str, port: u16, proxy: &str| {
            format!(
                "\n[[apps]]\nid = \"{id}\"\nprotocol = \"udp/{port}\"\n\
                 origin_direct = [\"udp://{ORIGIN_V4}:{port}\"]\nproxy_protocol = \"{proxy}\"\n"
            )
        };
        let config = format!(
            "[agent]\ninterfaces = [\"{ec}\", \"{eo}\"]\nudp_idle_timeout = \"5m\"\n\
             udp_nat_ports = \"40000-59999\"\nevent_log = \"{}\"\n{}{}{}{}\
             udp_new_flows_per_second = {LIMITED_RATE}\n",
            events.display(),
            app("spp", SPP_PORT, "simple"),
            app("nat", NAT_PORT, "off"),
            app("flooded", FLOODED_PORT, "off"),
            app("flooded-limited", LIMITED_PORT, "off"),
        );
        let agent = AgentProc::start(&lab, &config, opts.edge_cpu)?;
        // The edge's receive work (XDP) on the edge CPU, as in the other UDP
        // scenarios: otherwise it runs in softirq on the generator's CPU.
        sys::threaded_napi(lab.edge(), ec, opts.edge_cpu)?;
        sys::threaded_napi(lab.edge(), eo, opts.edge_cpu)?;
        // The client's and origin's receive work on the generator CPU, so the edge
        // CPU pays for the edge alone (an origin's stack is not the forwarder's).
        sys::threaded_napi(lab.client(), &lab.ifaces().client, opts.gen_cpu)?;
        sys::threaded_napi(lab.origin(), &lab.ifaces().origin, opts.gen_cpu)?;
        let origins = (
            SppEchoOrigin::start_with(
                lab.origin(),
                SocketAddr::new(ORIGIN_V4.into(), SPP_PORT),
                false,
            )?,
            UdpEchoOrigin::start_with(
                lab.origin(),
                SocketAddr::new(ORIGIN_V4.into(), NAT_PORT),
                false,
            )?,
        );
        let mut clients = Vec::new();
        for port in [SPP_PORT, NAT_PORT] {
            let bind = SocketAddr::new(CLIENT_V4.into(), 0);
            let sock = lab.client().run_in(move || UdpSocket::bind(bind))??;
            clients.push((sock, SocketAddr::new(EDGE_CLIENT_V4.into(), port)));
        }
        // Assure both flows (a reply, then more) before any round.
        let (sent, answered) = legit_traffic(&clients, Duration::from_secs(1))?;
        if answered * 2 < sent {
            bail!(
                "the legitimate flows do not work ({answered}/{sent})\n{}",
                agent.log()
            );
        }
        self.lab = Some(lab);
        self.agent = Some(agent);
        self.origins = Some(origins);
        self.clients = clients;
        self.dir = Some(dir);
        Ok(())
    }

    fn measure(&mut self, variant: &str, _round: usize, opts: &Options) -> Result<Vec<f64>> {
        let lab = self.lab.as_ref().context("no lab")?;
        let agent = self.agent.as_ref().context("no agent")?;
        let pid = agent.pid().context("agent pid")?;
        let duration = UdpSpoofFlood::duration(opts);
        let events = self.events_path()?;
        let log_before = std::fs::metadata(&events).map(|m| m.len()).unwrap_or(0);
        let cpu_before = sys::process_cpu_seconds(pid)?;
        let rx_before = sys::link_stat(lab.edge(), &lab.ifaces().edge_client, "rx_packets")?;
        let ring_before = sys::link_stat(lab.client(), &lab.ifaces().client, "tx_dropped")?;
        let origin_before = {
            let (spp, nat) = self.origins.as_ref().context("no origins")?;
            (spp.count() + nat.count()) as u64
        };
        let flood = match variant {
            "flood" | "flood-paced" | "flood-limited" => {
                let pace: &[&str] = if variant == "flood-paced" {
                    &["-i", "u10"]
                } else {
                    &["--flood"]
                };
                let seconds = format!("{:.1}", duration.as_secs_f64() + 0.5);
                let count = FLOOD_MAX_PACKETS.to_string();
                let port = if variant == "flood-limited" {
                    LIMITED_PORT
                } else {
                    FLOODED_PORT
                }
                .to_string();
                let edge = EDGE_CLIENT_V4.to_string();
                let gen_cpu = opts.gen_cpu.to_string();
                // At the lowest priority: the legitimate clients and the echo
                // origins share its CPU and must not be starved by it (what is
                // measured is the forwarder, not the generator's CPU).
                let mut args: Vec<&str> = vec![
                    "-n", "19", "taskset", "-c", &gen_cpu, "timeout", "-s", "INT", &seconds,
                    "hping3", "--udp",
                ];
                args.extend_from_slice(pace);
                args.extend_from_slice(&[
                    "--rand-source",
                    "-c",
                    &count,
                    "-p",
                    &port,
                    "-d",
                    "16",
                    &edge,
                ]);
                let cmd = lab.client().cmd("nice", &args);
                let mut child = lab.client().spawn(cmd)?;
                std::thread::sleep(Duration::from_millis(300));
                if let Some(status) = child.try_wait()? {
                    bail!("hping3 exited at once ({status})");
                }
                Some(child)
            }
            "quiet" => None,
            other => bail!("unknown variant {other}"),
        };
        let started = Instant::now();
        let clients = &self.clients;
        let mut slowest = Duration::ZERO;
        let (sent, answered) = std::thread::scope(|scope| -> Result<(u64, u64)> {
            let legit = scope.spawn(|| legit_traffic(clients, duration));
            while !legit.is_finished() {
                let asked = Instant::now();
                agent.stats()?;
                slowest = slowest.max(asked.elapsed());
                std::thread::sleep(Duration::from_millis(100));
            }
            legit
                .join()
                .map_err(|_| anyhow::anyhow!("legit traffic panicked"))?
        })?;
        let elapsed = started.elapsed().as_secs_f64();
        let rx = sys::link_stat(lab.edge(), &lab.ifaces().edge_client, "rx_packets")? - rx_before;
        let ring = sys::link_stat(lab.client(), &lab.ifaces().client, "tx_dropped")? - ring_before;
        let (spp, nat) = self.origins.as_ref().context("no origins")?;
        let reached = (spp.count() + nat.count()) as u64 - origin_before;
        drop(flood);
        let cpu = sys::process_cpu_seconds(pid)? - cpu_before;
        let log_after = std::fs::metadata(&events).map(|m| m.len()).unwrap_or(0);
        Ok(vec![
            100.0 * answered as f64 / sent.max(1) as f64,
            100.0 * reached as f64 / sent.max(1) as f64,
            slowest.as_secs_f64() * 1e3,
            log_after.saturating_sub(log_before) as f64 / 1e3 / elapsed,
            100.0 * cpu / elapsed,
            rx as f64 / 1e3 / elapsed,
            ring as f64 / 1e3 / elapsed,
        ])
    }

    fn notes(&self, opts: &Options) -> Vec<String> {
        let d = UdpSpoofFlood::duration(opts).as_secs_f64();
        vec![
            format!(
                "The real agent (pinned to CPU {}) with three UDP apps: SPP and plain NAT \
                 apps with echo origins, and a plain-NAT sibling the flood hits (no listener \
                 at its origin). Both share the flow tables and the NAT port pool \
                 (20,000 ports). hping3 --udp --flood --rand-source -d 16 runs in the \
                 client namespace pinned to CPU {} at nice 19 (the legitimate clients and \
                 the echo origins share that CPU and must not be starved by the \
                 generator), {d:.1} s per round (capped at {FLOOD_MAX_PACKETS} packets); \
                 `flood-paced` asks hping3 for one datagram every 10 µs (-i u10), a rate \
                 this 2-CPU lab carries end to end; `flood` is --flood, more than it \
                 carries; `flood-limited` is --flood at a sibling app with \
                 udp_new_flows_per_second = {LIMITED_RATE}, whose excess the XDP program \
                 drops (flow_limit) before it costs the edge a rewrite or the origin a \
                 datagram.",
                opts.edge_cpu, opts.gen_cpu
            ),
            format!(
                "Legitimate traffic: two client sockets (SPP and NAT flows, assured before \
                 the first round), {LEGIT_RATE} numbered requests/s each; delivered = replies \
                 matched by number / requests. stats_slowest: the slowest control-socket \
                 answer, polled every 100 ms. event_log: bytes the agent appended to its \
                 event log per second. agent_cpu: utime + stime of the agent process (its \
                 flow scans, events, control socket), not the XDP program's softirq time. \
                 flood: frames the edge's client-side veth received per second (flood and \
                 legitimate). reached_origin: legitimate requests the echo origins received \
                 / requests sent. ring_dropped: frames the client veth could not hand to \
                 the edge because its receive ring (256 frames) was full — lost before \
                 XDP saw them, legitimate ones included: when it is not 0, the edge CPU \
                 (shared by the XDP program, the agent and the veth NAPI threads) was the \
                 limit, and the delivered ratio measures that as well as the forwarder."
            ),
        ]
    }

    fn finish(&mut self) {
        self.clients.clear();
        self.agent = None;
        self.origins = None;
        self.lab = None;
        self.dir = None;
    }
}
