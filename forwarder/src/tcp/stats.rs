//! Per-app TCP counters: open connections, events by status, bytes both ways and a
//! histogram of connection durations (for `forwarder stats` and the metrics).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::events::EventKind;

/// Upper bounds (seconds) of the duration histogram's buckets; a last, implicit
/// bucket holds everything longer. From 5 ms (a refused origin) to a day.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 21600.0,
    86400.0,
];

/// A cumulative-free histogram: `counts[i]` counts durations `<= bounds[i]` and
/// `> bounds[i-1]`; `counts[bounds.len()]` those above the last bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DurationHistogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl Default for DurationHistogram {
    fn default() -> Self {
        DurationHistogram {
            bounds: DURATION_BUCKETS.to_vec(),
            counts: vec![0; DURATION_BUCKETS.len() + 1],
            sum_seconds: 0.0,
            count: 0,
        }
    }
}

impl DurationHistogram {
    pub fn observe(&mut self, duration: Duration) {
        let secs = duration.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum_seconds += secs;
        self.count += 1;
    }
}

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
    pub durations: DurationHistogram,
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
type Ended = (BTreeMap<(&'static str, u16), u64>, DurationHistogram);

/// The live counters behind [`TcpAppStats`].
#[derive(Debug, Default)]
pub struct AppCounters {
    live: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    client_bytes: AtomicU64,
    origin_bytes: AtomicU64,
    ended: Mutex<Ended>,
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
            ended.1.observe(d);
        }
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets() {
        let mut h = DurationHistogram::default();
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(2));
        h.observe(Duration::from_secs(100_000));
        assert_eq!(h.counts[0], 2);
        assert_eq!(h.counts[6], 1, "2s is in (1, 5]");
        assert_eq!(h.counts[16], 1);
        assert_eq!(h.count, 4);
        assert!((h.sum_seconds - 100_002.006).abs() < 1e-6);
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
    }
}
