//! TCP splicing in XDP (docs/tcp.md, "XDP splice") through `BPF_PROG_TEST_RUN`:
//! crafted segments of a spliced connection in, exact frames out, IPv4 and IPv6,
//! both directions: addresses, ports, sequence and acknowledgement numbers (across
//! the 2^32 wrap), SACK edges, timestamps (the offset learnt from the first
//! segment, echoes mapped back), windows rescaled between the legs' shifts,
//! checksums (incremental, a sender's partial checksum completed), FIN/RST marks
//! and per-entry counters. Segments of a spliced connection that cannot be
//! translated (IPv4 options, truncated or unaligned TCP options) are dropped, never
//! passed to a kernel that has no socket for them; everything else passes as
//! before.
//!
//! Runs in the `edge` namespace of a lab, as `udp_xdp` does: the program's route
//! lookups are real, so expected frames carry the lab veths' MACs. The entries are
//! built by `splice_entries` from leg states; every expected field is computed here
//! from those leg states directly (next byte ↔ next byte), not from the entries.

use std::net::IpAddr;

use forwarder::config::Config;
use forwarder::datapath::test_run::{TestRunOptions, TestRunOutput, test_run_xdp};
use forwarder::datapath::{Datapath, PROG_XDP, Plan, ifindex};
use forwarder::route::route_to;
use forwarder::tcp::fastpath::{LegState, hold_entry, splice_entries, splice_keys};
use forwarder_common::{SEEN_FIN, SEEN_RST, SpliceCounter, SpliceEntry, SpliceKey};
use forwarder_tests::frames::*;
use forwarder_tests::xdp_wires::{
    Family, SplicePorts, V4, V6, Wires, assert_frame, splice_legs, wires,
};
use forwarder_tests::{
    CLIENT_V4, CLIENT_V6, EDGE_ADDRESSES, Lab, ORIGIN_V4, ORIGIN_V6, require_root,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

const EDGE_PORT: u16 = 6000;
const PLAIN_PORT: u16 = 6001;
const CLIENT_PORT: u16 = 40000;
const LOCAL_PORT: u16 = 50000;
const ORIGIN_PORT: u16 = 8080;

fn config(ec: &str, eo: &str) -> String {
    format!(
        r#"
[agent]
interfaces = ["{ec}", "{eo}"]

[[apps]]
id = "splice4"
protocol = "tcp/{EDGE_PORT}"
edge_ips = ["10.0.1.1"]
origin_direct = ["tcp://10.0.2.2:{ORIGIN_PORT}"]
tcp_fastpath = "xdp"

[[apps]]
id = "splice6"
protocol = "tcp/{EDGE_PORT}"
edge_ips = ["fd00:1::1"]
origin_direct = ["tcp://[fd00:2::2]:{ORIGIN_PORT}"]
tcp_fastpath = "xdp"

[[apps]]
id = "plain4"
protocol = "tcp/{PLAIN_PORT}"
edge_ips = ["10.0.1.1"]
origin_direct = ["tcp://10.0.2.2:8081"]
"#
    )
}

/// The datapath in the edge namespace with the test config and the lab's routes.
struct Harness {
    datapath: Datapath,
    w: Wires,
    ec_index: u32,
    eo_index: u32,
}

impl Harness {
    fn new(w: &Wires) -> Harness {
        let config = Config::parse(&config(&w.ec, &w.eo)).expect("valid config");
        let plan = Plan::build(&config, &EDGE_ADDRESSES, route_to).expect("plan");
        let mut datapath = Datapath::load().expect("load the eBPF object");
        datapath.apply(&plan).expect("fill maps");
        Harness {
            datapath,
            ec_index: ifindex(&w.ec).expect("ec"),
            eo_index: ifindex(&w.eo).expect("eo"),
            w: w.clone(),
        }
    }

    fn run(&self, frame: &[u8], ingress: u32) -> TestRunOutput {
        let fd = self.datapath.xdp_program_fd(PROG_XDP).expect("prog fd");
        let options = TestRunOptions {
            ingress_ifindex: ingress,
            ..Default::default()
        };
        test_run_xdp(fd, frame, &options).expect("test run")
    }

    fn counters(&self) -> [u64; SpliceCounter::COUNT] {
        self.datapath.splice_counters().expect("splice counters")
    }

    /// Runs a segment from the client (`from_client`) or the origin; it must be
    /// redirected and counted as translated; returns the frame sent.
    #[track_caller]
    fn splice(&self, what: &str, frame: &[u8], from_client: bool) -> Vec<u8> {
        let ingress = if from_client {
            self.ec_index
        } else {
            self.eo_index
        };
        let before = self.counters();
        let out = self.run(frame, ingress);
        let after = self.counters();
        assert_eq!(out.verdict, XDP_REDIRECT, "{what}: redirected");
        assert_eq!(
            after[SpliceCounter::Translated as usize] - before[SpliceCounter::Translated as usize],
            1,
            "{what}: counted as translated"
        );
        assert_eq!(
            after[SpliceCounter::Dropped as usize],
            before[SpliceCounter::Dropped as usize],
            "{what}: nothing dropped"
        );
        out.frame
    }

    fn entry(&self, key: &SpliceKey) -> SpliceEntry {
        self.datapath
            .splices()
            .expect("splices")
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, e)| e)
            .expect("entry present")
    }
}

/// Runs `body` with a harness on a thread in the lab's edge namespace.
fn with_harness(body: impl FnOnce(&mut Harness) + Send) {
    if !require_root() {
        return;
    }
    let lab = Lab::new().expect("lab");
    let hosts = [
        IpAddr::from(CLIENT_V4),
        CLIENT_V6.into(),
        ORIGIN_V4.into(),
        ORIGIN_V6.into(),
    ];
    let w = wires(&lab, &hosts);
    lab.edge()
        .run_in(|| {
            let mut h = Harness::new(&w);
            body(&mut h);
        })
        .expect("edge thread");
    lab.close().expect("lab teardown");
}

// ---- legs and frames ----------------------------------------------------------------

/// The legs of the test connection: sequence numbers close to the 2^32 wrap on
/// the client leg, different window shifts on every side.
fn legs(h: &Harness, f: &Family, edge_port: u16) -> (LegState, LegState) {
    let ports = SplicePorts {
        client: CLIENT_PORT,
        edge: edge_port,
        local: LOCAL_PORT,
        origin: ORIGIN_PORT,
    };
    splice_legs(f, ports, h.ec_index, h.eo_index)
}

/// NOP, NOP, timestamps: Linux's layout.
fn ts(tsval: u32, tsecr: u32) -> Vec<u8> {
    let mut o = vec![1, 1, 8, 10];
    o.extend_from_slice(&tsval.to_be_bytes());
    o.extend_from_slice(&tsecr.to_be_bytes());
    o
}

/// Timestamps, then NOP, NOP, SACK with `blocks`.
fn ts_sack(tsval: u32, tsecr: u32, blocks: &[(u32, u32)]) -> Vec<u8> {
    let mut o = ts(tsval, tsecr);
    o.extend_from_slice(&[1, 1, 5, (2 + 8 * blocks.len()) as u8]);
    for (l, r) in blocks {
        o.extend_from_slice(&l.to_be_bytes());
        o.extend_from_slice(&r.to_be_bytes());
    }
    o
}

/// One NOP, then timestamps and a one-block SACK unpadded, END and zero padding:
/// a legal layout, but not the aligned one the datapath translates.
fn odd(tsval: u32, tsecr: u32, block: (u32, u32)) -> Vec<u8> {
    let mut o = vec![1, 8, 10];
    o.extend_from_slice(&tsval.to_be_bytes());
    o.extend_from_slice(&tsecr.to_be_bytes());
    o.extend_from_slice(&[5, 10]);
    o.extend_from_slice(&block.0.to_be_bytes());
    o.extend_from_slice(&block.1.to_be_bytes());
    o.extend_from_slice(&[0, 0, 0]);
    o
}

/// A frame from `src` to `dst` between the given MACs.
fn framed(dst_mac: [u8; 6], src_mac: [u8; 6], src: IpAddr, dst: IpAddr, seg: &[u8]) -> Vec<u8> {
    let (ether_type, ip) = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (ETH_P_IPV4, ipv4(s, d, PROTO_TCP, seg)),
        (IpAddr::V6(s), IpAddr::V6(d)) => (ETH_P_IPV6, ipv6(s, d, PROTO_TCP, seg)),
        _ => panic!("mixed families"),
    };
    let mut f = Vec::with_capacity(14 + ip.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(&ip);
    f
}

/// The frame of segment `seg` from `src` to `dst` between the given MACs.
fn tcp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    seg: &TcpFields,
) -> Vec<u8> {
    framed(dst_mac, src_mac, src, dst, &tcp_segment(src, dst, seg))
}

/// The client's segment as it arrives at the edge, and the frame the forwarder
/// must send to the origin for it (`out` are the translated fields).
fn client_to_origin(
    h: &Harness,
    f: &Family,
    seg: &TcpFields,
    out: &TcpFields,
) -> (Vec<u8>, Vec<u8>) {
    let w = &h.w;
    (
        tcp_frame(w.ec_mac, w.cl_mac, f.client, f.edge, seg),
        tcp_frame(w.oe_mac, w.eo_mac, f.local, f.origin, out),
    )
}

/// As `client_to_origin`, the other way.
fn origin_to_client(
    h: &Harness,
    f: &Family,
    seg: &TcpFields,
    out: &TcpFields,
) -> (Vec<u8>, Vec<u8>) {
    let w = &h.w;
    (
        tcp_frame(w.eo_mac, w.oe_mac, f.origin, f.local, seg),
        tcp_frame(w.cl_mac, w.ec_mac, f.edge, f.client, out),
    )
}

fn rescaled(window: u16, from: u8, to: u8) -> u16 {
    (((window as u64) << from) >> to).min(0xffff) as u16
}

/// The client's segment `seg` as the origin must receive it. Next byte ↔ next
/// byte: the client's sequence space onto the agent's on the origin leg, the
/// client's acknowledgements onto the origin's space.
fn to_origin<'a>(seg: &TcpFields<'a>, c: &LegState, o: &LegState) -> TcpFields<'a> {
    TcpFields {
        sport: LOCAL_PORT,
        dport: ORIGIN_PORT,
        seq: o.snd_nxt.wrapping_add(seg.seq.wrapping_sub(c.rcv_nxt)),
        ack: o.rcv_nxt.wrapping_add(seg.ack.wrapping_sub(c.snd_nxt)),
        window: rescaled(seg.window, c.snd_wscale, o.rcv_wscale),
        ..seg.clone()
    }
}

/// The origin's segment `seg` as the client must receive it.
fn to_client<'a>(seg: &TcpFields<'a>, c: &LegState, o: &LegState) -> TcpFields<'a> {
    TcpFields {
        sport: EDGE_PORT,
        dport: CLIENT_PORT,
        seq: c.snd_nxt.wrapping_add(seg.seq.wrapping_sub(o.rcv_nxt)),
        ack: c.rcv_nxt.wrapping_add(seg.ack.wrapping_sub(o.snd_nxt)),
        window: rescaled(seg.window, o.snd_wscale, c.rcv_wscale),
        ..seg.clone()
    }
}

// ---- the connection, both ways ------------------------------------------------------

fn both_directions(h: &mut Harness, f: &Family) {
    let (c, o) = legs(h, f, EDGE_PORT);
    let pair = splice_entries(&c, &o, 0);
    h.datapath.insert_splice(&pair).expect("insert splice");
    let [(to_origin_key, _), (to_client_key, _)] = pair;
    // SACK edges acknowledge the agent's client-leg bytes: onto the origin's space.
    let c2o_ack = |ack: u32| o.rcv_nxt.wrapping_add(ack.wrapping_sub(c.snd_nxt));
    let client_seg = |seq: u32, ack: u32, flags: u8, window: u16| TcpFields {
        sport: CLIENT_PORT,
        dport: EDGE_PORT,
        seq,
        ack,
        flags,
        window,
        options: &[],
        payload: &[],
    };
    let origin_seg = |seq: u32, ack: u32, flags: u8, window: u16| TcpFields {
        sport: ORIGIN_PORT,
        dport: LOCAL_PORT,
        seq,
        ack,
        flags,
        window,
        options: &[],
        payload: &[],
    };

    // 1. The client's first segment after the splice: its TSval leaves as the
    // origin leg's clock (the origin last saw that), the offset is learnt; its
    // TSecr (an echo of the agent's client-leg clock) passes unchanged until the
    // origin has sent a timestamp.
    let old_echo = c.ts_clock - 5;
    let opts = ts(777, old_echo);
    let mut seg = client_seg(c.rcv_nxt, c.snd_nxt, TCP_ACK | TCP_PSH, 1000);
    seg.options = &opts;
    seg.payload = b"hello";
    let out_opts = ts(o.ts_clock, old_echo);
    let mut out = to_origin(&seg, &c, &o);
    out.options = &out_opts;
    let (input, want) = client_to_origin(h, f, &seg, &out);
    assert_frame(
        "first client segment",
        &h.splice("first", &input, true),
        &want,
    );

    // 2. A SACK whose edges lie past the 2^32 wrap of the agent's client-leg
    // space; TSval moves by the learnt offset; the window saturates.
    let blocks = [
        (c.snd_nxt.wrapping_add(100), c.snd_nxt.wrapping_add(200)),
        (c.snd_nxt.wrapping_add(300), c.snd_nxt.wrapping_add(400)),
    ];
    let opts = ts_sack(786, old_echo, &blocks);
    let mut seg = client_seg(c.rcv_nxt.wrapping_add(5), c.snd_nxt, TCP_ACK, 0xffff);
    seg.options = &opts;
    seg.payload = b"abc";
    let out_blocks = blocks.map(|(l, r)| (c2o_ack(l), c2o_ack(r)));
    let out_opts = ts_sack(o.ts_clock + 9, old_echo, &out_blocks);
    let mut out = to_origin(&seg, &c, &o);
    out.options = &out_opts;
    assert_eq!(out.window, 0xffff, "the test covers a saturated window");
    let (input, want) = client_to_origin(h, f, &seg, &out);
    assert_frame("client SACK", &h.splice("sack", &input, true), &want);

    // 3. The origin answers: its TSval leaves as the client leg's clock, its echo
    // of the translated TSval maps back to the client's own value.
    let opts = ts(123_456, o.ts_clock + 9);
    let mut seg = origin_seg(o.rcv_nxt, o.snd_nxt.wrapping_add(8), TCP_ACK | TCP_PSH, 300);
    seg.options = &opts;
    seg.payload = b"world!";
    let out_opts = ts(c.ts_clock, 786);
    let mut out = to_client(&seg, &c, &o);
    out.options = &out_opts;
    let (input, want) = origin_to_client(h, f, &seg, &out);
    assert_frame("origin data", &h.splice("origin", &input, false), &want);

    // 4. The client acknowledges across the wrap; both timestamp fields translate.
    let opts = ts(790, c.ts_clock + 4);
    let mut seg = client_seg(
        c.rcv_nxt.wrapping_add(8),
        c.snd_nxt.wrapping_add(6),
        TCP_ACK,
        500,
    );
    seg.options = &opts;
    let out_opts = ts(o.ts_clock + 13, 123_460);
    let mut out = to_origin(&seg, &c, &o);
    out.options = &out_opts;
    let (input, want) = client_to_origin(h, f, &seg, &out);
    assert_frame("client ack", &h.splice("ack", &input, true), &want);

    // 5. A same-host sender's partial checksum (pseudo-header sum only) is
    // completed on the way.
    let opts = ts(130_000, o.ts_clock + 13);
    let mut seg = origin_seg(
        o.rcv_nxt.wrapping_add(6),
        o.snd_nxt.wrapping_add(8),
        TCP_ACK,
        301,
    );
    seg.options = &opts;
    seg.payload = b"partial";
    let out_opts = ts(c.ts_clock + (130_000 - 123_456), 790);
    let mut out = to_client(&seg, &c, &o);
    out.options = &out_opts;
    let (mut input, want) = origin_to_client(h, f, &seg, &out);
    let l4 = input.len() - (20 + opts.len() + seg.payload.len());
    let partial = pseudo_header_sum(f.origin, f.local, PROTO_TCP, input.len() - l4) as u16;
    input[l4 + 16..l4 + 18].copy_from_slice(&partial.to_be_bytes());
    assert_frame(
        "partial checksum",
        &h.splice("partial", &input, false),
        &want,
    );

    // 6. FIN from the origin, RST from the client: translated and marked.
    let opts = ts(130_001, o.ts_clock + 13);
    let mut seg = origin_seg(
        o.rcv_nxt.wrapping_add(13),
        o.snd_nxt.wrapping_add(8),
        TCP_FIN | TCP_ACK,
        301,
    );
    seg.options = &opts;
    let out_opts = ts(c.ts_clock + (130_001 - 123_456), 790);
    let mut out = to_client(&seg, &c, &o);
    out.options = &out_opts;
    let (input, want) = origin_to_client(h, f, &seg, &out);
    assert_frame("origin FIN", &h.splice("fin", &input, false), &want);
    let seg = client_seg(
        c.rcv_nxt.wrapping_add(8),
        c.snd_nxt.wrapping_add(14),
        TCP_RST | TCP_ACK,
        0,
    );
    let out = to_origin(&seg, &c, &o);
    let (input, want) = client_to_origin(h, f, &seg, &out);
    assert_frame("client RST", &h.splice("rst", &input, true), &want);

    let e = h.entry(&to_origin_key);
    assert_eq!((e.packets, e.bytes), (4, 8), "client → origin counters");
    assert_eq!(e.seen, SEEN_RST, "client → origin saw the RST only");
    let e = h.entry(&to_client_key);
    assert_eq!((e.packets, e.bytes), (3, 13), "origin → client counters");
    assert_eq!(e.seen, SEEN_FIN, "origin → client saw the FIN only");
    h.datapath
        .remove_splice(&[to_origin_key, to_client_key])
        .expect("remove");
    assert!(h.datapath.splices().expect("splices").is_empty());
}

#[test]
fn ipv4_segments_are_translated_exactly_both_ways() {
    with_harness(|h| both_directions(h, &V4));
}

#[test]
fn ipv6_segments_are_translated_exactly_both_ways() {
    with_harness(|h| both_directions(h, &V6));
}

// ---- what is not translated -------------------------------------------------------

#[test]
fn untranslatable_segments_of_a_spliced_connection_are_dropped_not_passed() {
    with_harness(|h| {
        let f = &V4;
        let (c, o) = legs(h, f, EDGE_PORT);
        h.datapath
            .insert_splice(&splice_entries(&c, &o, 0))
            .expect("insert splice");
        let w = h.w.clone();
        let base = TcpFields {
            sport: CLIENT_PORT,
            dport: EDGE_PORT,
            seq: c.rcv_nxt,
            ack: c.snd_nxt,
            flags: TCP_ACK,
            window: 100,
            options: &[],
            payload: b"x",
        };
        // A timestamp option cut short by the end of the header.
        let truncated = TcpFields {
            options: &[8, 10, 0, 0],
            ..base.clone()
        };
        // Timestamps and SACK in another layout than NOP NOP TS, NOP NOP SACK.
        let opts = odd(800, c.ts_clock, (c.snd_nxt, c.snd_nxt.wrapping_add(10)));
        let unaligned = TcpFields {
            options: &opts,
            ..base.clone()
        };
        // IPv4 options: the TCP header is not where the translation writes.
        let seg = tcp_segment(f.client, f.edge, &base);
        let (IpAddr::V4(cl), IpAddr::V4(ed)) = (f.client, f.edge) else {
            unreachable!()
        };
        let ip_opts = ipv4_with(cl, ed, PROTO_TCP, &seg, &[1, 1, 1, 0], 0);
        let mut with_ip_options = Vec::new();
        with_ip_options.extend_from_slice(&w.ec_mac);
        with_ip_options.extend_from_slice(&w.cl_mac);
        with_ip_options.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
        with_ip_options.extend_from_slice(&ip_opts);
        let frames = [
            (
                "truncated option",
                tcp_frame(w.ec_mac, w.cl_mac, f.client, f.edge, &truncated),
            ),
            (
                "unaligned options",
                tcp_frame(w.ec_mac, w.cl_mac, f.client, f.edge, &unaligned),
            ),
            ("IPv4 options", with_ip_options),
        ];
        for (what, frame) in frames {
            let before = h.counters();
            let out = h.run(&frame, h.ec_index);
            let after = h.counters();
            assert_eq!(
                out.verdict, XDP_DROP,
                "{what}: dropped, not passed to the kernel"
            );
            assert_eq!(
                after[SpliceCounter::Dropped as usize] - before[SpliceCounter::Dropped as usize],
                1,
                "{what}: counted"
            );
        }
    });
}

/// A held connection (`SPLICE_HOLD`, the agent bringing a busy connection to a
/// quiet point): segments with data, SYN or FIN are dropped and counted `Held`,
/// pure ACKs and RSTs reach the kernel untouched, both ways; once the real entries
/// replace the hold, the same segment is translated.
fn held_then_spliced(h: &mut Harness, f: &Family) {
    let (c, o) = legs(h, f, EDGE_PORT);
    let pair = splice_entries(&c, &o, 0);
    let keys = splice_keys(c.peer, c.local, o.local, o.peer);
    assert_eq!(keys, [pair[0].0, pair[1].0], "hold and splice keys agree");
    h.datapath
        .insert_splice(&[(keys[0], hold_entry()), (keys[1], hold_entry())])
        .expect("insert hold");
    let w = h.w.clone();
    let from_client = |flags: u8, payload: &'static [u8]| TcpFields {
        sport: CLIENT_PORT,
        dport: EDGE_PORT,
        seq: c.rcv_nxt,
        ack: c.snd_nxt,
        flags,
        window: 100,
        options: &[],
        payload,
    };
    let from_origin = |flags: u8, payload: &'static [u8]| TcpFields {
        sport: ORIGIN_PORT,
        dport: LOCAL_PORT,
        seq: o.rcv_nxt,
        ack: o.snd_nxt,
        flags,
        window: 100,
        options: &[],
        payload,
    };
    let client_frame = |seg: &TcpFields| tcp_frame(w.ec_mac, w.cl_mac, f.client, f.edge, seg);
    let origin_frame = |seg: &TcpFields| tcp_frame(w.eo_mac, w.oe_mac, f.origin, f.local, seg);
    let cases = [
        (
            "client data",
            client_frame(&from_client(TCP_ACK | TCP_PSH, b"data")),
            h.ec_index,
            true,
        ),
        (
            "client FIN",
            client_frame(&from_client(TCP_ACK | TCP_FIN, b"")),
            h.ec_index,
            true,
        ),
        (
            "client SYN",
            client_frame(&from_client(TCP_SYN, b"")),
            h.ec_index,
            true,
        ),
        (
            "client ACK",
            client_frame(&from_client(TCP_ACK, b"")),
            h.ec_index,
            false,
        ),
        (
            "client RST",
            client_frame(&from_client(TCP_RST | TCP_ACK, b"")),
            h.ec_index,
            false,
        ),
        (
            "origin data",
            origin_frame(&from_origin(TCP_ACK, b"answer")),
            h.eo_index,
            true,
        ),
        (
            "origin ACK",
            origin_frame(&from_origin(TCP_ACK, b"")),
            h.eo_index,
            false,
        ),
    ];
    for (what, frame, ingress, dropped) in cases {
        let before = h.counters();
        let out = h.run(&frame, ingress);
        let after = h.counters();
        let held = after[SpliceCounter::Held as usize] - before[SpliceCounter::Held as usize];
        if dropped {
            assert_eq!(out.verdict, XDP_DROP, "{what}: dropped while held");
            assert_eq!(held, 1, "{what}: counted as held");
        } else {
            assert_eq!(out.verdict, XDP_PASS, "{what}: to the socket");
            assert_eq!(out.frame, frame, "{what}: untouched");
            assert_eq!(held, 0, "{what}: not counted");
        }
        assert_eq!(
            after[SpliceCounter::Translated as usize],
            before[SpliceCounter::Translated as usize],
            "{what}: nothing translated"
        );
    }
    // The handoff replaces the hold: the data segment the peer retransmits is
    // translated.
    h.datapath.insert_splice(&pair).expect("insert splice");
    let seg = from_client(TCP_ACK | TCP_PSH, b"data");
    let (frame, _) = client_to_origin(h, f, &seg, &to_origin(&seg, &c, &o));
    h.splice("client data after the handoff", &frame, true);
}

#[test]
fn a_held_connection_drops_what_carries_data_and_passes_acks_ipv4_and_ipv6() {
    with_harness(|h| {
        held_then_spliced(h, &V4);
        held_then_spliced(h, &V6);
    });
}

#[test]
fn unspliced_segments_and_fastpath_off_apps_pass_to_the_kernel_as_before() {
    with_harness(|h| {
        let f = &V4;
        let w = h.w.clone();
        // Entries for a connection on the app without `tcp_fastpath`: never used.
        let (c, o) = legs(h, f, PLAIN_PORT);
        h.datapath
            .insert_splice(&splice_entries(&c, &o, 2))
            .expect("insert splice");
        let seg = TcpFields {
            sport: CLIENT_PORT,
            dport: PLAIN_PORT,
            seq: c.rcv_nxt,
            ack: c.snd_nxt,
            flags: TCP_ACK,
            window: 100,
            options: &[],
            payload: b"plain",
        };
        let frame = tcp_frame(w.ec_mac, w.cl_mac, f.client, f.edge, &seg);
        let out = h.run(&frame, h.ec_index);
        assert_eq!(out.verdict, XDP_PASS, "fastpath-off app: to the kernel");
        assert_eq!(out.frame, frame, "fastpath-off app: untouched");
        // Another client port on the splicing app: not spliced, to the kernel.
        let seg = TcpFields {
            sport: CLIENT_PORT + 1,
            dport: EDGE_PORT,
            ..seg
        };
        let frame = tcp_frame(w.ec_mac, w.cl_mac, f.client, f.edge, &seg);
        let out = h.run(&frame, h.ec_index);
        assert_eq!(out.verdict, XDP_PASS, "unspliced connection: to the kernel");
        assert_eq!(out.frame, frame, "unspliced connection: untouched");
        assert_eq!(
            h.counters(),
            [0; SpliceCounter::COUNT],
            "no splice activity"
        );
    });
}
