//! scu — the sending side of DICOM: C-STORE SCU (`send`, scanner-paced replay) and C-ECHO SCU (`echo`).

use anyhow::{bail, Result};
use std::path::PathBuf;

/// `lungsentry send` options.
#[derive(clap::Args, Debug, Clone)]
pub struct SendArgs {
    /// Peer host.
    #[arg(long)]
    pub host: String,
    /// Peer port.
    #[arg(long)]
    pub port: u16,
    /// Called AE title.
    #[arg(long, default_value = "LUNGSENTRY")]
    pub called_ae: String,
    /// Calling AE title.
    #[arg(long, default_value = "LUNGSENTRY-SCU")]
    pub calling_ae: String,
    /// Images per second (unpaced when absent).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Files or folders (recursed).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

/// `lungsentry echo` options.
#[derive(clap::Args, Debug, Clone)]
pub struct EchoArgs {
    /// Peer host.
    #[arg(long)]
    pub host: String,
    /// Peer port.
    #[arg(long)]
    pub port: u16,
    /// Called AE title.
    #[arg(long, default_value = "LUNGSENTRY")]
    pub called_ae: String,
    /// Calling AE title.
    #[arg(long, default_value = "LUNGSENTRY-SCU")]
    pub calling_ae: String,
}

pub async fn send(_args: SendArgs) -> Result<()> {
    bail!("send: not built yet")
}

pub async fn echo(_args: EchoArgs) -> Result<()> {
    bail!("echo: not built yet")
}
