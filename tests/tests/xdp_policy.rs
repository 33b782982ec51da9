//! SPEC §3 steps 1–9 through `BPF_PROG_TEST_RUN`: crafted frames in, exact verdicts
//! and exact counter deltas out, IPv4 and IPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use forwarder::config::Config;
use forwarder::datapath::{Datapath, PROG_XDP, Plan, test_run::run_once};
use forwarder::route::OriginRoute;
use forwarder_common::DropReason;
use forwarder_tests::frames::*;
use forwarder_tests::require_root;

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const EDGE4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
const EDGE4_ORIGIN_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const ORIGIN4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const OTHER4: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 9);
const BLOCKED4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 5);
const ALLOWED_IN_BLOCKED4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const EDGE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 9);
const BLOCKED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, 5);

const CONFIG: &str = r#"
[agent]
interfaces = ["lo"]
pass = ["tcp/22"]

[firewall]
default = "allow"

[[access_rules]]
mode = "block"
target = "ip_range"
value = "198.51.100.0/24"

[[access_rules]]
mode = "allow"
target = "ip"
value = "198.51.100.7"

[[access_rules]]
mode = "block"
target = "ip_range"
value = "2001:db8:bad::/48"

[[apps]]
id = "game4"
protocol = "udp/5000"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:5000"]
proxy_protocol = "simple"

[[apps]]
id = "game6"
protocol = "udp/5000"
edge_ips = ["fd00:1::1"]
origin_direct = ["udp://[fd00:2::2]:5000"]
proxy_protocol = "simple"

[[apps]]
id = "web"
protocol = "tcp/6000-6010"
origin_direct = ["tcp://10.0.2.2:7000-7010"]

[[apps]]
id = "open"
protocol = "tcp/7100"
ip_firewall = false
origin_direct = ["tcp://10.0.2.2:7100"]
"#;

struct Harness {
    datapath: Datapath,
}

impl Harness {
    fn new() -> Harness {
        let config = Config::parse(CONFIG).expect("test config is valid");
        let edges: Vec<IpAddr> = vec![EDGE4.into(), EDGE4_ORIGIN_SIDE.into(), EDGE6.into()];
        let plan = Plan::build(&config, &edges, |origin| {
            Ok(OriginRoute {
                local: match origin {
                    IpAddr::V4(_) => EDGE4_ORIGIN_SIDE.into(),
                    IpAddr::V6(_) => "fd00:2::1".parse().unwrap(),
                },
                dev: "lo".into(),
                ifindex: 1,
                next_hop: origin,
            })
        })
        .expect("plan");
        let mut datapath = Datapath::load().expect("load the eBPF object");
        datapath.apply(&plan).expect("fill maps");
        Harness { datapath }
    }

    fn run(&self, frame: &[u8]) -> u32 {
        let fd = self.datapath.xdp_program_fd(PROG_XDP).expect("prog fd");
        run_once(fd, frame).expect("test run").verdict
    }

    /// Runs `frame` and asserts the verdict and that exactly the expected drop
    /// counter (if any) grew by one.
    #[track_caller]
    fn expect(&self, what: &str, frame: &[u8], expected: Expect) {
        let before = self.datapath.counters().expect("counters");
        let verdict = self.run(frame);
        let after = self.datapath.counters().expect("counters");
        let mut deltas = [0u64; DropReason::COUNT];
        for (i, d) in deltas.iter_mut().enumerate() {
            *d = after.drops[i] - before.drops[i];
        }
        match expected {
            Expect::Pass => {
                assert_eq!(verdict, XDP_PASS, "{what}: expected XDP_PASS");
                assert_eq!(deltas, [0; DropReason::COUNT], "{what}: no drop counted");
            }
            Expect::Drop(reason) => {
                assert_eq!(
                    verdict,
                    XDP_DROP,
                    "{what}: expected XDP_DROP ({})",
                    reason.label()
                );
                let mut want = [0u64; DropReason::COUNT];
                want[reason as usize] = 1;
                assert_eq!(deltas, want, "{what}: drop counted as {}", reason.label());
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Expect {
    Pass,
    Drop(DropReason),
}
use Expect::*;

fn udp4(src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    udp4_frame(src, 40000, dst, dport, b"payload")
}

#[test]
fn ipv4_decisions_follow_spec_order() {
    if !require_root() {
        return;
    }
    let h = Harness::new();
    // Step 1: not IP.
    h.expect("ARP", &ethernet(ETH_P_ARP, &[0u8; 28]), Pass);
    // Step 2: not an edge address, whatever it is.
    h.expect("UDP to another host", &udp4(CLIENT4, OTHER4, 1), Pass);
    h.expect(
        "GRE to another host",
        &ethernet(ETH_P_IPV4, &ipv4(CLIENT4, OTHER4, PROTO_GRE, &[0; 8])),
        Pass,
    );
    // Step 4: fragments to an edge address, first and non-first.
    let seg = udp(CLIENT4.into(), 4000, EDGE4.into(), 5000, b"abcdefgh");
    h.expect(
        "first fragment (MF, offset 0)",
        &ethernet(
            ETH_P_IPV4,
            &ipv4_with(CLIENT4, EDGE4, PROTO_UDP, &seg, &[], 0x2000),
        ),
        Drop(DropReason::Fragment),
    );
    h.expect(
        "non-first fragment (offset 8)",
        &ethernet(
            ETH_P_IPV4,
            &ipv4_with(CLIENT4, EDGE4, PROTO_UDP, &seg[..8], &[], 1),
        ),
        Drop(DropReason::Fragment),
    );
    // DF alone is not a fragment: classified further (to an unconfigured port).
    let seg_other_port = udp(CLIENT4.into(), 4000, EDGE4.into(), 5001, b"abcdefgh");
    h.expect(
        "DF is not a fragment",
        &ethernet(
            ETH_P_IPV4,
            &ipv4_with(CLIENT4, EDGE4, PROTO_UDP, &seg_other_port, &[], 0x4000),
        ),
        Drop(DropReason::NoApp),
    );
    // Step 5: ICMP.
    h.expect(
        "echo request",
        &ethernet(
            ETH_P_IPV4,
            &ipv4(CLIENT4, EDGE4, PROTO_ICMP, &icmp4(8, 0, &[0; 8])),
        ),
        Pass,
    );
    h.expect(
        "echo reply",
        &ethernet(
            ETH_P_IPV4,
            &ipv4(CLIENT4, EDGE4, PROTO_ICMP, &icmp4(0, 0, &[0; 8])),
        ),
        Pass,
    );
    h.expect(
        "dest unreachable",
        &ethernet(
            ETH_P_IPV4,
            &ipv4(CLIENT4, EDGE4, PROTO_ICMP, &icmp4(3, 3, &[0; 28])),
        ),
        Pass,
    );
    h.expect(
        "time exceeded",
        &ethernet(
            ETH_P_IPV4,
            &ipv4(CLIENT4, EDGE4, PROTO_ICMP, &icmp4(11, 0, &[0; 28])),
        ),
        Pass,
    );
    h.expect(
        "timestamp request",
        &ethernet(
            ETH_P_IPV4,
            &ipv4(CLIENT4, EDGE4, PROTO_ICMP, &icmp4(13, 0, &[0; 12])),
        ),
        Drop(DropReason::Icmp),
    );
    // Step 6: other protocols.
    h.expect(
        "GRE to the edge",
        &ethernet(ETH_P_IPV4, &ipv4(CLIENT4, EDGE4, PROTO_GRE, &[0; 8])),
        Drop(DropReason::Protocol),
    );
    // Step 7: pass list.
    h.expect(
        "tcp/22 pass entry",
        &tcp4_frame(CLIENT4, 40000, EDGE4, 22, 0x02),
        Pass,
    );
    h.expect(
        "tcp/22 pass on the other edge address",
        &tcp4_frame(CLIENT4, 40000, EDGE4_ORIGIN_SIDE, 22, 0x02),
        Pass,
    );
    // Step 8: no app.
    h.expect(
        "UDP to an unconfigured port",
        &udp4(CLIENT4, EDGE4, 5001),
        Drop(DropReason::NoApp),
    );
    h.expect(
        "TCP to the UDP app's port",
        &tcp4_frame(CLIENT4, 40000, EDGE4, 5000, 0x02),
        Drop(DropReason::NoApp),
    );
    h.expect(
        "UDP to the TCP app's port",
        &udp4(CLIENT4, EDGE4, 6000),
        Drop(DropReason::NoApp),
    );
    h.expect(
        "UDP app on an edge address it does not use",
        &udp4(CLIENT4, EDGE4_ORIGIN_SIDE, 5000),
        Drop(DropReason::NoApp),
    );
    h.expect(
        "TCP just past the range",
        &tcp4_frame(CLIENT4, 40000, EDGE4, 6011, 0x02),
        Drop(DropReason::NoApp),
    );
    // Stray segments of no connection the kernel knows: still no_app (only
    // segments of live connections pass after their app is gone).
    h.expect(
        "ACK to an unconfigured port",
        &tcp4_frame(CLIENT4, 40000, EDGE4, 5001, 0x10),
        Drop(DropReason::NoApp),
    );
    h.expect(
        "RST to an unconfigured port",
        &tcp4_frame(CLIENT4, 40000, EDGE4, 5001, 0x04),
        Drop(DropReason::NoApp),
    );
    // Apps.
    h.expect(
        "TCP range, first port",
        &tcp4_frame(CLIENT4, 40000, EDGE4, 6000, 0x02),
        Pass,
    );
    h.expect(
        "TCP range, last port",
        &tcp4_frame(CLIENT4, 40000, EDGE4, 6010, 0x02),
        Pass,
    );
    // Return traffic of the agent's own origin connections (step 2).
    h.expect(
        "TCP from an origin port",
        &tcp4_frame(ORIGIN4, 7005, EDGE4_ORIGIN_SIDE, 45000, 0x12),
        Pass,
    );
    h.expect(
        "TCP from the origin host, not an origin port",
        &tcp4_frame(ORIGIN4, 9999, EDGE4_ORIGIN_SIDE, 45000, 0x12),
        Drop(DropReason::NoApp),
    );
    // Step 9: firewall.
    h.expect(
        "blocked /24 to a TCP app",
        &tcp4_frame(BLOCKED4, 40000, EDGE4, 6000, 0x02),
        Drop(DropReason::Firewall),
    );
    h.expect(
        "allow /32 inside the blocked /24",
        &tcp4_frame(ALLOWED_IN_BLOCKED4, 40000, EDGE4, 6000, 0x02),
        Pass,
    );
    h.expect(
        "blocked source, app without ip_firewall",
        &tcp4_frame(BLOCKED4, 40000, EDGE4, 7100, 0x02),
        Pass,
    );
    h.expect(
        "blocked source to an unconfigured port is no_app first",
        &udp4(BLOCKED4, EDGE4, 1),
        Drop(DropReason::NoApp),
    );
    let hits = h.datapath.counters().unwrap().rule_hits;
    assert_eq!(hits["198.51.100.0/24"], 1, "block rule hit once");
    assert_eq!(hits["198.51.100.7"], 1, "allow rule hit once");
}

#[test]
fn ipv4_malformed_frames_are_dropped_never_passed() {
    if !require_root() {
        return;
    }
    let h = Harness::new();
    let good = udp4(CLIENT4, EDGE4, 5001);
    // Truncated at every header boundary and inside each header.
    h.expect(
        "ethernet header only",
        &good[..14],
        Drop(DropReason::Malformed),
    );
    h.expect(
        "inside the IPv4 header",
        &good[..14 + 19],
        Drop(DropReason::Malformed),
    );
    h.expect(
        "IPv4 header only",
        &good[..14 + 20],
        Drop(DropReason::Malformed),
    );
    h.expect(
        "inside the UDP header",
        &good[..14 + 20 + 7],
        Drop(DropReason::Malformed),
    );
    let tcp_syn = tcp4_frame(CLIENT4, 40000, EDGE4, 6000, 0x02);
    h.expect(
        "inside the TCP header",
        &tcp_syn[..14 + 20 + 19],
        Drop(DropReason::Malformed),
    );
    // Truncated, but not to us: the destination is readable, so it passes.
    let other = udp4(CLIENT4, OTHER4, 5001);
    h.expect("truncated to another host", &other[..14 + 20 + 4], Pass);
    // Bad IHL.
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44;
    h.expect("IHL 4", &bad_ihl, Drop(DropReason::Malformed));
    // Total length longer than the frame, and shorter than the header.
    let mut long = good.clone();
    long[16..18].copy_from_slice(&1500u16.to_be_bytes());
    h.expect(
        "total length past the frame",
        &long,
        Drop(DropReason::Malformed),
    );
    let mut short = good.clone();
    short[16..18].copy_from_slice(&10u16.to_be_bytes());
    h.expect(
        "total length below the header",
        &short,
        Drop(DropReason::Malformed),
    );
    // UDP length beyond the IP payload.
    let mut udp_len = good.clone();
    udp_len[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&900u16.to_be_bytes());
    h.expect(
        "UDP length past the IP payload",
        &udp_len,
        Drop(DropReason::Malformed),
    );
    // Version 5 in an IPv4 ether type.
    let mut version = good.clone();
    version[14] = 0x55;
    h.expect("IP version 5", &version, Drop(DropReason::Malformed));
    // IPv4 options are fine.
    let seg = udp(CLIENT4.into(), 4000, EDGE4.into(), 5001, b"x");
    let with_options = ethernet(
        ETH_P_IPV4,
        &ipv4_with(CLIENT4, EDGE4, PROTO_UDP, &seg, &[1, 1, 1, 0], 0),
    );
    h.expect(
        "IPv4 options, unconfigured port",
        &with_options,
        Drop(DropReason::NoApp),
    );
    let seg = tcp(CLIENT4.into(), 4000, EDGE4.into(), 6003, 0x02, &[]);
    let with_options = ethernet(
        ETH_P_IPV4,
        &ipv4_with(CLIENT4, EDGE4, PROTO_TCP, &seg, &[1, 1, 1, 0], 0),
    );
    h.expect("IPv4 options, TCP app", &with_options, Pass);
    let truncated_options = &with_options[..14 + 22];
    h.expect(
        "options cut off",
        truncated_options,
        Drop(DropReason::Malformed),
    );
    // Zero-length UDP payload.
    h.expect(
        "empty datagram, unconfigured port",
        &udp4_frame(CLIENT4, 1, EDGE4, 5001, b""),
        Drop(DropReason::NoApp),
    );
    // VLAN-tagged frames are classified by their inner packet.
    h.expect(
        "VLAN-tagged, unconfigured port",
        &vlan_tagged(&good, 7),
        Drop(DropReason::NoApp),
    );
    h.expect("VLAN-tagged, another host", &vlan_tagged(&other, 7), Pass);
    h.expect("VLAN-tagged, TCP app", &vlan_tagged(&tcp_syn, 7), Pass);
    h.expect("VLAN tag cut off", &vlan_tagged(&good, 7)[..16], Pass);
}

#[test]
fn ipv6_decisions_and_extension_headers() {
    if !require_root() {
        return;
    }
    let h = Harness::new();
    let udp6 =
        |src: Ipv6Addr, dst: Ipv6Addr, port: u16| udp6_frame(src, 40000, dst, port, b"payload");
    h.expect("to another host", &udp6(CLIENT6, OTHER6, 1), Pass);
    h.expect(
        "unconfigured port",
        &udp6(CLIENT6, EDGE6, 5001),
        Drop(DropReason::NoApp),
    );
    h.expect(
        "TCP to the v4-only range app",
        &tcp6_frame(CLIENT6, 1, EDGE6, 6000, 0x02),
        Pass,
    );
    h.expect(
        "tcp/22 pass",
        &tcp6_frame(CLIENT6, 1, EDGE6, 22, 0x02),
        Pass,
    );
    h.expect(
        "TCP to the UDP port",
        &tcp6_frame(CLIENT6, 1, EDGE6, 5000, 0x02),
        Drop(DropReason::NoApp),
    );
    h.expect(
        "blocked /48",
        &tcp6_frame(BLOCKED6, 1, EDGE6, 6000, 0x02),
        Drop(DropReason::Firewall),
    );
    // ICMPv6.
    let icmp = |t: u8| {
        ethernet(
            ETH_P_IPV6,
            &ipv6(
                CLIENT6,
                EDGE6,
                PROTO_ICMPV6,
                &icmp6(CLIENT6, EDGE6, t, 0, &[0; 20]),
            ),
        )
    };
    h.expect("neighbour solicitation", &icmp(135), Pass);
    h.expect("neighbour advertisement", &icmp(136), Pass);
    h.expect("echo request", &icmp(128), Pass);
    h.expect("packet too big", &icmp(2), Pass);
    h.expect("unknown informational", &icmp(200), Drop(DropReason::Icmp));
    h.expect("MLD query to the edge", &icmp(130), Drop(DropReason::Icmp));
    // Other protocol.
    h.expect(
        "GRE",
        &ethernet(ETH_P_IPV6, &ipv6(CLIENT6, EDGE6, PROTO_GRE, &[0; 8])),
        Drop(DropReason::Protocol),
    );
    // Extension headers: 0, 1, the most we walk, one too many.
    let seg = udp(CLIENT6.into(), 4000, EDGE6.into(), 5001, b"x");
    let chain = |n: usize| {
        let mut ext = Vec::new();
        for i in 0..n {
            let next = if i + 1 == n { PROTO_UDP } else { 60 };
            ext.extend_from_slice(&ipv6_ext(next));
        }
        let first = if n == 0 { PROTO_UDP } else { 0 };
        ethernet(ETH_P_IPV6, &ipv6_with(CLIENT6, EDGE6, first, &ext, &seg))
    };
    h.expect("no extension header", &chain(0), Drop(DropReason::NoApp));
    h.expect("one extension header", &chain(1), Drop(DropReason::NoApp));
    h.expect("four extension headers", &chain(4), Drop(DropReason::NoApp));
    h.expect(
        "five extension headers",
        &chain(5),
        Drop(DropReason::Malformed),
    );
    let one = chain(1);
    h.expect(
        "extension header cut off",
        &one[..14 + 40 + 4],
        Drop(DropReason::Malformed),
    );
    // Fragments.
    let frag = |offset: u16, more: bool| {
        ethernet(
            ETH_P_IPV6,
            &ipv6_with(
                CLIENT6,
                EDGE6,
                44,
                &ipv6_fragment(PROTO_UDP, offset, more),
                &seg,
            ),
        )
    };
    h.expect("first fragment", &frag(0, true), Drop(DropReason::Fragment));
    h.expect(
        "non-first fragment",
        &frag(1, false),
        Drop(DropReason::Fragment),
    );
    // Truncation and bad lengths.
    let good = udp6(CLIENT6, EDGE6, 5001);
    h.expect(
        "inside the IPv6 header",
        &good[..14 + 30],
        Drop(DropReason::Malformed),
    );
    h.expect(
        "IPv6 header only",
        &good[..14 + 40],
        Drop(DropReason::Malformed),
    );
    h.expect(
        "inside the UDP header",
        &good[..14 + 40 + 5],
        Drop(DropReason::Malformed),
    );
    let mut long = good.clone();
    long[18..20].copy_from_slice(&1000u16.to_be_bytes());
    h.expect(
        "payload length past the frame",
        &long,
        Drop(DropReason::Malformed),
    );
    let mut version = good.clone();
    version[14] = 0x40;
    h.expect(
        "IPv4 version in an IPv6 ether type",
        &version,
        Drop(DropReason::Malformed),
    );
}

/// Bounded random and mutated frames: the program never aborts, never errors.
#[test]
fn random_and_mutated_frames_never_abort() {
    if !require_root() {
        return;
    }
    let h = Harness::new();
    let seeds: Vec<Vec<u8>> = vec![
        udp4(CLIENT4, EDGE4, 5000),
        tcp4_frame(CLIENT4, 1, EDGE4, 6000, 0x02),
        udp6_frame(CLIENT6, 1, EDGE6, 5000, b"hello"),
        tcp6_frame(CLIENT6, 1, EDGE6, 22, 0x02),
        vlan_tagged(&udp4(CLIENT4, EDGE4, 5000), 3),
        ethernet(
            ETH_P_IPV6,
            &ipv6_with(
                CLIENT6,
                EDGE6,
                0,
                &ipv6_ext(PROTO_UDP),
                &udp(CLIENT6.into(), 1, EDGE6.into(), 5000, b"x"),
            ),
        ),
    ];
    // xorshift64*: deterministic, no dependency.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut verdicts = [0u32; 5];
    for i in 0..20_000u32 {
        let frame = if i % 4 == 0 {
            let len = 14 + (next() % 120) as usize;
            (0..len).map(|_| next() as u8).collect::<Vec<u8>>()
        } else {
            let mut f = seeds[(next() % seeds.len() as u64) as usize].clone();
            for _ in 0..1 + next() % 4 {
                let at = 12 + (next() as usize % (f.len() - 12));
                f[at] = next() as u8;
            }
            let cut = 14 + (next() as usize % (f.len() - 13));
            f.truncate(cut.max(14));
            f
        };
        let verdict = h.run(&frame);
        assert_ne!(verdict, XDP_ABORTED, "frame {frame:02x?} aborted");
        assert!(verdict < 5, "unknown verdict {verdict}");
        verdicts[verdict as usize] += 1;
    }
    // Both outcomes were exercised.
    assert!(
        verdicts[XDP_DROP as usize] > 1000 && verdicts[XDP_PASS as usize] > 1000,
        "{verdicts:?}"
    );
}
