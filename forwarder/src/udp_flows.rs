//! The agent's side of UDP flows: the XDP program creates flows and counts their
//! packets; the agent notices new ones (`connect` events), ends idle ones after
//! `udp_idle_timeout` (`disconnect` events with byte and packet counts) and keeps
//! the live-flow gauge. One scan per second; nothing per packet.
//!
//! The datapath keeps no per-packet timestamp (reading the clock would cost every
//! packet ~30 ns): a flow is idle when its packet counts have not moved for
//! `udp_idle_timeout`, as seen by these scans, so a flow ends between the timeout
//! and the timeout plus one scan interval after its last packet.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, SystemTime};

use forwarder_common::FlowKey;
use log::warn;

use crate::config::Config;
use crate::datapath::Datapath;
use crate::events::{Event, EventKind, EventLog, rfc3339, status};

/// How often the agent scans the flow table.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// What the tracker remembers of an announced flow.
struct Activity {
    /// Packets both ways at the last scan that saw them change.
    packets: u64,
    /// `monotonic_ns()` of that scan.
    since_ns: u64,
}

#[derive(Default)]
pub struct UdpFlowTracker {
    /// Flows already announced with a `connect` event.
    announced: HashMap<FlowKey, Activity>,
    /// Live flows per app id, as of the last scan.
    live: BTreeMap<String, u64>,
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

impl UdpFlowTracker {
    /// Live flows per app id, as of the last scan.
    pub fn live(&self) -> &BTreeMap<String, u64> {
        &self.live
    }

    /// One scan: announce new flows, end idle ones, recount live flows.
    pub fn scan(
        &mut self,
        datapath: &mut Datapath,
        config: &Config,
        idle: Duration,
        events: &EventLog,
    ) -> anyhow::Result<()> {
        let flows = datapath.udp_flows()?;
        let now_mono = monotonic_ns();
        let now_wall = SystemTime::now();
        let to_wall = |ns: u64| now_wall - Duration::from_nanos(now_mono.saturating_sub(ns));
        let (app_ids, origins) = match datapath.plan() {
            Some(plan) => (plan.app_ids.clone(), plan.origins.clone()),
            None => return Ok(()),
        };
        let mut live: BTreeMap<String, u64> = config
            .apps
            .iter()
            .filter(|a| a.protocol == crate::config::Protocol::Udp)
            .map(|a| (a.id.clone(), 0))
            .collect();
        let mut present = HashSet::with_capacity(flows.len());
        for (key, state) in flows {
            let app_id = app_ids
                .get(state.app as usize)
                .cloned()
                .unwrap_or_else(|| format!("app#{}", state.app));
            let proxy = config
                .apps
                .iter()
                .find(|a| a.id == app_id)
                .map(|a| a.proxy_protocol.as_str().to_string())
                .unwrap_or_default();
            let origin_ip = origins
                .get(state.origin as usize)
                .map(|o| ip_from16(o.addr));
            let event = |kind: EventKind, status: u16, ended: bool| Event {
                timestamp: rfc3339(now_wall),
                event: kind,
                application: app_id.clone(),
                protocol: "udp".into(),
                client_ip: Some(ip_from16(key.client)),
                client_port: Some(key.client_port),
                server_ip: Some(ip_from16(key.edge)),
                server_port: Some(key.edge_port),
                origin_ip,
                origin_port: Some(state.origin_port),
                proxy_protocol: proxy.clone(),
                client_bytes: state.bytes_in,
                origin_bytes: state.bytes_out,
                client_packets: Some(state.packets_in),
                origin_packets: Some(state.packets_out),
                status,
                connect_timestamp: Some(rfc3339(to_wall(state.first_seen_ns))),
                disconnect_timestamp: ended.then(|| rfc3339(now_wall)),
            };
            let packets = state.packets_in + state.packets_out;
            let activity = match self.announced.entry(key) {
                std::collections::hash_map::Entry::Vacant(slot) => {
                    events.emit(&event(EventKind::Connect, status::OPENED, false));
                    slot.insert(Activity {
                        packets,
                        since_ns: now_mono,
                    })
                }
                std::collections::hash_map::Entry::Occupied(slot) => slot.into_mut(),
            };
            if activity.packets != packets {
                activity.packets = packets;
                activity.since_ns = now_mono;
            }
            if now_mono.saturating_sub(activity.since_ns) >= idle.as_nanos() as u64 {
                if let Err(err) = datapath.remove_udp_flow(&key, &state) {
                    warn!("ending an idle UDP flow failed: {err:#}");
                    continue;
                }
                self.announced.remove(&key);
                events.emit(&event(EventKind::Disconnect, status::NORMAL_CLOSE, true));
                continue;
            }
            present.insert(key);
            *live.entry(app_id).or_insert(0) += 1;
        }
        // Flows the LRU evicted under pressure vanish without an event of their own.
        self.announced.retain(|k, _| present.contains(k));
        self.live = live;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
