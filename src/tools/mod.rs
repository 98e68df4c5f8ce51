//! tools — the commands that stand beside the daemon: they drive, feed, measure or replay the pipeline, and the
//! pipeline never uses them (`scripts/arch-check` fails when a module outside `tools/` imports one).
//!
//! One line each:
//! - [`analyze`]: `lungsentry analyze`, offline analysis of files and folders with the daemon's own series logic.
//! - [`demo`]: `lungsentry demo`, the daemon in-process on loopback fed a positive and a negative phantom.
//! - [`eval`]: `lungsentry eval`, the paper's metrics over labelled images, phantom series or real series.
//! - [`gpu_check`]: `lungsentry gpu`, whether the GPU path works here, PTX builds, kernels against the CPU path
//!   (`cuda` feature).
//! - [`hil`]: `lungsentry hil`, the hardware-in-the-loop harness that replays series to an appliance and reports.
//! - [`phantom`]: `lungsentry phantom`, synthetic chest CT series with exact ground truth.
//! - [`scu_cli`]: `lungsentry send` / `lungsentry echo`, the command line over [`crate::scu`] (which stays below:
//!   the DICOM outbox sends through it).
//!
//! Owns: the tools' command lines and their reports. Hands on: files, reports and exit statuses, never anything
//! the daemon reads back. Never: holds code a pipeline stage needs (such code moves down into the stage's module).

pub mod analyze;
pub mod demo;
pub mod eval;
#[cfg(feature = "cuda")]
pub mod gpu_check;
pub mod hil;
pub mod phantom;
pub mod scu_cli;
