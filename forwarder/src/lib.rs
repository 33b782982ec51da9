//! The forwarder agent as a library: config, eBPF loading, TCP proxy, control plane.

pub mod ebpf;
