//! Test support for the forwarder: a network-namespace lab (`client` ↔ `edge` ↔
//! `origin`, see [`Lab`] and `docs/lab.md`) used by the integration tests, the demo
//! and the benchmarks.

pub mod agent;
pub mod demo_main;
pub mod failover;
pub mod frames;
pub mod lab;
pub mod raw_bpf;
pub mod spp_origin;
pub mod xdp_wires;

pub use lab::{
    CLIENT_NET_V4, CLIENT_NET_V6, CLIENT_V4, CLIENT_V6, EDGE_ADDRESSES, EDGE_CLIENT_V4,
    EDGE_CLIENT_V6, EDGE_ORIGIN_V4, EDGE_ORIGIN_V6, Ifaces, Lab, Links, Netns, NsChild, NsTask,
    ORIGIN_NET_V4, ORIGIN_NET_V6, ORIGIN_V4, ORIGIN_V6, OutputOk, PREFIX_V4, PREFIX_V6, Peers,
    Role, XdpStub, cleanup_stale,
};
pub use lab::{Fleet, RouterHashing};

/// Environment variable `cargo xtask test` sets when it runs the root-only tests.
pub const INTEGRATION_ENV: &str = "FORWARDER_INTEGRATION";

/// Whether a test that needs root (namespaces, XDP) can run.
///
/// * euid 0 → `true`;
/// * not root and `FORWARDER_INTEGRATION=1` → panics: the harness asked for the
///   integration tests, so silently skipping them would hide a broken setup;
/// * otherwise prints `skipping: needs root (set by cargo xtask test)` and returns
///   `false`; the test should return early.
///
/// ```no_run
/// if !forwarder_tests::require_root() {
///     return;
/// }
/// ```
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let forced = std::env::var(INTEGRATION_ENV).is_ok_and(|v| v == "1");
    if root {
        return true;
    }
    if forced {
        panic!("{INTEGRATION_ENV}=1 but the tests do not run as root: the lab needs root");
    }
    eprintln!("skipping: needs root (set by cargo xtask test)");
    false
}
