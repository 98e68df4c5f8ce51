//! demo — a positive and a negative synthetic series through the in-process daemon over loopback DICOM.

use anyhow::{bail, Result};

/// `lungsentry demo` options.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {}

pub async fn run(_args: DemoArgs) -> Result<()> {
    bail!("demo: not built yet")
}
