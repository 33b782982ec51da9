//! The network-namespace lab: three namespaces `client` ↔ `edge` ↔ `origin` joined by
//! veth pairs, with fixed addresses, unique names (tests run in parallel) and cleanup
//! on drop, panics included. See `docs/lab.md` for the layout and the reasons behind
//! every sysctl and offload setting.
//!
//! ```text
//!  client ns                edge ns                         origin ns
//!  ┌───────────────┐        ┌──────────────────────────┐        ┌───────────────┐
//!  │ cl 10.0.1.2   │ ─veth─ │ ec 10.0.1.1  eo 10.0.2.1 │ ─veth─ │ oe 10.0.2.2   │
//!  │    fd00:1::2  │        │    fd00:1::1    fd00:2::1│        │    fd00:2::2  │
//!  └───────────────┘        └──────────────────────────┘        └───────────────┘
//! ```
//!
//! With [`Links::NicLike`] the client and the origin each get a second veth pair
//! joined to `cl` / `oe` by XDP redirects, so that the edge's XDP receives XDP
//! frames as from a NIC (docs/lab.md, "NIC-like links").

mod child;
pub mod fleet;
mod netns;
mod xdp;

use std::{
    fs::{File, OpenOptions},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use anyhow::{Context as _, Result, bail};

pub use child::{NsChild, OutputOk};
pub use fleet::{Fleet, RouterHashing};
pub use netns::{NETNS_RUN_DIR, Netns, NsTask};
pub use xdp::{XDP_PASS_PROGRAM, XdpStub};

/// Client address (on `cl`).
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
/// Edge address on the client side (on `ec`); the client's default gateway.
pub const EDGE_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
/// Edge address on the origin side (on `eo`); the origin's default gateway.
pub const EDGE_ORIGIN_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// Origin address (on `oe`).
pub const ORIGIN_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// Client IPv6 address (on `cl`).
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);
/// Edge IPv6 address on the client side (on `ec`); the client's default gateway.
pub const EDGE_CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
/// Edge IPv6 address on the origin side (on `eo`); the origin's default gateway.
pub const EDGE_ORIGIN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1);
/// Origin IPv6 address (on `oe`).
pub const ORIGIN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 2);
/// The client ↔ edge IPv4 subnet (`/PREFIX_V4`).
/// Every address of the edge: both veths, both families.
pub const EDGE_ADDRESSES: [IpAddr; 4] = [
    IpAddr::V4(EDGE_CLIENT_V4),
    IpAddr::V4(EDGE_ORIGIN_V4),
    IpAddr::V6(EDGE_CLIENT_V6),
    IpAddr::V6(EDGE_ORIGIN_V6),
];

pub const CLIENT_NET_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 0);
/// The edge ↔ origin IPv4 subnet (`/PREFIX_V4`).
pub const ORIGIN_NET_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 0);
/// The client ↔ edge IPv6 subnet (`/PREFIX_V6`).
pub const CLIENT_NET_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0);
/// The edge ↔ origin IPv6 subnet (`/PREFIX_V6`).
pub const ORIGIN_NET_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0);
/// Prefix length of the lab's IPv4 subnets.
pub const PREFIX_V4: u8 = 24;
/// Prefix length of the lab's IPv6 subnets.
pub const PREFIX_V6: u8 = 64;

/// Namespace name prefix; `cleanup_stale` only ever touches `fwd-<pid>-<n>-<role>`.
const NS_PREFIX: &str = "fwd";
/// Linux `IFNAMSIZ - 1`.
const MAX_IFNAME: usize = 15;
/// Serialises `ip netns add` across threads and processes (see `NetnsAddLock`).
const NETNS_ADD_LOCK: &str = "/run/fwd-lab-netns.lock";

/// Per-process lab counter: the only global state of the lab.
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// The three hosts of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Client,
    Edge,
    Origin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Client, Role::Edge, Role::Origin];

    /// `client`, `edge` or `origin` (the namespace name suffix).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Edge => "edge",
            Role::Origin => "origin",
        }
    }
}

/// Interface names of the lab (unique per lab: `f<pid36>-<n36>-<suffix>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ifaces {
    /// `…-cl`, in `client`, peer of `edge_client`.
    pub client: String,
    /// `…-ec`, in `edge`, facing the client.
    pub edge_client: String,
    /// `…-eo`, in `edge`, facing the origin.
    pub edge_origin: String,
    /// `…-oe`, in `origin`, peer of `edge_origin`.
    pub origin: String,
    /// The interface the client's stack uses, with its addresses and routes: `cl`
    /// on direct links, `…-cw` on NIC-like ones (see [`Links`]).
    pub client_host: String,
    /// The origin's: `oe`, or `…-ow`.
    pub origin_host: String,
}

/// How the client and origin hosts send (SPEC §8): both kinds exist in production
/// and the UDP fast path must handle both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peers {
    /// Hosts across a real link: tx checksum offload off on `cl` and `oe`, so every
    /// frame carries a full checksum.
    WireLike,
    /// Containers on the forwarder's own host: `cl` and `oe` keep the veth's
    /// default offloads, so UDP frames leave them `CHECKSUM_PARTIAL` (the checksum
    /// field holds only the pseudo-header sum).
    SameHost,
}

impl Peers {
    pub const BOTH: [Peers; 2] = [Peers::WireLike, Peers::SameHost];
}

/// How the edge's veths meet the client and the origin (docs/lab.md, "NIC-like
/// links").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// `cl` ↔ `ec` and `eo` ↔ `oe`, the hosts' stacks on `cl` and `oe`. Frames a
    /// host's stack sends reach the edge's XDP as that stack's skbs, which veth
    /// copies into a page of its own first (a TCP sender's are clones).
    Direct,
    /// A second veth pair inside the client and the origin namespaces, joined to
    /// the first by XDP redirects both ways: the host's stack sends on `cw` (`ow`),
    /// `wc` (`wo`) redirects to `cl` (`oe`), and the edge's XDP receives XDP frames,
    /// as from a NIC's driver, without veth's copy. The copy is paid on the
    /// generator side instead. For wire-like peers only: same-host peers are
    /// containers on a veth, where the copy is real.
    NicLike,
}

/// A lab: namespaces `fwd-<pid>-<n>-{client,edge,origin}` joined by two veth pairs.
/// Dropping it (also during a panic) detaches the stubs, kills every process left
/// in its namespaces, deletes the veths and the namespaces.
#[derive(Debug)]
pub struct Lab {
    id: String,
    client: Netns,
    edge: Netns,
    origin: Netns,
    ifaces: Ifaces,
    /// Namespaces `ip netns add` has created so far (for cleanup of a half-built lab).
    created: Vec<Role>,
    stubs: Mutex<Vec<XdpStub>>,
    /// The redirects and stubs of NIC-like links: kept for the lab's life.
    wiring: Vec<XdpStub>,
    /// Its names (the interfaces of NIC-like links are named from them).
    names: LabNames,
    peers: Peers,
    links: Links,
}

impl Lab {
    /// Builds a lab with wire-like peers; see the module docs and `docs/lab.md`
    /// for what it sets up.
    pub fn new() -> Result<Lab> {
        Lab::with_peers(Peers::WireLike)
    }

    /// Builds a lab whose client and origin are `peers`.
    pub fn with_peers(peers: Peers) -> Result<Lab> {
        Lab::with_links(peers, Links::Direct)
    }

    /// Builds a lab whose client and origin are `peers`, joined to the edge by
    /// `links` (NIC-like links need wire-like peers).
    pub fn with_links(peers: Peers, links: Links) -> Result<Lab> {
        if peers == Peers::SameHost && links == Links::NicLike {
            bail!("same-host peers are on a veth: NIC-like links are for wire-like peers");
        }
        if let Err(e) = cleanup_stale() {
            log::warn!("lab: removing stale namespaces: {e:#}");
        }
        let names = LabNames::next();
        let id = names.id.clone();
        let ifname = |suffix: &str| names.ifname(suffix);
        let (client_host, origin_host) = match links {
            Links::Direct => (ifname("cl")?, ifname("oe")?),
            Links::NicLike => (ifname("cw")?, ifname("ow")?),
        };
        let ifaces = Ifaces {
            client: ifname("cl")?,
            edge_client: ifname("ec")?,
            edge_origin: ifname("eo")?,
            origin: ifname("oe")?,
            client_host,
            origin_host,
        };
        let ns = |role: Role| names.netns(role.as_str());
        let mut lab = Lab {
            client: ns(Role::Client),
            edge: ns(Role::Edge),
            origin: ns(Role::Origin),
            id,
            ifaces,
            created: Vec::new(),
            stubs: Mutex::new(Vec::new()),
            wiring: Vec::new(),
            names: names.clone(),
            peers,
            links,
        };
        // On error `lab` is dropped here, which removes whatever was created.
        lab.build()
            .with_context(|| format!("building lab {}", lab.id))?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        for role in Role::ALL {
            add_netns(self.netns(role).name())?;
            self.created.push(role);
        }

        // Sysctls before the veths exist, so the interfaces inherit `default`.
        for role in Role::ALL {
            prepare_netns(self.netns(role), role == Role::Edge)?;
        }

        let Ifaces {
            client: cl,
            edge_client: ec,
            edge_origin: eo,
            origin: oe,
            client_host: ch,
            origin_host: oh,
        } = self.ifaces.clone();
        // Both ends are created directly inside the lab namespaces: nothing ever
        // appears in the host namespace.
        self.edge.ip_batch(&[
            format!(
                "link add {ec} type veth peer name {cl} netns {}",
                self.client.name()
            ),
            format!(
                "link add {eo} type veth peer name {oe} netns {}",
                self.origin.name()
            ),
        ])?;

        for (role, ifname) in [
            (Role::Client, &cl),
            (Role::Edge, &ec),
            (Role::Edge, &eo),
            (Role::Origin, &oe),
        ] {
            let ns = self.netns(role);
            // Per-interface copies of the `all`-level switches, for clarity in
            // `sysctl -a` output (the kernel ORs/ANDs them with `all` anyway).
            ns.sysctl(&format!("net.ipv6.conf.{ifname}.accept_dad"), "0")?;
            ns.sysctl(&format!("net.ipv4.conf.{ifname}.rp_filter"), "0")?;
            // Same-host peers keep the veth defaults (partial checksums out).
            if self.peers == Peers::SameHost && role != Role::Edge {
                continue;
            }
            wire_like_offloads(ns, ifname)?;
        }
        if self.links == Links::NicLike {
            self.wire(Role::Client, &cl)?;
            self.wire(Role::Origin, &oe)?;
        }

        self.client.ip_batch(&[
            "link set lo up".to_owned(),
            format!("link set {cl} up"),
            format!("addr add {CLIENT_V4}/{PREFIX_V4} dev {ch}"),
            format!("addr add {CLIENT_V6}/{PREFIX_V6} dev {ch} nodad"),
            format!("route add default via {EDGE_CLIENT_V4} dev {ch} src {CLIENT_V4}"),
            format!("route add default via {EDGE_CLIENT_V6} dev {ch} src {CLIENT_V6}"),
        ])?;
        self.edge.ip_batch(&[
            "link set lo up".to_owned(),
            format!("link set {ec} up"),
            format!("link set {eo} up"),
            format!("addr add {EDGE_CLIENT_V4}/{PREFIX_V4} dev {ec}"),
            format!("addr add {EDGE_CLIENT_V6}/{PREFIX_V6} dev {ec} nodad"),
            format!("addr add {EDGE_ORIGIN_V4}/{PREFIX_V4} dev {eo}"),
            format!("addr add {EDGE_ORIGIN_V6}/{PREFIX_V6} dev {eo} nodad"),
        ])?;
        self.origin.ip_batch(&[
            "link set lo up".to_owned(),
            format!("link set {oe} up"),
            format!("addr add {ORIGIN_V4}/{PREFIX_V4} dev {oh}"),
            format!("addr add {ORIGIN_V6}/{PREFIX_V6} dev {oh} nodad"),
            format!("route add default via {EDGE_ORIGIN_V4} dev {oh} src {ORIGIN_V4}"),
            format!("route add default via {EDGE_ORIGIN_V6} dev {oh} src {ORIGIN_V6}"),
        ])?;
        Ok(())
    }

    /// The NIC-like link's second pair in `role`'s namespace (see [`Links`]): the
    /// host's end (`cw`/`ow`: wire-like offloads, an XDP_PASS stub so that it takes
    /// redirected frames) and the wire's end (`wc`/`wo`), redirecting to `edge_side`
    /// (`cl`/`oe`), which redirects back to it.
    fn wire(&mut self, role: Role, edge_side: &str) -> Result<()> {
        let (host, wire) = match role {
            Role::Client => (self.ifaces.client_host.clone(), self.names.ifname("wc")?),
            Role::Origin => (self.ifaces.origin_host.clone(), self.names.ifname("wo")?),
            Role::Edge => bail!("the edge has no wire"),
        };
        let ns = self.netns(role).clone();
        ns.ip_batch(&[
            format!("link add {host} type veth peer name {wire}"),
            format!("link set {wire} up"),
            format!("link set {host} up"),
        ])?;
        for ifname in [&host, &wire] {
            ns.sysctl(&format!("net.ipv6.conf.{ifname}.accept_dad"), "0")?;
            ns.sysctl(&format!("net.ipv4.conf.{ifname}.rp_filter"), "0")?;
        }
        wire_like_offloads(&ns, &host)?;
        self.wiring.push(ns.attach_xdp_pass(&host)?);
        self.wiring.push(ns.attach_xdp_redirect(&wire, edge_side)?);
        self.wiring.push(ns.attach_xdp_redirect(edge_side, &wire)?);
        Ok(())
    }

    /// How the edge meets the client and the origin.
    pub fn links(&self) -> Links {
        self.links
    }

    /// Every interface of the client and the origin namespaces, with its
    /// namespace: `cl` and `oe`, and on NIC-like links `wc`, `cw`, `wo` and `ow`
    /// (e.g. to pin all their NAPI threads to the generator CPU).
    pub fn generator_ifaces(&self) -> Vec<(&Netns, String)> {
        let mut all = vec![
            (&self.client, self.ifaces.client.clone()),
            (&self.origin, self.ifaces.origin.clone()),
        ];
        if self.links == Links::NicLike {
            let tag = &self.names.tag;
            all.extend([
                (&self.client, format!("{tag}-wc")),
                (&self.client, self.ifaces.client_host.clone()),
                (&self.origin, format!("{tag}-wo")),
                (&self.origin, self.ifaces.origin_host.clone()),
            ]);
        }
        all
    }

    /// What kind of hosts the client and origin are.
    pub fn peers(&self) -> Peers {
        self.peers
    }

    /// UDP datagrams the client and the origin dropped for a bad checksum
    /// (`UdpInCsumErrors` + `Udp6InCsumErrors` of each namespace).
    pub fn udp_checksum_errors(&self) -> Result<u64> {
        let mut total = 0;
        for role in [Role::Client, Role::Origin] {
            let out = self.netns(role).run("nstat", &["-asz", "-j"])?;
            let json: serde_json::Value =
                serde_json::from_str(&out).context("parsing `nstat -j`")?;
            for key in ["UdpInCsumErrors", "Udp6InCsumErrors"] {
                total += json
                    .pointer(&format!("/kernel/{key}"))
                    .and_then(|v| v.as_u64())
                    .with_context(|| format!("{key} missing from nstat"))?;
            }
        }
        Ok(total)
    }

    /// `fwd-<pid>-<n>`: the namespace names are `<id>-client`, `<id>-edge`, `<id>-origin`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The client namespace.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The edge namespace (where the forwarder runs).
    pub fn edge(&self) -> &Netns {
        &self.edge
    }

    /// The origin namespace.
    pub fn origin(&self) -> &Netns {
        &self.origin
    }

    /// The namespace of `role`.
    pub fn netns(&self, role: Role) -> &Netns {
        match role {
            Role::Client => &self.client,
            Role::Edge => &self.edge,
            Role::Origin => &self.origin,
        }
    }

    /// The interface names: the four veth ends around the edge, and the hosts'
    /// own interfaces (the same as `cl` and `oe` on direct links).
    pub fn ifaces(&self) -> &Ifaces {
        &self.ifaces
    }

    /// The edge's interfaces: `[client-facing (ec), origin-facing (eo)]`.
    pub fn edge_ifaces(&self) -> [&str; 2] {
        [&self.ifaces.edge_client, &self.ifaces.edge_origin]
    }

    /// Attaches the XDP_PASS stub (driver mode) on the peers of the edge's interfaces:
    /// `cl` in `client` and `oe` in `origin`. A native XDP_REDIRECT/XDP_TX out of `ec`
    /// lands on `cl`, out of `eo` on `oe`; veth delivers such frames only when the
    /// receiving peer has an XDP program. Kept until the lab is dropped or
    /// [`Lab::detach_pass_stubs`].
    /// On NIC-like links `cl` and `oe` already run the wire's redirect, which
    /// serves the same purpose: nothing is attached.
    pub fn attach_pass_stubs(&self) -> Result<()> {
        if self.links == Links::NicLike {
            return Ok(());
        }
        let client = self.client.attach_xdp_pass(&self.ifaces.client)?;
        let origin = self.origin.attach_xdp_pass(&self.ifaces.origin)?;
        let mut stubs = self.stubs.lock().unwrap_or_else(|e| e.into_inner());
        stubs.push(client);
        stubs.push(origin);
        Ok(())
    }

    /// Attaches the stub on any lab interface (e.g. `ec`/`eo` when something in
    /// client/origin redirects towards the edge); kept like those of
    /// [`Lab::attach_pass_stubs`].
    pub fn attach_pass_stub(&self, role: Role, ifname: &str) -> Result<()> {
        let stub = self.netns(role).attach_xdp_pass(ifname)?;
        self.stubs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(stub);
        Ok(())
    }

    /// Detaches every stub attached through the lab.
    pub fn detach_pass_stubs(&self) {
        let stubs = std::mem::take(&mut *self.stubs.lock().unwrap_or_else(|e| e.into_inner()));
        drop(stubs);
    }

    /// Adds `cidr` (e.g. `"10.0.1.200/24"`, `"10.0.3.5/24"`, `"fd00:3::5/64"`) to the
    /// client's interface, for tests that need several client addresses. When the
    /// address is outside the client ↔ edge subnets, the edge gets a host route to it
    /// through `ec` (the client already reaches everything through its default route).
    /// The client's default routes keep [`CLIENT_V4`]/[`CLIENT_V6`] as preferred
    /// source: bind to the new address to use it. Returns the address.
    pub fn add_client_address(&self, cidr: &str) -> Result<IpAddr> {
        self.add_address(Role::Client, cidr)
    }

    /// Like [`Lab::add_client_address`] for the origin (`oe`; edge route through `eo`).
    pub fn add_origin_address(&self, cidr: &str) -> Result<IpAddr> {
        self.add_address(Role::Origin, cidr)
    }

    fn add_address(&self, role: Role, cidr: &str) -> Result<IpAddr> {
        let (addr, prefix) = parse_cidr(cidr)?;
        let (ifname, edge_ifname, net_v4, net_v6) = match role {
            Role::Client => (
                &self.ifaces.client_host,
                &self.ifaces.edge_client,
                CLIENT_NET_V4,
                CLIENT_NET_V6,
            ),
            Role::Origin => (
                &self.ifaces.origin_host,
                &self.ifaces.edge_origin,
                ORIGIN_NET_V4,
                ORIGIN_NET_V6,
            ),
            Role::Edge => bail!("add_address is for the client and the origin"),
        };
        let nodad = if addr.is_ipv6() { " nodad" } else { "" };
        self.netns(role)
            .ip_batch(&[format!("addr add {addr}/{prefix} dev {ifname}{nodad}")])
            .with_context(|| format!("adding {cidr} to the {}", role.as_str()))?;
        let on_link = match addr {
            IpAddr::V4(a) => in_subnet_v4(a, net_v4, PREFIX_V4),
            IpAddr::V6(a) => in_subnet_v6(a, net_v6, PREFIX_V6),
        };
        if !on_link {
            let host = if addr.is_ipv4() { 32 } else { 128 };
            self.edge
                .ip_batch(&[format!("route replace {addr}/{host} dev {edge_ifname}")])
                .with_context(|| format!("adding the edge's route to {addr}"))?;
        }
        Ok(addr)
    }

    /// Tears the lab down now and reports errors (dropping does the same, logging
    /// errors to stderr).
    pub fn close(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        self.detach_pass_stubs();
        self.wiring.clear();
        let mut errors = Vec::new();
        let roles = std::mem::take(&mut self.created);
        for &role in &roles {
            self.netns(role).kill_children();
        }
        for &role in &roles {
            if let Err(e) = kill_ns_processes(self.netns(role).name()) {
                errors.push(e);
            }
        }
        if roles.contains(&Role::Edge) {
            // Explicitly, in case something (a socket, a thread still inside) keeps a
            // namespace alive after `ip netns del`: the veths must not linger.
            for ifname in [&self.ifaces.edge_client, &self.ifaces.edge_origin] {
                let _ = self.edge.ip(&["link", "del", ifname.as_str()]);
            }
        }
        for &role in &roles {
            if let Err(e) = delete_netns(self.netns(role).name()) {
                errors.push(e);
            }
        }
        joined_errors(errors).with_context(|| format!("tearing down lab {}", self.id))
    }
}

/// The names of one lab (a [`Lab`] or a [`Fleet`]): namespaces `fwd-<pid>-<n>-<role>`
/// and interfaces `f<pid36>-<n36>-<suffix>` (see docs/lab.md, "Names").
#[derive(Debug, Clone)]
struct LabNames {
    /// `fwd-<pid>-<n>`.
    id: String,
    /// `f<pid36>-<n36>`.
    tag: String,
}

impl LabNames {
    /// The next unused names of this process.
    fn next() -> Self {
        let pid = std::process::id();
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        Self {
            id: format!("{NS_PREFIX}-{pid}-{n}"),
            tag: format!("f{}-{}", base36(pid), base36(n)),
        }
    }

    /// `<id>-<role>`.
    fn netns(&self, role: &str) -> Netns {
        Netns::new(format!("{}-{role}", self.id))
    }

    /// `<tag>-<suffix>`, checked against `IFNAMSIZ`.
    fn ifname(&self, suffix: &str) -> Result<String> {
        let name = format!("{}-{suffix}", self.tag);
        if name.len() > MAX_IFNAME {
            bail!("interface name {name} is longer than {MAX_IFNAME} bytes");
        }
        Ok(name)
    }
}

/// `fwd-<pid>-`: the start of the name of every namespace of this process's labs.
pub fn own_netns_prefix() -> String {
    format!("{NS_PREFIX}-{}-", std::process::id())
}

/// `ip netns add name`, serialised with every other lab (see `NetnsAddLock`).
fn add_netns(name: &str) -> Result<()> {
    let _lock = NetnsAddLock::acquire()?;
    Command::new("ip")
        .args(["netns", "add", name])
        .output_ok()
        .map(drop)
}

/// The sysctls of a fresh lab namespace, set before its interfaces exist so that
/// they inherit `default` (docs/lab.md): IPv6 on without DAD or router
/// advertisements, no reverse-path filter, forwarding only where asked.
fn prepare_netns(ns: &Netns, forwarding: bool) -> Result<()> {
    let forwarding = if forwarding { "1" } else { "0" };
    for (key, value) in [
        ("net.ipv6.conf.all.disable_ipv6", "0"),
        ("net.ipv6.conf.default.disable_ipv6", "0"),
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
        ("net.ipv6.conf.all.accept_ra", "0"),
        ("net.ipv6.conf.default.accept_ra", "0"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv4.ip_forward", forwarding),
        ("net.ipv6.conf.all.forwarding", forwarding),
        ("net.ipv6.conf.default.forwarding", forwarding),
    ] {
        ns.sysctl(key, value)?;
    }
    Ok(())
}

/// Full checksums on the wire, the stack verifying what it receives, no GRO
/// batching (docs/lab.md): `ifname` behaves like a NIC across a real link.
fn wire_like_offloads(ns: &Netns, ifname: &str) -> Result<()> {
    ns.run(
        "ethtool",
        &[
            "-K", ifname, "tx", "off", "rx", "off", "tso", "off", "gro", "off",
        ],
    )
    .with_context(|| format!("disabling offloads on {ifname}"))
    .map(drop)
}

/// One error naming all of `errors`, or `Ok` when there are none.
fn joined_errors(errors: Vec<anyhow::Error>) -> Result<()> {
    match errors
        .into_iter()
        .reduce(|a, b| a.context(format!("{b:#}")))
    {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("lab: {e:#}");
        }
    }
}

/// Removes leftover lab namespaces (`fwd-<pid>-<n>-{client,edge,origin}`) whose
/// creating process no longer exists (crashed or killed runs): kills the processes
/// still inside them and deletes them. Namespaces of live processes, and any other
/// namespace, are left alone. Returns how many were removed. [`Lab::new`] calls it.
pub fn cleanup_stale() -> Result<usize> {
    let entries = match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).context(format!("listing {NETNS_RUN_DIR}")),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {NETNS_RUN_DIR}"))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Some(pid) = stale_owner(&name) else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        kill_ns_processes(&name)?;
        // Deleting the namespace destroys its veths once nothing references it.
        match delete_netns(&name) {
            Ok(()) => removed += 1,
            // Another process cleaning up at the same time got there first.
            Err(_) if !std::path::Path::new(NETNS_RUN_DIR).join(&name).exists() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// The owner pid of a lab namespace name `fwd-<pid>-<n>-<role>`.
fn stale_owner(name: &str) -> Option<libc::pid_t> {
    let rest = name.strip_prefix(NS_PREFIX)?.strip_prefix('-')?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?.parse::<libc::pid_t>().ok()?;
    parts.next()?.parse::<u32>().ok()?;
    let role = parts.next()?;
    let known = Role::ALL.iter().any(|r| r.as_str() == role) || fleet::is_fleet_role(role);
    (pid > 0 && known).then_some(pid)
}

fn process_alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// SIGKILLs every process whose network namespace is `name` (`ip netns pids`), never
/// this process.
fn kill_ns_processes(name: &str) -> Result<()> {
    let me = std::process::id();
    let pids = Command::new("ip")
        .args(["netns", "pids", name])
        .output_ok()
        .with_context(|| format!("listing the processes of {name}"))?;
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
    {
        if pid == me {
            continue;
        }
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            continue;
        };
        // SAFETY: plain syscall; the pid was listed as living in our namespace.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    Ok(())
}

fn delete_netns(name: &str) -> Result<()> {
    Command::new("ip")
        .args(["netns", "del", name])
        .output_ok()
        .map(drop)
}

/// An exclusive `flock` on [`NETNS_ADD_LOCK`]. `ip netns add` turns `/run/netns` into
/// a shared mount point the first time it runs after boot; two concurrent first runs
/// both bind-mount it, stacking mounts that hide each other's namespaces.
struct NetnsAddLock(File);

impl NetnsAddLock {
    fn acquire() -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(NETNS_ADD_LOCK)
            .with_context(|| format!("opening {NETNS_ADD_LOCK}"))?;
        loop {
            // SAFETY: flock on a valid fd; released when the file is closed.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Self(file));
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err).with_context(|| format!("locking {NETNS_ADD_LOCK}"));
            }
        }
    }
}

impl std::fmt::Debug for NetnsAddLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("NetnsAddLock").field(&self.0).finish()
    }
}

fn parse_cidr(cidr: &str) -> Result<(IpAddr, u8)> {
    let (addr, prefix) = cidr
        .split_once('/')
        .with_context(|| format!("{cidr:?} is not address/prefix"))?;
    let addr: IpAddr = addr
        .parse()
        .with_context(|| format!("bad address in {cidr:?}"))?;
    let prefix: u8 = prefix
        .parse()
        .with_context(|| format!("bad prefix length in {cidr:?}"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        bail!("prefix length {prefix} too long in {cidr:?}");
    }
    Ok((addr, prefix))
}

fn in_subnet_v4(addr: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(addr) & mask == u32::from(net) & mask
}

fn in_subnet_v6(addr: Ipv6Addr, net: Ipv6Addr, prefix: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    u128::from(addr) & mask == u128::from(net) & mask
}

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        assert_eq!(base36(4_194_304), "2hwcg");
        assert_eq!(stale_owner("fwd-1234-7-edge"), Some(1234));
        assert_eq!(stale_owner("fwd-1234-7-client"), Some(1234));
        assert_eq!(stale_owner("fwd-1234-7-other"), None);
        assert_eq!(stale_owner("fwd-1234-7-router"), Some(1234));
        assert_eq!(stale_owner("fwd-1234-7-edge2"), Some(1234));
        assert_eq!(stale_owner("fwd-1234-7-edgex"), None);
        assert_eq!(stale_owner("fwd-x-7-edge"), None);
        assert_eq!(stale_owner("fwdx-1-7-edge"), None);
        assert_eq!(stale_owner("other"), None);
        // The longest possible interface name: pid_max (2^22) and a 4-digit counter.
        assert!(format!("f{}-{}-cl", base36(4_194_304), base36(36u32.pow(4) - 1)).len() <= 15);
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.0.3.5/24").unwrap(),
            (IpAddr::V4(Ipv4Addr::new(10, 0, 3, 5)), 24)
        );
        assert!(parse_cidr("10.0.3.5").is_err());
        assert!(parse_cidr("10.0.3.5/33").is_err());
        assert!(parse_cidr("fd00:3::5/64").is_ok());
        assert!(in_subnet_v4(
            Ipv4Addr::new(10, 0, 1, 200),
            CLIENT_NET_V4,
            24
        ));
        assert!(!in_subnet_v4(Ipv4Addr::new(10, 0, 3, 5), CLIENT_NET_V4, 24));
        assert!(in_subnet_v4(Ipv4Addr::new(1, 2, 3, 4), CLIENT_NET_V4, 0));
        assert!(in_subnet_v6(
            "fd00:1::99".parse().unwrap(),
            CLIENT_NET_V6,
            64
        ));
        assert!(!in_subnet_v6(
            "fd00:3::5".parse().unwrap(),
            CLIENT_NET_V6,
            64
        ));
    }
}
