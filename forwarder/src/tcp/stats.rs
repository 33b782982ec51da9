//! Per-app TCP counters: open connections, events by status, bytes both ways, and
//! histograms of connection durations and of origin connect times (for
//! `forwarder stats` and the metrics). The histograms are `analytics::Histogram`,
//! the one histogram type.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::telemetry::analytics::{Histogram, TlsStats};
use crate::telemetry::events::EventKind;

/// Upper bounds (seconds) of the origin connect-time histogram
/// (`forwarder_origin_connect_duration_seconds`): from 0.1 ms (a local origin) to
/// the 5 s connect timeout.
pub const CONNECT_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
];

/// How many events of one kind and status an app produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventCount {
    pub event: String,
    pub status: u16,
    pub count: u64,
}

/// One app's TCP counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TcpAppStats {
    /// Connections open now (accepted, not yet closed).
    pub live: u64,
    /// Connections accepted (served or refused).
    pub accepted: u64,
    /// Connections closed at once because the app had too many open.
    pub rejected: u64,
    /// Payload bytes received from clients (client → origin).
    pub client_bytes: u64,
    /// Payload bytes received from origins (origin → client).
    pub origin_bytes: u64,
    /// Events by kind and status (connect/0, disconnect/200, originError/521, ...).
    pub events: Vec<EventCount>,
    /// Durations from accept to close, of every ended connection.
    pub durations: Histogram,
    /// Times to connect to an origin (successful attempts).
    pub connect_times: Histogram,
    /// Apps that terminate TLS (once a handshake was tried).
    #[serde(default)]
    pub tls: Option<TlsStats>,
}

impl TcpAppStats {
    /// The count of `event` with `status` (0 when none).
    pub fn count(&self, event: EventKind, status: u16) -> u64 {
        self.events
            .iter()
            .find(|c| c.event == event.as_str() && c.status == status)
            .map_or(0, |c| c.count)
    }
}

/// Event counts by (event, status), and the durations of ended connections.
type Ended = (BTreeMap<(&'static str, u16), u64>, Histogram);

/// The live counters behind [`TcpAppStats`].
#[derive(Debug, Default)]
pub struct AppCounters {
    live: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    client_bytes: AtomicU64,
    origin_bytes: AtomicU64,
    ended: Mutex<Ended>,
    connect_times: Mutex<Option<Histogram>>,
    tls: Mutex<Option<TlsStats>>,
}

impl AppCounters {
    pub fn live(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    pub(crate) fn opened(&self) {
        self.live.fetch_add(1, Ordering::Relaxed);
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn closed(&self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn reject(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_client_bytes(&self, n: u64) {
        self.client_bytes.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add_origin_bytes(&self, n: u64) {
        self.origin_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one event; with `duration` (the connection ended) also in the histogram.
    pub(crate) fn event(&self, kind: EventKind, status: u16, duration: Option<Duration>) {
        let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        *ended.0.entry((kind.as_str(), status)).or_insert(0) += 1;
        if let Some(d) = duration {
            ended.1.observe(d.as_secs_f64());
        }
    }

    /// Counts one successful origin connect that took `took`.
    pub(crate) fn connected_in(&self, took: Duration) {
        let mut h = self.connect_times.lock().unwrap_or_else(|e| e.into_inner());
        h.get_or_insert_with(|| Histogram::new(&CONNECT_BUCKETS))
            .observe(took.as_secs_f64());
    }

    /// Counts one completed client handshake of `version` that took `took`.
    pub(crate) fn tls_handshake(&self, version: &str, took: Duration) {
        let mut tls = self.tls.lock().unwrap_or_else(|e| e.into_inner());
        let tls = tls.get_or_insert_with(TlsStats::default);
        *tls.handshakes.entry(version.to_string()).or_insert(0) += 1;
        tls.handshake_times.observe(took.as_secs_f64());
    }

    /// Counts one failed handshake (`reason`: a `tls::handshake::Failure` label).
    pub(crate) fn tls_failure(&self, reason: &str) {
        let mut tls = self.tls.lock().unwrap_or_else(|e| e.into_inner());
        let tls = tls.get_or_insert_with(TlsStats::default);
        *tls.failures.entry(reason.to_string()).or_insert(0) += 1;
    }

    pub fn snapshot(&self) -> TcpAppStats {
        let ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        TcpAppStats {
            live: self.live.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            client_bytes: self.client_bytes.load(Ordering::Relaxed),
            origin_bytes: self.origin_bytes.load(Ordering::Relaxed),
            events: ended
                .0
                .iter()
                .map(|((kind, status), count)| EventCount {
                    event: kind.to_string(),
                    status: *status,
                    count: *count,
                })
                .collect(),
            durations: ended.1.clone(),
            connect_times: self
                .connect_times
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_else(|| Histogram::new(&CONNECT_BUCKETS)),
            tls: self.tls.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

/// One origin's TCP figures at one moment (`forwarder origins`, metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpOriginStats {
    /// Connections to it open now.
    pub live: u64,
    /// Connections made to it.
    pub connections: u64,
    /// Payload bytes of ended connections, from clients / from the origin.
    pub client_bytes: u64,
    pub origin_bytes: u64,
    /// Failed connect attempts by status (521, 522, 523, ...).
    pub connect_failures: BTreeMap<u16, u64>,
}

/// The live counters behind [`TcpOriginStats`].
#[derive(Debug, Default)]
pub struct OriginCounters {
    live: AtomicU64,
    connections: AtomicU64,
    client_bytes: AtomicU64,
    origin_bytes: AtomicU64,
    failures: Mutex<BTreeMap<u16, u64>>,
}

impl OriginCounters {
    pub(crate) fn opened(&self) {
        self.live.fetch_add(1, Ordering::Relaxed);
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection to it ended after moving these payload bytes.
    pub(crate) fn closed(&self, client_bytes: u64, origin_bytes: u64) {
        self.live.fetch_sub(1, Ordering::Relaxed);
        self.client_bytes.fetch_add(client_bytes, Ordering::Relaxed);
        self.origin_bytes.fetch_add(origin_bytes, Ordering::Relaxed);
    }

    pub(crate) fn failed(&self, status: u16) {
        *self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(status)
            .or_insert(0) += 1;
    }

    pub fn snapshot(&self) -> TcpOriginStats {
        TcpOriginStats {
            live: self.live.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            client_bytes: self.client_bytes.load(Ordering::Relaxed),
            origin_bytes: self.origin_bytes.load(Ordering::Relaxed),
            connect_failures: self
                .failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_times_have_their_own_buckets() {
        let c = AppCounters::default();
        assert_eq!(c.snapshot().connect_times.count, 0);
        c.connected_in(Duration::from_micros(300));
        c.connected_in(Duration::from_millis(40));
        let h = c.snapshot().connect_times;
        assert_eq!(h.bounds, CONNECT_BUCKETS);
        assert_eq!(h.counts[2], 1, "0.3 ms is in (0.25, 0.5] ms");
        assert_eq!(h.counts[8], 1, "40 ms is in (25, 50] ms");
        assert_eq!(h.count, 2);
    }

    #[test]
    fn counters_snapshot() {
        let c = AppCounters::default();
        c.opened();
        c.opened();
        c.closed();
        c.reject();
        c.add_client_bytes(10);
        c.add_origin_bytes(20);
        c.event(EventKind::Connect, 0, None);
        c.event(EventKind::Disconnect, 200, Some(Duration::from_millis(30)));
        c.event(EventKind::Disconnect, 200, Some(Duration::from_millis(30)));
        let s = c.snapshot();
        assert_eq!((s.live, s.accepted, s.rejected), (1, 3, 1));
        assert_eq!((s.client_bytes, s.origin_bytes), (10, 20));
        assert_eq!(s.count(EventKind::Disconnect, 200), 2);
        assert_eq!(s.count(EventKind::Connect, 0), 1);
        assert_eq!(s.count(EventKind::OriginError, 521), 0);
        assert_eq!(s.durations.count, 2);
        assert_eq!(s.tls, None, "no TLS figures before a handshake");
        c.tls_handshake("TLSv1.3", Duration::from_millis(2));
        c.tls_failure("not_tls");
        c.tls_failure("not_tls");
        let tls = c.snapshot().tls.expect("TLS figures");
        assert_eq!(tls.handshakes["TLSv1.3"], 1);
        assert_eq!(tls.failures["not_tls"], 2);
        assert_eq!(tls.handshake_times.count, 1);
    }

    #[test]
    fn origin_counters_snapshot() {
        let c = OriginCounters::default();
        c.opened();
        c.opened();
        c.closed(5, 7);
        c.failed(521);
        c.failed(521);
        c.failed(522);
        let s = c.snapshot();
        assert_eq!((s.live, s.connections), (1, 2));
        assert_eq!((s.client_bytes, s.origin_bytes), (5, 7));
        assert_eq!(s.connect_failures, BTreeMap::from([(521, 2), (522, 1)]));
    }
}
