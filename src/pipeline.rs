//! pipeline — wires the stages into the daemon (`serve`).

use anyhow::{bail, Result};
use std::path::PathBuf;

/// `lungsentry serve` options.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// TOML config; embedded defaults when absent.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub async fn serve(_args: ServeArgs) -> Result<()> {
    bail!("serve: not built yet")
}
