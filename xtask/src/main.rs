//! `cargo xtask`: the project's development commands (see docs/xtask.md).
//!
//! Every subcommand but `setup` runs `setup` first, so a fresh machine needs nothing
//! but rustup's stable and nightly toolchains and root.

mod dist;
mod lint;
mod setup;
mod test;
mod util;

use std::{os::unix::process::CommandExt as _, process::ExitCode};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

use util::{command, note, run, step};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "forwarder development commands"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and the lab need: rust-src for nightly, bpf-linker,
    /// Debian packages; check the kernel. Idempotent.
    Setup,
    /// Build the release `forwarder` binary (the build script compiles the eBPF crate).
    Build,
    /// Build, then run `target/release/forwarder ARGS...`
    /// (default: `run --config examples/forwarder.toml`).
    Run {
        /// Arguments for `forwarder`, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, run the unit and CLI tests, then the lab's integration tests (root).
    Test,
    /// Run the interactive lab demo (`forwarder-tests` binary `demo`; root).
    Demo {
        /// Arguments for the demo binary, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the fleet demo: three agents behind ECMP and BGP (BIRD), one killed
    /// (`forwarder-tests` binary `demo-fleet`; root). See docs/fleet.md.
    DemoFleet {
        /// Arguments for the demo binary, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the benchmarks (`forwarder-tests` binary `bench`; root).
    Bench {
        /// Run only this scenario.
        #[arg(long)]
        scenario: Option<String>,
        /// Short runs, for a smoke test.
        #[arg(long)]
        quick: bool,
        /// More arguments for the bench binary, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// rustfmt check, clippy on the userspace crates and on the eBPF crate.
    #[command(alias = "lint")]
    Clippy,
    /// Build a Debian package (`target/dist/forwarder_VERSION_ARCH.deb`): the binary,
    /// the systemd unit, the example config, a logrotate file, man pages,
    /// completions and the docs.
    Dist,
}

fn main() -> ExitCode {
    util::ensure_cargo_bin_on_path();
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cmd: Cmd) -> Result<()> {
    setup::setup()?;
    match cmd {
        Cmd::Setup => Ok(()),
        Cmd::Build => build(),
        Cmd::Run { args } => run_forwarder(args),
        Cmd::Test => test::test(),
        Cmd::Demo { args } => lab_binary("demo", args),
        Cmd::DemoFleet { args } => lab_binary("demo-fleet", args),
        Cmd::Bench {
            scenario,
            quick,
            args,
        } => lab_binary("bench", bench_args(scenario, quick, args)),
        Cmd::Clippy => lint::clippy(),
        Cmd::Dist => dist::dist().map(|_| ()),
    }
}

/// `cargo build --release -p forwarder`; returns the binary's path.
pub fn build() -> Result<()> {
    step("build: cargo build --release -p forwarder");
    run(command("cargo").args(["build", "--release", "-p", "forwarder"]))
        .context("building forwarder failed")?;
    let bin = util::forwarder_bin();
    if !bin.is_file() {
        bail!("the build succeeded but {} is missing", bin.display());
    }
    note(format!("binary: {}", bin.display()));
    Ok(())
}

/// The forwarder arguments `cargo xtask run` uses.
pub fn forwarder_args(args: Vec<String>) -> Vec<String> {
    if args.is_empty() {
        ["run", "--config", "examples/forwarder.toml"]
            .map(String::from)
            .to_vec()
    } else {
        args
    }
}

fn run_forwarder(args: Vec<String>) -> Result<()> {
    build()?;
    let bin = util::forwarder_bin();
    let mut cmd = command(&bin);
    cmd.args(forwarder_args(args));
    step(format!("run: {}", util::display(&cmd)));
    // Replaces this process, so signals (SIGINT/SIGTERM/SIGHUP) reach forwarder directly.
    let err = cmd.stdin(std::process::Stdio::inherit()).exec();
    Err(err).with_context(|| format!("could not exec {}", bin.display()))
}

/// The bench binary's arguments.
pub fn bench_args(scenario: Option<String>, quick: bool, extra: Vec<String>) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(s) = scenario {
        args.extend(["--scenario".to_string(), s]);
    }
    if quick {
        args.push("--quick".into());
    }
    args.extend(extra);
    args
}

/// Whether `tests/` (crate forwarder-tests) has a binary `name`.
fn lab_binary_exists(name: &str) -> bool {
    let tests = util::workspace_root().join("tests");
    let file = tests.join("src/bin").join(format!("{name}.rs"));
    let dir = tests.join("src/bin").join(name).join("main.rs");
    let declared = std::fs::read_to_string(tests.join("Cargo.toml")).is_ok_and(|manifest| {
        manifest
            .lines()
            .any(|l| l.replace(' ', "") == format!("name=\"{name}\""))
    });
    file.is_file() || dir.is_file() || declared
}

/// `cargo run --release -p forwarder-tests --bin NAME -- ARGS`, after building forwarder.
fn lab_binary(name: &str, args: Vec<String>) -> Result<()> {
    if !lab_binary_exists(name) {
        bail!(
            "the `{name}` program does not exist yet: expected tests/src/bin/{name}.rs \
             (crate forwarder-tests)"
        );
    }
    if !util::is_root() {
        util::warn(format!(
            "`{name}` builds network namespaces and attaches XDP: it needs root"
        ));
    }
    build()?;
    // The lab's own helper programs too (the bench's `uring_floor`).
    step("cargo build --release -p forwarder-tests --bins");
    run(command("cargo").args(["build", "--release", "-p", "forwarder-tests", "--bins"]))
        .context("building forwarder-tests' programs")?;
    step(format!(
        "{name}: cargo run --release -p forwarder-tests --bin {name}"
    ));
    let mut cmd = command("cargo");
    cmd.env("FORWARDER_BIN", util::forwarder_bin())
        .args([
            "run",
            "--release",
            "-p",
            "forwarder-tests",
            "--bin",
            name,
            "--",
        ])
        .args(&args)
        .stdin(std::process::Stdio::inherit());
    run(&mut cmd).with_context(|| format!("`cargo xtask {name}` failed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults_to_example_config() {
        assert_eq!(
            forwarder_args(vec![]),
            ["run", "--config", "examples/forwarder.toml"]
        );
        let args = vec!["check-config".into(), "--config".into(), "x.toml".into()];
        assert_eq!(forwarder_args(args.clone()), args);
    }

    #[test]
    fn parses_run_and_bench() {
        let cli = Cli::try_parse_from(["xtask", "run", "--", "stats", "--json"]).unwrap();
        match cli.command {
            Cmd::Run { args } => assert_eq!(args, ["stats", "--json"]),
            _ => panic!("not run"),
        }
        let cli =
            Cli::try_parse_from(["xtask", "bench", "--scenario", "udp-flood", "--quick"]).unwrap();
        match cli.command {
            Cmd::Bench {
                scenario,
                quick,
                args,
            } => {
                assert_eq!(
                    bench_args(scenario, quick, args),
                    ["--scenario", "udp-flood", "--quick"]
                );
            }
            _ => panic!("not bench"),
        }
        assert!(matches!(
            Cli::try_parse_from(["xtask", "lint"]).unwrap().command,
            Cmd::Clippy
        ));
        assert!(matches!(
            Cli::try_parse_from(["xtask", "demo-fleet"])
                .unwrap()
                .command,
            Cmd::DemoFleet { .. }
        ));
    }
}
