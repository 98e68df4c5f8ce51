//! analysis — from class scores to masks, 3D lesions, volumes and the involvement flag.
//!
//! Owns: upsampling each slice's score maps to native resolution and taking the argmax (lesion implies lung:
//! [`segment_slice`]); bit-packed and run-length masks ([`BitMask`], [`RunMask`]); 3D components (26-connectivity
//! across adjacent slices) of the lung masks, with the implausible ones dropped, and of the lesion masks, with the
//! small ones dropped; per-lesion volume, mean HU, extent, centroid and side; lung and lesion volumes; involvement and
//! the positive flag ([`analyse_series`]). HU anatomy that corrects the model's lungs: [`lung_guard`]; per-lung /
//! per-zone involvement and the severity score: [`regions`]; comparison with a prior study: [`followup`].
//! Hands on: [`SeriesAnalysis`] (serialisable; its field names are the result JSON's) to `store`/`notify`.
//! Never: decodes pixels, runs the model, or decides what happens with a positive result.
//!
//! Files by job: `segment` (one slice's scores → masks), `mask` (the mask types), `components` (runs joined into
//! 3D components, shared with the lung guard), `series` (a series' slices → [`SeriesAnalysis`]).

pub mod followup;
pub mod lung_guard;
pub mod regions;

mod components;
mod mask;
mod segment;
mod series;

use components::{mask_components, MaskComponents};
pub use mask::{BitMask, RunMask};
/// The GPU decode kernel takes its upsampling taps from the CPU path's own table.
#[cfg(feature = "cuda")]
pub(crate) use segment::upsample_table;
pub use segment::{max_class_probability, segment_slice, SliceSegmentation};
pub use series::{analyse_series, AnalysisParams, Lesion, PlacedSlice, SeriesAnalysis};

/// Class channel of lung in the model output (manifest order: background, lung, lesion).
pub const LUNG_CLASS: usize = 1;
/// Class channel of lesion in the model output.
pub const LESION_CLASS: usize = 2;
