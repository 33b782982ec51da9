//! `forwarder origins`: every origin of every app with its weight, health, drain
//! state and traffic; `forwarder drain` / `enable` take one out of selection and
//! put it back (runtime only: a restart starts with every origin enabled).

use std::path::Path;
use std::process::ExitCode;

use super::stats::{Align, Table, bytes, count};
use crate::telemetry::control::{request_drain, request_stats};
use crate::telemetry::snapshot::{OriginHealth, OriginStatus};

/// The table `forwarder origins` prints.
pub fn render(origins: &[OriginStatus]) -> String {
    let mut table = Table::new(vec![
        ("APP", Align::Left),
        ("ORIGIN", Align::Left),
        ("WEIGHT", Align::Right),
        ("HEALTH", Align::Left),
        ("STATE", Align::Left),
        ("LIVE", Align::Right),
        ("TOTAL", Align::Right),
        ("IN", Align::Right),
        ("OUT", Align::Right),
        ("FAILED", Align::Right),
        ("CHECK AVG", Align::Right),
    ]);
    for o in origins {
        let state = match (o.drained, o.selected) {
            (true, _) => "drained",
            (false, true) => "serving",
            (false, false) => "standby",
        };
        let health = match (o.health, o.last_failure) {
            (OriginHealth::Down, code) if code > 0 => format!("down ({code})"),
            (health, _) => health.as_str().to_string(),
        };
        let failed: u64 = o.connect_failures.values().sum();
        let check = o
            .check_durations
            .as_ref()
            .filter(|h| h.count > 0)
            .map_or_else(
                || "-".to_string(),
                |h| format!("{:.2}ms", h.sum / h.count as f64 * 1e3),
            );
        table.row(vec![
            o.app.clone(),
            o.origin.clone(),
            o.weight.to_string(),
            health,
            state.to_string(),
            count(o.live as f64),
            count(o.connections as f64),
            bytes(o.client_bytes as f64),
            bytes(o.origin_bytes as f64),
            count(failed as f64),
            check,
        ]);
    }
    table.render("")
}

/// `forwarder origins [--json]`.
pub fn origins_cli(control: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let snapshot = request_stats(control)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&snapshot.origins)?);
    } else {
        print!("{}", render(&snapshot.origins));
    }
    Ok(ExitCode::SUCCESS)
}

/// `forwarder drain APP ORIGIN` (`drained`) / `forwarder enable APP ORIGIN`.
pub fn drain_cli(
    control: &Path,
    app: &str,
    origin: &str,
    drained: bool,
) -> anyhow::Result<ExitCode> {
    request_drain(control, app, origin, drained)?;
    if drained {
        println!("{app}: {origin} drained (no new connections or flows; open ones continue)");
    } else {
        println!("{app}: {origin} enabled");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_says_health_state_and_traffic() {
        let rows = vec![
            OriginStatus {
                app: "ssh".into(),
                origin: "10.0.0.5:22".into(),
                protocol: "tcp".into(),
                weight: 3,
                health: OriginHealth::Up,
                selected: true,
                live: 2,
                connections: 40,
                client_bytes: 2048,
                ..OriginStatus::default()
            },
            OriginStatus {
                app: "ssh".into(),
                origin: "10.0.0.6:22".into(),
                protocol: "tcp".into(),
                weight: 1,
                health: OriginHealth::Down,
                last_failure: 521,
                connect_failures: [(521, 3)].into(),
                ..OriginStatus::default()
            },
            OriginStatus {
                app: "game".into(),
                origin: "10.0.0.7:27015".into(),
                protocol: "udp".into(),
                weight: 1,
                health: OriginHealth::Unchecked,
                drained: true,
                ..OriginStatus::default()
            },
        ];
        let text = render(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("APP"), "{text}");
        assert!(
            lines[1].contains("10.0.0.5:22") && lines[1].contains("serving"),
            "{text}"
        );
        assert!(
            lines[2].contains("down (521)") && lines[2].contains("standby"),
            "{text}"
        );
        assert!(
            lines[3].contains("unchecked") && lines[3].contains("drained"),
            "{text}"
        );
    }
}
