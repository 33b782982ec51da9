//! The results: text table, JSON (`results.json`) and an SVG chart
//! (`results.svg`), all written by hand (no serialisation or plotting dependency).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};

use super::sys::{Machine, median_min_max};
use super::{Metric, Options, Target, Variant};

/// One variant's samples (`samples[metric][k]`, measured in round `rounds[k]`).
#[derive(Debug, Clone)]
pub struct VariantResult {
    pub variant: Variant,
    pub samples: Vec<Vec<f64>>,
    pub rounds: Vec<usize>,
    pub unavailable: Option<String>,
    pub errors: Vec<String>,
}

impl VariantResult {
    pub fn new(variant: Variant, metrics: usize) -> VariantResult {
        VariantResult {
            variant,
            samples: vec![Vec::new(); metrics],
            rounds: Vec::new(),
            unavailable: None,
            errors: Vec::new(),
        }
    }

    pub fn median(&self, metric: usize) -> Option<f64> {
        let v = self.samples.get(metric)?;
        (!v.is_empty()).then(|| median_min_max(v).0)
    }
}

#[derive(Debug, Clone)]
pub struct ScenarioResult {
    pub name: &'static str,
    pub title: &'static str,
    pub metrics: Vec<Metric>,
    pub baseline: &'static str,
    pub targets: Vec<Target>,
    pub variants: Vec<VariantResult>,
    pub notes: Vec<String>,
}

impl ScenarioResult {
    fn variant(&self, name: &str) -> Option<&VariantResult> {
        self.variants.iter().find(|v| v.variant.name == name)
    }

    fn metric_index(&self, name: &str) -> Option<usize> {
        self.metrics.iter().position(|m| m.name == name)
    }

    /// `variant` / `vs` for `metric`: the median over rounds of the ratio within
    /// each round where both were measured (paired), else the ratio of medians.
    pub fn ratio(&self, variant: &str, vs: &str, metric: usize) -> Option<f64> {
        let a = self.variant(variant)?;
        let b = self.variant(vs)?;
        let mut paired = Vec::new();
        for (k, round) in a.rounds.iter().enumerate() {
            if let Some(j) = b.rounds.iter().position(|r| r == round) {
                // A variant may not measure every metric (n/a).
                let x = a.samples.get(metric).and_then(|s| s.get(k));
                let y = b.samples.get(metric).and_then(|s| s.get(j));
                if let (Some(&x), Some(&y)) = (x, y)
                    && y != 0.0
                    && x.is_finite()
                    && y.is_finite()
                {
                    paired.push(x / y);
                }
            }
        }
        if !paired.is_empty() {
            return Some(median_min_max(&paired).0);
        }
        self.ratio_of_medians(variant, vs, metric)
    }

    /// `variant`'s median over `vs`'s median for `metric`.
    pub fn ratio_of_medians(&self, variant: &str, vs: &str, metric: usize) -> Option<f64> {
        let a = self.variant(variant)?.median(metric)?;
        let b = self.variant(vs)?.median(metric)?;
        (b != 0.0).then_some(a / b)
    }

    /// Each target with its actual value (None: not measurable) and verdict.
    pub fn target_results(&self) -> Vec<(&Target, Option<f64>, Option<bool>)> {
        self.targets
            .iter()
            .map(|t| {
                let actual = self.metric_index(t.metric).and_then(|m| match t.vs {
                    Some(vs) => self.ratio(t.variant, vs, m),
                    None => self.variant(t.variant).and_then(|v| v.median(m)),
                });
                let met = actual.map(|a| {
                    if t.at_least {
                        a >= t.bound
                    } else {
                        a <= t.bound
                    }
                });
                (t, actual, met)
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub machine: Machine,
    pub rounds: usize,
    pub quick: bool,
    pub gen_cpu: usize,
    pub edge_cpu: usize,
    pub elapsed: Duration,
    pub scenarios: Vec<ScenarioResult>,
    pub command: String,
}

/// A number with 3 significant digits, no exponent for the usual ranges.
pub fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn fmt_ratio(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.1}×")
    } else {
        format!("{r:.2}×")
    }
}

impl Report {
    pub fn new(opts: &Options, scenarios: Vec<ScenarioResult>, elapsed: Duration) -> Report {
        let mut command = String::from("cargo xtask bench");
        for s in &opts.scenarios {
            let _ = write!(command, " --scenario {s}");
        }
        if opts.quick {
            command.push_str(" --quick");
        }
        Report {
            machine: Machine::read(),
            rounds: opts.rounds,
            quick: opts.quick,
            gen_cpu: opts.gen_cpu,
            edge_cpu: opts.edge_cpu,
            elapsed,
            scenarios,
            command,
        }
    }

    /// The text table: one row per scenario, variant and metric, then the targets.
    pub fn table(&self) -> String {
        let mut rows: Vec<[String; 6]> = vec![[
            "scenario".into(),
            "variant".into(),
            "metric".into(),
            "median".into(),
            "min–max".into(),
            "vs baseline (paired)".into(),
        ]];
        for s in &self.scenarios {
            for v in &s.variants {
                for (m, metric) in s.metrics.iter().enumerate() {
                    let mut row: [String; 6] = [
                        s.name.into(),
                        v.variant.name.into(),
                        metric.unit.into(),
                        String::new(),
                        String::new(),
                        String::new(),
                    ];
                    if let Some(why) = &v.unavailable {
                        let short: String =
                            why.lines().next().unwrap_or("").chars().take(70).collect();
                        row[3] = format!("unavailable: {short}");
                    } else if let Some(med) = v.median(m) {
                        let (_, lo, hi) = median_min_max(&v.samples[m]);
                        row[3] = fmt_value(med);
                        row[4] = format!("{}–{}", fmt_value(lo), fmt_value(hi));
                        row[5] = if v.variant.name == s.baseline {
                            "baseline".into()
                        } else {
                            s.ratio(v.variant.name, s.baseline, m)
                                .map(|r| format!("{} {}", fmt_ratio(r), s.baseline))
                                .unwrap_or_default()
                        };
                    } else if v.errors.is_empty() && v.samples.iter().any(|s| !s.is_empty()) {
                        // The variant measured other metrics but not this one.
                        row[3] = "n/a".into();
                    } else {
                        row[3] = "no samples".into();
                    }
                    rows.push(row);
                }
            }
        }
        let mut widths = [0usize; 6];
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nforwarder benchmarks: {} round(s){}, generator/clients/origins on CPU {}, edge on CPU {}; \
             {} CPUs, kernel {}, {}; load {}; {:.0} s",
            self.rounds,
            if self.quick {
                " (--quick: smoke test, not a measurement)"
            } else {
                ""
            },
            self.gen_cpu,
            self.edge_cpu,
            self.machine.nproc,
            self.machine.kernel,
            self.machine.cpu_model,
            self.machine.load,
            self.elapsed.as_secs_f64()
        );
        for (i, r) in rows.iter().enumerate() {
            let mut line = String::new();
            for (k, (c, w)) in r.iter().zip(widths).enumerate() {
                let pad = w - c.chars().count();
                if k == 3 || k == 4 {
                    let _ = write!(line, "{}{c}  ", " ".repeat(pad));
                } else {
                    let _ = write!(line, "{c}{}  ", " ".repeat(pad));
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
            if i == 0 {
                let total: usize = widths.iter().sum::<usize>() + 2 * 5;
                let _ = writeln!(out, "{}", "-".repeat(total));
            }
        }
        let _ = writeln!(out, "\ntargets:");
        for s in &self.scenarios {
            for (t, actual, met) in s.target_results() {
                let verdict = match met {
                    Some(true) => "MET ".to_string(),
                    Some(false) => "MISS".to_string(),
                    None => "n/a ".to_string(),
                };
                let shown = match (actual, t.vs) {
                    (Some(a), Some(_)) => fmt_ratio(a),
                    (Some(a), None) => fmt_value(a),
                    (None, _) => "not measured".into(),
                };
                let by = match (met, actual) {
                    (Some(false), Some(a)) if t.bound != 0.0 => {
                        format!(" (off by {:.0}%)", ((a - t.bound) / t.bound * 100.0).abs())
                    }
                    _ => String::new(),
                };
                let _ = writeln!(out, "  [{verdict}] {}: {}: {shown}{by}", s.name, t.text);
            }
        }
        out
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("results.json"), self.json())?;
        std::fs::write(dir.join("results.svg"), self.svg())?;
        Ok(())
    }

    pub fn json(&self) -> String {
        let m = &self.machine;
        let mut o = String::new();
        let _ = write!(
            o,
            "{{\n  \"machine\": {{\"nproc\": {}, \"kernel\": {}, \"cpu_model\": {}, \"loadavg\": {}}},\n  \
             \"rounds\": {}, \"quick\": {}, \"gen_cpu\": {}, \"edge_cpu\": {}, \"elapsed_s\": {:.1},\n  \
             \"command\": {},\n  \"scenarios\": [",
            m.nproc,
            js(&m.kernel),
            js(&m.cpu_model),
            js(&m.load),
            self.rounds,
            self.quick,
            self.gen_cpu,
            self.edge_cpu,
            self.elapsed.as_secs_f64(),
            js(&self.command)
        );
        for (si, s) in self.scenarios.iter().enumerate() {
            let metrics: Vec<String> = s
                .metrics
                .iter()
                .map(|m| {
                    format!(
                        "{{\"name\": {}, \"unit\": {}, \"higher_is_better\": {}}}",
                        js(m.name),
                        js(m.unit),
                        m.higher_is_better
                    )
                })
                .collect();
            let _ = write!(
                o,
                "{}\n    {{\"name\": {}, \"title\": {}, \"baseline\": {}, \"metrics\": [{}],\n     \"variants\": [",
                if si > 0 { "," } else { "" },
                js(s.name),
                js(s.title),
                js(s.baseline),
                metrics.join(", ")
            );
            for (vi, v) in s.variants.iter().enumerate() {
                let mut stats = Vec::new();
                for (mi, metric) in s.metrics.iter().enumerate() {
                    let samples = &v.samples[mi];
                    let (med, lo, hi) = median_min_max(samples);
                    let ratio = s.ratio(v.variant.name, s.baseline, mi);
                    let of_medians = s.ratio_of_medians(v.variant.name, s.baseline, mi);
                    stats.push(format!(
                        "{}: {{\"samples\": [{}], \"rounds\": [{}], \"median\": {}, \"min\": {}, \"max\": {}, \"ratio_to_baseline\": {}, \"ratio_of_medians\": {}}}",
                        js(metric.name),
                        samples.iter().map(|x| jn(*x)).collect::<Vec<_>>().join(", "),
                        v.rounds.iter().map(|r| (r + 1).to_string()).collect::<Vec<_>>().join(", "),
                        jn(med),
                        jn(lo),
                        jn(hi),
                        ratio.map_or("null".into(), jn),
                        of_medians.map_or("null".into(), jn)
                    ));
                }
                let status = match &v.unavailable {
                    Some(why) => format!("unavailable: {why}"),
                    None => "ok".into(),
                };
                let _ = write!(
                    o,
                    "{}\n       {{\"name\": {}, \"label\": {}, \"status\": {}, \"errors\": [{}], \"metrics\": {{{}}}}}",
                    if vi > 0 { "," } else { "" },
                    js(v.variant.name),
                    js(v.variant.label),
                    js(&status),
                    v.errors
                        .iter()
                        .map(|e| js(e))
                        .collect::<Vec<_>>()
                        .join(", "),
                    stats.join(", ")
                );
            }
            let targets: Vec<String> = s
                .target_results()
                .into_iter()
                .map(|(t, actual, met)| {
                    format!(
                        "{{\"text\": {}, \"variant\": {}, \"vs\": {}, \"metric\": {}, \"bound\": {}, \"at_least\": {}, \"actual\": {}, \"met\": {}}}",
                        js(t.text),
                        js(t.variant),
                        t.vs.map_or("null".into(), js),
                        js(t.metric),
                        jn(t.bound),
                        t.at_least,
                        actual.map_or("null".into(), jn),
                        met.map_or("null".into(), |b| b.to_string())
                    )
                })
                .collect();
            let _ = write!(
                o,
                "],\n     \"targets\": [{}],\n     \"notes\": [{}]}}",
                targets.join(", "),
                s.notes.iter().map(|n| js(n)).collect::<Vec<_>>().join(", ")
            );
        }
        o.push_str("\n  ]\n}\n");
        o
    }

    /// One horizontal bar per variant: its first metric relative to the baseline
    /// (baseline = 1.0; for lower-is-better metrics the bar is baseline/value, so a
    /// longer bar is always better), with the min–max range as a whisker.
    pub fn svg(&self) -> String {
        const W: f64 = 900.0;
        const LEFT: f64 = 330.0;
        const BAR_H: f64 = 18.0;
        const GAP: f64 = 6.0;
        let plot_w = W - LEFT - 120.0;
        let mut body = String::new();
        let mut y = 50.0;
        for s in &self.scenarios {
            let Some(metric) = s.metrics.first() else {
                continue;
            };
            let base = s
                .variant(s.baseline)
                .and_then(|v| v.median(0))
                .filter(|b| *b > 0.0);
            let rel = |x: f64| -> f64 {
                match base {
                    Some(b) if metric.higher_is_better => x / b,
                    Some(b) if x > 0.0 => b / x,
                    _ => 0.0,
                }
            };
            let max_rel = s
                .variants
                .iter()
                .filter_map(|v| v.samples[0].iter().map(|x| rel(*x)).reduce(f64::max))
                .fold(1.0f64, f64::max);
            let scale = plot_w / max_rel;
            let _ = writeln!(
                body,
                "<text x=\"10\" y=\"{:.0}\" font-weight=\"bold\">{} — {} ({}, {})</text>",
                y,
                esc(s.name),
                esc(s.title),
                esc(metric.unit),
                if metric.higher_is_better {
                    "bar = value / baseline"
                } else {
                    "bar = baseline / value"
                }
            );
            y += 10.0;
            let x1 = LEFT + scale;
            let _ = writeln!(
                body,
                "<line x1=\"{x1:.1}\" y1=\"{:.1}\" x2=\"{x1:.1}\" y2=\"{:.1}\" stroke=\"#888\" stroke-dasharray=\"3,3\"/>",
                y,
                y + s.variants.len() as f64 * (BAR_H + GAP)
            );
            for v in &s.variants {
                let _ = writeln!(
                    body,
                    "<text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                    LEFT - 8.0,
                    y + BAR_H - 5.0,
                    esc(v.variant.label)
                );
                match (&v.unavailable, v.median(0)) {
                    (None, Some(med)) => {
                        let (_, lo, hi) = median_min_max(&v.samples[0]);
                        let (a, b) = (rel(lo), rel(hi));
                        let color = if v.variant.name == s.baseline {
                            "#9e9e9e"
                        } else {
                            "#1f77b4"
                        };
                        let len = rel(med) * scale;
                        let _ = writeln!(
                            body,
                            "<rect x=\"{LEFT}\" y=\"{y:.1}\" width=\"{len:.1}\" height=\"{BAR_H}\" fill=\"{color}\"/>"
                        );
                        let mid = y + BAR_H / 2.0;
                        let _ = writeln!(
                            body,
                            "<line x1=\"{:.1}\" y1=\"{mid:.1}\" x2=\"{:.1}\" y2=\"{mid:.1}\" stroke=\"black\"/>",
                            LEFT + a.min(b) * scale,
                            LEFT + a.max(b) * scale
                        );
                        let _ = writeln!(
                            body,
                            "<text x=\"{:.1}\" y=\"{:.1}\">{} {} ({})</text>",
                            LEFT + len.max(a.max(b) * scale) + 6.0,
                            y + BAR_H - 5.0,
                            fmt_value(med),
                            esc(metric.unit),
                            fmt_ratio(rel(med))
                        );
                    }
                    _ => {
                        let why = v.unavailable.as_deref().unwrap_or("no samples");
                        let short: String =
                            why.lines().next().unwrap_or("").chars().take(60).collect();
                        let _ = writeln!(
                            body,
                            "<text x=\"{LEFT}\" y=\"{:.1}\" fill=\"#b00\">unavailable: {}</text>",
                            y + BAR_H - 5.0,
                            esc(&short)
                        );
                    }
                }
                y += BAR_H + GAP;
            }
            y += 30.0;
        }
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{:.0}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">forwarder benchmarks ({} rounds; {} CPUs, {}; dashed line = baseline)</text>\n\
             {body}</svg>\n",
            y + 10.0,
            self.rounds,
            self.machine.nproc,
            esc(&self.machine.kernel)
        )
    }
}

/// A JSON string literal.
fn js(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A JSON number (`null` for NaN/infinite).
fn jn(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
