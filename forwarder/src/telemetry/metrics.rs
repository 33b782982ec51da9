//! `GET /metrics` on `agent.metrics_listen` (SPEC §6): the agent's counters in the
//! Prometheus/OpenMetrics text format, encoded by `prometheus-client` and served by
//! `axum`. Nothing is counted here: every scrape takes a fresh [`StatsSnapshot`]
//! (the per-CPU maps summed at that moment, the TCP proxy's and the event
//! counters), so a scrape costs a few map reads and never slows the datapath.
//!
//! `docs/metrics.md` lists every metric, its labels and where it comes from.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use log::{info, warn};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::telemetry::analytics::Histogram;
use crate::telemetry::control::SnapshotFn;
use crate::telemetry::snapshot::{OriginHealth, StatsSnapshot};

/// The `Content-Type` of a scrape.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Names of the metric families as they appear in the exposition (counters get
/// their `_total` suffix from the encoder).
pub mod names {
    pub const DROPPED_PACKETS: &str = "forwarder_dropped_packets";
    pub const APP_PACKETS: &str = "forwarder_app_packets";
    pub const APP_BYTES: &str = "forwarder_app_bytes";
    pub const CONNECTIONS: &str = "forwarder_connections";
    /// With the unit `seconds`: `forwarder_connection_duration_seconds`.
    pub const CONNECTION_DURATION: &str = "forwarder_connection_duration";
    /// With the unit `seconds`: `forwarder_origin_connect_duration_seconds`.
    pub const ORIGIN_CONNECT: &str = "forwarder_origin_connect_duration";
    pub const UDP_FLOWS: &str = "forwarder_udp_flows";
    pub const UDP_FLOW_TABLE: &str = "forwarder_udp_flow_table_entries";
    pub const UDP_FLOWS_PROMOTED: &str = "forwarder_udp_flows_promoted";
    pub const UDP_FLOW_EVICTIONS: &str = "forwarder_udp_flow_evictions";
    pub const UDP_NAT_PORTS_IN_USE: &str = "forwarder_udp_nat_ports_in_use";
    pub const UDP_NAT_PORTS_POOL: &str = "forwarder_udp_nat_ports_pool";
    /// With the unit `seconds`: `forwarder_udp_flow_scan_seconds`.
    pub const UDP_FLOW_SCAN: &str = "forwarder_udp_flow_scan";
    pub const TCP_CONNECTIONS: &str = "forwarder_tcp_connections";
    pub const TCP_REFUSED: &str = "forwarder_tcp_refused";
    pub const TLS_HANDSHAKES: &str = "forwarder_tls_handshakes";
    pub const TLS_HANDSHAKE_FAILURES: &str = "forwarder_tls_handshake_failures";
    /// With the unit `seconds`: `forwarder_tls_handshake_duration_seconds`.
    pub const TLS_HANDSHAKE_DURATION: &str = "forwarder_tls_handshake_duration";
    pub const TCP_FASTPATH: &str = "forwarder_tcp_fastpath_connections";
    pub const FIREWALL_RULE_HITS: &str = "forwarder_firewall_rule_hits";
    pub const INTERFACE_PACKETS: &str = "forwarder_interface_packets";
    pub const BUILD_INFO: &str = "forwarder_build_info";
    /// With the unit `seconds`.
    pub const START_TIME: &str = "forwarder_start_time";
    pub const RELOADS: &str = "forwarder_reloads";
    pub const LAST_RELOAD_SUCCESSFUL: &str = "forwarder_config_last_reload_successful";
    /// With the unit `seconds`.
    pub const CONFIG_APPLIED: &str = "forwarder_config_applied_timestamp";
    pub const ORIGIN_UP: &str = "forwarder_origin_up";
    pub const ORIGIN_SELECTED: &str = "forwarder_origin_selected";
    pub const ORIGIN_LIVE: &str = "forwarder_origin_live";
    pub const ORIGIN_CONNECTIONS: &str = "forwarder_origin_connections";
    pub const ORIGIN_BYTES: &str = "forwarder_origin_bytes";
    pub const ORIGIN_CONNECT_FAILURES: &str = "forwarder_origin_connect_failures";
    /// With the unit `seconds`.
    pub const ORIGIN_HEALTH_CHECK: &str = "forwarder_origin_health_check_duration";
    pub const APP_ORIGINS_UP: &str = "forwarder_app_origins_up";
}

/// One scrape's worth of figures, encoded on demand.
#[derive(Debug)]
struct SnapshotCollector(StatsSnapshot);

fn counter<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge in seconds without labels (`NAME_seconds`).
fn seconds_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let mut metric =
        encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Gauge)?;
    let no_labels: [(&str, &str); 0] = [];
    ConstGauge::new(value).encode(metric.encode_family(&no_labels)?)
}

/// A histogram in seconds with one series per app.
fn seconds_histograms<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (&'a str, &'a Histogram)>,
) -> Result<(), std::fmt::Error> {
    let mut metric =
        encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for (app, h) in series {
        metric
            .encode_family(&[("app", app)])?
            .encode_histogram::<NoLabelSet>(h.sum, h.count, &buckets(h), None)?;
    }
    Ok(())
}

fn gauge<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        let value = i64::try_from(value).unwrap_or(i64::MAX);
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// `(upper bound, count in this bucket)` pairs with `f64::MAX` standing for +Inf,
/// as `prometheus-client` takes them (it accumulates).
fn buckets(histogram: &Histogram) -> Vec<(f64, u64)> {
    let mut out: Vec<(f64, u64)> = histogram
        .bounds
        .iter()
        .copied()
        .zip(histogram.counts.iter().copied())
        .collect();
    out.push((f64::MAX, histogram.counts.last().copied().unwrap_or(0)));
    out
}

impl SnapshotCollector {
    /// The per-origin families (`forwarder origins` as metrics).
    fn encode_origins(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let origins = &self.0.origins;
        fn labels(o: &crate::telemetry::snapshot::OriginStatus) -> Vec<(&'static str, &str)> {
            vec![("app", o.app.as_str()), ("origin", o.origin.as_str())]
        }
        gauge(
            encoder,
            names::ORIGIN_UP,
            "1 while the origin passes its health check (or has none), 0 while it is down.",
            origins
                .iter()
                .map(|o| (labels(o), u64::from(o.health != OriginHealth::Down))),
        )?;
        gauge(
            encoder,
            names::ORIGIN_SELECTED,
            "1 while the origin gets new connections or flows (up, not drained, weighted).",
            origins.iter().map(|o| (labels(o), u64::from(o.selected))),
        )?;
        let mut up: BTreeMap<&str, u64> = BTreeMap::new();
        for o in origins {
            *up.entry(o.app.as_str()).or_default() += u64::from(o.health != OriginHealth::Down);
        }
        gauge(
            encoder,
            names::APP_ORIGINS_UP,
            "Origins of the app that are up; 0: all down, new connections and flows go to all of them.",
            up.into_iter().map(|(app, n)| (vec![("app", app)], n)),
        )?;
        gauge(
            encoder,
            names::ORIGIN_LIVE,
            "Open TCP connections or live UDP flows to the origin.",
            origins.iter().map(|o| (labels(o), o.live)),
        )?;
        counter(
            encoder,
            names::ORIGIN_CONNECTIONS,
            "TCP connections made to the origin, or UDP flows it has had.",
            origins.iter().map(|o| (labels(o), o.connections)),
        )?;
        counter(
            encoder,
            names::ORIGIN_BYTES,
            "Payload bytes through the origin (TCP: ended connections; UDP: live and ended flows), by direction.",
            origins.iter().flat_map(|o| {
                let mut ingress = labels(o);
                ingress.push(("direction", "ingress"));
                let mut egress = labels(o);
                egress.push(("direction", "egress"));
                [(ingress, o.client_bytes), (egress, o.origin_bytes)]
            }),
        )?;
        let statuses: Vec<(usize, String, u64)> = origins
            .iter()
            .enumerate()
            .flat_map(|(i, o)| {
                o.connect_failures
                    .iter()
                    .map(move |(status, n)| (i, status.to_string(), *n))
            })
            .collect();
        counter(
            encoder,
            names::ORIGIN_CONNECT_FAILURES,
            "Failed TCP connect attempts to the origin, by status (521 refused, 522 timeout, 523 unreachable).",
            statuses.iter().map(|(i, status, n)| {
                let mut l = labels(&origins[*i]);
                l.push(("status", status.as_str()));
                (l, *n)
            }),
        )?;
        let mut metric = encoder.encode_descriptor(
            names::ORIGIN_HEALTH_CHECK,
            "Durations of the origin's health checks, passed or failed.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for o in origins {
            if let Some(h) = &o.check_durations {
                metric
                    .encode_family(&labels(o))?
                    .encode_histogram::<NoLabelSet>(h.sum, h.count, &buckets(h), None)?;
            }
        }
        Ok(())
    }
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        counter(
            &mut encoder,
            names::DROPPED_PACKETS,
            "Packets dropped by the XDP program, by reason.",
            s.drops
                .iter()
                .map(|(reason, n)| (vec![("reason", reason.as_str())], *n)),
        )?;
        let directions = |f: fn(&crate::telemetry::snapshot::AppStats) -> (u64, u64)| {
            s.apps.iter().flat_map(move |(id, app)| {
                let (ingress, egress) = f(app);
                [
                    (
                        vec![("app", id.as_str()), ("direction", "ingress")],
                        ingress,
                    ),
                    (vec![("app", id.as_str()), ("direction", "egress")], egress),
                ]
            })
        };
        counter(
            &mut encoder,
            names::APP_PACKETS,
            "Packets of an app: ingress client to origin, egress origin to client.",
            directions(|a| (a.ingress_packets, a.egress_packets)),
        )?;
        counter(
            &mut encoder,
            names::APP_BYTES,
            "Payload bytes of an app: ingress client to origin, egress origin to client.",
            directions(|a| (a.ingress_bytes, a.egress_bytes)),
        )?;
        let mut statuses = Vec::new();
        for (app, totals) in &s.connections {
            for c in &totals.events {
                statuses.push((
                    app.as_str(),
                    c.event.as_str(),
                    c.status.to_string(),
                    c.count,
                ));
            }
        }
        counter(
            &mut encoder,
            names::CONNECTIONS,
            "Connection events (TCP connections, UDP flows) by app, event and status.",
            statuses.iter().map(|(app, event, status, n)| {
                (
                    vec![
                        ("app", *app),
                        ("event", *event),
                        ("status", status.as_str()),
                    ],
                    *n,
                )
            }),
        )?;
        let empty = Histogram::default();
        let apps: std::collections::BTreeSet<&String> =
            s.apps.keys().chain(s.connections.keys()).collect();
        seconds_histograms(
            &mut encoder,
            names::CONNECTION_DURATION,
            "Duration from connect to disconnect of ended connections and UDP flows.",
            apps.into_iter().map(|app| {
                let h = s.connections.get(app).map_or(&empty, |c| &c.durations);
                (app.as_str(), h)
            }),
        )?;
        seconds_histograms(
            &mut encoder,
            names::ORIGIN_CONNECT,
            "Time to connect to an origin (TCP apps, successful attempts).",
            s.connections
                .iter()
                .filter_map(|(app, t)| Some((app.as_str(), t.connect_times.as_ref()?))),
        )?;
        gauge(
            &mut encoder,
            names::UDP_FLOWS,
            "Live UDP flows of an app.",
            s.apps
                .iter()
                .filter(|(_, a)| a.protocol == "udp")
                .map(|(id, a)| (vec![("app", id.as_str())], a.live)),
        )?;
        let f = &s.udp_flows;
        gauge(
            &mut encoder,
            names::UDP_FLOW_TABLE,
            "UDP flows in the assured table (the client spoke after the origin answered; never evicted) and in the new-flow table (an LRU).",
            [
                (vec![("table", "assured")], f.assured),
                (vec![("table", "new")], f.new),
            ],
        )?;
        counter(
            &mut encoder,
            names::UDP_FLOWS_PROMOTED,
            "UDP flows promoted from the new-flow table to the assured table.",
            [(vec![], f.promoted)],
        )?;
        counter(
            &mut encoder,
            names::UDP_FLOW_EVICTIONS,
            "New UDP flows the datapath evicted: table_full (pushed out of the new-flow table by other new flows), port_reclaimed (their NAT port given to another new flow).",
            [
                (vec![("reason", "table_full")], f.evicted_table_full),
                (vec![("reason", "port_reclaimed")], f.evicted_port_reclaimed),
            ],
        )?;
        gauge(
            &mut encoder,
            names::UDP_NAT_PORTS_IN_USE,
            "Ports of udp_nat_ports held by live plain-NAT and PROXY v2 flows (all origin-side addresses together).",
            [(vec![], f.nat_ports_in_use)],
        )?;
        gauge(
            &mut encoder,
            names::UDP_NAT_PORTS_POOL,
            "Ports in udp_nat_ports: the pool of each origin-side address.",
            [(vec![], f.nat_pool)],
        )?;
        seconds_gauge(
            &mut encoder,
            names::UDP_FLOW_SCAN,
            "How long the agent's last scan of the UDP flow tables took.",
            f.scan_seconds,
        )?;
        gauge(
            &mut encoder,
            names::TCP_CONNECTIONS,
            "Open TCP connections of an app.",
            s.apps
                .iter()
                .filter(|(_, a)| a.protocol == "tcp")
                .map(|(id, a)| (vec![("app", id.as_str())], a.live)),
        )?;
        counter(
            &mut encoder,
            names::TCP_REFUSED,
            "TCP connections refused at once: the app's connection limit or the agent's open-file capacity.",
            s.apps
                .iter()
                .filter(|(_, a)| a.protocol == "tcp")
                .map(|(id, a)| (vec![("app", id.as_str())], a.refused)),
        )?;
        let tls_apps: Vec<(&str, &crate::telemetry::analytics::TlsStats)> = s
            .connections
            .iter()
            .filter_map(|(app, t)| Some((app.as_str(), t.tls.as_ref()?)))
            .collect();
        counter(
            &mut encoder,
            names::TLS_HANDSHAKES,
            "Completed TLS handshakes with clients (tls apps), by protocol version.",
            tls_apps.iter().flat_map(|(app, t)| {
                t.handshakes
                    .iter()
                    .map(|(version, n)| (vec![("app", *app), ("version", version.as_str())], *n))
            }),
        )?;
        counter(
            &mut encoder,
            names::TLS_HANDSHAKE_FAILURES,
            "Failed TLS handshakes (client or origin leg), by reason; every reason of every tls app, zeros included.",
            tls_apps.iter().flat_map(|(app, t)| {
                crate::tls::handshake::Failure::ALL.iter().map(|f| {
                    let n = t.failures.get(f.label()).copied().unwrap_or(0);
                    (vec![("app", *app), ("reason", f.label())], n)
                })
            }),
        )?;
        seconds_histograms(
            &mut encoder,
            names::TLS_HANDSHAKE_DURATION,
            "From accept to the completed TLS handshake with the client (tls apps).",
            tls_apps.iter().map(|(app, t)| (*app, &t.handshake_times)),
        )?;
        counter(
            &mut encoder,
            names::TCP_FASTPATH,
            "TCP connections of tcp_fastpath = \"xdp\" apps by outcome: spliced (handed to XDP), or why they stayed on the socket path (short, not_quiet, timestamps_differ, sack_differs, window_scaling_differs, mixed_families, urgent_data, mss_too_big, repair_failed, map_full, handoff_raced).",
            s.tcp_fastpath
                .iter()
                .map(|(outcome, n)| (vec![("outcome", outcome.as_str())], *n)),
        )?;
        counter(
            &mut encoder,
            names::FIREWALL_RULE_HITS,
            "Packets whose source matched an access rule (by the rule's value).",
            s.rule_hits
                .iter()
                .map(|(rule, n)| (vec![("rule", rule.as_str())], *n)),
        )?;
        let a = &s.agent;
        gauge(
            &mut encoder,
            names::BUILD_INFO,
            "The running build: always 1, with its version and commit as labels.",
            [(
                vec![
                    ("version", a.version.as_str()),
                    ("commit", a.commit.as_str()),
                ],
                1,
            )],
        )?;
        for (name, help, value) in [
            (
                names::START_TIME,
                "When the agent started, seconds since the Unix epoch.",
                a.started_at,
            ),
            (
                names::CONFIG_APPLIED,
                "When the running config was applied (the start, or the last reload that succeeded), seconds since the Unix epoch.",
                a.config_applied_at,
            ),
        ] {
            seconds_gauge(&mut encoder, name, help, value)?;
        }
        counter(
            &mut encoder,
            names::RELOADS,
            "Config reloads (SIGHUP or a change of the file), by result.",
            [
                (vec![("result", "applied")], a.reloads_applied),
                (vec![("result", "rejected")], a.reloads_rejected),
            ],
        )?;
        gauge(
            &mut encoder,
            names::LAST_RELOAD_SUCCESSFUL,
            "1 when the last reload was applied (or none was tried), 0 when it was rejected and the previous config runs on.",
            [(vec![], u64::from(a.last_reload_successful))],
        )?;
        self.encode_origins(&mut encoder)?;
        counter(
            &mut encoder,
            names::INTERFACE_PACKETS,
            "Frames seen by the XDP program on an attached interface.",
            s.interfaces
                .iter()
                .map(|(name, i)| (vec![("interface", name.as_str())], i.packets)),
        )?;
        Ok(())
    }
}

/// The exposition text for `snapshot`.
pub fn render(snapshot: StatsSnapshot) -> anyhow::Result<String> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .map_err(|_| anyhow::anyhow!("encoding the metrics failed"))?;
    Ok(out)
}

/// `GET /healthz`: the process answers.
async fn healthz() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}

/// `GET /ready`: 200 while the agent serves (XDP attached, maps written, listeners
/// up), 503 before and once its shutdown has begun.
async fn ready(State(state): State<HttpState>) -> Response {
    if state.ready.load(std::sync::atomic::Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

/// What the HTTP handlers share.
#[derive(Clone)]
struct HttpState {
    snapshot: SnapshotFn,
    ready: Arc<std::sync::atomic::AtomicBool>,
}

async fn metrics(State(HttpState { snapshot, .. }): State<HttpState>) -> Response {
    // The snapshot is asked of the agent thread, which a reload may keep busy for a
    // moment: wait for it off the async workers.
    let result = tokio::task::spawn_blocking(move || snapshot().and_then(render)).await;
    match result {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Ok(Err(err)) => {
            warn!("metrics scrape failed: {err:#}");
            (StatusCode::SERVICE_UNAVAILABLE, format!("{err:#}\n")).into_response()
        }
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
    }
}

/// Bounds of the metrics HTTP server: a scraper is one or two connections, so a
/// flood of slow or half-sent requests must not hold sockets (and fds) for long.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// Time to send a request's headers.
    pub header_timeout: Duration,
    /// Longest life of one connection, keep-alive included.
    pub connection_timeout: Duration,
}

impl HttpLimits {
    pub const DEFAULT: HttpLimits = HttpLimits {
        max_connections: 64,
        header_timeout: Duration::from_secs(5),
        connection_timeout: Duration::from_secs(30),
    };
}

/// The HTTP server; stops when dropped.
pub struct MetricsServer {
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Listens on `addr` and serves `GET /metrics` from `snapshot`. Must run inside
    /// a tokio runtime.
    pub async fn bind(addr: SocketAddr, snapshot: SnapshotFn) -> anyhow::Result<MetricsServer> {
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
        Self::bind_with(addr, snapshot, ready, HttpLimits::DEFAULT).await
    }

    /// As `bind`; `/ready` answers from `ready`.
    pub async fn bind_ready(
        addr: SocketAddr,
        snapshot: SnapshotFn,
        ready: Arc<std::sync::atomic::AtomicBool>,
    ) -> anyhow::Result<MetricsServer> {
        Self::bind_with(addr, snapshot, ready, HttpLimits::DEFAULT).await
    }

    /// As `bind_ready`, with other limits.
    pub async fn bind_with(
        addr: SocketAddr,
        snapshot: SnapshotFn,
        ready: Arc<std::sync::atomic::AtomicBool>,
        limits: HttpLimits,
    ) -> anyhow::Result<MetricsServer> {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("binding the metrics listener to {addr} (agent.metrics_listen)")
        })?;
        let local_addr = listener.local_addr()?;
        let router = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/ready", get(self::ready))
            .with_state(HttpState { snapshot, ready });
        let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
        let task = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        warn!("metrics accept failed: {err}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Over the cap: closed at once, not queued.
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    drop(stream);
                    continue;
                };
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                tokio::spawn(async move {
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(limits.header_timeout)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    let _ = tokio::time::timeout(limits.connection_timeout, connection).await;
                    drop(permit);
                });
            }
        });
        info!("metrics at http://{local_addr}/metrics");
        Ok(MetricsServer { local_addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::analytics::{ConnectionCount, ConnectionTotals};
    use crate::telemetry::snapshot::AppStats;
    use std::sync::Arc;

    fn snapshot() -> StatsSnapshot {
        let mut s = StatsSnapshot::default();
        for reason in ["malformed", "no_app", "firewall"] {
            s.drops.insert(reason.into(), 0);
        }
        s.drops.insert("no_app".into(), 5);
        s.apps.insert(
            "game".into(),
            AppStats {
                protocol: "udp".into(),
                ingress_packets: 3,
                ingress_bytes: 300,
                egress_packets: 2,
                egress_bytes: 200,
                live: 1,
                refused: 0,
            },
        );
        s.apps.insert(
            "web".into(),
            AppStats {
                protocol: "tcp".into(),
                live: 4,
                refused: 7,
                ..AppStats::default()
            },
        );
        let mut durations = Histogram::default();
        durations.observe(0.002);
        durations.observe(2.0);
        s.connections.insert(
            "game".into(),
            ConnectionTotals {
                events: vec![
                    ConnectionCount {
                        event: "connect".into(),
                        status: 0,
                        count: 2,
                    },
                    ConnectionCount {
                        event: "disconnect".into(),
                        status: 200,
                        count: 2,
                    },
                ],
                durations,
                connect_times: None,
                tls: None,
            },
        );
        let mut connect = Histogram::new(&crate::tcp::stats::CONNECT_BUCKETS);
        connect.observe(0.0003);
        let mut tls = crate::telemetry::analytics::TlsStats::default();
        tls.handshakes.insert("TLSv1.3".into(), 6);
        tls.failures.insert("not_tls".into(), 2);
        tls.handshake_times.observe(0.003);
        s.connections.insert(
            "web".into(),
            ConnectionTotals {
                connect_times: Some(connect),
                tls: Some(tls),
                ..ConnectionTotals::default()
            },
        );
        s.rule_hits.insert("10.0.1.128/25".into(), 9);
        s.tcp_fastpath.insert("spliced".into(), 3);
        s.tcp_fastpath.insert("not_quiet".into(), 1);
        s
    }

    #[test]
    fn exposition_has_every_family_with_exact_values() {
        let text = render(snapshot()).unwrap();
        for line in [
            "# TYPE forwarder_dropped_packets counter",
            "forwarder_dropped_packets_total{reason=\"no_app\"} 5",
            "forwarder_dropped_packets_total{reason=\"malformed\"} 0",
            "forwarder_app_packets_total{app=\"game\",direction=\"ingress\"} 3",
            "forwarder_app_packets_total{app=\"game\",direction=\"egress\"} 2",
            "forwarder_app_bytes_total{app=\"game\",direction=\"ingress\"} 300",
            "forwarder_app_bytes_total{app=\"web\",direction=\"egress\"} 0",
            "forwarder_connections_total{app=\"game\",event=\"connect\",status=\"0\"} 2",
            "forwarder_connections_total{app=\"game\",event=\"disconnect\",status=\"200\"} 2",
            "# TYPE forwarder_connection_duration_seconds histogram",
            "forwarder_connection_duration_seconds_count{app=\"game\"} 2",
            "forwarder_connection_duration_seconds_bucket{le=\"0.005\",app=\"game\"} 1",
            "forwarder_connection_duration_seconds_bucket{le=\"5.0\",app=\"game\"} 2",
            "forwarder_connection_duration_seconds_bucket{le=\"+Inf\",app=\"game\"} 2",
            "forwarder_connection_duration_seconds_count{app=\"web\"} 0",
            "forwarder_udp_flows{app=\"game\"} 1",
            "forwarder_tcp_connections{app=\"web\"} 4",
            "forwarder_tcp_refused_total{app=\"web\"} 7",
            "forwarder_tls_handshakes_total{app=\"web\",version=\"TLSv1.3\"} 6",
            "forwarder_tls_handshake_failures_total{app=\"web\",reason=\"not_tls\"} 2",
            "forwarder_tls_handshake_failures_total{app=\"web\",reason=\"no_sni_match\"} 0",
            "forwarder_tls_handshake_duration_seconds_bucket{le=\"0.005\",app=\"web\"} 1",
            "forwarder_tls_handshake_duration_seconds_count{app=\"web\"} 1",
            "forwarder_tcp_fastpath_connections_total{outcome=\"spliced\"} 3",
            "forwarder_tcp_fastpath_connections_total{outcome=\"not_quiet\"} 1",
            "forwarder_firewall_rule_hits_total{rule=\"10.0.1.128/25\"} 9",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing line {line:?} in:\n{text}"
            );
        }
        assert!(!text.contains("forwarder_udp_flows{app=\"web\"}"));
        assert!(
            !text.contains("forwarder_tls_handshake_failures_total{app=\"game\""),
            "no TLS series for an app without TLS"
        );
    }

    #[tokio::test]
    async fn half_sent_requests_time_out_and_connections_are_capped() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let limits = HttpLimits {
            max_connections: 4,
            header_timeout: Duration::from_millis(300),
            connection_timeout: Duration::from_secs(2),
        };
        let server = MetricsServer::bind_with(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(|| Ok(snapshot())),
            Arc::new(std::sync::atomic::AtomicBool::new(true)),
            limits,
        )
        .await
        .unwrap();
        let addr = server.local_addr();
        // Four half-sent requests take every slot...
        let mut slow = Vec::new();
        for _ in 0..4 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            slow.push(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // ...so a fifth connection is closed at once, without an answer.
        let mut fifth = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = fifth
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(1), fifth.read_to_end(&mut buf))
            .await
            .expect("closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0, "over the cap: no answer");
        // The half-sent ones are closed after the header timeout...
        for s in &mut slow {
            let mut buf = Vec::new();
            let done = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
            assert!(
                done.is_ok(),
                "a half-sent request is closed after the header timeout"
            );
        }
        // ...and the slots are free again.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }

    #[tokio::test]
    async fn serves_get_metrics_over_http() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let server =
            MetricsServer::bind("127.0.0.1:0".parse().unwrap(), Arc::new(|| Ok(snapshot())))
                .await
                .unwrap();
        let addr = server.local_addr();
        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut reply = String::new();
            stream.read_to_string(&mut reply).await.unwrap();
            reply
        };
        let reply = get("/metrics").await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains(CONTENT_TYPE), "{reply}");
        assert!(reply.contains("forwarder_dropped_packets_total{reason=\"no_app\"} 5"));
        let reply = get("/other").await;
        assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    }

    #[tokio::test]
    async fn healthz_answers_and_ready_follows_the_flag() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let ready = Arc::new(AtomicBool::new(true));
        let server = MetricsServer::bind_ready(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(|| Ok(snapshot())),
            ready.clone(),
        )
        .await
        .unwrap();
        let addr = server.local_addr();
        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut reply = String::new();
            stream.read_to_string(&mut reply).await.unwrap();
            reply
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/ready").await.starts_with("HTTP/1.1 200"));
        ready.store(false, Ordering::SeqCst);
        let reply = get("/ready").await;
        assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
        assert!(
            get("/healthz").await.starts_with("HTTP/1.1 200"),
            "alive while not ready"
        );
    }

    #[test]
    fn build_start_and_reload_families_are_exposed() {
        let mut s = snapshot();
        s.agent = crate::telemetry::snapshot::AgentStatus {
            version: "1.2.3".into(),
            commit: "abc123".into(),
            started_at: 1_700_000_000.0,
            reloads_applied: 3,
            reloads_rejected: 1,
            last_reload_successful: false,
            config_applied_at: 1_700_000_100.0,
        };
        let text = render(s).unwrap();
        for line in [
            "forwarder_build_info{version=\"1.2.3\",commit=\"abc123\"} 1",
            "forwarder_start_time_seconds{} 1700000000.0",
            "forwarder_config_applied_timestamp_seconds{} 1700000100.0",
            "forwarder_reloads_total{result=\"applied\"} 3",
            "forwarder_reloads_total{result=\"rejected\"} 1",
            "forwarder_config_last_reload_successful{} 0",
            "forwarder_origin_connect_duration_seconds_bucket{le=\"0.0005\",app=\"web\"} 1",
            "forwarder_origin_connect_duration_seconds_count{app=\"web\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }

    /// The metric names an expression text refers to (`forwarder_…`).
    fn referenced(text: &str) -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        let bytes = text.as_bytes();
        let mut i = 0;
        while let Some(at) = text[i..].find("forwarder_") {
            let start = i + at;
            let boundary = start == 0
                || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
                end += 1;
            }
            // A `forwarder_` inside a word, or the uid "forwarder-overview", is no name.
            if boundary && end > start + "forwarder_".len() {
                names.insert(text[start..end].to_string());
            }
            i = end.max(start + 1);
        }
        names
    }

    /// The Grafana dashboard and the alert rules in `examples/` only use metrics
    /// the agent exposes (their names as a scrape writes them: `_total` for
    /// counters, `_bucket`/`_sum`/`_count` for histograms).
    #[test]
    fn the_dashboard_and_the_alerts_use_only_exposed_metrics() {
        let mut s = snapshot();
        s.interfaces.insert(
            "eth0".into(),
            crate::telemetry::snapshot::InterfaceStats::default(),
        );
        let text = render(s).unwrap();
        let mut exposed = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                    continue;
                };
                match kind {
                    "counter" => {
                        exposed.insert(format!("{name}_total"));
                    }
                    "histogram" => {
                        for suffix in ["_bucket", "_sum", "_count"] {
                            exposed.insert(format!("{name}{suffix}"));
                        }
                    }
                    _ => {
                        exposed.insert(name.to_string());
                    }
                }
            }
        }
        for (file, content) in [
            (
                "grafana-dashboard.json",
                include_str!("../../../examples/grafana-dashboard.json"),
            ),
            (
                "prometheus-alerts.yml",
                include_str!("../../../examples/prometheus-alerts.yml"),
            ),
        ] {
            let names = referenced(content);
            assert!(names.len() >= 5, "{file} refers to metrics: {names:?}");
            let unknown: Vec<&String> = names.iter().filter(|n| !exposed.contains(*n)).collect();
            assert!(
                unknown.is_empty(),
                "{file} refers to metrics the agent does not expose: {unknown:?}\nexposed: {exposed:?}"
            );
        }
    }
}
