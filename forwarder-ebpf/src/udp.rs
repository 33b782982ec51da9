//! The UDP fast path (SPEC §5): client datagrams are rewritten towards their flow's
//! origin (with an SPP or PROXY v2 header in front when configured) and replies are
//! validated against the flow table and rewritten back to the client, all in XDP.
//!
//! Both directions are one operation: replace the old Ethernet/IP/UDP headers (and,
//! on the way back, the old proxy header) by new ones (and, on the way to the
//! origin, a new proxy header), then fix the UDP checksum incrementally from the
//! sender's: complete and correct without reading the payload.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_EXIST, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT,
        BPF_NOEXIST, bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use forwarder_common::{
    AppInfo, DIR_EGRESS, DIR_INGRESS, DropReason, FLOW_V2_HEADER_SENT, FlowKey, FlowState, NatKey,
    OriginInfo, PROXY_SIMPLE, PROXY_V2, PROXY_V2_LEN_V4, PROXY_V2_LEN_V6, SPP_HEADER_LEN,
    SPP_MAGIC,
};

use crate::{
    counters::{count_app, drop},
    csum,
    maps::{APPS, FLOWS, NAT_PORTS, ORIGINS, SETTINGS, Scratch},
    parse::{ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, Packet, ptr_at, ptr_at_mut},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// TTL / hop limit of datagrams the forwarder sends: it originates them, as a proxy.
const TTL: u8 = 64;
/// How many ports of `udp_nat_ports` a new flow tries before giving up.
const NAT_PORT_PROBES: u32 = 8;
const PROXY_V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// The header put in front of the payload towards the origin.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ProxyHeader {
    None,
    Spp,
    V2,
}

/// One rewrite: the new addresses and ports, what to strip, what to add.
#[repr(C)]
pub struct Rewrite {
    family: u8,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    /// Bytes of an SPP header to remove from the front of the payload (0 or 38).
    strip: usize,
    /// Header to add in front of the payload.
    add: ProxyHeader,
    /// For `add`: the client and edge the header names.
    client: [u8; 16],
    edge: [u8; 16],
    client_port: u16,
    edge_port: u16,
    /// Route lookup is done as output from this interface.
    out_ifindex: u32,
}

/// A client datagram for UDP app `app`.
#[inline(always)]
pub fn to_origin(ctx: &XdpContext, s: &mut Scratch, app: u32, info: &AppInfo) -> u32 {
    let pkt = &s.pkt;
    // The fast path handles untagged frames; tagged ones go to the kernel.
    if pkt.vlan_tags != 0 {
        return xdp_action::XDP_PASS;
    }
    let key = FlowKey {
        client: pkt.src,
        edge: pkt.dst,
        client_port: pkt.sport,
        edge_port: pkt.dport,
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let (flow, created) = match FLOWS.get_ptr_mut(&key) {
        Some(flow) => (flow, false),
        None => match new_flow(ctx, pkt, &mut s.flow, &key, app, info, now) {
            Some(flow) => (flow, true),
            None => return drop(DropReason::NoFlow),
        },
    };
    // SAFETY: `flow` points into the map value; fields are read once.
    let (origin_index, origin_port, local_port, flags) = unsafe {
        (
            (*flow).origin,
            (*flow).origin_port,
            (*flow).local_port,
            (*flow).flags,
        )
    };
    let Some(origin) = ORIGINS.get(origin_index) else {
        return drop(DropReason::NoFlow);
    };
    let add = if info.proxy == PROXY_SIMPLE {
        ProxyHeader::Spp
    } else if info.proxy == PROXY_V2 && flags & FLOW_V2_HEADER_SENT == 0 {
        ProxyHeader::V2
    } else {
        ProxyHeader::None
    };
    let rw = &mut s.rw;
    rw.family = pkt.family;
    rw.src = origin.local;
    rw.dst = origin.addr;
    rw.sport = local_port;
    rw.dport = origin_port;
    rw.strip = 0;
    rw.add = add;
    rw.client = pkt.src;
    rw.edge = pkt.dst;
    rw.client_port = pkt.sport;
    rw.edge_port = pkt.dport;
    rw.out_ifindex = origin.ifindex;
    let out_ifindex = rw.out_ifindex;
    let payload = match rewrite_udp(ctx, &s.pkt, &s.rw, &mut s.fib) {
        Ok(payload) => payload,
        Err(reason) => {
            // A flow whose first datagram never left is no flow: release it and
            // the NAT port it claimed.
            if created {
                if info.proxy != PROXY_SIMPLE {
                    let nat = NatKey {
                        local: origin.local,
                        local_port,
                        _pad: 0,
                    };
                    let _ = NAT_PORTS.remove(&nat);
                }
                let _ = FLOWS.remove(&key);
            }
            return drop(reason);
        }
    };
    // SAFETY: atomic adds on the shared map value; plain stores of our own fields.
    unsafe {
        atomic_add(&raw mut (*flow).packets_in, 1);
        atomic_add(&raw mut (*flow).bytes_in, payload);
        (*flow).last_seen_ns = now;
        if add == ProxyHeader::V2 {
            (*flow).flags = flags | FLOW_V2_HEADER_SENT;
        }
    }
    count_app(app, DIR_INGRESS, payload);
    transmit(ctx, out_ifindex)
}

/// A datagram from an origin of UDP app `app` (SPEC §3 step 2 recognised it).
#[inline(always)]
pub fn to_client(ctx: &XdpContext, s: &mut Scratch, app: u32) -> u32 {
    let pkt = &s.pkt;
    if pkt.vlan_tags != 0 {
        return xdp_action::XDP_PASS;
    }
    let Some(info) = APPS.get(app) else {
        return drop(DropReason::NoFlow);
    };
    let simple = info.proxy == PROXY_SIMPLE;
    let key = if simple {
        match spp_flow_key(ctx, pkt) {
            Ok(key) => key,
            Err(reason) => return drop(reason),
        }
    } else {
        let nat = NatKey {
            local: pkt.dst,
            local_port: pkt.dport,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        match unsafe { NAT_PORTS.get(&nat) } {
            Some(key) => *key,
            None => return drop(DropReason::NoFlow),
        }
    };
    let Some(flow) = FLOWS.get_ptr_mut(&key) else {
        return drop(DropReason::NoFlow);
    };
    // SAFETY: reading our own map value.
    let (flow_app, origin_index, origin_port, client_ifindex) = unsafe {
        (
            (*flow).app,
            (*flow).origin,
            (*flow).origin_port,
            (*flow).client_ifindex,
        )
    };
    // Only the flow's own origin may answer it: the forwarder is never a reflector.
    let Some(origin) = ORIGINS.get(origin_index) else {
        return drop(DropReason::NoFlow);
    };
    // Apps may share an origin address and port (ORIGIN_PORTS names one of them):
    // the flow, not that app, says whose reply this is.
    if origin.addr != pkt.src || origin_port != pkt.sport {
        return drop(DropReason::NoFlow);
    }
    let rw = &mut s.rw;
    rw.family = pkt.family;
    rw.src = key.edge;
    rw.dst = key.client;
    rw.sport = key.edge_port;
    rw.dport = key.client_port;
    rw.strip = if simple { SPP_HEADER_LEN } else { 0 };
    rw.add = ProxyHeader::None;
    rw.client = key.client;
    rw.edge = key.edge;
    rw.client_port = key.client_port;
    rw.edge_port = key.edge_port;
    rw.out_ifindex = client_ifindex;
    let payload = match rewrite_udp(ctx, &s.pkt, &s.rw, &mut s.fib) {
        Ok(payload) => payload,
        Err(reason) => return drop(reason),
    };
    // SAFETY: as in to_origin.
    unsafe {
        atomic_add(&raw mut (*flow).packets_out, 1);
        atomic_add(&raw mut (*flow).bytes_out, payload);
        (*flow).last_seen_ns = bpf_ktime_get_ns();
    }
    count_app(flow_app, DIR_EGRESS, payload);
    transmit(ctx, client_ifindex)
}

/// An atomic add (BPF_ATOMIC): flow counters are shared by every CPU.
#[inline(always)]
unsafe fn atomic_add(dst: *mut u64, value: u64) {
    // SAFETY: the caller passes a pointer into a live map value.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            dst, value,
        );
    }
}

#[inline(always)]
fn transmit(ctx: &XdpContext, ifindex: u32) -> u32 {
    if ifindex == ctx.ingress_ifindex() as u32 {
        xdp_action::XDP_TX
    } else {
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}

/// The flow an SPP reply names, after checking the header is there and whole.
#[inline(always)]
fn spp_flow_key(ctx: &XdpContext, pkt: &Packet) -> Result<FlowKey, DropReason> {
    let l4 = pkt.l4 & 0xfff;
    let Some(len) = ptr_at::<[u8; 2]>(ctx, l4 + 4) else {
        return Err(DropReason::Malformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let udp_len = u16::from_be_bytes(unsafe { *len }) as usize;
    if udp_len < 8 + SPP_HEADER_LEN {
        return Err(DropReason::SppInvalid);
    }
    let Some(h) = ptr_at::<[u8; SPP_HEADER_LEN]>(ctx, l4 + 8) else {
        return Err(DropReason::SppInvalid);
    };
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &*h };
    if u16::from_be_bytes([h[0], h[1]]) != SPP_MAGIC {
        return Err(DropReason::SppInvalid);
    }
    let mut key = FlowKey {
        client: [0; 16],
        edge: [0; 16],
        client_port: u16::from_be_bytes([h[34], h[35]]),
        edge_port: u16::from_be_bytes([h[36], h[37]]),
    };
    key.client.copy_from_slice(&h[2..18]);
    key.edge.copy_from_slice(&h[18..34]);
    Ok(key)
}

/// Creates the flow for `key`: picks its origin by a hash of the client address and
/// port, and its local port (plain NAT and v2: a free port of `udp_nat_ports`).
#[inline(always)]
fn new_flow(
    ctx: &XdpContext,
    pkt: &Packet,
    state: &mut FlowState,
    key: &FlowKey,
    app: u32,
    info: &AppInfo,
    now: u64,
) -> Option<*mut FlowState> {
    if info.origin_count == 0 {
        return None;
    }
    let hash = flow_hash(key);
    let origin_index = info.origin_first + (hash % info.origin_count as u32);
    let origin: &OriginInfo = ORIGINS.get(origin_index)?;
    let origin_port = origin.port_low + (pkt.dport - info.edge_port_low);
    let local_port = if info.proxy == PROXY_SIMPLE {
        // SPP replies carry the flow in their header: one local port serves all.
        pkt.dport
    } else {
        claim_nat_port(&origin.local, key, hash)?
    };
    state.first_seen_ns = now;
    state.last_seen_ns = now;
    state.packets_in = 0;
    state.bytes_in = 0;
    state.packets_out = 0;
    state.bytes_out = 0;
    state.app = app;
    state.origin = origin_index;
    state.origin_port = origin_port;
    state.local_port = local_port;
    state.flags = 0;
    state.client_ifindex = ctx.ingress_ifindex() as u32;
    state._pad = 0;
    // Another CPU may have created it meanwhile: then use theirs.
    let _ = FLOWS.insert(key, state, BPF_NOEXIST as u64);
    FLOWS.get_ptr_mut(key)
}

/// Finds a port of `udp_nat_ports` not used by a live flow on `local` and claims it
/// atomically (insert-if-absent), probing a bounded number of candidates.
#[inline(always)]
fn claim_nat_port(local: &[u8; 16], key: &FlowKey, hash: u32) -> Option<u16> {
    let settings = SETTINGS.get(0)?;
    let low = settings.nat_port_low as u32;
    let span = (settings.nat_port_high as u32).checked_sub(low)? + 1;
    for probe in 0..NAT_PORT_PROBES {
        // Spread probes over the range (a large odd step visits distinct ports).
        let port = low + (hash.wrapping_add(probe.wrapping_mul(40_503))) % span;
        let nat = NatKey {
            local: *local,
            local_port: port as u16,
            _pad: 0,
        };
        if NAT_PORTS.insert(&nat, key, BPF_NOEXIST as u64).is_ok() {
            return Some(port as u16);
        }
        // Already ours (a racing first packet of the same flow)? Then reuse it.
        // SAFETY: copied out at once.
        if unsafe { NAT_PORTS.get(&nat) }.is_some_and(|owner| owner == key) {
            let _ = NAT_PORTS.insert(&nat, key, BPF_EXIST as u64);
            return Some(port as u16);
        }
    }
    None
}

/// FNV-1a over the client address and port: stable for a flow's life, spreads
/// clients over origins.
#[inline(always)]
fn flow_hash(key: &FlowKey) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.client {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    for b in key.client_port.to_be_bytes() {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    h
}

/// Output route lookup for `rw.dst` from `rw.src` leaving by `rw.out_ifindex`,
/// with the MTU check of an L3 packet of `l3_len` bytes. On success `p` holds the
/// egress interface and both MAC addresses.
#[inline(always)]
fn route(ctx: &XdpContext, rw: &Rewrite, p: &mut FibParams, l3_len: u16) -> Result<(), DropReason> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid request to fill in.
    *p = unsafe { core::mem::zeroed() };
    p.l4_protocol = 17;
    p.sport = rw.sport.to_be();
    p.dport = rw.dport.to_be();
    p.__bindgen_anon_1.tot_len = l3_len;
    p.ifindex = rw.out_ifindex;
    if rw.family == 4 {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src =
            u32::from_ne_bytes([rw.src[12], rw.src[13], rw.src[14], rw.src[15]]);
        p.__bindgen_anon_4.ipv4_dst =
            u32::from_ne_bytes([rw.dst[12], rw.dst[13], rw.dst[14], rw.dst[15]]);
    } else {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = words(&rw.src);
        p.__bindgen_anon_4.ipv6_dst = words(&rw.dst);
    }
    // SAFETY: `p` is a valid, fully initialised request in map memory.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            p,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(()),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(DropReason::TooBig),
        _ => Err(DropReason::NoRoute),
    }
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

#[inline(always)]
fn proxy_header_len(add: ProxyHeader, family: u8) -> usize {
    match add {
        ProxyHeader::None => 0,
        ProxyHeader::Spp => SPP_HEADER_LEN,
        ProxyHeader::V2 if family == 4 => PROXY_V2_LEN_V4,
        ProxyHeader::V2 => PROXY_V2_LEN_V6,
    }
}

/// Rewrites the datagram in place and returns its payload length (without proxy
/// headers). On error nothing has been changed.
#[inline(always)]
fn rewrite_udp(
    ctx: &XdpContext,
    pkt: &Packet,
    rw: &Rewrite,
    fib: &mut FibParams,
) -> Result<u64, DropReason> {
    let l4 = pkt.l4 & 0xfff;
    let Some(old) = ptr_at::<[u8; 8]>(ctx, l4) else {
        return Err(DropReason::Malformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let old = unsafe { *old };
    let old_len = u16::from_be_bytes([old[4], old[5]]);
    let old_csum = u16::from_be_bytes([old[6], old[7]]);
    // IPv6 forbids a zero UDP checksum; such a datagram is not ours to repair.
    if pkt.family == 6 && old_csum == 0 {
        return Err(DropReason::Malformed);
    }
    let strip = rw.strip;
    if (old_len as usize) < 8 + strip {
        return Err(DropReason::SppInvalid);
    }
    // Sum of the stripped SPP header, read before the bytes go away.
    let mut strip_sum = 0u64;
    if strip == SPP_HEADER_LEN {
        let Some(h) = ptr_at::<[u8; SPP_HEADER_LEN]>(ctx, l4 + 8) else {
            return Err(DropReason::SppInvalid);
        };
        // SAFETY: bounds checked by ptr_at.
        strip_sum = csum::sum_words(unsafe { &*h });
    }
    let payload = old_len as usize - 8 - strip;
    let add_len = proxy_header_len(rw.add, rw.family);
    let new_udp_len = (8 + add_len + payload) as u16;
    let ip_hdr_len = if rw.family == 4 { 20 } else { 40 };
    let l3_len = ip_hdr_len as u16 + new_udp_len;
    route(ctx, rw, fib, l3_len)?;

    // The checksum: take the sender's, remove what changes, add what is new.
    let mut sum = 0u64;
    if !(pkt.family == 4 && old_csum == 0) {
        sum += (!old_csum) as u64;
        sum += csum::negate(csum::pseudo_header(pkt.family, &pkt.src, &pkt.dst, old_len));
        sum += csum::negate(pkt.sport as u64 + pkt.dport as u64 + old_len as u64);
        sum += csum::negate(strip_sum);
        sum += csum::pseudo_header(rw.family, &rw.src, &rw.dst, new_udp_len);
        sum += rw.sport as u64 + rw.dport as u64 + new_udp_len as u64;
        sum += proxy_header_sum(rw);
    }
    // An IPv4 sender that sent no checksum gets none added (RFC 768 allows it).
    let new_csum = if pkt.family == 4 && old_csum == 0 {
        0
    } else {
        match csum::finish(sum) {
            0 => 0xffff,
            c => c,
        }
    };

    // Move the packet start so the payload stays where it is.
    let old_hdr = pkt.l4 + 8 + strip;
    let new_hdr = ETH_HLEN + ip_hdr_len + 8 + add_len;
    let delta = old_hdr as i32 - new_hdr as i32;
    // SAFETY: the helper checks the new head against the frame's headroom.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, delta) } != 0 {
        return Err(DropReason::TooBig);
    }
    write_headers(ctx, rw, fib, new_udp_len, new_csum).ok_or(DropReason::Malformed)?;
    Ok(payload as u64)
}

/// Sum of the proxy header `rw.add` as it will be written.
#[inline(always)]
fn proxy_header_sum(rw: &Rewrite) -> u64 {
    match rw.add {
        ProxyHeader::None => 0,
        ProxyHeader::Spp => {
            SPP_MAGIC as u64
                + csum::sum_words(&rw.client)
                + csum::sum_words(&rw.edge)
                + rw.client_port as u64
                + rw.edge_port as u64
        }
        ProxyHeader::V2 => {
            let (fam, len, addrs) = if rw.family == 4 {
                (
                    0x12u64,
                    12u64,
                    csum::sum_words(&[rw.client[12], rw.client[13], rw.client[14], rw.client[15]])
                        + csum::sum_words(&[rw.edge[12], rw.edge[13], rw.edge[14], rw.edge[15]]),
                )
            } else {
                (
                    0x22u64,
                    36u64,
                    csum::sum_words(&rw.client) + csum::sum_words(&rw.edge),
                )
            };
            csum::sum_words(&PROXY_V2_SIGNATURE)
                + ((0x21u64 << 8) | fam)
                + len
                + addrs
                + rw.client_port as u64
                + rw.edge_port as u64
        }
    }
}

/// Writes Ethernet, IP, UDP and proxy headers at the (new) start of the frame,
/// straight into packet memory (no stack copies: the stack is nearly full).
#[inline(always)]
fn write_headers(
    ctx: &XdpContext,
    rw: &Rewrite,
    fib: &FibParams,
    udp_len: u16,
    udp_csum: u16,
) -> Option<()> {
    // SAFETY: bounds checked by ptr_at_mut; packet memory, exclusively ours.
    let eth = unsafe { &mut *ptr_at_mut::<[u8; ETH_HLEN]>(ctx, 0)? };
    let ether_type = if rw.family == 4 {
        ETH_P_IPV4
    } else {
        ETH_P_IPV6
    };
    {
        eth[0..6].copy_from_slice(&fib.dmac);
        eth[6..12].copy_from_slice(&fib.smac);
        eth[12..14].copy_from_slice(&ether_type.to_be_bytes());
    }
    let l4 = if rw.family == 4 {
        // SAFETY: bounds checked by ptr_at_mut; packet memory, exclusively ours.
        let h = unsafe { &mut *ptr_at_mut::<[u8; 20]>(ctx, ETH_HLEN)? };
        {
            h[0] = 0x45;
            h[1] = 0;
            h[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
            h[4..6].copy_from_slice(&[0, 0]);
            // DF: the forwarder never fragments (too-big datagrams are dropped).
            h[6..8].copy_from_slice(&[0x40, 0]);
            h[8] = TTL;
            h[9] = 17;
            h[10..12].copy_from_slice(&[0, 0]);
            h[12..16].copy_from_slice(&rw.src[12..16]);
            h[16..20].copy_from_slice(&rw.dst[12..16]);
            let c = csum::ipv4_header(h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
        }
        ETH_HLEN + 20
    } else {
        // SAFETY: bounds checked by ptr_at_mut; packet memory, exclusively ours.
        let h = unsafe { &mut *ptr_at_mut::<[u8; 40]>(ctx, ETH_HLEN)? };
        {
            h[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
            h[4..6].copy_from_slice(&udp_len.to_be_bytes());
            h[6] = 17;
            h[7] = TTL;
            h[8..24].copy_from_slice(&rw.src);
            h[24..40].copy_from_slice(&rw.dst);
        }
        ETH_HLEN + 40
    };
    // SAFETY: bounds checked by ptr_at_mut; packet memory, exclusively ours.
    let u = unsafe { &mut *ptr_at_mut::<[u8; 8]>(ctx, l4)? };
    {
        u[0..2].copy_from_slice(&rw.sport.to_be_bytes());
        u[2..4].copy_from_slice(&rw.dport.to_be_bytes());
        u[4..6].copy_from_slice(&udp_len.to_be_bytes());
        u[6..8].copy_from_slice(&udp_csum.to_be_bytes());
    }
    match rw.add {
        ProxyHeader::None => {}
        ProxyHeader::Spp => {
            // SAFETY: bounds checked by ptr_at_mut; packet memory, exclusively ours.
            let h = unsafe { &mut *ptr_at_mut::<[u8; SPP_HEADER_LEN]>(ctx, l4 + 8)? };
            {
                h[0..2].copy_from_slice(&SPP_MAGIC.to_be_bytes());
                h[2..18].copy_from_slice(&rw.client);
                h[18..34].copy_from_slice(&rw.edge);
                h[34..36].copy_from_slice(&rw.client_port.to_be_bytes());
                h[36..38].copy_from_slice(&rw.edge_port.to_be_bytes());
            }
        }
        ProxyHeader::V2 if rw.family == 4 => {
            // SAFETY: bounds checked by ptr_at_mut; packet memory, exclusively ours.
            let h = unsafe { &mut *ptr_at_mut::<[u8; PROXY_V2_LEN_V4]>(ctx, l4 + 8)? };
            {
                h[0..12].copy_from_slice(&PROXY_V2_SIGNATURE);
                h[12..16].copy_from_slice(&[0x21, 0x12, 0, 12]);
                h[16..20].copy_from_slice(&rw.client[12..16]);
                h[20..24].copy_from_slice(&rw.edge[12..16]);
                h[24..26].copy_from_slice(&rw.client_port.to_be_bytes());
                h[26..28].copy_from_slice(&rw.edge_port.to_be_bytes());
            }
        }
        ProxyHeader::V2 => {
            // SAFETY: bounds checked by ptr_at_mut; packet memory, exclusively ours.
            let h = unsafe { &mut *ptr_at_mut::<[u8; PROXY_V2_LEN_V6]>(ctx, l4 + 8)? };
            {
                h[0..12].copy_from_slice(&PROXY_V2_SIGNATURE);
                h[12..16].copy_from_slice(&[0x21, 0x22, 0, 36]);
                h[16..32].copy_from_slice(&rw.client);
                h[32..48].copy_from_slice(&rw.edge);
                h[48..50].copy_from_slice(&rw.client_port.to_be_bytes());
                h[50..52].copy_from_slice(&rw.edge_port.to_be_bytes());
            }
        }
    }
    Some(())
}
