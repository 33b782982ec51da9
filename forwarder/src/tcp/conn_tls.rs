//! One connection of an app that terminates TLS (`tls = "flexible" | "full" |
//! "strict"`): the handshakes on both legs in the order each mode needs, their
//! failures as events and counters, then forwarding through rustls. The parts
//! shared with pass-through (origin connect, PROXY header, events, idle and drain)
//! are `conn`'s. docs/tcp.md, "TLS".

use std::net::SocketAddr;
use std::sync::Arc;

use log::debug;
use tokio::net::TcpStream;

use super::Shared;
use super::conn::{
    Activity, End, Meta, OriginGuard, connect_origin, emit_connect, emit_disconnect, header_fault,
    reset, reset_after, run_directions, write_proxy_header,
};
use super::stats::AppCounters;
use crate::telemetry::events::EventKind;
use crate::tls::Terminator;
use crate::tls::handshake::{self, Failure};

/// A handshake failed: its event (`originError` for the origin leg, else
/// `disconnect`), its counters and a debug line.
fn handshake_failed(
    shared: &Shared,
    meta: &Meta,
    counters: &AppCounters,
    failure: Failure,
    origin: Option<SocketAddr>,
    detail: &str,
) {
    debug!(
        "app {}: TLS handshake for {} failed: {} {detail}",
        meta.app.id,
        meta.client,
        failure.label()
    );
    let kind = if failure.is_origin() {
        EventKind::OriginError
    } else {
        EventKind::Disconnect
    };
    let code = failure.status();
    let mut event = meta.event(kind, origin, code);
    event.tls.tls_error = Some(failure.label().to_string());
    event.disconnect_timestamp = Some(event.timestamp.clone());
    shared.events().emit(&event);
    counters.tls_failure(failure.label());
    counters.event(kind, code, Some(meta.accepted.elapsed()));
}

/// `TLSv1.3` / `TLSv1.2`, as the event and the metric label say it.
fn version_name(version: Option<rustls::ProtocolVersion>) -> &'static str {
    match version {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "unknown",
    }
}

/// The client leg's outcome, recorded in the event fields and the counters.
fn client_handshake_done(
    meta: &mut Meta,
    counters: &AppCounters,
    tls: &tokio_rustls::server::TlsStream<TcpStream>,
) {
    let session = tls.get_ref().1;
    let version = version_name(session.protocol_version());
    meta.tls.tls_version = Some(version.to_string());
    meta.tls.alpn = session
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    counters.tls_handshake(version, meta.accepted.elapsed());
}

/// A stream whose TCP socket can be reset.
trait OverTcp: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;
}

impl<T: OverTcp + ?Sized> OverTcp for Box<T> {
    fn tcp(&self) -> &TcpStream {
        (**self).tcp()
    }
}

impl OverTcp for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl OverTcp for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

impl OverTcp for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// The origin leg once established: plain TCP (`flexible`) or TLS.
enum OriginLeg {
    Plain(TcpStream),
    // Boxed: a TLS session is a kilobyte, a socket a few words.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A connection whose handshakes are done and whose origin is connected.
struct Established {
    origin: SocketAddr,
    client: tokio_rustls::server::TlsStream<TcpStream>,
    leg: OriginLeg,
    _origin_guard: OriginGuard,
}

/// `tls = "flexible" | "full" | "strict"`: the handshakes (`establish`), then the
/// `connect` event, forwarding and the `disconnect` event. The drain interrupts
/// a connection still in its handshakes (a `disconnect` with 999, as an open
/// connection gets).
pub(super) async fn serve(
    shared: &Arc<Shared>,
    mut meta: Meta,
    counters: &AppCounters,
    terminator: &Terminator,
    client_stream: TcpStream,
) {
    let mut close = shared.close_signal();
    let accepted = meta.clone();
    let established = tokio::select! {
        r = establish(shared, &mut meta, counters, terminator, client_stream) => r,
        _ = close.wait_for(|c| *c) => {
            let mut event = accepted.event(EventKind::Disconnect, None, End::Drained.status());
            event.disconnect_timestamp = Some(event.timestamp.clone());
            shared.events().emit(&event);
            counters.event(EventKind::Disconnect, End::Drained.status(), Some(accepted.accepted.elapsed()));
            return;
        }
    };
    let Some(established) = established else {
        return;
    };
    let origin = established.origin;
    let connect_ts = emit_connect(shared, &meta, counters, origin);
    let end = match established.leg {
        OriginLeg::Plain(leg) => {
            pump_tls(shared, counters, established.client, leg, &mut close).await
        }
        OriginLeg::Tls(leg) => {
            pump_tls(shared, counters, established.client, leg, &mut close).await
        }
    };
    emit_disconnect(shared, &meta, counters, origin, connect_ts, end);
}

/// Flexible finishes the client's handshake before it connects to the origin (an
/// origin sees only clients that completed TLS). Full and strict connect and shake
/// hands with the origin between the ClientHello and the edge's answer, so the
/// client's ALPN offer is made to the origin and the origin's choice is the
/// client's answer. The PROXY header goes first on the origin leg, in clear
/// (HAProxy's `send-proxy` with `ssl`). Every failure has emitted its event when
/// this returns `None`.
async fn establish(
    shared: &Arc<Shared>,
    meta: &mut Meta,
    counters: &AppCounters,
    terminator: &Terminator,
    client_stream: TcpStream,
) -> Option<Established> {
    let mut close = shared.close_signal();
    let deadline = meta.accepted + shared.handshake_timeout();
    let failed = |meta: &Meta, failure: Failure, origin: Option<SocketAddr>, detail: &str| {
        handshake_failed(shared, meta, counters, failure, origin, detail);
    };
    let hello = match handshake::client_hello(client_stream, deadline).await {
        Ok(hello) => hello,
        Err(failure) => {
            failed(meta, failure, None, "");
            return None;
        }
    };
    meta.tls.sni = hello.sni.clone();
    let Ok(config) = terminator.choose(hello.sni.as_deref()) else {
        failed(meta, Failure::NoSniMatch, None, "");
        return None;
    };

    if !terminator.settings().mode.origin_tls() {
        let client = match handshake::finish_client(hello, config, None, deadline).await {
            Ok(tls) => tls,
            Err(failure) => {
                failed(meta, failure, None, "");
                return None;
            }
        };
        client_handshake_done(meta, counters, &client);
        let Some((origin, stream)) = connect_origin(shared, meta, counters, None, &mut close).await
        else {
            reset(client.get_ref().0);
            return None;
        };
        let origin_guard = OriginGuard::new(shared.clone(), origin);
        return match write_proxy_header(meta, stream).await {
            Ok(stream) => Some(Established {
                origin,
                client,
                leg: OriginLeg::Plain(stream),
                _origin_guard: origin_guard,
            }),
            Err((_stream, err)) => {
                reset(client.get_ref().0);
                let (end, _, _) = header_fault(meta, origin, &err);
                let mut event = meta.event(EventKind::OriginError, Some(origin), end.status());
                event.disconnect_timestamp = Some(event.timestamp.clone());
                shared.events().emit(&event);
                counters.event(
                    EventKind::OriginError,
                    end.status(),
                    Some(meta.accepted.elapsed()),
                );
                None
            }
        };
    }

    let (origin, stream) = connect_origin(shared, meta, counters, None, &mut close).await?;
    let origin_guard = OriginGuard::new(shared.clone(), origin);
    let stream = match write_proxy_header(meta, stream).await {
        Ok(stream) => stream,
        Err((_stream, err)) => {
            let detail = format!("PROXY header: {err}");
            failed(meta, Failure::OriginHandshake, Some(origin), &detail);
            return None;
        }
    };
    let sni = hello.sni.as_deref();
    let leg = match handshake::origin(terminator, stream, origin, sni, &hello.alpn, deadline).await
    {
        Ok(tls) => tls,
        Err((failure, detail)) => {
            failed(meta, failure, Some(origin), &detail);
            return None;
        }
    };
    let chosen = leg.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let client = match handshake::finish_client(hello, config, chosen, deadline).await {
        Ok(tls) => tls,
        Err(failure) => {
            failed(meta, failure, Some(origin), "");
            return None;
        }
    };
    client_handshake_done(meta, counters, &client);
    Some(Established {
        origin,
        client,
        leg: OriginLeg::Tls(Box::new(leg)),
        _origin_guard: origin_guard,
    })
}

/// Moves both directions through rustls until both ended, one failed, the
/// connection idled out or the drain time is over; then passes a fault on.
async fn pump_tls<O: OverTcp>(
    shared: &Shared,
    counters: &AppCounters,
    client: tokio_rustls::server::TlsStream<TcpStream>,
    origin: O,
    close: &mut tokio::sync::watch::Receiver<bool>,
) -> (End, u64, u64) {
    let activity = Activity::new();
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut origin_read, mut origin_write) = tokio::io::split(origin);
    let end = {
        let client_to_origin = std::pin::pin!(crate::tls::pump::forward(
            &mut client_read,
            &mut origin_write,
            activity.client_counter(counters),
        ));
        let origin_to_client = std::pin::pin!(crate::tls::pump::forward(
            &mut origin_read,
            &mut client_write,
            activity.origin_counter(counters),
        ));
        run_directions(shared, &activity, close, client_to_origin, origin_to_client)
            .await
            .map_or_else(|end| end, |_| End::Normal)
    };
    let client = client_read.unsplit(client_write);
    let origin = origin_read.unsplit(origin_write);
    reset_after(end, client.tcp(), origin.tcp());
    activity.totals(end)
}
