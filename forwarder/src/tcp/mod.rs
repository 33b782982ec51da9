//! TCP apps (SPEC §4): one listening socket per app, steered to by the sk_lookup
//! program; per accepted connection an origin connection, an optional PROXY header
//! and zero-copy splicing both ways, with Spectrum's events and status codes.
//!
//! * [`listener`]: the listening sockets and the sysctls they depend on;
//! * [`origin`]: origin order (hash of the client address), connecting, error codes;
//! * [`splice`]: `splice(2)` through a pipe per direction, FIN and RST propagation;
//! * [`conn`]: one connection's life, its events and counters; `conn_tls` the
//!   same for apps that terminate TLS (`crate::tls`);
//! * [`stats`]: per-app counters and the duration histogram;
//! * `uring`: the io_uring engine (`tcp_engine`), which serves the apps without
//!   TLS on a ring per CPU (`tcp_fastpath` apps up to their handoff);
//! * `tcp_fastpath = "xdp"`: [`quiet`] (reaching a quiet point), [`repair`]
//!   (`TCP_REPAIR`), [`fastpath`] (eligibility, the `SPLICES` entries) and
//!   [`handoff`] (the handoff to XDP and the sweep that ends spliced connections).
//!
//! `docs/tcp.md` describes the design, the status codes, the limits and the sysctls.

pub mod conn;
mod conn_tls;
pub mod copy;
pub mod fastpath;
pub mod handoff;
pub mod listener;
pub mod origin;
pub mod quiet;
pub mod repair;
pub mod splice;
pub mod stats;
mod uring;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use log::{debug, info, warn};
use tokio::net::TcpListener as TokioListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::config::{App, Config, Protocol, TcpEngine};
use crate::datapath::Datapath;
use crate::lb::{Availability, OriginRef, Selection};
use crate::telemetry::events::EventLog;
use crate::tls::Terminator;
use crate::wire::unmap_socket_addr as unmap;

pub use stats::{EventCount, TcpAppStats};
pub use uring::available as io_uring_available;

/// How long the agent waits for an origin to accept a connection before trying the
/// next origin (status 522 when it was the last).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Environment variable that overrides [`DEFAULT_CONNECT_TIMEOUT`] (e.g. `1s`), for
/// tests and for operators with far-away origins.
pub const CONNECT_TIMEOUT_ENV: &str = "FORWARDER_TCP_CONNECT_TIMEOUT";

/// Open connections per app beyond which new ones are closed at once (RST).
pub const DEFAULT_MAX_CONNECTIONS_PER_APP: usize = 65_536;

/// The listen backlog of each app's socket (capped by `net.core.somaxconn`, which
/// the agent raises to this value in its namespace). See `docs/tcp.md`.
pub const LISTEN_BACKLOG: i32 = 65_535;

/// Per-origin counters by app id, then origin address and ports.
type OriginStats = BTreeMap<
    String,
    std::collections::HashMap<(IpAddr, crate::config::PortRange), Arc<stats::OriginCounters>>,
>;

/// Settings shared by every connection, changeable at run time.
pub(crate) struct Shared {
    /// Current TCP apps by id (a connection keeps the `Arc` it started with, so a
    /// reload changes only new connections).
    apps: RwLock<BTreeMap<String, Arc<App>>>,
    idle_timeout: RwLock<Duration>,
    connect_timeout: RwLock<Duration>,
    /// `tcp_splice`: new connections splice (else copy).
    splice: std::sync::atomic::AtomicBool,
    max_connections: AtomicUsize,
    /// Open connections of all apps that the fd limit allows (see `fd_limit`).
    capacity: AtomicU64,
    /// When a refusal was last logged (ms since the proxy started).
    refusal_logged_ms: AtomicU64,
    started: Instant,
    events: RwLock<EventLog>,
    /// Counters by app id; kept after an app is removed (counters never go back).
    stats: Mutex<BTreeMap<String, Arc<stats::AppCounters>>>,
    /// Empty pipes for the splice engine's next connections.
    pub(crate) pipes: splice::PipePool,
    /// Origins (address, port) with open connections, and how many each.
    origins_live: Mutex<BTreeMap<SocketAddr, u64>>,
    /// How each app picks origins (health, drain, weights); set by the agent.
    selections: RwLock<BTreeMap<String, Arc<Selection>>>,
    /// Per-origin figures, kept after a removal (looked up twice per connection:
    /// no label is formatted, nothing allocated on a hit).
    origin_stats: Mutex<OriginStats>,
    /// Open connections of all apps, and a wake-up when one ends.
    live: AtomicU64,
    ended: Notify,
    /// `true` once the drain time is over: open connections close at once.
    close_all: watch::Sender<bool>,
    /// TLS state of the apps that terminate TLS, by app id (a connection keeps
    /// the `Arc` it started with).
    terminators: RwLock<BTreeMap<String, Arc<Terminator>>>,
    /// How long a TLS handshake may take (both legs together).
    handshake_timeout: Duration,
    /// The XDP splice (`tcp_fastpath = "xdp"`); `None` when its map could not be
    /// opened (every connection then takes the socket path).
    splicer: Option<Arc<handoff::Splicer>>,
}

impl Shared {
    pub(crate) fn splices(&self) -> bool {
        self.splice.load(Ordering::Relaxed)
    }

    pub(crate) fn idle_timeout(&self) -> Duration {
        *self.idle_timeout.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        *self
            .connect_timeout
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn events(&self) -> EventLog {
        self.events
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    fn terminator(&self, app: &str) -> Option<Arc<Terminator>> {
        self.terminators
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(app)
            .cloned()
    }

    pub(crate) fn splicer(&self) -> Option<&handoff::Splicer> {
        self.splicer.as_deref()
    }

    pub(crate) fn close_signal(&self) -> watch::Receiver<bool> {
        self.close_all.subscribe()
    }

    fn counters(&self, app: &str) -> Arc<stats::AppCounters> {
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(app.to_string())
            .or_default()
            .clone()
    }

    /// How `app` picks origins now (all selectable until the agent says otherwise).
    pub(crate) fn selection(&self, app: &App) -> Arc<Selection> {
        let selections = self.selections.read().unwrap_or_else(|e| e.into_inner());
        match selections.get(&app.id) {
            Some(selection) => selection.clone(),
            None => Arc::new(Selection::new(app, &Availability::default())),
        }
    }

    pub(crate) fn origin_counters(
        &self,
        app: &str,
        origin: &crate::config::Origin,
    ) -> Arc<stats::OriginCounters> {
        let key = (origin.addr, origin.ports);
        let mut stats = self.origin_stats.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(counters) = stats.get(app).and_then(|by_origin| by_origin.get(&key)) {
            return counters.clone();
        }
        stats
            .entry(app.to_string())
            .or_default()
            .entry(key)
            .or_default()
            .clone()
    }

    /// The app that owns a connection accepted with local (edge) address `local`:
    /// the accepting listener's app when it covers the address, else any app that
    /// does (during a reload an index can briefly point at another app's socket).
    /// `None` for a connection no app covers (someone dialled the listener's own
    /// port directly): it is closed.
    fn app_for(&self, listener_app: &str, local: SocketAddr) -> Option<Arc<App>> {
        let apps = self.apps.read().unwrap_or_else(|e| e.into_inner());
        let covers =
            |app: &App| app.ports.contains(local.port()) && app.serves_edge_address(local.ip());
        if let Some(app) = apps.get(listener_app).filter(|a| covers(a)) {
            return Some(app.clone());
        }
        apps.values().find(|a| covers(a)).cloned()
    }
}

/// One app's listening socket and what accepts on it.
struct ListenerHandle {
    /// The app index whose sockmap slot holds this socket.
    index: u32,
    /// A duplicate of the listening socket's fd, for the sockmap.
    fd: std::net::TcpListener,
    accepting: Accepting,
}

enum Accepting {
    /// A tokio task (the epoll engine).
    Task {
        stop: watch::Sender<bool>,
        task: JoinHandle<()>,
    },
    /// The io_uring engine's thread.
    Ring { app_id: String },
}

/// The TCP side of the agent: listeners, connections, their events and counters.
pub struct TcpProxy {
    shared: Arc<Shared>,
    listeners: BTreeMap<String, ListenerHandle>,
    runtime: tokio::runtime::Handle,
    /// Re-reads TLS certificates whose files changed.
    certificate_watch: JoinHandle<()>,
    /// The io_uring engine, when `tcp_engine` asked for it and the kernel allowed a
    /// ring: every listener is its (it hands TLS apps' connections to epoll).
    engine: Option<uring::Engine>,
}

impl TcpProxy {
    /// Opens one listener per TCP app of `config`, puts each in its app's sockmap
    /// slot and attaches sk_lookup (the agent has set SYN cookies and `somaxconn`:
    /// `HostState::prepare_tcp_listeners`).
    /// `datapath` must already hold `config`'s plan. Must run inside a tokio runtime,
    /// in the agent's network namespace.
    pub fn start(
        config: &Config,
        datapath: &mut Datapath,
        events: EventLog,
    ) -> anyhow::Result<TcpProxy> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| anyhow!("the TCP proxy must be started inside a tokio runtime"))?;
        let connect_timeout = match std::env::var(CONNECT_TIMEOUT_ENV) {
            Ok(text) => {
                let timeout = crate::config::parse_duration(&text)
                    .map_err(|e| anyhow!("{CONNECT_TIMEOUT_ENV}={text:?}: {e}"))?;
                info!("TCP origin connect timeout {timeout:?} (from {CONNECT_TIMEOUT_ENV})");
                timeout
            }
            Err(_) => DEFAULT_CONNECT_TIMEOUT,
        };
        let (close_all, _) = watch::channel(false);
        let splicer = match datapath.splice_map() {
            Ok(map) => Some(Arc::new(handoff::Splicer::new(map))),
            Err(err) => {
                warn!("the XDP splice is unavailable, TCP stays on the socket path: {err:#}");
                None
            }
        };
        let shared = Arc::new(Shared {
            apps: RwLock::new(BTreeMap::new()),
            idle_timeout: RwLock::new(config.agent.tcp_idle_timeout),
            connect_timeout: RwLock::new(connect_timeout),
            splice: std::sync::atomic::AtomicBool::new(config.agent.tcp_splice.splices()),
            max_connections: AtomicUsize::new(DEFAULT_MAX_CONNECTIONS_PER_APP),
            // Set again by `apply`, which knows the listeners' fds.
            capacity: AtomicU64::new(fd_capacity(config.agent.tcp_splice.splices(), 0)),
            refusal_logged_ms: AtomicU64::new(0),
            started: Instant::now(),
            events: RwLock::new(events),
            stats: Mutex::new(BTreeMap::new()),
            pipes: splice::PipePool::default(),
            origins_live: Mutex::new(BTreeMap::new()),
            selections: RwLock::new(BTreeMap::new()),
            origin_stats: Mutex::new(BTreeMap::new()),
            live: AtomicU64::new(0),
            ended: Notify::new(),
            close_all,
            terminators: RwLock::new(BTreeMap::new()),
            handshake_timeout: crate::tls::handshake::timeout_from_env()?,
            splicer,
        });
        let certificate_watch = runtime.spawn(watch_certificates(shared.clone()));
        if shared.splicer.is_some() {
            runtime.spawn(sweep_splices(shared.clone()));
        }
        let agent = &config.agent;
        let engine = match agent.tcp_engine.tries_io_uring(agent.tcp_splice) {
            false => None,
            // A ring per worker of the runtime: one per CPU the agent may run on.
            true => match uring::Engine::start(
                shared.clone(),
                runtime.clone(),
                runtime.metrics().num_workers(),
            ) {
                Ok(engine) => Some(engine),
                Err(err) => {
                    let text = format!(
                        "the kernel refused an io_uring ({err}): every TCP connection takes \
                         the epoll engine"
                    );
                    // Asked for by name: worth a warning; `auto` says what it chose.
                    match agent.tcp_engine {
                        TcpEngine::IoUring => warn!("tcp_engine = \"io_uring\": {text}"),
                        _ => info!("tcp_engine = \"{}\": {text}", agent.tcp_engine),
                    }
                    None
                }
            },
        };
        match &engine {
            Some(engine) => info!(
                "TCP engine: io_uring, {} ring(s) (TLS apps on epoll)",
                engine.rings()
            ),
            None => info!("TCP engine: epoll"),
        }
        let mut proxy = TcpProxy {
            shared,
            listeners: BTreeMap::new(),
            runtime,
            certificate_watch,
            engine,
        };
        proxy.apply(config, datapath)?;
        datapath.attach_sk_lookup()?;
        Ok(proxy)
    }

    /// Brings the listeners in line with `config` (whose plan `datapath` already
    /// holds): new apps get a listener, removed apps lose theirs (open connections
    /// continue), moved apps change sockmap slot; new connections use the new origins.
    pub fn apply(&mut self, config: &Config, datapath: &mut Datapath) -> anyhow::Result<()> {
        let indices = datapath.app_indices();
        if let Some(splicer) = self.shared.splicer() {
            splicer.set_app_indices(indices.clone());
        }
        let tcp_apps: BTreeMap<String, Arc<App>> = config
            .apps
            .iter()
            .filter(|a| a.protocol == Protocol::Tcp)
            .map(|a| (a.id.clone(), Arc::new(a.clone())))
            .collect();
        // TLS state first: a certificate that cannot be read fails the whole
        // change before anything else changed.
        let terminators = self.terminators_for(&tcp_apps)?;
        *self
            .shared
            .terminators
            .write()
            .unwrap_or_else(|e| e.into_inner()) = terminators;
        *self.shared.apps.write().unwrap_or_else(|e| e.into_inner()) = tcp_apps.clone();
        *self
            .shared
            .idle_timeout
            .write()
            .unwrap_or_else(|e| e.into_inner()) = config.agent.tcp_idle_timeout;
        self.shared
            .splice
            .store(config.agent.tcp_splice.splices(), Ordering::Relaxed);
        // Each app's listener: the sockmap's fd, and the accepting one (the tokio
        // task's, or one per ring).
        let accepting = self.engine.as_ref().map_or(1, |e| e.rings()) as u64;
        let listener_fds = tcp_apps.len() as u64 * (1 + accepting);
        self.shared.capacity.store(
            fd_capacity(config.agent.tcp_splice.splices(), listener_fds),
            Ordering::Relaxed,
        );

        // New and moved apps first, so no configured port is without a socket.
        for id in tcp_apps.keys() {
            let index = *indices
                .get(id)
                .with_context(|| format!("app {id} has no index in the datapath plan"))?;
            match self.listeners.get_mut(id) {
                Some(handle) if handle.index == index => {}
                Some(handle) => {
                    datapath.set_tcp_listener(index, &handle.fd)?;
                    debug!(
                        "app {id}: listener moved from slot {} to {index}",
                        handle.index
                    );
                    handle.index = index;
                }
                None => {
                    let handle = self.open_listener(id, index, datapath)?;
                    self.listeners.insert(id.clone(), handle);
                }
            }
        }
        // Slots that held a removed or moved app and now hold nothing of ours.
        let used: BTreeSet<u32> = self
            .listeners
            .iter()
            .filter(|(id, _)| tcp_apps.contains_key(*id))
            .map(|(_, h)| h.index)
            .collect();
        let removed: Vec<String> = self
            .listeners
            .keys()
            .filter(|id| !tcp_apps.contains_key(*id))
            .cloned()
            .collect();
        for id in removed {
            if let Some(handle) = self.listeners.remove(&id) {
                if !used.contains(&handle.index) {
                    datapath.clear_tcp_listener(handle.index)?;
                }
                info!("app {id}: removed; no new connections (open ones continue)");
                self.stop_listener(handle);
            }
        }
        // Indices no TCP app uses any more (an app moved away, a UDP app took it).
        for (id, index) in &indices {
            if !tcp_apps.contains_key(id) && !used.contains(index) {
                datapath.clear_tcp_listener(*index)?;
            }
        }
        Ok(())
    }

    /// The TLS state of every app that terminates TLS: kept where the settings
    /// did not change (its files read again if they changed), new otherwise.
    fn terminators_for(
        &self,
        apps: &BTreeMap<String, Arc<App>>,
    ) -> anyhow::Result<BTreeMap<String, Arc<Terminator>>> {
        let mut terminators = BTreeMap::new();
        for (id, app) in apps.iter().filter(|(_, a)| a.tls.mode.terminates()) {
            let terminator = match self.shared.terminator(id) {
                Some(kept) if *kept.settings() == app.tls => {
                    // A reload (SIGHUP) picks up replaced files at once.
                    if let Some(Err(err)) = kept.reload_if_changed() {
                        warn!("app {id}: TLS certificate files cannot be used: {err:#}");
                    }
                    kept
                }
                _ => Arc::new(Terminator::new(id, &app.tls)?),
            };
            terminators.insert(id.clone(), terminator);
        }
        Ok(terminators)
    }

    fn open_listener(
        &self,
        id: &str,
        index: u32,
        datapath: &mut Datapath,
    ) -> anyhow::Result<ListenerHandle> {
        let std_listener = listener::open(LISTEN_BACKLOG)
            .with_context(|| format!("opening the listening socket of app {id}"))?;
        let fd = std_listener
            .try_clone()
            .context("duplicating the listener fd")?;
        datapath.set_tcp_listener(index, &fd)?;
        let local = std_listener.local_addr().ok();
        let app_id = id.to_string();
        let accepting = match &self.engine {
            Some(engine) => {
                engine.listen(&app_id, std_listener);
                Accepting::Ring { app_id }
            }
            None => {
                let (stop, stop_rx) = watch::channel(false);
                let shared = self.shared.clone();
                let _guard = self.runtime.enter();
                let listener = TokioListener::from_std(std_listener)
                    .context("registering the listener with the runtime")?;
                let task = self
                    .runtime
                    .spawn(accept_loop(listener, app_id, shared, stop_rx));
                Accepting::Task { stop, task }
            }
        };
        info!(
            "app {id}: listening (socket {}, sockmap slot {index})",
            local.map(|a| a.to_string()).unwrap_or_default()
        );
        Ok(ListenerHandle {
            index,
            fd,
            accepting,
        })
    }

    /// Connections of `tcp_fastpath = "xdp"` apps by outcome (`spliced` or the
    /// fallback reason), every outcome listed.
    pub fn fastpath_counts(&self) -> BTreeMap<String, u64> {
        let Some(splicer) = self.shared.splicer() else {
            return BTreeMap::new();
        };
        let (spliced, fallbacks) = splicer.counts();
        std::iter::once(("spliced".to_string(), spliced))
            .chain(
                fallbacks
                    .into_iter()
                    .map(|(r, n)| (r.label().to_string(), n)),
            )
            .collect()
    }

    /// Counters per app id (apps removed since keep theirs).
    pub fn stats(&self) -> BTreeMap<String, TcpAppStats> {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, c)| (id.clone(), c.snapshot()))
            .collect()
    }

    /// The origins (address and port) that carry open connections now. The datapath
    /// must keep passing their segments even when a reload removed them from the
    /// config (the connections continue until they end).
    /// Ends the spliced connections of apps with `ip_firewall` whose client the
    /// plan's access rules now block (`handoff::Splicer::end_blocked`); how many.
    pub fn end_blocked_splices(&self, config: &Config, plan: &crate::datapath::Plan) -> usize {
        let Some(splicer) = self.shared.splicer() else {
            return 0;
        };
        let filtered: BTreeSet<&str> = config
            .apps
            .iter()
            .filter(|a| a.protocol == Protocol::Tcp && a.ip_firewall)
            .map(|a| a.id.as_str())
            .collect();
        if filtered.is_empty() {
            return 0;
        }
        splicer.end_blocked(|app, client| filtered.contains(app) && plan.firewall_blocks(client))
    }

    /// Sets how each TCP app of `config` picks origins under `availability`.
    pub fn set_selections(&self, config: &Config, availability: &Availability) {
        let selections = config
            .apps
            .iter()
            .filter(|a| a.protocol == Protocol::Tcp)
            .map(|a| (a.id.clone(), Arc::new(Selection::new(a, availability))))
            .collect();
        *self
            .shared
            .selections
            .write()
            .unwrap_or_else(|e| e.into_inner()) = selections;
    }

    /// Per-origin figures by (app id, origin label).
    pub fn origin_stats(&self) -> BTreeMap<OriginRef, stats::TcpOriginStats> {
        self.shared
            .origin_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flat_map(|(app, by_origin)| {
                by_origin.iter().map(|(&(addr, ports), c)| {
                    (
                        (app.clone(), crate::config::origin_label(addr, ports)),
                        c.snapshot(),
                    )
                })
            })
            .collect()
    }

    pub fn live_origins(&self) -> Vec<SocketAddr> {
        self.shared
            .origins_live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Open connections of all apps.
    pub fn live_connections(&self) -> u64 {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// Overrides the origin connect timeout (default [`DEFAULT_CONNECT_TIMEOUT`]).
    pub fn set_connect_timeout(&self, timeout: Duration) {
        *self
            .shared
            .connect_timeout
            .write()
            .unwrap_or_else(|e| e.into_inner()) = timeout;
    }

    /// Overrides the per-app connection limit (default [`DEFAULT_MAX_CONNECTIONS_PER_APP`]).
    pub fn set_max_connections_per_app(&self, limit: usize) {
        self.shared.max_connections.store(limit, Ordering::SeqCst);
    }

    /// Where events go from now on (e.g. `agent.event_log` changed on reload).
    pub fn set_event_log(&self, events: EventLog) {
        *self
            .shared
            .events
            .write()
            .unwrap_or_else(|e| e.into_inner()) = events;
    }

    /// Stops accepting: empties every sockmap slot and closes the listeners, after
    /// taking the connections that already completed their handshake.
    pub fn stop_accepting(&mut self, datapath: &mut Datapath) {
        for (id, handle) in std::mem::take(&mut self.listeners) {
            if let Err(err) = datapath.clear_tcp_listener(handle.index) {
                warn!("app {id}: {err:#}");
            }
            self.stop_listener(handle);
        }
    }

    /// Waits until every open connection has ended or `within` has passed; then
    /// closes what is still open (status 999 in their events) and waits for those
    /// tasks to finish. Returns how many connections had to be closed.
    pub async fn drain(&self, within: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + within;
        let open = self.live_connections();
        if open > 0 {
            info!("draining {open} TCP connections for up to {within:?}");
        }
        loop {
            let notified = self.shared.ended.notified();
            if self.live_connections() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        let left = self.live_connections();
        warn!("drain time over: closing {left} TCP connections");
        let _ = self.shared.close_all.send(true);
        if let Some(engine) = &self.engine {
            engine.close_all();
        }
        // The tasks close their sockets at once; give them a moment to report.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                let notified = self.shared.ended.notified();
                if self.live_connections() == 0 {
                    break;
                }
                notified.await;
            }
        })
        .await;
        left
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.certificate_watch.abort();
        for (_, handle) in std::mem::take(&mut self.listeners) {
            if let Accepting::Task { task, .. } = handle.accepting {
                task.abort();
            }
        }
        let _ = self.shared.close_all.send(true);
        // The engine's rings close their connections and their threads end (dropping
        // `engine` joins them).
    }
}

impl TcpProxy {
    fn stop_listener(&self, handle: ListenerHandle) {
        // What accepts takes what is queued, then closes the socket.
        match handle.accepting {
            Accepting::Task { stop, .. } => {
                let _ = stop.send(true);
            }
            Accepting::Ring { app_id } => {
                if let Some(engine) = &self.engine {
                    engine.unlisten(&app_id);
                }
            }
        }
        drop(handle.fd);
    }
}

/// Accepts until told to stop; then takes what is already queued and closes.
async fn accept_loop(
    listener: TokioListener,
    app_id: String,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => dispatch(stream, peer, &app_id, &shared),
                Err(err) => {
                    if listener::accept_error_is_transient(&err) {
                        debug!("app {app_id}: accept: {err}");
                    } else {
                        warn!("app {app_id}: accept failed: {err}; retrying in 100ms");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
    // Handshakes completed before the slot was emptied are served, not reset.
    match listener.into_std() {
        Ok(listener) => loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let stream = stream
                        .set_nonblocking(true)
                        .and_then(|()| tokio::net::TcpStream::from_std(stream));
                    if let Ok(stream) = stream {
                        dispatch(stream, peer, &app_id, &shared);
                    }
                }
                Err(err) if listener::accept_error_is_transient(&err) => continue,
                Err(_) => break,
            }
        },
        Err(err) => debug!("app {app_id}: {err}"),
    }
    debug!("app {app_id}: listener closed");
}

/// How often the certificate files of TLS apps are looked at.
pub const CERTIFICATE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Re-reads the certificates of TLS apps whose files changed (new connections get
/// the new ones; open ones keep theirs). An unusable new file is logged and the
/// previous certificates stay in service.
async fn watch_certificates(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(CERTIFICATE_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let terminators: Vec<(String, Arc<Terminator>)> = shared
            .terminators
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, t)| (id.clone(), t.clone()))
            .collect();
        for (id, terminator) in terminators {
            // Reading a few small files: off the async workers.
            let outcome = tokio::task::spawn_blocking(move || terminator.reload_if_changed()).await;
            match outcome {
                Ok(Some(Ok(()))) => info!("app {id}: TLS certificates reloaded"),
                Ok(Some(Err(err))) => warn!(
                    "app {id}: TLS certificate files changed but cannot be used; \
                     the previous certificates stay in service: {err:#}"
                ),
                Ok(None) | Err(_) => {}
            }
        }
    }
}

/// Connections the open-file limit allows: two sockets each, two pipes more when
/// splicing, after the listeners' `listener_fds`.
fn fd_capacity(splices: bool, listener_fds: u64) -> u64 {
    let (per_connection, pooled) = if splices {
        (6, 2 * splice::PipePool::MAX as u64)
    } else {
        (2, 0)
    };
    match crate::fd_limit::soft() {
        // The pool's idle pipes hold fds too.
        Ok(soft) => crate::fd_limit::connection_capacity(
            soft.saturating_sub(pooled + listener_fds),
            per_connection,
        ),
        Err(_) => u64::MAX,
    }
}

/// Starts the task of one accepted connection, or refuses it.
/// `peer` is what accept returned (no `getpeername` per connection).
fn dispatch(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    listener_app: &str,
    shared: &Arc<Shared>,
) {
    let (local, peer) = match stream.local_addr() {
        Ok(local) => (unmap(local), unmap(peer)),
        // Reset before we got to it.
        Err(_) => return,
    };
    let Some(app) = shared.app_for(listener_app, local) else {
        debug!("connection from {peer} to {local} matches no TCP app; closing");
        conn::reset(&stream);
        return;
    };
    let Some((counters, guard)) = admit(shared, &app, peer, &stream) else {
        return;
    };
    // An app that terminates TLS without its TLS state (only while a reload turns
    // `tls` on) is not served in clear.
    let terminator = match app.tls.mode.terminates() {
        false => None,
        true => match shared.terminator(&app.id) {
            Some(terminator) => Some(terminator),
            None => {
                conn::reset(&stream);
                return;
            }
        },
    };
    tokio::spawn(conn::serve(
        shared.clone(),
        app,
        terminator,
        counters,
        guard,
        stream,
        peer,
        local,
    ));
}

/// Counts a new connection of `app` as open, or refuses it (reset, counted, logged
/// at most every 10 s) when the app's limit or the fd limit is reached: before it
/// costs an fd more. Both engines ask this.
fn admit(
    shared: &Arc<Shared>,
    app: &App,
    peer: SocketAddr,
    socket: &impl std::os::fd::AsRawFd,
) -> Option<(Arc<stats::AppCounters>, conn::LiveGuard)> {
    let counters = shared.counters(&app.id);
    let limit = shared.max_connections.load(Ordering::Relaxed) as u64;
    let capacity = shared.capacity.load(Ordering::Relaxed);
    let why = if counters.live() >= limit {
        Some(format!("the app has {limit} connections open"))
    } else if shared.live.load(Ordering::Relaxed) >= capacity {
        Some(format!(
            "{capacity} connections open fill the open-file limit (less {} fds kept for \
             stats, metrics and the agent itself)",
            crate::fd_limit::RESERVED_FDS
        ))
    } else {
        None
    };
    if let Some(why) = why {
        // Refused before it costs an fd more: a RST, counted; logged at most every
        // 10 s (a flood must not flood the log).
        counters.reject();
        conn::reset(socket);
        let now = shared.started.elapsed().as_millis() as u64;
        let last = shared.refusal_logged_ms.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 10_000)
            && shared
                .refusal_logged_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!(
                "app {}: refusing {peer} (and any more for 10 s without a log line): {why}",
                app.id
            );
        }
        return None;
    }
    let guard = conn::LiveGuard::new(shared.clone(), counters.clone());
    Some((counters, guard))
}

/// Ends spliced connections (see `handoff::Splicer::sweep`) for as long as the
/// proxy lives (the task holds the shared state; it stops with the runtime).
async fn sweep_splices(shared: Arc<Shared>) {
    let close = shared.close_signal();
    loop {
        tokio::time::sleep(handoff::SWEEP_INTERVAL).await;
        if let Some(splicer) = shared.splicer() {
            splicer.sweep(shared.idle_timeout(), *close.borrow());
        }
    }
}

/// Helpers of the forwarding engines' unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use tokio::net::{TcpListener, TcpStream};

    /// Both ends of one loopback connection to `listener`.
    pub async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }
}
