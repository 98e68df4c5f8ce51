//! outputs — the DICOM objects made from an analysed series, for PACS and viewers.
//!
//! Owns: building, from one result (the stored result JSON, whose numbers are the only ones used) and the series'
//! ordered masks, up to three kinds of new instances in the original study, each in its own new series:
//! - **SEG** (`seg`): binary Segmentation, segments 1 "Lung" and 2 "COVID-19 lesion" (SNOMED CT coded), per-frame
//!   references to the source CT instances, the source Frame of Reference, algorithm identification;
//! - **SR** (`sr`): Comprehensive 3D SR, TID 1500 measurement report: lung volume, lesion volume, involvement,
//!   flag and lesion count, then one TID 1411 group per lesion (volume, mean HU, side), each naming the model
//!   (TID 4019) and referencing its SEG segment; TID 1501 groups for the regional figures (per lung and zone,
//!   severity score) and, when the result has a prior study, the follow-up comparison;
//! - **key images** (`key_images`): Secondary Capture (RGB) of the most involved slices, lesion contours burned in,
//!   with a "NOT FOR DIAGNOSTIC USE — lungsentry <version>" banner.
//!
//! UIDs are derived from a seed (series UID + result version), so rebuilding the same result gives the same
//! instances. When a prior study arrives after a result's objects were made, an amended SR ([`Amendment`]) of
//! that version carries the new comparison and names the SR it replaces. Hands on: Part-10 file objects
//! ([`OutputObject`]) to `analyze --dicom-out` (a folder) and to the
//! DICOM outbox. Never: decides which results get outputs, sends anything, or touches the store.
//! Its `[outputs]` settings ([`OutputsConfig`], [`DicomDestination`], [`ObjectKind`]) are `config`'s, re-exported.

mod common;
mod font;
pub mod keyimage;
pub mod outbox;
mod seg;
mod sr;

use std::path::{Path, PathBuf};

use dicom_object::{FileDicomObject, InMemDicomObject};

use crate::analysis::BitMask;
use crate::instance::InstanceMeta;
use crate::result::SeriesResult;

pub use crate::config::{DicomDestination, ObjectKind, OutputsConfig};
pub use common::{derived_uid, SourceHeader};

/// Segmentation Storage.
pub const SEGMENTATION_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.66.4";
/// Comprehensive 3D SR Storage.
pub const COMPREHENSIVE_3D_SR_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.88.34";
/// Secondary Capture Image Storage.
pub const SECONDARY_CAPTURE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.7";

/// Series numbers of our new series (the source series keeps its own).
pub const SEG_SERIES_NUMBER: i32 = 9001;
/// SR series number.
pub const SR_SERIES_NUMBER: i32 = 9002;
/// Key image series number.
pub const KEY_IMAGE_SERIES_NUMBER: i32 = 9003;

/// Why the objects could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The result was not analysed (skipped series) or has no slices.
    #[error("no outputs for this result: {0}")]
    NotAnalysed(String),
    /// A source instance could not be read or decoded.
    #[error("source instance {path}: {reason}")]
    Source { path: PathBuf, reason: String },
    /// The result JSON lacks a field the objects need.
    #[error("result JSON: {0}")]
    Result(String),
    /// A dataset could not be assembled.
    #[error("building the object: {0}")]
    Build(String),
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// One analysed source slice, in the series' position order: where its file is and its final masks.
#[derive(Debug, Clone)]
pub struct SourceSlice {
    /// Routing and geometry attributes of the source instance (of its frame, for a multi-frame instance).
    pub meta: InstanceMeta,
    /// 1-based frame number of this slice within a multi-frame source instance (Enhanced or Legacy Converted
    /// Enhanced CT): outputs reference it as Referenced Frame Number. None for a single-frame instance.
    pub frame: Option<u32>,
    /// The source instance's Part-10 file (spool or input folder).
    pub path: PathBuf,
    /// Lung mask, lesion included.
    pub lung: BitMask,
    /// Lesion mask after the 3D minimum-volume filter (what the result's lesions are made of).
    pub lesion: BitMask,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct OutputOptions {
    /// Kinds to build.
    pub kinds: Vec<ObjectKind>,
    /// How many key images at most (the slices with the most lesion area; none for a lesion-free series).
    pub key_images: usize,
    /// Seed of the derived UIDs (series UID + result version in the daemon).
    pub uid_seed: String,
    /// Build the SR as an amendment of the one first made for this result (its comparison with a prior study
    /// changed after it was made); `kinds` should then be the SR alone.
    pub amendment: Option<Amendment>,
}

impl Default for OutputOptions {
    fn default() -> Self {
        OutputOptions { kinds: ObjectKind::ALL.to_vec(), key_images: 3, uid_seed: String::new(), amendment: None }
    }
}

/// An SR that replaces an earlier SR of the same result version (same `uid_seed`): a new SOP instance in the same
/// SR series, listing the document it replaces in the Predecessor Documents Sequence. Lesion tracking UIDs stay
/// those of the first SR (the same lesions), and segment references point at the SEG made with it.
#[derive(Debug, Clone)]
pub struct Amendment {
    /// Distinguishes this amendment's SOP Instance UID (e.g. `prior|<prior series UID>`).
    pub tag: String,
    /// Instance Number in the SR series (the first SR is 1).
    pub instance_number: u32,
    /// SOP Instance UID of the SR it replaces, when one was made.
    pub predecessor: Option<String>,
    /// Whether a SEG was made with the first SR (its UID follows from the seed).
    pub with_seg: bool,
    /// Content Date and Time (DA, TM) of the amendment.
    pub content_time: (String, String),
}

/// One built instance.
pub struct OutputObject {
    /// Kind.
    pub kind: ObjectKind,
    /// SOP Class UID.
    pub sop_class_uid: String,
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// The Part-10 object.
    pub file: FileDicomObject<InMemDicomObject>,
}

impl OutputObject {
    /// A file name for it: `seg.dcm`, `sr.dcm`, `key-01.dcm`, ...
    pub fn file_name(&self, index_in_kind: usize) -> String {
        match self.kind {
            ObjectKind::Seg => "seg.dcm".to_string(),
            ObjectKind::Sr => "sr.dcm".to_string(),
            ObjectKind::KeyImages => format!("key-{:02}.dcm", index_in_kind + 1),
        }
    }
}

/// lungsentry's version, as in the banner and Software Versions.
pub fn software_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

/// Builds the requested objects for one analysed result. `slices` are in position order (index i is slice i of
/// the result's `positive_slices` and lesions' slice ranges).
pub fn build(
    result: &SeriesResult,
    slices: &[SourceSlice],
    opts: &OutputOptions,
) -> Result<Vec<OutputObject>, OutputError> {
    let Some(figures) = result.figures.as_ref().filter(|_| result.is_analysed()) else {
        let status = serde_json::to_value(result.status).unwrap_or_default();
        return Err(OutputError::NotAnalysed(format!("status is {status}")));
    };
    if slices.is_empty() {
        return Err(OutputError::NotAnalysed("no analysed slices".to_string()));
    }
    let first = &slices[0];
    let src = crate::spool::read_instance(&first.path)
        .map_err(|e| OutputError::Source { path: first.path.clone(), reason: format!("{e:#}") })?;
    let header = SourceHeader::from_object(&src);
    let model = &result.model;
    let producer = common::Producer {
        manufacturer: "lungsentry".to_string(),
        model_name: "lungsentry".to_string(),
        device_serial: host_name(),
        software_version: software_version().to_string(),
        algorithm_name: model.name.clone(),
        algorithm_version: model.version.clone(),
    };
    let seed = if opts.uid_seed.is_empty() {
        // The completion time as a JSON string (quoted): the seed the untyped result gave.
        format!("{}|{}", header.series_instance_uid, serde_json::Value::from(result.completed_at.as_str()))
    } else {
        opts.uid_seed.clone()
    };
    let content_time = match &opts.amendment {
        Some(a) => a.content_time.clone(),
        None => common::da_tm(&result.completed_at),
    };
    // An amendment references the SEG made with the first SR (same seed, so the same UID).
    let mut seg_ref = opts.amendment.as_ref().filter(|a| a.with_seg).map(|_| derived_uid(&seed, "seg"));
    let ctx = BuildContext { header, producer, seed, content_time, amendment: opts.amendment.clone() };
    let mut out = Vec::new();
    if opts.kinds.contains(&ObjectKind::Seg) {
        let o = seg::build(&ctx, slices)?;
        seg_ref = Some(o.sop_instance_uid.clone());
        out.push(o);
    }
    if opts.kinds.contains(&ObjectKind::Sr) {
        out.push(sr::build(&ctx, result, figures, slices, seg_ref.as_deref())?);
    }
    if opts.kinds.contains(&ObjectKind::KeyImages) {
        out.extend(keyimage::build(&ctx, result, slices, opts.key_images)?);
    }
    Ok(out)
}

/// What every writer shares.
pub(crate) struct BuildContext {
    /// Copied source attributes.
    pub header: SourceHeader,
    /// Our identity and the model's.
    pub producer: common::Producer,
    /// Seed of derived UIDs.
    pub seed: String,
    /// Content Date and Time (DA, TM): the result's completion time (an amendment's own time).
    pub content_time: (String, String),
    /// Set when the SR replaces an earlier one of the same result.
    pub amendment: Option<Amendment>,
}

/// Writes objects into `dir` (created), named by kind; returns the paths.
pub fn write_dir(objects: &[OutputObject], dir: &Path) -> Result<Vec<PathBuf>, OutputError> {
    std::fs::create_dir_all(dir).map_err(|e| OutputError::Write { path: dir.to_path_buf(), source: e })?;
    let mut paths = Vec::new();
    let mut key_index = 0;
    for o in objects {
        let idx = if o.kind == ObjectKind::KeyImages {
            key_index += 1;
            key_index - 1
        } else {
            0
        };
        let path = dir.join(o.file_name(idx));
        o.file
            .write_to_file(&path)
            .map_err(|e| OutputError::Write { path: path.clone(), source: std::io::Error::other(e.to_string()) })?;
        paths.push(path);
    }
    Ok(paths)
}
