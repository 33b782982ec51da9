//! `forwarder run` (being written).
use std::{path::Path, process::ExitCode};
pub fn run_cli(_config: &Path, _drain: &str) -> anyhow::Result<ExitCode> {
    anyhow::bail!("run: not yet implemented")
}
