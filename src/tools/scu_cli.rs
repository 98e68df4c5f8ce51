//! scu_cli — `lungsentry send` and `lungsentry echo`: the command line over [`crate::scu`].
//!
//! Owns: the two commands' options, checking them (`--rate`, `--timeout`), and what they print: one line per
//! failed or skipped file and a summary for `send`, the round-trip time for `echo`.
//! Hands on: the exit status (an error when a file was not stored or nothing was found).
//! Never: speaks DICOM itself; association, presentation contexts, pacing and the per-file outcome are
//! [`crate::scu`]'s, which the daemon's DICOM outbox uses too.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::scu::{echo_peer, send_files, Peer, SendOptions};

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
    /// Seconds to wait for the peer (connect, association, each response).
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
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
    /// Seconds to wait for the peer.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
}

fn timeout_from(seconds: f64) -> Result<Duration> {
    if !(seconds > 0.0 && seconds.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `lungsentry send`: prints one line per failed file and a summary; errors when any file failed.
pub async fn send(args: SendArgs) -> Result<()> {
    if let Some(r) = args.rate {
        if !(r > 0.0 && r.is_finite()) {
            bail!("--rate must be a positive number of images per second");
        }
    }
    let opts = SendOptions {
        peer: Peer {
            host: args.host,
            port: args.port,
            called_ae: args.called_ae,
            calling_ae: args.calling_ae,
            timeout: timeout_from(args.timeout)?,
        },
        rate: args.rate,
    };
    let report = send_files(&opts, &args.paths).await?;
    for (path, why) in &report.skipped {
        eprintln!("skipped {}: {why}", path.display());
    }
    for f in &report.failed {
        eprintln!("FAILED {}: {}", f.path.display(), f.reason);
    }
    let secs = report.elapsed.as_secs_f64();
    println!(
        "sent {} of {} file(s) in {:.2} s ({:.1} images/s); {} failed, {} skipped",
        report.sent.len(),
        report.sent.len() + report.failed.len(),
        secs,
        if secs > 0.0 { report.sent.len() as f64 / secs } else { 0.0 },
        report.failed.len(),
        report.skipped.len()
    );
    if !report.failed.is_empty() {
        bail!("{} file(s) were not stored", report.failed.len());
    }
    if report.sent.is_empty() {
        bail!("no DICOM files found");
    }
    Ok(())
}

/// `lungsentry echo`: prints the round-trip time on success.
pub async fn echo(args: EchoArgs) -> Result<()> {
    let peer = Peer {
        host: args.host,
        port: args.port,
        called_ae: args.called_ae,
        calling_ae: args.calling_ae,
        timeout: timeout_from(args.timeout)?,
    };
    let t = Instant::now();
    echo_peer(&peer).await?;
    println!(
        "C-ECHO to {} at {}:{} succeeded in {:.1} ms",
        peer.called_ae,
        peer.host,
        peer.port,
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}
