//! `cargo xtask clippy` (alias `lint`): rustfmt check plus aya-template's two clippy
//! passes, one for the userspace crates (stable) and one for the eBPF crate (nightly,
//! `bpfel-unknown-none`, `-Z build-std=core`).

use anyhow::{Result, bail};

use crate::util::{command, note, output, run, run_status, step};

/// Adds a rustup component to a toolchain if `probe` (a cargo subcommand) does not run.
fn ensure_component(toolchain: &str, component: &str, probe: &str) -> Result<()> {
    let works = output(command("rustup").args(["run", toolchain, "cargo", probe, "--version"]));
    if works.is_ok() {
        return Ok(());
    }
    note(format!("{component} missing for {toolchain}: adding it"));
    run(command("rustup").args(["component", "add", component, "--toolchain", toolchain]))
}

pub fn clippy() -> Result<()> {
    step("clippy: rustfmt and clippy components");
    // The toolchain that runs xtask (stable by default) for fmt and userspace clippy.
    let stable = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    ensure_component(&stable, "rustfmt", "fmt")?;
    ensure_component(&stable, "clippy", "clippy")?;
    ensure_component("nightly", "clippy", "clippy")?;

    let mut failed = Vec::new();

    step("clippy 1/3: cargo fmt --all -- --check");
    if !run_status(command("cargo").args(["fmt", "--all", "--", "--check"]))?.success() {
        failed.push("rustfmt (run `cargo fmt --all`)");
    }

    step("clippy 2/3: userspace crates (stable)");
    let mut cmd = command("cargo");
    cmd.args([
        "clippy",
        "--workspace",
        "--exclude",
        "forwarder-ebpf",
        "--all-targets",
    ])
    .args(["--", "-D", "warnings"]);
    if !run_status(&mut cmd)?.success() {
        failed.push("clippy (userspace)");
    }

    step("clippy 3/3: eBPF crate (nightly, bpfel-unknown-none)");
    let mut cmd = command("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "--package",
        "forwarder-ebpf",
    ])
    .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
    .args(["--", "-D", "warnings", "-C", "panic=abort"]);
    if !run_status(&mut cmd)?.success() {
        failed.push("clippy (eBPF)");
    }

    if failed.is_empty() {
        step("clippy: all clean");
        Ok(())
    } else {
        bail!("failed: {}", failed.join(", "))
    }
}
