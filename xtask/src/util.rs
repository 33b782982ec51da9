//! Small helpers shared by the subcommands: printing steps, running commands, paths.

use std::{
    env,
    ffi::OsStr,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Prints a `==> step` header line (flushed, so it stays in order with child output).
pub fn step(msg: impl AsRef<str>) {
    println!("==> {}", msg.as_ref());
    let _ = std::io::stdout().flush();
}

/// Prints an indented detail line under the current step.
pub fn note(msg: impl AsRef<str>) {
    println!("    {}", msg.as_ref());
    let _ = std::io::stdout().flush();
}

/// Prints a warning line to stderr.
pub fn warn(msg: impl AsRef<str>) {
    eprintln!("warning: {}", msg.as_ref());
}

/// The workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to the workspace root) or
/// `<root>/target`.
pub fn target_dir() -> PathBuf {
    let root = workspace_root();
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// Path of the release `forwarder` binary that `cargo xtask build` produces.
pub fn forwarder_bin() -> PathBuf {
    target_dir().join("release").join("forwarder")
}

/// Renders a command the way a person would type it, environment overrides first.
pub fn display(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| {
            let k = k.to_string_lossy();
            if k == "PATH" || k == "LD_LIBRARY_PATH" {
                return None;
            }
            v.map(|v| format!("{k}={}", quote(v)))
        })
        .collect();
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A command rooted in the workspace, with stdin closed (nothing may prompt: CI has no
/// stdin) and the library path that `cargo run` adds for xtask itself removed again.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root()).stdin(Stdio::null());
    if let Some(v) = cleaned_ld_library_path() {
        if v.is_empty() {
            cmd.env_remove("LD_LIBRARY_PATH");
        } else {
            cmd.env("LD_LIBRARY_PATH", v);
        }
    }
    cmd
}

/// `cargo run` puts the target dir and the stable toolchain's lib dirs on
/// `LD_LIBRARY_PATH` for xtask; they must not leak into the nightly toolchain or into
/// bpf-linker (whose libLLVM is found through its RUNPATH). Returns `None` when there
/// is nothing to change.
fn cleaned_ld_library_path() -> Option<String> {
    let current = env::var("LD_LIBRARY_PATH").ok()?;
    let rustup_home = env::var("RUSTUP_HOME").ok();
    let target = target_dir();
    let kept: Vec<&str> = current
        .split(':')
        .filter(|p| {
            !p.is_empty()
                && !Path::new(p).starts_with(&target)
                && !rustup_home
                    .as_deref()
                    .is_some_and(|h| Path::new(p).starts_with(Path::new(h).join("toolchains")))
        })
        .collect();
    let kept = kept.join(":");
    (kept != current).then_some(kept)
}

/// Runs a command to completion with inherited output, printing it first.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = run_status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Like [`run`] but returns the exit status instead of failing on a non-zero one.
pub fn run_status(cmd: &mut Command) -> Result<ExitStatus> {
    note(format!("$ {}", display(cmd)));
    cmd.status()
        .with_context(|| format!("could not start `{}`", display(cmd)))
}

/// Runs a command quietly and returns its trimmed stdout when it succeeds.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Effective user id, read from `/proc/self/status` (no libc needed).
pub fn euid() -> Option<u32> {
    parse_euid(&fs::read_to_string("/proc/self/status").ok()?)
}

/// Parses the effective uid (second field of the `Uid:` line) of `/proc/<pid>/status`.
pub fn parse_euid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn is_root() -> bool {
    euid() == Some(0)
}

/// `$HOME`, required for the persistent LLVM prefix.
pub fn home_dir() -> Result<PathBuf> {
    env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .context("$HOME is not set")
}

/// Makes sure cargo's bin directory (where `cargo install` puts bpf-linker) is on
/// `PATH` for every child, so a fresh install is found by the eBPF build.
pub fn ensure_cargo_bin_on_path() {
    let cargo_bin = match env::var_os("CARGO_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h).join("bin"),
        _ => match home_dir() {
            Ok(h) => h.join(".cargo").join("bin"),
            Err(_) => return,
        },
    };
    let path = env::var_os("PATH").unwrap_or_default();
    if env::split_paths(&path).any(|p| p == cargo_bin) {
        return;
    }
    let joined = env::join_paths(std::iter::once(cargo_bin).chain(env::split_paths(&path)));
    if let Ok(joined) = joined {
        // SAFETY: called at the very start of `main`, before any other thread exists.
        unsafe { env::set_var("PATH", joined) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn euid_is_second_uid_field() {
        let status =
            "Name:\tcat\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(parse_euid(status), Some(0));
        assert_eq!(parse_euid("Uid:\t0\t1000\t1000\t1000\n"), Some(1000));
        assert_eq!(parse_euid("Name:\tx\n"), None);
    }

    #[test]
    fn display_quotes_only_when_needed() {
        let mut cmd = Command::new("cargo");
        cmd.args(["test", "--", "--test-threads=2", "a b"])
            .env("FORWARDER_INTEGRATION", "1");
        assert_eq!(
            display(&cmd),
            "FORWARDER_INTEGRATION=1 cargo test -- --test-threads=2 'a b'"
        );
    }
}
