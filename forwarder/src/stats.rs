//! `forwarder stats`: the running agent's counters as a table or JSON.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use forwarder_common::DropReason;
use serde::{Deserialize, Serialize};

use crate::analytics::{Analytics, ConnectionTotals};
use crate::control::request_stats;
use crate::datapath::DatapathCounters;

/// Everything `stats` shows, as the agent sends it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Drops per reason label (every reason, zeros included).
    pub drops: BTreeMap<String, u64>,
    pub apps: BTreeMap<String, AppStats>,
    /// Hits per access rule value.
    pub rule_hits: BTreeMap<String, u64>,
    /// Frames seen per attached interface.
    pub interfaces: BTreeMap<String, InterfaceStats>,
    /// Connection events (TCP connections, UDP flows) by app id since the agent
    /// started: counts by event and status, duration histogram.
    #[serde(default)]
    pub connections: BTreeMap<String, ConnectionTotals>,
    /// Spectrum's analytics over the last window (see `analytics`).
    #[serde(default)]
    pub analytics: Analytics,
    /// The UDP flow tables: fill, promotions, evictions, scan cost.
    #[serde(default)]
    pub udp_flows: crate::udp_flows::UdpFlowStats,
    /// The agent itself: build, start, reloads.
    #[serde(default)]
    pub agent: AgentStatus,
}

/// The agent's own figures (`forwarder_build_info`, reload and start-time
/// metrics).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub version: String,
    pub commit: String,
    /// When the agent started, seconds since the Unix epoch.
    pub started_at: f64,
    /// Reloads applied and rejected since the start.
    pub reloads_applied: u64,
    pub reloads_rejected: u64,
    /// Whether the last reload (or the start, before any) succeeded.
    pub last_reload_successful: bool,
    /// When the running config was applied (the start, or the last reload that
    /// succeeded), seconds since the Unix epoch.
    pub config_applied_at: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppStats {
    pub protocol: String,
    pub ingress_packets: u64,
    pub ingress_bytes: u64,
    pub egress_packets: u64,
    pub egress_bytes: u64,
    /// Live UDP flows or open TCP connections.
    pub live: u64,
    /// TCP connections refused at once (the app's connection limit, or the agent's
    /// open-file capacity).
    #[serde(default)]
    pub refused: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStats {
    pub packets: u64,
    pub bytes: u64,
}

impl StatsSnapshot {
    pub fn from_datapath(
        counters: &DatapathCounters,
        protocols: &BTreeMap<String, String>,
    ) -> Self {
        let drops = DropReason::ALL
            .iter()
            .map(|r| (r.label().to_string(), counters.drop_count(*r)))
            .collect();
        let apps = counters
            .apps
            .iter()
            .map(|(id, c)| {
                (
                    id.clone(),
                    AppStats {
                        protocol: protocols.get(id).cloned().unwrap_or_default(),
                        ingress_packets: c.ingress.packets,
                        ingress_bytes: c.ingress.bytes,
                        egress_packets: c.egress.packets,
                        egress_bytes: c.egress.bytes,
                        live: 0,
                        refused: 0,
                    },
                )
            })
            .collect();
        let interfaces = counters
            .interfaces
            .iter()
            .map(|(name, c)| {
                (
                    name.clone(),
                    InterfaceStats {
                        packets: c.packets,
                        bytes: c.bytes,
                    },
                )
            })
            .collect();
        StatsSnapshot {
            drops,
            apps,
            rule_hits: counters.rule_hits.clone(),
            interfaces,
            ..StatsSnapshot::default()
        }
    }

    /// The human-readable table.
    pub fn render_table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "{:<24} {:<5} {:>12} {:>14} {:>12} {:>14} {:>8}\n",
            "APP", "PROTO", "IN PKTS", "IN BYTES", "OUT PKTS", "OUT BYTES", "LIVE"
        ));
        for (id, a) in &self.apps {
            out.push_str(&format!(
                "{:<24} {:<5} {:>12} {:>14} {:>12} {:>14} {:>8}\n",
                id,
                a.protocol,
                a.ingress_packets,
                a.ingress_bytes,
                a.egress_packets,
                a.egress_bytes,
                a.live
            ));
        }
        out.push_str("\nDROPPED (reason: packets)\n");
        for (reason, n) in &self.drops {
            out.push_str(&format!("  {reason:<12} {n:>12}\n"));
        }
        if !self.rule_hits.is_empty() {
            out.push_str("\nACCESS RULE HITS\n");
            for (rule, n) in &self.rule_hits {
                out.push_str(&format!("  {rule:<40} {n:>12}\n"));
            }
        }
        if !self.interfaces.is_empty() {
            out.push_str("\nINTERFACES (frames seen by XDP)\n");
            for (name, i) in &self.interfaces {
                out.push_str(&format!(
                    "  {name:<16} {:>12} pkts {:>14} bytes\n",
                    i.packets, i.bytes
                ));
            }
        }
        out.push_str(&self.render_connections());
        out
    }

    /// The connection counts and the analytics window, as table sections.
    fn render_connections(&self) -> String {
        let mut out = String::new();
        if self.connections.values().any(|c| !c.events.is_empty()) {
            out.push_str("\nCONNECTIONS since start (event/status: count)\n");
            for (app, totals) in &self.connections {
                let events: Vec<String> = totals
                    .events
                    .iter()
                    .map(|c| format!("{}/{}: {}", c.event, c.status, c.count))
                    .collect();
                out.push_str(&format!("  {app:<24} {}\n", events.join("  ")));
            }
        }
        if !self.analytics.rows.is_empty() {
            let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
            out.push_str(&format!(
                "\nANALYTICS last {}s (durations in ms)\n",
                self.analytics.window_seconds
            ));
            out.push_str(&format!(
                "  {:<24} {:<14} {:>3} {:>8} {:>14} {:>14} {:>10} {:>10} {:>10} {:>10}\n",
                "APP",
                "EVENT",
                "IP",
                "COUNT",
                "BYTES IN",
                "BYTES OUT",
                "AVG",
                "MEDIAN",
                "90TH",
                "99TH"
            ));
            for r in &self.analytics.rows {
                out.push_str(&format!(
                    "  {:<24} {:<14} {:>3} {:>8} {:>14} {:>14} {:>10} {:>10} {:>10} {:>10}\n",
                    r.app,
                    r.event,
                    format!("v{}", r.ip_version),
                    r.count,
                    r.bytes_ingress,
                    r.bytes_egress,
                    ms(r.duration_avg),
                    ms(r.duration_median),
                    ms(r.duration_90th),
                    ms(r.duration_99th)
                ));
            }
        }
        out
    }
}

pub fn stats_cli(control: &Path, json: bool, watch: bool) -> anyhow::Result<ExitCode> {
    loop {
        let snapshot = request_stats(control)?;
        let text = if json {
            serde_json::to_string_pretty(&snapshot)? + "\n"
        } else {
            snapshot.render_table()
        };
        let mut stdout = std::io::stdout().lock();
        if watch && !json {
            // Home the cursor and clear the screen: the table refreshes in place.
            write!(stdout, "\x1b[H\x1b[2J")?;
        }
        stdout.write_all(text.as_bytes())?;
        stdout.flush()?;
        if !watch {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
