//! lungsentry — scanner-side COVID-19 pneumonia flagging for CT series received over DICOM.
//!
//! The pipeline, one module per stage:
//!
//! ```text
//! receive (SCP) → spool (durable) → series (grouping, eligibility, completion) → decode (pixels → HU)
//! → preprocess (the model's input: normalise, resample) → engine (tract | ort | tensorrt) → analysis (masks,
//! 3D lesions, involvement, flags) → result (the typed SeriesResult) → store (SQLite) → notify / outputs
//! (webhook, SEG/SR/key images, both through the one durable outbox loop of `delivery`)
//! ```
//!
//! `pipeline` wires the stages into the daemon (`serve`); `scu` is the sending side of DICOM (C-STORE, C-ECHO) the
//! DICOM outbox sends through; `retention` purges the pixel data of finished series; `datadir` owns every path
//! under the data dir (and its checked delete), `uid` the validated UID every such name derived from a peer value
//! is.
//!
//! The tools stand apart in [`tools`] (nothing above imports them): `analyze` (the series logic offline), `demo`,
//! `eval` (the paper's metrics), `gpu_check`, `hil` (hardware-in-the-loop harness), `phantom` (synthetic CT series
//! with ground truth) and `scu_cli` (`send`, `echo`).
//!
//! Leaves every module may use (they import nothing else of the crate): `config` (the typed configuration),
//! `dicom` (encoding rules, bounds checks, DIMSE status codes) and `clock` (wall-clock time and its RFC 3339 form).
//!
//! Every `unsafe` block carries a `// SAFETY:` comment saying why it is sound; inside an `unsafe fn` each unsafe
//! operation still needs its own block.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod analysis;
pub mod clock;
pub mod config;
pub mod dashboard;
pub mod datadir;
pub mod decode;
pub mod delivery;
pub mod dicom;
pub mod engine;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod http;
pub mod instance;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod outputs;
pub mod pipeline;
pub mod preprocess;
pub mod receive;
pub mod result;
pub mod retention;
pub mod scu;
pub mod series;
pub mod spool;
pub mod store;
pub mod test_hooks;
pub mod tools;
pub mod uid;
