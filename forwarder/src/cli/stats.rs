//! `forwarder stats`: the agent's figures as a table (column widths from the
//! content, human units, per-second rates when watching), or as JSON (one
//! pretty object; one compact object per line when watching). On a terminal
//! `--watch` redraws in place; into a pipe it appends one table per refresh,
//! without control codes. A reader that goes away (`| head`) ends it quietly.

use std::io::{IsTerminal as _, Write as _};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::telemetry::control::request_stats;
use crate::telemetry::snapshot::StatsSnapshot;

/// How `stats` prints.
#[derive(Debug, Clone, Copy)]
pub struct StatsOptions {
    pub json: bool,
    /// Refresh every this long (`--watch`, `--interval`); `None`: once.
    pub watch: Option<Duration>,
}

/// Left- or right-aligned column.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Align {
    Left,
    Right,
}

/// A table whose columns are as wide as their widest cell.
pub(crate) struct Table {
    header: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(header: Vec<(&'static str, Align)>) -> Table {
        Table {
            header,
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn render(&self, indent: &str) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|(h, _)| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: Vec<&str>| -> String {
            let parts: Vec<String> = cells
                .iter()
                .zip(&widths)
                .zip(&self.header)
                .map(|((cell, w), (_, align))| match align {
                    Align::Left => format!("{cell:<w$}"),
                    Align::Right => format!("{cell:>w$}"),
                })
                .collect();
            format!("{indent}{}\n", parts.join("  ").trim_end())
        };
        let mut out = line(self.header.iter().map(|(h, _)| *h).collect());
        for row in &self.rows {
            out.push_str(&line(row.iter().map(String::as_str).collect()));
        }
        out
    }
}

/// `n` with a decimal SI prefix: 950, 12.3k, 4.56M.
pub fn count(n: f64) -> String {
    scaled(n, 1000.0, &["", "k", "M", "G", "T"])
}

/// `n` bytes with a binary prefix: 950 B, 12.3 KiB, 4.56 MiB.
pub fn bytes(n: f64) -> String {
    let s = scaled(n, 1024.0, &[" B", " KiB", " MiB", " GiB", " TiB"]);
    if s.ends_with('B') { s } else { s + " B" }
}

fn scaled(mut n: f64, step: f64, units: &[&str]) -> String {
    let mut unit = 0;
    while n.abs() >= step && unit + 1 < units.len() {
        n /= step;
        unit += 1;
    }
    if unit == 0 {
        format!("{n:.0}{}", units[0])
    } else if n.abs() >= 100.0 {
        format!("{n:.0}{}", units[unit])
    } else if n.abs() >= 10.0 {
        format!("{n:.1}{}", units[unit])
    } else {
        format!("{n:.2}{}", units[unit])
    }
}

/// The table of `now`; with `before` (taken `elapsed` earlier) the per-second
/// rates of the apps' traffic as well.
pub fn render_table(now: &StatsSnapshot, before: Option<(&StatsSnapshot, Duration)>) -> String {
    let rates = before.filter(|(_, d)| !d.is_zero());
    let mut header = vec![
        ("APP", Align::Left),
        ("PROTO", Align::Left),
        ("IN PKTS", Align::Right),
        ("IN BYTES", Align::Right),
        ("OUT PKTS", Align::Right),
        ("OUT BYTES", Align::Right),
    ];
    if rates.is_some() {
        header.extend([
            ("IN PKT/S", Align::Right),
            ("IN B/S", Align::Right),
            ("OUT PKT/S", Align::Right),
            ("OUT B/S", Align::Right),
        ]);
    }
    header.extend([("LIVE", Align::Right), ("REFUSED", Align::Right)]);
    let mut apps = Table::new(header);
    for (id, a) in &now.apps {
        let mut cells = vec![
            id.escape_debug().to_string(),
            a.protocol.clone(),
            count(a.ingress_packets as f64),
            bytes(a.ingress_bytes as f64),
            count(a.egress_packets as f64),
            bytes(a.egress_bytes as f64),
        ];
        if let Some((before, elapsed)) = rates {
            let secs = elapsed.as_secs_f64();
            let prev = before.apps.get(id).cloned().unwrap_or_default();
            let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
            cells.extend([
                count(rate(a.ingress_packets, prev.ingress_packets)),
                bytes(rate(a.ingress_bytes, prev.ingress_bytes)),
                count(rate(a.egress_packets, prev.egress_packets)),
                bytes(rate(a.egress_bytes, prev.egress_bytes)),
            ]);
        }
        cells.extend([a.live.to_string(), a.refused.to_string()]);
        apps.row(cells);
    }
    let mut out = apps.render("");
    let mut drops = Table::new(vec![("DROPPED", Align::Left), ("PACKETS", Align::Right)]);
    for (reason, n) in &now.drops {
        drops.row(vec![reason.clone(), count(*n as f64)]);
    }
    out.push('\n');
    out.push_str(&drops.render(""));
    let f = &now.udp_flows;
    out.push_str(&format!(
        "\nUDP FLOWS  assured {}  new {}  promoted {}  evicted {} (table full) {} (port reclaimed)\n",
        f.assured, f.new, f.promoted, f.evicted_table_full, f.evicted_port_reclaimed
    ));
    if !now.rule_hits.is_empty() {
        let mut hits = Table::new(vec![("ACCESS RULE", Align::Left), ("HITS", Align::Right)]);
        for (rule, n) in &now.rule_hits {
            hits.row(vec![rule.clone(), count(*n as f64)]);
        }
        out.push('\n');
        out.push_str(&hits.render(""));
    }
    if !now.interfaces.is_empty() {
        let mut ifaces = Table::new(vec![
            ("INTERFACE", Align::Left),
            ("FRAMES", Align::Right),
            ("BYTES", Align::Right),
        ]);
        for (name, i) in &now.interfaces {
            ifaces.row(vec![
                name.clone(),
                count(i.packets as f64),
                bytes(i.bytes as f64),
            ]);
        }
        out.push('\n');
        out.push_str(&ifaces.render(""));
    }
    if now.connections.values().any(|c| !c.events.is_empty()) {
        let mut conns = Table::new(vec![
            ("APP", Align::Left),
            ("EVENT", Align::Left),
            ("STATUS", Align::Right),
            ("COUNT", Align::Right),
        ]);
        for (app, totals) in &now.connections {
            for c in &totals.events {
                conns.row(vec![
                    app.escape_debug().to_string(),
                    c.event.clone(),
                    c.status.to_string(),
                    count(c.count as f64),
                ]);
            }
        }
        out.push_str("\nCONNECTIONS since start\n");
        out.push_str(&conns.render(""));
    }
    if !now.analytics.rows.is_empty() {
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
        let mut rows = Table::new(vec![
            ("APP", Align::Left),
            ("EVENT", Align::Left),
            ("IP", Align::Right),
            ("COUNT", Align::Right),
            ("BYTES IN", Align::Right),
            ("BYTES OUT", Align::Right),
            ("AVG MS", Align::Right),
            ("MEDIAN", Align::Right),
            ("90TH", Align::Right),
            ("99TH", Align::Right),
        ]);
        for r in &now.analytics.rows {
            rows.row(vec![
                r.app.escape_debug().to_string(),
                r.event.clone(),
                format!("v{}", r.ip_version),
                count(r.count as f64),
                bytes(r.bytes_ingress as f64),
                bytes(r.bytes_egress as f64),
                ms(r.duration_avg),
                ms(r.duration_median),
                ms(r.duration_90th),
                ms(r.duration_99th),
            ]);
        }
        out.push_str(&format!(
            "\nANALYTICS last {}s\n",
            now.analytics.window_seconds
        ));
        out.push_str(&rows.render(""));
    }
    out
}

/// Writes `text`; false when the reader has gone away (a closed pipe).
fn emit(text: &str) -> anyhow::Result<bool> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

pub fn stats_cli(control: &Path, options: StatsOptions) -> anyhow::Result<ExitCode> {
    let terminal = std::io::stdout().is_terminal();
    let mut previous: Option<(StatsSnapshot, Instant)> = None;
    loop {
        let snapshot = request_stats(control)?;
        let taken = Instant::now();
        let text = match (options.json, options.watch) {
            (true, None) => serde_json::to_string_pretty(&snapshot)? + "\n",
            // One object per line: a stream a program can read line by line.
            (true, Some(_)) => serde_json::to_string(&snapshot)? + "\n",
            (false, watch) => {
                let before = previous
                    .as_ref()
                    .map(|(s, at)| (s, taken.duration_since(*at)));
                let table = render_table(&snapshot, before);
                match watch {
                    // Home the cursor and clear the screen: the table refreshes in
                    // place.
                    Some(_) if terminal => format!("\x1b[H\x1b[2J{table}"),
                    Some(_) => format!("{table}\n"),
                    None => table,
                }
            }
        };
        if !emit(&text)? {
            return Ok(ExitCode::SUCCESS);
        }
        let Some(interval) = options.watch else {
            return Ok(ExitCode::SUCCESS);
        };
        previous = Some((snapshot, taken));
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::snapshot::AppStats;

    #[test]
    fn units_are_human() {
        assert_eq!(count(950.0), "950");
        assert_eq!(count(12_345.0), "12.3k");
        assert_eq!(count(4_560_000.0), "4.56M");
        assert_eq!(bytes(950.0), "950 B");
        assert_eq!(bytes(12_595.0), "12.3 KiB");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.00 GiB");
    }

    fn snapshot(id: &str, packets: u64) -> StatsSnapshot {
        let mut s = StatsSnapshot::default();
        s.apps.insert(
            id.into(),
            AppStats {
                protocol: "udp".into(),
                ingress_packets: packets,
                ingress_bytes: packets * 100,
                egress_packets: packets / 2,
                egress_bytes: packets * 50,
                live: 3,
                refused: 0,
            },
        );
        s.apps.insert(
            "ssh".into(),
            AppStats {
                protocol: "tcp".into(),
                ..AppStats::default()
            },
        );
        s.drops.insert("no_app".into(), 7);
        s
    }

    #[test]
    fn columns_fit_a_spectrum_uuid_app_id() {
        let id = "0d1b3a5c7e9f4b2d8a6c0e2f4a6b8c0d";
        let text = render_table(&snapshot(id, 1000), None);
        let lines: Vec<&str> = text.lines().take(3).collect();
        // Every column starts at the same offset in the header and both rows.
        let starts = |line: &str| -> Vec<usize> {
            let b = line.as_bytes();
            (1..b.len())
                .filter(|&i| b[i] != b' ' && b[i - 1] == b' ' && i >= 2 && b[i - 2] == b' ')
                .collect()
        };
        assert!(
            lines[1].starts_with(id) || lines[2].starts_with(id),
            "{text}"
        );
        let header = lines[0];
        let proto_at = header.find("PROTO").unwrap();
        assert!(proto_at > id.len(), "PROTO after the whole id:\n{text}");
        for row in &lines[1..] {
            assert_eq!(
                row.find("udp").or_else(|| row.find("tcp")),
                Some(proto_at),
                "{text}"
            );
        }
        assert!(!starts(header).is_empty());
    }

    #[test]
    fn watching_adds_per_second_rates() {
        let before = snapshot("game", 1000);
        let now = snapshot("game", 3000);
        let text = render_table(&now, Some((&before, Duration::from_secs(2))));
        let header = text.lines().next().unwrap();
        assert!(header.contains("IN PKT/S"), "{text}");
        let game = text.lines().find(|l| l.starts_with("game")).unwrap();
        // (3000 - 1000) / 2 s = 1000 packets/s in; 200 kB/2 s = 97.7 KiB/s.
        assert!(game.contains(" 1.00k "), "{game}");
        assert!(game.contains("97.7 KiB"), "{game}");
    }
}
