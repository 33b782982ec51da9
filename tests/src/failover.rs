//! The fleet's failover scenario (docs/fleet.md), shared by `tests/tests/fleet.rs`
//! and `cargo xtask demo-fleet`: UDP SPP flows and long TCP connections from
//! several client addresses through a [`Fleet`], `kill -9` of one agent, and what
//! the clients and the origins saw. Every wait has a timeout and every load loop a
//! bound in count and time.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::lab::fleet::{CLIENTS_V4, EDGES, ORIGINS_V4, TCP_PORT, UDP_PORT, edge_of_downlink};
use crate::lab::{Fleet, Netns, RouterHashing};
use crate::spp_origin::SppEchoOrigin;

/// How the victim fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// `kill -9` of the agent; BIRD and the gate on that edge keep running, so
    /// the gate withdraws the route.
    AgentCrash,
    /// The agent killed and the edge's BIRD and gate frozen (SIGSTOP): a hung
    /// host. Only the router's BFD notices.
    HostHang,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::AgentCrash => "kill -9 the agent",
            Failure::HostHang => "kill -9 the agent and freeze BIRD and the gate (a hung host)",
        }
    }
}

/// What to do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub failure: Failure,
    pub udp_flows: usize,
    pub tcp_connections: usize,
    /// The edge (0-based) whose agent is killed.
    pub victim: usize,
    /// Every UDP flow sends one datagram per tick: the measuring resolution.
    pub tick: Duration,
    /// How long the traffic runs after the router dropped the victim.
    pub after: Duration,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            failure: Failure::AgentCrash,
            udp_flows: 60,
            tcp_connections: 30,
            victim: 0,
            tick: Duration::from_millis(20),
            after: Duration::from_secs(2),
        }
    }
}

/// How long the UDP load may run at most, whatever happens.
const LOAD_LIMIT: Duration = Duration::from_secs(30);
/// How long every UDP flow has to get its first reply.
const FIRST_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the router may take to drop the victim's next hop.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(5);
/// A TCP echo slower than this counts as broken.
/// Long enough that a stall of the shared test machine does not pass for a broken
/// connection: a broken one is reset or closed at once.
const TCP_TIMEOUT: Duration = Duration::from_secs(3);
/// TCP connections are checked this often after the kill.
const TCP_ROUND: Duration = Duration::from_millis(200);

/// One UDP flow as the origins saw it at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpPath {
    /// The edge (0-based) whose agent forwarded the datagram.
    pub edge: usize,
    /// The origin that received it.
    pub origin: SocketAddr,
    /// The client address in its SPP header.
    pub spp_client: SocketAddr,
}

/// One UDP flow's history.
#[derive(Debug, Clone)]
pub struct UdpFlow {
    /// The client socket's address.
    pub client: SocketAddr,
    /// The last path before the kill.
    pub before: Option<UdpPath>,
    /// The last path at the end.
    pub after: Option<UdpPath>,
    /// Whether a datagram sent after the router dropped the victim got a reply.
    pub resumed: bool,
    /// The longest time between two consecutive replies, from the last reply
    /// before the kill on (the flow's black hole plus up to one tick).
    pub longest_gap: Option<Duration>,
}

/// One TCP connection's history.
#[derive(Debug, Clone, Copy)]
pub struct TcpConn {
    pub client: SocketAddr,
    /// The edge whose agent terminated it (the origin saw that edge as its peer).
    pub edge: usize,
    /// Whether it failed (reset, closed, or no echo within [`TCP_TIMEOUT`]) after
    /// the kill.
    pub broken: bool,
}

/// What the scenario measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub hashing: RouterHashing,
    pub failure: Failure,
    pub victim: usize,
    pub udp: Vec<UdpFlow>,
    pub tcp: Vec<TcpConn>,
    /// Kill → the router's route no longer names the victim.
    pub router_converged: Duration,
    pub tick: Duration,
}

impl Report {
    /// The UDP flows that went through the victim before the kill.
    pub fn udp_on_victim(&self) -> Vec<&UdpFlow> {
        self.udp
            .iter()
            .filter(|f| f.before.is_some_and(|p| p.edge == self.victim))
            .collect()
    }

    /// The longest black hole of a UDP flow of the victim (its longest gap between
    /// replies). `None` if one of them never resumed.
    pub fn black_hole(&self) -> Option<Duration> {
        longest(self.udp_on_victim().into_iter())
    }

    /// How long the test machine itself stalled: the survivors' longest gap beyond
    /// one tick (their flows are not touched by the failure). The goals are
    /// checked against the measured figures minus this.
    pub fn stall(&self) -> Duration {
        self.survivors_longest_gap()
            .unwrap_or_default()
            .saturating_sub(self.tick)
    }

    /// The longest gap between replies of a flow of the surviving edges.
    pub fn survivors_longest_gap(&self) -> Option<Duration> {
        longest(
            self.udp
                .iter()
                .filter(|f| f.before.is_some_and(|p| p.edge != self.victim)),
        )
    }

    /// Flows that resumed on a surviving edge with the same origin and the same
    /// client address (the socket's) in the SPP header as before the kill.
    pub fn udp_resumed_intact(&self) -> usize {
        self.udp
            .iter()
            .filter(|f| {
                let (Some(before), Some(after)) = (f.before, f.after) else {
                    return false;
                };
                f.resumed
                    && after.edge != self.victim
                    && after.origin == before.origin
                    && before.spp_client == f.client
                    && after.spp_client == f.client
            })
            .count()
    }

    /// UDP flows of surviving edges that the router moved to another survivor.
    pub fn udp_moved_between_survivors(&self) -> usize {
        self.udp
            .iter()
            .filter(|f| match (f.before, f.after) {
                (Some(b), Some(a)) => b.edge != self.victim && a.edge != b.edge,
                _ => false,
            })
            .count()
    }

    /// `(connections, broken)` terminated on the victim.
    pub fn tcp_on_victim(&self) -> (usize, usize) {
        self.tcp_count(|c| c.edge == self.victim)
    }

    /// `(connections, broken)` terminated on the surviving edges.
    pub fn tcp_on_survivors(&self) -> (usize, usize) {
        self.tcp_count(|c| c.edge != self.victim)
    }

    fn tcp_count(&self, which: impl Fn(&TcpConn) -> bool) -> (usize, usize) {
        let conns: Vec<_> = self.tcp.iter().filter(|c| which(c)).collect();
        let broken = conns.iter().filter(|c| c.broken).count();
        (conns.len(), broken)
    }

    /// UDP flows and TCP connections per edge before the kill.
    pub fn spread(&self) -> ([usize; EDGES], [usize; EDGES]) {
        let mut udp = [0; EDGES];
        let mut tcp = [0; EDGES];
        for p in self.udp.iter().filter_map(|f| f.before) {
            udp[p.edge] += 1;
        }
        for c in &self.tcp {
            tcp[c.edge] += 1;
        }
        (udp, tcp)
    }

    /// The figures, one per line.
    pub fn summary(&self) -> Vec<String> {
        let (udp_spread, tcp_spread) = self.spread();
        let victim_udp = self.udp_on_victim().len();
        let (tcp_victim, tcp_victim_broken) = self.tcp_on_victim();
        let (tcp_surv, tcp_surv_broken) = self.tcp_on_survivors();
        let gap = |d: Option<Duration>| {
            d.map_or_else(|| "never resumed".to_owned(), |d| format!("{d:.0?}"))
        };
        let black_hole = gap(self.black_hole());
        let survivors_gap = gap(self.survivors_longest_gap());
        vec![
            format!(
                "router: {}; edge{}: {}",
                self.hashing.as_str(),
                self.victim + 1,
                self.failure.as_str()
            ),
            format!(
                "spread before the kill: UDP flows per edge {udp_spread:?}, TCP connections per edge {tcp_spread:?}"
            ),
            format!(
                "router dropped edge{} {:.0?} after the kill",
                self.victim + 1,
                self.router_converged
            ),
            format!(
                "UDP black hole of edge{}'s {victim_udp} flows: at most {black_hole} between two replies \
                 (one datagram per flow every {:?}); survivors' flows: at most {survivors_gap}",
                self.victim + 1,
                self.tick
            ),
            format!(
                "UDP flows resumed on a survivor with the same origin and SPP client: {}/{}",
                self.udp_resumed_intact(),
                self.udp.len()
            ),
            format!(
                "UDP flows of survivors moved to the other survivor: {}",
                self.udp_moved_between_survivors()
            ),
            format!(
                "TCP connections on edge{} broken: {tcp_victim_broken}/{tcp_victim} (they terminated there)",
                self.victim + 1
            ),
            format!("TCP connections on the survivors broken: {tcp_surv_broken}/{tcp_surv}"),
        ]
    }
}

/// Runs the scenario on `fleet` (built, every edge announced); `say` hears each step.
pub fn run(fleet: &mut Fleet, plan: &Plan, say: &mut dyn FnMut(&str)) -> Result<Report> {
    let origins: Vec<SppEchoOrigin> = ORIGINS_V4
        .iter()
        .map(|&a| SppEchoOrigin::start(fleet.origin(), SocketAddr::new(a.into(), UDP_PORT)))
        .collect::<Result<_>>()?;
    let tcp_origin = TcpEchoOrigin::start(
        fleet.origin(),
        SocketAddr::new(ORIGINS_V4[0].into(), TCP_PORT),
    )?;

    say(&format!(
        "{} TCP connections from {} client addresses to {}",
        plan.tcp_connections,
        CLIENTS_V4.len(),
        fleet.tcp_service()
    ));
    let mut conns = connect_all(fleet.client(), fleet.tcp_service(), plan.tcp_connections)?;
    echo_round(&mut conns);
    if let Some(c) = conns.iter().find(|c| c.broken) {
        bail!("TCP connection {} broke before the kill", c.client);
    }

    say(&format!(
        "{} UDP flows (Simple Proxy Protocol) to {}, one datagram each every {:?}",
        plan.udp_flows,
        fleet.udp_service(),
        plan.tick
    ));
    let load = UdpLoad::start(
        fleet.client(),
        fleet.udp_service(),
        plan.udp_flows,
        plan.tick,
    )?;
    load.wait_all_replied(FIRST_REPLY_TIMEOUT)?;
    // A few more rounds so that every flow has a settled path before the kill.
    std::thread::sleep(plan.tick * 5);

    say(&format!(
        "edge{}: {}",
        plan.victim + 1,
        plan.failure.as_str()
    ));
    let killed_at = Instant::now();
    let kill_tick = load.tick();
    match plan.failure {
        Failure::AgentCrash => fleet.kill_agent(plan.victim)?,
        Failure::HostHang => fleet.hang_edge(plan.victim)?,
    }
    let xdp = crate::agent::xdp_attachment(fleet.edge(plan.victim), crate::lab::fleet::UPLINK)?;
    say(&format!(
        "edge{}: agent gone after {:.0?}; XDP on {}: {}",
        plan.victim + 1,
        killed_at.elapsed(),
        crate::lab::fleet::UPLINK,
        if xdp.is_some() {
            "still attached"
        } else {
            "detached"
        }
    ));
    let victim = plan.victim;
    fleet
        .wait_router_edges(CONVERGE_TIMEOUT, |edges| !edges.contains(&victim))
        .context("waiting for the router to drop the victim")?;
    let converged_at = Instant::now();
    let router_converged = converged_at - killed_at;
    let how = match plan.failure {
        Failure::AgentCrash => "ready-gate → birdc disable → BGP withdraw",
        Failure::HostHang => "BFD → BGP session down",
    };
    say(&format!(
        "the router dropped edge{} after {router_converged:.0?} ({how})",
        plan.victim + 1
    ));

    let end = Instant::now() + plan.after;
    while Instant::now() < end {
        echo_round(&mut conns);
        std::thread::sleep(TCP_ROUND);
    }
    let replies = load.stop()?;
    say("traffic stopped; comparing what the clients and the origins saw");

    let mut paths: HashMap<usize, (Option<UdpPath>, Option<UdpPath>)> = HashMap::new();
    for origin in &origins {
        for rec in origin.received() {
            let Some((flow, seq)) = parse_payload(&rec.payload) else {
                continue;
            };
            let (Some(spp), IpAddr::V4(from)) = (rec.spp, rec.from.ip()) else {
                continue;
            };
            let Some(edge) = edge_of_downlink(from) else {
                continue;
            };
            let path = UdpPath {
                edge,
                origin: rec.to,
                spp_client: spp.client,
            };
            let entry = paths.entry(flow).or_default();
            if seq < kill_tick {
                entry.0 = Some(path);
            }
            entry.1 = Some(path);
        }
    }
    let udp = replies
        .flows
        .iter()
        .enumerate()
        .map(|(i, flow)| {
            let (before, after) = paths.get(&i).copied().unwrap_or_default();
            let resumed = flow.replies.iter().any(|&(seq, _)| {
                usize::try_from(seq)
                    .ok()
                    .and_then(|s| replies.sent_at.get(s))
                    .is_some_and(|&sent| sent > converged_at)
            });
            let arrivals: Vec<Instant> = flow.replies.iter().map(|&(_, at)| at).collect();
            let longest_gap = arrivals
                .iter()
                .rposition(|&at| at <= killed_at)
                .and_then(|last| arrivals[last..].windows(2).map(|w| w[1] - w[0]).max());
            UdpFlow {
                client: flow.client,
                before,
                after,
                resumed,
                longest_gap,
            }
        })
        .collect();
    let tcp = conns
        .iter()
        .map(|c| TcpConn {
            client: c.client,
            edge: c.edge,
            broken: c.broken,
        })
        .collect();
    drop(tcp_origin);
    Ok(Report {
        hashing: fleet.hashing(),
        failure: plan.failure,
        victim: plan.victim,
        udp,
        tcp,
        router_converged,
        tick: plan.tick,
    })
}

/// The largest `longest_gap` of `flows`; `None` if one never resumed.
fn longest<'a>(flows: impl Iterator<Item = &'a UdpFlow>) -> Option<Duration> {
    flows
        .map(|f| f.resumed.then_some(f.longest_gap).flatten())
        .collect::<Option<Vec<_>>>()
        .map(|gaps| gaps.into_iter().max().unwrap_or_default())
}

/// `"<flow>:<seq>"`.
fn parse_payload(payload: &[u8]) -> Option<(usize, u64)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (flow, seq) = text.split_once(':')?;
    Some((flow.parse().ok()?, seq.parse().ok()?))
}

/// A long TCP connection of the client.
struct Conn {
    stream: TcpStream,
    client: SocketAddr,
    edge: usize,
    broken: bool,
}

/// One byte there and back on every connection not yet broken; marks those that
/// fail. All are sent before any is read, so that the waits overlap.
fn echo_round(conns: &mut [Conn]) {
    for c in conns.iter_mut().filter(|c| !c.broken) {
        if c.stream.write_all(b"p").is_err() {
            c.broken = true;
        }
    }
    for c in conns.iter_mut().filter(|c| !c.broken) {
        let mut byte = [0u8; 1];
        if c.stream.read_exact(&mut byte).is_err() || byte != *b"p" {
            c.broken = true;
        }
    }
}

/// Opens `count` connections to `service`, round-robin over the client addresses;
/// each learns its edge from the origin's greeting.
fn connect_all(client: &Netns, service: SocketAddr, count: usize) -> Result<Vec<Conn>> {
    let streams = client.block_on(async move {
        let mut streams = Vec::new();
        for i in 0..count {
            let local = SocketAddr::new(CLIENTS_V4[i % CLIENTS_V4.len()].into(), 0);
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(local)?;
            let stream = tokio::time::timeout(TCP_TIMEOUT * 5, socket.connect(service))
                .await
                .with_context(|| format!("connecting from {local} to {service}: timeout"))?
                .with_context(|| format!("connecting from {local} to {service}"))?;
            streams.push(stream.into_std()?);
        }
        anyhow::Ok(streams)
    })??;
    streams
        .into_iter()
        .map(|stream| {
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(TCP_TIMEOUT))?;
            stream.set_write_timeout(Some(TCP_TIMEOUT))?;
            let client = stream.local_addr()?;
            let greeting = read_line(&stream).with_context(|| format!("greeting of {client}"))?;
            let edge = greeting
                .strip_prefix("edge ")
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
                .and_then(edge_of_downlink)
                .with_context(|| format!("greeting {greeting:?} names no edge"))?;
            Ok(Conn {
                stream,
                client,
                edge,
                broken: false,
            })
        })
        .collect()
}

fn read_line(mut stream: &TcpStream) -> Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        stream.read_exact(&mut byte)?;
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
    bail!("no line within 64 bytes")
}

/// A TCP origin in the origin namespace: greets every connection with `edge <peer
/// address>\n` (the agent's address towards the origin names the edge), then
/// echoes. Stops (threads joined) on drop.
struct TcpEchoOrigin {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEchoOrigin {
    fn start(ns: &Netns, bind: SocketAddr) -> Result<Self> {
        let listener = ns
            .run_in(move || TcpListener::bind(bind))?
            .with_context(|| format!("binding the TCP origin {bind}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut sessions = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            let stop = stop.clone();
                            sessions.push(std::thread::spawn(move || echo(stream, peer, &stop)));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                for s in sessions {
                    let _ = s.join();
                }
            })
        };
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

fn echo(mut stream: TcpStream, peer: SocketAddr, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    if stream
        .write_all(format!("edge {}\n", peer.ip()).as_bytes())
        .is_err()
    {
        return;
    }
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for TcpEchoOrigin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Replies of one UDP flow: `(seq, arrival)`.
#[derive(Debug, Clone)]
struct FlowReplies {
    client: SocketAddr,
    replies: Vec<(u64, Instant)>,
}

#[derive(Debug, Default)]
struct LoadState {
    /// When tick `n` was sent (index = seq).
    sent_at: Vec<Instant>,
    flows: Vec<FlowReplies>,
}

/// What [`UdpLoad::stop`] returns.
struct LoadResult {
    sent_at: Vec<Instant>,
    flows: Vec<FlowReplies>,
}

/// `flows` UDP sockets of the client, round-robin over its addresses, each sending
/// `"<flow>:<seq>"` to the service once per tick from one thread, for at most
/// [`LOAD_LIMIT`].
struct UdpLoad {
    state: Arc<Mutex<LoadState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl UdpLoad {
    fn start(client: &Netns, service: SocketAddr, flows: usize, tick: Duration) -> Result<Self> {
        let sockets = client.run_in(move || -> Result<Vec<UdpSocket>> {
            (0..flows)
                .map(|i| {
                    let local = SocketAddr::new(CLIENTS_V4[i % CLIENTS_V4.len()].into(), 0);
                    let s = UdpSocket::bind(local).with_context(|| format!("binding {local}"))?;
                    s.set_nonblocking(true)?;
                    Ok(s)
                })
                .collect()
        })??;
        let state = Arc::new(Mutex::new(LoadState {
            sent_at: Vec::new(),
            flows: sockets
                .iter()
                .map(|s| {
                    Ok(FlowReplies {
                        client: s.local_addr()?,
                        replies: Vec::new(),
                    })
                })
                .collect::<Result<_>>()?,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || load_loop(&sockets, service, tick, &state, &stop))
        };
        Ok(Self {
            state,
            stop,
            thread: Some(thread),
        })
    }

    /// The next seq to be sent.
    fn tick(&self) -> u64 {
        lock(&self.state).sent_at.len() as u64
    }

    fn wait_all_replied(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let silent = lock(&self.state)
                .flows
                .iter()
                .filter(|f| f.replies.is_empty())
                .count();
            if silent == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{silent} UDP flows got no reply within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(mut self) -> Result<LoadResult> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(result) => result?,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        let mut state = lock(&self.state);
        Ok(LoadResult {
            sent_at: std::mem::take(&mut state.sent_at),
            flows: std::mem::take(&mut state.flows),
        })
    }
}

impl Drop for UdpLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn load_loop(
    sockets: &[UdpSocket],
    service: SocketAddr,
    tick: Duration,
    state: &Mutex<LoadState>,
    stop: &AtomicBool,
) -> Result<()> {
    let started = Instant::now();
    let mut buf = [0u8; 512];
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < LOAD_LIMIT {
        let seq = {
            let mut state = lock(state);
            state.sent_at.push(Instant::now());
            state.sent_at.len() as u64 - 1
        };
        for (i, socket) in sockets.iter().enumerate() {
            // A send may fail while the route changes (an ICMP error of an earlier
            // datagram is reported here): the flow simply misses this tick.
            let _ = socket.send_to(format!("{i}:{seq}").as_bytes(), service);
        }
        next += tick;
        // Drain replies until the next tick.
        loop {
            let mut got = false;
            for (i, socket) in sockets.iter().enumerate() {
                while let Ok(n) = socket.recv(&mut buf) {
                    got = true;
                    // Reply payload: "<client>|<flow>:<seq>" (SppEchoOrigin's tag).
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let Some((_, payload)) = text.split_once('|') else {
                        continue;
                    };
                    if let Some((flow, seq)) = parse_payload(payload.as_bytes())
                        && flow == i
                    {
                        lock(state).flows[i].replies.push((seq, Instant::now()));
                    }
                }
            }
            let now = Instant::now();
            if now >= next {
                break;
            }
            if !got {
                std::thread::sleep((next - now).min(Duration::from_millis(2)));
            }
        }
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads() {
        assert_eq!(parse_payload(b"12:345"), Some((12, 345)));
        assert_eq!(parse_payload(b"12"), None);
        assert_eq!(parse_payload(b"x:1"), None);
    }
}
