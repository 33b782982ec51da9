//! Config model (being written).
use std::{path::Path, process::ExitCode};
pub fn check_config_cli(_config: &Path) -> anyhow::Result<ExitCode> {
    anyhow::bail!("check-config: not yet implemented")
}
