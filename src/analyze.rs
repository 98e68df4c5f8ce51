//! analyze — offline analysis of files/folders with the daemon's series logic.

use anyhow::{bail, Result};
use std::path::PathBuf;

/// `lungsentry analyze` options.
#[derive(clap::Args, Debug, Clone)]
pub struct AnalyzeArgs {
    /// DICOM files or folders (recursed).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// One JSON object per series per line.
    #[arg(long)]
    pub json: bool,
    /// Engine: auto, tract, ort, tensorrt.
    #[arg(long, default_value = "auto")]
    pub engine: String,
    /// Config file (thresholds, series rules); embedded defaults otherwise.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub fn run(_args: AnalyzeArgs) -> Result<()> {
    bail!("analyze: not built yet")
}
