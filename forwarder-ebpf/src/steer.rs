//! sk_lookup: steer new TCP connections for any port of a TCP app to that app's one
//! listening socket (SPEC §4), so the agent never binds a port range in a loop.

use aya_ebpf::{
    bindings::{bpf_sk_lookup, sk_action},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use forwarder_common::{APP_PASS, PROTO_TCP, PortKey, v4_mapped};

use crate::{
    maps::{PORTS, TCP_LISTENERS},
    policy::edge_index,
};

const AF_INET: u32 = 2;

#[sk_lookup]
pub fn sk_lookup_steer(ctx: SkLookupContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's run.
    let lookup: &bpf_sk_lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != PROTO_TCP as u32 {
        return sk_action::SK_PASS;
    }
    let local = if lookup.family == AF_INET {
        v4_mapped(lookup.local_ip4.to_ne_bytes())
    } else {
        let mut addr = [0u8; 16];
        for (i, word) in lookup.local_ip6.iter().enumerate() {
            addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        addr
    };
    let Some(edge) = edge_index(&local) else {
        return sk_action::SK_PASS;
    };
    let key = PortKey {
        edge,
        // local_port is in host byte order.
        port: lookup.local_port as u16,
        proto: PROTO_TCP,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let app = match unsafe { PORTS.get(&key) } {
        Some(t) if t.app != APP_PASS => t.app,
        _ => return sk_action::SK_PASS,
    };
    // No socket for the app (agent restarting): let the normal lookup answer.
    let _ = TCP_LISTENERS.redirect_sk_lookup(&ctx, app, 0);
    sk_action::SK_PASS
}
