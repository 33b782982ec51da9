//! Per-CPU working memory for one packet. The BPF stack (512 bytes) cannot hold
//! the parsed summary, a flow key, a new flow's state and a route lookup next to
//! the classifier's own; a program run never migrates CPUs, so each CPU's slot has
//! one user at a time.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, bpf_sock_tuple},
    macros::map,
    maps::PerCpuArray,
};
use forwarder_common::{FlowKey, FlowState, NatClaim, NatKey, SpliceKey};

use crate::parse::Packet;

#[repr(C)]
pub struct Scratch {
    pub pkt: Packet,
    /// The flow a datagram belongs to (client-side 4-tuple).
    pub key: FlowKey,
    /// `udp::established` looked `key` up and found no flow.
    pub flow_missed: bool,
    /// Lookup key of the NAT return path.
    pub nat: NatKey,
    /// A new flow's state before it is inserted (or a promoted flow's copy).
    pub flow: FlowState,
    /// A new NAT port claim's value before it is inserted.
    pub claim: NatClaim,
    pub fib: bpf_fib_lookup,
    /// The 4-tuple a TCP segment is looked up by in `SPLICES`.
    pub splice: SpliceKey,
    pub tuple: bpf_sock_tuple,
}

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
