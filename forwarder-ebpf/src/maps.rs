//! Every map of the datapath. The agent fills the config maps; the programs only read
//! them, and write counters and the UDP flow table. A leaf: it imports only the
//! shared types of `forwarder-common`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockMap},
};
use forwarder_common::{
    AppInfo, Counters, DropReason, EdgeAddr, EdgeV4List, FlowCounter, FlowKey, FlowState,
    MAGLEV_LANES, MAX_APPS, MAX_EDGE_ADDRS, MAX_FLOWS, MAX_IFINDEX, MAX_MAGLEV_SLOTS,
    MAX_NAT_CLAIMS, MAX_NEW_FLOWS, MAX_ORIGINS, MAX_PORT_ENTRIES, MAX_RULES, MAX_SOURCE_WINDOWS,
    MAX_SPLICES, MaglevEntry, NatClaim, NatKey, OriginInfo, OriginPortKey, OriginPortTarget,
    PORT_HINTS_LEN, PortKey, PortTarget, RouteCache, RuleVerdict, Settings, SourceKey,
    SourceWindow, SpliceCounter, SpliceEntry, SpliceKey,
};

/// IPv6 edge addresses → their index.
#[map]
pub static EDGE_ADDRS: HashMap<[u8; 16], EdgeAddr> = HashMap::with_max_entries(MAX_EDGE_ADDRS, 0);

/// IPv4 edge addresses (the 4 bytes in network order, read as a u32) → their
/// index: a 4-byte key hashes faster than the 16-byte mapped form.
#[map]
pub static EDGE_ADDRS_V4: HashMap<u32, EdgeAddr> = HashMap::with_max_entries(MAX_EDGE_ADDRS, 0);

/// Up to 8 IPv4 edge addresses, compared inline (see `EdgeV4List`).
#[map]
pub static EDGE_V4_LIST: Array<EdgeV4List> = Array::with_max_entries(1, 0);

/// `HINT_*` bits per (protocol, port), see forwarder-common.
#[map]
pub static PORT_HINTS: Array<u8> = Array::with_max_entries(PORT_HINTS_LEN, 0);

/// (edge, protocol, port) → app index or `APP_PASS`. Port ranges are expanded by the
/// agent so that a packet costs one lookup.
#[map]
pub static PORTS: HashMap<PortKey, PortTarget> = HashMap::with_max_entries(MAX_PORT_ENTRIES, 0);

#[map]
pub static APPS: Array<AppInfo> = Array::with_max_entries(MAX_APPS, 0);

#[map]
pub static ORIGINS: Array<OriginInfo> = Array::with_max_entries(MAX_ORIGINS, 0);

/// The UDP apps' origin tables (Maglev, weighted, healthy origins only), four
/// slots per value; an app's slots are `AppInfo::table_first ..+ table_size`.
#[map]
pub static MAGLEV: Array<MaglevEntry> = Array::with_max_entries(MAX_MAGLEV_SLOTS / MAGLEV_LANES, 0);

/// Cached egress towards each origin (indexed as `ORIGINS`), written by the program:
/// one route lookup per origin and route epoch serves all its flows.
#[map]
pub static ORIGIN_ROUTES: Array<RouteCache> = Array::with_max_entries(MAX_ORIGINS, 0);

/// (protocol, origin address, origin port) of every origin: packets from these are
/// return traffic (SPEC §3 step 2).
#[map]
pub static ORIGIN_PORTS: HashMap<OriginPortKey, OriginPortTarget> =
    HashMap::with_max_entries(MAX_PORT_ENTRIES, 0);

/// Access rules, longest prefix match on the client address.
#[map]
pub static RULES_V4: LpmTrie<[u8; 4], RuleVerdict> =
    LpmTrie::with_max_entries(MAX_RULES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
pub static RULES_V6: LpmTrie<[u8; 16], RuleVerdict> =
    LpmTrie::with_max_entries(MAX_RULES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// `ROUTE_EPOCH[0]`: the route epoch (see `RouteCache`), bumped by the agent.
#[map]
pub static ROUTE_EPOCH: Array<u32> = Array::with_max_entries(1, 0);

/// Drops per reason, indexed by `DropReason`.
#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DropReason::COUNT as u32, 0);

/// Per app and direction: `app * 2 + DIR_*`.
#[map]
pub static APP_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_APPS * 2, 0);

/// Hits per access rule, indexed by `RuleVerdict::rule`.
#[map]
pub static RULE_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_RULES, 0);

/// Packets and bytes seen per ingress interface, indexed by ifindex (up to
/// `MAX_IFINDEX`).
#[map]
pub static IFACE_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_IFINDEX, 0);

/// Assured UDP flows (the client spoke again after the origin answered), keyed as
/// the client sees them. Not an LRU: nothing the datapath does evicts them; the
/// agent ends them when idle.
#[map]
pub static FLOWS: HashMap<FlowKey, FlowState> = HashMap::with_max_entries(MAX_FLOWS, 0);

/// New UDP flows, not yet assured. An LRU of its own: a flood of one-way flows
/// evicts only other new flows.
#[map]
pub static NEW_FLOWS: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(MAX_NEW_FLOWS, 0);

/// Return path of plain-NAT and v2 flows: (origin-side address, port) → the flow
/// holding it (see `NatClaim`).
#[map]
pub static NAT_PORTS: HashMap<NatKey, NatClaim> = HashMap::with_max_entries(MAX_NAT_CLAIMS, 0);

/// Flow admission events, indexed by `FlowCounter`.
#[map]
pub static FLOW_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(FlowCounter::COUNT as u32, 0);

/// New flows per app in the current second (`udp_new_flows_per_second`), indexed
/// as `APPS`.
#[map]
pub static APP_WINDOWS: Array<SourceWindow> = Array::with_max_entries(MAX_APPS, 0);

/// New flows per client source in the current second (`udp_new_flows_per_source`).
#[map]
pub static SOURCE_WINDOWS: LruHashMap<SourceKey, SourceWindow> =
    LruHashMap::with_max_entries(MAX_SOURCE_WINDOWS, 0);

/// One listening socket per TCP app, indexed by app (sk_lookup steering).
#[map]
pub static TCP_LISTENERS: SockMap = SockMap::with_max_entries(MAX_APPS, 0);

/// Spliced TCP connections, one entry per direction, keyed as the segments arrive
/// (see `SpliceEntry`). Written by the agent at splice time and removed by it at
/// teardown; the program writes counters, flags and the route cache.
#[map]
pub static SPLICES: HashMap<SpliceKey, SpliceEntry> = HashMap::with_max_entries(MAX_SPLICES, 0);

/// Splice events, indexed by `SpliceCounter`.
#[map]
pub static SPLICE_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(SpliceCounter::COUNT as u32, 0);
