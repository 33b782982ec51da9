//! Scenario `xdp-cost`: nanoseconds per packet of each datapath branch, measured by
//! the kernel with `BPF_PROG_TEST_RUN`, next to the trivial `xdp_pass` program.
//!
//! The datapath runs in-process (`Datapath::load`, the plan of a real config, XDP
//! attached to `ec` and `eo`) inside the lab's edge namespace with real routes and
//! managed neighbours, and every test run names its real ingress interface, so route
//! lookups and interface counters behave as on the wire.
//!
//! Three ways to measure, per branch:
//! * **repeated** (drops and passes, which leave the frame as it was): one test run
//!   with a large `repeat`;
//! * **hot** (rewrites): the same, through the benchmark's restorer program
//!   (`bpf.rs`), which puts the original frame back and tail-calls the datapath;
//!   the restorer tail-calling `xdp_pass` instead is measured the same way, and
//!   `hot = restored(branch) − restored(xdp_pass) + repeated(xdp_pass)`. With a
//!   counter the restorer gives each repetition a new client: the cost of a
//!   flow's first datagram;
//! * **cold**: one run per syscall, many syscalls; the per-syscall figure carries
//!   the timer's own overhead, measured the same way on `xdp_pass` right before
//!   and subtracted: `cost = single(branch) − (single(xdp_pass) − repeated(xdp_pass))`.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use forwarder::config::{Config, XdpMode};
use forwarder::datapath::test_run::{TestRunOptions, test_run_xdp};
use forwarder::datapath::{Datapath, PROG_XDP, PROG_XDP_PASS, Plan, ifindex};
use forwarder::route::{keep_neighbour_resolved, route_to};
use forwarder::tcp::fastpath::splice_entries;
use forwarder_tests::xdp_wires::{self, SplicePorts, splice_legs};

use super::bpf;
use super::{Metric, Options, Scenario, Target, Variant, sys};
use forwarder_tests::frames::{PROTO_TCP, ethernet, ipv4, tcp, udp4_frame};
use forwarder_tests::raw_bpf::{OneSlotMap, RawProg};
use forwarder_tests::{CLIENT_V4, EDGE_CLIENT_V4, EDGE_ORIGIN_V4, Lab, ORIGIN_V4};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const BLOCKED_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 5);
const CLIENT_PORT: u16 = 40000;
const PAYLOAD: [u8; 64] = [0x5a; 64];

/// How a branch is measured (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    Repeated,
    Hot,
    Cold,
    /// Hot, with a new client (a new flow) every repetition.
    NewFlow,
}

/// Which branch, its frame, the interface it arrives on, the verdict it must give.
struct Branch {
    name: &'static str,
    label: &'static str,
    program: &'static str,
    frame: Vec<u8>,
    on_origin_side: bool,
    verdict: &'static [u32],
    method: Method,
}

/// New flows created per round by the new-flow branch: five rounds stay inside
/// the new-flow table (65,536 entries; no LRU eviction in the figure).
const NEW_FLOWS_PER_ROUND: u32 = 12_000;

fn tcp_syn(dport: u16) -> Vec<u8> {
    let seg = tcp(
        CLIENT_V4.into(),
        CLIENT_PORT,
        EDGE_CLIENT_V4.into(),
        dport,
        0x02,
        &[],
    );
    ethernet(
        forwarder_tests::frames::ETH_P_IPV4,
        &ipv4(CLIENT_V4, EDGE_CLIENT_V4, PROTO_TCP, &seg),
    )
}

/// The edge's port of the spliced app, and the agent's port on the origin leg of
/// the spliced connection.
const SPLICE_PORT: u16 = 8090;
const SPLICE_LOCAL_PORT: u16 = 41000;
/// Payload of the spliced segment: near a bulk transfer's full segment (1448 with
/// timestamps) within the restorer's 1500-byte frames; the translation never
/// reads the payload, so its size does not change the figure.
const SPLICE_PAYLOAD: usize = 1400;

/// A bulk data segment of the client on the spliced connection of the
/// `tcp-splice` branches, with Linux's timestamp option (what a translated
/// segment carries).
fn spliced_segment() -> Vec<u8> {
    let mut options = vec![1, 1, 8, 10];
    options.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    options.extend_from_slice(&0x0100_0000u32.to_be_bytes());
    let payload = vec![0x5a; SPLICE_PAYLOAD];
    let seg = forwarder_tests::frames::tcp_segment(
        CLIENT_V4.into(),
        EDGE_CLIENT_V4.into(),
        &forwarder_tests::frames::TcpFields {
            sport: CLIENT_PORT,
            dport: SPLICE_PORT,
            seq: 1000,
            ack: 0xffff_fff0,
            flags: 0x10,
            window: 512,
            options: &options,
            payload: &payload,
        },
    );
    ethernet(
        forwarder_tests::frames::ETH_P_IPV4,
        &ipv4(CLIENT_V4, EDGE_CLIENT_V4, PROTO_TCP, &seg),
    )
}

/// An SPP reply from the origin (from its MAC: replies are only accepted from the
/// route's next hop) for the flow the `spp-rewrite` frame creates.
fn spp_reply(origin_mac: [u8; 6]) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&0x56ECu16.to_be_bytes());
    payload.extend_from_slice(&CLIENT_V4.to_ipv6_mapped().octets());
    payload.extend_from_slice(&EDGE_CLIENT_V4.to_ipv6_mapped().octets());
    payload.extend_from_slice(&CLIENT_PORT.to_be_bytes());
    payload.extend_from_slice(&6000u16.to_be_bytes());
    payload.extend_from_slice(&PAYLOAD);
    let mut frame = udp4_frame(ORIGIN_V4, 6000, EDGE_ORIGIN_V4, 6000, &payload);
    frame[6..12].copy_from_slice(&origin_mac);
    frame
}

/// The client's SPP request as a same-host peer sends it: the UDP checksum field
/// holds only the pseudo-header sum (`CHECKSUM_PARTIAL`).
fn partial_checksum_request() -> Vec<u8> {
    let mut frame = udp4_frame(CLIENT_V4, CLIENT_PORT, EDGE_CLIENT_V4, 6000, &PAYLOAD);
    let partial = forwarder_tests::frames::pseudo_header_sum(
        CLIENT_V4.into(),
        EDGE_CLIENT_V4.into(),
        forwarder_tests::frames::PROTO_UDP,
        8 + PAYLOAD.len(),
    ) as u16;
    frame[40..42].copy_from_slice(&partial.to_be_bytes());
    frame
}

fn branches(origin_mac: [u8; 6]) -> Vec<Branch> {
    let udp =
        |src: Ipv4Addr, dport: u16| udp4_frame(src, CLIENT_PORT, EDGE_CLIENT_V4, dport, &PAYLOAD);
    vec![
        Branch {
            name: "xdp_pass",
            label: "trivial xdp_pass (baseline)",
            program: PROG_XDP_PASS,
            frame: udp(CLIENT_V4, 9),
            on_origin_side: false,
            verdict: &[XDP_PASS],
            method: Method::Repeated,
        },
        Branch {
            name: "no-app-drop",
            label: "unconfigured-port drop",
            program: PROG_XDP,
            frame: udp(CLIENT_V4, 9),
            on_origin_side: false,
            verdict: &[XDP_DROP],
            method: Method::Repeated,
        },
        Branch {
            name: "firewall-drop",
            label: "firewall drop (blocked /24)",
            program: PROG_XDP,
            frame: udp(BLOCKED_V4, 6000),
            on_origin_side: false,
            verdict: &[XDP_DROP],
            method: Method::Repeated,
        },
        Branch {
            name: "pass-list",
            label: "pass-list pass (tcp/22)",
            program: PROG_XDP,
            frame: tcp_syn(22),
            on_origin_side: false,
            verdict: &[XDP_PASS],
            method: Method::Repeated,
        },
        Branch {
            name: "tcp-app",
            label: "TCP app pass (SYN)",
            program: PROG_XDP,
            frame: tcp_syn(8080),
            on_origin_side: false,
            verdict: &[XDP_PASS],
            method: Method::Repeated,
        },
        Branch {
            name: "spp-rewrite",
            label: "UDP SPP rewrite to origin (hot)",
            program: PROG_XDP,
            frame: udp(CLIENT_V4, 6000),
            on_origin_side: false,
            verdict: &[XDP_REDIRECT, XDP_TX],
            method: Method::Hot,
        },
        Branch {
            name: "nat-rewrite",
            label: "UDP NAT rewrite to origin (hot)",
            program: PROG_XDP,
            frame: udp(CLIENT_V4, 6001),
            on_origin_side: false,
            verdict: &[XDP_REDIRECT, XDP_TX],
            method: Method::Hot,
        },
        Branch {
            name: "spp-reply",
            label: "SPP reply to client (hot)",
            program: PROG_XDP,
            frame: spp_reply(origin_mac),
            on_origin_side: true,
            verdict: &[XDP_REDIRECT, XDP_TX],
            method: Method::Hot,
        },
        Branch {
            name: "spp-partial",
            label: "UDP SPP rewrite, partial checksum (hot)",
            program: PROG_XDP,
            frame: partial_checksum_request(),
            on_origin_side: false,
            verdict: &[XDP_REDIRECT, XDP_TX],
            method: Method::Hot,
        },
        Branch {
            name: "spp-new-flow",
            label: "UDP SPP first datagram, new flow (hot)",
            program: PROG_XDP,
            frame: udp(CLIENT_V4, 6000),
            on_origin_side: false,
            verdict: &[XDP_REDIRECT, XDP_TX],
            method: Method::NewFlow,
        },
        Branch {
            name: "tcp-splice",
            label: "TCP segment of a spliced connection translated to origin (hot)",
            program: PROG_XDP,
            frame: spliced_segment(),
            on_origin_side: false,
            verdict: &[XDP_REDIRECT, XDP_TX],
            method: Method::Hot,
        },
        Branch {
            name: "spp-rewrite-cold",
            label: "UDP SPP rewrite to origin (cold)",
            program: PROG_XDP,
            frame: udp(CLIENT_V4, 6000),
            on_origin_side: false,
            verdict: &[XDP_REDIRECT, XDP_TX],
            method: Method::Cold,
        },
        Branch {
            name: "nat-rewrite-cold",
            label: "UDP NAT rewrite to origin (cold)",
            program: PROG_XDP,
            frame: udp(CLIENT_V4, 6001),
            on_origin_side: false,
            verdict: &[XDP_REDIRECT, XDP_TX],
            method: Method::Cold,
        },
        Branch {
            name: "spp-reply-cold",
            label: "SPP reply to client (cold)",
            program: PROG_XDP,
            frame: spp_reply(origin_mac),
            on_origin_side: true,
            verdict: &[XDP_REDIRECT, XDP_TX],
            method: Method::Cold,
        },
        Branch {
            name: "tcp-splice-cold",
            label: "TCP segment of a spliced connection translated to origin (cold)",
            program: PROG_XDP,
            frame: spliced_segment(),
            on_origin_side: false,
            verdict: &[XDP_REDIRECT, XDP_TX],
            method: Method::Cold,
        },
    ]
}

fn config(lab: &Lab) -> String {
    let [ec, eo] = lab.edge_ifaces();
    format!(
        r#"
[agent]
interfaces = ["{ec}", "{eo}"]
pass = ["tcp/22"]

[firewall]
default = "allow"

[[access_rules]]
mode = "block"
target = "ip_range"
value = "10.0.3.0/24"

[[apps]]
id = "spp"
protocol = "udp/6000"
origin_direct = ["udp://{ORIGIN_V4}:6000"]
proxy_protocol = "simple"

[[apps]]
id = "nat"
protocol = "udp/6001"
origin_direct = ["udp://{ORIGIN_V4}:6001"]

[[apps]]
id = "web"
protocol = "tcp/8080"
origin_direct = ["tcp://{ORIGIN_V4}:8080"]

[[apps]]
id = "splice"
protocol = "tcp/{SPLICE_PORT}"
origin_direct = ["tcp://{ORIGIN_V4}:{SPLICE_PORT}"]
tcp_fastpath = "xdp"
"#
    )
}

/// The restorer programs of one hot branch: through the datapath, and through the
/// trivial program (the restorer's own cost, subtracted).
struct Restorers {
    datapath: RawProg,
    trivial: RawProg,
    // The counters of the new-flow restorers (kept alive with them).
    _counters: Vec<OneSlotMap>,
}

#[derive(Default)]
pub struct XdpCost {
    /// (repeated, single-run estimate) of the unconfigured-port drop, which can be
    /// measured both ways: a check of the single-run method.
    method_check: Vec<(f64, f64)>,
    lab: Option<Lab>,
    agent: Option<Datapath>,
    ifindex: [u32; 2],
    origin_mac: [u8; 6],
    /// Program arrays whose slot 0 is the datapath / the trivial program.
    to_datapath: Option<OneSlotMap>,
    to_trivial: Option<OneSlotMap>,
    /// By branch name.
    restorers: Vec<(&'static str, Restorers)>,
}

impl XdpCost {
    /// Runs `f` with the datapath on a thread inside the edge namespace, pinned.
    fn in_edge<R: Send>(
        &self,
        cpu: usize,
        f: impl FnOnce(&Datapath, [u32; 2]) -> Result<R> + Send,
    ) -> Result<R> {
        let lab = self.lab.as_ref().context("no lab")?;
        let agent = self.agent.as_ref().context("no agent")?;
        let ifindex = self.ifindex;
        lab.edge().run_in(move || {
            sys::pin(0, cpu)?;
            f(agent, ifindex)
        })?
    }
}

fn method_check_note(check: &[(f64, f64)]) -> String {
    if check.is_empty() {
        return "Single-run method check: not run.".into();
    }
    let repeated: Vec<f64> = check.iter().map(|c| c.0).collect();
    let single: Vec<f64> = check.iter().map(|c| c.1).collect();
    format!(
        "Single-run method check on the unconfigured-port drop (measurable both ways): \
         repeated {:.0} ns, single-run estimate {:.0} ns (medians over rounds).",
        sys::median_min_max(&repeated).0,
        sys::median_min_max(&single).0
    )
}

fn run(agent: &Datapath, b: &Branch, ifindex: [u32; 2], repeat: u32) -> Result<(u32, u32)> {
    let fd = agent.xdp_program_fd(b.program)?;
    run_fd(fd, b, ifindex, repeat)
}

fn run_fd(
    fd: impl std::os::fd::AsFd,
    b: &Branch,
    ifindex: [u32; 2],
    repeat: u32,
) -> Result<(u32, u32)> {
    let opts = TestRunOptions {
        repeat,
        ingress_ifindex: ifindex[usize::from(b.on_origin_side)],
        ..Default::default()
    };
    let out = test_run_xdp(fd, &b.frame, &opts)?;
    Ok((out.verdict, out.duration_ns))
}

/// Mean kernel-measured ns of `calls` single runs.
fn single(agent: &Datapath, b: &Branch, ifindex: [u32; 2], calls: u32) -> Result<f64> {
    let mut total = 0u64;
    for _ in 0..calls {
        let (verdict, ns) = run(agent, b, ifindex, 1)?;
        if !b.verdict.contains(&verdict) {
            bail!("{}: verdict {verdict}, expected {:?}", b.name, b.verdict);
        }
        total += u64::from(ns);
    }
    Ok(total as f64 / f64::from(calls))
}

impl Scenario for XdpCost {
    fn name(&self) -> &'static str {
        "xdp-cost"
    }

    fn title(&self) -> &'static str {
        "XDP program cost per packet by datapath branch (BPF_PROG_TEST_RUN)"
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![Metric {
            name: "ns_per_packet",
            unit: "ns/pkt",
            higher_is_better: false,
        }]
    }

    fn variants(&self) -> Vec<Variant> {
        branches([0; 6])
            .iter()
            .map(|b| Variant {
                name: b.name,
                label: b.label,
            })
            .collect()
    }

    fn baseline(&self) -> &'static str {
        "xdp_pass"
    }

    fn targets(&self) -> Vec<Target> {
        let vs_trivial = |text, variant, bound| Target {
            text,
            variant,
            vs: Some("xdp_pass"),
            metric: "ns_per_packet",
            bound,
            at_least: false,
        };
        vec![
            vs_trivial("unconfigured-port drop ≤ 3× trivial", "no-app-drop", 3.0),
            vs_trivial("SPP rewrite (hot) ≤ 4× trivial", "spp-rewrite", 4.0),
            vs_trivial("NAT rewrite (hot) ≤ 4× trivial", "nat-rewrite", 4.0),
            vs_trivial("SPP reply (hot) ≤ 4× trivial", "spp-reply", 4.0),
            Target {
                text: "new flow (first datagram, hot) ≤ 400 ns",
                variant: "spp-new-flow",
                vs: None,
                metric: "ns_per_packet",
                bound: 400.0,
                at_least: false,
            },
        ]
    }

    fn prepare(&mut self, opts: &Options) -> Result<()> {
        let lab = Lab::new()?;
        // Neighbours both ways, so the route lookups of the rewrites find MACs.
        lab.client().ping(EDGE_CLIENT_V4.into())?;
        lab.origin().ping(EDGE_ORIGIN_V4.into())?;
        let config = Config::parse(&config(&lab)).map_err(|e| anyhow::anyhow!("{e}"))?;
        let [ec, eo] = lab.edge_ifaces();
        let (ec, eo) = (ec.to_owned(), eo.to_owned());
        let agent = lab.edge().run_in(move || -> Result<Datapath> {
            let edges = [EDGE_CLIENT_V4.into(), EDGE_ORIGIN_V4.into()];
            let plan = Plan::build(&config, &edges, route_to)?;
            keep_neighbour_resolved(&route_to(ORIGIN_V4.into())?.neighbour())?;
            let mut datapath = Datapath::load()?;
            datapath.apply(&plan)?;
            datapath.attach_xdp(&ec, XdpMode::Driver)?;
            datapath.attach_xdp(&eo, XdpMode::Driver)?;
            // The spliced connection of the tcp-splice branches.
            let ports = SplicePorts {
                client: CLIENT_PORT,
                edge: SPLICE_PORT,
                local: SPLICE_LOCAL_PORT,
                origin: SPLICE_PORT,
            };
            let (client, origin) = splice_legs(&xdp_wires::V4, ports, ifindex(&ec)?, ifindex(&eo)?);
            datapath.insert_splice(&splice_entries(&client, &origin, 0))?;
            Ok(datapath)
        })??;
        let [ec, eo] = lab.edge_ifaces();
        self.ifindex = [sys::ifindex(lab.edge(), ec)?, sys::ifindex(lab.edge(), eo)?];
        self.origin_mac = sys::mac(lab.origin(), &lab.ifaces().origin)?;
        // The restorers of the hot branches, and the program arrays they tail-call.
        let to_datapath = OneSlotMap::prog_array()?;
        let to_trivial = OneSlotMap::prog_array()?;
        for b in branches(self.origin_mac) {
            let restorers = match b.method {
                Method::Hot => Restorers {
                    datapath: bpf::restorer(&b.frame, &to_datapath, None)?,
                    trivial: bpf::restorer(&b.frame, &to_trivial, None)?,
                    _counters: Vec::new(),
                },
                Method::NewFlow => {
                    let counters = vec![OneSlotMap::counter()?, OneSlotMap::counter()?];
                    Restorers {
                        datapath: bpf::restorer(&b.frame, &to_datapath, Some(&counters[0]))?,
                        trivial: bpf::restorer(&b.frame, &to_trivial, Some(&counters[1]))?,
                        _counters: counters,
                    }
                }
                Method::Repeated | Method::Cold => continue,
            };
            self.restorers.push((b.name, restorers));
        }
        // Slots filled after the restorers are loaded: a program array takes its
        // owner's properties from the first program that uses it.
        {
            use std::os::fd::{AsFd as _, AsRawFd as _};
            to_datapath
                .set(agent.xdp_program_fd(PROG_XDP)?.as_fd().as_raw_fd() as u32)
                .context("the datapath into the restorers' program array")?;
            to_trivial
                .set(agent.xdp_program_fd(PROG_XDP_PASS)?.as_fd().as_raw_fd() as u32)
                .context("xdp_pass into the restorers' program array")?;
        }
        self.to_datapath = Some(to_datapath);
        self.to_trivial = Some(to_trivial);
        self.lab = Some(lab);
        self.agent = Some(agent);
        // The SPP flow the reply branch needs, and a first NAT flow; wait for the
        // managed neighbour of the origin to resolve.
        let all = branches(self.origin_mac);
        let origin_mac = self.origin_mac;
        self.in_edge(opts.edge_cpu, |agent, ifindex| {
            for name in ["spp-rewrite", "nat-rewrite", "spp-reply", "tcp-splice"] {
                let b = all.iter().find(|b| b.name == name).expect("branch");
                let ok =
                    super::wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
                        run(agent, b, ifindex, 1)
                            .ok()
                            .filter(|(v, _)| b.verdict.contains(v))
                    });
                if ok.is_none() {
                    let (v, _) = run(agent, b, ifindex, 1)?;
                    bail!(
                        "{name}: verdict {v} instead of {:?} (route or neighbour missing?)",
                        b.verdict
                    );
                }
            }
            // Flows in their steady state: answered by the origin, then promoted by
            // the client's next datagram (one flow lookup per datagram from then on).
            super::flows::answer_new_flows(agent, ifindex[1], origin_mac)?;
            for name in ["spp-rewrite", "nat-rewrite"] {
                let b = all.iter().find(|b| b.name == name).expect("branch");
                run(agent, b, ifindex, 1)?;
            }
            let new = agent
                .udp_flows()?
                .iter()
                .filter(|(_, s)| s.admission != forwarder_common::ADMISSION_ASSURED)
                .count();
            if new != 0 {
                bail!("{new} flows are still new after their reply");
            }
            Ok(())
        })
    }

    fn measure(&mut self, variant: &str, _round: usize, opts: &Options) -> Result<Vec<f64>> {
        let all = branches(self.origin_mac);
        let b = all
            .iter()
            .find(|b| b.name == variant)
            .context("unknown branch")?;
        let trivial = &all[0];
        let repeat: u32 = if opts.quick { 20_000 } else { 1_000_000 };
        let calls: u32 = if opts.quick { 2_000 } else { 200_000 };
        let check = b.name == "no-app-drop";
        let restorers = self
            .restorers
            .iter()
            .find(|(n, _)| *n == b.name)
            .map(|(_, r)| r);
        let (value, estimate) = self.in_edge(opts.edge_cpu, |agent, ifindex| {
            let single_estimate = || -> Result<f64> {
                let (_, trivial_repeated) = run(agent, trivial, ifindex, repeat)?;
                let trivial_single = single(agent, trivial, ifindex, calls)?;
                let branch_single = single(agent, b, ifindex, calls)?;
                Ok(branch_single - (trivial_single - f64::from(trivial_repeated)))
            };
            match b.method {
                Method::Repeated => {
                    let (verdict, ns) = run(agent, b, ifindex, repeat)?;
                    if !b.verdict.contains(&verdict) {
                        bail!("{}: verdict {verdict}, expected {:?}", b.name, b.verdict);
                    }
                    let estimate = if check {
                        Some(single_estimate()?)
                    } else {
                        None
                    };
                    Ok((f64::from(ns), estimate))
                }
                Method::Cold => Ok((single_estimate()?, None)),
                Method::Hot | Method::NewFlow => {
                    let r = restorers.context("no restorer")?;
                    let repeat = if b.method == Method::NewFlow {
                        if opts.quick {
                            2_000
                        } else {
                            NEW_FLOWS_PER_ROUND
                        }
                    } else {
                        repeat
                    };
                    let (_, trivial_repeated) = run(agent, trivial, ifindex, repeat)?;
                    let (verdict, through_trivial) = run_fd(&r.trivial, b, ifindex, repeat)?;
                    if verdict != XDP_PASS {
                        bail!("{}: the restorer's baseline gave verdict {verdict}", b.name);
                    }
                    let (verdict, through_datapath) = run_fd(&r.datapath, b, ifindex, repeat)?;
                    if !b.verdict.contains(&verdict) {
                        bail!(
                            "{}: verdict {verdict} through the restorer, expected {:?}",
                            b.name,
                            b.verdict
                        );
                    }
                    Ok((
                        f64::from(through_datapath) - f64::from(through_trivial)
                            + f64::from(trivial_repeated),
                        None,
                    ))
                }
            }
        })?;
        if let Some(e) = estimate {
            self.method_check.push((value, e));
        }
        Ok(vec![value])
    }

    fn notes(&self, opts: &Options) -> Vec<String> {
        let repeat = if opts.quick { "20,000" } else { "1,000,000" };
        let calls = if opts.quick { "2,000" } else { "200,000" };
        vec![
            format!(
                "Kernel-measured time per run (BPF_PROG_TEST_RUN `duration`), test-run \
                 thread pinned to CPU {}; datapath loaded with Datapath::load in the edge \
                 namespace with ec/eo attached, real routes and neighbours, ingress \
                 interface set per branch.",
                opts.edge_cpu
            ),
            format!(
                "Drops and passes: one run of repeat={repeat}. Hot rewrites: repeat={repeat} \
                 through the restorer (frame put back, then a tail call into the datapath) \
                 minus the restorer tail-calling xdp_pass, plus xdp_pass itself. New flow: \
                 the same with a new client per repetition ({NEW_FLOWS_PER_ROUND} per round). \
                 Cold: {calls} single runs, minus the timer overhead measured the same way \
                 on xdp_pass."
            ),
            method_check_note(&self.method_check),
            "The kernel reports whole ns per run (truncated), so ratios to a ~10 ns \
             trivial program carry up to ~10% rounding."
                .to_string(),
            "Reference: 10 GbE line rate of 64-byte frames is 14.88 Mpps, 67 ns per packet \
             per core."
                .to_string(),
        ]
    }

    fn finish(&mut self) {
        self.restorers.clear();
        self.to_datapath = None;
        self.to_trivial = None;
        if let (Some(mut datapath), Some(lab)) = (self.agent.take(), self.lab.as_ref()) {
            let _ = lab.edge().run_in(move || datapath.detach_all());
        }
        self.lab = None;
    }
}
