//! The agent's side of the XDP splice (docs/tcp.md, "XDP splice"): hands a quiet
//! connection's two legs to the datapath (`try_splice`) and watches the spliced
//! connections until FIN both ways, an RST or the idle timeout ends them (`sweep`).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, MapData};
use forwarder_common::{SEEN_FIN, SEEN_RST, SpliceEntry, SpliceKey};
use log::{debug, info};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::conn::{End, Side, fault_end};
use super::fastpath::{Ineligible, LegState, eligibility, hold_entry, splice_entries, splice_keys};
use super::quiet::{Drained, NotQuiet, drain_until_quiet};
use super::repair;
use crate::telemetry::events::status;

/// The handoff rule: a connection is handed to XDP only once it has moved this
/// many bytes (both ways together) on the socket path, within `HANDOFF_WINDOW` of
/// its start. Shorter connections (a request and its answer, the bench's 64-byte
/// echo) never pay for a handoff: no repair call, no map update, no hold. Chosen
/// from the cost of a handoff (about 20 socket calls, four map updates, the
/// 10 ms commit wait and a retransmission stall of the held peer, docs/tcp.md)
/// against what splicing saves per byte: below a few hundred KiB the socket path
/// finishes the connection before a splice would pay off.
/// Until then the copy engine forwards it (`copy::Handoff` watches the rule).
pub const HANDOFF_AFTER: u64 = 256 * 1024;
pub const HANDOFF_WINDOW: Duration = Duration::from_secs(2);
/// How long a held connection may take to go quiet, and how many bytes (counted
/// from the connection's start) may be forwarded on the way, before it stays on
/// the socket path. What is forwarded while held is what the four socket queues
/// held when the hold began: up to the buffer sizes (several MiB each way with
/// autotuning) plus the peers' last ACKs, within 1 s even on a loaded two-CPU
/// machine with both directions busy (200 ms was not always enough there: the
/// `tcp_splice` bulk test of both ways at once fell back now and then).
const QUIET_WAIT: Duration = Duration::from_secs(1);
const QUIET_BUDGET: u64 = 64 * 1024 * 1024;
/// After FIN both ways, the entries stay this long for the last ACK (and a
/// retransmitted FIN) to pass.
const FIN_GRACE: Duration = Duration::from_secs(2);
/// Handoffs tried per connection before its quiet deadline (a segment that lands
/// in a socket during one makes it start over).
const MAX_HANDOFF_ATTEMPTS: u32 = 3;
/// How long segments the program passed before the entries went in are given to
/// reach the sockets before the handoff is committed.
const COMMIT_SETTLE: Duration = Duration::from_millis(10);
/// How long a looked-up egress interface is used, and how many are kept.
const ROUTE_TTL: Duration = Duration::from_secs(5);
const MAX_CACHED_ROUTES: usize = 65_536;
/// How often the spliced connections are looked at.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(500);

/// How a spliced connection ended, as its task reports it.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub end: End,
    pub client_bytes: u64,
    pub origin_bytes: u64,
}

/// One spliced connection being watched.
struct Watched {
    /// Client → origin, origin → client.
    keys: [SpliceKey; 2],
    /// The app and the client (for `end_blocked`).
    app: String,
    client: IpAddr,
    done: oneshot::Sender<Outcome>,
    /// Segments both ways at the last sweep, and since when they have not moved.
    packets: u64,
    still_since: Instant,
    /// When FIN had been seen both ways.
    fin_since: Option<Instant>,
}

/// The `SPLICES` map (a handle of the agent's own) and the connections in it.
pub struct Splicer {
    map: Mutex<BpfHashMap<MapData, SpliceKey, SpliceEntry>>,
    watched: Mutex<Vec<Watched>>,
    /// Egress interface by destination (see `ifindex_to`).
    routes: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    /// App index per app id (for `APP_STATS`), set at every reload.
    app_indices: Mutex<BTreeMap<String, u32>>,
    spliced: AtomicU64,
    /// Fallbacks, by `Ineligible::ALL` index.
    fallbacks: [AtomicU64; Ineligible::ALL.len()],
}

impl Splicer {
    pub fn new(map: BpfHashMap<MapData, SpliceKey, SpliceEntry>) -> Splicer {
        Splicer {
            map: Mutex::new(map),
            watched: Mutex::new(Vec::new()),
            routes: Mutex::new(HashMap::new()),
            app_indices: Mutex::new(BTreeMap::new()),
            spliced: AtomicU64::new(0),
            fallbacks: Default::default(),
        }
    }

    pub fn set_app_indices(&self, indices: BTreeMap<String, u32>) {
        *self.app_indices.lock().unwrap_or_else(|e| e.into_inner()) = indices;
    }

    /// Connections spliced, and fallbacks by reason.
    pub fn counts(&self) -> (u64, Vec<(Ineligible, u64)>) {
        let fallbacks = Ineligible::ALL
            .iter()
            .zip(&self.fallbacks)
            .map(|(reason, n)| (*reason, n.load(Ordering::Relaxed)))
            .collect();
        (self.spliced.load(Ordering::Relaxed), fallbacks)
    }

    fn fallback(&self, app: &str, client: SocketAddr, reason: Ineligible) -> Ineligible {
        if let Some(i) = Ineligible::ALL.iter().position(|r| *r == reason) {
            self.fallbacks[i].fetch_add(1, Ordering::Relaxed);
        }
        if reason == Ineligible::Short {
            // The common case of short connections: counted, not logged each.
            debug!("app {app}: {client} stays on the socket path ({reason})");
        } else {
            info!("app {app}: {client} stays on the socket path ({reason})");
        }
        reason
    }

    /// A connection of `app` that ended, or stayed below the handoff rule, without
    /// a handoff: counted (`short`), logged at debug level only.
    pub fn count_short(&self, app: &str, client: SocketAddr) {
        self.fallback(app, client, Ineligible::Short);
    }

    /// Hands the connection, which the handoff rule found worth it, to the
    /// datapath once both legs are quiet (bytes that arrive meanwhile are
    /// forwarded and added to `drained`). `Ok`: the sockets are retired and the
    /// receiver reports the end, or the connection already ended on the way (a
    /// peer reset, a race) and the receiver says how; `Err`: the sockets are as
    /// before and the caller forwards on them.
    pub async fn try_splice(
        &self,
        app: &str,
        client: &TcpStream,
        origin: &TcpStream,
        addrs: LegAddrs,
        drained: &mut Drained,
    ) -> Result<oneshot::Receiver<Outcome>, Ineligible> {
        let fail = |reason| self.fallback(app, addrs.client, reason);
        // A peer that closed its side (its FIN unread when the copy engine paused)
        // leaves no quiet point to reach: not worth a hold.
        match (repair::peer_closed(client), repair::peer_closed(origin)) {
            (Ok(false), Ok(false)) => {}
            (Ok(_), Ok(_)) => return Err(fail(Ineligible::NotQuiet)),
            _ => return Err(fail(Ineligible::Repair)),
        }
        // Hold it: from here the peers' data (and SYN/FIN) is dropped in XDP and
        // retransmitted by them later, so what the sockets have queued can be
        // forwarded and acknowledged and the legs go quiet even on a busy stream.
        let keys = splice_keys(addrs.client, addrs.edge, addrs.local, addrs.origin);
        let hold = [(keys[0], hold_entry()), (keys[1], hold_entry())];
        if self.insert(&hold).is_err() {
            return Err(fail(Ineligible::MapFull));
        }
        // Every way out that does not splice takes the hold away again, also
        // when this future is dropped mid-handoff.
        let mut held = Held {
            splicer: self,
            keys,
            armed: true,
        };
        let deadline = Instant::now() + QUIET_WAIT;
        let mut attempts = 0;
        let (pair, client_leg) = loop {
            attempts += 1;
            let wait = deadline.saturating_duration_since(Instant::now());
            match drain_until_quiet(client, origin, wait, QUIET_BUDGET, drained).await {
                Ok(()) => {}
                Err(NotQuiet::Busy | NotQuiet::Closed) => return Err(fail(Ineligible::NotQuiet)),
                Err(NotQuiet::Fault { source, fault }) => {
                    fail(Ineligible::NotQuiet);
                    return Ok(end_on_fault(fault_end(fault, source), client, origin));
                }
                Err(NotQuiet::Failed(_)) => return Err(fail(Ineligible::Repair)),
            }
            let app_index = self
                .app_indices
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(app)
                .copied()
                .unwrap_or(0);
            let (Some(client_ifindex), Some(origin_ifindex)) = (
                self.ifindex_to(addrs.client.ip()).await,
                self.ifindex_to(addrs.origin.ip()).await,
            ) else {
                return Err(fail(Ineligible::Repair));
            };
            let client_leg =
                match repair::enter_and_read(client, addrs.edge, addrs.client, client_ifindex) {
                    Ok(leg) => leg,
                    Err(_) => return Err(fail(Ineligible::Repair)),
                };
            let origin_leg =
                match repair::enter_and_read(origin, addrs.local, addrs.origin, origin_ifindex) {
                    Ok(leg) => leg,
                    Err(_) => {
                        let _ = repair::resume(client);
                        return Err(fail(Ineligible::Repair));
                    }
                };
            let resume_both = || {
                let _ = repair::resume(client);
                let _ = repair::resume(origin);
            };
            if let Err(reason) = eligibility(&client_leg, &origin_leg) {
                resume_both();
                return Err(fail(reason));
            }
            // Overwrites the hold: from here the program translates.
            let pair = splice_entries(&client_leg, &origin_leg, app_index);
            if self.insert(&pair).is_err() {
                resume_both();
                return Err(fail(Ineligible::MapFull));
            }
            // The commit point. A segment the program passed just before the entries
            // were in may still be on its way up the stack: give it time to land, then
            // look. One that reached a socket moved its sequence numbers (or sits in
            // its receive queue), and the entries are then wrong.
            tokio::time::sleep(COMMIT_SETTLE).await;
            let unchanged = |sock: &TcpStream, leg: &LegState| {
                repair::queue_seqs(sock)
                    .is_ok_and(|(snd, rcv)| snd == leg.snd_nxt && rcv == leg.rcv_nxt)
                    && repair::is_quiet(sock).unwrap_or(false)
            };
            if !unchanged(client, &client_leg) || !unchanged(origin, &origin_leg) {
                let translated = self.translated(&[pair[0].0, pair[1].0]);
                resume_both();
                if translated == 0 {
                    // Nothing crossed XDP yet: hold again, forward what landed and
                    // try again.
                    if attempts < MAX_HANDOFF_ATTEMPTS && Instant::now() < deadline {
                        if self.insert(&hold).is_err() {
                            return Err(fail(Ineligible::MapFull));
                        }
                        continue;
                    }
                    return Err(fail(Ineligible::NotQuiet));
                }
                // Both paths carried bytes: the streams no longer meet. The sockets
                // are reset when the connection's task closes them.
                fail(Ineligible::Raced);
                super::conn::reset(client);
                super::conn::reset(origin);
                return Ok(ended(End::Fault {
                    side: Side::Client,
                    status: status::UNKNOWN,
                }));
            }
            break (pair, client_leg);
        };
        // The entries now belong to the spliced connection (the sweep removes them).
        held.armed = false;
        // Out of the kernel's tables; nothing on the wire.
        if repair::retire(client).is_err() || repair::retire(origin).is_err() {
            // Half retired cannot be undone: the connection ends (the sweep sees
            // no more segments and times it out if the peers do not reset it).
            debug!("app {app}: retiring the sockets of {} failed", addrs.client);
        }
        let (done, outcome) = oneshot::channel();
        self.watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Watched {
                keys: [pair[0].0, pair[1].0],
                app: app.to_string(),
                client: addrs.client.ip().to_canonical(),
                done,
                packets: 0,
                still_since: Instant::now(),
                fin_since: None,
            });
        self.spliced.fetch_add(1, Ordering::Relaxed);
        info!(
            "app {app}: {} spliced in XDP (timestamps {}, sack {})",
            addrs.client, client_leg.timestamps, client_leg.sack
        );
        Ok(outcome)
    }

    /// The interface the route to `ip` leaves by: where the XDP program looks the
    /// route up from. Cached for `ROUTE_TTL` (a netlink round trip per
    /// connection would cost more than the rest of the handoff); the MACs are
    /// the datapath's own route cache's business and follow route changes.
    async fn ifindex_to(&self, ip: IpAddr) -> Option<u32> {
        let now = Instant::now();
        if let Some((ifindex, at)) = self
            .routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ip)
            && now - *at < ROUTE_TTL
        {
            return Some(*ifindex);
        }
        let route = tokio::task::spawn_blocking(move || crate::route::route_to(ip))
            .await
            .ok()?
            .ok()?;
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if routes.len() >= MAX_CACHED_ROUTES {
            routes.retain(|_, (_, at)| now - *at < ROUTE_TTL);
            if routes.len() >= MAX_CACHED_ROUTES {
                routes.clear();
            }
        }
        routes.insert(ip, (route.ifindex, now));
        Some(route.ifindex)
    }

    fn insert(&self, pair: &[(SpliceKey, SpliceEntry); 2]) -> Result<(), aya::maps::MapError> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(pair[0].0, pair[0].1, 0)?;
        if let Err(e) = map.insert(pair[1].0, pair[1].1, 0) {
            let _ = map.remove(&pair[0].0);
            return Err(e);
        }
        Ok(())
    }

    /// Segments the entries of `keys` translated so far.
    fn translated(&self, keys: &[SpliceKey; 2]) -> u64 {
        let (up, down) = self.entries(keys);
        [up, down].iter().flatten().map(|e| e.packets).sum()
    }

    /// Both entries of a spliced connection (client → origin, origin → client),
    /// `None` where gone.
    fn entries(&self, keys: &[SpliceKey; 2]) -> (Option<SpliceEntry>, Option<SpliceEntry>) {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        (map.get(&keys[0], 0).ok(), map.get(&keys[1], 0).ok())
    }

    fn remove(&self, keys: &[SpliceKey]) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        for key in keys {
            let _ = map.remove(key);
        }
    }

    /// Ends at once the spliced connections whose client `blocked` says a reload's
    /// access rules now block: their segments never reach the classifier, so the
    /// datapath cannot. The entries go; the client's next segments meet the
    /// firewall (dropped), the origin's reach the kernel, which has no socket for
    /// them and resets the origin. Status 403, as the firewall's. How many ended.
    pub fn end_blocked(&self, blocked: impl Fn(&str, IpAddr) -> bool) -> usize {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let (cut, kept): (Vec<Watched>, Vec<Watched>) =
            watched.drain(..).partition(|w| blocked(&w.app, w.client));
        *watched = kept;
        drop(watched);
        let ended = cut.len();
        for w in cut {
            let (up, down) = self.entries(&w.keys);
            self.remove(&w.keys);
            let _ = w.done.send(Outcome {
                end: End::Fault {
                    side: Side::Client,
                    status: status::CLIENT_BLOCKED,
                },
                client_bytes: up.map_or(0, |e| e.bytes),
                origin_bytes: down.map_or(0, |e| e.bytes),
            });
        }
        ended
    }

    /// One look at every spliced connection: those that ended (RST either way,
    /// FIN both ways plus `FIN_GRACE`, no segment for `idle`, or `close_all`) lose
    /// their entries and their task hears how they ended.
    pub fn sweep(&self, idle: Duration, close_all: bool) {
        let now = Instant::now();
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let mut kept = Vec::with_capacity(watched.len());
        for mut w in watched.drain(..) {
            let (to_origin, to_client) = self.entries(&w.keys);
            let (Some(up), Some(down)) = (to_origin, to_client) else {
                // Gone from the map (removed by hand): ended, counts unknown.
                let _ = w.done.send(Outcome {
                    end: End::Drained,
                    client_bytes: 0,
                    origin_bytes: 0,
                });
                continue;
            };
            let packets = up.packets + down.packets;
            if packets != w.packets {
                w.packets = packets;
                w.still_since = now;
            }
            if up.seen & SEEN_FIN != 0 && down.seen & SEEN_FIN != 0 && w.fin_since.is_none() {
                w.fin_since = Some(now);
            }
            let end = if up.seen & SEEN_RST != 0 {
                Some(End::Fault {
                    side: Side::Client,
                    status: status::CLIENT_RST,
                })
            } else if down.seen & SEEN_RST != 0 {
                Some(End::Fault {
                    side: Side::Origin,
                    status: status::ORIGIN_RST,
                })
            } else if w.fin_since.is_some_and(|t| now - t >= FIN_GRACE) {
                Some(End::Normal)
            } else if now - w.still_since >= idle {
                Some(End::Idle {
                    status: status::CLIENT_TIMEOUT,
                })
            } else if close_all {
                Some(End::Drained)
            } else {
                None
            };
            match end {
                Some(end) => {
                    self.remove(&w.keys);
                    let _ = w.done.send(Outcome {
                        end,
                        client_bytes: up.bytes,
                        origin_bytes: down.bytes,
                    });
                }
                None => kept.push(w),
            }
        }
        *watched = kept;
    }
}

/// The receiver of a connection that ended during its handoff with `end` (its
/// bytes so far are the caller's `Drained`).
fn ended(end: End) -> oneshot::Receiver<Outcome> {
    let (done, outcome) = oneshot::channel();
    let _ = done.send(Outcome {
        end,
        client_bytes: 0,
        origin_bytes: 0,
    });
    outcome
}

/// A peer reset while the handoff forwarded its bytes: the other peer is reset
/// as the socket path would (when the connection's task closes the sockets),
/// and the connection ends with `end`.
fn end_on_fault(end: End, client: &TcpStream, origin: &TcpStream) -> oneshot::Receiver<Outcome> {
    super::conn::reset_after(end, client, origin);
    ended(end)
}

/// A connection's entries during a handoff: removed when this is dropped while
/// `armed` (every way out that does not splice).
struct Held<'a> {
    splicer: &'a Splicer,
    keys: [SpliceKey; 2],
    armed: bool,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.splicer.remove(&self.keys);
        }
    }
}

/// The four addresses of a connection: the client and the edge address it
/// dialled, the agent's origin-side address and the origin.
#[derive(Debug, Clone, Copy)]
pub struct LegAddrs {
    pub client: SocketAddr,
    pub edge: SocketAddr,
    pub local: SocketAddr,
    pub origin: SocketAddr,
}
