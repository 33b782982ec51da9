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
