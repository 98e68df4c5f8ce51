//! pipeline — wires the stages into the daemon (`serve`), one file per job.
//!
//! ```text
//! receive ──ReceiveEvent──▶ instance task: spool (fsync) → store row → enqueue to series worker ─▶ C-STORE-RSP
//!                                                                  │ (response waits while the queued work
//!                                                                  │  exceeds engine.max_backlog_s: backlog.rs)
//!                               completion ticker ──Complete──▶ series worker: segment each slice as it
//!                                                                  arrives; on Complete: 3D analysis →
//!                                                                  store result (+ outbox row) → notify
//! ```
//! The stages in order, and the file that holds each:
//! 1. `daemon` — start-up order, the shared state, the tasks, READY and graceful shutdown.
//! 2. `ingest` — a received instance: spool → store row → its worker's queue → the C-STORE answer;
//!    `backlog` paces that answer by the seconds of segmentation queued; `labels` keeps the dashboard's labels.
//! 3. `worker` — one task per active series: segment each slice as it arrives (`segpool` threads, `slices`
//!    work), analyse on completion, linger; `completion` is the ticker that says when a series is whole.
//! 4. `finish` — the result: 3D analysis, follow-up links, alert policy (with `exam_flag`), the commit, and what
//!    follows it; `outputs_sweep` queues amended SRs and, at start, the DICOM outputs a stop left unqueued.
//! 5. Beside them: `recovery` (after a panic in the shared state: rebuild, or exit for systemd), `liveness`
//!    (the watchdog's evidence of progress), `gauges` (what `/metrics` reads at scrape time).
//!
//! Never: parses PDUs, writes spool files or SQL itself — each stage module does its own part.

mod backlog;
mod completion;
mod daemon;
pub mod exam_flag;
mod finish;
mod gauges;
mod ingest;
mod labels;
mod liveness;
mod outputs_sweep;
mod recovery;
mod segpool;
mod slices;
mod worker;

pub use daemon::{serve, Daemon, ServeArgs};
pub use finish::link_follow_ups;
pub use slices::{InferenceContext, SeriesWork};
