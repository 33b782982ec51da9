//! The forwarder agent as a library: config, eBPF loading, TCP proxy, control plane.

pub mod agent;
pub mod analytics;
pub mod config;
pub mod control;
pub mod datapath;
pub mod ebpf;
pub mod events;
pub mod host;
pub mod metrics;
pub mod reload;
pub mod spectrum;
pub mod stats;
pub mod tcp;
pub mod udp_flows;
pub mod wire;

// The modules that moved under `host/`, at their old paths too.
pub use host::{fd_limit, netlink, route};
