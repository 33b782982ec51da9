//! The event log (SPEC §6): one JSON object per line, with the field names of
//! Spectrum's `spectrum_events` dataset, to stdout or a file that is reopened on
//! SIGHUP (so logrotate can move it away).

use std::fs::{File, OpenOptions};
use std::io::{LineWriter, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::Context as _;
use log::warn;
use serde::{Deserialize, Serialize};

/// Spectrum's status codes (SPEC §6).
pub mod status {
    pub const OPENED: u16 = 0;
    pub const NORMAL_CLOSE: u16 = 200;
    pub const CLIENT_BLOCKED: u16 = 403;
    pub const ORIGIN_RST: u16 = 444;
    pub const ORIGIN_TIMEOUT: u16 = 445;
    pub const ORIGIN_IO_ERROR: u16 = 447;
    pub const ORIGIN_BROKEN_PIPE: u16 = 448;
    pub const CLIENT_TIMEOUT: u16 = 497;
    pub const CLIENT_BROKEN_PIPE: u16 = 498;
    pub const CLIENT_RST: u16 = 499;
    pub const ORIGIN_UNKNOWN_ERROR: u16 = 520;
    pub const ORIGIN_REFUSED: u16 = 521;
    pub const ORIGIN_CONNECT_TIMEOUT: u16 = 522;
    pub const ORIGIN_UNREACHABLE: u16 = 523;
    pub const UNKNOWN: u16 = 999;
    /// Not in Spectrum's table: a UDP flow the datapath evicted before it was
    /// assured (the new-flow table was full, or its NAT port was reclaimed for
    /// another new flow), typically under a flood.
    pub const FLOW_EVICTED: u16 = 429;
    /// Not in Spectrum's table: TCP connections refused at once (RST) because the
    /// app's connection limit or the agent's open-file capacity was reached; only
    /// on `clientFiltered` summaries.
    pub const REFUSED_AT_CAPACITY: u16 = 503;
    /// Not in Spectrum's table: the TLS handshake with the client failed (`tls`
    /// apps; the reason is the event's `TlsError`). 495 is nginx's code for TLS
    /// client errors; client timeouts and resets during the handshake keep 497/499.
    pub const TLS_CLIENT_HANDSHAKE_FAILED: u16 = 495;
    /// Cloudflare's 525: the TLS handshake with the origin failed (`full`, `strict`).
    pub const TLS_ORIGIN_HANDSHAKE_FAILED: u16 = 525;
    /// Cloudflare's 526: the origin's certificate is invalid (`strict`).
    pub const TLS_ORIGIN_BAD_CERTIFICATE: u16 = 526;
}

/// `Event` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EventKind {
    Connect,
    Disconnect,
    OriginError,
    ClientFiltered,
    /// An origin failed its health check `fall` times in a row (not in Spectrum's
    /// dataset): no new connections or flows go to it.
    OriginDown,
    /// It passed `rise` times in a row again.
    OriginUp,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Connect => "connect",
            EventKind::Disconnect => "disconnect",
            EventKind::OriginError => "originError",
            EventKind::ClientFiltered => "clientFiltered",
            EventKind::OriginDown => "originDown",
            EventKind::OriginUp => "originUp",
        }
    }
}

/// One line of the event log. Field names are Spectrum's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Event {
    /// RFC 3339.
    pub timestamp: String,
    pub event: EventKind,
    pub application: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    #[serde(rename = "ClientIP")]
    pub client_ip: Option<IpAddr>,
    pub client_port: Option<u16>,
    /// The edge address the client talked to.
    #[serde(rename = "ServerIP")]
    pub server_ip: Option<IpAddr>,
    pub server_port: Option<u16>,
    #[serde(rename = "OriginIP")]
    pub origin_ip: Option<IpAddr>,
    pub origin_port: Option<u16>,
    /// off | v1 | v2 | simple
    pub proxy_protocol: String,
    /// Bytes received from the client / from the origin.
    pub client_bytes: u64,
    pub origin_bytes: u64,
    /// Packets, for UDP flows (not in Spectrum's dataset; absent for TCP).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub client_packets: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub origin_packets: Option<u64>,
    pub status: u16,
    pub connect_timestamp: Option<String>,
    pub disconnect_timestamp: Option<String>,
    /// On a summary line only (not in Spectrum's dataset): how many UDP flow events
    /// of this app, kind and status the line stands for (see `udp_flows`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub flows: Option<u64>,
    /// On `originDown`/`originUp` only: how many of the app's origins are up now
    /// (0: every origin is down, and new connections and flows go to all of them
    /// again, see `lb`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub healthy_origins: Option<u64>,
    /// TCP apps with `tls` on (not in Spectrum's dataset): see [`TlsFields`].
    #[serde(flatten, default)]
    pub tls: TlsFields,
}

/// The event fields of a connection whose TLS the edge terminates; all absent
/// for `tls = "off"` apps and UDP.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TlsFields {
    /// The client leg's protocol version: `TLSv1.2` or `TLSv1.3`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tls_version: Option<String>,
    /// The server name the client sent (SNI).
    #[serde(rename = "SNI", skip_serializing_if = "Option::is_none", default)]
    pub sni: Option<String>,
    /// The application protocol agreed with the client (ALPN), e.g. `h2`.
    #[serde(rename = "ALPN", skip_serializing_if = "Option::is_none", default)]
    pub alpn: Option<String>,
    /// Why the handshake failed (the `reason` of
    /// `forwarder_tls_handshake_failures_total`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tls_error: Option<String>,
}

impl Event {
    /// An event with no client, edge or origin address and counts at zero, for the
    /// caller to fill in: as it is, a summary line (`clientFiltered`, the UDP flow
    /// events beyond the budget, origin health); every other builder starts from
    /// it too, so a new field is written in one place.
    pub fn summary(
        kind: EventKind,
        application: String,
        protocol: &str,
        status: u16,
        now: SystemTime,
    ) -> Event {
        Event {
            timestamp: rfc3339(now),
            event: kind,
            application,
            protocol: protocol.to_string(),
            client_ip: None,
            client_port: None,
            server_ip: None,
            server_port: None,
            origin_ip: None,
            origin_port: None,
            proxy_protocol: String::new(),
            client_bytes: 0,
            origin_bytes: 0,
            client_packets: None,
            origin_packets: None,
            status,
            connect_timestamp: None,
            disconnect_timestamp: None,
            flows: None,
            healthy_origins: None,
            tls: TlsFields::default(),
        }
    }
}

/// Formats a wall-clock time as RFC 3339 UTC with microseconds.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs() as i64;
    let micros = since.subsec_micros();
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        return format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
            rem / 3600,
            (rem % 3600) / 60,
            rem % 60
        );
    }
    // Digit by digit: two of these per connection, and `format!` was a visible
    // share of the agent's CPU per short connection.
    let mut out = [0u8; 27];
    let mut put = |at: usize, value: u64, width: usize| {
        let mut v = value;
        for i in (0..width).rev() {
            out[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, y as u64, 4);
    put(5, u64::from(m), 2);
    put(8, u64::from(d), 2);
    put(11, (rem / 3600) as u64, 2);
    put(14, ((rem % 3600) / 60) as u64, 2);
    put(17, (rem % 60) as u64, 2);
    put(20, u64::from(micros), 6);
    for (at, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (26, b'Z'),
    ] {
        out[at] = c;
    }
    // ASCII digits and separators only.
    String::from_utf8(out.to_vec()).unwrap_or_default()
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

enum Target {
    Stdout,
    File {
        path: PathBuf,
        writer: LineWriter<File>,
    },
    Discard,
}

/// Something that sees every event emitted (metrics, analytics), whatever the target.
pub type EventObserver = Arc<dyn Fn(&Event) + Send + Sync>;

/// Where events go. Cheap to clone; writes are serialised by a mutex (events are
/// per connection or per flow, never per packet).
#[derive(Clone)]
pub struct EventLog {
    target: Arc<Mutex<Target>>,
    observers: Arc<std::sync::RwLock<Vec<EventObserver>>>,
}

impl EventLog {
    /// `"-"` is stdout, anything else a file path (appended to); `None` discards.
    pub fn open(spec: Option<&str>) -> anyhow::Result<EventLog> {
        let target = match spec {
            None => Target::Discard,
            Some("-") => Target::Stdout,
            Some(path) => {
                let path = PathBuf::from(path);
                let writer = LineWriter::new(open_append(&path)?);
                Target::File { path, writer }
            }
        };
        Ok(EventLog {
            target: Arc::new(Mutex::new(target)),
            observers: Arc::default(),
        })
    }

    pub fn discard() -> EventLog {
        EventLog {
            target: Arc::new(Mutex::new(Target::Discard)),
            observers: Arc::default(),
        }
    }

    /// Reopens the file (after logrotate moved it). No-op for stdout.
    pub fn reopen(&self) -> anyhow::Result<()> {
        let mut target = self
            .target
            .lock()
            .map_err(|_| anyhow::anyhow!("event log poisoned"))?;
        if let Target::File { path, writer } = &mut *target {
            *writer = LineWriter::new(open_append(path)?);
        }
        Ok(())
    }

    /// Calls `observer` with every event emitted from now on, by this log and its
    /// clones (also when the target discards them).
    pub fn observe(&self, observer: EventObserver) {
        self.observers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(observer);
    }

    pub fn emit(&self, event: &Event) {
        for observer in self
            .observers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            observer(event);
        }
        let Ok(mut target) = self.target.lock() else {
            return;
        };
        // Serialised only when a sink wants the line.
        if matches!(*target, Target::Discard) {
            return;
        }
        let line = match serde_json::to_string(event) {
            Ok(line) => line,
            Err(err) => {
                warn!("event not serialisable: {err}");
                return;
            }
        };
        let result = match &mut *target {
            Target::Stdout => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}").and_then(|_| out.flush())
            }
            Target::File { writer, .. } => writeln!(writer, "{line}"),
            Target::Discard => Ok(()),
        };
        if let Err(err) = result {
            warn!("writing the event log failed: {err}");
        }
    }
}

fn open_append(path: &PathBuf) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening event log {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_709_251_199_123_456);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.123456Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000000Z");
        // The last instant with a four-digit year, and the first without.
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(253_402_300_799_999_999);
        assert_eq!(rfc3339(t), "9999-12-31T23:59:59.999999Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert_eq!(rfc3339(t), "10000-01-01T00:00:00.000000Z");
    }

    #[test]
    fn events_serialise_with_spectrum_field_names() {
        let event = Event {
            timestamp: "2024-01-01T00:00:00.000000Z".into(),
            event: EventKind::OriginError,
            application: "ssh".into(),
            protocol: "tcp".into(),
            client_ip: Some("192.0.2.1".parse().unwrap()),
            client_port: Some(40000),
            server_ip: Some("198.51.100.10".parse().unwrap()),
            server_port: Some(22),
            origin_ip: Some("10.0.0.5".parse().unwrap()),
            origin_port: Some(22),
            proxy_protocol: "v2".into(),
            client_bytes: 0,
            origin_bytes: 0,
            client_packets: None,
            origin_packets: None,
            status: status::ORIGIN_REFUSED,
            connect_timestamp: None,
            disconnect_timestamp: Some("2024-01-01T00:00:01.000000Z".into()),
            flows: None,
            healthy_origins: None,
            tls: TlsFields::default(),
        };
        let json: serde_json::Value = serde_json::to_value(&event).unwrap();
        for field in [
            "Timestamp",
            "Event",
            "Application",
            "Protocol",
            "ClientIP",
            "ClientPort",
            "ServerIP",
            "ServerPort",
            "OriginIP",
            "OriginPort",
            "ProxyProtocol",
            "ClientBytes",
            "OriginBytes",
            "Status",
            "ConnectTimestamp",
            "DisconnectTimestamp",
        ] {
            assert!(json.get(field).is_some(), "missing {field}: {json}");
        }
        assert_eq!(json["Event"], "originError");
        assert_eq!(json["Status"], 521);
        assert_eq!(json["ClientIP"], "192.0.2.1");
        assert!(json.get("ClientPackets").is_none());
    }

    #[test]
    fn file_target_appends_lines_and_reopens() {
        let dir = std::env::temp_dir().join(format!("fwd-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.log");
        let log = EventLog::open(Some(path.to_str().unwrap())).unwrap();
        let mut event: Event = serde_json::from_str(
            r#"{"Timestamp":"t","Event":"connect","Application":"a","Protocol":"tcp","ClientIP":null,"ClientPort":null,"ServerIP":null,"ServerPort":null,"OriginIP":null,"OriginPort":null,"ProxyProtocol":"off","ClientBytes":0,"OriginBytes":0,"Status":0,"ConnectTimestamp":null,"DisconnectTimestamp":null}"#,
        )
        .unwrap();
        log.emit(&event);
        std::fs::rename(&path, dir.join("events.log.1")).unwrap();
        log.reopen().unwrap();
        event.event = EventKind::Disconnect;
        log.emit(&event);
        let rotated = std::fs::read_to_string(dir.join("events.log.1")).unwrap();
        let fresh = std::fs::read_to_string(&path).unwrap();
        assert_eq!(rotated.lines().count(), 1);
        assert!(fresh.contains("\"Event\":\"disconnect\""));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
