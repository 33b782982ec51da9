//! The agent's side of UDP flows: the XDP program creates flows and counts their
//! packets; the agent notices new ones (`connect` events), ends idle ones after
//! `udp_idle_timeout` (`disconnect` events with byte and packet counts), closes
//! the ones the datapath evicted (a `disconnect` with status 429), counts
//! evictions and keeps the live-flow gauge. One scan per second; nothing per
//! packet.
//!
//! The datapath keeps no per-packet timestamp (reading the clock would cost every
//! packet ~30 ns): a flow is idle when its packet counts have not moved for
//! `udp_idle_timeout`, as seen by these scans, so a flow ends between the timeout
//! and the timeout plus one scan interval after its last packet.
//!
//! A scan reads both flow tables in batches (`FlowTables`, under the agent's
//! lock, a few milliseconds even when they are full) and does the rest without
//! the lock (`UdpFlowTracker::scan`, pure). Under a flood of new flows the event
//! log stays bounded: at most `FLOW_EVENTS_PER_INTERVAL` flow events are written
//! one per line in each `FLOW_SUMMARY_INTERVAL`; the rest are counted and written
//! as one summary line per app, event and status (`Flows` = how many it stands
//! for).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, SystemTime};

use forwarder_common::{ADMISSION_ASSURED, FlowCounter, FlowKey, FlowState};

use crate::telemetry::events::{Event, EventKind, rfc3339, status};

/// How often the agent scans the flow tables.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Flow events written one per line per summary interval; beyond that they are
/// summarised.
pub const FLOW_EVENTS_PER_INTERVAL: u32 = 1000;

/// The summary interval of UDP flow events.
pub const FLOW_SUMMARY_INTERVAL: Duration = Duration::from_secs(5);

/// What one scan read of the datapath (under the agent's lock).
#[derive(Debug, Default, Clone)]
pub struct FlowTables {
    /// Both tables, assured flows first (see `Datapath::udp_flows`).
    pub flows: Vec<(FlowKey, FlowState)>,
    /// The admission counters, read before the tables.
    pub counters: [u64; FlowCounter::COUNT],
    /// New (not assured) flows the agent itself removed since it started.
    pub removed_new: u64,
    /// Flows the agent removed since the last read (their events are written by
    /// whoever removed them).
    pub removed: Vec<FlowKey>,
    /// Per app index of the plan: (app id, proxy mode); empty id for a free slot.
    pub apps: Vec<(String, String)>,
    /// Per origin index of the plan: its address.
    pub origins: Vec<IpAddr>,
    /// Per origin index of the plan: its label (`Origin::label`), for the
    /// per-origin figures.
    pub origin_labels: Vec<String>,
    /// Every UDP app id (its gauge is shown even at 0).
    pub udp_apps: Vec<String>,
    pub idle: Duration,
    /// Ports in `udp_nat_ports`.
    pub nat_pool: u64,
}

/// Flows the datapath evicted, by reason (the `reason` label of
/// `forwarder_udp_flow_evictions_total`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Evictions {
    /// New flows the LRU of `NEW_FLOWS` pushed out for other new flows.
    pub table_full: u64,
    /// New flows removed so that another new flow could have their NAT port.
    pub port_reclaimed: u64,
}

/// The UDP flow figures of `stats` and `/metrics`, as of the last scan.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UdpFlowStats {
    /// Live flows per app id (also in each app's `live`).
    #[serde(skip)]
    pub live: BTreeMap<String, u64>,
    /// Per (app id, origin label): live flows, and bytes of live and ended flows
    /// (also in the snapshot's `origins`).
    #[serde(skip)]
    pub per_origin: BTreeMap<crate::lb::OriginRef, UdpOriginStats>,
    /// Flows in the assured table (`FLOWS`) and in the new-flow table.
    pub assured: u64,
    pub new: u64,
    /// Flows promoted from new to assured since the agent started.
    pub promoted: u64,
    pub evicted_table_full: u64,
    pub evicted_port_reclaimed: u64,
    /// Live plain-NAT and v2 flows, each holding a port of `udp_nat_ports`.
    #[serde(default)]
    pub nat_ports_in_use: u64,
    /// Ports in `udp_nat_ports` (the pool of each origin-side address).
    #[serde(default)]
    pub nat_pool: u64,
    /// How long the last scan took (reading the tables and deciding), seconds.
    pub scan_seconds: f64,
}

/// One origin's UDP figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdpOriginStats {
    pub live: u64,
    /// Flows it has had (seen by a scan).
    pub flows: u64,
    pub client_bytes: u64,
    pub origin_bytes: u64,
}

/// What a scan decided: flows to remove (idle) and events to write.
#[derive(Debug, Default)]
pub struct ScanOutcome {
    pub ended: Vec<(FlowKey, FlowState)>,
    pub events: Vec<Event>,
}

/// What the tracker remembers of a flow it has seen.
struct Activity {
    /// Packets both ways at the last scan that saw them change.
    packets: u64,
    /// `monotonic_ns()` of that scan.
    since_ns: u64,
    /// The flow as last seen (closes it with its counts if it is evicted).
    last: FlowState,
    /// Its `connect` was written as a line of its own (else it was summarised,
    /// and so is its `disconnect`).
    logged: bool,
}

/// Writes flow events one per line up to a budget per interval, and counts the
/// rest into summary lines.
#[derive(Default)]
struct EventBudget {
    /// `monotonic_ns()` at which the current interval began.
    interval_start_ns: u64,
    spent: u32,
    /// (app, event, status) → (flows, client bytes, origin bytes, client packets,
    /// origin packets) not written one per line this interval.
    summarised: BTreeMap<(String, EventKind, u16), [u64; 5]>,
}

impl EventBudget {
    /// Whether one more event may be written as a line of its own.
    fn admit(&mut self) -> bool {
        if self.spent < FLOW_EVENTS_PER_INTERVAL {
            self.spent += 1;
            true
        } else {
            false
        }
    }

    /// Writes `event` as a line of its own if it `may` and the budget allows, else
    /// counts it into the summary; whether it got a line. (A `disconnect` may only
    /// if its `connect` had one.)
    fn write(&mut self, event: Event, may: bool, out: &mut Vec<Event>) -> bool {
        if may && self.admit() {
            out.push(event);
            true
        } else {
            self.summarise(&event);
            false
        }
    }

    fn summarise(&mut self, event: &Event) {
        let slot = self
            .summarised
            .entry((event.application.clone(), event.event, event.status))
            .or_default();
        slot[0] += 1;
        slot[1] += event.client_bytes;
        slot[2] += event.origin_bytes;
        slot[3] += event.client_packets.unwrap_or(0);
        slot[4] += event.origin_packets.unwrap_or(0);
    }

    /// The summary lines of an interval that has ended (and a new interval).
    fn close_interval(&mut self, now_ns: u64, now_wall: SystemTime, out: &mut Vec<Event>) {
        if now_ns.saturating_sub(self.interval_start_ns) < FLOW_SUMMARY_INTERVAL.as_nanos() as u64 {
            return;
        }
        self.interval_start_ns = now_ns;
        self.spent = 0;
        for ((app, kind, status), [flows, cb, ob, cp, op]) in std::mem::take(&mut self.summarised) {
            let mut event = Event::summary(kind, app, "udp", status, now_wall);
            event.client_bytes = cb;
            event.origin_bytes = ob;
            event.client_packets = Some(cp);
            event.origin_packets = Some(op);
            event.flows = Some(flows);
            out.push(event);
        }
    }
}

#[derive(Default)]
pub struct UdpFlowTracker {
    /// Flows seen by earlier scans.
    seen: HashMap<FlowKey, Activity>,
    /// Live flows per app id, as of the last scan.
    live: BTreeMap<String, u64>,
    /// Per origin: live flows and their bytes as of the last scan, plus flows
    /// seen and bytes of flows ended.
    origins: BTreeMap<crate::lb::OriginRef, UdpOriginStats>,
    ended: BTreeMap<crate::lb::OriginRef, UdpOriginStats>,
    evictions: Evictions,
    budget: EventBudget,
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Turns a 16-byte map address back into an `IpAddr` (IPv4-mapped → IPv4).
pub fn ip_from16(addr: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The event for UDP flow `key` in `state` of app `app` (proxy mode `proxy`)
/// towards `origin`: a `connect` (status 0), or a `disconnect` ended now. The one
/// builder of UDP flow events (the scan and a reload both use it).
#[allow(clippy::too_many_arguments)]
pub fn flow_event(
    kind: EventKind,
    status: u16,
    key: &FlowKey,
    state: &FlowState,
    app: &str,
    proxy: &str,
    origin: Option<IpAddr>,
    now_mono: u64,
    now_wall: SystemTime,
) -> Event {
    let first_seen = now_wall - Duration::from_nanos(now_mono.saturating_sub(state.first_seen_ns));
    let mut event = Event::summary(kind, app.to_string(), "udp", status, now_wall);
    event.client_ip = Some(ip_from16(key.client));
    event.client_port = Some(key.client_port);
    event.server_ip = Some(ip_from16(key.edge));
    event.server_port = Some(key.edge_port);
    event.origin_ip = origin;
    event.origin_port = Some(state.origin_port);
    event.proxy_protocol = proxy.to_string();
    event.client_bytes = state.bytes_in;
    event.origin_bytes = state.bytes_out;
    event.client_packets = Some(state.packets_in);
    event.origin_packets = Some(state.packets_out);
    event.connect_timestamp = Some(rfc3339(first_seen));
    event.disconnect_timestamp = (kind == EventKind::Disconnect).then(|| rfc3339(now_wall));
    event
}

impl UdpFlowTracker {
    /// Live flows per app id, as of the last scan.
    pub fn live(&self) -> &BTreeMap<String, u64> {
        &self.live
    }

    /// Evictions since the agent started.
    pub fn evictions(&self) -> Evictions {
        self.evictions
    }

    /// The figures of the last scan of `tables` (`scan_seconds` left at 0).
    pub fn stats(&self, tables: &FlowTables) -> UdpFlowStats {
        let assured = tables
            .flows
            .iter()
            .filter(|(_, s)| s.admission == ADMISSION_ASSURED)
            .count() as u64;
        UdpFlowStats {
            live: self.live.clone(),
            per_origin: {
                let mut all = self.ended.clone();
                for (origin, o) in &self.origins {
                    let a = all.entry(origin.clone()).or_default();
                    a.live = o.live;
                    a.client_bytes += o.client_bytes;
                    a.origin_bytes += o.origin_bytes;
                }
                all
            },
            assured,
            new: tables.flows.len() as u64 - assured,
            promoted: tables.counters[FlowCounter::Promoted as usize],
            evicted_table_full: self.evictions.table_full,
            evicted_port_reclaimed: self.evictions.port_reclaimed,
            nat_ports_in_use: tables
                .flows
                .iter()
                .filter(|(_, s)| s.flags & forwarder_common::FLOW_SPP == 0)
                .count() as u64,
            nat_pool: tables.nat_pool,
            scan_seconds: 0.0,
        }
    }

    /// One scan of what `tables` holds at `now_mono` (`now_wall`): announce new
    /// flows, end idle ones, close evicted ones, recount live flows and
    /// evictions.
    pub fn scan(
        &mut self,
        tables: &FlowTables,
        now_mono: u64,
        now_wall: SystemTime,
    ) -> ScanOutcome {
        let mut outcome = ScanOutcome::default();
        let idle_ns = tables.idle.as_nanos() as u64;
        let mut live: BTreeMap<String, u64> =
            tables.udp_apps.iter().map(|id| (id.clone(), 0)).collect();
        let mut present: HashSet<FlowKey> = HashSet::with_capacity(tables.flows.len());
        let mut live_new: u64 = 0;
        let mut flows_seen: Vec<crate::lb::OriginRef> = Vec::new();
        let mut origins: BTreeMap<crate::lb::OriginRef, UdpOriginStats> = BTreeMap::new();
        let origin_ref = |state: &FlowState| -> crate::lb::OriginRef {
            let app = tables
                .apps
                .get(state.app as usize)
                .map(|(id, _)| id.clone())
                .unwrap_or_default();
            let label = tables
                .origin_labels
                .get(state.origin as usize)
                .cloned()
                .unwrap_or_default();
            (app, label)
        };
        let ended = &mut self.ended;
        let mut end_bytes = |state: &FlowState| {
            let e = ended.entry(origin_ref(state)).or_default();
            e.client_bytes += state.bytes_in;
            e.origin_bytes += state.bytes_out;
        };
        let describe = |state: &FlowState| -> (String, String, Option<IpAddr>) {
            let (app, proxy) = tables
                .apps
                .get(state.app as usize)
                .filter(|(id, _)| !id.is_empty())
                .cloned()
                .unwrap_or_else(|| (format!("app#{}", state.app), String::new()));
            (
                app,
                proxy,
                tables.origins.get(state.origin as usize).copied(),
            )
        };
        for (key, state) in &tables.flows {
            // A flow promoted while the tables were read is in both; the assured
            // copy comes first.
            if !present.insert(*key) {
                continue;
            }
            let packets = state.packets_in + state.packets_out;
            let activity = match self.seen.entry(*key) {
                std::collections::hash_map::Entry::Vacant(slot) => {
                    let (app, proxy, origin) = describe(state);
                    let event = flow_event(
                        EventKind::Connect,
                        status::OPENED,
                        key,
                        state,
                        &app,
                        &proxy,
                        origin,
                        now_mono,
                        now_wall,
                    );
                    let logged = self.budget.write(event, true, &mut outcome.events);
                    flows_seen.push(origin_ref(state));
                    slot.insert(Activity {
                        packets,
                        since_ns: now_mono,
                        last: *state,
                        logged,
                    })
                }
                std::collections::hash_map::Entry::Occupied(slot) => slot.into_mut(),
            };
            activity.last = *state;
            if activity.packets != packets {
                activity.packets = packets;
                activity.since_ns = now_mono;
            }
            if now_mono.saturating_sub(activity.since_ns) >= idle_ns {
                let logged = activity.logged;
                self.seen.remove(key);
                let (app, proxy, origin) = describe(state);
                let event = flow_event(
                    EventKind::Disconnect,
                    status::NORMAL_CLOSE,
                    key,
                    state,
                    &app,
                    &proxy,
                    origin,
                    now_mono,
                    now_wall,
                );
                self.budget.write(event, logged, &mut outcome.events);
                end_bytes(state);
                outcome.ended.push((*key, *state));
                continue;
            }
            if state.admission != ADMISSION_ASSURED {
                live_new += 1;
            }
            let (app, _, _) = describe(state);
            *live.entry(app).or_insert(0) += 1;
            let o = origins.entry(origin_ref(state)).or_default();
            o.live += 1;
            o.client_bytes += state.bytes_in;
            o.origin_bytes += state.bytes_out;
        }
        // Seen before, gone now, and not removed by the agent: evicted by the
        // datapath (a new flow pushed out, or its NAT port reclaimed).
        let removed: HashSet<&FlowKey> = tables.removed.iter().collect();
        let vanished: Vec<FlowKey> = self
            .seen
            .keys()
            .filter(|k| !present.contains(*k))
            .copied()
            .collect();
        for key in vanished {
            let Some(activity) = self.seen.remove(&key) else {
                continue;
            };
            end_bytes(&activity.last);
            if removed.contains(&key) {
                continue;
            }
            let (app, proxy, origin) = describe(&activity.last);
            let event = flow_event(
                EventKind::Disconnect,
                status::FLOW_EVICTED,
                &key,
                &activity.last,
                &app,
                &proxy,
                origin,
                now_mono,
                now_wall,
            );
            self.budget
                .write(event, activity.logged, &mut outcome.events);
        }
        for origin in flows_seen {
            self.ended.entry(origin).or_default().flows += 1;
        }
        self.count_evictions(tables, live_new);
        self.budget
            .close_interval(now_mono, now_wall, &mut outcome.events);
        self.live = live;
        self.origins = origins;
        outcome
    }

    /// Evictions from the datapath's counters: every new flow admitted is, by
    /// now, promoted, reclaimed, replaced by a reload, removed by the agent, still
    /// live — or evicted by the LRU. Totals never go down (a scan racing the
    /// datapath may undercount for a moment).
    fn count_evictions(&mut self, tables: &FlowTables, live_new: u64) {
        let c = &tables.counters;
        let accounted = c[FlowCounter::Promoted as usize]
            + c[FlowCounter::Reclaimed as usize]
            + c[FlowCounter::Replaced as usize]
            + tables.removed_new
            + live_new;
        let table_full = c[FlowCounter::Admitted as usize].saturating_sub(accounted);
        self.evictions.table_full = self.evictions.table_full.max(table_full);
        self.evictions.port_reclaimed = self
            .evictions
            .port_reclaimed
            .max(c[FlowCounter::Reclaimed as usize]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forwarder_common::{ADMISSION_NEW, RouteCache, v4_mapped};

    #[test]
    fn mapped_addresses_come_back_as_ipv4() {
        let v4 = forwarder_common::v4_mapped([10, 0, 1, 2]);
        assert_eq!(ip_from16(v4), "10.0.1.2".parse::<IpAddr>().unwrap());
        let v6: Ipv6Addr = "fd00:1::2".parse().unwrap();
        assert_eq!(ip_from16(v6.octets()), IpAddr::V6(v6));
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_ns();
        std::thread::sleep(Duration::from_millis(2));
        assert!(monotonic_ns() > a);
    }

    const SECOND: u64 = 1_000_000_000;

    fn key(n: u32) -> FlowKey {
        let b = n.to_be_bytes();
        FlowKey {
            client: v4_mapped([10, b[1], b[2], b[3]]),
            edge: v4_mapped([192, 0, 2, 1]),
            client_port: 40_000,
            edge_port: 27_015,
        }
    }

    fn state(packets: u64, admission: u32) -> FlowState {
        FlowState {
            first_seen_ns: 0,
            packets_in: packets,
            bytes_in: packets * 100,
            packets_out: 0,
            bytes_out: 0,
            app: 0,
            origin: 0,
            origin_port: 27_015,
            local_port: 27_015,
            flags: 0,
            client_ifindex: 1,
            generation: 1,
            rule: u32::MAX,
            admission,
            to_client: RouteCache::default(),
        }
    }

    fn tables(flows: Vec<(FlowKey, FlowState)>) -> FlowTables {
        FlowTables {
            flows,
            apps: vec![("game".into(), "simple".into())],
            origins: vec!["10.0.2.2".parse().unwrap()],
            udp_apps: vec!["game".into()],
            idle: Duration::from_secs(30),
            ..FlowTables::default()
        }
    }

    fn kinds(events: &[Event]) -> Vec<(EventKind, u16, Option<u64>)> {
        events
            .iter()
            .map(|e| (e.event, e.status, e.flows))
            .collect()
    }

    #[test]
    fn a_flow_is_announced_once_and_ends_when_idle() {
        let mut tracker = UdpFlowTracker::default();
        let t = tables(vec![(key(1), state(1, ADMISSION_ASSURED))]);
        let out = tracker.scan(&t, SECOND, SystemTime::now());
        assert_eq!(kinds(&out.events), [(EventKind::Connect, 0, None)]);
        assert_eq!(tracker.live()["game"], 1);
        let out = tracker.scan(&t, 20 * SECOND, SystemTime::now());
        assert!(out.events.is_empty() && out.ended.is_empty());
        let out = tracker.scan(&t, 31 * SECOND, SystemTime::now());
        assert_eq!(kinds(&out.events), [(EventKind::Disconnect, 200, None)]);
        assert_eq!(out.ended.len(), 1);
        assert_eq!(tracker.live()["game"], 0);
    }

    #[test]
    fn a_vanished_flow_is_closed_as_evicted_unless_the_agent_removed_it() {
        let mut tracker = UdpFlowTracker::default();
        let t = tables(vec![
            (key(1), state(1, ADMISSION_NEW)),
            (key(2), state(1, ADMISSION_NEW)),
        ]);
        tracker.scan(&t, SECOND, SystemTime::now());
        let mut gone = tables(vec![]);
        gone.removed = vec![key(2)];
        let out = tracker.scan(&gone, 2 * SECOND, SystemTime::now());
        assert_eq!(kinds(&out.events), [(EventKind::Disconnect, 429, None)]);
        assert_eq!(
            out.events[0].client_bytes, 100,
            "closed with its last counts"
        );
        assert_eq!(
            out.events[0].client_ip,
            Some("10.0.0.1".parse().unwrap()),
            "the evicted flow is named"
        );
    }

    #[test]
    fn evictions_are_what_the_counters_do_not_account_for() {
        let mut tracker = UdpFlowTracker::default();
        let mut t = tables(vec![(key(1), state(1, ADMISSION_NEW))]);
        t.counters[FlowCounter::Admitted as usize] = 100;
        t.counters[FlowCounter::Promoted as usize] = 10;
        t.counters[FlowCounter::Reclaimed as usize] = 20;
        t.counters[FlowCounter::Replaced as usize] = 3;
        t.removed_new = 6;
        tracker.scan(&t, SECOND, SystemTime::now());
        // 100 - 10 - 20 - 3 - 6 - 1 live.
        assert_eq!(
            tracker.evictions(),
            Evictions {
                table_full: 60,
                port_reclaimed: 20
            }
        );
        // A racing read that accounts for more never lowers the total.
        t.counters[FlowCounter::Promoted as usize] = 50;
        tracker.scan(&t, 2 * SECOND, SystemTime::now());
        assert_eq!(tracker.evictions().table_full, 60);
    }

    #[test]
    fn a_flood_of_flows_is_summarised_beyond_the_budget() {
        let mut tracker = UdpFlowTracker::default();
        let n = FLOW_EVENTS_PER_INTERVAL + 500;
        let flows: Vec<_> = (0..n).map(|i| (key(i), state(1, ADMISSION_NEW))).collect();
        let out = tracker.scan(&tables(flows), SECOND, SystemTime::now());
        assert_eq!(out.events.len(), FLOW_EVENTS_PER_INTERVAL as usize);
        // All of them are evicted before the interval ends: their disconnects are
        // summarised too, then everything comes out as two lines.
        let out = tracker.scan(&tables(vec![]), 2 * SECOND, SystemTime::now());
        assert!(out.events.is_empty(), "{:?}", kinds(&out.events));
        let out = tracker.scan(&tables(vec![]), 7 * SECOND, SystemTime::now());
        let mut got = kinds(&out.events);
        got.sort_by_key(|(k, s, _)| (k.as_str(), *s));
        assert_eq!(
            got,
            [
                (EventKind::Connect, 0, Some(500)),
                (EventKind::Disconnect, 429, Some(n as u64)),
            ]
        );
        let summary = out.events.iter().find(|e| e.status == 429).unwrap();
        assert_eq!(summary.client_bytes, n as u64 * 100);
        assert_eq!(summary.application, "game");
        assert_eq!(summary.client_ip, None);
    }
}
