//! `cargo xtask bench`: the forwarder's benchmarks in the netns lab (root). Every
//! scenario runs its variants interleaved and reports medians, min–max and ratios
//! to a baseline measured in the same run; see docs/benchmarks.md.

#[path = "../bench/mod.rs"]
mod bench;

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let probe = args.iter().any(|a| a == "--probe");
    args.retain(|a| a != "--probe");
    let opts = match bench::Options::parse(&args) {
        Ok(Some(opts)) => opts,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    if !forwarder_tests::require_root() {
        eprintln!("bench: needs root (network namespaces, XDP)");
        return ExitCode::FAILURE;
    }
    if let Err(e) = forwarder_tests::cleanup_stale() {
        eprintln!("bench: removing stale lab namespaces: {e:#}");
    }
    if probe {
        return match bench::udp::probe(&opts) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match bench::run(&opts) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
