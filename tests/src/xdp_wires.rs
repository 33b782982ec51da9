//! What the exact-bytes `BPF_PROG_TEST_RUN` tests of the XDP datapath share: the
//! lab's addresses per family, the MACs and names of its veths (expected frames are
//! framed with them) and an exact frame comparison that names the first differing
//! byte.

use std::net::IpAddr;

use crate::{
    CLIENT_V4, CLIENT_V6, EDGE_CLIENT_V4, EDGE_CLIENT_V6, EDGE_ORIGIN_V4, EDGE_ORIGIN_V6, Lab,
    Netns, ORIGIN_V4, ORIGIN_V6,
};

/// The four lab addresses of one family: the client, the edge address it talks
/// to, the edge's origin-side address and the origin.
pub struct Family {
    pub client: IpAddr,
    pub edge: IpAddr,
    pub local: IpAddr,
    pub origin: IpAddr,
}

pub const V4: Family = Family {
    client: IpAddr::V4(CLIENT_V4),
    edge: IpAddr::V4(EDGE_CLIENT_V4),
    local: IpAddr::V4(EDGE_ORIGIN_V4),
    origin: IpAddr::V4(ORIGIN_V4),
};

pub const V6: Family = Family {
    client: IpAddr::V6(CLIENT_V6),
    edge: IpAddr::V6(EDGE_CLIENT_V6),
    local: IpAddr::V6(EDGE_ORIGIN_V6),
    origin: IpAddr::V6(ORIGIN_V6),
};

/// MAC addresses and interface names of the lab veths.
#[derive(Clone)]
pub struct Wires {
    /// The edge's client-side and origin-side veths.
    pub ec: String,
    pub eo: String,
    pub ec_mac: [u8; 6],
    pub eo_mac: [u8; 6],
    /// The client's veth and the origin's.
    pub cl_mac: [u8; 6],
    pub oe_mac: [u8; 6],
}

pub fn parse_mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex MAC byte"))
        .collect();
    bytes.try_into().expect("6-byte MAC")
}

/// The MAC of `ifname` in `ns` (`ip -br link`: name, state, MAC, flags).
pub fn mac_of(ns: &Netns, ifname: &str) -> [u8; 6] {
    let out = ns
        .ip(&["-br", "link", "show", "dev", ifname])
        .expect("ip link show");
    let mac = out.split_whitespace().nth(2).expect("MAC column");
    parse_mac(mac)
}

/// The lab's wires, after the edge has pinged each of `hosts` (so the neighbour
/// entries the datapath's route lookups need exist).
pub fn wires(lab: &Lab, hosts: &[IpAddr]) -> Wires {
    let ifaces = lab.ifaces().clone();
    for addr in hosts {
        lab.edge().ping(*addr).expect("edge reaches the lab hosts");
    }
    Wires {
        ec_mac: mac_of(lab.edge(), &ifaces.edge_client),
        eo_mac: mac_of(lab.edge(), &ifaces.edge_origin),
        cl_mac: mac_of(lab.client(), &ifaces.client),
        oe_mac: mac_of(lab.origin(), &ifaces.origin),
        ec: ifaces.edge_client,
        eo: ifaces.edge_origin,
    }
}

/// Exact comparison with the first differing offset in the message.
#[track_caller]
pub fn assert_frame(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let at = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: frames differ at byte {at} (len {} vs {})\n got: {}\nwant: {}",
            got.len(),
            want.len(),
            hex(got),
            hex(want)
        );
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The ports of a spliced connection: the client's, the edge's (the app's), the
/// agent's on the origin leg and the origin's.
#[derive(Clone, Copy)]
pub struct SplicePorts {
    pub client: u16,
    pub edge: u16,
    pub local: u16,
    pub origin: u16,
}

/// The two legs of a spliced connection of family `f` as the agent reads them at a
/// handoff, leaving by the edge's interfaces `ec` and `eo` (ifindexes): the client
/// leg's send sequence just below the 2^32 wrap, windows scaled differently on
/// each leg, timestamps (clocks far apart) and SACK on both, MSS 1460, MTU 1500.
pub fn splice_legs(
    f: &Family,
    ports: SplicePorts,
    ec: u32,
    eo: u32,
) -> (
    forwarder::tcp::fastpath::LegState,
    forwarder::tcp::fastpath::LegState,
) {
    use forwarder::tcp::fastpath::LegState;
    use std::net::SocketAddr;
    let client = LegState {
        local: SocketAddr::new(f.edge, ports.edge),
        peer: SocketAddr::new(f.client, ports.client),
        snd_nxt: 0xffff_fff0,
        rcv_nxt: 1000,
        wscale: true,
        snd_wscale: 7,
        rcv_wscale: 2,
        timestamps: true,
        sack: true,
        ts_clock: 0x1000_0000,
        urgent: false,
        ifindex: ec,
        advmss: 1460,
        path_mtu: 1500,
    };
    let origin = LegState {
        local: SocketAddr::new(f.local, ports.local),
        peer: SocketAddr::new(f.origin, ports.origin),
        snd_nxt: 5_000_000,
        rcv_nxt: 0x8000_0000,
        wscale: true,
        snd_wscale: 8,
        rcv_wscale: 5,
        timestamps: true,
        sack: true,
        ts_clock: 0x2000_0000,
        urgent: false,
        ifindex: eo,
        advmss: 1460,
        path_mtu: 1500,
    };
    (client, origin)
}
