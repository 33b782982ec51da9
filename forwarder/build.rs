//! Builds the XDP/sk_lookup object from `forwarder-ebpf` with the nightly toolchain
//! (aya-build) and leaves it in `OUT_DIR/forwarder` for `include_bytes_aligned!`.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build (for quick userspace-only unit test runs);
//! an empty object is left in its place and loading it fails with a clear error.

use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

/// The commit this build comes from (`git rev-parse --short=12 HEAD`), for
/// `--version` and `forwarder_build_info`; "unknown" outside a git checkout.
fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rustc-env=FORWARDER_COMMIT={}", commit());
    let git = concat!(env!("CARGO_MANIFEST_DIR"), "/../.git");
    for path in ["HEAD", "refs/heads"] {
        println!("cargo:rerun-if-changed={git}/{path}");
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("forwarder");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        if !object.exists() {
            fs::write(&object, []).context("writing the empty placeholder eBPF object")?;
        }
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../forwarder-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "forwarder-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
