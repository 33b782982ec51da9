//! Spectrum import (being written).
use std::{path::Path, process::ExitCode};
pub fn import_cli(_file: &Path) -> anyhow::Result<ExitCode> {
    anyhow::bail!("import-spectrum: not yet implemented")
}
