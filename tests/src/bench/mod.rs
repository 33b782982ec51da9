//! `cargo xtask bench`: the benchmark harness (issue 7; docs/benchmarks.md).
//!
//! Every scenario builds its own lab, runs its variants interleaved (round-robin,
//! the starting variant rotating every round so no variant always goes first), a
//! fixed duration per round, and reports medians with min–max and the ratio to the
//! scenario's baseline measured in the same run: on a shared, noisy machine only
//! ratios within one run mean anything. Ratios are paired: variant / baseline within
//! each round (measured minutes apart at most), then the median over rounds, so a
//! slow phase of the machine that hits one round hits both sides of its ratio.

pub mod agent;
pub mod bpf;
pub mod flows;
pub mod report;
pub mod sys;
pub mod tcp;
pub mod tcp_idle;
pub mod tcp_splice;
pub mod tls;
pub mod udp;
pub mod udp_spoof;
pub mod xdp_cost;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// Command-line options of the `bench` binary.
#[derive(Debug, Clone)]
pub struct Options {
    /// Run only these scenarios (all when empty).
    pub scenarios: Vec<String>,
    /// Run only these variants of each scenario (all when empty): for profiling
    /// one variant; ratios need the baseline selected too.
    pub variants: Vec<String>,
    /// One short round per scenario (the smoke test of tests/tests/bench_quick.rs).
    pub quick: bool,
    /// Rounds per variant (≥ 5 for a full run).
    pub rounds: usize,
    /// Multiplies every scenario's per-round duration.
    pub time_scale: f64,
    /// Where results.json and results.svg go.
    pub out_dir: PathBuf,
    /// CPU of the load generators, clients and origins.
    pub gen_cpu: usize,
    /// CPU of everything the edge does (NAPI threads of its veths, proxies, agent).
    pub edge_cpu: usize,
}

impl Options {
    pub const USAGE: &'static str = "\
usage: bench [--scenario NAME]... [--variant NAME]... [--quick] [--rounds N] [--time-scale X] [--out DIR]
             [--gen-cpu N] [--edge-cpu N] [--list] [--probe]

  --scenario NAME  run only NAME (repeatable); see --list
  --variant NAME   run only variant NAME of the scenarios (repeatable; profiling)
  --quick          one short round per scenario (smoke test; numbers mean little)
  --rounds N       rounds per variant (default 5; --quick: 1)
  --time-scale X   multiply every per-round duration by X (default 1)
  --out DIR        where results.json and results.svg go (default target/bench)
  --gen-cpu N      CPU for generators, clients and origins (default 0)
  --edge-cpu N     CPU for the edge: its NAPI threads, proxies, agent (default 1)
  --list           list the scenarios and exit
  --probe          only measure the load generator's raw rates (diagnostics)";

    /// Parses the arguments after the program name. `Ok(None)`: `--help`/`--list`
    /// was handled.
    pub fn parse(args: &[String]) -> Result<Option<Options>> {
        let mut opts = Options {
            scenarios: Vec::new(),
            variants: Vec::new(),
            quick: false,
            rounds: 0,
            time_scale: 1.0,
            out_dir: default_out_dir(),
            gen_cpu: 0,
            edge_cpu: 1,
        };
        let mut it = args.iter();
        let value = |it: &mut std::slice::Iter<'_, String>, flag: &str| -> Result<String> {
            match it.next() {
                Some(v) => Ok(v.clone()),
                None => bail!("{flag} needs a value\n{}", Options::USAGE),
            }
        };
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--scenario" => opts.scenarios.push(value(&mut it, arg)?),
                "--variant" => opts.variants.push(value(&mut it, arg)?),
                "--quick" => opts.quick = true,
                "--rounds" => opts.rounds = value(&mut it, arg)?.parse()?,
                "--time-scale" => opts.time_scale = value(&mut it, arg)?.parse()?,
                "--out" => opts.out_dir = PathBuf::from(value(&mut it, arg)?),
                "--gen-cpu" => opts.gen_cpu = value(&mut it, arg)?.parse()?,
                "--edge-cpu" => opts.edge_cpu = value(&mut it, arg)?.parse()?,
                "--list" => {
                    for s in all_scenarios() {
                        println!("{:<16} {}", s.name(), s.title());
                    }
                    return Ok(None);
                }
                "-h" | "--help" => {
                    println!("{}", Options::USAGE);
                    return Ok(None);
                }
                other => bail!("unknown argument {other:?}\n{}", Options::USAGE),
            }
        }
        if opts.rounds == 0 {
            opts.rounds = if opts.quick { 1 } else { 5 };
        }
        if opts.time_scale.is_nan() || opts.time_scale <= 0.0 {
            bail!("--time-scale must be positive");
        }
        let known: Vec<&str> = all_scenarios().iter().map(|s| s.name()).collect();
        for s in &opts.scenarios {
            if !known.contains(&s.as_str()) {
                bail!("unknown scenario {s:?}; known: {}", known.join(", "));
            }
        }
        let cpus = sys::online_cpus();
        if opts.gen_cpu >= cpus || opts.edge_cpu >= cpus {
            // One CPU: everything shares it (said in the report).
            opts.gen_cpu = opts.gen_cpu.min(cpus - 1);
            opts.edge_cpu = opts.edge_cpu.min(cpus - 1);
        }
        Ok(Some(opts))
    }

    /// A scenario's per-round duration: `full` normally, `quick` with `--quick`.
    pub fn duration(&self, full: Duration, quick: Duration) -> Duration {
        let base = if self.quick { quick } else { full };
        base.mul_f64(self.time_scale)
    }
}

/// `<workspace>/target/bench` (whatever `CARGO_TARGET_DIR` is: the results have a
/// fixed place to be found).
fn default_out_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    root.join("target").join("bench")
}

/// One measured quantity of a scenario.
#[derive(Debug, Clone)]
pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
}

/// A performance target: `variant`'s `metric` against `vs` (a ratio), or alone (an
/// absolute bound when `vs` is `None`).
#[derive(Debug, Clone)]
pub struct Target {
    pub text: &'static str,
    pub variant: &'static str,
    pub vs: Option<&'static str>,
    pub metric: &'static str,
    /// Ratio (value / vs) must be ≥ `bound` (`at_least`) or ≤ `bound`; without `vs`
    /// the value itself.
    pub bound: f64,
    pub at_least: bool,
}

/// One variant (what is compared) of a scenario.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: &'static str,
    pub label: &'static str,
}

/// A benchmark scenario. `measure` runs one round of one variant and returns one
/// value per metric (`metrics()` order).
pub trait Scenario {
    fn name(&self) -> &'static str;
    fn title(&self) -> &'static str;
    fn metrics(&self) -> Vec<Metric>;
    fn variants(&self) -> Vec<Variant>;
    /// The variant ratios are computed against.
    fn baseline(&self) -> &'static str;
    fn targets(&self) -> Vec<Target> {
        Vec::new()
    }
    /// Builds the lab and whatever every variant shares.
    fn prepare(&mut self, opts: &Options) -> Result<()>;
    /// Why a variant cannot run at all (missing tool, proxy not working), checked
    /// once after `prepare`.
    fn unavailable(&mut self, _variant: &str, _opts: &Options) -> Option<String> {
        None
    }
    fn measure(&mut self, variant: &str, round: usize, opts: &Options) -> Result<Vec<f64>>;
    /// Method notes for the report (what was pinned, what is counted where).
    fn notes(&self, opts: &Options) -> Vec<String>;
    /// Tears the lab down.
    fn finish(&mut self) {}
}

/// Every scenario, in the order they run (cheap, high-value ones first).
pub fn all_scenarios() -> Vec<Box<dyn Scenario>> {
    vec![
        Box::new(xdp_cost::XdpCost::default()),
        Box::new(udp::UdpFlood::default()),
        Box::new(udp::UdpForward::default()),
        Box::new(udp_spoof::UdpSpoofFlood::default()),
        Box::new(tcp::TcpThroughput::default()),
        Box::new(tcp::TcpConnRate::default()),
        Box::new(tcp_splice::TcpSplice::default()),
        Box::new(tcp::SynFlood::default()),
        Box::new(tcp_idle::TcpIdle::default()),
        Box::new(tls::TlsTermination::default()),
    ]
}

/// Runs the selected scenarios, prints the table, writes JSON and SVG.
pub fn run(opts: &Options) -> Result<report::Report> {
    let started = Instant::now();
    let boost = sys::Boost::new();
    if !boost.active() {
        eprintln!("note: could not raise the autogroup's priority; shared CPUs add noise");
    }
    let mut scenarios: Vec<Box<dyn Scenario>> = all_scenarios()
        .into_iter()
        .filter(|s| opts.scenarios.is_empty() || opts.scenarios.iter().any(|n| n == s.name()))
        .collect();
    let mut results = Vec::new();
    for scenario in &mut scenarios {
        eprintln!("== {}: {}", scenario.name(), scenario.title());
        results.push(run_scenario(scenario.as_mut(), opts));
    }
    let report = report::Report::new(opts, results, started.elapsed());
    print!("{}", report.table());
    report.write(&opts.out_dir)?;
    eprintln!(
        "results: {} and {}",
        opts.out_dir.join("results.json").display(),
        opts.out_dir.join("results.svg").display()
    );
    Ok(report)
}

fn run_scenario(scenario: &mut dyn Scenario, opts: &Options) -> report::ScenarioResult {
    let variants = scenario.variants();
    let metrics = scenario.metrics();
    let mut rows: Vec<report::VariantResult> = variants
        .iter()
        .map(|v| report::VariantResult::new(v.clone(), metrics.len()))
        .collect();
    let prepared = scenario.prepare(opts);
    if let Err(e) = &prepared {
        eprintln!("   setup failed: {e:#}");
        for row in &mut rows {
            row.unavailable = Some(format!("setup failed: {e:#}"));
        }
    } else {
        for row in &mut rows {
            row.unavailable = if opts.variants.is_empty()
                || opts.variants.iter().any(|v| v == row.variant.name)
            {
                scenario.unavailable(row.variant.name, opts)
            } else {
                Some("not selected (--variant)".into())
            };
            if let Some(why) = &row.unavailable {
                eprintln!("   {}: unavailable: {why}", row.variant.name);
            }
        }
        for round in 0..opts.rounds {
            let n = rows.len();
            for k in 0..n {
                let i = (k + round) % n;
                if rows[i].unavailable.is_some() {
                    continue;
                }
                let name = rows[i].variant.name;
                match scenario.measure(name, round, opts) {
                    Ok(values) => {
                        let shown: Vec<String> = values
                            .iter()
                            .zip(&metrics)
                            .map(|(v, m)| format!("{} {}", report::fmt_value(*v), m.unit))
                            .collect();
                        eprintln!("   round {}: {name}: {}", round + 1, shown.join(", "));
                        for (samples, v) in rows[i].samples.iter_mut().zip(values) {
                            samples.push(v);
                        }
                        rows[i].rounds.push(round);
                    }
                    Err(e) => {
                        eprintln!("   round {}: {name}: failed: {e:#}", round + 1);
                        rows[i].errors.push(format!("{e:#}"));
                        // A variant that never produced a sample is unavailable.
                        if rows[i].samples.first().is_none_or(Vec::is_empty) {
                            rows[i].unavailable = Some(format!("{e:#}"));
                        }
                    }
                }
            }
        }
    }
    let notes = scenario.notes(opts);
    scenario.finish();
    report::ScenarioResult {
        name: scenario.name(),
        title: scenario.title(),
        metrics,
        baseline: scenario.baseline(),
        targets: scenario.targets(),
        variants: rows,
        notes,
    }
}

/// Waits until `f` returns `Some`, polling every `every`, at most `timeout`.
pub fn wait_for<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}
