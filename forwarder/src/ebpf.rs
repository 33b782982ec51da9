//! The compiled eBPF object (XDP datapath, sk_lookup steering, XDP_PASS stub).

/// The eBPF object built by `build.rs`. Empty when built with `AYA_BUILD_SKIP=1`.
pub fn object_bytes() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder"))
}
