//! eval — the paper's metrics over labelled series or 2D image folders (see issue 3).

use anyhow::{bail, Result};

/// `lungsentry eval` options.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: EvalArgs) -> Result<()> {
    bail!("eval: not built yet")
}
