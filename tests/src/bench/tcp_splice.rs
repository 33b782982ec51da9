//! Scenario `tcp-splice`: the XDP splice (`tcp_fastpath = "xdp"`) against the
//! forwarder's socket path and HAProxy, in the `tcp-throughput` topology (one
//! lab, the same agent: the splicing apps are the same origins on the port + 1).
//! Throughput is one iperf3 stream; edge CPU is the busy time of the whole edge
//! CPU (NAPI, XDP, the agent or HAProxy: what a splice moves out of the proxy
//! process lands in softirq, so the process's own CPU would flatter it); setup is
//! the short-connection rate of `tcp-connrate`.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use super::sys;
use super::tcp::{
    ECHO_PORT, IPERF_PORT, TcpLab, conn_loop, iperf_client, iperf_receiver_mbps, iperf_seconds,
    pinning_note,
};
use super::{Metric, Options, Scenario, Target, Variant};

#[derive(Default)]
pub struct TcpSplice {
    tl: Option<TcpLab>,
    /// Connections the agent had spliced after the last `forwarder-xdp` round.
    spliced: u64,
}

impl TcpSplice {
    fn seconds(opts: &Options) -> u64 {
        iperf_seconds(opts)
    }

    fn setup_time(opts: &Options) -> Duration {
        opts.duration(Duration::from_secs(2), Duration::from_millis(500))
    }
}

impl Scenario for TcpSplice {
    fn name(&self) -> &'static str {
        "tcp-splice"
    }

    fn title(&self) -> &'static str {
        "TCP spliced in XDP vs the socket path vs HAProxy (bulk, edge CPU, setup)"
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric {
                name: "throughput",
                unit: "Gbit/s",
                higher_is_better: true,
            },
            Metric {
                name: "edge_cpu",
                unit: "µs edge CPU/MB",
                higher_is_better: false,
            },
            Metric {
                name: "setup",
                unit: "conn/s",
                higher_is_better: true,
            },
        ]
    }

    fn variants(&self) -> Vec<Variant> {
        vec![
            Variant {
                name: "forwarder-xdp",
                label: "forwarder, tcp_fastpath = xdp",
            },
            Variant {
                name: "forwarder",
                label: "forwarder socket path (copy)",
            },
            Variant {
                name: "haproxy",
                label: "HAProxy mode tcp, splice-auto",
            },
        ]
    }

    fn baseline(&self) -> &'static str {
        "haproxy"
    }

    fn targets(&self) -> Vec<Target> {
        vec![
            Target {
                text: "spliced bulk throughput ≥ 2× HAProxy",
                variant: "forwarder-xdp",
                vs: Some("haproxy"),
                metric: "throughput",
                bound: 2.0,
                at_least: true,
            },
            Target {
                text: "spliced edge CPU per MB ≤ 0.4× HAProxy",
                variant: "forwarder-xdp",
                vs: Some("haproxy"),
                metric: "edge_cpu",
                bound: 0.4,
                at_least: false,
            },
            Target {
                text: "setup with tcp_fastpath ≥ 1.0× the socket path",
                variant: "forwarder-xdp",
                vs: Some("forwarder"),
                metric: "setup",
                bound: 1.0,
                at_least: true,
            },
        ]
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
        let secs = TcpSplice::seconds(opts);
        let addr = tl.variant_addr(variant, IPERF_PORT)?;
        let mut cmd = iperf_client(tl.lab(), addr, secs, opts.gen_cpu);
        let before = sys::cpu_busy_seconds(opts.edge_cpu)?;
        let out = forwarder_tests::OutputOk::output_ok(&mut cmd).context("iperf3 client")?;
        let edge_cpu = sys::cpu_busy_seconds(opts.edge_cpu)? - before;
        let mbps = iperf_receiver_mbps(&out)?;
        let megabytes = mbps * secs as f64 / 8.0;

        let addr = tl.variant_addr(variant, ECHO_PORT)?;
        let (ok, failed, elapsed) =
            conn_loop(tl.lab(), addr, TcpSplice::setup_time(opts), opts.gen_cpu)?;
        if ok == 0 {
            bail!("no connection succeeded ({failed} failed)");
        }
        if variant == "forwarder-xdp" {
            self.spliced = tl.spliced()?;
        }
        Ok(vec![
            mbps / 1000.0,
            edge_cpu * 1e6 / megabytes.max(1e-9),
            ok as f64 / elapsed.as_secs_f64(),
        ])
    }

    fn notes(&self, opts: &Options) -> Vec<String> {
        vec![
            format!(
                "Throughput: iperf3 -c … -t {} (one stream, client → origin), receiver-side \
                 rate. Edge CPU: busy time of CPU {} (/proc/stat: user, system, irq, softirq, \
                 steal) over the iperf3 run, per MB received; this CPU is shared with anything \
                 else the machine runs. Setup: connect + 64-byte echo + close, 8 loops, for \
                 {:.1} s (the echo connections of tcp_fastpath reach their quiet point only \
                 at the origin's close, so they measure the cost of trying).",
                TcpSplice::seconds(opts),
                opts.edge_cpu,
                TcpSplice::setup_time(opts).as_secs_f64()
            ),
            format!(
                "Connections the agent spliced in XDP by the end of the last forwarder-xdp \
                 round: {} (iperf3's control and data connections, each round).",
                self.spliced
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
