//! The fleet lab (docs/fleet.md, docs/lab.md "Fleet"): a client, a router running
//! BIRD, three edge hosts each with its own `forwarder run` (one config for all:
//! `examples/fleet/forwarder.toml`), BIRD and `ready-gate.sh`, and one origin host
//! behind them. Every edge announces the anycast edge address over eBGP while its
//! agent is ready; the router installs a multipath route over the edges that do.
//!
//! ```text
//!  client               router                     edge1..3                    origin
//!  ┌────────────┐ veth ┌──────────────────┐ veth ┌───────────────────────┐ veth ┌──────────────┐
//!  │ cr 10.9.0.2│──────│rc 10.9.0.1       │──────│fleet-up   10.10.i.2   │──────│ oi ─┐        │
//!  │  …10.9.0.7 │      │ri 10.10.i.1 (x3) │      │fleet-down 10.20.0.1i  │      │  br 10.20.0.2│
//!  └────────────┘      │BIRD, ECMP route  │      │lo 198.51.100.10/32    │      │     10.20.0.3│
//!                      └──────────────────┘      │agent, BIRD, ready-gate│      └──────────────┘
//!                                                └───────────────────────┘
//! ```
//!
//! Namespaces `fwd-<pid>-<n>-{client,router,edge1,edge2,edge3,origin}`, removed (with
//! every process inside) on drop, panics included, and by [`cleanup_stale`] once
//! their process is gone. The edges' interfaces are named alike (`fleet-up`,
//! `fleet-down`) so that the agents share one config file.
//!
//! [`cleanup_stale`]: super::cleanup_stale

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    LabNames, Netns, NsChild, XdpStub, add_netns, cleanup_stale, delete_netns, joined_errors,
    kill_ns_processes, prepare_netns, wire_like_offloads,
};
use crate::agent::{AgentOptions, AgentProcess};

/// The one agent config of every edge.
pub const AGENT_CONFIG: &str = include_str!("../../../examples/fleet/forwarder.toml");
const BIRD_EDGE: &str = include_str!("../../../examples/fleet/bird-edge.conf");
const BIRD_ROUTER: &str = include_str!("../../../examples/fleet/bird-router.conf");
const READY_GATE: &str = include_str!("../../../examples/fleet/ready-gate.sh");
const RESILIENT_ECMP: &str = include_str!("../../../examples/fleet/resilient-ecmp.sh");

/// Number of edge hosts.
pub const EDGES: usize = 3;
/// The anycast edge address (on `lo` of every edge; `edge_addresses` of the config).
pub const ANYCAST_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The UDP app's edge port (Simple Proxy Protocol towards the origins).
pub const UDP_PORT: u16 = 5000;
/// The TCP app's edge port (and its origin's port).
pub const TCP_PORT: u16 = 7000;
/// The UDP origins, both on the origin host's bridge (the config's `origin_direct`).
pub const ORIGINS_V4: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 20, 0, 2), Ipv4Addr::new(10, 20, 0, 3)];
/// The client's addresses (all on `cr`; the first is the primary).
pub const CLIENTS_V4: [Ipv4Addr; 6] = [
    Ipv4Addr::new(10, 9, 0, 2),
    Ipv4Addr::new(10, 9, 0, 3),
    Ipv4Addr::new(10, 9, 0, 4),
    Ipv4Addr::new(10, 9, 0, 5),
    Ipv4Addr::new(10, 9, 0, 6),
    Ipv4Addr::new(10, 9, 0, 7),
];
/// The router's address towards the client (the client's default gateway).
pub const ROUTER_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
/// The agents' metrics listener in every edge (the config's `metrics_listen`).
const METRICS: &str = "127.0.0.1:9477";
/// The edges' interface towards the router and towards the origin.
pub const UPLINK: &str = "fleet-up";
pub const DOWNLINK: &str = "fleet-down";
const ROUTER_AS: u32 = 65000;
const EDGE_AS: u32 = 65001;
/// Kernel table BIRD exports to when the router uses a resilient group.
const BIRD_TABLE: u32 = 100;
/// The resilient nexthop group's id; the edges' nexthops are ids 1..=EDGES.
const GROUP_ID: u32 = 100;
/// How long [`Fleet::new`] waits for every edge to be announced.
pub const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(30);

/// How the router spreads flows over the edges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterHashing {
    /// BIRD's multipath route in the main table (hash-threshold: when a next hop
    /// leaves, the hash space is cut anew and flows of the survivors move too).
    Multipath,
    /// BIRD decides membership (its route lives in table [`BIRD_TABLE`]);
    /// `resilient-ecmp.sh` keeps a resilient nexthop group of 64 buckets in step
    /// (only the leaving edge's buckets move).
    Resilient,
}

impl RouterHashing {
    pub fn as_str(self) -> &'static str {
        match self {
            RouterHashing::Multipath => "plain multipath",
            RouterHashing::Resilient => "resilient nexthop group",
        }
    }
}

/// Edge `i` (0-based): its address towards the router.
pub fn edge_uplink_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 10, edge_octet(i), 2)
}

/// Edge `i`: the router's address on that link.
pub fn router_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 10, edge_octet(i), 1)
}

/// Edge `i`: its address towards the origins (what the origins see as the source).
pub fn edge_downlink_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 20, 0, 10 + edge_octet(i))
}

/// Which edge has `addr` as its downlink address (origins learn the edge this way).
pub fn edge_of_downlink(addr: Ipv4Addr) -> Option<usize> {
    (0..EDGES).find(|&i| edge_downlink_v4(i) == addr)
}

fn edge_octet(i: usize) -> u8 {
    u8::try_from(i + 1).expect("a handful of edges")
}

/// The fleet lab; see the module docs. Dropping it stops everything and removes it.
#[derive(Debug)]
pub struct Fleet {
    id: String,
    hashing: RouterHashing,
    dir: PathBuf,
    client: Netns,
    router: Netns,
    edges: Vec<Netns>,
    origin: Netns,
    /// Namespaces created so far (for the clean-up of a half-built fleet).
    created: Vec<Netns>,
    /// Agents by edge; `None` once killed by [`Fleet::kill_agent`].
    agents: Vec<Option<AgentProcess>>,
    /// BIRDs, gates and the resilient-group script by name (`bird-edge1`,
    /// `edge1-gate`, …; killed on drop).
    daemons: Vec<(String, NsChild)>,
    stubs: Vec<XdpStub>,
}

impl Fleet {
    /// Builds the fleet, starts every BIRD, agent and gate, and waits (up to
    /// [`ANNOUNCE_TIMEOUT`]) until the router forwards to all edges.
    pub fn new(hashing: RouterHashing) -> Result<Fleet> {
        if let Err(e) = cleanup_stale() {
            log::warn!("fleet: removing stale namespaces: {e:#}");
        }
        let names = LabNames::next();
        let dir = std::env::temp_dir().join(format!("forwarder-{}", names.id));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut fleet = Fleet {
            id: names.id.clone(),
            hashing,
            dir,
            client: names.netns("client"),
            router: names.netns("router"),
            edges: (1..=EDGES)
                .map(|i| names.netns(&format!("edge{i}")))
                .collect(),
            origin: names.netns("origin"),
            created: Vec::new(),
            agents: Vec::new(),
            daemons: Vec::new(),
            stubs: Vec::new(),
        };
        // On error `fleet` is dropped here, which removes whatever was created.
        fleet
            .build(&names)
            .with_context(|| format!("building fleet {}", fleet.id))?;
        fleet.start_router()?;
        for i in 0..EDGES {
            fleet.start_edge(i)?;
        }
        fleet
            .wait_router_edges(ANNOUNCE_TIMEOUT, |edges| edges.len() == EDGES)
            .context("waiting for every edge to be announced")?;
        Ok(fleet)
    }

    fn build(&mut self, names: &LabNames) -> Result<()> {
        let all: Vec<Netns> = [&self.client, &self.router]
            .into_iter()
            .chain(&self.edges)
            .chain([&self.origin])
            .cloned()
            .collect();
        for ns in &all {
            add_netns(ns.name())?;
            self.created.push(ns.clone());
            let forwarding =
                ns.name() == self.router.name() || self.edges.iter().any(|e| e.name() == ns.name());
            prepare_netns(ns, forwarding)?;
        }
        // L4 hashing: flows of one client address spread over the edges.
        self.router
            .sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;

        let cr = names.ifname("cr")?;
        let rc = names.ifname("rc")?;
        let br = names.ifname("br")?;
        self.client.ip_batch(&[format!(
            "link add {cr} type veth peer name {rc} netns {}",
            self.router.name()
        )])?;
        let mut client = vec!["link set lo up".to_owned(), format!("link set {cr} up")];
        client.extend(
            CLIENTS_V4
                .iter()
                .map(|a| format!("addr add {a}/24 dev {cr}")),
        );
        client.push(format!(
            "route add default via {ROUTER_CLIENT_V4} dev {cr} src {}",
            CLIENTS_V4[0]
        ));
        self.client.ip_batch(&client)?;
        wire_like_offloads(&self.client, &cr)?;

        let mut router = vec![
            "link set lo up".to_owned(),
            format!("link set {rc} up"),
            format!("addr add {ROUTER_CLIENT_V4}/24 dev {rc}"),
        ];
        let mut origin = vec![
            "link set lo up".to_owned(),
            format!("link add {br} type bridge"),
            format!("link set {br} up"),
        ];
        origin.extend(
            ORIGINS_V4
                .iter()
                .map(|a| format!("addr add {a}/24 dev {br}")),
        );
        wire_like_offloads(&self.router, &rc)?;
        for (i, edge) in self.edges.iter().enumerate() {
            let ri = names.ifname(&format!("r{}", i + 1))?;
            let oi = names.ifname(&format!("o{}", i + 1))?;
            self.router.ip_batch(&[format!(
                "link add {ri} type veth peer name {UPLINK} netns {}",
                edge.name()
            )])?;
            self.origin.ip_batch(&[format!(
                "link add {oi} type veth peer name {DOWNLINK} netns {}",
                edge.name()
            )])?;
            router.push(format!("link set {ri} up"));
            router.push(format!("addr add {}/24 dev {ri}", router_v4(i)));
            if self.hashing == RouterHashing::Resilient {
                router.push(format!(
                    "nexthop add id {} via {} dev {ri}",
                    i + 1,
                    edge_uplink_v4(i)
                ));
            }
            origin.push(format!("link set {oi} master {br}"));
            origin.push(format!("link set {oi} up"));
            edge.ip_batch(&[
                "link set lo up".to_owned(),
                format!("addr add {ANYCAST_V4}/32 dev lo"),
                format!("link set {UPLINK} up"),
                format!("link set {DOWNLINK} up"),
                format!("addr add {}/24 dev {UPLINK}", edge_uplink_v4(i)),
                format!("addr add {}/24 dev {DOWNLINK}", edge_downlink_v4(i)),
                format!("route add default via {} dev {UPLINK}", router_v4(i)),
            ])?;
            for ifname in [UPLINK, DOWNLINK] {
                wire_like_offloads(edge, ifname)?;
            }
            wire_like_offloads(&self.router, &ri)?;
            wire_like_offloads(&self.origin, &oi)?;
            // The agent's XDP redirects out of fleet-up and fleet-down; veth delivers
            // such frames only to a peer with an XDP program (SPEC §8).
            self.stubs.push(self.router.attach_xdp_pass(&ri)?);
            self.stubs.push(self.origin.attach_xdp_pass(&oi)?);
        }
        self.router.ip_batch(&router)?;
        self.origin.ip_batch(&origin)?;
        Ok(())
    }

    fn start_router(&mut self) -> Result<()> {
        let neighbors: String = (0..EDGES)
            .map(|i| {
                format!(
                    "protocol bgp edge{} from edge {{ neighbor {} as {EDGE_AS}; }}\n",
                    i + 1,
                    edge_uplink_v4(i)
                )
            })
            .collect();
        let table = match self.hashing {
            RouterHashing::Multipath => 254,
            RouterHashing::Resilient => BIRD_TABLE,
        };
        let conf = fill(
            BIRD_ROUTER,
            &[
                ("ROUTER", ROUTER_CLIENT_V4.to_string()),
                ("ROUTER_AS", ROUTER_AS.to_string()),
                ("KERNEL_TABLE", table.to_string()),
                ("NEIGHBORS", neighbors),
            ],
        )?;
        let router = self.router.clone();
        self.start_bird(&router, "router", &conf)?;
        if self.hashing == RouterHashing::Resilient {
            let script = self.write("resilient-ecmp.sh", RESILIENT_ECMP)?;
            let prefix = format!("{ANYCAST_V4}/32");
            let (table, group) = (BIRD_TABLE.to_string(), GROUP_ID.to_string());
            self.start_daemon(
                &router,
                "resilient-ecmp",
                "sh",
                &[path_str(&script)?, &prefix, &table, &group],
            )?;
        }
        Ok(())
    }

    /// Starts edge `i`: BIRD (announcement disabled), the agent, the gate.
    fn start_edge(&mut self, i: usize) -> Result<()> {
        let edge = self.edges[i].clone();
        let name = format!("edge{}", i + 1);
        let conf = fill(
            BIRD_EDGE,
            &[
                ("LOCAL", edge_uplink_v4(i).to_string()),
                ("ROUTER", router_v4(i).to_string()),
                ("ANYCAST", ANYCAST_V4.to_string()),
                ("EDGE_AS", EDGE_AS.to_string()),
                ("ROUTER_AS", ROUTER_AS.to_string()),
            ],
        )?;
        let socket = self.start_bird(&edge, &name, &conf)?;
        let agent = AgentProcess::start_in(&edge, AGENT_CONFIG, &AgentOptions::default())
            .with_context(|| format!("starting the agent of {name}"))?;
        if self.agents.len() <= i {
            self.agents.resize_with(i + 1, || None);
        }
        self.agents[i] = Some(agent);
        let gate = self.write("ready-gate.sh", READY_GATE)?;
        self.start_daemon(
            &edge,
            &format!("{name}-gate"),
            "sh",
            &[
                path_str(&gate)?,
                &format!("http://{METRICS}/ready"),
                path_str(&socket)?,
                "anycast",
            ],
        )?;
        Ok(())
    }

    /// Writes `conf`, starts `bird -f` in `ns`, waits until `birdc` answers; returns
    /// the control socket.
    fn start_bird(&mut self, ns: &Netns, name: &str, conf: &str) -> Result<PathBuf> {
        let conf_path = self.write(&format!("bird-{name}.conf"), conf)?;
        let socket = self.dir.join(format!("bird-{name}.ctl"));
        let pid = self.dir.join(format!("bird-{name}.pid"));
        self.start_daemon(
            ns,
            &format!("bird-{name}"),
            "bird",
            &[
                "-f",
                "-c",
                path_str(&conf_path)?,
                "-s",
                path_str(&socket)?,
                "-P",
                path_str(&pid)?,
            ],
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while ns
            .run("birdc", &["-s", path_str(&socket)?, "show", "status"])
            .is_err()
        {
            if Instant::now() >= deadline {
                bail!(
                    "BIRD in {} did not answer on {} within 10 s\n{}",
                    ns.name(),
                    socket.display(),
                    self.log(&format!("bird-{name}"))
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(socket)
    }

    /// Spawns `program args` in `ns` with stdout and stderr in `<dir>/<name>.log`.
    fn start_daemon(&mut self, ns: &Netns, name: &str, program: &str, args: &[&str]) -> Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))
            .with_context(|| format!("creating the log of {name}"))?;
        let mut cmd = ns.cmd(program, args);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = ns
            .spawn(cmd)
            .with_context(|| format!("starting {name} in {}", ns.name()))?;
        self.daemons.push((name.to_owned(), child));
        Ok(())
    }

    fn write(&self, file: &str, contents: &str) -> Result<PathBuf> {
        let path = self.dir.join(file);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// What the daemon `name` (`bird-router`, `edge1-gate`, …) logged so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Every daemon's log and the router's routes, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut names = vec!["bird-router".to_owned(), "resilient-ecmp".to_owned()];
        for i in 1..=EDGES {
            names.push(format!("bird-edge{i}"));
            names.push(format!("edge{i}-gate"));
        }
        for name in names {
            let log = self.log(&name);
            if !log.is_empty() {
                out.push_str(&format!("--- {name} ---\n{log}"));
            }
        }
        let routes = self.router.ip(&["route", "show", "table", "all"]);
        out.push_str(&format!("--- router routes ---\n{routes:?}\n"));
        out
    }

    /// The edges (0-based) the router forwards the anycast address to now: the
    /// gateways of its multipath route, or the members of the resilient group.
    pub fn router_edges(&self) -> Result<Vec<usize>> {
        let prefix = format!("{ANYCAST_V4}/32");
        let route = self.router.ip(&["-o", "route", "show", "exact", &prefix])?;
        let mut edges = Vec::new();
        if route.contains("nhid") && self.hashing == RouterHashing::Resilient {
            let group = self
                .router
                .ip(&["-o", "nexthop", "show", "id", &GROUP_ID.to_string()])?;
            for id in group_members(&group) {
                if (1..=EDGES).contains(&id) {
                    edges.push(id - 1);
                }
            }
        } else {
            for word in route.split_whitespace().collect::<Vec<_>>().windows(2) {
                if word[0] == "via"
                    && let Ok(gw) = word[1].parse::<Ipv4Addr>()
                    && let Some(i) = (0..EDGES).find(|&i| edge_uplink_v4(i) == gw)
                {
                    edges.push(i);
                }
            }
        }
        edges.sort_unstable();
        edges.dedup();
        Ok(edges)
    }

    /// Polls [`Fleet::router_edges`] every 5 ms until `done` holds, for at most
    /// `timeout`; returns the edges then.
    pub fn wait_router_edges(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[usize]) -> bool,
    ) -> Result<Vec<usize>> {
        let deadline = Instant::now() + timeout;
        loop {
            let edges = self.router_edges()?;
            if done(&edges) {
                return Ok(edges);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the router forwards to edges {edges:?} after {timeout:?}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `kill -9` of edge `i`'s agent (what a crash does); BIRD and the gate stay.
    pub fn kill_agent(&mut self, i: usize) -> Result<()> {
        let mut agent = self
            .agents
            .get_mut(i)
            .and_then(Option::take)
            .with_context(|| format!("edge {} has no running agent", i + 1))?;
        agent.kill().map(drop)
    }

    /// A host that hangs: `kill -9` of edge `i`'s agent and SIGSTOP to its BIRD and
    /// gate, so that nothing withdraws the route; only the router's BFD (3 x 100 ms)
    /// or the BGP hold timer (3 s) notices.
    pub fn hang_edge(&mut self, i: usize) -> Result<()> {
        let name = format!("edge{}", i + 1);
        for daemon in [format!("bird-{name}"), format!("{name}-gate")] {
            let (_, child) = self
                .daemons
                .iter()
                .find(|(n, _)| *n == daemon)
                .with_context(|| format!("no daemon {daemon}"))?;
            child.signal(libc::SIGSTOP);
        }
        self.kill_agent(i)
    }

    /// The agent of edge `i`, unless killed.
    pub fn agent(&self, i: usize) -> Option<&AgentProcess> {
        self.agents.get(i).and_then(Option::as_ref)
    }

    pub fn hashing(&self) -> RouterHashing {
        self.hashing
    }

    /// `fwd-<pid>-<n>`.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn client(&self) -> &Netns {
        &self.client
    }

    pub fn router(&self) -> &Netns {
        &self.router
    }

    /// Edge `i` (0-based).
    pub fn edge(&self, i: usize) -> &Netns {
        &self.edges[i]
    }

    pub fn origin(&self) -> &Netns {
        &self.origin
    }

    /// The anycast address and the UDP app's port.
    pub fn udp_service(&self) -> SocketAddr {
        SocketAddr::new(ANYCAST_V4.into(), UDP_PORT)
    }

    /// The anycast address and the TCP app's port.
    pub fn tcp_service(&self) -> SocketAddr {
        SocketAddr::new(ANYCAST_V4.into(), TCP_PORT)
    }

    /// Tears the fleet down now and reports errors (dropping does the same, logging
    /// errors to stderr).
    pub fn close(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        // Agents first (SIGTERM, so each detaches cleanly), then the daemons.
        self.agents.clear();
        self.daemons.clear();
        self.stubs.clear();
        let created = std::mem::take(&mut self.created);
        let mut errors = Vec::new();
        for ns in &created {
            ns.kill_children();
            if let Err(e) = kill_ns_processes(ns.name()) {
                errors.push(e);
            }
        }
        for ns in &created {
            if let Err(e) = delete_netns(ns.name()) {
                errors.push(e);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        joined_errors(errors).with_context(|| format!("tearing down fleet {}", self.id))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("fleet {}:\n{}", self.id, self.logs());
        }
        if let Err(e) = self.teardown() {
            eprintln!("fleet: {e:#}");
        }
    }
}

/// Whether `role` is a namespace suffix of a fleet: `router` or `edge<N>`.
pub(super) fn is_fleet_role(role: &str) -> bool {
    role == "router"
        || role
            .strip_prefix("edge")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Members of `id 100 group 1/2/3 type resilient …` (`ip -o nexthop show id 100`).
fn group_members(line: &str) -> Vec<usize> {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "group")
        .map(|w| {
            w[1].split('/')
                // A member may carry a weight: `1,2`.
                .filter_map(|m| m.split(',').next()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Replaces every `{{NAME}}` of `template`; an unknown or missing placeholder is an
/// error (a config with a hole would start a daemon that does something else).
fn fill(template: &str, values: &[(&str, String)]) -> Result<String> {
    let mut out = template.to_owned();
    for (name, value) in values {
        let key = format!("{{{{{name}}}}}");
        if !out.contains(&key) {
            bail!("the template has no {key}");
        }
        out = out.replace(&key, value);
    }
    if let Some(at) = out.find("{{") {
        let rest: String = out[at..].chars().take(30).collect();
        bail!("unfilled placeholder at {rest:?}");
    }
    Ok(out)
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_members() {
        assert!(is_fleet_role("router"));
        assert!(is_fleet_role("edge1"));
        assert!(is_fleet_role("edge12"));
        assert!(!is_fleet_role("edge"));
        assert!(!is_fleet_role("edgex"));
        assert_eq!(
            group_members("id 100 group 1/2/3 type resilient buckets 64 idle_timer 120"),
            vec![1, 2, 3]
        );
        assert_eq!(
            group_members("id 100 group 1,2/3 type resilient"),
            vec![1, 3]
        );
        assert_eq!(
            group_members("id 1 via 10.10.1.2 dev r1"),
            Vec::<usize>::new()
        );
    }

    #[test]
    fn templates_fill_completely() {
        assert_eq!(
            fill("a {{X}} b {{X}}", &[("X", "1".into())]).unwrap(),
            "a 1 b 1"
        );
        assert!(fill("a {{X}} {{Y}}", &[("X", "1".into())]).is_err());
        assert!(fill("a", &[("X", "1".into())]).is_err());
        for (template, keys) in [
            (
                BIRD_EDGE,
                &["LOCAL", "ROUTER", "ANYCAST", "EDGE_AS", "ROUTER_AS"][..],
            ),
            (
                BIRD_ROUTER,
                &["ROUTER", "ROUTER_AS", "KERNEL_TABLE", "NEIGHBORS"][..],
            ),
        ] {
            let values: Vec<(&str, String)> = keys.iter().map(|k| (*k, "1".into())).collect();
            fill(template, &values).unwrap();
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(edge_uplink_v4(0), Ipv4Addr::new(10, 10, 1, 2));
        assert_eq!(router_v4(2), Ipv4Addr::new(10, 10, 3, 1));
        assert_eq!(edge_of_downlink(Ipv4Addr::new(10, 20, 0, 12)), Some(1));
        assert_eq!(edge_of_downlink(ORIGINS_V4[0]), None);
    }
}
