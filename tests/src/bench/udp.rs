//! Scenarios `udp-flood` (unconfigured-port flood: XDP drop vs nftables ingress drop
//! vs the kernel's own path) and `udp-forward` (XDP SPP and NAT vs nginx's UDP
//! proxy).
//!
//! Load comes from the in-kernel generator of `bpf.rs`: live-frame test runs of a
//! program that writes the frame and returns `XDP_TX`, with the client veth as
//! ingress, so every frame leaves `cl` and arrives on `ec` as if from a wire. The
//! generator runs on the generator CPU; `ec` is switched to threaded NAPI with its
//! thread pinned to the edge CPU, so everything the edge does for a frame (XDP,
//! and the stack after XDP_PASS) runs there, and the generator cannot steal it.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use super::agent::{InProc, Proc};
use super::bpf;
use super::sys::{self, TempDir};
use super::{Metric, Options, Scenario, Target, Variant};
use forwarder_common::DropReason;
use forwarder_tests::frames::udp4_frame;
use forwarder_tests::raw_bpf::{RawProg, XdpLink};
use forwarder_tests::{CLIENT_V4, EDGE_CLIENT_V4, Lab, ORIGIN_V4, Role};

const CLIENT_PORT: u16 = 40000;
/// Unconfigured port of the flood.
const FLOOD_PORT: u16 = 9;
/// A 60-byte frame: 64 bytes on the wire with the FCS, the line-rate reference size.
const FLOOD_PAYLOAD: usize = 18;
/// UDP payload of the forwarding scenario.
const FORWARD_PAYLOAD: usize = 64;
/// Ports of the forwarding scenario: SPP app, plain NAT app, nginx.
const SPP_PORT: u16 = 6000;
const NAT_PORT: u16 = 6001;
const NGINX_PORT: u16 = 6002;
/// Upper bound of frames per generator run, whatever the duration.
const MAX_FRAMES: u64 = 200_000_000;
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// A client → edge UDP frame with the real MAC addresses of `cl` and `ec`.
fn client_frame(lab: &Lab, dport: u16, payload: usize) -> Result<Vec<u8>> {
    let mut frame = udp4_frame(
        CLIENT_V4,
        CLIENT_PORT,
        EDGE_CLIENT_V4,
        dport,
        &vec![0x5a; payload],
    );
    let dst = sys::mac(lab.edge(), &lab.ifaces().edge_client)?;
    let src = sys::mac(lab.client(), &lab.ifaces().client)?;
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    Ok(frame)
}

/// The generator for `frame` and the client's ifindex.
struct Generator {
    prog: RawProg,
    frame: Vec<u8>,
    ifindex: u32,
}

impl Generator {
    fn new(lab: &Lab, frame: Vec<u8>) -> Result<Generator> {
        Ok(Generator {
            prog: bpf::generator(&frame)?,
            ifindex: sys::ifindex(lab.client(), &lab.ifaces().client)?,
            frame,
        })
    }

    /// Runs for `duration` from a thread in the client namespace pinned to `cpu`.
    fn run(&self, lab: &Lab, cpu: usize, duration: Duration) -> Result<bpf::Generated> {
        bpf::generate(
            lab.client(),
            cpu,
            &self.prog,
            self.ifindex,
            &self.frame,
            duration,
            MAX_FRAMES,
        )
    }
}

/// Frames the generator got out of `cl`: those `ec` took in plus those its full
/// ring refused (counted as `cl`'s tx_dropped).
fn offered(lab: &Lab) -> Result<u64> {
    Ok(
        sys::link_stat(lab.edge(), &lab.ifaces().edge_client, "rx_packets")?
            + sys::link_stat(lab.client(), &lab.ifaces().client, "tx_dropped")?,
    )
}

/// Measures `counter` around one generator run: (processed Mpps, offered Mpps).
fn measure_with(
    lab: &Lab,
    generator: &Generator,
    opts: &Options,
    duration: Duration,
    counter: impl FnMut() -> Result<u64>,
) -> Result<Vec<f64>> {
    measure_more(lab, generator, opts, duration, counter, || Ok(Vec::new()))
}

/// As `measure_with`, and the rates (Mpps) of the `more` counters over the same
/// window, appended.
fn measure_more(
    lab: &Lab,
    generator: &Generator,
    opts: &Options,
    duration: Duration,
    mut counter: impl FnMut() -> Result<u64>,
    mut more: impl FnMut() -> Result<Vec<u64>>,
) -> Result<Vec<f64>> {
    let before = counter()?;
    let more_before = more()?;
    let offered_before = offered(lab)?;
    let generated = generator.run(lab, opts.gen_cpu, duration)?;
    // Let the edge drain its ring (256 frames) before reading.
    std::thread::sleep(Duration::from_millis(100));
    let after = counter()?;
    let more_after = more()?;
    let offered_after = offered(lab)?;
    let secs = generated.elapsed.as_secs_f64();
    let processed = after.saturating_sub(before) as f64 / secs / 1e6;
    let offered = offered_after.saturating_sub(offered_before) as f64 / secs / 1e6;
    if processed == 0.0 {
        bail!("nothing counted ({offered:.3} Mpps offered for {secs:.2} s)");
    }
    let mut values = vec![processed, offered];
    values.extend(
        more_after
            .iter()
            .zip(&more_before)
            .map(|(a, b)| a.saturating_sub(*b) as f64 / secs / 1e6),
    );
    Ok(values)
}

/// The kernel's own cost of the datapath program per run (ns) under live traffic:
/// run statistics are switched on (`BPF_ENABLE_STATS`) for one more, shorter
/// generator run only, as they cost every program run a clock read.
fn live_ns_per_packet(
    lab: &Lab,
    generator: &Generator,
    opts: &Options,
    duration: Duration,
    datapath: &InProc,
) -> Result<f64> {
    let _stats = forwarder_tests::raw_bpf::enable_run_stats()?;
    let (t0, n0) = datapath.run_stats()?;
    generator.run(lab, opts.gen_cpu, duration)?;
    std::thread::sleep(Duration::from_millis(100));
    let (t1, n1) = datapath.run_stats()?;
    if n1 <= n0 {
        bail!("the datapath program did not run");
    }
    Ok((t1 - t0) as f64 / (n1 - n0) as f64)
}

/// The Mpps metric, the generator's offered Mpps, and the datapath's live ns/packet.
fn metrics(what: &'static str) -> Vec<Metric> {
    vec![
        Metric {
            name: what,
            unit: "Mpps",
            higher_is_better: true,
        },
        Metric {
            name: "offered",
            unit: "Mpps offered",
            higher_is_better: true,
        },
        Metric {
            name: "bpf_ns",
            unit: "ns/pkt (kernel BPF stats, live)",
            higher_is_better: false,
        },
    ]
}

fn agent_config(lab: &Lab, apps: &str) -> String {
    let [ec, eo] = lab.edge_ifaces();
    format!("[agent]\ninterfaces = [\"{ec}\", \"{eo}\"]\nudp_idle_timeout = \"5m\"\n{apps}")
}

// ---------------------------------------------------------------------------------

/// Scenario `udp-flood`.
#[derive(Default)]
pub struct UdpFlood {
    lab: Option<Lab>,
    generator: Option<Generator>,
    datapath: Option<InProc>,
    datapath_error: Option<String>,
}

impl UdpFlood {
    fn duration(opts: &Options) -> Duration {
        opts.duration(Duration::from_secs(2), Duration::from_millis(300))
    }
}

const NFT_TABLE: &str = "fwdbench";

impl Scenario for UdpFlood {
    fn name(&self) -> &'static str {
        "udp-flood"
    }

    fn title(&self) -> &'static str {
        "unconfigured-port UDP flood, packets the edge disposes of"
    }

    fn metrics(&self) -> Vec<Metric> {
        metrics("dropped")
    }

    fn variants(&self) -> Vec<Variant> {
        vec![
            Variant {
                name: "xdp-drop",
                label: "forwarder XDP drop (no_app)",
            },
            Variant {
                name: "nft-drop",
                label: "nftables netdev ingress drop",
            },
            Variant {
                name: "kernel",
                label: "kernel, no listener (ICMP unreachable)",
            },
        ]
    }

    fn baseline(&self) -> &'static str {
        "kernel"
    }

    fn targets(&self) -> Vec<Target> {
        vec![
            Target {
                text: "XDP drop ≥ 3× nftables ingress drop",
                variant: "xdp-drop",
                vs: Some("nft-drop"),
                metric: "dropped",
                bound: 3.0,
                at_least: true,
            },
            Target {
                text: "XDP drop ≥ 5× kernel path",
                variant: "xdp-drop",
                vs: Some("kernel"),
                metric: "dropped",
                bound: 5.0,
                at_least: true,
            },
        ]
    }

    fn prepare(&mut self, _opts: &Options) -> Result<()> {
        let lab = Lab::new()?;
        let frame = client_frame(&lab, FLOOD_PORT, FLOOD_PAYLOAD)?;
        self.generator = Some(Generator::new(&lab, frame)?);
        let config = agent_config(
            &lab,
            &format!(
                "\n[[apps]]\nprotocol = \"udp/{SPP_PORT}\"\norigin_direct = [\"udp://{ORIGIN_V4}:{SPP_PORT}\"]\n"
            ),
        );
        match InProc::load(&lab, &config) {
            Ok(d) => self.datapath = Some(d),
            Err(e) => self.datapath_error = Some(format!("{e:#}")),
        }
        self.lab = Some(lab);
        Ok(())
    }

    fn unavailable(&mut self, variant: &str, _opts: &Options) -> Option<String> {
        match variant {
            "nft-drop" if !sys::have("nft") => Some("nft not installed".into()),
            "xdp-drop" => self.datapath_error.clone(),
            _ => None,
        }
    }

    fn measure(&mut self, variant: &str, _round: usize, opts: &Options) -> Result<Vec<f64>> {
        let lab = self.lab.as_ref().context("no lab")?;
        let generator = self.generator.as_ref().context("no generator")?;
        let ec = lab.ifaces().edge_client.clone();
        let duration = UdpFlood::duration(opts);
        match variant {
            "xdp-drop" => {
                let datapath = self.datapath.as_mut().context("no datapath")?;
                datapath.attach()?;
                let result = sys::threaded_napi(lab.edge(), &ec, opts.edge_cpu).and_then(|_| {
                    let mut values = measure_with(lab, generator, opts, duration, || {
                        datapath.drops(DropReason::NoApp)
                    })?;
                    values.push(live_ns_per_packet(
                        lab,
                        generator,
                        opts,
                        duration / 2,
                        datapath,
                    )?);
                    Ok(values)
                });
                datapath.detach()?;
                result
            }
            "nft-drop" => {
                lab.attach_pass_stub(Role::Edge, &ec)?;
                let result = (|| {
                    sys::threaded_napi(lab.edge(), &ec, opts.edge_cpu)?;
                    sys::nft_load(
                        lab.edge(),
                        &format!(
                            "table netdev {NFT_TABLE} {{\n  counter flood {{ }}\n  chain ingress {{\n    \
                             type filter hook ingress device \"{ec}\" priority 0; policy accept;\n    \
                             udp dport {FLOOD_PORT} counter name \"flood\" drop\n  }}\n}}\n"
                        ),
                    )?;
                    measure_with(lab, generator, opts, duration, || {
                        sys::nft_counter(lab.edge(), "netdev", NFT_TABLE, "flood")
                    })
                })();
                let _ = lab
                    .edge()
                    .run("nft", &["delete", "table", "netdev", NFT_TABLE]);
                lab.detach_pass_stubs();
                result
            }
            "kernel" => {
                lab.attach_pass_stub(Role::Edge, &ec)?;
                let result = (|| {
                    sys::threaded_napi(lab.edge(), &ec, opts.edge_cpu)?;
                    measure_with(lab, generator, opts, duration, || {
                        sys::snmp(lab.edge(), "Udp", "NoPorts")
                    })
                })();
                lab.detach_pass_stubs();
                result
            }
            other => bail!("unknown variant {other}"),
        }
    }

    fn notes(&self, opts: &Options) -> Vec<String> {
        let d = UdpFlood::duration(opts).as_secs_f64();
        vec![
            format!(
                "Generator: live-frame BPF_PROG_TEST_RUN of an XDP_TX program on the client \
                 veth (60-byte frames, 64 on the wire, one flow to 10.0.1.1:{FLOOD_PORT}), \
                 thread pinned to CPU {}; ec in threaded NAPI with its thread pinned to CPU {} \
                 {d:.1} s per round.",
                opts.gen_cpu, opts.edge_cpu
            ),
            "Counted at the edge: xdp-drop = the datapath's no_app drop counter (the \
             agent's XDP object and plan, loaded in-process and attached to ec/eo for the \
             round); nft-drop = the rule's named counter; kernel = Udp NoPorts of \
             /proc/net/snmp in the edge namespace. The baselines run with the XDP_PASS stub \
             on ec, which a veth needs to receive XDP_TX frames at all."
                .to_string(),
            "Kernel path: every datagram reaches UDP and finds no socket; the ICMP port \
             unreachable answers are rate-limited (net.ipv4.icmp_ratelimit / \
             icmp_msgs_per_sec), so most are suppressed and the figure is the cost of the \
             lookup plus the limiter, the cheapest the kernel can make it."
                .to_string(),
            "'offered' is what the generator transmitted; frames beyond what the edge \
             takes are dropped at the veth ring (256 frames), so offered > dropped means \
             the edge, not the generator, was the limit."
                .to_string(),
        ]
    }

    fn finish(&mut self) {
        self.generator = None;
        self.datapath = None;
        self.lab = None;
    }
}

// ---------------------------------------------------------------------------------

/// Scenario `udp-forward`.
#[derive(Default)]
pub struct UdpForward {
    lab: Option<Lab>,
    datapath: Option<InProc>,
    nginx: Option<Proc>,
    nginx_error: Option<String>,
    sink: Option<XdpLink>,
    generators: Vec<(&'static str, Generator)>,
    dir: Option<TempDir>,
}

impl UdpForward {
    fn duration(opts: &Options) -> Duration {
        opts.duration(Duration::from_secs(2), Duration::from_millis(300))
    }

    fn start_nginx(&mut self, opts: &Options) -> Result<Proc> {
        if !sys::have("nginx") {
            bail!("nginx not installed");
        }
        if !std::path::Path::new(NGINX_STREAM_MODULE).is_file() {
            bail!("nginx stream module missing ({NGINX_STREAM_MODULE})");
        }
        let lab = self.lab.as_ref().context("no lab")?;
        let dir = self.dir.as_ref().context("no dir")?.path().to_path_buf();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "load_module {NGINX_STREAM_MODULE};\n\
                 user root root;\n\
                 worker_processes 1;\n\
                 pid {dir}/nginx.pid;\n\
                 error_log {dir}/nginx-error.log warn;\n\
                 events {{ worker_connections 4096; }}\n\
                 stream {{\n  server {{\n    listen {EDGE_CLIENT_V4}:{NGINX_PORT} udp;\n    \
                 proxy_pass {ORIGIN_V4}:{NGINX_PORT};\n    proxy_timeout 60s;\n  }}\n}}\n",
                dir = dir.display()
            ),
        )?;
        let conf_s = conf.display().to_string();
        let prefix = dir.display().to_string();
        let error_log = dir.join("nginx-error.log").display().to_string();
        let mut proc = Proc::spawn(
            lab.edge(),
            opts.edge_cpu,
            "nginx",
            &[
                "-p",
                &prefix,
                "-e",
                &error_log,
                "-c",
                &conf_s,
                "-g",
                "daemon off;",
            ],
            dir.join("nginx.log"),
        )?;
        let port = format!("sport = :{NGINX_PORT}");
        let up = super::wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
            lab.edge()
                .run("ss", &["-Huln", &port])
                .ok()
                .filter(|s| !s.trim().is_empty())
        });
        proc.check_running("nginx")?;
        if up.is_none() {
            bail!("nginx did not open {EDGE_CLIENT_V4}:{NGINX_PORT}/udp within 10 s");
        }
        Ok(proc)
    }
}

impl Scenario for UdpForward {
    fn name(&self) -> &'static str {
        "udp-forward"
    }

    fn title(&self) -> &'static str {
        "UDP forwarding, 64-byte payloads, datagrams delivered to the origin"
    }

    fn metrics(&self) -> Vec<Metric> {
        let mut m = metrics("delivered");
        m.extend([
            Metric {
                name: "forwarded",
                unit: "Mpps forwarded by the edge",
                higher_is_better: true,
            },
            Metric {
                name: "xmit_lost",
                unit: "Mpps lost at eo's ring",
                higher_is_better: false,
            },
        ]);
        m
    }

    fn variants(&self) -> Vec<Variant> {
        vec![
            Variant {
                name: "xdp-spp",
                label: "forwarder XDP, SPP header",
            },
            Variant {
                name: "xdp-nat",
                label: "forwarder XDP, plain NAT",
            },
            Variant {
                name: "nginx",
                label: "nginx stream UDP proxy",
            },
        ]
    }

    fn baseline(&self) -> &'static str {
        "nginx"
    }

    fn targets(&self) -> Vec<Target> {
        vec![
            Target {
                text: "XDP SPP ≥ 5× nginx UDP",
                variant: "xdp-spp",
                vs: Some("nginx"),
                metric: "delivered",
                bound: 5.0,
                at_least: true,
            },
            Target {
                text: "edge-forwarded UDP (SPP) ≥ 3 Mpps on one edge core",
                variant: "xdp-spp",
                vs: None,
                metric: "forwarded",
                bound: 3.0,
                at_least: true,
            },
        ]
    }

    fn prepare(&mut self, opts: &Options) -> Result<()> {
        let lab = Lab::new()?;
        self.dir = Some(TempDir::new("udp-forward")?);
        // The origin counts and drops everything but ARP in XDP, its NAPI thread on
        // the generator's CPU.
        let oe = lab.ifaces().origin.clone();
        let oe_index = sys::ifindex(lab.origin(), &oe)?;
        let sink = bpf::sink()?;
        let link = lab.origin().run_in(|| sink.attach(oe_index))??;
        self.sink = Some(link);
        sys::threaded_napi(lab.origin(), &oe, opts.gen_cpu)?;
        // The origin's MAC for the edge, before anything is measured; and the
        // client's, for the one reply each flow gets (the generator never ARPs).
        lab.edge().ping(ORIGIN_V4.into()).ok();
        lab.edge().ping(CLIENT_V4.into()).ok();
        let apps = format!(
            "pass = [\"udp/{NGINX_PORT}\"]\n\n\
             [[apps]]\nid = \"spp\"\nprotocol = \"udp/{SPP_PORT}\"\n\
             origin_direct = [\"udp://{ORIGIN_V4}:{SPP_PORT}\"]\nproxy_protocol = \"simple\"\n\n\
             [[apps]]\nid = \"nat\"\nprotocol = \"udp/{NAT_PORT}\"\n\
             origin_direct = [\"udp://{ORIGIN_V4}:{NAT_PORT}\"]\n"
        );
        let mut datapath = InProc::load(&lab, &agent_config(&lab, &apps))?;
        datapath.attach()?;
        sys::threaded_napi(lab.edge(), &lab.ifaces().edge_client, opts.edge_cpu)?;
        for (name, port) in [
            ("xdp-spp", SPP_PORT),
            ("xdp-nat", NAT_PORT),
            ("nginx", NGINX_PORT),
        ] {
            let frame = client_frame(&lab, port, FORWARD_PAYLOAD)?;
            self.generators.push((name, Generator::new(&lab, frame)?));
        }
        self.datapath = Some(datapath);
        self.lab = Some(lab);
        match self.start_nginx(opts) {
            Ok(p) => self.nginx = Some(p),
            Err(e) => self.nginx_error = Some(format!("{e:#}")),
        }
        // Warm up: flows, NAT ports, nginx's session and upstream socket; and check
        // that the datapath delivers.
        let lab = self.lab.as_ref().context("no lab")?;
        let oe = &lab.ifaces().origin;
        for (name, g) in &self.generators {
            let before = sys::link_stat(lab.origin(), oe, "rx_packets")?;
            g.run(lab, opts.gen_cpu, Duration::from_millis(200))?;
            std::thread::sleep(Duration::from_millis(100));
            let after = sys::link_stat(lab.origin(), oe, "rx_packets")?;
            if after <= before && *name != "nginx" {
                let drops = self
                    .datapath
                    .as_ref()
                    .map(|d| d.drop_summary())
                    .unwrap_or_default();
                bail!("{name}: nothing reached the origin during warm-up; datapath drops: {drops}");
            }
        }
        // The flows' steady state: answered once by the origin (a sink here), then
        // promoted by the next datagram (docs/udp.md, Flow admission).
        let datapath = self.datapath.as_ref().context("no datapath")?;
        let origin_mac = sys::mac(lab.origin(), oe)?;
        datapath.answer_new_flows(&lab.ifaces().edge_origin, origin_mac)?;
        for (_, g) in &self.generators {
            g.run(lab, opts.gen_cpu, Duration::from_millis(50))?;
        }
        let (assured, new) = datapath.flow_admission()?;
        if new != 0 || assured == 0 {
            bail!("after their replies, {assured} flows are assured and {new} still new");
        }
        Ok(())
    }

    fn unavailable(&mut self, variant: &str, _opts: &Options) -> Option<String> {
        match variant {
            "nginx" => self.nginx_error.clone(),
            _ => None,
        }
    }

    fn measure(&mut self, variant: &str, _round: usize, opts: &Options) -> Result<Vec<f64>> {
        let lab = self.lab.as_ref().context("no lab")?;
        let generator = &self
            .generators
            .iter()
            .find(|(n, _)| *n == variant)
            .context("unknown variant")?
            .1;
        if variant == "nginx"
            && let Some(nginx) = self.nginx.as_mut()
        {
            nginx.check_running("nginx")?;
        }
        let oe = lab.ifaces().origin.clone();
        let ec = lab.ifaces().edge_client.clone();
        let eo = lab.ifaces().edge_origin.clone();
        let xdp = variant != "nginx";
        // What the edge sent towards the origin: XDP redirects out of ec's program,
        // or (nginx) what eo transmitted; and what eo's ring refused.
        let forwarded = || -> Result<u64> {
            if xdp {
                sys::ethtool_stat(lab.edge(), &ec, "rx_queue_0_xdp_redirect")
            } else {
                sys::link_stat(lab.edge(), &eo, "tx_packets")
            }
        };
        let lost = || sys::ethtool_stat(lab.edge(), &eo, "tx_queue_0_xdp_xmit_errors");
        let duration = UdpForward::duration(opts);
        let mut values = measure_more(
            lab,
            generator,
            opts,
            duration,
            || sys::link_stat(lab.origin(), &oe, "rx_packets"),
            || Ok(vec![forwarded()?, lost()?]),
        )?;
        let (forwarded, lost) = (values[2], values[3]);
        values.truncate(2);
        if xdp {
            let datapath = self.datapath.as_ref().context("no datapath")?;
            values.push(live_ns_per_packet(
                lab,
                generator,
                opts,
                duration / 2,
                datapath,
            )?);
            values.extend([forwarded, lost]);
        }
        Ok(values)
    }

    fn notes(&self, opts: &Options) -> Vec<String> {
        vec![
            format!(
                "Same generator as udp-flood (one client flow, {FORWARD_PAYLOAD}-byte payload), \
                 pinned to CPU {}; ec in threaded NAPI pinned to CPU {}, with nginx \
                 (taskset) on that CPU too. The XDP datapath is the agent's object and plan, \
                 loaded in-process (for UDP the agent's userspace does nothing per packet).",
                opts.gen_cpu, opts.edge_cpu
            ),
            format!(
                "Counted at the origin: rx_packets of oe, where an XDP_DROP sink (ARP \
                 excepted; its NAPI thread on CPU {}) takes every frame, so the origin's stack costs nothing.",
                opts.gen_cpu
            ),
            format!(
                "One datapath serves all variants: SPP app udp/{SPP_PORT}, NAT app udp/{NAT_PORT}, \
                 and udp/{NGINX_PORT} in `pass` for nginx, so nginx's traffic crosses the same \
                 XDP program (as HAProxy's does in the TCP scenarios)."
            ),
            "forwarded = XDP redirects out of ec's program (ethtool -S ec \
             rx_queue_0_xdp_redirect); delivered = what reached oe; the difference is lost \
             between the two, almost all of it at eo's transmit ring (ethtool -S eo \
             tx_queue_0_xdp_xmit_errors, reported as xmit_lost): the origin side's \
             NAPI thread shares its CPU with the generator."
                .to_string(),
            "bpf_ns: the kernel's run statistics of the datapath program (run_time_ns / \
             run_cnt, BPF_ENABLE_STATS) over an extra run of half the round's duration, \
             switched on only for that run (they add a clock read to every run)."
                .to_string(),
            "nginx: stream module, one worker, `proxy_timeout 60s` and no \
             `proxy_responses` limit, so the client's datagrams share one session and one \
             upstream socket (its fastest configuration; `proxy_responses 0` would open a \
             socket per datagram)."
                .to_string(),
        ]
    }

    fn finish(&mut self) {
        self.nginx = None;
        self.datapath = None;
        self.generators.clear();
        self.sink = None;
        self.lab = None;
        self.dir = None;
    }
}

/// `bench --probe`: raw generator and edge rates, to check the load generator.
pub fn probe(opts: &Options) -> Result<()> {
    let _boost = sys::Boost::new();
    let lab = Lab::new()?;
    let frame = client_frame(&lab, FLOOD_PORT, FLOOD_PAYLOAD)?;
    let g = Generator::new(&lab, frame)?;
    let ec = lab.ifaces().edge_client.clone();
    let d = Duration::from_secs(1);
    let rx = || sys::link_stat(lab.edge(), &ec, "rx_packets");
    let show = |what: &str, r0: u64, o0: u64| -> Result<()> {
        let out = g.run(&lab, opts.gen_cpu, d)?;
        std::thread::sleep(Duration::from_millis(100));
        let secs = out.elapsed.as_secs_f64();
        eprintln!(
            "{what}: offered {:.3} Mpps, ec rx {:.3} Mpps",
            (offered(&lab)? - o0) as f64 / secs / 1e6,
            (rx()? - r0) as f64 / secs / 1e6
        );
        Ok(())
    };
    show("no XDP on ec", rx()?, offered(&lab)?)?;
    lab.attach_pass_stub(Role::Edge, &ec)?;
    show("stub on ec, NAPI softirq", rx()?, offered(&lab)?)?;
    let pids = sys::threaded_napi(lab.edge(), &ec, opts.edge_cpu)?;
    eprintln!("napi threads {pids:?}");
    show("stub on ec, threaded NAPI", rx()?, offered(&lab)?)?;
    eprintln!(
        "{}",
        lab.client().run("ethtool", &["-S", &lab.ifaces().client])?
    );
    Ok(())
}
