//! The kernel side as the agent sees it: load the eBPF object, fill its maps from a
//! `Plan`, attach XDP to interfaces and sk_lookup to the network namespace, and read
//! the counters back.

pub mod batch;
pub mod plan;
mod splice;
pub mod test_run;

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuValues, SockMap, lpm_trie},
    programs::{ProgramFd, SkLookup, Xdp, XdpMode, xdp::XdpLinkId},
    util::nr_cpus,
};
use forwarder_common::{
    ADMISSION_ASSURED, AppInfo, CLAIM_ASSURED, Counters, DIR_EGRESS, DIR_INGRESS, DropReason,
    EDGE_V4_INLINE, EdgeAddr, EdgeV4List, FlowCounter, FlowKey, FlowState, HINT_EDGE_PORT,
    HINT_ORIGIN_PORT, HINT_SPLICE, MAGLEV_LANES, MAX_IFINDEX, MaglevEntry, NatClaim, NatKey,
    OriginInfo, OriginPortTarget, PortTarget, ROUTE_EPOCH_INDEX, RuleVerdict, Settings, hint_index,
};
use log::{info, warn};

use crate::config::XdpMode as ConfigXdpMode;
pub use plan::{Plan, addr16};

/// Fault injection for tests of `Datapath::apply`: the Nth map write from now fails.
pub mod faults {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

    /// Writes left before the injected failure; negative: no fault armed.
    static BUDGET: AtomicI64 = AtomicI64::new(-1);
    static SUSPENDED: AtomicBool = AtomicBool::new(false);

    /// Makes map write number `n` (0-based, counted from now) fail. Process-wide:
    /// for tests that own their process's datapath.
    pub fn fail_write(n: u32) {
        BUDGET.store(i64::from(n), Ordering::SeqCst);
    }

    /// Disarms the fault.
    pub fn clear() {
        BUDGET.store(-1, Ordering::SeqCst);
    }

    /// A rollback is never failed on purpose.
    pub(super) fn suspend(on: bool) {
        SUSPENDED.store(on, Ordering::SeqCst);
    }

    /// Called before every map write.
    pub(super) fn charge(what: &str) -> anyhow::Result<()> {
        if SUSPENDED.load(Ordering::SeqCst) {
            return Ok(());
        }
        match BUDGET.fetch_sub(1, Ordering::SeqCst) {
            0 => anyhow::bail!("injected fault writing {what}"),
            n if n < 0 => {
                BUDGET.store(-1, Ordering::SeqCst);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Names of the programs in the eBPF object.
pub const PROG_XDP: &str = "xdp_forwarder";
pub const PROG_XDP_PASS: &str = "xdp_pass";
pub const PROG_SK_LOOKUP: &str = "sk_lookup_steer";

/// `ROUTE_EPOCH[0]`: bumping it makes every flow's cached route stale, so the next
/// datagram of each flow looks its route up again (see `RouteCache`).
pub struct RouteEpoch {
    map: Array<MapData, u32>,
    value: u32,
}

impl RouteEpoch {
    pub fn bump(&mut self) -> anyhow::Result<()> {
        // 0 marks a cache never filled: skip it on wrap-around.
        self.value = self.value.wrapping_add(1).max(1);
        self.map
            .set(ROUTE_EPOCH_INDEX, self.value, 0)
            .context("writing ROUTE_EPOCH")
    }

    pub fn value(&self) -> u32 {
        self.value
    }
}

/// The loaded object with its programs ready to attach.
pub struct Datapath {
    ebpf: Ebpf,
    /// Attached interfaces: name → (ifindex, link, mode used).
    attached: BTreeMap<String, (u32, XdpLinkId, XdpMode)>,
    sk_lookup_attached: bool,
    /// The plan currently in the maps.
    current: Option<Plan>,
    /// UDP flows the agent removed since `take_removed_flows` last ran.
    removed_flows: Vec<FlowKey>,
    /// New (not assured) UDP flows the agent removed, ever: flow admission's
    /// accounting needs them (see `udp_flows::UdpFlowTracker`).
    removed_new_flows: u64,
}

/// How many times a program load interrupted by a signal (EAGAIN) is tried.
const VERIFY_ATTEMPTS: u32 = 5;

/// Loads a program, again when the verifier gave up with EAGAIN: it does when a
/// signal is pending (any signal to the process, e.g. a child exiting), and
/// libbpf retries those too.
fn load_retrying(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> anyhow::Result<()> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match load() {
            Ok(()) => return Ok(()),
            Err(e) if attempt < VERIFY_ATTEMPTS && is_eagain(&e) => {
                log::debug!("a program load was interrupted by a signal; again");
            }
            Err(e) => return Err(anyhow!("{e}: {e:?}")),
        }
    }
}

/// Whether a program load failed with EAGAIN (the verifier saw a signal pending).
fn is_eagain(err: &aya::programs::ProgramError) -> bool {
    match err {
        aya::programs::ProgramError::LoadError { io_error, .. } => {
            io_error.raw_os_error() == Some(libc::EAGAIN)
        }
        _ => false,
    }
}

/// Explains the usual reasons a load fails, next to the kernel's own message.
fn load_hint(err: &anyhow::Error) -> &'static str {
    let text = format!("{err:#}");
    if text.contains("Operation not permitted") || text.contains("EPERM") {
        "hint: loading eBPF needs root (or CAP_BPF + CAP_NET_ADMIN)"
    } else if text.contains("btf") || text.contains("BTF") {
        "hint: the kernel needs BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF=y)"
    } else if text.contains("verifier") || text.contains("Permission denied") {
        "hint: the verifier rejected the program; its log is above"
    } else {
        "hint: Linux >= 6.1 with BTF is required"
    }
}

impl Datapath {
    /// Loads the object and the programs (no attachment yet).
    pub fn load() -> anyhow::Result<Datapath> {
        let object = crate::ebpf::object_bytes();
        if object.is_empty() {
            bail!("the eBPF object is empty: this binary was built with AYA_BUILD_SKIP=1");
        }
        let result = (|| -> anyhow::Result<Ebpf> {
            let mut ebpf = EbpfLoader::new()
                .load(object)
                .context("loading the eBPF object (maps and BTF)")?;
            for name in [PROG_XDP, PROG_XDP_PASS] {
                let prog: &mut Xdp = ebpf
                    .program_mut(name)
                    .with_context(|| format!("program {name} missing from the object"))?
                    .try_into()?;
                load_retrying(|| prog.load()).with_context(|| format!("verifying {name}"))?;
            }
            let steer: &mut SkLookup = ebpf
                .program_mut(PROG_SK_LOOKUP)
                .with_context(|| format!("program {PROG_SK_LOOKUP} missing from the object"))?
                .try_into()?;
            load_retrying(|| steer.load()).context("verifying sk_lookup_steer")?;
            Ok(ebpf)
        })();
        let ebpf = result.map_err(|e| {
            let hint = load_hint(&e);
            e.context(hint)
        })?;
        let mut ebpf = ebpf;
        {
            // Epoch 0 marks a route cache never filled: start at 1.
            let mut epoch: Array<&mut MapData, u32> =
                Array::try_from(ebpf.map_mut("ROUTE_EPOCH").context("ROUTE_EPOCH")?)?;
            epoch.set(ROUTE_EPOCH_INDEX, 1, 0)?;
        }
        Ok(Datapath {
            ebpf,
            attached: BTreeMap::new(),
            sk_lookup_attached: false,
            current: None,
            removed_flows: Vec::new(),
            removed_new_flows: 0,
        })
    }

    /// The fd of a loaded XDP program (for test runs and benchmarks).
    pub fn xdp_program_fd(&self, name: &str) -> anyhow::Result<&ProgramFd> {
        let prog: &Xdp = self
            .ebpf
            .program(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        Ok(prog.fd()?)
    }

    /// The kernel's id of a loaded XDP program (for `bpftool prog dump jited id N`).
    pub fn xdp_program_id(&self, name: &str) -> anyhow::Result<u32> {
        let prog: &Xdp = self
            .ebpf
            .program(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        Ok(prog.info()?.id())
    }

    /// The kernel's run statistics of a loaded XDP program: total run time (ns) and
    /// run count. Both stay 0 unless statistics are enabled (`BPF_ENABLE_STATS` or
    /// `kernel.bpf_stats_enabled`).
    pub fn xdp_program_stats(&self, name: &str) -> anyhow::Result<(u64, u64)> {
        let prog: &Xdp = self
            .ebpf
            .program(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        let info = prog.info()?;
        Ok((info.run_time().as_nanos() as u64, info.run_count()))
    }

    /// Attaches the datapath to `interface`. `auto` tries driver mode and falls back
    /// to skb (generic) mode with a log line saying so.
    pub fn attach_xdp(&mut self, interface: &str, mode: ConfigXdpMode) -> anyhow::Result<XdpMode> {
        let ifindex = ifindex(interface)?;
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROG_XDP)
            .context("xdp program missing")?
            .try_into()?;
        let (link, used) = match mode {
            ConfigXdpMode::Driver => (
                prog.attach(interface, XdpMode::Driver)
                    .with_context(|| format!("attaching XDP to {interface} in driver mode"))?,
                XdpMode::Driver,
            ),
            ConfigXdpMode::Skb => (
                prog.attach(interface, XdpMode::Skb)
                    .with_context(|| format!("attaching XDP to {interface} in skb mode"))?,
                XdpMode::Skb,
            ),
            ConfigXdpMode::Auto => match prog.attach(interface, XdpMode::Driver) {
                Ok(link) => (link, XdpMode::Driver),
                Err(err) => {
                    warn!(
                        "{interface}: driver-mode XDP unavailable ({err}); falling back to skb mode"
                    );
                    (
                        prog.attach(interface, XdpMode::Skb)
                            .with_context(|| format!("attaching XDP to {interface} in skb mode"))?,
                        XdpMode::Skb,
                    )
                }
            },
        };
        // Count this interface's packets from zero (the slot may hold an old
        // interface's counts; indices above MAX_IFINDEX are not counted).
        if ifindex < MAX_IFINDEX {
            let mut iface: PerCpuArray<&mut MapData, Counters> =
                PerCpuArray::try_from(self.ebpf.map_mut("IFACE_STATS").context("IFACE_STATS")?)?;
            let zeros =
                PerCpuValues::try_from(vec![Counters::default(); nr_cpus().map_err(|(_, e)| e)?])?;
            iface.set(ifindex, zeros, 0)?;
        } else {
            warn!("{interface}: ifindex {ifindex} >= {MAX_IFINDEX}: its frames are not counted");
        }
        info!("{interface}: XDP attached in {used:?} mode");
        self.attached
            .insert(interface.to_string(), (ifindex, link, used));
        Ok(used)
    }

    /// Detaches XDP from every interface it was attached to.
    pub fn detach_all(&mut self) -> anyhow::Result<()> {
        let attached = std::mem::take(&mut self.attached);
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROG_XDP)
            .context("xdp program missing")?
            .try_into()?;
        for (name, (_, link, _)) in attached {
            prog.detach(link)
                .with_context(|| format!("detaching XDP from {name}"))?;
            info!("{name}: XDP detached");
        }
        Ok(())
    }

    /// Attaches sk_lookup to the caller's network namespace.
    pub fn attach_sk_lookup(&mut self) -> anyhow::Result<()> {
        if self.sk_lookup_attached {
            return Ok(());
        }
        // The calling thread's namespace (the process's main thread may be elsewhere).
        let netns =
            File::open("/proc/thread-self/ns/net").context("opening /proc/thread-self/ns/net")?;
        let prog: &mut SkLookup = self
            .ebpf
            .program_mut(PROG_SK_LOOKUP)
            .context("sk_lookup program missing")?
            .try_into()?;
        prog.attach(netns.as_fd()).context("attaching sk_lookup")?;
        self.sk_lookup_attached = true;
        Ok(())
    }

    /// Puts `listener` (a listening TCP socket) in the sockmap slot of TCP app `app`:
    /// from now on sk_lookup steers every port of the app to it.
    pub fn set_tcp_listener(&mut self, app: u32, listener: &impl AsRawFd) -> anyhow::Result<()> {
        let mut map: SockMap<&mut MapData> = SockMap::try_from(self.map_mut("TCP_LISTENERS")?)?;
        map.set(app, listener, 0)
            .with_context(|| format!("registering the listener of app #{app}"))
    }

    /// Empties the sockmap slot of app `app` (the app was removed).
    pub fn clear_tcp_listener(&mut self, app: u32) -> anyhow::Result<()> {
        let mut map: SockMap<&mut MapData> = SockMap::try_from(self.map_mut("TCP_LISTENERS")?)?;
        match map.clear_index(&app) {
            Ok(()) => Ok(()),
            // Nothing there: already clear (an empty sockmap slot answers EINVAL).
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EINVAL) =>
            {
                Ok(())
            }
            Err(err) => Err(err).with_context(|| format!("clearing the listener of app #{app}")),
        }
    }

    /// The app index of every app id in the current plan.
    pub fn app_indices(&self) -> BTreeMap<String, u32> {
        self.current
            .as_ref()
            .map(Plan::app_indices)
            .unwrap_or_default()
    }

    /// Every live UDP flow with its state: the assured ones (`FLOWS`), then the
    /// new ones (`NEW_FLOWS`); `FlowState::admission` says which. A flow promoted
    /// while the tables are read may appear in both: the assured copy comes first.
    pub fn udp_flows(&self) -> anyhow::Result<Vec<(FlowKey, FlowState)>> {
        let mut flows = Vec::new();
        for name in ["FLOWS", "NEW_FLOWS"] {
            let map = match self.ebpf.map(name).with_context(|| name.to_string())? {
                aya::maps::Map::HashMap(data) | aya::maps::Map::LruHashMap(data) => data,
                _ => bail!("{name} is not a hash map"),
            };
            flows.extend(
                batch::read_all::<FlowKey, FlowState>(map)
                    .with_context(|| format!("reading {name}"))?,
            );
        }
        Ok(flows)
    }

    /// Ends a UDP flow. An assured flow's NAT port claim is released with it (if it
    /// is still the flow's); a new flow's is left to be taken by the next flow
    /// probing it (the datapath decides who gets a reclaimable port, atomically).
    pub fn remove_udp_flow(&mut self, key: &FlowKey, state: &FlowState) -> anyhow::Result<()> {
        let assured = state.admission == ADMISSION_ASSURED;
        let nat_key = self
            .current
            .as_ref()
            .and_then(|p| p.origins.get(state.origin as usize))
            .filter(|_| assured && state.flags & forwarder_common::FLOW_SPP == 0)
            .map(|o| NatKey {
                local: o.local,
                local_port: state.local_port,
                _pad: 0,
            });
        // The port first: while the flow is there, no one else may take it.
        if let Some(nat_key) = nat_key {
            let mut nat: HashMap<&mut MapData, NatKey, NatClaim> =
                HashMap::try_from(self.map_mut("NAT_PORTS")?)?;
            if nat
                .get(&nat_key, 0)
                .is_ok_and(|claim| claim.owner == *key && claim.state == CLAIM_ASSURED)
            {
                let _ = nat.remove(&nat_key);
            }
        }
        let table = if assured { "FLOWS" } else { "NEW_FLOWS" };
        let mut flows: HashMap<&mut MapData, FlowKey, FlowState> =
            HashMap::try_from(self.map_mut(table)?)?;
        match flows.remove(key) {
            Ok(()) => {
                self.removed_flows.push(*key);
                if !assured {
                    self.removed_new_flows += 1;
                }
                Ok(())
            }
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(err) => Err(err).with_context(|| format!("removing a flow from {table}")),
        }
    }

    /// Moves the live UDP flows of app `app` (its index) whose origin is the
    /// `ORIGINS` slot `from` to the origin the app's current table gives them
    /// (an origin went down). SPP flows keep their client address and port in the
    /// header, so the new origin sees the same client; a plain-NAT or v2 flow moves
    /// when the new origin is reached from the same local address (its NAT port
    /// stays valid; a v2 flow sends its header again), else it is ended and its
    /// next datagram starts a new flow. Returns how many moved, and the flows
    /// ended (for their `disconnect` events). Counter updates the datapath makes
    /// while a flow is rewritten may be lost.
    pub fn move_udp_flows(
        &mut self,
        app: u32,
        from: u32,
    ) -> anyhow::Result<(u64, Vec<(FlowKey, FlowState)>)> {
        let mut ended = Vec::new();
        let Some(plan) = self.current.clone() else {
            return Ok((0, ended));
        };
        let Some(info) = plan.apps.get(app as usize).copied() else {
            return Ok((0, ended));
        };
        let table = plan
            .maglev
            .get(&info.table_first)
            .filter(|_| info.table_size > 0);
        let Some(table) = table else {
            return Ok((0, ended));
        };
        let mut moved = 0;
        for (key, state) in self.udp_flows()? {
            if state.app != app || state.origin != from {
                continue;
            }
            let hash = forwarder_common::flow_hash(&key.client, key.client_port);
            let offset = u32::from(table[(hash % info.table_size) as usize]);
            let to = info.origin_first + offset;
            let (Some(old), Some(new)) = (
                plan.origins.get(from as usize),
                plan.origins.get(to as usize),
            ) else {
                continue;
            };
            if to == from {
                continue;
            }
            let spp = state.flags & forwarder_common::FLOW_SPP != 0;
            if !spp && old.local != new.local {
                self.remove_udp_flow(&key, &state)?;
                ended.push((key, state));
                continue;
            }
            let mut next = state;
            next.origin = to;
            next.origin_port = new.port_low + (key.edge_port - info.edge_port_low);
            next.flags &= !forwarder_common::FLOW_V2_HEADER_SENT;
            let name = if state.admission == ADMISSION_ASSURED {
                "FLOWS"
            } else {
                "NEW_FLOWS"
            };
            let mut flows: HashMap<&mut MapData, FlowKey, FlowState> =
                HashMap::try_from(self.map_mut(name)?)?;
            // BPF_EXIST: a flow that ended meanwhile stays ended.
            const BPF_EXIST: u64 = 2;
            match flows.insert(key, next, BPF_EXIST) {
                Ok(()) => moved += 1,
                Err(err) if is_not_found(&err) => {}
                Err(err) => return Err(err).with_context(|| format!("moving a flow in {name}")),
            }
        }
        Ok((moved, ended))
    }

    /// The UDP flows the agent removed since the last call, and how many new
    /// (not assured) flows it has removed in all.
    pub fn take_removed_flows(&mut self) -> (Vec<FlowKey>, u64) {
        (
            std::mem::take(&mut self.removed_flows),
            self.removed_new_flows,
        )
    }

    /// The flow admission counters (`FlowCounter`), summed over CPUs.
    pub fn flow_counters(&self) -> anyhow::Result<[u64; FlowCounter::COUNT]> {
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("FLOW_COUNTERS").context("FLOW_COUNTERS")?)?;
        let mut counts = [0u64; FlowCounter::COUNT];
        for (i, slot) in counts.iter_mut().enumerate() {
            *slot = map.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(counts)
    }

    /// The current plan (what the maps hold).
    pub fn plan(&self) -> Option<&Plan> {
        self.current.as_ref()
    }

    /// Mutable access to a map by name, for the TCP listener socket map and tests.
    pub fn map_mut(&mut self, name: &str) -> anyhow::Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing from the object"))
    }

    /// Writes `plan` into the maps. With a plan already in place, only the difference
    /// is written, in an order that never leaves a configured port unowned: first
    /// everything new (rules, origins, apps, ports, edge addresses), then removals.
    /// Writes `plan` into the maps, all or nothing: if any write fails, what was
    /// written is rolled back so the maps hold exactly the previous plan again (the
    /// only trace: counters of app or rule slots the new plan reassigned were
    /// zeroed).
    pub fn apply(&mut self, plan: &Plan) -> anyhow::Result<()> {
        let old = self.current.take().unwrap_or_default();
        let Err(err) = self.write_plan(&old, plan) else {
            self.current = Some(plan.clone());
            return Ok(());
        };
        // From whatever part of `plan` made it in back to `old`: upserts of `old`'s
        // entries (its own capacity suffices), removal of `plan`'s extras (those
        // never written are skipped).
        faults::suspend(true);
        let rollback = self.write_plan(plan, &old);
        faults::suspend(false);
        match rollback {
            Ok(()) => {
                self.current = Some(old);
                Err(err.context("the datapath maps were rolled back to the previous config"))
            }
            Err(rollback) => {
                // Unknown state: remember `plan` so the next apply rewrites every
                // entry that differs from it.
                self.current = Some(plan.clone());
                Err(err.context(format!("rolling the maps back failed too: {rollback:#}")))
            }
        }
    }

    /// Whether the configuration maps hold exactly `plan` (for tests of `apply`):
    /// every hash map's key set and values, the array slots `plan` uses, the port
    /// hints, the inline edge list and the settings. Returns the first difference.
    pub fn maps_hold(&self, plan: &Plan) -> anyhow::Result<()> {
        fn same_hash<
            PK: Ord + Copy,
            K: aya::Pod + Eq + std::hash::Hash + std::fmt::Debug,
            V: aya::Pod + PartialEq + std::fmt::Debug,
        >(
            ebpf: &Ebpf,
            name: &str,
            want: &BTreeMap<PK, u32>,
            key: impl Fn(PK) -> K,
            value: impl Fn(u32) -> V,
        ) -> anyhow::Result<()> {
            let map: HashMap<&MapData, K, V> =
                HashMap::try_from(ebpf.map(name).with_context(|| name.to_string())?)?;
            let got: std::collections::HashMap<K, V> = map
                .iter()
                .collect::<Result<_, _>>()
                .with_context(|| format!("reading {name}"))?;
            let expected: std::collections::HashMap<K, V> =
                want.iter().map(|(k, v)| (key(*k), value(*v))).collect();
            if got.len() != expected.len() {
                bail!(
                    "{name}: {} entries, the plan has {}",
                    got.len(),
                    expected.len()
                );
            }
            for (k, v) in &expected {
                if got.get(k) != Some(v) {
                    bail!("{name}[{k:?}] is {:?}, the plan says {v:?}", got.get(k));
                }
            }
            Ok(())
        }
        let ebpf = &self.ebpf;
        let (v4, v6) = split_edges(&plan.edge_addrs);
        same_hash(
            ebpf,
            "PORTS",
            &plan.ports,
            |k| k.key(),
            |app| PortTarget { app },
        )?;
        same_hash(
            ebpf,
            "ORIGIN_PORTS",
            &plan.origin_ports,
            |k| k.key(),
            |app| OriginPortTarget { app },
        )?;
        same_hash(ebpf, "EDGE_ADDRS", &v6, |a| a, |index| EdgeAddr { index })?;
        same_hash(
            ebpf,
            "EDGE_ADDRS_V4",
            &v4,
            |a| a,
            |index| EdgeAddr { index },
        )?;
        let apps: Array<&MapData, AppInfo> = Array::try_from(ebpf.map("APPS").context("APPS")?)?;
        for (i, a) in plan.apps.iter().enumerate() {
            if apps.get(&(i as u32), 0)? != *a {
                bail!("APPS[{i}] differs from the plan");
            }
        }
        let origins: Array<&MapData, OriginInfo> =
            Array::try_from(ebpf.map("ORIGINS").context("ORIGINS")?)?;
        for (i, o) in plan.origins.iter().enumerate() {
            if origins.get(&(i as u32), 0)? != *o {
                bail!("ORIGINS[{i}] differs from the plan");
            }
        }
        let maglev: Array<&MapData, MaglevEntry> =
            Array::try_from(ebpf.map("MAGLEV").context("MAGLEV")?)?;
        for (first, table) in &plan.maglev {
            for (i, entry) in maglev_entries(*first, table) {
                if maglev.get(&i, 0)? != entry {
                    bail!("MAGLEV[{i}] differs from the plan");
                }
            }
        }
        let hints: Array<&MapData, u8> =
            Array::try_from(ebpf.map("PORT_HINTS").context("PORT_HINTS")?)?;
        for (i, h) in port_hints(&[plan]) {
            if hints.get(&i, 0)? != h {
                bail!("PORT_HINTS[{i}] differs from the plan");
            }
        }
        let list: Array<&MapData, EdgeV4List> =
            Array::try_from(ebpf.map("EDGE_V4_LIST").context("EDGE_V4_LIST")?)?;
        if list.get(&0, 0)? != edge_v4_list(&v4) {
            bail!("EDGE_V4_LIST differs from the plan");
        }
        let settings: Array<&MapData, Settings> =
            Array::try_from(ebpf.map("SETTINGS").context("SETTINGS")?)?;
        if settings.get(&0, 0)? != plan.settings {
            bail!("SETTINGS differ from the plan");
        }
        for (name, rules) in [
            ("RULES_V4", plan.rules_v4.len()),
            ("RULES_V6", plan.rules_v6.len()),
        ] {
            let count = match name {
                "RULES_V4" => {
                    let t: LpmTrie<&MapData, [u8; 4], RuleVerdict> =
                        LpmTrie::try_from(ebpf.map(name).context("RULES_V4")?)?;
                    t.keys().count()
                }
                _ => {
                    let t: LpmTrie<&MapData, [u8; 16], RuleVerdict> =
                        LpmTrie::try_from(ebpf.map(name).context("RULES_V6")?)?;
                    t.keys().count()
                }
            };
            if count != rules {
                bail!("{name}: {count} rules, the plan has {rules}");
            }
        }
        Ok(())
    }

    fn write_plan(&mut self, old: &Plan, new: &Plan) -> anyhow::Result<()> {
        let ebpf = &mut self.ebpf;
        write_lpm(ebpf, "RULES_V4", &old.rules_v4, &new.rules_v4)?;
        write_lpm(ebpf, "RULES_V6", &old.rules_v6, &new.rules_v6)?;
        {
            let mut origins: Array<&mut MapData, OriginInfo> =
                Array::try_from(ebpf.map_mut("ORIGINS").context("ORIGINS")?)?;
            for (i, o) in new.origins.iter().enumerate() {
                if old.origins.get(i) != Some(o) {
                    faults::charge("ORIGINS")?;
                    origins.set(i as u32, *o, 0)?;
                }
            }
        }
        // An index given to another app or rule than before starts from zero.
        zero_slots(
            ebpf,
            "APP_STATS",
            &new.reset_app_slots,
            2,
            Counters::default(),
        )?;
        zero_slots(ebpf, "RULE_HITS", &new.reset_rule_slots, 1, 0u64)?;
        // Origin tables before APPS: an app's new slice is complete before it
        // points at it; a kept slice is rewritten in place (offsets stay valid).
        {
            let mut maglev: Array<&mut MapData, MaglevEntry> =
                Array::try_from(ebpf.map_mut("MAGLEV").context("MAGLEV")?)?;
            for (first, table) in &new.maglev {
                let old_entries: BTreeMap<u32, MaglevEntry> = old
                    .maglev
                    .get(first)
                    .map(|t| maglev_entries(*first, t).collect())
                    .unwrap_or_default();
                for (i, entry) in maglev_entries(*first, table) {
                    if old_entries.get(&i) != Some(&entry) {
                        faults::charge("MAGLEV")?;
                        maglev.set(i, entry, 0)?;
                    }
                }
            }
        }
        {
            let mut apps: Array<&mut MapData, AppInfo> =
                Array::try_from(ebpf.map_mut("APPS").context("APPS")?)?;
            for (i, a) in new.apps.iter().enumerate() {
                if old.apps.get(i) != Some(a) {
                    faults::charge("APPS")?;
                    apps.set(i as u32, *a, 0)?;
                }
            }
        }
        // Hints are the union of both plans while both plans' entries may be there
        // (written first: a hint only ever lets a packet on to the real lookup).
        write_port_hints(ebpf, &port_hints(&[old]), &port_hints(&[old, new]))?;
        write_lookup_maps(ebpf, old, new, Phase::Upsert)?;
        // The inline edge list changes as one value: every reader sees either list.
        {
            let (new_v4, _) = split_edges(&new.edge_addrs);
            let mut list: Array<&mut MapData, EdgeV4List> =
                Array::try_from(ebpf.map_mut("EDGE_V4_LIST").context("EDGE_V4_LIST")?)?;
            faults::charge("EDGE_V4_LIST")?;
            list.set(0, edge_v4_list(&new_v4), 0)?;
        }
        // Removals last: nothing still configured disappears before its replacement.
        write_lookup_maps(ebpf, old, new, Phase::Remove)?;
        write_port_hints(ebpf, &port_hints(&[old, new]), &port_hints(&[new]))?;
        // Settings last: their new generation sends live UDP flows back through the
        // classifier, which must then see the new maps.
        {
            let mut settings: Array<&mut MapData, Settings> =
                Array::try_from(ebpf.map_mut("SETTINGS").context("SETTINGS")?)?;
            faults::charge("SETTINGS")?;
            settings.set(0, new.settings, 0)?;
        }
        Ok(())
    }

    /// Takes the route epoch out of the object, set to its first value, for the
    /// task that follows route changes (`route::follow_route_changes`).
    pub fn take_route_epoch(&mut self) -> anyhow::Result<RouteEpoch> {
        let map = self
            .ebpf
            .take_map("ROUTE_EPOCH")
            .context("ROUTE_EPOCH missing (or taken already)")?;
        let mut epoch = RouteEpoch {
            map: Array::try_from(map)?,
            value: 1,
        };
        epoch.bump()?;
        Ok(epoch)
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> anyhow::Result<DatapathCounters> {
        let empty = Plan::default();
        let plan = self.current.as_ref().unwrap_or(&empty);
        let drops_map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("DROPS").context("DROPS")?)?;
        let mut drops = [0u64; DropReason::COUNT];
        for (i, slot) in drops.iter_mut().enumerate() {
            *slot = drops_map.get(&(i as u32), 0)?.iter().sum();
        }
        let app_map: PerCpuArray<&MapData, Counters> =
            PerCpuArray::try_from(self.ebpf.map("APP_STATS").context("APP_STATS")?)?;
        let mut apps = BTreeMap::new();
        for (i, id) in plan.app_ids.iter().enumerate() {
            if id.is_empty() {
                continue;
            }
            let sum = |dir: u32| -> anyhow::Result<Counters> {
                let values = app_map.get(&(i as u32 * 2 + dir), 0)?;
                Ok(values.iter().fold(Counters::default(), |acc, c| Counters {
                    packets: acc.packets + c.packets,
                    bytes: acc.bytes + c.bytes,
                }))
            };
            apps.insert(
                id.clone(),
                AppCounters {
                    ingress: sum(DIR_INGRESS)?,
                    egress: sum(DIR_EGRESS)?,
                },
            );
        }
        let hits_map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("RULE_HITS").context("RULE_HITS")?)?;
        let mut rule_hits = BTreeMap::new();
        for (i, label) in plan.rule_labels.iter().enumerate() {
            if label.is_empty() {
                continue;
            }
            let hits: u64 = hits_map.get(&(i as u32), 0)?.iter().sum();
            *rule_hits.entry(label.clone()).or_insert(0) += hits;
        }
        let iface_map: PerCpuArray<&MapData, Counters> =
            PerCpuArray::try_from(self.ebpf.map("IFACE_STATS").context("IFACE_STATS")?)?;
        let mut interfaces = BTreeMap::new();
        for (name, (ifindex, _, _)) in &self.attached {
            if *ifindex >= MAX_IFINDEX {
                continue;
            }
            let values = iface_map.get(ifindex, 0)?;
            interfaces.insert(
                name.clone(),
                values.iter().fold(Counters::default(), |acc, c| Counters {
                    packets: acc.packets + c.packets,
                    bytes: acc.bytes + c.bytes,
                }),
            );
        }
        Ok(DatapathCounters {
            drops,
            apps,
            rule_hits,
            interfaces,
        })
    }
}

/// Zeroes `per_slot` consecutive entries per slot of a per-CPU array, on every CPU.
/// The `MAGLEV` values (index, four slots) of a table whose first slot is
/// `first` (a multiple of `MAGLEV_LANES`); the last value is padded with the
/// table's first slot.
fn maglev_entries(first: u32, table: &[u16]) -> impl Iterator<Item = (u32, MaglevEntry)> + '_ {
    let lanes = MAGLEV_LANES as usize;
    table.chunks(lanes).enumerate().map(move |(k, chunk)| {
        let mut entry = [table[0]; MAGLEV_LANES as usize];
        entry[..chunk.len()].copy_from_slice(chunk);
        (first / MAGLEV_LANES + k as u32, entry)
    })
}

fn zero_slots<V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    slots: &[u32],
    per_slot: u32,
    zero: V,
) -> anyhow::Result<()> {
    if slots.is_empty() {
        return Ok(());
    }
    let cpus = nr_cpus().map_err(|(_, e)| e)?;
    let mut map: PerCpuArray<&mut MapData, V> =
        PerCpuArray::try_from(ebpf.map_mut(name).with_context(|| name.to_string())?)?;
    for slot in slots {
        for k in 0..per_slot {
            let zeros = PerCpuValues::try_from(vec![zero; cpus])?;
            map.set(slot * per_slot + k, zeros, 0)
                .with_context(|| format!("zeroing {name}[{}]", slot * per_slot + k))?;
        }
    }
    Ok(())
}

/// One phase of the hash maps a packet's lookups go through. Upserts go from the
/// maps looked up last to the one looked up first (origin ports, ports, edge
/// addresses), removals the other way round, so a packet never finds an entry that
/// points at something not there yet or any more.
fn write_lookup_maps(ebpf: &mut Ebpf, old: &Plan, new: &Plan, phase: Phase) -> anyhow::Result<()> {
    let (old_v4, old_v6) = split_edges(&old.edge_addrs);
    let (new_v4, new_v6) = split_edges(&new.edge_addrs);
    let origin_ports = |ebpf: &mut Ebpf| {
        write_hash(
            ebpf,
            "ORIGIN_PORTS",
            &old.origin_ports,
            &new.origin_ports,
            |k| k.key(),
            |app| OriginPortTarget { app },
            phase,
        )
    };
    let ports = |ebpf: &mut Ebpf| {
        write_hash(
            ebpf,
            "PORTS",
            &old.ports,
            &new.ports,
            |k| k.key(),
            |app| PortTarget { app },
            phase,
        )
    };
    let edges = |ebpf: &mut Ebpf| {
        write_hash(
            ebpf,
            "EDGE_ADDRS",
            &old_v6,
            &new_v6,
            |a| a,
            |index| EdgeAddr { index },
            phase,
        )?;
        write_hash(
            ebpf,
            "EDGE_ADDRS_V4",
            &old_v4,
            &new_v4,
            |a| a,
            |index| EdgeAddr { index },
            phase,
        )
    };
    match phase {
        Phase::Upsert => {
            origin_ports(ebpf)?;
            ports(ebpf)?;
            edges(ebpf)
        }
        Phase::Remove => {
            edges(ebpf)?;
            ports(ebpf)?;
            origin_ports(ebpf)
        }
    }
}

/// Edge addresses split by family: IPv4 keyed by its 4 bytes read as a u32 (the
/// XDP program's `EDGE_ADDRS_V4` key), IPv6 by its 16 bytes.
fn split_edges(edges: &BTreeMap<[u8; 16], u32>) -> (BTreeMap<u32, u32>, BTreeMap<[u8; 16], u32>) {
    let mut v4 = BTreeMap::new();
    let mut v6 = BTreeMap::new();
    for (addr, index) in edges {
        match std::net::Ipv6Addr::from(*addr).to_ipv4_mapped() {
            Some(ip) => {
                v4.insert(u32::from_ne_bytes(ip.octets()), *index);
            }
            None => {
                v6.insert(*addr, *index);
            }
        }
    }
    (v4, v6)
}

/// The inline IPv4 edge list: the addresses themselves when few, else "use the hash".
fn edge_v4_list(v4: &BTreeMap<u32, u32>) -> EdgeV4List {
    let mut list = EdgeV4List::default();
    if v4.len() > EDGE_V4_INLINE {
        list.count = u32::MAX;
        return list;
    }
    for (i, (addr, index)) in v4.iter().enumerate() {
        list.addrs[i] = *addr;
        list.index[i] = *index;
    }
    list.count = v4.len() as u32;
    list
}

/// The `PORT_HINTS` bits the entries of `plans` need (their union).
fn port_hints(plans: &[&Plan]) -> BTreeMap<u32, u8> {
    let mut hints = BTreeMap::new();
    for plan in plans {
        // Ports of apps whose TCP connections may be spliced in XDP: only their
        // segments pay the `SPLICES` lookup.
        let splices = |app: u32| {
            plan.apps
                .get(app as usize)
                .is_some_and(|info| info.tcp_fastpath != 0)
        };
        for (k, app) in &plan.ports {
            let splice = if splices(*app) { HINT_SPLICE } else { 0 };
            *hints.entry(hint_index(k.proto, k.port)).or_insert(0) |= HINT_EDGE_PORT | splice;
        }
        for (k, app) in &plan.origin_ports {
            let splice = if splices(*app) { HINT_SPLICE } else { 0 };
            *hints.entry(hint_index(k.proto, k.port)).or_insert(0) |= HINT_ORIGIN_PORT | splice;
        }
    }
    hints
}

/// Writes the hint bytes that differ between `old` and `new` (absent = 0).
fn write_port_hints(
    ebpf: &mut Ebpf,
    old: &BTreeMap<u32, u8>,
    new: &BTreeMap<u32, u8>,
) -> anyhow::Result<()> {
    let mut map: Array<&mut MapData, u8> =
        Array::try_from(ebpf.map_mut("PORT_HINTS").context("PORT_HINTS")?)?;
    let indices: std::collections::BTreeSet<u32> = old.keys().chain(new.keys()).copied().collect();
    for i in indices {
        let (was, now) = (
            old.get(&i).copied().unwrap_or(0),
            new.get(&i).copied().unwrap_or(0),
        );
        if was != now {
            faults::charge("PORT_HINTS")?;
            map.set(i, now, 0).context("writing PORT_HINTS")?;
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Insert what is new or changed.
    Upsert,
    /// Remove what is gone.
    Remove,
}

/// Writes one phase of the difference between two plans' entries of a hash map.
/// A removal of a key that is not there (kernels answer ENOENT; aya says so for
/// hash maps).
fn is_not_found(err: &aya::maps::MapError) -> bool {
    match err {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn write_hash<PK: Ord + Copy, K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    old: &BTreeMap<PK, u32>,
    new: &BTreeMap<PK, u32>,
    key: impl Fn(PK) -> K,
    value: impl Fn(u32) -> V,
    phase: Phase,
) -> anyhow::Result<()> {
    let mut map: HashMap<&mut MapData, K, V> =
        HashMap::try_from(ebpf.map_mut(name).with_context(|| name.to_string())?)?;
    match phase {
        Phase::Upsert => {
            for (k, v) in new {
                if old.get(k) != Some(v) {
                    faults::charge(name)?;
                    map.insert(key(*k), value(*v), 0)
                        .with_context(|| format!("writing {name}"))?;
                }
            }
        }
        Phase::Remove => {
            for k in old.keys().filter(|k| !new.contains_key(*k)) {
                faults::charge(name)?;
                match map.remove(&key(*k)) {
                    // Never written (a rollback of a plan that failed half way).
                    Err(err) if !is_not_found(&err) => {
                        return Err(err).with_context(|| format!("removing from {name}"));
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

fn write_lpm<const N: usize>(
    ebpf: &mut Ebpf,
    name: &str,
    old: &BTreeMap<(u32, [u8; N]), RuleVerdict>,
    new: &BTreeMap<(u32, [u8; N]), RuleVerdict>,
) -> anyhow::Result<()>
where
    [u8; N]: aya::Pod,
{
    let mut trie: LpmTrie<&mut MapData, [u8; N], RuleVerdict> =
        LpmTrie::try_from(ebpf.map_mut(name).with_context(|| name.to_string())?)?;
    for ((prefix, net), verdict) in new {
        if old.get(&(*prefix, *net)) != Some(verdict) {
            faults::charge(name)?;
            trie.insert(&lpm_trie::Key::new(*prefix, *net), *verdict, 0)?;
        }
    }
    let keep: HashSet<&(u32, [u8; N])> = new.keys().collect();
    for (prefix, net) in old.keys().filter(|k| !keep.contains(k)) {
        faults::charge(name)?;
        match trie.remove(&lpm_trie::Key::new(*prefix, *net)) {
            Err(err) if !is_not_found(&err) => {
                return Err(err).with_context(|| format!("removing from {name}"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Counters summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatapathCounters {
    /// Indexed by `DropReason`.
    pub drops: [u64; DropReason::COUNT],
    /// By app id.
    pub apps: BTreeMap<String, AppCounters>,
    /// By access rule value.
    pub rule_hits: BTreeMap<String, u64>,
    /// By attached interface name.
    pub interfaces: BTreeMap<String, Counters>,
}

impl DatapathCounters {
    pub fn drop_count(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppCounters {
    pub ingress: Counters,
    pub egress: Counters,
}

/// The ifindex of `name` in the caller's network namespace.
pub fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c_name = std::ffi::CString::new(name).context("interface name has a NUL byte")?;
    // SAFETY: c_name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        bail!("no interface named {name}");
    }
    Ok(index)
}
