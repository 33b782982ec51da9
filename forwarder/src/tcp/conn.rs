//! One proxied connection: origin connection, PROXY header, splicing both ways,
//! the `connect` and `disconnect`/`originError` events, and the counters.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use log::debug;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::Shared;
use super::copy;
use super::handoff::{HANDOFF_AFTER, HANDOFF_WINDOW, LegAddrs, Outcome};
use super::origin;
use super::quiet::Drained;
use super::splice::{self, Fault};
use super::stats::AppCounters;
use crate::config::{App, ProxyProtocol, TcpFastpath};
use crate::telemetry::events::{Event, EventKind, TlsFields, rfc3339, status};
use crate::tls::Terminator;
use crate::wire::{ProxyKind, Transport, proxy_header};

/// Counts a connection as open for its app and for the drain; undone on drop.
pub struct LiveGuard {
    shared: Arc<Shared>,
    counters: Arc<AppCounters>,
}

impl LiveGuard {
    pub(crate) fn new(shared: Arc<Shared>, counters: Arc<AppCounters>) -> LiveGuard {
        shared.live.fetch_add(1, Ordering::SeqCst);
        counters.opened();
        LiveGuard { shared, counters }
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.counters.closed();
        self.shared.live.fetch_sub(1, Ordering::SeqCst);
        self.shared.ended.notify_waiters();
    }
}

/// Counts an open connection to an origin (see `TcpProxy::live_origins`).
pub(super) struct OriginGuard {
    shared: Arc<Shared>,
    origin: SocketAddr,
}

impl OriginGuard {
    pub(super) fn new(shared: Arc<Shared>, origin: SocketAddr) -> OriginGuard {
        *shared
            .origins_live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(origin)
            .or_insert(0) += 1;
        OriginGuard { shared, origin }
    }
}

impl Drop for OriginGuard {
    fn drop(&mut self) {
        let mut live = self
            .shared
            .origins_live
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = live.get_mut(&self.origin) {
            *n -= 1;
            if *n == 0 {
                live.remove(&self.origin);
            }
        }
    }
}

/// Arms `SO_LINGER` with a zero timeout: closing the socket then sends RST instead
/// of FIN (how a reset is passed on, and how refused connections are closed).
pub fn reset(stream: &impl AsRawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd, pointer to a linger struct of the given size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Which side of the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Origin,
}

impl Side {
    /// The other leg.
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Origin,
            Side::Origin => Side::Client,
        }
    }
}

/// The status of an I/O error on `side` (`reading`: while receiving from it).
pub fn io_error_status(side: Side, reading: bool, err: &io::Error) -> u16 {
    let code = err.raw_os_error();
    match side {
        Side::Client => match code {
            Some(libc::ECONNRESET) => status::CLIENT_RST,
            Some(libc::ETIMEDOUT) => status::CLIENT_TIMEOUT,
            _ => status::CLIENT_BROKEN_PIPE,
        },
        Side::Origin => match code {
            Some(libc::ECONNRESET) => status::ORIGIN_RST,
            Some(libc::ETIMEDOUT) => status::ORIGIN_TIMEOUT,
            Some(libc::EPIPE) if !reading => status::ORIGIN_BROKEN_PIPE,
            _ => status::ORIGIN_IO_ERROR,
        },
    }
}

/// How the splicing ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions ended with FIN.
    Normal,
    /// An I/O error on `side`: the other side is reset.
    Fault { side: Side, status: u16 },
    /// Nothing moved for the idle timeout.
    Idle { status: u16 },
    /// The drain time ran out; both sides are reset.
    Drained,
}

impl End {
    pub fn status(self) -> u16 {
        match self {
            End::Normal => status::NORMAL_CLOSE,
            End::Fault { status, .. } | End::Idle { status } => status,
            End::Drained => status::UNKNOWN,
        }
    }
}

/// Idle status: the side that was expected to speak and did not. When the client
/// sent last (a request waits for its answer) the origin timed out (445); otherwise
/// the client did (497).
pub fn idle_status(last_client: u64, last_origin: u64) -> u16 {
    if last_client > last_origin {
        status::ORIGIN_TIMEOUT
    } else {
        status::CLIENT_TIMEOUT
    }
}

/// Per-connection progress, shared by the two directions and the idle watch.
pub(super) struct Activity {
    start: Instant,
    client_bytes: AtomicU64,
    origin_bytes: AtomicU64,
    /// Nanoseconds since `start` of the last bytes from each side (0 = never).
    last_client: AtomicU64,
    last_origin: AtomicU64,
}

impl Activity {
    fn now(&self) -> u64 {
        (self.start.elapsed().as_nanos() as u64).max(1)
    }

    fn last(&self) -> u64 {
        self.last_client
            .load(Ordering::Relaxed)
            .max(self.last_origin.load(Ordering::Relaxed))
    }
}

#[derive(Clone)]
pub(super) struct Meta {
    pub(super) app: Arc<App>,
    pub(super) client: SocketAddr,
    pub(super) edge: SocketAddr,
    pub(super) accepted: Instant,
    /// Filled in as the TLS handshakes go (`tls` apps).
    pub(super) tls: TlsFields,
}

impl Meta {
    pub(super) fn event(&self, kind: EventKind, origin: Option<SocketAddr>, status: u16) -> Event {
        let mut event = Event::summary(kind, self.app.id.clone(), "tcp", status, SystemTime::now());
        event.client_ip = Some(self.client.ip());
        event.client_port = Some(self.client.port());
        event.server_ip = Some(self.edge.ip());
        event.server_port = Some(self.edge.port());
        event.origin_ip = origin.map(|o| o.ip());
        event.origin_port = origin.map(|o| o.port());
        event.proxy_protocol = self.app.proxy_protocol.as_str().to_string();
        event.tls = self.tls.clone();
        event
    }
}

/// Serves one accepted connection to the end. `client` and `edge` are unmapped
/// (IPv4 as IPv4). `terminator`: the app terminates TLS.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    shared: Arc<Shared>,
    app: Arc<App>,
    terminator: Option<Arc<Terminator>>,
    counters: Arc<AppCounters>,
    _guard: LiveGuard,
    client_stream: TcpStream,
    client: SocketAddr,
    edge: SocketAddr,
) {
    let meta = Meta {
        app,
        client,
        edge,
        accepted: Instant::now(),
        tls: TlsFields::default(),
    };
    match terminator {
        None => serve_plain(&shared, meta, &counters, client_stream).await,
        // Boxed: the TLS state would make every connection's task as large (a
        // task's future is moved into place when spawned).
        Some(terminator) => {
            Box::pin(super::conn_tls::serve(
                &shared,
                meta,
                &counters,
                &terminator,
                client_stream,
            ))
            .await;
        }
    }
}

/// Connects to the app's origins in hash order (the next one on failure). When
/// none answers, emits the `originError` event and returns `None`.
/// `mss`: clamp the origin leg's MSS to this (a leg that may be spliced in XDP
/// carries no segment the client leg could not).
pub(super) async fn connect_origin(
    shared: &Shared,
    meta: &Meta,
    counters: &AppCounters,
    mss: Option<u32>,
    close: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<(SocketAddr, TcpStream)> {
    let timeout = shared.connect_timeout();
    let mut failure = None;
    let selection = shared.selection(&meta.app);
    for (offset, candidate) in
        origin::candidates(&meta.app, &selection, meta.client.ip(), meta.edge.port())
    {
        let origin_counters = shared.origin_counters(&meta.app.id, &meta.app.origins[offset]);
        let started = Instant::now();
        let attempt = tokio::select! {
            r = origin::connect_clamped(candidate, timeout, mss) => r,
            _ = close.wait_for(|c| *c) => Err((status::UNKNOWN, io::Error::other("agent stopping"))),
        };
        match attempt {
            Ok(stream) => {
                counters.connected_in(started.elapsed());
                origin_counters.opened();
                return Some((candidate, stream));
            }
            Err((code, err)) => {
                debug!(
                    "app {}: origin {candidate} for {}: {err} ({code})",
                    meta.app.id, meta.client
                );
                let stop = code == status::UNKNOWN;
                if !stop {
                    origin_counters.failed(code);
                }
                failure = Some((candidate, code));
                if stop {
                    break;
                }
            }
        }
    }
    emit_origin_error(shared, meta, counters, failure);
    None
}

/// The `originError` event of a connection no origin took: the last origin tried
/// and why it failed (`None`: there was none to try).
pub(super) fn emit_origin_error(
    shared: &Shared,
    meta: &Meta,
    counters: &AppCounters,
    failure: Option<(SocketAddr, u16)>,
) {
    let (origin_addr, code) =
        failure.map_or((None, status::ORIGIN_UNKNOWN_ERROR), |(a, c)| (Some(a), c));
    let mut event = meta.event(EventKind::OriginError, origin_addr, code);
    event.disconnect_timestamp = Some(event.timestamp.clone());
    shared.events().emit(&event);
    counters.event(EventKind::OriginError, code, Some(meta.accepted.elapsed()));
}

/// The `connect` event; returns its timestamp for the `disconnect` event.
pub(super) fn emit_connect(
    shared: &Shared,
    meta: &Meta,
    counters: &AppCounters,
    origin: SocketAddr,
) -> String {
    let connect_ts = rfc3339(SystemTime::now());
    let mut event = meta.event(EventKind::Connect, Some(origin), status::OPENED);
    event.connect_timestamp = Some(connect_ts.clone());
    shared.events().emit(&event);
    counters.event(EventKind::Connect, status::OPENED, None);
    connect_ts
}

/// The `disconnect` event of a connection that had its `connect`.
pub(super) fn emit_disconnect(
    shared: &Shared,
    meta: &Meta,
    counters: &AppCounters,
    origin: SocketAddr,
    connect_ts: String,
    (end, client_bytes, origin_bytes): (End, u64, u64),
) {
    // The origin's own figures (`forwarder origins`): found by its address.
    if let Some(o) = meta.app.origins.iter().find(|o| {
        o.addr == origin.ip() && meta.app.origin_port(o, meta.edge.port()) == origin.port()
    }) {
        shared
            .origin_counters(&meta.app.id, o)
            .closed(client_bytes, origin_bytes);
    }
    let code = end.status();
    let mut event = meta.event(EventKind::Disconnect, Some(origin), code);
    event.client_bytes = client_bytes;
    event.origin_bytes = origin_bytes;
    event.connect_timestamp = Some(connect_ts);
    event.disconnect_timestamp = Some(event.timestamp.clone());
    shared.events().emit(&event);
    counters.event(EventKind::Disconnect, code, Some(meta.accepted.elapsed()));
}

/// `tls = "off"`: origin, PROXY header, then splice or copy.
async fn serve_plain(
    shared: &Arc<Shared>,
    meta: Meta,
    counters: &AppCounters,
    client_stream: TcpStream,
) {
    // TCP_NODELAY comes from the listener (inherited by accept).
    let mut close = shared.close_signal();
    // 1. The origin, in hash order; the next one on failure.
    let mss = (meta.app.tcp_fastpath == TcpFastpath::Xdp)
        .then(|| origin::maxseg(&client_stream).ok())
        .flatten();
    let Some((origin_addr, origin_stream)) =
        connect_origin(shared, &meta, counters, mss, &mut close).await
    else {
        reset(&client_stream);
        return;
    };
    let _origin_guard = OriginGuard::new(shared.clone(), origin_addr);
    let connect_ts = emit_connect(shared, &meta, counters, origin_addr);

    // 2. The PROXY header, before any payload.
    let end = match write_proxy_header(&meta, origin_stream).await {
        Err((stream, err)) => {
            drop(stream);
            reset(&client_stream);
            header_fault(&meta, origin_addr, &err)
        }
        // 3. Copied (or spliced) both ways; with `tcp_fastpath = "xdp"`, handed to
        // the datapath once the handoff rule says so and the connection allows.
        Ok(origin_stream) => {
            let handoff = (meta.app.tcp_fastpath == TcpFastpath::Xdp && shared.splicer().is_some())
                .then(|| copy::Handoff::new(HANDOFF_AFTER, HANDOFF_WINDOW));
            let activity = Activity::new();
            forward_to_end(
                shared,
                &meta,
                counters,
                (&client_stream, &origin_stream, origin_addr),
                &activity,
                &mut close,
                handoff.as_ref(),
                false,
            )
            .await
        }
    };
    drop(client_stream);
    emit_disconnect(shared, &meta, counters, origin_addr, connect_ts, end);
}

/// Moves a connection's bytes to its end (`pump`); with `handoff` (an app with
/// `tcp_fastpath = "xdp"`), hands it to the datapath when the handoff is due
/// (`due`: it is due already), once, and copies it to its end if that falls back.
/// Passes a fault on as RST; returns how it ended with the bytes each side sent.
#[allow(clippy::too_many_arguments)]
async fn forward_to_end(
    shared: &Arc<Shared>,
    meta: &Meta,
    counters: &AppCounters,
    (client_stream, origin_stream, origin_addr): (&TcpStream, &TcpStream, SocketAddr),
    activity: &Activity,
    close: &mut tokio::sync::watch::Receiver<bool>,
    handoff: Option<&copy::Handoff>,
    mut due: bool,
) -> (End, u64, u64) {
    let mut handed = false;
    loop {
        let pumped = if std::mem::take(&mut due) {
            Pumped::HandoffDue
        } else {
            pump(
                shared,
                counters,
                client_stream,
                origin_stream,
                activity,
                close,
                handoff,
            )
            .await
        };
        let end = match pumped {
            Pumped::Ended(end) => end,
            Pumped::HandoffDue => {
                handed = true;
                if let Some(h) = handoff {
                    // One handoff per connection: if it falls back, the
                    // connection is copied to its end.
                    h.stop();
                }
                let mut drained = Drained::default();
                // Boxed: its state would make every connection's task larger.
                let spliced = Box::pin(splice_in_xdp(
                    shared,
                    meta,
                    client_stream,
                    origin_stream,
                    origin_addr,
                    &mut drained,
                ))
                .await;
                // Bytes forwarded on the way to the quiet point.
                counters.add_client_bytes(drained.client_bytes);
                counters.add_origin_bytes(drained.origin_bytes);
                activity.add(drained);
                match spliced {
                    // Both sockets were retired (closing them sends nothing),
                    // or the connection ended during the handoff and the
                    // sockets were set up to reset what the socket path would.
                    Some(outcome) => {
                        counters.add_client_bytes(outcome.client_bytes);
                        counters.add_origin_bytes(outcome.origin_bytes);
                        activity.add(Drained {
                            client_bytes: outcome.client_bytes,
                            origin_bytes: outcome.origin_bytes,
                        });
                        return activity.totals(outcome.end);
                    }
                    None => continue,
                }
            }
        };
        if !handed && let Some(splicer) = handoff.and(shared.splicer()) {
            splicer.count_short(&meta.app.id, meta.client);
        }
        reset_after(end, client_stream, origin_stream);
        return activity.totals(end);
    }
}

/// What the io_uring engine hands over when a connection of a `tcp_fastpath =
/// "xdp"` app reached its handoff point: both legs quiet, the handoff due.
pub(super) struct DueConn {
    pub(super) meta: Meta,
    pub(super) counters: Arc<AppCounters>,
    pub(super) live: LiveGuard,
    pub(super) origin_live: OriginGuard,
    pub(super) client: TcpStream,
    pub(super) origin: TcpStream,
    pub(super) origin_addr: SocketAddr,
    pub(super) connect_ts: String,
    /// What the engine moved and when (its `Activity` so far).
    pub(super) activity: Activity,
}

/// The rest of a connection the io_uring engine carried to its handoff point:
/// the handoff, and on a fallback the copy to its end, its `disconnect` event.
pub(super) async fn continue_due(shared: Arc<Shared>, due: DueConn) {
    let DueConn {
        meta,
        counters,
        live: _live,
        origin_live: _origin_live,
        client,
        origin,
        origin_addr,
        connect_ts,
        activity,
    } = due;
    let mut close = shared.close_signal();
    let handoff = copy::Handoff::new(HANDOFF_AFTER, HANDOFF_WINDOW);
    let end = forward_to_end(
        &shared,
        &meta,
        &counters,
        (&client, &origin, origin_addr),
        &activity,
        &mut close,
        Some(&handoff),
        true,
    )
    .await;
    drop(client);
    drop(origin);
    emit_disconnect(&shared, &meta, &counters, origin_addr, connect_ts, end);
}

/// `tcp_fastpath = "xdp"`, the handoff due: hands the connection to the datapath
/// once both legs are quiet and eligible, then waits for its end (docs/tcp.md,
/// "XDP splice"). `None`: it fell back; the sockets are as before. Bytes
/// forwarded on the way to the quiet point are in `drained` either way (not in
/// the outcome).
async fn splice_in_xdp(
    shared: &Shared,
    meta: &Meta,
    client: &TcpStream,
    origin: &TcpStream,
    origin_addr: SocketAddr,
    drained: &mut Drained,
) -> Option<Outcome> {
    if meta.app.tcp_fastpath != TcpFastpath::Xdp {
        return None;
    }
    let splicer = shared.splicer()?;
    let local = crate::wire::unmap_socket_addr(origin.local_addr().ok()?);
    let addrs = LegAddrs {
        client: meta.client,
        edge: meta.edge,
        local,
        origin: origin_addr,
    };
    let done = splicer
        .try_splice(&meta.app.id, client, origin, addrs, drained)
        .await
        .ok()?;
    Some(done.await.unwrap_or(Outcome {
        end: End::Drained,
        client_bytes: 0,
        origin_bytes: 0,
    }))
}

/// The end of a connection whose PROXY header could not be written.
pub(super) fn header_fault(meta: &Meta, origin: SocketAddr, err: &io::Error) -> (End, u64, u64) {
    debug!("app {}: PROXY header to {origin}: {err}", meta.app.id);
    let status = io_error_status(Side::Origin, false, err);
    (
        End::Fault {
            side: Side::Origin,
            status,
        },
        0,
        0,
    )
}

/// Passes a fault on as RST to the other side; both sides when drained.
pub(super) fn reset_after(end: End, client: &impl AsRawFd, origin: &impl AsRawFd) {
    match end {
        End::Fault {
            side: Side::Client, ..
        } => reset(origin),
        End::Fault {
            side: Side::Origin, ..
        } => reset(client),
        End::Drained => {
            reset(client);
            reset(origin);
        }
        End::Normal | End::Idle { .. } => {}
    }
}

/// The PROXY header a connection of `meta`'s app sends its origin before any
/// payload (empty: the app sends none). Both engines write it.
pub(super) fn proxy_header_bytes(meta: &Meta) -> io::Result<Vec<u8>> {
    let kind = match meta.app.proxy_protocol {
        ProxyProtocol::V1 => ProxyKind::V1,
        ProxyProtocol::V2 => ProxyKind::V2,
        ProxyProtocol::Off | ProxyProtocol::Simple => return Ok(Vec::new()),
    };
    proxy_header(kind, Transport::Stream, meta.client, meta.edge)
        .map_err(|err| io::Error::other(format!("PROXY header: {err}")))
}

pub(super) async fn write_proxy_header(
    meta: &Meta,
    mut origin: TcpStream,
) -> Result<TcpStream, (TcpStream, io::Error)> {
    let header = match proxy_header_bytes(meta) {
        Ok(header) if header.is_empty() => return Ok(origin),
        Ok(header) => header,
        Err(err) => return Err((origin, err)),
    };
    match origin.write_all(&header).await {
        Ok(()) => Ok(origin),
        Err(err) => Err((origin, err)),
    }
}

impl Activity {
    /// A connection's progress so far, as another engine kept it: `start` and the
    /// nanoseconds since it of the last bytes from each side (0: none).
    pub(super) fn resumed(
        start: Instant,
        (client_bytes, origin_bytes): (u64, u64),
        (last_client, last_origin): (u64, u64),
    ) -> Activity {
        Activity {
            start,
            client_bytes: AtomicU64::new(client_bytes),
            origin_bytes: AtomicU64::new(origin_bytes),
            last_client: AtomicU64::new(last_client),
            last_origin: AtomicU64::new(last_origin),
        }
    }

    pub(super) fn new() -> Activity {
        Activity {
            start: Instant::now(),
            client_bytes: AtomicU64::new(0),
            origin_bytes: AtomicU64::new(0),
            last_client: AtomicU64::new(0),
            last_origin: AtomicU64::new(0),
        }
    }

    /// The byte counter of the client → origin direction.
    pub(super) fn client_counter<'a>(&'a self, counters: &'a AppCounters) -> impl FnMut(u64) + 'a {
        move |n| {
            self.client_bytes.fetch_add(n, Ordering::Relaxed);
            self.last_client.store(self.now(), Ordering::Relaxed);
            counters.add_client_bytes(n);
        }
    }

    /// The byte counter of the origin → client direction.
    pub(super) fn origin_counter<'a>(&'a self, counters: &'a AppCounters) -> impl FnMut(u64) + 'a {
        move |n| {
            self.origin_bytes.fetch_add(n, Ordering::Relaxed);
            self.last_origin.store(self.now(), Ordering::Relaxed);
            counters.add_origin_bytes(n);
        }
    }

    /// Adds bytes moved outside the copy engine (by the handoff, or in XDP).
    pub(super) fn add(&self, moved: Drained) {
        self.client_bytes
            .fetch_add(moved.client_bytes, Ordering::Relaxed);
        self.origin_bytes
            .fetch_add(moved.origin_bytes, Ordering::Relaxed);
    }

    /// How it ended, with the bytes each side sent.
    pub(super) fn totals(&self, end: End) -> (End, u64, u64) {
        (
            end,
            self.client_bytes.load(Ordering::Relaxed),
            self.origin_bytes.load(Ordering::Relaxed),
        )
    }
}

/// How the socket path of a connection stopped.
enum Pumped {
    Ended(End),
    /// The handoff rule's threshold was reached: both directions paused with
    /// nothing read left unsent.
    HandoffDue,
}

/// Moves both directions (spliced or copied, `tcp_splice`) until both ended, one
/// failed, the connection idled out, the drain time is over, or `handoff` (an
/// app with `tcp_fastpath = "xdp"`, always copied) is due.
async fn pump(
    shared: &Shared,
    counters: &AppCounters,
    client: &TcpStream,
    origin: &TcpStream,
    activity: &Activity,
    close: &mut tokio::sync::watch::Receiver<bool>,
    handoff: Option<&copy::Handoff>,
) -> Pumped {
    // Pipes only for the splice engine (two per connection, four fds), from the
    // pool and back to it. A connection that may be handed to XDP is copied: a
    // pipe would hold bytes the handoff cannot see.
    let pipes = if shared.splices() && handoff.is_none() {
        match (shared.pipes.take(), shared.pipes.take()) {
            (Ok(up), Ok(down)) => Some((up, down)),
            (Err(err), _) | (_, Err(err)) => {
                log::warn!("pipe: {err}");
                return Pumped::Ended(End::Fault {
                    side: Side::Client,
                    status: status::UNKNOWN,
                });
            }
        }
    } else {
        None
    };
    let (mut up, mut down) = match pipes {
        Some((up, down)) => (Some(up), Some(down)),
        None => (None, None),
    };
    // The caller closes both sockets as soon as this returns an end: the last FIN
    // is the close's (copy::Ends).
    let ends = copy::Ends::default();
    let directions = {
        // Pinned here, in this future's state, and run by reference: moved into
        // `run_directions`, each would be copied into its state once more (a task's
        // future is copied whole when spawned, so its size is paid per connection).
        let client_to_origin = std::pin::pin!(async {
            let on_bytes = activity.client_counter(counters);
            match up.as_mut() {
                Some(pipe) => splice::forward(client, origin, pipe, on_bytes)
                    .await
                    .map(copy::Stop::Eof),
                None => copy::forward_ending(client, origin, Some(&ends), handoff, on_bytes).await,
            }
        });
        let origin_to_client = std::pin::pin!(async {
            let on_bytes = activity.origin_counter(counters);
            match down.as_mut() {
                Some(pipe) => splice::forward(origin, client, pipe, on_bytes)
                    .await
                    .map(copy::Stop::Eof),
                None => copy::forward_ending(origin, client, Some(&ends), handoff, on_bytes).await,
            }
        });
        run_directions(shared, activity, close, client_to_origin, origin_to_client).await
    };
    for pipe in [up, down].into_iter().flatten() {
        shared.pipes.give(pipe);
    }
    match directions {
        // Both pause together (the watch turns off when a direction ends first).
        Ok((copy::Stop::Paused(_), _) | (_, copy::Stop::Paused(_))) => Pumped::HandoffDue,
        Ok(_) => Pumped::Ended(End::Normal),
        Err(end) => Pumped::Ended(end),
    }
}

/// The end of a connection whose bytes from `source` failed: a read fault is the
/// source side's, a write fault the other side's.
pub(super) fn fault_end(fault: Fault, source: Side) -> End {
    match fault {
        Fault::Read(e) => End::Fault {
            side: source,
            status: io_error_status(source, true, &e),
        },
        Fault::Write(e) => {
            let destination = source.other();
            End::Fault {
                side: destination,
                status: io_error_status(destination, false, &e),
            }
        }
    }
}

/// Runs both directions of a connection against the idle timeout and the drain:
/// a read fault is the source side's, a write fault the destination's. `Ok`:
/// both directions finished, with what they returned. The directions are the
/// caller's, pinned where they are (see `pump`).
pub(super) async fn run_directions<A, B>(
    shared: &Shared,
    activity: &Activity,
    close: &mut tokio::sync::watch::Receiver<bool>,
    client_to_origin: Pin<&mut impl Future<Output = Result<A, Fault>>>,
    origin_to_client: Pin<&mut impl Future<Output = Result<B, Fault>>>,
) -> Result<(A, B), End> {
    let client_to_origin = async {
        client_to_origin
            .await
            .map_err(|f| fault_end(f, Side::Client))
    };
    let origin_to_client = async {
        origin_to_client
            .await
            .map_err(|f| fault_end(f, Side::Origin))
    };
    let idle = async {
        loop {
            let timeout = shared.idle_timeout();
            let last = Duration::from_nanos(activity.last());
            let deadline = activity.start + last + timeout;
            if Instant::now() >= deadline {
                return End::Idle {
                    status: idle_status(
                        activity.last_client.load(Ordering::Relaxed),
                        activity.last_origin.load(Ordering::Relaxed),
                    ),
                };
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        r = async { tokio::try_join!(client_to_origin, origin_to_client) } => r,
        end = idle => Err(end),
        _ = close.wait_for(|c| *c) => Err(End::Drained),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_spectrum_codes() {
        let e = |c| io::Error::from_raw_os_error(c);
        assert_eq!(
            io_error_status(Side::Client, true, &e(libc::ECONNRESET)),
            499
        );
        assert_eq!(io_error_status(Side::Client, false, &e(libc::EPIPE)), 498);
        assert_eq!(
            io_error_status(Side::Client, true, &e(libc::ETIMEDOUT)),
            497
        );
        assert_eq!(
            io_error_status(Side::Origin, true, &e(libc::ECONNRESET)),
            444
        );
        assert_eq!(
            io_error_status(Side::Origin, false, &e(libc::ECONNRESET)),
            444
        );
        assert_eq!(io_error_status(Side::Origin, false, &e(libc::EPIPE)), 448);
        assert_eq!(io_error_status(Side::Origin, true, &e(libc::EIO)), 447);
        assert_eq!(
            io_error_status(Side::Origin, true, &e(libc::ETIMEDOUT)),
            445
        );
    }

    #[test]
    fn idle_blames_the_silent_side() {
        assert_eq!(idle_status(0, 0), 497);
        assert_eq!(idle_status(10, 5), 445);
        assert_eq!(idle_status(5, 10), 497);
        assert_eq!(End::Normal.status(), 200);
        assert_eq!(End::Drained.status(), 999);
    }
}
