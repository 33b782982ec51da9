//! The UDP fast path (SPEC §5) through `BPF_PROG_TEST_RUN`: crafted frames in, exact
//! frames, verdicts and counter deltas out, IPv4 and IPv6, every proxy mode, both
//! directions.
//!
//! The program does a real `bpf_fib_lookup`, so each test runs in the `edge`
//! namespace of a lab: routes and neighbours are the lab's (the edge pings the
//! client and the origin first so both MACs are known), and the ingress interface of
//! a run is the edge's client-side veth for client frames and its origin-side veth
//! for origin frames. Expected frames are built by hand with `frames.rs` (and its
//! independent checksum routines) and the wire codecs; the MACs are the lab veths'.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use forwarder::config::Config;
use forwarder::datapath::test_run::{TestRunOptions, TestRunOutput, test_run_xdp};
use forwarder::datapath::{Datapath, PROG_XDP, Plan, addr16, ifindex};
use forwarder::route::route_to;
use forwarder::wire::proxy_v2::Transport;
use forwarder::wire::{ProxyKind, proxy_header, spp};
use forwarder_common::{
    ADMISSION_ASSURED, ADMISSION_NEW, ADMISSION_REPLIED, DropReason, FlowCounter, FlowKey,
    FlowState, MAX_FLOWS, MAX_NEW_FLOWS,
};
use forwarder_tests::frames::*;
use forwarder_tests::xdp_wires::{Family, V4, V6, Wires, assert_frame, wires};
use forwarder_tests::{
    CLIENT_V4, CLIENT_V6, EDGE_ADDRESSES, EDGE_CLIENT_V4, EDGE_CLIENT_V6, EDGE_ORIGIN_V4,
    EDGE_ORIGIN_V6, Lab, ORIGIN_V4, ORIGIN_V6, require_root,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const NAT_LOW: u16 = 40000;
const NAT_HIGH: u16 = 40099;
/// The second origin address of the multi-origin apps.
const ORIGIN2_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
const ORIGIN2_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 3);

fn config(ec: &str, eo: &str) -> String {
    format!(
        r#"
[agent]
interfaces = ["{ec}", "{eo}"]
udp_nat_ports = "{NAT_LOW}-{NAT_HIGH}"

[[apps]]
id = "spp4"
protocol = "udp/5000"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:5000"]
proxy_protocol = "simple"

[[apps]]
id = "off4"
protocol = "udp/5001"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:5001"]
proxy_protocol = "off"

[[apps]]
id = "v2-4"
protocol = "udp/5002"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:5002"]
proxy_protocol = "v2"

[[apps]]
id = "range4"
protocol = "udp/7000-7009"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:7100-7109"]
proxy_protocol = "simple"

[[apps]]
id = "multi-spp4"
protocol = "udp/5100"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:5100", "udp://10.0.2.3:5100"]
proxy_protocol = "simple"

[[apps]]
id = "multi-off4"
protocol = "udp/5101"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:5101", "udp://10.0.2.3:5101"]
proxy_protocol = "off"

[[apps]]
id = "spp6"
protocol = "udp/5000"
edge_ips = ["fd00:1::1"]
origin_direct = ["udp://[fd00:2::2]:5000"]
proxy_protocol = "simple"

[[apps]]
id = "off6"
protocol = "udp/5001"
edge_ips = ["fd00:1::1"]
origin_direct = ["udp://[fd00:2::2]:5001"]
proxy_protocol = "off"

[[apps]]
id = "v2-6"
protocol = "udp/5002"
edge_ips = ["fd00:1::1"]
origin_direct = ["udp://[fd00:2::2]:5002"]
proxy_protocol = "v2"

[[apps]]
id = "multi-spp6"
protocol = "udp/5100"
edge_ips = ["fd00:1::1"]
origin_direct = ["udp://[fd00:2::2]:5100", "udp://[fd00:2::3]:5100"]
proxy_protocol = "simple"

[[apps]]
id = "multi-off6"
protocol = "udp/5101"
edge_ips = ["fd00:1::1"]
origin_direct = ["udp://[fd00:2::2]:5101", "udp://[fd00:2::3]:5101"]
proxy_protocol = "off"
"#
    )
}

/// A lab whose edge knows the client's and the origins' MACs, with a second origin
/// address (10.0.2.3 / fd00:2::3) for the multi-origin apps.
fn lab() -> (Lab, Wires) {
    let lab = Lab::new().expect("lab");
    lab.add_origin_address("10.0.2.3/24")
        .expect("origin address");
    lab.add_origin_address("fd00:2::3/64")
        .expect("origin address");
    let hosts = [
        IpAddr::from(CLIENT_V4),
        CLIENT_V6.into(),
        ORIGIN_V4.into(),
        ORIGIN_V6.into(),
        ORIGIN2_V4.into(),
        ORIGIN2_V6.into(),
    ];
    let wires = wires(&lab, &hosts);
    (lab, wires)
}

/// The datapath loaded in the edge namespace with the test config and real routes.
/// Only used on a thread inside that namespace.
struct Harness {
    datapath: Datapath,
    w: Wires,
    ec_index: u32,
    eo_index: u32,
    /// NAT ports handed out so far (they must be unique per local address).
    nat_ports: HashSet<(IpAddr, u16)>,
}

impl Harness {
    fn new(w: &Wires) -> Harness {
        Harness::with_config(w, &config(&w.ec, &w.eo))
    }

    fn with_config(w: &Wires, config: &str) -> Harness {
        let config = Config::parse(config).expect("valid config");
        let edges = EDGE_ADDRESSES;
        let plan = Plan::build(&config, &edges, route_to).expect("plan with the lab's routes");
        let mut datapath = Datapath::load().expect("load the eBPF object");
        datapath.apply(&plan).expect("fill maps");
        Harness {
            datapath,
            ec_index: ifindex(&w.ec).expect("ec"),
            eo_index: ifindex(&w.eo).expect("eo"),
            w: w.clone(),
            nat_ports: HashSet::new(),
        }
    }

    /// Applies `config` as a reload would (the next plan from the current one).
    fn reload(&mut self, config: &str) {
        let config = Config::parse(config).expect("valid config");
        let edges = EDGE_ADDRESSES;
        let plan = Plan::rebuild(
            self.datapath.plan(),
            &config,
            &edges,
            route_to,
            &Default::default(),
        )
        .expect("plan with the lab's routes");
        self.datapath.apply(&plan).expect("fill maps");
    }

    fn run(&self, frame: &[u8], ingress: u32) -> TestRunOutput {
        let fd = self.datapath.xdp_program_fd(PROG_XDP).expect("prog fd");
        test_run_xdp(
            fd,
            frame,
            &TestRunOptions {
                ingress_ifindex: ingress,
                ..Default::default()
            },
        )
        .expect("test run")
    }

    fn drops(&self) -> [u64; DropReason::COUNT] {
        self.datapath.counters().expect("counters").drops
    }

    /// Runs `frame` arriving from the client (`from_client`) or the origin side and
    /// returns the output frame; the verdict must be XDP_REDIRECT (out of the other
    /// veth) and no drop may be counted.
    #[track_caller]
    fn forward(&self, what: &str, frame: &[u8], from_client: bool) -> Vec<u8> {
        let (frame, ingress) = self.arriving(frame, from_client);
        let before = self.drops();
        let out = self.run(&frame, ingress);
        assert_eq!(self.drops(), before, "{what}: nothing dropped");
        assert_eq!(
            out.verdict, XDP_REDIRECT,
            "{what}: redirected to the other veth"
        );
        out.frame
    }

    /// Runs `frame` and asserts XDP_DROP with exactly `reason` counted once.
    #[track_caller]
    fn expect_drop(&self, what: &str, frame: &[u8], from_client: bool, reason: DropReason) {
        let (frame, ingress) = self.arriving(frame, from_client);
        self.expect_drop_on(what, &frame, ingress, reason);
    }

    /// Runs a client's `frame` that is too big for the path once the header is
    /// added: the verdict is XDP_TX (the ICMP error goes back out of `ec`), the
    /// datagram is counted as `too_big`; returns the ICMP frame.
    #[track_caller]
    fn expect_icmp(&self, what: &str, frame: &[u8]) -> Vec<u8> {
        let before = self.drops();
        let out = self.run(frame, self.ec_index);
        let after = self.drops();
        assert_eq!(
            out.verdict, XDP_TX,
            "{what}: XDP_TX (ICMP back to the client)"
        );
        let mut want = before;
        want[DropReason::TooBig as usize] += 1;
        assert_eq!(after, want, "{what}: counted as too_big only");
        out.frame
    }

    /// The frame as it arrives from the client (on `ec`, as built) or from the
    /// origin (on `eo`, sent by the origin's MAC: replies are only accepted from the
    /// route's next hop).
    fn arriving(&self, frame: &[u8], from_client: bool) -> (Vec<u8>, u32) {
        let mut frame = frame.to_vec();
        if from_client {
            (frame, self.ec_index)
        } else {
            frame[6..12].copy_from_slice(&self.w.oe_mac);
            (frame, self.eo_index)
        }
    }

    /// Runs `frame` exactly as given on interface `ingress` and asserts XDP_DROP
    /// with exactly `reason` counted once.
    #[track_caller]
    fn expect_drop_on(&self, what: &str, frame: &[u8], ingress: u32, reason: DropReason) {
        let before = self.drops();
        let out = self.run(frame, ingress);
        let after = self.drops();
        let mut delta = [0u64; DropReason::COUNT];
        for (i, d) in delta.iter_mut().enumerate() {
            *d = after[i] - before[i];
        }
        let mut want = [0u64; DropReason::COUNT];
        want[reason as usize] = 1;
        assert_eq!(
            out.verdict,
            XDP_DROP,
            "{what}: XDP_DROP ({})",
            reason.label()
        );
        assert_eq!(delta, want, "{what}: counted as {} only", reason.label());
    }

    fn flow(&self, client: SocketAddr, edge: SocketAddr) -> FlowState {
        let key = FlowKey {
            client: addr16(client.ip()),
            edge: addr16(edge.ip()),
            client_port: client.port(),
            edge_port: edge.port(),
        };
        self.datapath
            .udp_flows()
            .expect("flows")
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("no flow for {client} -> {edge}"))
    }

    /// The NAT port of a new plain-NAT/v2 flow, checked to be in `udp_nat_ports`
    /// and not used by another flow on the same local address.
    fn new_nat_port(&mut self, client: SocketAddr, edge: SocketAddr, local: IpAddr) -> u16 {
        let port = self.flow(client, edge).local_port;
        assert!(
            (NAT_LOW..=NAT_HIGH).contains(&port),
            "NAT port {port} of {client} inside udp_nat_ports"
        );
        assert!(
            self.nat_ports.insert((local, port)),
            "NAT port {port} on {local} is unique among live flows"
        );
        port
    }
}

// ---- frame building -------------------------------------------------------------

fn eth(dst: [u8; 6], src: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The IPv4 header the forwarder writes: no options, id 0, DF, TTL 64, UDP.
fn ipv4_df(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
    ipv4_df_proto(src, dst, PROTO_UDP, payload)
}

/// As `ipv4_df`, carrying protocol `proto`.
fn ipv4_df_proto(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (src, dst) else {
        panic!("IPv4 addresses expected");
    };
    let mut h = vec![0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h[6] = 0x40;
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = internet_checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// A whole UDP frame from `src` to `dst` as a host would send it (IPv4 with id and
/// no DF, see `frames::ipv4`), with `checksum` in place of the correct one if given.
fn udp_in(src: SocketAddr, dst: SocketAddr, payload: &[u8], checksum: Option<u16>) -> Vec<u8> {
    let mut seg = udp(src.ip(), src.port(), dst.ip(), dst.port(), payload);
    if let Some(c) = checksum {
        seg[6..8].copy_from_slice(&c.to_be_bytes());
    }
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ethernet(ETH_P_IPV4, &ipv4(s, d, PROTO_UDP, &seg)),
        (IpAddr::V6(s), IpAddr::V6(d)) => ethernet(ETH_P_IPV6, &ipv6(s, d, PROTO_UDP, &seg)),
        _ => panic!("mixed families"),
    }
}

/// The frame the forwarder sends from `src` to `dst` between the given MACs.
fn udp_out(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
    zero_checksum: bool,
) -> Vec<u8> {
    let mut seg = udp(src.ip(), src.port(), dst.ip(), dst.port(), payload);
    if zero_checksum {
        seg[6..8].copy_from_slice(&[0, 0]);
    }
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => eth(
            dst_mac,
            src_mac,
            ETH_P_IPV4,
            &ipv4_df(src.ip(), dst.ip(), &seg),
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            eth(dst_mac, src_mac, ETH_P_IPV6, &ipv6(s, d, PROTO_UDP, &seg))
        }
        _ => panic!("mixed families"),
    }
}

fn spp_payload(client: SocketAddr, proxy: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut d = spp::Repr { client, proxy }.emit_to_vec();
    d.extend_from_slice(payload);
    d
}

fn v2_payload(client: SocketAddr, edge: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut d = proxy_header(ProxyKind::V2, Transport::Dgram, client, edge).expect("v2 header");
    d.extend_from_slice(payload);
    d
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Checks a frame the forwarder sent with the independent routines: IP header
/// checksum (IPv4), TTL / hop limit 64, UDP length and checksum (0 allowed for IPv4
/// only when `zero_ok`).
#[track_caller]
fn check_sent(what: &str, frame: &[u8], zero_ok: bool) {
    let ether_type = u16::from_be_bytes([frame[12], frame[13]]);
    let (src, dst, l4) = match ether_type {
        ETH_P_IPV4 => {
            let ip = &frame[14..34];
            assert_eq!(ip[0], 0x45, "{what}: IPv4 without options");
            assert_eq!(
                ones_complement_sum(ip, 0),
                0xffff,
                "{what}: IPv4 header checksum"
            );
            assert_eq!(ip[8], 64, "{what}: TTL 64");
            assert_eq!(&ip[6..8], &[0x40, 0], "{what}: DF, not a fragment");
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            assert_eq!(total, frame.len() - 14, "{what}: IPv4 total length");
            let src = IpAddr::from([ip[12], ip[13], ip[14], ip[15]]);
            let dst = IpAddr::from([ip[16], ip[17], ip[18], ip[19]]);
            (src, dst, &frame[34..])
        }
        ETH_P_IPV6 => {
            let ip = &frame[14..54];
            assert_eq!(ip[7], 64, "{what}: hop limit 64");
            assert_eq!(ip[6], PROTO_UDP, "{what}: next header UDP");
            let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            assert_eq!(plen, frame.len() - 54, "{what}: IPv6 payload length");
            let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
            let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
            (src, dst, &frame[54..])
        }
        other => panic!("{what}: ether type {other:#06x}"),
    };
    let udp_len = u16::from_be_bytes([l4[4], l4[5]]) as usize;
    assert_eq!(udp_len, l4.len(), "{what}: UDP length");
    let csum = u16::from_be_bytes([l4[6], l4[7]]);
    if csum == 0 {
        assert!(zero_ok && src.is_ipv4(), "{what}: UDP checksum 0");
    } else {
        assert!(
            transport_checksum_ok(src, dst, PROTO_UDP, l4),
            "{what}: UDP checksum {csum:#06x} verifies"
        );
    }
}

/// Runs `body` with a harness on a thread in the lab's edge namespace.
fn with_harness(body: impl FnOnce(&mut Harness) + Send) {
    if !require_root() {
        return;
    }
    let (lab, wires) = lab();
    lab.edge()
        .run_in(|| {
            let mut h = Harness::new(&wires);
            body(&mut h);
        })
        .expect("edge thread");
    lab.close().expect("lab teardown");
}

// ---- the three modes, both directions -------------------------------------------

fn simple_both_directions(h: &mut Harness, f: &Family) {
    let w = h.w.clone();
    let client = sa(f.client, 40000);
    let edge = sa(f.edge, 5000);
    let request = b"hello, origin"; // odd length on purpose
    let out = h.forward("SPP request", &udp_in(client, edge, request, None), true);
    let want = udp_out(
        w.oe_mac,
        w.eo_mac,
        sa(f.local, 5000),
        sa(f.origin, 5000),
        &spp_payload(client, edge, request),
        false,
    );
    check_sent("SPP request", &out, false);
    assert_frame("SPP request", &out, &want);

    // The origin answers from its port to the agent's (local address, edge port),
    // with the header it got.
    let reply = b"hello, client!";
    let from_origin = udp_in(
        sa(f.origin, 5000),
        sa(f.local, 5000),
        &spp_payload(client, edge, reply),
        None,
    );
    let out = h.forward("SPP reply", &from_origin, false);
    let want = udp_out(w.cl_mac, w.ec_mac, edge, client, reply, false);
    check_sent("SPP reply", &out, false);
    assert_frame("SPP reply", &out, &want);

    let flow = h.flow(client, edge);
    assert_eq!(
        (
            flow.packets_in,
            flow.bytes_in,
            flow.packets_out,
            flow.bytes_out
        ),
        (1, request.len() as u64, 1, reply.len() as u64),
        "SPP flow counts payload bytes, headers excluded"
    );
    assert_eq!(flow.local_port, 5000, "SPP flows use the edge port");
    assert_eq!(flow.origin_port, 5000);
}

fn range_maps_by_offset(h: &mut Harness, f: &Family) {
    if f.client.is_ipv6() {
        return;
    }
    let w = h.w.clone();
    for k in [0u16, 3, 9] {
        let client = sa(f.client, 41000 + k);
        let edge = sa(f.edge, 7000 + k);
        let out = h.forward("range request", &udp_in(client, edge, b"r", None), true);
        let want = udp_out(
            w.oe_mac,
            w.eo_mac,
            sa(f.local, 7000 + k),
            sa(f.origin, 7100 + k),
            &spp_payload(client, edge, b"r"),
            false,
        );
        assert_frame(&format!("range request to {edge}"), &out, &want);
        let from_origin = udp_in(
            sa(f.origin, 7100 + k),
            sa(f.local, 7000 + k),
            &spp_payload(client, edge, b"R"),
            None,
        );
        let out = h.forward("range reply", &from_origin, false);
        let want = udp_out(w.cl_mac, w.ec_mac, edge, client, b"R", false);
        assert_frame(&format!("range reply from {}", 7100 + k), &out, &want);
    }
}

fn off_both_directions(h: &mut Harness, f: &Family) {
    let w = h.w.clone();
    let client = sa(f.client, 40001);
    let edge = sa(f.edge, 5001);
    let request = b"plain nat";
    let out = h.forward("NAT request", &udp_in(client, edge, request, None), true);
    let port = h.new_nat_port(client, edge, f.local);
    let want = udp_out(
        w.oe_mac,
        w.eo_mac,
        sa(f.local, port),
        sa(f.origin, 5001),
        request,
        false,
    );
    check_sent("NAT request", &out, false);
    assert_frame("NAT request", &out, &want);

    // A second datagram keeps the port and is still plain.
    let out = h.forward("NAT request 2", &udp_in(client, edge, b"again", None), true);
    let want = udp_out(
        w.oe_mac,
        w.eo_mac,
        sa(f.local, port),
        sa(f.origin, 5001),
        b"again",
        false,
    );
    assert_frame("NAT request 2", &out, &want);

    let reply = b"nat reply";
    let from_origin = udp_in(sa(f.origin, 5001), sa(f.local, port), reply, None);
    let out = h.forward("NAT reply", &from_origin, false);
    let want = udp_out(w.cl_mac, w.ec_mac, edge, client, reply, false);
    check_sent("NAT reply", &out, false);
    assert_frame("NAT reply", &out, &want);

    let flow = h.flow(client, edge);
    assert_eq!(
        (
            flow.packets_in,
            flow.bytes_in,
            flow.packets_out,
            flow.bytes_out
        ),
        (2, (request.len() + 5) as u64, 1, reply.len() as u64)
    );
}

fn v2_first_datagram_only(h: &mut Harness, f: &Family) {
    let w = h.w.clone();
    let client = sa(f.client, 40002);
    let edge = sa(f.edge, 5002);
    let first = b"first datagram";
    let out = h.forward("v2 first", &udp_in(client, edge, first, None), true);
    let port = h.new_nat_port(client, edge, f.local);
    let want = udp_out(
        w.oe_mac,
        w.eo_mac,
        sa(f.local, port),
        sa(f.origin, 5002),
        &v2_payload(client, edge, first),
        false,
    );
    check_sent("v2 first", &out, false);
    assert_frame("v2 first (PROXY v2 DGRAM header in front)", &out, &want);

    let second = b"second";
    let out = h.forward("v2 second", &udp_in(client, edge, second, None), true);
    let want = udp_out(
        w.oe_mac,
        w.eo_mac,
        sa(f.local, port),
        sa(f.origin, 5002),
        second,
        false,
    );
    check_sent("v2 second", &out, false);
    assert_frame("v2 second (no header)", &out, &want);

    let reply = b"v2 reply";
    let from_origin = udp_in(sa(f.origin, 5002), sa(f.local, port), reply, None);
    let out = h.forward("v2 reply", &from_origin, false);
    let want = udp_out(w.cl_mac, w.ec_mac, edge, client, reply, false);
    check_sent("v2 reply", &out, false);
    assert_frame("v2 reply", &out, &want);

    let flow = h.flow(client, edge);
    assert_eq!(
        (
            flow.packets_in,
            flow.bytes_in,
            flow.packets_out,
            flow.bytes_out
        ),
        (
            2,
            (first.len() + second.len()) as u64,
            1,
            reply.len() as u64
        ),
        "v2 flow counts payload bytes, the header excluded"
    );
}

#[test]
fn ipv4_simple_off_v2_and_range_exact_bytes_both_directions() {
    with_harness(|h| {
        simple_both_directions(h, &V4);
        off_both_directions(h, &V4);
        v2_first_datagram_only(h, &V4);
        range_maps_by_offset(h, &V4);
    });
}

#[test]
fn ipv6_simple_off_v2_exact_bytes_both_directions() {
    with_harness(|h| {
        simple_both_directions(h, &V6);
        off_both_directions(h, &V6);
        v2_first_datagram_only(h, &V6);
    });
}

// ---- replies that fail the checks ----------------------------------------------

fn bad_replies(h: &mut Harness, f: &Family, origin2: IpAddr) {
    let client = sa(f.client, 42000);
    let edge = sa(f.edge, 5000);
    let origin = sa(f.origin, 5000);
    let local = sa(f.local, 5000);
    h.forward("SPP request", &udp_in(client, edge, b"x", None), true);

    // A header naming a client that has no flow.
    let ghost = sa(f.client, 42999);
    h.expect_drop(
        "SPP reply naming no flow",
        &udp_in(origin, local, &spp_payload(ghost, edge, b"forged"), None),
        false,
        DropReason::NoFlow,
    );
    // A header naming the live flow under another edge port.
    h.expect_drop(
        "SPP reply naming another edge port",
        &udp_in(
            origin,
            local,
            &spp_payload(client, sa(f.edge, 5999), b"forged"),
            None,
        ),
        false,
        DropReason::NoFlow,
    );
    // Bad magic, byte-swapped magic, header cut short.
    let mut bad = spp_payload(client, edge, b"forged");
    bad[..2].copy_from_slice(&0x56EDu16.to_be_bytes());
    h.expect_drop(
        "SPP reply with bad magic",
        &udp_in(origin, local, &bad, None),
        false,
        DropReason::SppInvalid,
    );
    bad[..2].copy_from_slice(&[0xEC, 0x56]);
    h.expect_drop(
        "SPP reply with byte-swapped magic",
        &udp_in(origin, local, &bad, None),
        false,
        DropReason::SppInvalid,
    );
    let short = spp_payload(client, edge, b"");
    h.expect_drop(
        "SPP reply shorter than the header",
        &udp_in(origin, local, &short[..spp::HEADER_LEN - 1], None),
        false,
        DropReason::SppInvalid,
    );
    // The flow's own header from the app's other origin: not the flow's origin.
    let multi_client = sa(f.client, 43000);
    let multi_edge = sa(f.edge, 5100);
    h.forward(
        "multi-origin SPP request",
        &udp_in(multi_client, multi_edge, b"m", None),
        true,
    );
    let flow = h.flow(multi_client, multi_edge);
    let chosen = h.datapath.plan().expect("plan").origins[flow.origin as usize].addr;
    let other = if chosen == addr16(f.origin) {
        origin2
    } else {
        f.origin
    };
    h.expect_drop(
        "SPP reply from the app's other origin",
        &udp_in(
            sa(other, 5100),
            sa(f.local, 5100),
            &spp_payload(multi_client, multi_edge, b"forged"),
            None,
        ),
        false,
        DropReason::NoFlow,
    );
    // The flow's own origin answers fine.
    let chosen_ip = forwarder::udp_flows::ip_from16(chosen);
    h.forward(
        "SPP reply from the flow's origin",
        &udp_in(
            sa(chosen_ip, 5100),
            sa(f.local, 5100),
            &spp_payload(multi_client, multi_edge, b"ok"),
            None,
        ),
        false,
    );

    // Plain NAT: the other origin sends to the flow's NAT port.
    let nat_client = sa(f.client, 43001);
    let nat_edge = sa(f.edge, 5101);
    h.forward(
        "multi-origin NAT request",
        &udp_in(nat_client, nat_edge, b"n", None),
        true,
    );
    let flow = h.flow(nat_client, nat_edge);
    let chosen = h.datapath.plan().expect("plan").origins[flow.origin as usize].addr;
    let chosen_ip = forwarder::udp_flows::ip_from16(chosen);
    let other = if chosen_ip == f.origin {
        origin2
    } else {
        f.origin
    };
    let nat = sa(f.local, flow.local_port);
    h.expect_drop(
        "NAT reply from the app's other origin",
        &udp_in(sa(other, 5101), nat, b"forged", None),
        false,
        DropReason::NoFlow,
    );
    // The origin host, but from the origin port of another plain-NAT app: not this
    // flow's origin either.
    h.expect_drop(
        "NAT reply from another app's origin port",
        &udp_in(sa(f.origin, 5001), nat, b"forged", None),
        false,
        DropReason::NoFlow,
    );
    // A NAT port nobody holds.
    let free = (NAT_LOW..=NAT_HIGH)
        .find(|p| {
            !h.datapath
                .udp_flows()
                .expect("flows")
                .iter()
                .any(|(_, s)| s.local_port == *p)
        })
        .expect("a free NAT port");
    h.expect_drop(
        "NAT reply to a free NAT port",
        &udp_in(sa(chosen_ip, 5101), sa(f.local, free), b"forged", None),
        false,
        DropReason::NoFlow,
    );
    h.forward(
        "NAT reply from the flow's origin",
        &udp_in(sa(chosen_ip, 5101), nat, b"ok", None),
        false,
    );
}

#[test]
fn replies_failing_the_checks_are_dropped() {
    with_harness(|h| {
        bad_replies(h, &V4, ORIGIN2_V4.into());
        bad_replies(h, &V6, ORIGIN2_V6.into());
    });
}

// ---- checksums, VLANs ------------------------------------------------------------

#[test]
fn zero_udp_checksum_ipv4_kept_ipv6_malformed_and_tagged_frames_pass() {
    with_harness(|h| {
        let w = h.w.clone();
        // IPv4: a sender without a checksum gets none, both ways, every mode.
        let client = sa(CLIENT_V4, 44000);
        let edge = sa(EDGE_CLIENT_V4, 5000);
        let out = h.forward(
            "IPv4 SPP request without checksum",
            &udp_in(client, edge, b"no checksum", Some(0)),
            true,
        );
        let want = udp_out(
            w.oe_mac,
            w.eo_mac,
            sa(EDGE_ORIGIN_V4, 5000),
            sa(ORIGIN_V4, 5000),
            &spp_payload(client, edge, b"no checksum"),
            true,
        );
        check_sent("IPv4 SPP request without checksum", &out, true);
        assert_frame("IPv4 SPP request without checksum", &out, &want);
        let out = h.forward(
            "IPv4 SPP reply without checksum",
            &udp_in(
                sa(ORIGIN_V4, 5000),
                sa(EDGE_ORIGIN_V4, 5000),
                &spp_payload(client, edge, b"back"),
                Some(0),
            ),
            false,
        );
        let want = udp_out(w.cl_mac, w.ec_mac, edge, client, b"back", true);
        assert_frame("IPv4 SPP reply without checksum", &out, &want);

        let client = sa(CLIENT_V4, 44001);
        let edge = sa(EDGE_CLIENT_V4, 5002);
        let out = h.forward(
            "IPv4 v2 request without checksum",
            &udp_in(client, edge, b"v2", Some(0)),
            true,
        );
        let port = h.new_nat_port(client, edge, EDGE_ORIGIN_V4.into());
        let want = udp_out(
            w.oe_mac,
            w.eo_mac,
            sa(EDGE_ORIGIN_V4, port),
            sa(ORIGIN_V4, 5002),
            &v2_payload(client, edge, b"v2"),
            true,
        );
        assert_frame("IPv4 v2 request without checksum", &out, &want);

        // IPv6 forbids a zero checksum: malformed, both ways.
        let client6 = sa(CLIENT_V6, 44000);
        let edge6 = sa(EDGE_CLIENT_V6, 5000);
        h.expect_drop(
            "IPv6 request with checksum 0",
            &udp_in(client6, edge6, b"zero", Some(0)),
            true,
            DropReason::Malformed,
        );
        h.forward("IPv6 request", &udp_in(client6, edge6, b"ok", None), true);
        h.expect_drop(
            "IPv6 SPP reply with checksum 0",
            &udp_in(
                sa(ORIGIN_V6, 5000),
                sa(EDGE_ORIGIN_V6, 5000),
                &spp_payload(client6, edge6, b"zero"),
                Some(0),
            ),
            false,
            DropReason::Malformed,
        );

        // Tagged frames are left to the kernel, untouched and uncounted.
        let tagged = vlan_tagged(&udp_in(sa(CLIENT_V4, 44002), edge, b"tagged", None), 7);
        let before = h.drops();
        let out = h.run(&tagged, h.ec_index);
        assert_eq!(out.verdict, XDP_PASS, "VLAN-tagged datagram passes");
        assert_eq!(out.frame, tagged, "and is not modified");
        assert_eq!(h.drops(), before);
    });
}

/// Payloads whose checksums land on the edge cases of ones' complement arithmetic:
/// the incremental update must agree with a full recomputation for every one.
#[test]
fn incremental_checksums_match_full_recomputation() {
    with_harness(|h| {
        let w = h.w.clone();
        for (i, fill) in [0x00u8, 0xff, 0x5a].into_iter().enumerate() {
            for len in [0usize, 1, 2, 37, 38, 39, 255] {
                let payload = vec![fill; len];
                let client = sa(CLIENT_V4, 45000 + (i * 100 + len) as u16);
                let edge = sa(EDGE_CLIENT_V4, 5000);
                let out = h.forward("request", &udp_in(client, edge, &payload, None), true);
                let want = udp_out(
                    w.oe_mac,
                    w.eo_mac,
                    sa(EDGE_ORIGIN_V4, 5000),
                    sa(ORIGIN_V4, 5000),
                    &spp_payload(client, edge, &payload),
                    false,
                );
                assert_frame(&format!("IPv4 fill {fill:#x} len {len}"), &out, &want);
                let client6 = sa(CLIENT_V6, client.port());
                let edge6 = sa(EDGE_CLIENT_V6, 5000);
                let out = h.forward("request", &udp_in(client6, edge6, &payload, None), true);
                let want = udp_out(
                    w.oe_mac,
                    w.eo_mac,
                    sa(EDGE_ORIGIN_V6, 5000),
                    sa(ORIGIN_V6, 5000),
                    &spp_payload(client6, edge6, &payload),
                    false,
                );
                assert_frame(&format!("IPv6 fill {fill:#x} len {len}"), &out, &want);
                let out = h.forward(
                    "reply",
                    &udp_in(
                        sa(ORIGIN_V6, 5000),
                        sa(EDGE_ORIGIN_V6, 5000),
                        &spp_payload(client6, edge6, &payload),
                        None,
                    ),
                    false,
                );
                let want = udp_out(w.cl_mac, w.ec_mac, edge6, client6, &payload, false);
                assert_frame(&format!("IPv6 reply fill {fill:#x} len {len}"), &out, &want);
            }
        }

        // Two payload bytes chosen so that a checksum lands exactly on zero: in the
        // rewritten request (sent as 0xffff), in the client's datagram (0xffff on the
        // wire) and in the rewritten reply.
        let client = sa(CLIENT_V4, 45999);
        let edge = sa(EDGE_CLIENT_V4, 5000);
        let local = sa(EDGE_ORIGIN_V4, 5000);
        let origin = sa(ORIGIN_V4, 5000);
        let out_word = zeroing_word(local, origin, &spp_payload(client, edge, b"ck"));
        let in_word = zeroing_word(client, edge, b"ck");
        for (what, word) in [("request sum 0", out_word), ("client sum 0", in_word)] {
            let mut payload = b"ck".to_vec();
            payload.extend_from_slice(&word.to_be_bytes());
            let out = h.forward(what, &udp_in(client, edge, &payload, None), true);
            let want = udp_out(
                w.oe_mac,
                w.eo_mac,
                local,
                origin,
                &spp_payload(client, edge, &payload),
                false,
            );
            check_sent(what, &out, false);
            assert_frame(what, &out, &want);
        }
        let reply_word = zeroing_word(edge, client, b"ck");
        let mut payload = b"ck".to_vec();
        payload.extend_from_slice(&reply_word.to_be_bytes());
        let out = h.forward(
            "reply sum 0",
            &udp_in(origin, local, &spp_payload(client, edge, &payload), None),
            false,
        );
        let want = udp_out(w.cl_mac, w.ec_mac, edge, client, &payload, false);
        check_sent("reply sum 0", &out, false);
        assert_eq!(&out[out.len() - payload.len() - 2..][..2], &[0xff, 0xff]);
        assert_frame("reply sum 0", &out, &want);
    });
}

/// The 16-bit word that, appended to `payload` in a datagram from `src` to `dst`,
/// makes the computed UDP checksum zero (transmitted as 0xffff).
fn zeroing_word(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> u16 {
    assert!(payload.len().is_multiple_of(2));
    let mut seg = udp(src.ip(), src.port(), dst.ip(), dst.port(), payload);
    seg.extend_from_slice(&[0, 0]);
    let len = seg.len() as u16;
    seg[4..6].copy_from_slice(&len.to_be_bytes());
    seg[6..8].copy_from_slice(&[0, 0]);
    let sum = ones_complement_sum(
        &seg,
        pseudo_header_sum(src.ip(), dst.ip(), PROTO_UDP, seg.len()),
    );
    let word = !sum;
    let mut check = seg.clone();
    check[seg.len() - 2..].copy_from_slice(&word.to_be_bytes());
    assert_eq!(
        transport_checksum(src.ip(), dst.ip(), PROTO_UDP, &check),
        0xffff,
        "the tuned datagram's checksum computes to zero"
    );
    word
}

// ---- too big ---------------------------------------------------------------------

#[test]
fn datagram_exceeding_the_egress_mtu_after_the_header_is_too_big() {
    if !require_root() {
        return;
    }
    let (lab, wires) = lab();
    lab.edge()
        .ip(&["link", "set", "dev", &wires.eo, "mtu", "1280"])
        .expect("set eo MTU");
    lab.edge()
        .run_in(|| {
            let h = Harness::new(&wires);
            // IPv4: 20 + 8 + 38 + 1270 = 1336 > 1280; 1214 fits exactly (1280).
            let client = sa(CLIENT_V4, 46000);
            let edge = sa(EDGE_CLIENT_V4, 5000);
            let frame = udp_in(client, edge, &[7u8; 1270], None);
            let out = h.expect_icmp("IPv4 1270-byte payload + SPP", &frame);
            assert_frame(
                "IPv4 fragmentation needed, MTU 1280 - 38",
                &out,
                &too_big_icmp(&frame, 1280 - 38),
            );
            let out = h.forward(
                "IPv4 payload filling the MTU exactly",
                &udp_in(client, edge, &[7u8; 1214], None),
                true,
            );
            assert_eq!(out.len(), 14 + 1280);
            check_sent("IPv4 at the MTU", &out, false);
            // v2 adds 28 bytes: 1280 - 20 - 8 - 28 = 1224 fits, 1225 does not.
            let client = sa(CLIENT_V4, 46001);
            let edge = sa(EDGE_CLIENT_V4, 5002);
            let flows_before = h.datapath.udp_flows().expect("flows").len();
            let frame = udp_in(client, edge, &[7u8; 1225], None);
            let out = h.expect_icmp("IPv4 v2 first datagram one byte too big", &frame);
            assert_frame(
                "IPv4 fragmentation needed, MTU 1280 - 28",
                &out,
                &too_big_icmp(&frame, 1280 - 28),
            );
            // A first datagram that never left leaves no flow (nor a NAT port).
            assert_eq!(
                h.datapath.udp_flows().expect("flows").len(),
                flows_before,
                "a dropped first datagram leaves no flow behind"
            );
            // IPv6: 40 + 8 + 38 + 1270 > 1280; 1194 fits exactly.
            let client = sa(CLIENT_V6, 46000);
            let edge = sa(EDGE_CLIENT_V6, 5000);
            let frame = udp_in(client, edge, &[7u8; 1270], None);
            let out = h.expect_icmp("IPv6 1270-byte payload + SPP", &frame);
            assert_frame(
                "IPv6 packet too big, MTU 1280 - 38",
                &out,
                &too_big_icmp(&frame, 1280 - 38),
            );
            let out = h.forward(
                "IPv6 payload filling the MTU exactly",
                &udp_in(client, edge, &[7u8; 1194], None),
                true,
            );
            assert_eq!(out.len(), 14 + 1280);
            check_sent("IPv6 at the MTU", &out, false);

            // An established flow's datagram that outgrows the path gets the ICMP
            // error too, and the flow lives on.
            let out = h.expect_icmp(
                "IPv6 established flow, too big",
                &udp_in(client, edge, &[7u8; 1195], None),
            );
            assert_eq!(out[54], 2, "ICMPv6 packet too big");
            h.forward(
                "IPv6 established flow, fits again",
                &udp_in(client, edge, &[7u8; 100], None),
                true,
            );

            // Rate-limited per CPU: a burst of too-big datagrams gets at most a
            // burst's worth of messages; every datagram is counted.
            let before = h.drops()[DropReason::TooBig as usize];
            let mut icmp = 0;
            for i in 0..40u16 {
                let frame = udp_in(
                    sa(CLIENT_V4, 47000 + i),
                    sa(EDGE_CLIENT_V4, 5000),
                    &[7u8; 1270],
                    None,
                );
                match h.run(&frame, h.ec_index).verdict {
                    XDP_TX => icmp += 1,
                    XDP_DROP => {}
                    other => panic!("too-big datagram: verdict {other}"),
                }
            }
            assert_eq!(h.drops()[DropReason::TooBig as usize] - before, 40);
            // The bucket may be partly spent by the messages above, and the test
            // thread may run on either CPU: at least one, at most two bursts.
            assert!(
                (1..=2 * 10 + 2).contains(&icmp),
                "ICMP errors are rate-limited (10 per CPU in a burst): {icmp} of 40"
            );
        })
        .expect("edge thread");
    lab.close().expect("lab teardown");
}

/// The ICMP error the forwarder sends back for the client's `frame` (as it was
/// received): from the edge address to the client, MACs swapped, quoting the
/// client's IP header and UDP header, announcing `mtu`.
fn too_big_icmp(frame: &[u8], mtu: u16) -> Vec<u8> {
    let dst_mac: [u8; 6] = frame[6..12].try_into().unwrap();
    let src_mac: [u8; 6] = frame[0..6].try_into().unwrap();
    let mut rest = vec![0u8, 0];
    rest.extend_from_slice(&mtu.to_be_bytes());
    match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_P_IPV4 => {
            let client = IpAddr::from([frame[26], frame[27], frame[28], frame[29]]);
            let edge = IpAddr::from([frame[30], frame[31], frame[32], frame[33]]);
            rest.extend_from_slice(&frame[14..14 + 28]);
            let icmp = icmp4(3, 4, &rest);
            eth(
                dst_mac,
                src_mac,
                ETH_P_IPV4,
                &ipv4_df_proto(edge, client, PROTO_ICMP, &icmp),
            )
        }
        _ => {
            let client = Ipv6Addr::from(<[u8; 16]>::try_from(&frame[22..38]).unwrap());
            let edge = Ipv6Addr::from(<[u8; 16]>::try_from(&frame[38..54]).unwrap());
            rest.extend_from_slice(&frame[14..14 + 48]);
            let icmp = icmp6(edge, client, 2, 0, &rest);
            eth(
                dst_mac,
                src_mac,
                ETH_P_IPV6,
                &ipv6(edge, client, PROTO_ICMPV6, &icmp),
            )
        }
    }
}

// ---- regressions -----------------------------------------------------------------

/// Two UDP apps whose origins share an address and port: replies must reach the
/// clients of both. `ORIGIN_PORTS` names only one app per (address, port); the
/// return path must go by the flow (its origin and its app), not by that app.
#[test]
fn two_apps_sharing_an_origin_port_both_get_replies() {
    if !require_root() {
        return;
    }
    let (lab, wires) = lab();
    let config = format!(
        r#"
[agent]
interfaces = ["{}", "{}"]

[[apps]]
id = "a"
protocol = "udp/6000"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:9000"]
proxy_protocol = "simple"

[[apps]]
id = "b"
protocol = "udp/6001"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:9000"]
proxy_protocol = "simple"
"#,
        wires.ec, wires.eo
    );
    lab.edge()
        .run_in(|| {
            let h = Harness::with_config(&wires, &config);
            for port in [6000u16, 6001] {
                let client = sa(CLIENT_V4, 47000);
                let edge = sa(EDGE_CLIENT_V4, port);
                h.forward("request", &udp_in(client, edge, b"x", None), true);
                let out = h.forward(
                    &format!("reply to the flow of udp/{port}"),
                    &udp_in(
                        sa(ORIGIN_V4, 9000),
                        sa(EDGE_ORIGIN_V4, port),
                        &spp_payload(client, edge, b"y"),
                        None,
                    ),
                    false,
                );
                let want = udp_out(wires.cl_mac, wires.ec_mac, edge, client, b"y", false);
                assert_frame("reply", &out, &want);
            }
        })
        .expect("edge thread");
    lab.close().expect("lab teardown");
}

// ---- same-host peers: partial checksums --------------------------------------------

/// What a same-host sender with checksum offload leaves in the UDP checksum field
/// (`CHECKSUM_PARTIAL`): the folded pseudo-header sum, not complemented.
fn partial_checksum(src: SocketAddr, dst: SocketAddr, payload_len: usize) -> u16 {
    pseudo_header_sum(src.ip(), dst.ip(), PROTO_UDP, 8 + payload_len) as u16
}

/// A frame as a same-host peer sends it: its checksum is only the pseudo-header sum.
fn udp_partial(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let frame = udp_in(
        src,
        dst,
        payload,
        Some(partial_checksum(src, dst, payload.len())),
    );
    assert!(
        !frame_checksum_ok(&frame),
        "the crafted partial frame must not verify as it stands"
    );
    frame
}

/// Whether the UDP checksum of a whole frame verifies (no options, no extension
/// headers).
fn frame_checksum_ok(frame: &[u8]) -> bool {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_P_IPV4 => {
            let src = IpAddr::from([frame[26], frame[27], frame[28], frame[29]]);
            let dst = IpAddr::from([frame[30], frame[31], frame[32], frame[33]]);
            transport_checksum_ok(src, dst, PROTO_UDP, &frame[34..])
        }
        _ => {
            let src = IpAddr::from(<[u8; 16]>::try_from(&frame[22..38]).unwrap());
            let dst = IpAddr::from(<[u8; 16]>::try_from(&frame[38..54]).unwrap());
            transport_checksum_ok(src, dst, PROTO_UDP, &frame[54..])
        }
    }
}

fn partial_both_ways(h: &mut Harness, f: &Family) {
    let w = h.w.clone();
    // What the forwarder sends the origin from local port `local` to origin port
    // `port`, and the client from the edge.
    let to_origin = |local: u16, port: u16, body: &[u8]| {
        udp_out(
            w.oe_mac,
            w.eo_mac,
            sa(f.local, local),
            sa(f.origin, port),
            body,
            false,
        )
    };
    let to_client = |edge: SocketAddr, client: SocketAddr, body: &[u8]| {
        udp_out(w.cl_mac, w.ec_mac, edge, client, body, false)
    };
    // Odd, empty, and long enough for whole 256-byte chunks plus every tail size.
    let payloads: [Vec<u8>; 4] = [
        b"hello, origin".to_vec(),
        Vec::new(),
        (0..1000u32).map(|i| (i * 7) as u8).collect(),
        vec![0xff; 511],
    ];
    for (i, payload) in payloads.iter().enumerate() {
        let what = |m: &str| format!("{m} ({}, payload {} bytes)", f.client, payload.len());
        // SPP, both ways.
        let client = sa(f.client, 46000 + i as u16);
        let edge = sa(f.edge, 5000);
        let out = h.forward(
            &what("SPP request"),
            &udp_partial(client, edge, payload),
            true,
        );
        let want = to_origin(5000, 5000, &spp_payload(client, edge, payload));
        check_sent(&what("SPP request"), &out, false);
        assert_frame(&what("SPP request"), &out, &want);
        let reply = spp_payload(client, edge, payload);
        let out = h.forward(
            &what("SPP reply"),
            &udp_partial(sa(f.origin, 5000), sa(f.local, 5000), &reply),
            false,
        );
        let want = to_client(edge, client, payload);
        check_sent(&what("SPP reply"), &out, false);
        assert_frame(&what("SPP reply"), &out, &want);

        // Plain NAT, both ways.
        let client = sa(f.client, 46100 + i as u16);
        let edge = sa(f.edge, 5001);
        let out = h.forward(
            &what("NAT request"),
            &udp_partial(client, edge, payload),
            true,
        );
        let port = h.new_nat_port(client, edge, f.local);
        let want = to_origin(port, 5001, payload);
        check_sent(&what("NAT request"), &out, false);
        assert_frame(&what("NAT request"), &out, &want);
        let out = h.forward(
            &what("NAT reply"),
            &udp_partial(sa(f.origin, 5001), sa(f.local, port), payload),
            false,
        );
        let want = to_client(edge, client, payload);
        assert_frame(&what("NAT reply"), &out, &want);

        // PROXY v2 on the first datagram, plain on the next.
        let client = sa(f.client, 46200 + i as u16);
        let edge = sa(f.edge, 5002);
        let out = h.forward(&what("v2 first"), &udp_partial(client, edge, payload), true);
        let port = h.new_nat_port(client, edge, f.local);
        let want = to_origin(port, 5002, &v2_payload(client, edge, payload));
        assert_frame(&what("v2 first"), &out, &want);
        let out = h.forward(
            &what("v2 second"),
            &udp_partial(client, edge, payload),
            true,
        );
        let want = to_origin(port, 5002, payload);
        assert_frame(&what("v2 second"), &out, &want);
    }
}

/// Same-host peers (containers on the forwarder's host) send `CHECKSUM_PARTIAL`
/// frames: the output carries the full, correct checksum, exactly as for a wire
/// peer's frame, in every mode, family and direction.
#[test]
fn partial_checksums_of_same_host_peers_are_completed() {
    with_harness(|h| {
        partial_both_ways(h, &V4);
        partial_both_ways(h, &V6);
    });
}

// ---- replies only from the origin ----------------------------------------------------

fn spoofed_replies(h: &mut Harness, f: &Family) {
    let client = sa(f.client, 47000);
    let edge = sa(f.edge, 5000);
    let origin = sa(f.origin, 5000);
    let local = sa(f.local, 5000);
    h.forward("SPP request", &udp_in(client, edge, b"x", None), true);
    let forged = udp_in(origin, local, &spp_payload(client, edge, b"forged"), None);
    // From the client side, with the origin's address and port.
    h.expect_drop_on(
        "SPP reply arriving on the client-side interface",
        &forged,
        h.ec_index,
        DropReason::Spoofed,
    );
    // On the origin's interface, but not from the origin's (next hop's) MAC.
    h.expect_drop_on(
        "SPP reply from another MAC on the origin's interface",
        &forged,
        h.eo_index,
        DropReason::Spoofed,
    );
    // Sent to the edge address itself (what a client can reach), from the client side.
    h.expect_drop_on(
        "SPP reply to the edge address from the client side",
        &udp_in(origin, edge, &spp_payload(client, edge, b"forged"), None),
        h.ec_index,
        DropReason::Spoofed,
    );
    // The real thing still goes through.
    h.forward("SPP reply from the origin", &forged, false);

    let client = sa(f.client, 47001);
    let edge = sa(f.edge, 5001);
    h.forward("NAT request", &udp_in(client, edge, b"x", None), true);
    let port = h.new_nat_port(client, edge, f.local);
    let forged = udp_in(sa(f.origin, 5001), sa(f.local, port), b"forged", None);
    h.expect_drop_on(
        "NAT reply arriving on the client-side interface",
        &forged,
        h.ec_index,
        DropReason::Spoofed,
    );
    h.expect_drop_on(
        "NAT reply from another MAC on the origin's interface",
        &forged,
        h.eo_index,
        DropReason::Spoofed,
    );
    h.forward("NAT reply from the origin", &forged, false);
}

/// A datagram with the origin's address and port is a reply only when it arrives
/// where the route to the origin leaves, from that route's next hop (XDP runs
/// before rp_filter): anything else is `spoofed`.
#[test]
fn replies_not_from_the_origins_interface_and_next_hop_are_spoofed() {
    with_harness(|h| {
        spoofed_replies(h, &V4);
        spoofed_replies(h, &V6);
    });
}

// ---- reloads re-classify live flows --------------------------------------------------

/// A reload that adds a block rule stops a live flow's client at its next
/// datagram (counted as `firewall` and as a hit of the rule); removing the rule
/// lets it through again. Rule hits of a live flow are counted per packet.
#[test]
fn a_reload_that_adds_a_block_rule_stops_a_live_flow() {
    with_harness(|h| {
        let allow = format!(
            "{}\n[[access_rules]]\nmode = \"allow\"\ntarget = \"ip\"\nvalue = \"{CLIENT_V4}\"\n",
            config(&h.w.ec, &h.w.eo)
        );
        h.reload(&allow);
        let client = sa(CLIENT_V4, 48000);
        let edge = sa(EDGE_CLIENT_V4, 5000);
        for _ in 0..3 {
            h.forward("request", &udp_in(client, edge, b"ok", None), true);
        }
        let hits = |h: &Harness, rule: &str| {
            h.datapath
                .counters()
                .expect("counters")
                .rule_hits
                .get(rule)
                .copied()
                .unwrap_or(0)
        };
        assert_eq!(
            hits(h, &CLIENT_V4.to_string()),
            3,
            "the allow rule is hit by every datagram of the live flow"
        );
        let block = format!(
            "{}\n[[access_rules]]\nmode = \"block\"\ntarget = \"ip_range\"\nvalue = \"10.0.1.0/24\"\n",
            config(&h.w.ec, &h.w.eo)
        );
        h.reload(&block);
        h.expect_drop(
            "the live flow's next datagram after the reload",
            &udp_in(client, edge, b"blocked", None),
            true,
            DropReason::Firewall,
        );
        h.expect_drop(
            "and the one after",
            &udp_in(client, edge, b"blocked", None),
            true,
            DropReason::Firewall,
        );
        assert_eq!(hits(h, "10.0.1.0/24"), 2, "the block rule counts both");
        h.reload(&config(&h.w.ec, &h.w.eo));
        h.forward(
            "the flow after the rule is gone",
            &udp_in(client, edge, b"again", None),
            true,
        );
    });
}

// ---- flow admission under floods -------------------------------------------------------

/// A spoofed client: a distinct source address per `n` (172.16.0.0/12).
fn spoofed(n: u32) -> SocketAddr {
    let b = n.to_be_bytes();
    sa(
        Ipv4Addr::new(172, 16 | (b[1] & 0x0f), b[2], b[3]),
        1024 + (n % 60_000) as u16,
    )
}

/// Every live flow's (local address, NAT port) is its own: no two NAT flows share
/// a port on the same address.
#[track_caller]
fn assert_nat_ports_unique(h: &Harness) {
    let mut seen = HashSet::new();
    for (key, state) in h.datapath.udp_flows().expect("flows") {
        if state.flags & forwarder_common::FLOW_SPP != 0 {
            continue;
        }
        assert!(
            seen.insert((state.origin, state.local_port)),
            "NAT port {} held by two live flows (one is {key:?})",
            state.local_port
        );
    }
}

/// A flow starts new, is marked when the origin answers and becomes assured at
/// the client's next datagram (SPP and plain NAT alike); forwarding is the same
/// before and after, the NAT port is kept.
#[test]
fn a_flow_is_assured_when_the_client_speaks_after_the_origin_answered() {
    with_harness(|h| {
        let w = h.w.clone();
        let before = h.datapath.flow_counters().expect("counters");
        // Plain NAT.
        let client = sa(CLIENT_V4, 42001);
        let edge = sa(EDGE_CLIENT_V4, 5001);
        h.forward("NAT first", &udp_in(client, edge, b"one", None), true);
        assert_eq!(h.flow(client, edge).admission, ADMISSION_NEW);
        let port = h.new_nat_port(client, edge, V4.local);
        h.forward(
            "NAT second, no reply yet",
            &udp_in(client, edge, b"two", None),
            true,
        );
        assert_eq!(
            h.flow(client, edge).admission,
            ADMISSION_NEW,
            "one-way traffic never promotes"
        );
        let reply = udp_in(sa(ORIGIN_V4, 5001), sa(EDGE_ORIGIN_V4, port), b"r", None);
        h.forward("NAT reply", &reply, false);
        assert_eq!(h.flow(client, edge).admission, ADMISSION_REPLIED);
        let out = h.forward(
            "NAT after reply",
            &udp_in(client, edge, b"three", None),
            true,
        );
        let want = udp_out(
            w.oe_mac,
            w.eo_mac,
            sa(EDGE_ORIGIN_V4, port),
            sa(ORIGIN_V4, 5001),
            b"three",
            false,
        );
        assert_frame("the promoted flow's datagram", &out, &want);
        let flow = h.flow(client, edge);
        assert_eq!(flow.admission, ADMISSION_ASSURED);
        assert_eq!(
            (flow.packets_in, flow.packets_out),
            (3, 1),
            "counts carried over"
        );
        h.forward("NAT reply to the assured flow", &reply, false);
        // SPP.
        let client = sa(CLIENT_V4, 42000);
        let edge = sa(EDGE_CLIENT_V4, 5000);
        h.forward("SPP first", &udp_in(client, edge, b"one", None), true);
        let reply = udp_in(
            sa(ORIGIN_V4, 5000),
            sa(EDGE_ORIGIN_V4, 5000),
            &spp_payload(client, edge, b"r"),
            None,
        );
        h.forward("SPP reply", &reply, false);
        h.forward("SPP after reply", &udp_in(client, edge, b"two", None), true);
        assert_eq!(h.flow(client, edge).admission, ADMISSION_ASSURED);
        let after = h.datapath.flow_counters().expect("counters");
        let delta = |c: FlowCounter| after[c as usize] - before[c as usize];
        assert_eq!(delta(FlowCounter::Admitted), 2);
        assert_eq!(delta(FlowCounter::Promoted), 2);
        assert_eq!(delta(FlowCounter::Reclaimed), 0);
    });
}

/// More one-way flows than the flow tables hold (a random-source flood) leave
/// the assured flows alone: still there, same NAT port, replies still delivered.
/// The flood's own flows are what the LRU evicts.
#[test]
fn a_flood_of_one_way_flows_never_evicts_an_assured_flow() {
    with_harness(|h| {
        let w = h.w.clone();
        let nat_client = sa(CLIENT_V4, 43001);
        let nat_edge = sa(EDGE_CLIENT_V4, 5001);
        h.forward("NAT first", &udp_in(nat_client, nat_edge, b"a", None), true);
        let port = h.new_nat_port(nat_client, nat_edge, V4.local);
        let nat_reply = udp_in(sa(ORIGIN_V4, 5001), sa(EDGE_ORIGIN_V4, port), b"r", None);
        h.forward("NAT reply", &nat_reply, false);
        h.forward("NAT again", &udp_in(nat_client, nat_edge, b"b", None), true);
        let spp_client = sa(CLIENT_V4, 43000);
        let spp_edge = sa(EDGE_CLIENT_V4, 5000);
        let spp_reply = udp_in(
            sa(ORIGIN_V4, 5000),
            sa(EDGE_ORIGIN_V4, 5000),
            &spp_payload(spp_client, spp_edge, b"r"),
            None,
        );
        h.forward("SPP first", &udp_in(spp_client, spp_edge, b"a", None), true);
        h.forward("SPP reply", &spp_reply, false);
        h.forward("SPP again", &udp_in(spp_client, spp_edge, b"b", None), true);
        assert_eq!(h.flow(nat_client, nat_edge).admission, ADMISSION_ASSURED);
        assert_eq!(h.flow(spp_client, spp_edge).admission, ADMISSION_ASSURED);

        // More than both tables hold: a single LRU table of any size would have
        // evicted the assured flows (the least recently used).
        let flood = MAX_FLOWS + MAX_NEW_FLOWS;
        let fd = h.datapath.xdp_program_fd(PROG_XDP).expect("prog fd");
        for n in 0..flood {
            let frame = udp_in(spoofed(n), spp_edge, b"x", None);
            let out = test_run_xdp(
                fd,
                &frame,
                &TestRunOptions {
                    ingress_ifindex: h.ec_index,
                    ..Default::default()
                },
            )
            .expect("test run");
            assert_eq!(out.verdict, XDP_REDIRECT, "flood datagram {n} is forwarded");
        }
        let flows = h.datapath.udp_flows().expect("flows");
        let new = flows
            .iter()
            .filter(|(_, s)| s.admission != ADMISSION_ASSURED)
            .count();
        assert!(
            new <= MAX_NEW_FLOWS as usize,
            "the new-flow table is bounded ({new} new flows)"
        );
        assert!(
            new > MAX_NEW_FLOWS as usize / 2,
            "the flood filled the new-flow table ({new} new flows)"
        );
        assert_eq!(h.flow(nat_client, nat_edge).admission, ADMISSION_ASSURED);
        assert_eq!(
            h.flow(nat_client, nat_edge).local_port,
            port,
            "NAT port kept"
        );
        assert_eq!(h.flow(spp_client, spp_edge).admission, ADMISSION_ASSURED);
        let out = h.forward("NAT reply after the flood", &nat_reply, false);
        assert_frame(
            "NAT reply after the flood",
            &out,
            &udp_out(w.cl_mac, w.ec_mac, nat_edge, nat_client, b"r", false),
        );
        let out = h.forward("SPP reply after the flood", &spp_reply, false);
        assert_frame(
            "SPP reply after the flood",
            &out,
            &udp_out(w.cl_mac, w.ec_mac, spp_edge, spp_client, b"r", false),
        );
    });
}

/// A flood of one-way NAT flows larger than the port pool: assured flows keep
/// their ports; a legitimate client arriving mid-flood still gets a port (one of
/// a flow the origin never answered is reclaimed, counted) and its reply; no two
/// live flows ever share a port. With every port held by assured flows, a new
/// flow is refused rather than taking one.
#[test]
fn the_nat_port_pool_is_reclaimed_from_unanswered_flows_only() {
    with_harness(|h| {
        let w = h.w.clone();
        // Two ports in the pool.
        let small = config(&h.w.ec, &h.w.eo).replace(
            &format!("udp_nat_ports = \"{NAT_LOW}-{NAT_HIGH}\""),
            &format!("udp_nat_ports = \"{NAT_LOW}-{}\"", NAT_LOW + 1),
        );
        h.reload(&small);
        let edge = sa(EDGE_CLIENT_V4, 5001);
        let assure = |h: &mut Harness, client: SocketAddr| -> u16 {
            h.forward("first", &udp_in(client, edge, b"a", None), true);
            let port = h.flow(client, edge).local_port;
            let reply = udp_in(sa(ORIGIN_V4, 5001), sa(EDGE_ORIGIN_V4, port), b"r", None);
            h.forward("reply", &reply, false);
            h.forward("again", &udp_in(client, edge, b"b", None), true);
            assert_eq!(h.flow(client, edge).admission, ADMISSION_ASSURED);
            port
        };
        let legit = sa(CLIENT_V4, 44000);
        let legit_port = assure(h, legit);
        let before = h.datapath.flow_counters().expect("counters")[FlowCounter::Reclaimed as usize];
        for n in 0..200 {
            let out = h.run(&udp_in(spoofed(n), edge, b"x", None), h.ec_index);
            assert_eq!(
                out.verdict, XDP_REDIRECT,
                "spoofed flow {n} gets the free port"
            );
            assert_eq!(h.flow(legit, edge).local_port, legit_port);
            assert_nat_ports_unique(h);
        }
        let reclaimed =
            h.datapath.flow_counters().expect("counters")[FlowCounter::Reclaimed as usize] - before;
        assert!(
            reclaimed >= 150,
            "unanswered flows gave their port up ({reclaimed})"
        );
        // A legitimate newcomer mid-flood is served, and answered.
        let newcomer = sa(CLIENT_V4, 44001);
        let out = h.forward("newcomer", &udp_in(newcomer, edge, b"hi", None), true);
        let port = h.flow(newcomer, edge).local_port;
        assert_ne!(port, legit_port);
        assert_frame(
            "newcomer's datagram",
            &out,
            &udp_out(
                w.oe_mac,
                w.eo_mac,
                sa(EDGE_ORIGIN_V4, port),
                sa(ORIGIN_V4, 5001),
                b"hi",
                false,
            ),
        );
        let reply = udp_in(sa(ORIGIN_V4, 5001), sa(EDGE_ORIGIN_V4, port), b"yo", None);
        let out = h.forward("newcomer's reply", &reply, false);
        assert_frame(
            "newcomer's reply",
            &out,
            &udp_out(w.cl_mac, w.ec_mac, edge, newcomer, b"yo", false),
        );
        h.forward("newcomer again", &udp_in(newcomer, edge, b"b", None), true);
        assert_eq!(h.flow(newcomer, edge).admission, ADMISSION_ASSURED);
        // Both ports are now held by assured flows: a new flow gets none.
        h.expect_drop(
            "a new flow when every port is assured",
            &udp_in(spoofed(9999), edge, b"x", None),
            true,
            DropReason::NoFlow,
        );
        assert_eq!(h.flow(legit, edge).local_port, legit_port);
        assert_eq!(h.flow(newcomer, edge).local_port, port);
        assert_nat_ports_unique(h);
    });
}

/// While the pool has free ports, a new flow takes one and never reclaims: 40
/// unanswered NAT flows in the 100-port pool all live on, each with its own port
/// (reclaiming as soon as a couple of probes hit held ports would make flows steal
/// each other's ports back and forth).
#[test]
fn nat_ports_are_not_reclaimed_while_the_pool_has_free_ones() {
    with_harness(|h| {
        let edge = sa(EDGE_CLIENT_V4, 5001);
        let before = h.datapath.flow_counters().expect("counters")[FlowCounter::Reclaimed as usize];
        for n in 0..40 {
            h.forward(
                "a new NAT flow",
                &udp_in(spoofed(n), edge, b"x", None),
                true,
            );
        }
        let after = h.datapath.flow_counters().expect("counters")[FlowCounter::Reclaimed as usize];
        assert_eq!(after, before, "nothing reclaimed");
        let live = h
            .datapath
            .udp_flows()
            .expect("flows")
            .iter()
            .filter(|(k, _)| k.edge_port == 5001)
            .count();
        assert_eq!(live, 40, "every flow lives on");
        assert_nat_ports_unique(h);
    });
}

/// `udp_new_flows_per_source`: a source (/32; /64 for IPv6) opening more new
/// flows in a second than allowed has the extra ones dropped (`source_limit`);
/// other sources and the source's live flows are not affected.
#[test]
fn new_flows_per_source_are_limited() {
    with_harness(|h| {
        let limited = config(&h.w.ec, &h.w.eo)
            .replace("[agent]\n", "[agent]\nudp_new_flows_per_source = 3\n");
        h.reload(&limited);
        let edge4 = sa(EDGE_CLIENT_V4, 5000);
        for port in 45000..45003 {
            h.forward(
                "within the limit",
                &udp_in(sa(CLIENT_V4, port), edge4, b"x", None),
                true,
            );
        }
        h.expect_drop(
            "the fourth new flow of the source",
            &udp_in(sa(CLIENT_V4, 45003), edge4, b"x", None),
            true,
            DropReason::SourceLimit,
        );
        h.forward(
            "a live flow of the limited source",
            &udp_in(sa(CLIENT_V4, 45000), edge4, b"y", None),
            true,
        );
        h.forward(
            "another source",
            &udp_in(sa(Ipv4Addr::new(10, 0, 1, 77), 45003), edge4, b"x", None),
            true,
        );
        // IPv6: two hosts of one /64 share the limit; another /64 does not.
        let edge6 = sa(EDGE_CLIENT_V6, 5000);
        let host =
            |net: u16, id: u16, port: u16| sa(Ipv6Addr::new(0xfd00, 1, 0, net, 0, 0, 0, id), port);
        h.forward("v6 a", &udp_in(host(0, 2, 1), edge6, b"x", None), true);
        h.forward("v6 b", &udp_in(host(0, 3, 1), edge6, b"x", None), true);
        h.forward("v6 a", &udp_in(host(0, 2, 2), edge6, b"x", None), true);
        h.expect_drop(
            "the fourth new flow of the /64",
            &udp_in(host(0, 4, 1), edge6, b"x", None),
            true,
            DropReason::SourceLimit,
        );
        h.forward(
            "another /64",
            &udp_in(host(1, 2, 1), edge6, b"x", None),
            true,
        );
    });
}

/// A client whose source port is also an origin's port (5000, the SPP origin's)
/// looks like a possible reply: its new flow is still found for every datagram —
/// one flow, counted once per datagram, promoted as any other.
#[test]
fn a_client_on_an_origin_port_keeps_one_flow() {
    with_harness(|h| {
        let client = sa(CLIENT_V4, 5000);
        let edge = sa(EDGE_CLIENT_V4, 5000);
        for _ in 0..3 {
            h.forward("datagram", &udp_in(client, edge, b"x", None), true);
        }
        let key = FlowKey {
            client: addr16(client.ip()),
            edge: addr16(edge.ip()),
            client_port: 5000,
            edge_port: 5000,
        };
        let flows: Vec<FlowState> = h
            .datapath
            .udp_flows()
            .expect("flows")
            .into_iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, s)| s)
            .collect();
        assert_eq!(flows.len(), 1, "one flow");
        assert_eq!(flows[0].packets_in, 3, "every datagram counted on it");
        assert_eq!(flows[0].admission, ADMISSION_NEW);
    });
}

/// `udp_new_flows_per_second`: an app admits that many new flows a second
/// (whatever their sources) and drops the rest as `flow_limit`; its live flows
/// and other apps are not affected.
#[test]
fn new_flows_per_app_are_limited() {
    with_harness(|h| {
        let limited = config(&h.w.ec, &h.w.eo).replace(
            "id = \"spp4\"\n",
            "id = \"spp4\"\nudp_new_flows_per_second = 3\n",
        );
        assert_ne!(limited, config(&h.w.ec, &h.w.eo), "the key went in");
        h.reload(&limited);
        let edge = sa(EDGE_CLIENT_V4, 5000);
        for n in 0..3 {
            h.forward(
                "within the app's limit",
                &udp_in(spoofed(n), edge, b"x", None),
                true,
            );
        }
        h.expect_drop(
            "the app's fourth new flow this second",
            &udp_in(spoofed(3), edge, b"x", None),
            true,
            DropReason::FlowLimit,
        );
        h.forward(
            "a live flow of the limited app",
            &udp_in(spoofed(0), edge, b"y", None),
            true,
        );
        h.forward(
            "another app",
            &udp_in(spoofed(3), sa(EDGE_CLIENT_V4, 5001), b"x", None),
            true,
        );
    });
}

// ---- what the JIT made ----------------------------------------------------------------

/// LLVM turns small copies and fills into calls of byte-at-a-time memmove/memset
/// subroutines unless told otherwise (forwarder-ebpf/build.rs): the loaded datapath
/// must contain no such subprogram (and the listing must be the datapath's: its
/// entry is there). The JIT compiles every BPF subprogram and call one to one; the
/// check reads the translated program (`bpftool prog dump xlated`), as this
/// bpftool is built without the disassembler that `dump jited` needs.
#[test]
fn the_loaded_datapath_calls_no_memory_subroutines() {
    with_harness(|h| {
        let id = h
            .datapath
            .xdp_program_id(PROG_XDP)
            .expect("program id")
            .to_string();
        let out = std::process::Command::new("bpftool")
            .args(["prog", "dump", "xlated", "id", &id])
            .output()
            .expect("bpftool");
        assert!(out.status.success(), "bpftool: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let functions: Vec<&str> = text
            .lines()
            .filter(|l| l.ends_with(':') && !l.starts_with(' ') && !l.starts_with(';'))
            .collect();
        assert!(
            functions.iter().any(|f| f.contains("xdp_forwarder")),
            "the dump shows the program's functions: {functions:?}"
        );
        for name in ["memmove", "memset", "memcpy", "memcmp", "bcmp"] {
            assert!(
                !functions.iter().any(|f| f.contains(name)),
                "the JIT output has a {name} subroutine: {functions:?}"
            );
        }
    });
}

// ---- origin tables (lb): Maglev, weights, health ------------------------------------

/// The config of the origin-table test: one SPP app, origins of weight 1 and 3.
fn weighted_config(ec: &str, eo: &str) -> String {
    format!(
        r#"
[agent]
interfaces = ["{ec}", "{eo}"]

[[apps]]
id = "weighted"
protocol = "udp/5200"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:5200", {{ address = "udp://10.0.2.3:5200", weight = 3 }}]
proxy_protocol = "simple"
"#
    )
}

#[test]
fn new_flows_follow_the_weighted_origin_table_and_move_off_a_down_origin() {
    if !require_root() {
        return;
    }
    let (lab, wires) = lab();
    let toml = weighted_config(&wires.ec, &wires.eo);
    lab.edge()
        .run_in(|| {
            let mut h = Harness::with_config(&wires, &toml);
            let config = Config::parse(&toml).unwrap();
            let app = &config.apps[0];
            let edge = sa(EDGE_CLIENT_V4, 5200);
            let origins = [IpAddr::from(ORIGIN_V4), IpAddr::from(ORIGIN2_V4)];
            // The origin the agent's table gives a client port.
            let pick = |table: &[u16], client: SocketAddr| -> IpAddr {
                let IpAddr::V4(ip) = client.ip() else {
                    unreachable!()
                };
                let hash = forwarder_common::flow_hash(&addr16(ip.into()), client.port());
                origins[usize::from(table[(hash % table.len() as u32) as usize])]
            };
            let send = |h: &Harness, client: SocketAddr, to: IpAddr, what: &str| {
                let out = h.forward(what, &udp_in(client, edge, b"q", None), true);
                let want = udp_out(
                    wires.oe_mac,
                    wires.eo_mac,
                    sa(EDGE_ORIGIN_V4, 5200),
                    sa(to, 5200),
                    &spp_payload(client, edge, b"q"),
                    false,
                );
                assert_frame(what, &out, &want);
            };
            let all_up = forwarder::lb::table(app, &Default::default());
            assert_eq!(all_up.len(), 4093);
            let mut to_second = 0;
            for port in 41000..41200u16 {
                let client = sa(CLIENT_V4, port);
                let to = pick(&all_up, client);
                to_second += usize::from(to == origins[1]);
                send(&h, client, to, &format!("new flow from port {port}"));
            }
            // Weight 3 of 4: about 150 of 200.
            assert!(
                (120..=180).contains(&to_second),
                "{to_second} of 200 to the weight-3 origin"
            );

            // The weight-3 origin goes down: new flows all go to the other one.
            let mut availability = forwarder::lb::Availability::default();
            availability
                .down
                .insert(("weighted".to_string(), "10.0.2.3:5200".to_string()));
            let plan = h
                .datapath
                .plan()
                .unwrap()
                .with_availability(&config, &availability);
            h.datapath.apply(&plan).unwrap();
            for port in 42000..42050u16 {
                send(
                    &h,
                    sa(CLIENT_V4, port),
                    origins[0],
                    &format!("new flow {port}, one origin up"),
                );
            }
            // Live flows of the down origin still go there until they are moved ...
            let moved_client = (41000..41200u16)
                .map(|p| sa(CLIENT_V4, p))
                .find(|c| pick(&all_up, *c) == origins[1])
                .unwrap();
            send(&h, moved_client, origins[1], "a live flow before the move");
            // ... then to the survivor, with the same client in the SPP header.
            let index = plan.app_ids.iter().position(|id| id == "weighted").unwrap() as u32;
            let first = plan.apps[index as usize].origin_first;
            let (moved, ended) = h.datapath.move_udp_flows(index, first + 1).unwrap();
            assert!(ended.is_empty());
            assert_eq!(
                moved as usize, to_second,
                "every flow of the down origin moved"
            );
            send(&h, moved_client, origins[0], "the same flow after the move");
            let flow = h.flow(moved_client, edge);
            assert_eq!(
                (flow.origin, flow.packets_in),
                (first, 3),
                "moved, not a new flow"
            );
        })
        .expect("edge thread");
    lab.close().expect("lab teardown");
}
