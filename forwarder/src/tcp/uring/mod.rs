//! The io_uring engine (`[agent] tcp_engine = "io_uring"`; docs/tcp.md, "Engines").
//!
//! A thread per CPU (`Engine`), each with a ring that accepts on every listener
//! and owns every connection it accepted of the apps it serves (no TLS;
//! `tcp_fastpath = "xdp"` ones up to their handoff, then `conn::continue_due`).
//! Each connection is a state machine driven by completions; every
//! per-connection syscall of the data path (accept, connect and its timeout, the
//! PROXY header, recv and send both ways, half-close, cancel, close) is a ring
//! entry, and a loop turn submits what the last turn's completions asked for in one
//! `io_uring_enter`. What stays a plain syscall: `getsockname` (the edge address),
//! `socket` and `TCP_NODELAY` of the origin leg, and `SO_LINGER` before a reset.
//! Nothing is registered with epoll, so nothing is deregistered either.
//!
//! The connection's rules are the epoll engine's (`conn`): the same admission and
//! limits (`super::admit`), origin order and failover, status codes, events and
//! counters, half-close (the last FIN goes with the close), RST passed on, the idle
//! timeout (checked on a tick), and the drain. TLS apps' connections are handed to
//! the epoll engine as they are accepted.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};
use log::{debug, error, info, warn};
use socket2::{SockAddr, SockAddrStorage, SockRef};
use tokio::time::Instant;

use super::Shared;
use super::conn::{
    self, Activity, DueConn, End, LiveGuard, Meta, OriginGuard, Side, emit_connect,
    emit_disconnect, emit_origin_error, idle_status, io_error_status,
};
use super::handoff::{HANDOFF_AFTER, HANDOFF_WINDOW};
use super::origin;
use super::stats::AppCounters;
use crate::config::{App, TcpFastpath};
use crate::telemetry::events::{TlsFields, status};
use crate::wire::unmap_socket_addr as unmap;

mod buffers;

use buffers::{BUFFER_LEN, BufferId, Buffers};

/// Submission queue entries: a loop turn submits in batches of at most this many.
const RING_ENTRIES: u32 = 4096;
/// Completion queue entries (two receives are pending per open connection).
const CQ_ENTRIES: u32 = 65_536;
/// Accepts pending per listener: each turn can take this many new connections.
const ACCEPTS: usize = 8;

/// Environment variable that sets how many receive buffers each ring may allocate
/// (a power of two up to `buffers::MAX_BUFFERS`, the default): small values let
/// tests make connections wait for buffers.
pub const BUFFERS_ENV: &str = "FORWARDER_TCP_URING_BUFFERS";

/// The most receive buffers: [`BUFFERS_ENV`] when set and valid.
fn max_buffers() -> usize {
    let Ok(text) = std::env::var(BUFFERS_ENV) else {
        return buffers::MAX_BUFFERS;
    };
    match text.parse::<usize>() {
        Ok(n) if n.is_power_of_two() && n <= buffers::MAX_BUFFERS => {
            info!("io_uring TCP engine: at most {n} receive buffers (from {BUFFERS_ENV})");
            n
        }
        _ => {
            warn!(
                "{BUFFERS_ENV}={text:?} is not a power of two up to {}; using that",
                buffers::MAX_BUFFERS
            );
            buffers::MAX_BUFFERS
        }
    }
}

/// What the proxy asks of a ring's thread.
enum Command {
    /// Accept the connections of `app_id`'s listener from now on.
    Listen {
        app_id: String,
        listener: std::net::TcpListener,
    },
    /// Stop accepting on `app_id`'s listener: take what already completed its
    /// handshake, then close it.
    Unlisten { app_id: String },
    /// The drain time is over: reset every open connection (status 999).
    CloseAll,
    /// The proxy is gone: close everything and end the thread.
    Exit,
}

/// The engine: one thread and ring per CPU the agent may run on, each accepting on
/// every listener (an accept is exclusive: one ring takes each connection) and
/// owning the connections it accepted.
pub(super) struct Engine {
    rings: Vec<RingThread>,
}

/// One ring's thread and how to reach it.
struct RingThread {
    commands: mpsc::Sender<Command>,
    wake: Arc<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Engine {
    /// Starts `rings` threads, each with its ring. Fails when the kernel refuses
    /// io_uring (too old, `kernel.io_uring_disabled`, a seccomp filter): the
    /// caller keeps every connection on the epoll engine.
    pub(super) fn start(
        shared: Arc<Shared>,
        runtime: tokio::runtime::Handle,
        rings: usize,
    ) -> io::Result<Engine> {
        let mut engine = Engine { rings: Vec::new() };
        for _ in 0..rings.max(1) {
            // A failure drops the rings already started (their threads end).
            engine
                .rings
                .push(RingThread::start(shared.clone(), runtime.clone())?);
        }
        Ok(engine)
    }

    /// How many rings run.
    pub(super) fn rings(&self) -> usize {
        self.rings.len()
    }

    /// Accept `app_id`'s connections on every ring (each gets its own fd).
    pub(super) fn listen(&self, app_id: &str, listener: std::net::TcpListener) {
        for ring in &self.rings {
            match listener.try_clone() {
                Ok(listener) => ring.send(Command::Listen {
                    app_id: app_id.to_string(),
                    listener,
                }),
                Err(err) => error!("app {app_id}: duplicating the listener for a ring: {err}"),
            }
        }
    }

    /// Stop accepting `app_id`'s connections (see [`Command::Unlisten`]).
    pub(super) fn unlisten(&self, app_id: &str) {
        for ring in &self.rings {
            ring.send(Command::Unlisten {
                app_id: app_id.to_string(),
            });
        }
    }

    /// The drain time is over (see [`Command::CloseAll`]).
    pub(super) fn close_all(&self) {
        for ring in &self.rings {
            ring.send(Command::CloseAll);
        }
    }
}

impl RingThread {
    fn start(shared: Arc<Shared>, runtime: tokio::runtime::Handle) -> io::Result<RingThread> {
        // SAFETY: eventfd(2) with flags; checked below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let (commands, received) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread_wake = wake.clone();
        let thread = std::thread::Builder::new()
            .name("tcp-uring".into())
            .spawn(move || {
                // Created here: with `SINGLE_ISSUER` only this thread may submit.
                // Everything that can fail is set up before the proxy is told the
                // engine runs (it then sends every listener here).
                let set_up = build_ring().and_then(|ring| {
                    let buffers = Buffers::register(&ring, max_buffers())?;
                    Ok((ring, buffers))
                });
                let (ring, buffers) = match set_up {
                    Ok(set_up) => set_up,
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let mut engine = Ring::new(ring, buffers, shared, runtime, received, thread_wake);
                if let Err(err) = engine.run() {
                    error!("the io_uring TCP engine stopped: {err:#}; its connections are closed");
                }
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(RingThread {
                commands,
                wake,
                thread: Some(thread),
            }),
            Ok(Err(err)) => {
                let _ = thread.join();
                Err(err)
            }
            Err(_) => Err(io::Error::other("the io_uring thread ended at start")),
        }
    }

    /// Sends `command` and wakes the thread.
    fn send(&self, command: Command) {
        if self.commands.send(command).is_err() {
            return;
        }
        let one: u64 = 1;
        // SAFETY: our eventfd, an 8-byte buffer.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

impl Drop for RingThread {
    fn drop(&mut self) {
        self.send(Command::Exit);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Ring {
    fn new(
        ring: IoUring,
        buffers: Buffers,
        shared: Arc<Shared>,
        runtime: tokio::runtime::Handle,
        commands: mpsc::Receiver<Command>,
        wake: Arc<OwnedFd>,
    ) -> Ring {
        let tick = tick_interval(shared.idle_timeout());
        Ring {
            ring,
            shared,
            runtime,
            commands,
            wake,
            wake_buf: Box::new(0),
            tick_every: tick,
            tick: Box::new(timespec(tick)),
            listeners: Vec::new(),
            conns: Vec::new(),
            free: Vec::new(),
            buffers,
            starved: VecDeque::new(),
            queue: Vec::new(),
            exiting: false,
        }
    }
}

/// Whether this process may set up the engine's ring and its buffers (what `auto`
/// depends on; tests ask it to know which engine an agent will run).
pub fn available() -> bool {
    build_ring()
        .and_then(|ring| Buffers::register(&ring, 2))
        .is_ok()
}

/// The ring. Its flags need Linux 6.1 (`DEFER_TASKRUN`), which also has every
/// operation the engine uses (cancel by fd: 6.0; provided-buffer rings: 5.19): an
/// older kernel refuses here, and the agent stays on epoll.
fn build_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_defer_taskrun()
        .setup_cqsize(CQ_ENTRIES)
        .build(RING_ENTRIES)
}

/// How often idle connections are looked for: a twentieth of the idle timeout,
/// between 10 ms and 1 s (a tick visits every connection).
fn tick_interval(idle_timeout: Duration) -> Duration {
    (idle_timeout / 20).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

fn timespec(d: Duration) -> types::Timespec {
    types::Timespec::new()
        .sec(d.as_secs())
        .nsec(d.subsec_nanos())
}

/// What a completion is for (the low byte of its user data; the rest is a slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// The command eventfd was written.
    Wake,
    /// The idle tick.
    Tick,
    /// An accept (slot: listener slot × `ACCEPTS` + which of its accepts).
    Accept,
    /// Cancelling a listener's accepts.
    CancelAccepts,
    Connect,
    ConnectTimeout,
    /// The PROXY header to the origin.
    Header,
    RecvClient,
    RecvOrigin,
    /// The client's bytes to the origin / the origin's to the client.
    SendOrigin,
    SendClient,
    Shutdown,
    Cancel,
    Close,
}

impl Op {
    const ALL: [Op; 14] = [
        Op::Wake,
        Op::Tick,
        Op::Accept,
        Op::CancelAccepts,
        Op::Connect,
        Op::ConnectTimeout,
        Op::Header,
        Op::RecvClient,
        Op::RecvOrigin,
        Op::SendOrigin,
        Op::SendClient,
        Op::Shutdown,
        Op::Cancel,
        Op::Close,
    ];

    fn tag(self, slot: usize) -> u64 {
        ((slot as u64) << 8) | self as u64
    }

    fn untag(data: u64) -> Option<(Op, usize)> {
        let op = *Op::ALL.get((data & 0xff) as usize)?;
        Some((op, (data >> 8) as usize))
    }
}

/// Puts `item` in slot `free` (an empty one) or a new slot at the end; its slot.
fn place<T>(slots: &mut Vec<Option<T>>, free: Option<usize>, item: T) -> usize {
    match free {
        Some(slot) => {
            slots[slot] = Some(item);
            slot
        }
        None => {
            slots.push(Some(item));
            slots.len() - 1
        }
    }
}

/// The address in `storage` (as accept wrote it), if IPv4 or IPv6.
fn socket_addr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let mut copy = SockAddrStorage::zeroed();
    // SAFETY: `SockAddrStorage` is a `sockaddr_storage`; its first `len` bytes are
    // what accept wrote.
    let addr = unsafe {
        *copy.view_as::<libc::sockaddr_storage>() = *storage;
        SockAddr::new(copy, len)
    };
    addr.as_socket()
}

/// Where an accept writes the client's address.
struct Peer {
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
}

struct Listener {
    app_id: String,
    socket: std::net::TcpListener,
    peers: [Peer; ACCEPTS],
    /// Accepts and cancels in flight.
    in_flight: u32,
    /// Accepts not rearmed after an error that would repeat at once (the tick
    /// rearms them).
    resting: Vec<usize>,
    closing: bool,
}

/// One direction: the buffer its source's bytes were read into (held until they
/// are sent), how many, and how many of them are sent.
#[derive(Default)]
struct Direction {
    buf: Option<BufferId>,
    len: usize,
    sent: usize,
    /// A receive from its source is in flight.
    recv_pending: bool,
}

/// The handoff rule's watch over a connection of a `tcp_fastpath = "xdp"` app,
/// as `copy::Handoff` keeps it on epoll: `HANDOFF_AFTER` bytes (both ways) within
/// `HANDOFF_WINDOW` make the handoff due; a direction that ends first, or the
/// window passing, turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    Off,
    Watching {
        deadline: Instant,
        moved: u64,
    },
    /// Both directions pause (no new receive); once nothing is in flight the
    /// connection goes to the epoll engine for the handoff (`conn::continue_due`).
    Due,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Header,
    Forwarding,
    /// Both sockets are being closed (the last completions are awaited).
    Closing,
}

struct Conn {
    meta: Meta,
    counters: Arc<AppCounters>,
    _live: LiveGuard,
    client: Option<OwnedFd>,
    origin: Option<OwnedFd>,
    phase: Phase,
    /// Origins to try, in order, and the next one.
    candidates: Vec<(usize, SocketAddr)>,
    next: usize,
    /// The origin of the current attempt (offset among the app's origins, address).
    attempt: Option<(usize, SocketAddr)>,
    /// The last failed attempt and its status.
    failure: Option<(SocketAddr, u16)>,
    /// Read by the kernel when the connect is submitted.
    origin_sockaddr: Option<SockAddr>,
    connect_timeout: types::Timespec,
    attempt_started: Instant,
    _origin_live: Option<OriginGuard>,
    /// The `connect` event's timestamp, once connected.
    connect_ts: Option<String>,
    /// The PROXY header (empty: none), or why it cannot be made (a fault once
    /// the origin answered, as on epoll).
    header: io::Result<Vec<u8>>,
    header_sent: usize,
    up: Direction,
    down: Direction,
    eofs: u8,
    client_bytes: u64,
    origin_bytes: u64,
    /// Nanoseconds since `meta.accepted` of the last bytes from each side (0: none).
    last_client: u64,
    last_origin: u64,
    end: Option<End>,
    in_flight: u32,
    /// `tcp_fastpath = "xdp"`: the origin leg's MSS clamp (the client's MSS).
    mss: Option<u32>,
    watch: Watch,
    /// It had a watch (a connection that ends without a handoff counts as `short`).
    watched: bool,
}

impl Conn {
    fn since_accept(&self) -> u64 {
        (self.meta.accepted.elapsed().as_nanos() as u64).max(1)
    }

    /// The direction whose bytes come from `source`.
    fn direction(&mut self, source: Side) -> &mut Direction {
        match source {
            Side::Client => &mut self.up,
            Side::Origin => &mut self.down,
        }
    }

    fn fd(&self, side: Side) -> RawFd {
        let fd = match side {
            Side::Client => &self.client,
            Side::Origin => &self.origin,
        };
        fd.as_ref().map_or(-1, |fd| fd.as_raw_fd())
    }
}

struct Ring {
    ring: IoUring,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    commands: mpsc::Receiver<Command>,
    wake: Arc<OwnedFd>,
    wake_buf: Box<u64>,
    tick_every: Duration,
    tick: Box<types::Timespec>,
    listeners: Vec<Option<Box<Listener>>>,
    conns: Vec<Option<Box<Conn>>>,
    free: Vec<usize>,
    /// After `ring` (fields drop in order): the kernel's ring must go first.
    buffers: Buffers,
    /// Directions whose receive found no buffer (all in use, at the limit): their
    /// receive is rearmed at the end of a loop turn with free buffers
    /// (`rearm_starved`).
    starved: VecDeque<(usize, Side)>,
    /// Entries for the next submission.
    queue: Vec<squeue::Entry>,
    exiting: bool,
}

impl Ring {
    fn run(&mut self) -> anyhow::Result<()> {
        self.arm_wake();
        self.arm_tick();
        let mut completions = Vec::with_capacity(1024);
        while !self.exiting {
            self.submit_queue()?;
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(err)
                    if matches!(
                        err.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(err) => return Err(anyhow::Error::new(err).context("io_uring_enter")),
            }
            completions.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for (data, res, flags) in completions.drain(..) {
                if let Some((op, slot)) = Op::untag(data) {
                    self.completed(op, slot, res, flags);
                }
            }
            self.rearm_starved();
        }
        Ok(())
    }

    /// Moves the queued entries into the submission queue, submitting whenever it
    /// is full (the loop submits the rest with its wait).
    fn submit_queue(&mut self) -> anyhow::Result<()> {
        let mut start = 0;
        while start < self.queue.len() {
            {
                let mut sq = self.ring.submission();
                let room = sq.capacity() - sq.len();
                let end = (start + room).min(self.queue.len());
                for entry in &self.queue[start..end] {
                    // SAFETY: every buffer, address and timespec an entry points to
                    // lives in a boxed connection, listener or in `self` until the
                    // entry's completion has been handled (the kernel copies
                    // addresses and timespecs when the entry is submitted).
                    if unsafe { sq.push(entry) }.is_err() {
                        break;
                    }
                    start += 1;
                }
            }
            if start < self.queue.len() {
                match self.ring.submit() {
                    Ok(_) => {}
                    Err(err) if matches!(err.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                    Err(err) => return Err(anyhow::Error::new(err).context("io_uring_enter")),
                }
            }
        }
        self.queue.clear();
        Ok(())
    }

    fn push(&mut self, entry: squeue::Entry) {
        self.queue.push(entry);
    }

    fn arm_wake(&mut self) {
        let entry = opcode::Read::new(
            types::Fd(self.wake.as_raw_fd()),
            (&mut *self.wake_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(Op::Wake.tag(0));
        self.push(entry);
    }

    fn arm_tick(&mut self) {
        let entry = opcode::Timeout::new(&*self.tick)
            .build()
            .user_data(Op::Tick.tag(0));
        self.push(entry);
    }

    fn completed(&mut self, op: Op, slot: usize, res: i32, flags: u32) {
        match op {
            Op::Wake => {
                self.commands();
                if !self.exiting {
                    self.arm_wake();
                }
            }
            Op::Tick => {
                self.tick();
                self.arm_tick();
            }
            Op::Accept => self.accepted(slot / ACCEPTS, slot % ACCEPTS, res),
            Op::CancelAccepts => self.listener_op_done(slot),
            _ => self.conn_completed(op, slot, res, flags),
        }
    }

    fn commands(&mut self) {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Listen { app_id, listener } => self.listen(app_id, listener),
                Command::Unlisten { app_id } => self.unlisten(&app_id),
                Command::CloseAll => {
                    for slot in 0..self.conns.len() {
                        self.end(slot, End::Drained);
                    }
                }
                Command::Exit => self.exiting = true,
            }
        }
    }

    // ---- listeners ----

    fn listen(&mut self, app_id: String, socket: std::net::TcpListener) {
        let peer = || Peer {
            // SAFETY: all-zero is a valid sockaddr_storage.
            addr: unsafe { std::mem::zeroed() },
            len: 0,
        };
        let listener = Box::new(Listener {
            app_id,
            socket,
            peers: std::array::from_fn(|_| peer()),
            in_flight: 0,
            resting: Vec::new(),
            closing: false,
        });
        let free = self.listeners.iter().position(Option::is_none);
        let slot = place(&mut self.listeners, free, listener);
        for k in 0..ACCEPTS {
            self.arm_accept(slot, k);
        }
    }

    fn arm_accept(&mut self, slot: usize, k: usize) {
        let Some(listener) = self.listeners.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let peer = &mut listener.peers[k];
        peer.len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        listener.in_flight += 1;
        let entry = opcode::Accept::new(
            types::Fd(listener.socket.as_raw_fd()),
            (&mut peer.addr as *mut libc::sockaddr_storage).cast(),
            &mut peer.len,
        )
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(Op::Accept.tag(slot * ACCEPTS + k));
        self.push(entry);
    }

    fn unlisten(&mut self, app_id: &str) {
        let Some(slot) = self
            .listeners
            .iter()
            .position(|l| l.as_ref().is_some_and(|l| l.app_id == app_id && !l.closing))
        else {
            return;
        };
        let Some(listener) = self.listeners[slot].as_mut() else {
            return;
        };
        listener.closing = true;
        listener.resting.clear();
        if listener.in_flight == 0 {
            self.close_listener(slot);
            return;
        }
        listener.in_flight += 1;
        let entry = opcode::AsyncCancel2::new(
            types::CancelBuilder::fd(types::Fd(listener.socket.as_raw_fd())).all(),
        )
        .build()
        .user_data(Op::CancelAccepts.tag(slot));
        self.push(entry);
    }

    fn listener_op_done(&mut self, slot: usize) {
        let Some(listener) = self.listeners.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        listener.in_flight -= 1;
        if listener.closing && listener.in_flight == 0 {
            self.close_listener(slot);
        }
    }

    /// Takes the connections that completed their handshake before the listener
    /// left its sockmap slot, then closes it.
    fn close_listener(&mut self, slot: usize) {
        let Some(listener) = self.listeners.get_mut(slot).and_then(Option::take) else {
            return;
        };
        loop {
            match listener.socket.accept() {
                Ok((stream, peer)) => self.serve(OwnedFd::from(stream), peer, &listener.app_id),
                Err(err) if super::listener::accept_error_is_transient(&err) => continue,
                Err(_) => break,
            }
        }
        debug!("app {}: listener closed", listener.app_id);
    }

    fn accepted(&mut self, slot: usize, k: usize, res: i32) {
        let Some(listener) = self.listeners.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        listener.in_flight -= 1;
        let mut accepted = None;
        let rearm = if res >= 0 {
            let peer = socket_addr(&listener.peers[k].addr, listener.peers[k].len);
            // SAFETY: accept returned a new fd, ours.
            let client = unsafe { OwnedFd::from_raw_fd(res) };
            accepted = Some((client, peer, listener.app_id.clone()));
            true
        } else if listener.closing || res == -libc::ECANCELED {
            false
        } else {
            let err = io::Error::from_raw_os_error(-res);
            if super::listener::accept_error_is_transient(&err) {
                debug!("app {}: accept: {err}", listener.app_id);
                true
            } else {
                // Out of fds, say: an accept rearmed at once would fail at once.
                warn!(
                    "app {}: accept failed: {err}; retrying at the next tick",
                    listener.app_id
                );
                listener.resting.push(k);
                false
            }
        };
        if listener.closing {
            if listener.in_flight == 0 {
                self.close_listener(slot);
            }
        } else if rearm {
            self.arm_accept(slot, k);
        }
        if let Some((client, Some(peer), app_id)) = accepted {
            self.serve(client, peer, &app_id);
        }
    }

    // ---- connections ----

    /// Serves a connection accepted on `listener_app`'s socket: here when its app
    /// is one this engine serves, else on the epoll engine.
    fn serve(&mut self, client: OwnedFd, peer: SocketAddr, listener_app: &str) {
        let local = match SockRef::from(&client).local_addr() {
            Ok(local) => match local.as_socket() {
                Some(local) => unmap(local),
                None => return,
            },
            // Reset before we got to it.
            Err(_) => return,
        };
        let peer = unmap(peer);
        let Some(app) = self.shared.app_for(listener_app, local) else {
            debug!("connection from {peer} to {local} matches no TCP app; closing");
            conn::reset(&client);
            return;
        };
        if !serves(&app) {
            self.to_epoll(client, peer, listener_app);
            return;
        }
        // A leg that may be spliced in XDP carries no segment the client leg could
        // not (as on epoll: `conn::serve_plain`).
        let mss = (app.tcp_fastpath == TcpFastpath::Xdp)
            .then(|| origin::maxseg(&client).ok())
            .flatten();
        let Some((counters, live)) = super::admit(&self.shared, &app, peer, &client) else {
            return;
        };
        let selection = self.shared.selection(&app);
        let candidates = origin::candidates(&app, &selection, peer.ip(), local.port());
        let meta = Meta {
            app,
            client: peer,
            edge: local,
            accepted: Instant::now(),
            tls: TlsFields::default(),
        };
        let header = conn::proxy_header_bytes(&meta);
        let conn = Box::new(Conn {
            meta,
            counters,
            _live: live,
            client: Some(client),
            origin: None,
            phase: Phase::Connecting,
            candidates,
            next: 0,
            attempt: None,
            failure: None,
            origin_sockaddr: None,
            connect_timeout: timespec(self.shared.connect_timeout()),
            attempt_started: Instant::now(),
            _origin_live: None,
            connect_ts: None,
            header,
            header_sent: 0,
            up: Direction::default(),
            down: Direction::default(),
            eofs: 0,
            client_bytes: 0,
            origin_bytes: 0,
            last_client: 0,
            last_origin: 0,
            end: None,
            in_flight: 0,
            mss,
            watch: Watch::Off,
            watched: false,
        });
        let free = self.free.pop();
        let slot = place(&mut self.conns, free, conn);
        self.connect_next(slot);
    }

    /// A connection of an app this engine does not serve, to the epoll engine.
    fn to_epoll(&self, client: OwnedFd, peer: SocketAddr, listener_app: &str) {
        let stream = std::net::TcpStream::from(client);
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let _runtime = self.runtime.enter();
        match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => super::dispatch(stream, peer, listener_app, &self.shared),
            Err(err) => debug!("handing a connection from {peer} to epoll: {err}"),
        }
    }

    /// Starts connecting to the next origin in order; when none is left, the
    /// connection ends with `originError`.
    fn connect_next(&mut self, slot: usize) {
        let shared = self.shared.clone();
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_deref_mut) else {
            return;
        };
        while let Some(&(offset, candidate)) = c.candidates.get(c.next) {
            c.next += 1;
            match origin::socket(candidate, c.mss, false).map(OwnedFd::from) {
                Ok(socket) => {
                    c.attempt = Some((offset, candidate));
                    c.attempt_started = Instant::now();
                    let sockaddr = c.origin_sockaddr.insert(SockAddr::from(candidate));
                    let connect = opcode::Connect::new(
                        types::Fd(socket.as_raw_fd()),
                        sockaddr.as_ptr().cast(),
                        sockaddr.len(),
                    )
                    .build()
                    .flags(squeue::Flags::IO_LINK)
                    .user_data(Op::Connect.tag(slot));
                    let timeout = opcode::LinkTimeout::new(&c.connect_timeout)
                        .build()
                        .user_data(Op::ConnectTimeout.tag(slot));
                    c.origin = Some(socket);
                    c.in_flight += 2;
                    self.queue.push(connect);
                    self.queue.push(timeout);
                    return;
                }
                Err(err) => {
                    let code = origin::connect_error_status(&err);
                    debug!(
                        "app {}: origin {candidate} for {}: {err} ({code})",
                        c.meta.app.id, c.meta.client
                    );
                    shared
                        .origin_counters(&c.meta.app.id, &c.meta.app.origins[offset])
                        .failed(code);
                    c.failure = Some((candidate, code));
                }
            }
        }
        let failure = c.failure;
        self.origin_failed(slot, failure);
    }

    /// No origin took the connection: the `originError` event, and the client reset.
    fn origin_failed(&mut self, slot: usize, failure: Option<(SocketAddr, u16)>) {
        let shared = self.shared.clone();
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_deref_mut) else {
            return;
        };
        emit_origin_error(&shared, &c.meta, &c.counters, failure);
        let code = failure.map_or(status::ORIGIN_UNKNOWN_ERROR, |(_, code)| code);
        self.end(
            slot,
            End::Fault {
                side: Side::Origin,
                status: code,
            },
        );
    }

    fn conn_completed(&mut self, op: Op, slot: usize, res: i32, flags: u32) {
        // A receive that filled a buffer took it out of the ring, whatever follows.
        let filled = match op {
            Op::RecvClient | Op::RecvOrigin => self.buffers.taken(flags),
            _ => None,
        };
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_deref_mut) else {
            if let Some(id) = filled {
                self.buffers.give(id);
            }
            return;
        };
        c.in_flight -= 1;
        let source = match op {
            Op::RecvClient => Some(Side::Client),
            Op::RecvOrigin => Some(Side::Origin),
            _ => None,
        };
        if let Some(source) = source {
            let dir = c.direction(source);
            dir.recv_pending = false;
            dir.buf = filled;
        }
        if c.end.is_some() {
            // Ending: what was pending completes (or is cancelled) and is ignored.
            self.finish(slot);
            return;
        }
        match op {
            Op::Connect => self.connect_done(slot, res),
            Op::Header => self.header_sent(slot, res),
            Op::RecvClient => self.received(slot, Side::Client, res),
            Op::RecvOrigin => self.received(slot, Side::Origin, res),
            Op::SendOrigin => self.sent(slot, Side::Client, res),
            Op::SendClient => self.sent(slot, Side::Origin, res),
            // A failed half-close shows in the next receive or send.
            Op::ConnectTimeout | Op::Shutdown | Op::Cancel | Op::Close => {}
            Op::Wake | Op::Tick | Op::Accept | Op::CancelAccepts => {}
        }
        self.hand_over_if_quiet(slot);
    }

    fn connect_done(&mut self, slot: usize, res: i32) {
        let shared = self.shared.clone();
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_deref_mut) else {
            return;
        };
        let Some((offset, origin_addr)) = c.attempt else {
            return;
        };
        let origin_counters = shared.origin_counters(&c.meta.app.id, &c.meta.app.origins[offset]);
        if res < 0 {
            // Cancelled by its linked timeout: the origin did not answer in time.
            let code = if res == -libc::ECANCELED {
                status::ORIGIN_CONNECT_TIMEOUT
            } else {
                origin::connect_error_status(&io::Error::from_raw_os_error(-res))
            };
            debug!(
                "app {}: origin {origin_addr} for {}: {} ({code})",
                c.meta.app.id,
                c.meta.client,
                io::Error::from_raw_os_error(-res)
            );
            origin_counters.failed(code);
            c.failure = Some((origin_addr, code));
            c.origin = None;
            self.connect_next(slot);
            return;
        }
        c.counters.connected_in(c.attempt_started.elapsed());
        origin_counters.opened();
        c._origin_live = Some(OriginGuard::new(shared.clone(), origin_addr));
        c.connect_ts = Some(emit_connect(&shared, &c.meta, &c.counters, origin_addr));
        match &c.header {
            Ok(header) if header.is_empty() => self.forward(slot),
            Ok(_) => {
                c.phase = Phase::Header;
                self.send_header(slot);
            }
            Err(err) => {
                let (end, ..) = conn::header_fault(&c.meta, origin_addr, err);
                self.end(slot, end);
            }
        }
    }

    fn send_header(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_deref_mut) else {
            return;
        };
        let Ok(header) = &c.header else {
            return;
        };
        let rest = &header[c.header_sent..];
        let entry = opcode::Send::new(
            types::Fd(c.fd(Side::Origin)),
            rest.as_ptr(),
            rest.len() as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(Op::Header.tag(slot));
        c.in_flight += 1;
        self.queue.push(entry);
    }

    fn header_sent(&mut self, slot: usize, res: i32) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_deref_mut) else {
            return;
        };
        if res < 0 {
            let origin_addr = c.attempt.map_or(c.meta.edge, |a| a.1);
            let err = io::Error::from_raw_os_error(-res);
            let (end, ..) = conn::header_fault(&c.meta, origin_addr, &err);
            self.end(slot, end);
            return;
        }
        c.header_sent += res as usize;
        if c.header_sent < c.header.as_ref().map_or(0, Vec::len) {
            self.send_header(slot);
        } else {
            self.forward(slot);
        }
    }

    /// Both legs are ready: a receive on each.
    fn forward(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_deref_mut) else {
            return;
        };
        c.phase = Phase::Forwarding;
        if c.meta.app.tcp_fastpath == TcpFastpath::Xdp && self.shared.splicer().is_some() {
            c.watch = Watch::Watching {
                deadline: Instant::now() + HANDOFF_WINDOW,
                moved: 0,
            };
            c.watched = true;
        }
        self.recv(slot, Side::Client);
        self.recv(slot, Side::Origin);
    }

    /// A receive from `source` into a buffer the kernel picks when bytes arrive.
    fn recv(&mut self, slot: usize, source: Side) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_deref_mut) else {
            return;
        };
        let fd = c.fd(source);
        let op = match source {
            Side::Client => Op::RecvClient,
            Side::Origin => Op::RecvOrigin,
        };
        c.direction(source).recv_pending = true;
        let entry = opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), BUFFER_LEN as u32)
            .buf_group(buffers::GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(op.tag(slot));
        c.in_flight += 1;
        self.queue.push(entry);
    }

    /// Sends what is left of `source`'s direction to the other side.
    fn send(&mut self, slot: usize, source: Side) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_deref_mut) else {
            return;
        };
        let fd = c.fd(source.other());
        let (dir, op) = match source {
            Side::Client => (&c.up, Op::SendOrigin),
            Side::Origin => (&c.down, Op::SendClient),
        };
        let Some(id) = dir.buf else {
            return;
        };
        let rest = &self.buffers.get(id)[dir.sent..dir.len];
        let entry = opcode::Send::new(types::Fd(fd), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(op.tag(slot));
        c.in_flight += 1;
        self.queue.push(entry);
    }

    fn received(&mut self, slot: usize, source: Side, res: i32) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_deref_mut) else {
            return;
        };
        if c.watch == Watch::Due && matches!(-res, 0 | libc::ECANCELED | libc::ENOBUFS) {
            // Paused for the handoff: nothing read (an EOF stays with the socket,
            // for the epoll engine to read again). Only this direction's buffer,
            // if the kernel took one: the other may be sending from its own.
            if let Some(id) = c.direction(source).buf.take() {
                self.buffers.give(id);
            }
            return;
        }
        if res == -libc::ENOBUFS {
            // Every buffer is in use: more if the limit allows, else wait for one.
            if self.buffers.top_up() {
                self.recv(slot, source);
            } else {
                debug!("io_uring: every receive buffer is in use; a receive waits for one");
                self.starved.push_back((slot, source));
            }
            return;
        }
        if res <= 0 {
            // Nothing read: a buffer the kernel took anyway goes back.
            if let Some(id) = c.direction(source).buf.take() {
                self.buffers.give(id);
            }
        }
        if res < 0 {
            let err = io::Error::from_raw_os_error(-res);
            let status = io_error_status(source, true, &err);
            self.end(
                slot,
                End::Fault {
                    side: source,
                    status,
                },
            );
            return;
        }
        if res == 0 {
            // A direction that ends before the threshold: no handoff.
            c.watch = Watch::Off;
            c.eofs += 1;
            if c.eofs == 2 {
                // The last FIN goes with the close.
                self.end(slot, End::Normal);
            } else {
                let fd = c.fd(source.other());
                let entry = opcode::Shutdown::new(types::Fd(fd), libc::SHUT_WR)
                    .build()
                    .user_data(Op::Shutdown.tag(slot));
                c.in_flight += 1;
                self.queue.push(entry);
            }
            return;
        }
        let n = res as usize;
        let now = c.since_accept();
        if let Watch::Watching { deadline, moved } = &mut c.watch {
            *moved += n as u64;
            if *moved >= HANDOFF_AFTER {
                if Instant::now() > *deadline {
                    c.watch = Watch::Off;
                } else {
                    // Due: the other direction's receive stops (what it already
                    // read is still sent), and neither receives again.
                    c.watch = Watch::Due;
                    let (other, op) = match source {
                        Side::Client => (&c.down, Op::RecvOrigin),
                        Side::Origin => (&c.up, Op::RecvClient),
                    };
                    if other.recv_pending {
                        let entry = opcode::AsyncCancel::new(op.tag(slot))
                            .build()
                            .user_data(Op::Cancel.tag(slot));
                        c.in_flight += 1;
                        self.queue.push(entry);
                    }
                }
            }
        }
        match source {
            Side::Client => {
                c.up.len = n;
                c.up.sent = 0;
                c.client_bytes += n as u64;
                c.last_client = now;
                c.counters.add_client_bytes(n as u64);
            }
            Side::Origin => {
                c.down.len = n;
                c.down.sent = 0;
                c.origin_bytes += n as u64;
                c.last_origin = now;
                c.counters.add_origin_bytes(n as u64);
            }
        }
        self.send(slot, source);
    }

    /// A send of `source`'s bytes completed.
    fn sent(&mut self, slot: usize, source: Side, res: i32) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_deref_mut) else {
            return;
        };
        if res < 0 {
            let err = io::Error::from_raw_os_error(-res);
            let destination = source.other();
            let status = io_error_status(destination, false, &err);
            self.end(
                slot,
                End::Fault {
                    side: destination,
                    status,
                },
            );
            return;
        }
        let paused = c.watch == Watch::Due;
        let dir = c.direction(source);
        dir.sent += res as usize;
        if dir.sent < dir.len {
            self.send(slot, source);
            return;
        }
        if let Some(id) = dir.buf.take() {
            self.buffers.give(id);
        }
        // Paused for the handoff: no new receive.
        if !paused {
            self.recv(slot, source);
        }
    }

    /// A connection whose handoff is due, once nothing is in flight on it: to
    /// the epoll engine, which hands it to the datapath (or, if that falls back,
    /// copies it to its end) and reports its end.
    fn hand_over_if_quiet(&mut self, slot: usize) {
        let ready = self
            .conns
            .get(slot)
            .and_then(Option::as_deref)
            .is_some_and(|c| c.watch == Watch::Due && c.end.is_none() && c.in_flight == 0);
        if !ready {
            return;
        }
        let Some(c) = self.conns.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        self.starved.retain(|&(s, _)| s != slot);
        let c = *c;
        let activity = Activity::resumed(
            c.meta.accepted,
            (c.client_bytes, c.origin_bytes),
            (c.last_client, c.last_origin),
        );
        let streams = |fd: Option<OwnedFd>| -> io::Result<tokio::net::TcpStream> {
            let fd = fd.ok_or_else(|| io::Error::other("no socket"))?;
            let stream = std::net::TcpStream::from(fd);
            stream.set_nonblocking(true)?;
            tokio::net::TcpStream::from_std(stream)
        };
        let _runtime = self.runtime.enter();
        let (client, origin) = match (streams(c.client), streams(c.origin)) {
            (Ok(client), Ok(origin)) => (client, origin),
            (Err(err), _) | (_, Err(err)) => {
                // Not expected (the fds are open sockets): the connection is lost
                // with the sockets just closed, and its end reported as such.
                warn!(
                    "app {}: handing a connection to epoll: {err}",
                    c.meta.app.id
                );
                if let (Some((_, origin_addr)), Some(connect_ts)) = (c.attempt, c.connect_ts) {
                    let end = End::Fault {
                        side: Side::Client,
                        status: status::UNKNOWN,
                    };
                    let totals = (end, c.client_bytes, c.origin_bytes);
                    emit_disconnect(
                        &self.shared,
                        &c.meta,
                        &c.counters,
                        origin_addr,
                        connect_ts,
                        totals,
                    );
                }
                return;
            }
        };
        let (Some((_, origin_addr)), Some(connect_ts), Some(origin_live)) =
            (c.attempt, c.connect_ts, c._origin_live)
        else {
            return;
        };
        let due = DueConn {
            meta: c.meta,
            counters: c.counters,
            live: c._live,
            origin_live,
            client,
            origin,
            origin_addr,
            connect_ts,
            activity,
        };
        self.runtime
            .spawn(conn::continue_due(self.shared.clone(), due));
    }

    /// Once per loop turn: receives that waited for a buffer are rearmed, the
    /// longest-waiting first, as many as the ring holds free buffers. Buffers come
    /// back in many places (a send's end, a connection's end, a receive that read
    /// nothing, a pause for the handoff); rearming at only some of them left every
    /// receive of a ring waiting beside a free buffer (a stall seen once in the
    /// buffer-starvation test).
    fn rearm_starved(&mut self) {
        let mut free = self.buffers.free();
        while free > 0 {
            let Some((slot, side)) = self.starved.pop_front() else {
                return;
            };
            // One paused for its handoff meanwhile stays paused.
            let paused = self
                .conns
                .get(slot)
                .and_then(Option::as_deref)
                .is_none_or(|c| c.watch == Watch::Due);
            if !paused {
                self.recv(slot, side);
                free -= 1;
            }
        }
    }

    /// Ends a connection: what is pending on its sockets is cancelled, then both
    /// are closed (`finish`). A connection that already ends keeps its end.
    fn end(&mut self, slot: usize, end: End) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_deref_mut) else {
            return;
        };
        if c.end.is_some() {
            return;
        }
        if end == End::Drained && c.connect_ts.is_none() && c.phase == Phase::Connecting {
            // Still connecting when the drain time ran out (as on epoll: the
            // attempt stops, the event says the agent stopped it).
            let failure = c.attempt.map(|(_, addr)| (addr, status::UNKNOWN));
            let shared = self.shared.clone();
            emit_origin_error(&shared, &c.meta, &c.counters, failure);
        }
        c.end = Some(end);
        self.starved.retain(|&(s, _)| s != slot);
        if c.in_flight > 0 {
            for fd in [c.fd(Side::Client), c.fd(Side::Origin)] {
                if fd >= 0 {
                    let entry =
                        opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                            .build()
                            .user_data(Op::Cancel.tag(slot));
                    c.in_flight += 1;
                    self.queue.push(entry);
                }
            }
        }
        self.finish(slot);
    }

    /// Once nothing is pending: RST where the end passes a fault on, both sockets
    /// closed; once the closes completed, the `disconnect` event and the slot freed.
    fn finish(&mut self, slot: usize) {
        let shared = self.shared.clone();
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_deref_mut) else {
            return;
        };
        if c.in_flight > 0 {
            return;
        }
        let Some(end) = c.end else {
            return;
        };
        if c.phase != Phase::Closing {
            c.phase = Phase::Closing;
            // RST where the end passes one on, as on epoll; a client no origin
            // took is reset.
            match (&c.client, &c.origin, c.connect_ts.is_some()) {
                (Some(client), Some(origin), true) => conn::reset_after(end, client, origin),
                (Some(client), _, _) => conn::reset(client),
                _ => {}
            }
            for fd in [c.client.take(), c.origin.take()].into_iter().flatten() {
                let entry = opcode::Close::new(types::Fd(fd.into_raw_fd()))
                    .build()
                    .user_data(Op::Close.tag(slot));
                c.in_flight += 1;
                self.queue.push(entry);
            }
            if c.in_flight > 0 {
                return;
            }
        }
        let Some(c) = self.conns.get_mut(slot).and_then(Option::take) else {
            return;
        };
        if c.watched
            && let Some(splicer) = shared.splicer()
        {
            // Ended on the socket path without a handoff.
            splicer.count_short(&c.meta.app.id, c.meta.client);
        }
        if let (Some(origin_addr), Some(connect_ts)) = (c.attempt.map(|a| a.1), c.connect_ts) {
            emit_disconnect(
                &shared,
                &c.meta,
                &c.counters,
                origin_addr,
                connect_ts,
                (end, c.client_bytes, c.origin_bytes),
            );
        }
        for id in [c.up.buf, c.down.buf].into_iter().flatten() {
            self.buffers.give(id);
        }
        self.free.push(slot);
    }

    /// Ends the connections that idled out; rearms accepts that rested.
    fn tick(&mut self) {
        let timeout = self.shared.idle_timeout();
        let every = tick_interval(timeout);
        if every != self.tick_every {
            self.tick_every = every;
            *self.tick = timespec(every);
        }
        let timeout = timeout.as_nanos() as u64;
        for slot in 0..self.conns.len() {
            let Some(c) = self.conns[slot].as_deref() else {
                continue;
            };
            if c.end.is_some() || c.phase != Phase::Forwarding {
                continue;
            }
            let last = c.last_client.max(c.last_origin);
            if c.since_accept() >= last.saturating_add(timeout) {
                let status = idle_status(c.last_client, c.last_origin);
                self.end(slot, End::Idle { status });
            }
        }
        for slot in 0..self.listeners.len() {
            let resting = match self.listeners[slot].as_mut() {
                Some(l) if !l.closing => std::mem::take(&mut l.resting),
                _ => continue,
            };
            for k in resting {
                self.arm_accept(slot, k);
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Every request ends before the buffers and addresses it points to are
        // freed (closing the ring cancels them only later, from a kernel worker).
        let cancel = self.ring.submitter().register_sync_cancel(
            Some(timespec(Duration::from_secs(1))),
            types::CancelBuilder::any(),
        );
        if let Err(err) = cancel {
            // ENOENT: nothing was pending.
            if err.raw_os_error() != Some(libc::ENOENT) {
                warn!("io_uring TCP engine: cancelling what was pending at exit: {err}");
            }
        }
        // The listeners' queued connections are not taken: the agent is stopping
        // without a drain (the epoll engine's accept loops are aborted alike).
        let open = self.conns.iter().flatten().count();
        if open > 0 {
            info!("io_uring TCP engine: closing {open} connections");
        }
    }
}

/// Whether the io_uring engine serves `app`'s connections (TLS needs what only the
/// epoll engine has; `tcp_fastpath = "xdp"` apps are served up to their handoff).
pub(super) fn serves(app: &App) -> bool {
    !app.tls.mode.terminates()
}
