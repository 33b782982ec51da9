//! Connection figures computed from the events the agent emits (TCP connections and
//! UDP flows): the cumulative counts and duration histogram behind the metrics
//! `forwarder_connections_total` and `forwarder_connection_duration_seconds`, and
//! Spectrum's analytics over a sliding window (default 5 minutes): per app, event
//! and IP version, `count`, `bytesIngress`, `bytesEgress`, `durationAvg`,
//! `durationMedian`, `duration90th`, `duration99th`.
//!
//! [`EventStats::record`] is an [`crate::telemetry::events::EventLog`] observer: it sees every
//! event, whatever the log's target. Nothing here is per packet.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::telemetry::events::{Event, EventKind};

/// The analytics window unless [`WINDOW_ENV`] says otherwise.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(300);

/// Environment variable that sets the analytics window of `forwarder run` (e.g. `1m`).
pub const WINDOW_ENV: &str = "FORWARDER_ANALYTICS_WINDOW";

/// Durations kept per (app, event, IP version) for the percentiles: the most recent
/// ones within the window. Counts and bytes are exact whatever the rate.
pub const MAX_DURATION_SAMPLES: usize = 10_000;

/// Upper bounds (seconds) of the buckets of `forwarder_connection_duration_seconds`;
/// a last bucket (+Inf) holds the rest. From 5 ms (a refused origin) to a day.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 21600.0,
    86400.0,
];

/// A histogram with per-bucket (not cumulative) counts: `counts[i]` counts values in
/// `(bounds[i-1], bounds[i]]`, `counts[bounds.len()]` those above the last bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(&DURATION_BUCKETS)
    }
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum += value;
        self.count += 1;
    }

    /// Adds `other`'s observations; both must have the same bounds (else `other` is
    /// ignored and `false` returned).
    pub fn merge(&mut self, other: &Histogram) -> bool {
        if self.bounds != other.bounds || self.counts.len() != other.counts.len() {
            return false;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
        self.count += other.count;
        true
    }
}

/// How many events of one kind and status an app produced since the agent started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionCount {
    pub event: String,
    pub status: u16,
    pub count: u64,
}

/// One app's cumulative connection figures (TCP connections or UDP flows).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectionTotals {
    /// connect / disconnect / originError events by status.
    pub events: Vec<ConnectionCount>,
    /// Connect-to-disconnect durations (seconds) of ended connections and flows.
    pub durations: Histogram,
    /// TCP apps: how long connecting to an origin took (successful attempts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_times: Option<Histogram>,
    /// TCP apps that terminate TLS: handshakes and their failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsStats>,
}

/// Upper bounds (seconds) of the TLS handshake-time histogram
/// (`forwarder_tls_handshake_duration_seconds`): from 0.5 ms to the 10 s timeout.
pub const HANDSHAKE_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// One TLS app's handshake figures since the agent started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TlsStats {
    /// Completed client handshakes by protocol version (`TLSv1.3`, `TLSv1.2`).
    pub handshakes: BTreeMap<String, u64>,
    /// Failed handshakes by reason (`tls::handshake::Failure` labels).
    pub failures: BTreeMap<String, u64>,
    /// From accept to the client leg's completed handshake (for `full`/`strict`
    /// this includes the origin's connect and handshake, see docs/tcp.md).
    pub handshake_times: Histogram,
}

impl Default for TlsStats {
    fn default() -> Self {
        TlsStats {
            handshakes: BTreeMap::new(),
            failures: BTreeMap::new(),
            handshake_times: Histogram::new(&HANDSHAKE_BUCKETS),
        }
    }
}

impl ConnectionTotals {
    /// The count of `event` with `status` (0 when none).
    pub fn count(&self, event: &str, status: u16) -> u64 {
        self.events
            .iter()
            .find(|c| c.event == event && c.status == status)
            .map_or(0, |c| c.count)
    }
}

/// One row of Spectrum's analytics: one app, event and IP version over the window.
/// Durations are in milliseconds, `None` when no event of the row had one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalyticsRow {
    pub app: String,
    pub event: String,
    /// 4 or 6 (the client's address family; 0 when the event names no client).
    #[serde(rename = "ipVersion")]
    pub ip_version: u8,
    pub count: u64,
    #[serde(rename = "bytesIngress")]
    pub bytes_ingress: u64,
    #[serde(rename = "bytesEgress")]
    pub bytes_egress: u64,
    #[serde(rename = "durationAvg")]
    pub duration_avg: Option<f64>,
    #[serde(rename = "durationMedian")]
    pub duration_median: Option<f64>,
    #[serde(rename = "duration90th")]
    pub duration_90th: Option<f64>,
    #[serde(rename = "duration99th")]
    pub duration_99th: Option<f64>,
}

/// Spectrum's analytics over the last `window_seconds`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Analytics {
    pub window_seconds: u64,
    pub rows: Vec<AnalyticsRow>,
}

/// Exact counts and bytes of one second.
#[derive(Debug, Clone, Copy, Default)]
struct Second {
    at: u64,
    count: u64,
    bytes_ingress: u64,
    bytes_egress: u64,
}

#[derive(Debug, Default)]
struct Group {
    seconds: VecDeque<Second>,
    /// (second, duration in ms), oldest first, at most `MAX_DURATION_SAMPLES`.
    durations: VecDeque<(u64, f64)>,
}

impl Group {
    fn prune(&mut self, oldest: u64) {
        while self.seconds.front().is_some_and(|s| s.at < oldest) {
            self.seconds.pop_front();
        }
        while self.durations.front().is_some_and(|d| d.0 < oldest) {
            self.durations.pop_front();
        }
    }
}

/// Counts by (event, status) and the duration histogram of one app.
type AppTotals = (BTreeMap<(&'static str, u16), u64>, Histogram);

/// Keyed by app id first, so that recording an event of a known app allocates
/// nothing (it happens twice per proxied connection).
#[derive(Debug, Default)]
struct Inner {
    totals: BTreeMap<String, AppTotals>,
    /// By app id, then (event, IP version).
    groups: BTreeMap<String, BTreeMap<(&'static str, u8), Group>>,
}

/// The value of `key` in `map`, made (default) if missing; the key is copied only then.
fn value_of<'a, V: Default>(map: &'a mut BTreeMap<String, V>, key: &str) -> &'a mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key).expect("inserted above")
}

/// Everything the agent derives from its events. Shared (`Arc`) between the event
/// log observer and the snapshot.
#[derive(Debug)]
pub struct EventStats {
    window: Duration,
    start: Instant,
    inner: Mutex<Inner>,
}

impl Default for EventStats {
    fn default() -> Self {
        EventStats::new(DEFAULT_WINDOW)
    }
}

/// Parses the RFC 3339 timestamps `events::rfc3339` writes (`2024-02-29T23:59:59.123456Z`,
/// fraction optional) into microseconds since the epoch.
pub fn parse_rfc3339_micros(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || !text.ends_with('Z') {
        return None;
    }
    let num = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let frac = &text[19..text.len() - 1];
    let micros = match frac.strip_prefix('.') {
        None if frac.is_empty() => 0,
        Some(digits) if !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()) => {
            // The first six digits, padded with zeros (no allocation: this runs for
            // every connection's end).
            let mut micros = 0i64;
            let mut bytes = digits.bytes();
            for _ in 0..6 {
                micros = micros * 10 + bytes.next().map_or(0, |c| i64::from(c - b'0'));
            }
            micros
        }
        _ => return None,
    };
    // Days from civil (H. Hinnant), the inverse of events::civil_from_days.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000) + micros)
}

/// The duration of a connection or flow from its event (connect to disconnect).
pub fn event_duration(event: &Event) -> Option<Duration> {
    // The end first: a `connect` event has none, and is not parsed at all.
    let end = parse_rfc3339_micros(event.disconnect_timestamp.as_deref()?)?;
    let start = parse_rfc3339_micros(event.connect_timestamp.as_deref()?)?;
    Some(Duration::from_micros(u64::try_from(end - start).ok()?))
}

fn ip_version(event: &Event) -> u8 {
    match event.client_ip.or(event.server_ip) {
        Some(IpAddr::V4(_)) => 4,
        Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => 4,
        Some(IpAddr::V6(_)) => 6,
        None => 0,
    }
}

/// The value at quantile `q` (0..=1) of sorted `values`, by linear interpolation.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let low = rank.floor() as usize;
    let high = rank.ceil() as usize;
    let frac = rank - low as f64;
    Some(sorted[low] + (sorted[high] - sorted[low]) * frac)
}

impl EventStats {
    pub fn new(window: Duration) -> Self {
        EventStats {
            window: window.max(Duration::from_secs(1)),
            start: Instant::now(),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The window from [`WINDOW_ENV`], else [`DEFAULT_WINDOW`].
    pub fn window_from_env() -> anyhow::Result<Duration> {
        match std::env::var(WINDOW_ENV) {
            Ok(text) => crate::config::parse_duration(&text)
                .map_err(|e| anyhow::anyhow!("{WINDOW_ENV}={text:?}: {e}")),
            Err(_) => Ok(DEFAULT_WINDOW),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    fn second(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_secs()
    }

    /// Counts one event (the `EventLog` observer).
    pub fn record(&self, event: &Event) {
        self.record_at(event, Instant::now());
    }

    pub fn record_at(&self, event: &Event, at: Instant) {
        // Origin health lines are about origins, not connections.
        if matches!(event.event, EventKind::OriginDown | EventKind::OriginUp) {
            return;
        }
        let now = self.second(at);
        let duration = event_duration(event);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // A summary line stands for the flows it counts.
        let stands_for = event.flows.unwrap_or(1);
        if event.event != EventKind::ClientFiltered {
            let totals = value_of(&mut inner.totals, &event.application);
            *totals
                .0
                .entry((event.event.as_str(), event.status))
                .or_insert(0) += stands_for;
            if let Some(d) = duration {
                totals.1.observe(d.as_secs_f64());
            }
        }
        let group = value_of(&mut inner.groups, &event.application)
            .entry((event.event.as_str(), ip_version(event)))
            .or_default();
        // A clientFiltered summary stands for the packets it counts.
        let count = match event.event {
            EventKind::ClientFiltered => event.client_packets.unwrap_or(1),
            _ => stands_for,
        };
        match group.seconds.back_mut() {
            Some(last) if last.at == now => {
                last.count += count;
                last.bytes_ingress += event.client_bytes;
                last.bytes_egress += event.origin_bytes;
            }
            _ => group.seconds.push_back(Second {
                at: now,
                count,
                bytes_ingress: event.client_bytes,
                bytes_egress: event.origin_bytes,
            }),
        }
        if let Some(d) = duration {
            if group.durations.len() >= MAX_DURATION_SAMPLES {
                group.durations.pop_front();
            }
            group.durations.push_back((now, d.as_secs_f64() * 1000.0));
        }
        let oldest = self.oldest_second(now);
        group.prune(oldest);
    }

    /// The first second still inside the window ending at `now`.
    fn oldest_second(&self, now: u64) -> u64 {
        (now + 1).saturating_sub(self.window.as_secs().max(1))
    }

    /// Cumulative connection figures per app id.
    pub fn totals(&self) -> BTreeMap<String, ConnectionTotals> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .totals
            .iter()
            .map(|(app, (events, durations))| {
                (
                    app.clone(),
                    ConnectionTotals {
                        events: events
                            .iter()
                            .map(|((event, status), count)| ConnectionCount {
                                event: event.to_string(),
                                status: *status,
                                count: *count,
                            })
                            .collect(),
                        durations: durations.clone(),
                        connect_times: None,
                        tls: None,
                    },
                )
            })
            .collect()
    }

    /// Spectrum's analytics over the window ending now.
    pub fn analytics(&self) -> Analytics {
        self.analytics_at(Instant::now())
    }

    pub fn analytics_at(&self, at: Instant) -> Analytics {
        let oldest = self.oldest_second(self.second(at));
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows = Vec::new();
        for (app, by_event) in inner.groups.iter_mut() {
            by_event.retain(|(event, ip_version), group| {
                group.prune(oldest);
                if group.seconds.is_empty() {
                    return false;
                }
                let (count, bytes_ingress, bytes_egress) =
                    group.seconds.iter().fold((0, 0, 0), |acc, s| {
                        (
                            acc.0 + s.count,
                            acc.1 + s.bytes_ingress,
                            acc.2 + s.bytes_egress,
                        )
                    });
                let mut durations: Vec<f64> = group.durations.iter().map(|d| d.1).collect();
                durations.sort_by(f64::total_cmp);
                let avg = (!durations.is_empty())
                    .then(|| durations.iter().sum::<f64>() / durations.len() as f64);
                rows.push(AnalyticsRow {
                    app: app.clone(),
                    event: event.to_string(),
                    ip_version: *ip_version,
                    count,
                    bytes_ingress,
                    bytes_egress,
                    duration_avg: avg,
                    duration_median: quantile(&durations, 0.5),
                    duration_90th: quantile(&durations, 0.9),
                    duration_99th: quantile(&durations, 0.99),
                });
                true
            });
        }
        inner.groups.retain(|_, by_event| !by_event.is_empty());
        Analytics {
            window_seconds: self.window.as_secs(),
            rows,
        }
    }
}

/// How often firewall drops are summarised into one `clientFiltered` event.
pub const FILTERED_SUMMARY_INTERVAL: Duration = Duration::from_secs(5);

/// Turns the firewall drop counter into rate-limited `clientFiltered` events: at
/// most one per [`FILTERED_SUMMARY_INTERVAL`], carrying the number of packets
/// dropped since the previous one (`ClientPackets`), never one line per packet.
///
/// The datapath counts firewall drops in total and hits per access rule, not per
/// app: the event names the app with `ip_firewall = true` when there is one, else
/// all of them, comma-separated. `ClientIP` is set when every drop of the interval
/// matched one `target = "ip"` block rule.
#[derive(Debug, Default)]
pub struct FilteredSummary {
    drops: u64,
    hits: BTreeMap<String, u64>,
}

impl FilteredSummary {
    /// The event for the drops since the last call, if any.
    pub fn tick(
        &mut self,
        firewall_drops: u64,
        rule_hits: &BTreeMap<String, u64>,
        config: &crate::config::Config,
        now: std::time::SystemTime,
    ) -> Option<Event> {
        let dropped = firewall_drops.saturating_sub(self.drops);
        self.drops = firewall_drops;
        let previous = std::mem::replace(&mut self.hits, rule_hits.clone());
        if dropped == 0 {
            return None;
        }
        let blocking: Vec<&crate::config::AccessRule> = config
            .access_rules
            .iter()
            .filter(|r| r.mode == crate::config::RuleAction::Block)
            .collect();
        let contributed: Vec<(&String, u64)> = rule_hits
            .iter()
            .map(|(value, n)| (value, n.saturating_sub(*previous.get(value).unwrap_or(&0))))
            .filter(|(value, delta)| *delta > 0 && blocking.iter().any(|r| &r.value == *value))
            .collect();
        let client_ip = match contributed.as_slice() {
            [(value, delta)] if *delta == dropped => blocking
                .iter()
                .find(|r| &r.value == *value && r.target == crate::config::RuleTarget::Ip)
                .map(|r| r.addr),
            _ => None,
        };
        let apps: Vec<&crate::config::App> = config.apps.iter().filter(|a| a.ip_firewall).collect();
        let protocol = match apps.first() {
            Some(first) if apps.iter().all(|a| a.protocol == first.protocol) => {
                first.protocol.as_str().to_string()
            }
            _ => String::new(),
        };
        let application = apps
            .iter()
            .map(|a| a.id.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let mut event = Event::summary(
            EventKind::ClientFiltered,
            application,
            &protocol,
            crate::telemetry::events::status::CLIENT_BLOCKED,
            now,
        );
        event.client_ip = client_ip;
        event.client_packets = Some(dropped);
        Some(event)
    }
}

/// Turns the TCP proxy's refusal counters (connections refused at once at the
/// app's connection limit or the open-file capacity) into `clientFiltered`
/// summaries with Status 503: at most one line per app per
/// [`FILTERED_SUMMARY_INTERVAL`], `Flows` = connections refused since the last.
#[derive(Debug, Default)]
pub struct RefusalSummary {
    seen: BTreeMap<String, u64>,
}

impl RefusalSummary {
    /// The summaries for the refusals since the last call (`refused`: per app, the
    /// totals since the agent started).
    pub fn tick(
        &mut self,
        refused: &BTreeMap<String, u64>,
        now: std::time::SystemTime,
    ) -> Vec<Event> {
        let mut out = Vec::new();
        for (app, total) in refused {
            let before = self.seen.insert(app.clone(), *total).unwrap_or(0);
            let delta = total.saturating_sub(before);
            if delta == 0 {
                continue;
            }
            let mut event = Event::summary(
                EventKind::ClientFiltered,
                app.clone(),
                "tcp",
                crate::telemetry::events::status::REFUSED_AT_CAPACITY,
                now,
            );
            event.flows = Some(delta);
            out.push(event);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::events::{rfc3339, status};
    use std::time::SystemTime;

    fn event(kind: EventKind, app: &str, client: &str, secs: Option<(u64, u64)>) -> Event {
        let at = |s: u64| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(s));
        Event {
            timestamp: "t".into(),
            event: kind,
            application: app.into(),
            protocol: "udp".into(),
            client_ip: Some(client.parse().unwrap()),
            client_port: Some(1),
            server_ip: None,
            server_port: None,
            origin_ip: None,
            origin_port: None,
            proxy_protocol: "off".into(),
            client_bytes: 100,
            origin_bytes: 1000,
            client_packets: None,
            origin_packets: None,
            status: if kind == EventKind::Connect {
                status::OPENED
            } else {
                status::NORMAL_CLOSE
            },
            connect_timestamp: secs.map(|s| at(s.0)),
            disconnect_timestamp: secs.map(|s| at(s.1)),
            flows: None,
            healthy_origins: None,
            tls: Default::default(),
        }
    }

    #[test]
    fn parses_what_rfc3339_writes() {
        for micros in [
            0i64,
            1_709_251_199_123_456,
            951_782_400_000_000,
            4_102_444_799_999_999,
        ] {
            let t = SystemTime::UNIX_EPOCH + Duration::from_micros(micros as u64);
            assert_eq!(parse_rfc3339_micros(&rfc3339(t)), Some(micros));
        }
        assert_eq!(
            parse_rfc3339_micros("1970-01-01T00:00:01Z"),
            Some(1_000_000)
        );
        assert_eq!(
            parse_rfc3339_micros("1970-01-01T00:00:01.5Z"),
            Some(1_500_000)
        );
        assert_eq!(parse_rfc3339_micros("garbage"), None);
        assert_eq!(parse_rfc3339_micros("1970-01-01T00:00:01.Z"), None);
    }

    #[test]
    fn histogram_buckets_and_merge() {
        let mut h = Histogram::default();
        h.observe(0.001);
        h.observe(0.005);
        h.observe(2.0);
        h.observe(100_000.0);
        assert_eq!(h.counts[0], 2);
        assert_eq!(h.counts[6], 1, "2s is in (1, 5]");
        assert_eq!(h.counts[16], 1);
        let mut sum = Histogram::default();
        assert!(sum.merge(&h));
        assert!(sum.merge(&h));
        assert_eq!(sum.count, 8);
        assert!(!sum.merge(&Histogram::new(&[1.0])));
    }

    #[test]
    fn totals_count_events_and_durations() {
        let stats = EventStats::default();
        stats.record(&event(EventKind::Connect, "a", "10.0.1.2", None));
        stats.record(&event(
            EventKind::Disconnect,
            "a",
            "10.0.1.2",
            Some((0, 1500)),
        ));
        stats.record(&event(
            EventKind::Disconnect,
            "a",
            "10.0.1.2",
            Some((0, 3000)),
        ));
        let mut filtered = event(EventKind::ClientFiltered, "a", "10.0.1.2", None);
        filtered.client_packets = Some(7);
        stats.record(&filtered);
        let totals = stats.totals();
        let a = &totals["a"];
        assert_eq!(a.count("connect", 0), 1);
        assert_eq!(a.count("disconnect", 200), 2);
        assert_eq!(
            a.count("clientFiltered", 403),
            0,
            "summaries are not connections"
        );
        assert_eq!(a.durations.count, 2);
        assert!((a.durations.sum - 4.5).abs() < 1e-9);
    }

    #[test]
    fn analytics_by_event_and_ip_version_within_the_window() {
        let stats = EventStats::new(Duration::from_secs(60));
        let t0 = Instant::now();
        for ms in [100, 200, 300, 400, 1000] {
            stats.record_at(
                &event(EventKind::Disconnect, "a", "10.0.1.2", Some((0, ms))),
                t0,
            );
        }
        stats.record_at(
            &event(EventKind::Disconnect, "a", "fd00:1::2", Some((0, 50))),
            t0,
        );
        stats.record_at(&event(EventKind::Connect, "a", "10.0.1.2", None), t0);
        let rows = stats.analytics_at(t0).rows;
        assert_eq!(rows.len(), 3);
        let v4 = rows
            .iter()
            .find(|r| r.event == "disconnect" && r.ip_version == 4)
            .unwrap();
        assert_eq!(v4.count, 5);
        assert_eq!(v4.bytes_ingress, 500);
        assert_eq!(v4.bytes_egress, 5000);
        assert_eq!(v4.duration_avg, Some(400.0));
        assert_eq!(v4.duration_median, Some(300.0));
        assert!((v4.duration_90th.unwrap() - 760.0).abs() < 1e-9);
        let v6 = rows.iter().find(|r| r.ip_version == 6).unwrap();
        assert_eq!((v6.count, v6.duration_median), (1, Some(50.0)));
        let connect = rows.iter().find(|r| r.event == "connect").unwrap();
        assert_eq!((connect.count, connect.duration_avg), (1, None));
        // Everything falls out of the window a minute later; the totals stay.
        let later = stats.analytics_at(t0 + Duration::from_secs(61));
        assert!(later.rows.is_empty(), "{later:?}");
        assert_eq!(later.window_seconds, 60);
        assert_eq!(stats.totals()["a"].count("disconnect", 200), 6);
    }

    #[test]
    fn firewall_drops_become_one_summary_per_interval() {
        let config = crate::config::Config::parse(
            "[agent]\ninterfaces = [\"eth0\"]\n\
             [[access_rules]]\nmode = \"block\"\ntarget = \"ip\"\nvalue = \"10.0.1.200\"\n\
             [[access_rules]]\nmode = \"block\"\ntarget = \"ip_range\"\nvalue = \"10.0.3.0/24\"\n\
             [[apps]]\nid = \"game\"\nprotocol = \"udp/5000\"\norigin_direct = [\"udp://10.0.2.2:5000\"]\n\
             [[apps]]\nid = \"open\"\nprotocol = \"udp/5001\"\norigin_direct = [\"udp://10.0.2.2:5001\"]\nip_firewall = false\n",
        )
        .unwrap();
        let now = std::time::SystemTime::now();
        let hits = |a: u64, b: u64| {
            BTreeMap::from([
                ("10.0.1.200".to_string(), a),
                ("10.0.3.0/24".to_string(), b),
            ])
        };
        let mut summary = FilteredSummary::default();
        assert!(summary.tick(0, &hits(0, 0), &config, now).is_none());
        let event = summary.tick(40, &hits(40, 0), &config, now).unwrap();
        assert_eq!(event.event, EventKind::ClientFiltered);
        assert_eq!(event.application, "game");
        assert_eq!(event.protocol, "udp");
        assert_eq!(event.client_packets, Some(40));
        assert_eq!(event.status, 403);
        assert_eq!(event.client_ip, Some("10.0.1.200".parse().unwrap()));
        assert!(summary.tick(40, &hits(40, 0), &config, now).is_none());
        let event = summary.tick(50, &hits(45, 5), &config, now).unwrap();
        assert_eq!((event.client_packets, event.client_ip), (Some(10), None));
    }

    #[test]
    fn serialises_with_spectrum_names() {
        let row = AnalyticsRow {
            app: "a".into(),
            event: "connect".into(),
            ip_version: 4,
            count: 1,
            bytes_ingress: 2,
            bytes_egress: 3,
            duration_avg: None,
            duration_median: None,
            duration_90th: None,
            duration_99th: None,
        };
        let json = serde_json::to_value(&row).unwrap();
        for key in [
            "count",
            "bytesIngress",
            "bytesEgress",
            "durationAvg",
            "durationMedian",
            "duration90th",
            "duration99th",
            "ipVersion",
        ] {
            assert!(json.get(key).is_some(), "{key} missing: {json}");
        }
    }

    #[test]
    fn refusals_are_summarised_per_app_with_their_count() {
        let now = std::time::SystemTime::now();
        let mut summary = RefusalSummary::default();
        let totals =
            |a: u64, b: u64| BTreeMap::from([("ssh".to_string(), a), ("web".to_string(), b)]);
        assert!(summary.tick(&totals(0, 0), now).is_empty());
        let events = summary.tick(&totals(10, 0), now);
        assert_eq!(events.len(), 1, "only the app that refused");
        assert_eq!(events[0].event, EventKind::ClientFiltered);
        assert_eq!(events[0].application, "ssh");
        assert_eq!(events[0].status, 503);
        assert_eq!(events[0].flows, Some(10));
        let events = summary.tick(&totals(12, 3), now);
        let counts: Vec<(&str, Option<u64>)> = events
            .iter()
            .map(|e| (e.application.as_str(), e.flows))
            .collect();
        assert_eq!(counts, [("ssh", Some(2)), ("web", Some(3))], "deltas");
        assert!(summary.tick(&totals(12, 3), now).is_empty());
    }
}
