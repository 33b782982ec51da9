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

/// `tls = "flexible" | "full" | "strict"`. Flexible finishes the client's
/// handshake before it connects to the origin (an origin sees only clients that
/// completed TLS). Full and strict connect and shake hands with the origin
/// between the ClientHello and the edge's answer, so the client's ALPN offer is
/// made to the origin and the origin's choice is the client's answer. The PROXY
/// header goes first on the origin leg, in clear (HAProxy's `send-proxy` with
/// `ssl`).
pub(super) async fn serve(
    shared: &Arc<Shared>,
    mut meta: Meta,
    counters: &AppCounters,
    terminator: &Terminator,
    client_stream: TcpStream,
) {
    let mut close = shared.close_signal();
    let deadline = meta.accepted + shared.handshake_timeout();
    let hello = match handshake::client_hello(client_stream, deadline).await {
        Ok(hello) => hello,
        Err(failure) => {
            handshake_failed(shared, &meta, counters, failure, None, "");
            return;
        }
    };
    meta.tls.sni = hello.sni.clone();
    let Ok(config) = terminator.choose(hello.sni.as_deref()) else {
        handshake_failed(shared, &meta, counters, Failure::NoSniMatch, None, "");
        return;
    };

    if !terminator.settings().mode.origin_tls() {
        let client_tls = match handshake::finish_client(hello, config, None, deadline).await {
            Ok(tls) => tls,
            Err(failure) => {
                handshake_failed(shared, &meta, counters, failure, None, "");
                return;
            }
        };
        client_handshake_done(&mut meta, counters, &client_tls);
        let Some((origin_addr, origin_stream)) =
            connect_origin(shared, &meta, counters, &mut close).await
        else {
            reset(client_tls.get_ref().0);
            return;
        };
        let _origin_guard = OriginGuard::new(shared.clone(), origin_addr);
        let connect_ts = emit_connect(shared, &meta, counters, origin_addr);
        let end = match write_proxy_header(&meta, origin_stream).await {
            Err((_stream, err)) => {
                reset(client_tls.get_ref().0);
                header_fault(&meta, origin_addr, &err)
            }
            Ok(origin_stream) => {
                pump_tls(shared, counters, client_tls, origin_stream, &mut close).await
            }
        };
        emit_disconnect(shared, &meta, counters, origin_addr, connect_ts, end);
        return;
    }

    let Some((origin_addr, origin_stream)) =
        connect_origin(shared, &meta, counters, &mut close).await
    else {
        return;
    };
    let _origin_guard = OriginGuard::new(shared.clone(), origin_addr);
    let origin_stream = match write_proxy_header(&meta, origin_stream).await {
        Ok(stream) => stream,
        Err((_stream, err)) => {
            let detail = format!("PROXY header: {err}");
            let failure = Failure::OriginHandshake;
            handshake_failed(shared, &meta, counters, failure, Some(origin_addr), &detail);
            return;
        }
    };
    let origin_tls = match handshake::origin(
        terminator,
        origin_stream,
        origin_addr,
        hello.sni.as_deref(),
        &hello.alpn,
        deadline,
    )
    .await
    {
        Ok(tls) => tls,
        Err((failure, detail)) => {
            handshake_failed(shared, &meta, counters, failure, Some(origin_addr), &detail);
            return;
        }
    };
    let chosen = origin_tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let client_tls = match handshake::finish_client(hello, config, chosen, deadline).await {
        Ok(tls) => tls,
        Err(failure) => {
            handshake_failed(shared, &meta, counters, failure, Some(origin_addr), "");
            return;
        }
    };
    client_handshake_done(&mut meta, counters, &client_tls);
    let connect_ts = emit_connect(shared, &meta, counters, origin_addr);
    let end = pump_tls(shared, counters, client_tls, origin_tls, &mut close).await;
    emit_disconnect(shared, &meta, counters, origin_addr, connect_ts, end);
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
    let end = run_directions(
        shared,
        &activity,
        close,
        crate::tls::pump::forward(
            &mut client_read,
            &mut origin_write,
            activity.client_counter(counters),
        ),
        crate::tls::pump::forward(
            &mut origin_read,
            &mut client_write,
            activity.origin_counter(counters),
        ),
    )
    .await;
    let client = client_read.unsplit(client_write);
    let origin = origin_read.unsplit(origin_write);
    reset_after(end, client.tcp(), origin.tcp());
    activity.totals(end)
}
