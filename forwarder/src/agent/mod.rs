//! The running agent: the state `forwarder run` serves from (config, datapath,
//! host changes, TCP proxy, event log, flow figures), owned by one thread that
//! takes commands (`task`); the UDP flow scanner (`flow_scan`); and the command
//! itself (`run`).

mod flow_scan;
pub mod notify;
mod origins;
mod run;
mod task;

pub use run::{RunOptions, parse_duration_arg, run_cli};
pub use task::{AgentHandle, Command};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use log::{info, warn};

use crate::config::{Config, IpFamily, Protocol, interface_addresses};
use crate::datapath::{Datapath, Plan};
use crate::host::HostState;
use crate::route::{Neighbour, default_gateways, route_to};
use crate::tcp::TcpProxy;
use crate::telemetry::analytics::{EventStats, FilteredSummary, RefusalSummary};
use crate::telemetry::events::EventLog;
use crate::telemetry::snapshot::StatsSnapshot;
use crate::udp_flows::{FlowTables, UdpFlowStats};

/// The loaded, attached datapath with the config it was built from.
pub struct Agent {
    config: Config,
    datapath: Datapath,
    /// What the agent changes on the host, journaled and put back on exit: the
    /// managed neighbour entries of UDP origins' next hops and of gateways towards
    /// clients (the XDP fast path needs their MACs), forwarding for the UDP fast
    /// path, SYN cookies and `somaxconn` for TCP listeners.
    host: HostState,
    /// The event log (`agent.event_log`), shared with the TCP proxy.
    events: EventLog,
    /// What the last UDP flow scan found (the scan itself runs on its own thread,
    /// see `flow_scan`).
    udp_flows: UdpFlowStats,
    /// TCP apps: one listener per app, the proxied connections (SPEC §4).
    tcp: TcpProxy,
    /// Connection counts and analytics from the events (an event log observer).
    event_stats: Arc<EventStats>,
    /// Firewall drops as rate-limited `clientFiltered` events.
    filtered: FilteredSummary,
    /// TCP refusals at capacity as rate-limited `clientFiltered` events.
    refused: RefusalSummary,
    /// Build, start time and reloads, for `stats` and `/metrics`.
    status: crate::telemetry::snapshot::AgentStatus,
    /// Origins out of selection (down, drained): the origin tables follow it.
    availability: crate::lb::Availability,
    /// The running health checks, their verdicts, and where results go.
    checks: crate::lb::health::Checks,
    verdicts: crate::lb::health::Verdicts,
    report: Option<crate::lb::health::Report>,
}

/// Seconds since the Unix epoch, now.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Agent {
    /// Loads the datapath, fills it from `config` and attaches it. On error, what
    /// was changed on the host is put back (`host` is dropped).
    pub fn start(config: Config, mut host: HostState) -> anyhow::Result<Agent> {
        let events = EventLog::open(config.agent.event_log.as_deref())?;
        let event_stats = Arc::new(EventStats::new(EventStats::window_from_env()?));
        let observer = event_stats.clone();
        events.observe(Arc::new(move |event| observer.record(event)));
        let availability = crate::lb::Availability::default();
        let (plan, wanted) = plan_for(&config, None, &availability)?;
        prepare_host(&mut host, &config, &wanted)?;
        let mut datapath = Datapath::load()?;
        datapath.apply(&plan).context("filling the datapath maps")?;
        // Listeners before XDP: a TCP app's port is never without its socket.
        let tcp = TcpProxy::start(&config, &mut datapath, events.clone())
            .context("starting the TCP proxy")?;
        tcp.set_selections(&config, &availability);
        for interface in &config.agent.interfaces {
            datapath.attach_xdp(interface, config.agent.xdp_mode)?;
        }
        info!(
            "serving {} apps on {} edge addresses",
            plan.apps.len(),
            plan.edge_addrs.len()
        );
        Ok(Agent {
            config,
            datapath,
            host,
            events,
            udp_flows: UdpFlowStats::default(),
            tcp,
            event_stats,
            filtered: FilteredSummary::default(),
            refused: RefusalSummary::default(),
            status: crate::telemetry::snapshot::AgentStatus {
                version: env!("CARGO_PKG_VERSION").to_string(),
                commit: crate::COMMIT.to_string(),
                started_at: unix_now(),
                reloads_applied: 0,
                reloads_rejected: 0,
                last_reload_successful: true,
                config_applied_at: unix_now(),
            },
            availability,
            checks: crate::lb::health::Checks::default(),
            verdicts: crate::lb::health::Verdicts::default(),
            report: None,
        })
    }

    /// Applies a new config as a difference; on error the running one stays.
    pub fn reload(&mut self, config: Config) -> anyhow::Result<()> {
        if config.agent.interfaces != self.config.agent.interfaces
            || config.agent.xdp_mode != self.config.agent.xdp_mode
        {
            return Err(anyhow!(
                "agent.interfaces and agent.xdp_mode cannot change on reload; restart the agent"
            ));
        }
        let availability = self.availability_for(&config);
        let (plan, wanted) = plan_for(&config, self.datapath.plan(), &availability)?;
        let removed =
            crate::reload::removed_app_indices(&self.datapath.app_indices(), &plan.app_indices());
        // A reload may add the first UDP app of a family, or the first TCP app.
        prepare_host(&mut self.host, &config, &wanted)?;
        self.datapath
            .apply(&plan)
            .context("updating the datapath maps")?;
        self.tcp
            .apply(&config, &mut self.datapath)
            .context("updating the TCP listeners")?;
        let ended = crate::reload::end_flows_of(
            &mut self.datapath,
            &removed,
            &self.config,
            &plan.origins,
            &self.events,
        )?;
        let blocked = self.tcp.end_blocked_splices(&config, &plan);
        for line in crate::reload::describe_changes(&self.config, &config) {
            info!("reload: {line}");
        }
        if ended > 0 {
            info!("reload: {ended} UDP flows of removed apps ended");
        }
        if blocked > 0 {
            info!(
                "reload: {blocked} spliced TCP connections of clients the access rules now block ended"
            );
        }
        for key in crate::reload::restart_only_changes(&self.config, &config) {
            warn!("reload: a change of {key} takes effect at the next start");
        }
        self.tcp.set_selections(&config, &availability);
        self.availability = availability;
        self.config = config;
        self.restart_health_checks();
        Ok(())
    }

    /// Counts a reload's outcome (for `forwarder_reloads_total` and friends).
    pub fn record_reload(&mut self, applied: bool) {
        if applied {
            self.status.reloads_applied += 1;
            self.status.config_applied_at = unix_now();
        } else {
            self.status.reloads_rejected += 1;
        }
        self.status.last_reload_successful = applied;
    }

    /// The route epoch, for the task that owns it from now on.
    pub fn take_route_epoch(&mut self) -> anyhow::Result<crate::datapath::RouteEpoch> {
        self.datapath.take_route_epoch()
    }

    /// Reads the UDP flow tables and what a scan needs to describe them (the
    /// first step of a scan, see `udp_flows`).
    pub fn read_flow_tables(&mut self) -> anyhow::Result<FlowTables> {
        // The counters before the tables: a flow admitted in between is then
        // live but not yet counted, which can only undercount evictions.
        let counters = self.datapath.flow_counters()?;
        let flows = self.datapath.udp_flows()?;
        let (removed, removed_new) = self.datapath.take_removed_flows();
        let proxies: BTreeMap<&str, &str> = self
            .config
            .apps
            .iter()
            .map(|a| (a.id.as_str(), a.proxy_protocol.as_str()))
            .collect();
        let (apps, origins) = match self.datapath.plan() {
            Some(plan) => (
                plan.app_ids
                    .iter()
                    .map(|id| {
                        let proxy = proxies.get(id.as_str()).copied().unwrap_or_default();
                        (id.clone(), proxy.to_string())
                    })
                    .collect(),
                plan.origins
                    .iter()
                    .map(|o| crate::udp_flows::ip_from16(o.addr))
                    .collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        let origin_labels = self.origin_labels();
        Ok(FlowTables {
            flows,
            counters,
            removed_new,
            removed,
            apps,
            origins,
            origin_labels,
            udp_apps: self
                .config
                .apps
                .iter()
                .filter(|a| a.protocol == Protocol::Udp)
                .map(|a| a.id.clone())
                .collect(),
            idle: self.config.agent.udp_idle_timeout,
            nat_pool: u64::from(self.config.agent.udp_nat_ports.len()),
        })
    }

    /// Ends the idle flows a scan found (their events are written by the scan).
    pub fn end_udp_flows(
        &mut self,
        flows: &[(forwarder_common::FlowKey, forwarder_common::FlowState)],
    ) {
        for (key, state) in flows {
            if let Err(err) = self.datapath.remove_udp_flow(key, state) {
                warn!("ending an idle UDP flow failed: {err:#}");
            }
        }
    }

    /// Keeps what the last scan found, for `snapshot`.
    pub fn set_udp_flow_stats(&mut self, stats: UdpFlowStats) {
        self.udp_flows = stats;
    }

    /// Emits a `clientFiltered` event for the firewall drops since the last call,
    /// and one per TCP app that refused connections at capacity since then.
    pub fn summarise_filtered(&mut self) -> anyhow::Result<()> {
        let counters = self.datapath.counters()?;
        let drops = counters.drop_count(forwarder_common::DropReason::Firewall);
        let now = std::time::SystemTime::now();
        if let Some(event) = self
            .filtered
            .tick(drops, &counters.rule_hits, &self.config, now)
        {
            self.events.emit(&event);
        }
        let refused: BTreeMap<String, u64> = self
            .tcp
            .stats()
            .into_iter()
            .map(|(id, s)| (id, s.rejected))
            .collect();
        for event in self.refused.tick(&refused, now) {
            self.events.emit(&event);
        }
        Ok(())
    }

    /// The event log, for components that emit events.
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    pub fn snapshot(&self) -> anyhow::Result<StatsSnapshot> {
        let counters = self.datapath.counters()?;
        let protocols: BTreeMap<String, String> = self
            .config
            .apps
            .iter()
            .map(|a| (a.id.clone(), a.protocol.as_str().to_string()))
            .collect();
        let mut snapshot = StatsSnapshot::from_datapath(&counters, &protocols);
        for (id, live) in &self.udp_flows.live {
            if let Some(app) = snapshot.apps.get_mut(id) {
                app.live = *live;
            }
        }
        snapshot.udp_flows = self.udp_flows.clone();
        snapshot.agent = self.status.clone();
        // TCP: XDP counts a TCP app's packets, the proxy its payload bytes and
        // connections.
        for (id, tcp) in self.tcp.stats() {
            if let Some(app) = snapshot.apps.get_mut(&id) {
                app.ingress_bytes = app.ingress_bytes.saturating_add(tcp.client_bytes);
                app.egress_bytes = app.egress_bytes.saturating_add(tcp.origin_bytes);
                app.live = tcp.live;
                app.refused = tcp.rejected;
            }
        }
        snapshot.connections = self.event_stats.totals();
        // The proxy times TCP connections itself, failed ones included.
        for (id, tcp) in self.tcp.stats() {
            let totals = snapshot.connections.entry(id).or_default();
            totals.durations = tcp.durations;
            totals.connect_times = Some(tcp.connect_times);
            totals.tls = tcp.tls;
        }
        snapshot.analytics = self.event_stats.analytics();
        snapshot.origins = self.origin_rows();
        snapshot.tcp_fastpath = self.tcp.fastpath_counts();
        Ok(snapshot)
    }

    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    /// The TCP proxy (counters, timeouts).
    pub fn tcp(&self) -> &TcpProxy {
        &self.tcp
    }

    /// Graceful stop of the TCP side: no new connections, open ones may finish
    /// within `within`, then the rest are closed.
    pub async fn drain_tcp(&mut self, within: Duration) {
        self.tcp.stop_accepting(&mut self.datapath);
        self.tcp.drain(within).await;
    }

    /// Detaches XDP from every interface (the sk_lookup link and maps go with the
    /// datapath when it is dropped), then puts back what was changed on the host.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.checks.stop();
        let detached = self.datapath.detach_all();
        self.host.restore();
        detached
    }
}

/// The plan for `config`, and the neighbours the UDP fast path sends to: the next
/// hops of its UDP apps' origins and the interfaces' default gateways (towards
/// clients beyond the local subnets).
fn plan_for(
    config: &Config,
    previous: Option<&Plan>,
    availability: &crate::lb::Availability,
) -> anyhow::Result<(Plan, Vec<Neighbour>)> {
    let host = interface_addresses().context("reading interface addresses")?;
    let edges = config
        .resolve_edge_addresses(&host)
        .map_err(|e| crate::config::ConfigRejected(e.to_string()))?;
    for addr in config.absent_edge_addresses(&host) {
        warn!(
            "edge address {addr} is on no interface of this host yet: UDP apps are served \
             on it now, TCP apps once it is added (e.g. a VRRP backup becoming master)"
        );
    }
    // Each origin's route is resolved once per config (it shells out to iproute2).
    let mut routes: BTreeMap<std::net::IpAddr, crate::route::OriginRoute> = BTreeMap::new();
    let mut resolve = |addr| -> anyhow::Result<crate::route::OriginRoute> {
        if let Some(route) = routes.get(&addr) {
            return Ok(route.clone());
        }
        let route = route_to(addr)?;
        routes.insert(addr, route.clone());
        Ok(route)
    };
    let plan = Plan::rebuild(previous, config, &edges, &mut resolve, availability)?;
    let mut wanted = Vec::new();
    let udp_apps: Vec<_> = config
        .apps
        .iter()
        .filter(|a| a.protocol == Protocol::Udp)
        .collect();
    for app in &udp_apps {
        for origin in &app.origins {
            wanted.push(resolve(origin.addr)?.neighbour());
        }
    }
    if !udp_apps.is_empty() {
        for interface in &config.agent.interfaces {
            wanted.extend(default_gateways(interface)?);
        }
    }
    let mut unique: Vec<Neighbour> = Vec::new();
    for n in wanted {
        if !unique.contains(&n) {
            unique.push(n);
        }
    }
    Ok((plan, unique))
}

/// Whether some UDP app's origins are of `family` (it then needs forwarding on).
fn udp_uses(config: &Config, family: IpFamily) -> bool {
    config
        .apps
        .iter()
        .any(|a| a.protocol == Protocol::Udp && a.family() == Some(family))
}

/// What `config` needs of the host, each change journaled first: the `wanted`
/// neighbours managed (those no longer wanted put back), forwarding for each family
/// of its UDP apps, SYN cookies and `somaxconn` when it has TCP apps.
fn prepare_host(host: &mut HostState, config: &Config, wanted: &[Neighbour]) -> anyhow::Result<()> {
    host.manage_neighbours(wanted)?;
    host.enable_forwarding(
        &config.agent.interfaces,
        udp_uses(config, IpFamily::V4),
        udp_uses(config, IpFamily::V6),
    )?;
    if config.apps.iter().any(|a| a.protocol == Protocol::Tcp) {
        host.prepare_tcp_listeners(crate::tcp::LISTEN_BACKLOG)?;
    }
    Ok(())
}

pub(crate) fn load_config(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| {
        crate::config::ConfigRejected(format!("invalid config {}:\n{e}", path.display())).into()
    })
}
