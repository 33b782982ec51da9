//! The snapshot model: the running agent's figures as the control socket sends
//! them (`forwarder stats` prints them: `cli::stats`; `/metrics` exposes them:
//! `metrics`).

use std::collections::BTreeMap;

use forwarder_common::DropReason;
use serde::{Deserialize, Serialize};

use crate::datapath::DatapathCounters;
use crate::telemetry::analytics::{Analytics, ConnectionTotals};

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
    /// Every origin of every app: health, drain, weight, traffic.
    #[serde(default)]
    pub origins: Vec<OriginStatus>,
    /// TCP connections of `tcp_fastpath = "xdp"` apps by outcome: `spliced`, or
    /// the reason they stayed on the socket path (`fastpath::Ineligible::label`).
    #[serde(default)]
    pub tcp_fastpath: BTreeMap<String, u64>,
}

/// What the health checks say of an origin (`up`, `down`, `unchecked` in JSON).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OriginHealth {
    /// Passing its health check (or not yet failed `fall` times).
    Up,
    /// Failing its health check: out of selection.
    Down,
    /// The app has no health check.
    #[default]
    Unchecked,
}

impl OriginHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            OriginHealth::Up => "up",
            OriginHealth::Down => "down",
            OriginHealth::Unchecked => "unchecked",
        }
    }
}

/// One origin of one app (`forwarder origins`, the per-origin metrics).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OriginStatus {
    pub app: String,
    /// `Origin::label`: `10.0.0.5:22`, `[2001:db8::5]:8100-8199`.
    pub origin: String,
    pub protocol: String,
    pub weight: u32,
    pub health: OriginHealth,
    /// Taken out by `forwarder drain`.
    pub drained: bool,
    /// Gets new connections or flows now (see `lb` for who is picked when).
    pub selected: bool,
    /// Open TCP connections / live UDP flows to it.
    pub live: u64,
    /// TCP connections made to it / UDP flows it has had.
    pub connections: u64,
    /// Payload bytes: TCP of ended connections; UDP of live and ended flows.
    pub client_bytes: u64,
    pub origin_bytes: u64,
    /// TCP: failed connect attempts by status.
    pub connect_failures: BTreeMap<u16, u64>,
    /// Health checks run, the status of the last failure (0: none since the
    /// last pass), and their durations.
    pub checks: u64,
    pub last_failure: u16,
    pub check_durations: Option<crate::telemetry::analytics::Histogram>,
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
}
