//! `forwarder stats` (being written).
use std::process::ExitCode;
pub fn stats_cli(_json: bool, _watch: bool) -> anyhow::Result<ExitCode> {
    anyhow::bail!("stats: not yet implemented")
}
