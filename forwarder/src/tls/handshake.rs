//! The two handshakes of a terminated connection and why they fail.
//!
//! Client leg, in steps so that the origin leg can sit in the middle: the first
//! bytes are peeked (not a TLS handshake record → `not_tls`, before rustls or the
//! origin sees anything); the ClientHello is read (SNI, ALPN offer) and the
//! certificate chosen; the handshake is finished with the origin's ALPN choice.
//! Every step runs against one deadline, the handshake timeout.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::{AlertDescription, PeerIncompatible, ServerConfig};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::{LazyConfigAcceptor, StartHandshake, TlsConnector, client, server};

use super::Terminator;
use crate::telemetry::events::status;

/// How long a client (and, for `full`/`strict`, the origin) has to complete the
/// TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Environment variable that overrides [`DEFAULT_HANDSHAKE_TIMEOUT`] (e.g. `2s`).
pub const HANDSHAKE_TIMEOUT_ENV: &str = "FORWARDER_TLS_HANDSHAKE_TIMEOUT";

/// Why a handshake failed: the `reason` label of
/// `forwarder_tls_handshake_failures_total` and the `TlsError` event field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// The client's first bytes are not a TLS handshake record (plain HTTP,
    /// garbage), or its ClientHello does not parse.
    NotTls,
    /// The client's SNI names no certificate of the app (`tls_strict_sni`).
    NoSniMatch,
    /// No protocol version in common (e.g. a TLS 1.2 client, `min_tls_version = "1.3"`).
    ProtocolVersion,
    /// No cipher suite, key-exchange group or signature scheme in common.
    NoSharedCipher,
    /// The client did not finish within the handshake timeout.
    Timeout,
    /// The client closed or reset the connection during the handshake.
    ClientClosed,
    /// Any other failure of the client leg (a bad Finished, an alert...).
    ClientHandshake,
    /// `strict`: the origin's certificate did not validate (CA, name, dates).
    OriginBadCertificate,
    /// The origin leg's handshake failed otherwise (or timed out).
    OriginHandshake,
}

impl Failure {
    pub const ALL: [Failure; 9] = [
        Failure::NotTls,
        Failure::NoSniMatch,
        Failure::ProtocolVersion,
        Failure::NoSharedCipher,
        Failure::Timeout,
        Failure::ClientClosed,
        Failure::ClientHandshake,
        Failure::OriginBadCertificate,
        Failure::OriginHandshake,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Failure::NotTls => "not_tls",
            Failure::NoSniMatch => "no_sni_match",
            Failure::ProtocolVersion => "protocol_version",
            Failure::NoSharedCipher => "no_shared_cipher",
            Failure::Timeout => "timeout",
            Failure::ClientClosed => "client_closed",
            Failure::ClientHandshake => "client_handshake",
            Failure::OriginBadCertificate => "origin_bad_certificate",
            Failure::OriginHandshake => "origin_handshake",
        }
    }

    /// Whether the origin leg failed (an `originError` event) rather than the
    /// client's (a `disconnect` event).
    pub fn is_origin(self) -> bool {
        matches!(
            self,
            Failure::OriginBadCertificate | Failure::OriginHandshake
        )
    }

    /// The event's status: Spectrum's where one fits (client timeout 497, client
    /// reset 499), Cloudflare's 525/526 for the origin leg, else 495.
    pub fn status(self) -> u16 {
        match self {
            Failure::Timeout => status::CLIENT_TIMEOUT,
            Failure::ClientClosed => status::CLIENT_RST,
            Failure::OriginBadCertificate => status::TLS_ORIGIN_BAD_CERTIFICATE,
            Failure::OriginHandshake => status::TLS_ORIGIN_HANDSHAKE_FAILED,
            _ => status::TLS_CLIENT_HANDSHAKE_FAILED,
        }
    }
}

/// The handshake timeout: [`HANDSHAKE_TIMEOUT_ENV`] or the default.
pub fn timeout_from_env() -> anyhow::Result<Duration> {
    match std::env::var(HANDSHAKE_TIMEOUT_ENV) {
        Ok(text) => crate::config::parse_duration(&text)
            .map_err(|e| anyhow::anyhow!("{HANDSHAKE_TIMEOUT_ENV}={text:?}: {e}")),
        Err(_) => Ok(DEFAULT_HANDSHAKE_TIMEOUT),
    }
}

/// Whether `first` (what the client sent first, at least one byte) can begin a
/// TLS handshake record: content type 22, version major 3, minor 0–4.
pub fn looks_like_tls(first: &[u8]) -> bool {
    let expected: [fn(u8) -> bool; 3] = [|b| b == 0x16, |b| b == 0x03, |b| b <= 0x04];
    !first.is_empty() && first.iter().zip(expected).all(|(&b, ok)| ok(b))
}

/// A ClientHello read; the handshake waits for the edge's answer.
pub struct Hello {
    pub start: StartHandshake<TcpStream>,
    pub sni: Option<String>,
    /// The client's ALPN offer, in its order.
    pub alpn: Vec<Vec<u8>>,
}

/// Classifies an error of the client leg.
fn client_failure(err: &io::Error) -> Failure {
    if let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return match tls {
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. } => Failure::NotTls,
            rustls::Error::PeerIncompatible(why) => incompatible(why),
            rustls::Error::AlertReceived(AlertDescription::ProtocolVersion) => {
                Failure::ProtocolVersion
            }
            _ => Failure::ClientHandshake,
        };
    }
    match err.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => Failure::ClientClosed,
        io::ErrorKind::TimedOut => Failure::Timeout,
        _ => Failure::ClientHandshake,
    }
}

fn incompatible(why: &PeerIncompatible) -> Failure {
    match why {
        PeerIncompatible::SupportedVersionsExtensionRequired
        | PeerIncompatible::ServerDoesNotSupportTls12Or13
        | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig
        | PeerIncompatible::Tls12NotOffered
        | PeerIncompatible::Tls12NotOfferedOrEnabled
        | PeerIncompatible::Tls13RequiredForQuic => Failure::ProtocolVersion,
        _ => Failure::NoSharedCipher,
    }
}

async fn within<T>(
    deadline: Instant,
    step: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::time::timeout_at(deadline, step)
        .await
        .unwrap_or(Err(Failure::Timeout))
}

/// Reads the client's ClientHello.
pub async fn client_hello(stream: TcpStream, deadline: Instant) -> Result<Hello, Failure> {
    within(deadline, async {
        let mut first = [0u8; 3];
        let n = stream
            .peek(&mut first)
            .await
            .map_err(|e| client_failure(&e))?;
        if n == 0 {
            return Err(Failure::ClientClosed);
        }
        if !looks_like_tls(&first[..n]) {
            return Err(Failure::NotTls);
        }
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
            .await
            .map_err(|e| client_failure(&e))?;
        let hello = start.client_hello();
        let sni = hello.server_name().map(str::to_string);
        let alpn: Vec<Vec<u8>> = hello
            .alpn()
            .map(|protocols| protocols.map(<[u8]>::to_vec).collect())
            .unwrap_or_default();
        Ok(Hello { start, sni, alpn })
    })
    .await
}

/// Finishes the client's handshake with `config` (the certificate chosen for its
/// SNI: `Terminator::choose`), answering ALPN with `alpn` (the origin's choice)
/// when there is one.
pub async fn finish_client(
    hello: Hello,
    config: Arc<ServerConfig>,
    alpn: Option<Vec<u8>>,
    deadline: Instant,
) -> Result<server::TlsStream<TcpStream>, Failure> {
    let config = match alpn {
        Some(protocol) => {
            let mut config = (*config).clone();
            config.alpn_protocols = vec![protocol];
            Arc::new(config)
        }
        None => config,
    };
    within(deadline, async {
        hello
            .start
            .into_stream(config)
            .await
            .map_err(|e| client_failure(&e))
    })
    .await
}

/// The origin leg's handshake (after the PROXY header, if any, went in clear).
pub async fn origin(
    terminator: &Terminator,
    stream: TcpStream,
    origin: SocketAddr,
    client_sni: Option<&str>,
    alpn: &[Vec<u8>],
    deadline: Instant,
) -> Result<client::TlsStream<TcpStream>, (Failure, String)> {
    let Some(config) = terminator.origin_config(alpn) else {
        return Err((
            Failure::OriginHandshake,
            "the app does not speak TLS to its origin".into(),
        ));
    };
    let name = terminator.origin_server_name(client_sni, origin.ip());
    let connect = TlsConnector::from(config).connect(name, stream);
    match tokio::time::timeout_at(deadline, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(err)) => {
            let tls = err
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>());
            let failure = match tls {
                Some(rustls::Error::InvalidCertificate(_)) => Failure::OriginBadCertificate,
                _ => Failure::OriginHandshake,
            };
            Err((failure, err.to_string()))
        }
        Err(_) => Err((Failure::OriginHandshake, "handshake timeout".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_of_a_client_hello_look_like_tls() {
        assert!(looks_like_tls(&[0x16, 0x03, 0x01]));
        assert!(looks_like_tls(&[0x16]));
        assert!(looks_like_tls(&[0x16, 0x03]));
        assert!(!looks_like_tls(b"GET"));
        assert!(!looks_like_tls(&[0x16, 0x02, 0x01]));
        assert!(!looks_like_tls(&[0x16, 0x03, 0x09]));
        assert!(!looks_like_tls(&[0x80, 0x2e, 0x01]), "SSLv2 hello");
        assert!(!looks_like_tls(&[]));
    }

    #[test]
    fn failures_have_distinct_labels_and_their_statuses() {
        let labels: std::collections::BTreeSet<&str> =
            Failure::ALL.iter().map(|f| f.label()).collect();
        assert_eq!(labels.len(), Failure::ALL.len());
        assert_eq!(Failure::OriginBadCertificate.status(), 526);
        assert_eq!(Failure::OriginHandshake.status(), 525);
        assert_eq!(Failure::NotTls.status(), 495);
        assert_eq!(Failure::Timeout.status(), 497);
        assert!(Failure::OriginHandshake.is_origin());
        assert!(!Failure::NoSniMatch.is_origin());
    }

    #[test]
    fn rustls_errors_are_classified() {
        let wrap = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        assert_eq!(
            client_failure(&wrap(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            ))),
            Failure::NotTls
        );
        assert_eq!(
            client_failure(&wrap(rustls::Error::PeerIncompatible(
                PeerIncompatible::SupportedVersionsExtensionRequired
            ))),
            Failure::ProtocolVersion
        );
        assert_eq!(
            client_failure(&wrap(rustls::Error::PeerIncompatible(
                PeerIncompatible::NoCipherSuitesInCommon
            ))),
            Failure::NoSharedCipher
        );
        assert_eq!(
            client_failure(&io::Error::from(io::ErrorKind::UnexpectedEof)),
            Failure::ClientClosed
        );
    }
}
