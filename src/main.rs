//! The `lungsentry` command line: one subcommand per user task.

#![deny(unsafe_op_in_unsafe_fn)]

use anyhow::Result;
use clap::{Parser, Subcommand};

use lungsentry::tools::{analyze, demo, eval, hil, phantom, scu_cli};
use lungsentry::{logging, pipeline};

/// Scanner-side COVID-19 pneumonia lesion segmentation and flagging for CT series received over DICOM.
#[derive(Parser)]
#[command(name = "lungsentry", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: DICOM SCP, analysis pipeline, alerts, dashboard.
    Serve(pipeline::ServeArgs),
    /// Analyse DICOM files or folders offline; one JSON object per series.
    Analyze(analyze::AnalyzeArgs),
    /// Send DICOM files to an SCP (C-STORE SCU), optionally paced like a scanner.
    Send(scu_cli::SendArgs),
    /// Verify a DICOM peer answers (C-ECHO SCU).
    Echo(scu_cli::EchoArgs),
    /// Generate a positive and a negative synthetic series, serve them in-process over loopback, print results.
    Demo(demo::DemoArgs),
    /// Write a synthetic chest CT series with ground truth.
    Phantom(phantom::PhantomArgs),
    /// Hardware-in-the-loop run: replay a manifest of series to an appliance, check results and alerts, write a report.
    Hil(hil::HilArgs),
    /// Compute the paper's metrics over labelled series or 2D image folders.
    Eval(eval::EvalArgs),
    /// GPU kernels: availability, PTX compilation, comparison with the CPU path and timings (`cuda` feature).
    #[cfg(feature = "cuda")]
    Gpu(lungsentry::tools::gpu_check::GpuArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    logging::init();
    match cli.command {
        Command::Phantom(a) => phantom::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Analyze(a) => analyze::run(a),
        #[cfg(feature = "cuda")]
        Command::Gpu(a) => lungsentry::tools::gpu_check::run(a),
        other => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async move {
                match other {
                    Command::Serve(a) => pipeline::serve(a).await,
                    Command::Send(a) => scu_cli::send(a).await,
                    Command::Echo(a) => scu_cli::echo(a).await,
                    Command::Demo(a) => demo::run(a).await,
                    Command::Hil(a) => hil::run(a).await,
                    Command::Phantom(_) | Command::Eval(_) | Command::Analyze(_) => unreachable!(),
                    #[cfg(feature = "cuda")]
                    Command::Gpu(_) => unreachable!(),
                }
            })
        }
    }
}
