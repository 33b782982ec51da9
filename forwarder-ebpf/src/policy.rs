//! The ingress decision of SPEC §3, steps 1–9: which packets are ours, which are
//! dropped and why, which go to the kernel, which go to the UDP fast path.

use aya_ebpf::maps::lpm_trie::Key;
use forwarder_common::{
    APP_PASS, AppInfo, DropReason, EDGE_V4_INLINE, HINT_EDGE_PORT, HINT_ORIGIN_PORT, OriginPortKey,
    PROTO_TCP, PROTO_UDP, PortKey, RULE_BLOCK, RULE_NONE, hint_index,
};

use crate::{
    addr,
    counters::count_rule_hit,
    maps::{
        APPS, EDGE_ADDRS, EDGE_ADDRS_V4, EDGE_V4_LIST, ORIGIN_PORTS, PORT_HINTS, PORTS, RULES_V4,
        RULES_V6, SETTINGS,
    },
    parse::{PROTO_ICMP, PROTO_ICMPV6, Packet},
};

/// What to do with an IP packet.
pub enum Decision {
    /// Hand to the kernel untouched.
    Pass,
    Drop(DropReason),
    /// A datagram from an origin towards the agent: the UDP return path decides.
    UdpReturn {
        app: u32,
    },
    /// A TCP segment for an app: the kernel and the agent's listener take it.
    TcpApp {
        app: u32,
    },
    /// A datagram for a UDP app: the fast path rewrites and forwards it.
    UdpApp {
        app: u32,
        info: AppInfo,
        /// The access rule the client matched (counted), or `RULE_NONE`.
        rule: u32,
    },
}

/// ICMPv6 neighbour discovery (router/neighbour solicitation and advertisement,
/// redirect) always passes: without it the host loses its neighbours.
#[inline(always)]
pub fn is_neighbour_discovery(pkt: &Packet) -> bool {
    pkt.proto == PROTO_ICMPV6 && !pkt.fragment && (133..=137).contains(&pkt.sport)
}

/// The index of edge address `address` (16-byte form), if it is one.
#[inline(always)]
pub fn edge_index(address: &[u8; 16]) -> Option<u32> {
    // SAFETY (both lookups): the value is copied out at once.
    if addr::is_v4_mapped(address) {
        let v4 = addr::v4(address);
        if let Some(list) = EDGE_V4_LIST.get(0)
            && list.count as usize <= EDGE_V4_INLINE
        {
            for i in 0..EDGE_V4_INLINE {
                if i < list.count as usize && list.addrs[i] == v4 {
                    return Some(list.index[i]);
                }
            }
            return None;
        }
        unsafe { EDGE_ADDRS_V4.get(&v4) }.map(|e| e.index)
    } else {
        unsafe { EDGE_ADDRS.get(address) }.map(|e| e.index)
    }
}

#[inline(always)]
pub fn port_hints(proto: u8, port: u16) -> u8 {
    PORT_HINTS
        .get(hint_index(proto, port))
        .copied()
        .unwrap_or(0)
}

/// Steps 3–9 for a well-formed packet to edge address `edge`.
#[inline(always)]
pub fn decide_edge(pkt: &Packet, edge: u32) -> Decision {
    if pkt.fragment {
        return Decision::Drop(DropReason::Fragment);
    }
    match pkt.proto {
        PROTO_TCP | PROTO_UDP => {}
        PROTO_ICMP => return icmp_verdict(pkt.sport, &[0, 8], &[3, 4, 11, 12]),
        PROTO_ICMPV6 => return icmp_verdict(pkt.sport, &[128, 129], &[1, 2, 3, 4]),
        _ => return Decision::Drop(DropReason::Protocol),
    }
    // One array lookup each decides whether any hash lookup is needed at all: an
    // unconfigured port with a source port no origin uses is dropped right here.
    let to_app_port = port_hints(pkt.proto, pkt.dport) & HINT_EDGE_PORT != 0;
    let from_origin_port = port_hints(pkt.proto, pkt.sport) & HINT_ORIGIN_PORT != 0;
    if !to_app_port && !from_origin_port {
        return Decision::Drop(DropReason::NoApp);
    }
    // Return traffic of the agent's own origin connections and flows (step 2): the
    // agent's origin-side address may well be an edge address too.
    let from = OriginPortKey {
        addr: pkt.src,
        port: pkt.sport,
        proto: pkt.proto,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    if from_origin_port && let Some(origin) = unsafe { ORIGIN_PORTS.get(&from) } {
        return if pkt.proto == PROTO_TCP {
            Decision::Pass
        } else {
            Decision::UdpReturn { app: origin.app }
        };
    }
    let key = PortKey {
        edge,
        port: pkt.dport,
        proto: pkt.proto,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let app = match unsafe { PORTS.get(&key) } {
        None => return Decision::Drop(DropReason::NoApp),
        Some(t) if t.app == APP_PASS => return Decision::Pass,
        Some(t) => t.app,
    };
    let Some(info) = APPS.get(app) else {
        return Decision::Drop(DropReason::NoApp);
    };
    let mut rule = RULE_NONE;
    if info.ip_firewall != 0 {
        let (blocked, matched) = firewall(pkt);
        if blocked {
            return Decision::Drop(DropReason::Firewall);
        }
        rule = matched;
    }
    if pkt.proto == PROTO_TCP {
        Decision::TcpApp { app }
    } else {
        Decision::UdpApp {
            app,
            info: *info,
            rule,
        }
    }
}

/// The UDP app whose origin sent `pkt`, for a well-formed datagram from an origin
/// port (the return path of UDP flows to a non-edge address).
#[inline(always)]
pub fn udp_return_app(pkt: &Packet) -> Option<u32> {
    if pkt.proto != PROTO_UDP
        || pkt.fragment
        || port_hints(PROTO_UDP, pkt.sport) & HINT_ORIGIN_PORT == 0
    {
        return None;
    }
    let from = OriginPortKey {
        addr: pkt.src,
        port: pkt.sport,
        proto: PROTO_UDP,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    unsafe { ORIGIN_PORTS.get(&from) }.map(|o| o.app)
}

#[inline(always)]
fn icmp_verdict(icmp_type: u16, echo: &[u16; 2], errors: &[u16; 4]) -> Decision {
    if echo.contains(&icmp_type) || errors.contains(&icmp_type) {
        Decision::Pass
    } else {
        Decision::Drop(DropReason::Icmp)
    }
}

/// Longest-prefix match of the source over the access rules (the agent resolves
/// "allow beats block at the same prefix" when it fills the trie); no match falls
/// back to `[firewall].default`. Returns whether the source is blocked and the rule
/// that matched (`RULE_NONE`: none), whose hit is counted here.
#[inline(always)]
fn firewall(pkt: &Packet) -> (bool, u32) {
    let verdict = if pkt.family == 4 {
        RULES_V4.get(Key::new(
            32,
            [pkt.src[12], pkt.src[13], pkt.src[14], pkt.src[15]],
        ))
    } else {
        RULES_V6.get(Key::new(128, pkt.src))
    };
    match verdict {
        Some(v) => {
            count_rule_hit(v.rule);
            (v.action == RULE_BLOCK, v.rule)
        }
        None => (
            SETTINGS
                .get(0)
                .is_some_and(|s| s.firewall_default == RULE_BLOCK),
            RULE_NONE,
        ),
    }
}
