//! The forwarder agent as a library: config, eBPF loading, TCP proxy, control plane.

pub mod agent;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod ebpf;
pub mod host;
pub mod lb;
pub mod reload;
pub mod spectrum;
pub mod tcp;
pub mod telemetry;
pub mod tls;
pub mod udp_flows;
pub mod wire;

// The modules that moved under `host/`, at their old paths too.
pub use host::{fd_limit, netlink, route};

/// The package version and the commit it was built from: `--version` and
/// `forwarder_build_info`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("FORWARDER_COMMIT"),
    ")"
);

/// The commit this binary was built from ("unknown" outside a git checkout).
pub const COMMIT: &str = env!("FORWARDER_COMMIT");
