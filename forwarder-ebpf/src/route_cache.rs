//! Where a flow's datagrams leave: the result of `bpf_fib_lookup` (egress interface,
//! next-hop and own MAC) cached in the flow, valid while the agent's route epoch
//! stays the same. The agent bumps the epoch when routes, neighbours, addresses or
//! links change, and periodically, so a change is followed within a second; a
//! miss looks the route up again and refills the cache.
//!
//! The MTU check rides on the cache too: `mtu_ok` is the longest datagram the
//! lookup of this epoch accepted, and a longer one is looked up again (the kernel
//! then either accepts it or says "fragmentation needed" with the MTU).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT,
        bpf_fib_lookup as FibParams,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use forwarder_common::{DropReason, ROUTE_EPOCH_INDEX, RouteCache};

use crate::{addr, maps::ROUTE_EPOCH};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The route epoch now in force.
#[inline(always)]
pub fn current_epoch() -> u32 {
    ROUTE_EPOCH.get(ROUTE_EPOCH_INDEX).copied().unwrap_or(0)
}

/// One datagram's route question: family, addresses and ports of the packet to
/// send, the interface to look up from, and its L3 length.
pub struct Query<'a> {
    pub family: u8,
    pub src: &'a [u8; 16],
    pub dst: &'a [u8; 16],
    /// Ports in host order.
    pub sport: u16,
    pub dport: u16,
    pub ifindex: u32,
    pub l3_len: u16,
}

/// Why a route could not be used.
pub enum RouteError {
    /// The datagram exceeds the path MTU (which is given).
    TooBig(u16),
    NoRoute,
}

impl RouteError {
    #[inline(always)]
    pub fn reason(&self) -> DropReason {
        match self {
            RouteError::TooBig(_) => DropReason::TooBig,
            RouteError::NoRoute => DropReason::NoRoute,
        }
    }
}

/// Makes `cache` valid for `q` in `epoch`: a hit costs two compares, a miss one
/// `bpf_fib_lookup` (with `fib` as its parameter block).
///
/// # Safety
/// `cache` points into a live map value.
#[inline(always)]
pub unsafe fn resolve(
    ctx: &XdpContext,
    fib: &mut FibParams,
    cache: *mut RouteCache,
    epoch: u32,
    q: &Query,
) -> Result<(), RouteError> {
    // SAFETY: the caller passes a live map value; concurrent refills write the same
    // answer, so a torn read costs at most one more lookup.
    let (cached_epoch, mtu_ok) = unsafe { ((*cache).epoch, (*cache).mtu_ok) };
    if cached_epoch == epoch && cached_epoch != 0 && q.l3_len <= mtu_ok {
        return Ok(());
    }
    lookup(ctx, fib, q)?;
    let mtu_ok = if cached_epoch == epoch && mtu_ok > q.l3_len {
        mtu_ok
    } else {
        q.l3_len
    };
    // SAFETY: as above.
    unsafe {
        (*cache).ifindex = fib.ifindex;
        (*cache).dmac = fib.dmac;
        (*cache).smac = fib.smac;
        (*cache).mtu_ok = mtu_ok;
        (*cache).epoch = epoch;
    }
    Ok(())
}

/// `bpf_fib_lookup` as output from `q.ifindex`, with the MTU check for
/// `q.l3_len`. Only the input fields are written: the 64-byte block is not zeroed
/// (the rest is output, or input only under flags not used here).
#[inline(always)]
fn lookup(ctx: &XdpContext, p: &mut FibParams, q: &Query) -> Result<(), RouteError> {
    p.l4_protocol = 17;
    p.sport = q.sport.to_be();
    p.dport = q.dport.to_be();
    p.__bindgen_anon_1.tot_len = q.l3_len;
    p.ifindex = q.ifindex;
    p.__bindgen_anon_2.flowinfo = 0;
    if q.family == 4 {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = addr::v4(q.src);
        p.__bindgen_anon_4.ipv4_dst = addr::v4(q.dst);
    } else {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = *addr::u32s(q.src);
        p.__bindgen_anon_4.ipv6_dst = *addr::u32s(q.dst);
    }
    // SAFETY: `p` is a fully initialised request in map memory.
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
        // SAFETY: on FRAG_NEEDED the kernel wrote the MTU into the union.
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            Err(RouteError::TooBig(unsafe { p.__bindgen_anon_1.mtu_result }))
        }
        _ => Err(RouteError::NoRoute),
    }
}
