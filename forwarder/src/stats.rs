//! `forwarder stats`: the running agent's counters as a table or JSON.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use forwarder_common::DropReason;
use serde::{Deserialize, Serialize};

use crate::control::request_stats;
use crate::datapath::DatapathCounters;

/// Everything `stats` shows, as the agent sends it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Drops per reason label (every reason, zeros included).
    pub drops: BTreeMap<String, u64>,
    pub apps: BTreeMap<String, AppStats>,
    /// Hits per access rule value.
    pub rule_hits: BTreeMap<String, u64>,
    /// Frames seen per attached interface.
    pub interfaces: BTreeMap<String, InterfaceStats>,
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
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStats {
    pub packets: u64,
    pub bytes: u64,
}

impl StatsSnapshot {
    pub fn from_datapath(counters: &DatapathCounters, protocols: &BTreeMap<String, String>) -> Self {
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
                id, a.protocol, a.ingress_packets, a.ingress_bytes, a.egress_packets, a.egress_bytes, a.live
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
                out.push_str(&format!("  {name:<16} {:>12} pkts {:>14} bytes\n", i.packets, i.bytes));
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
