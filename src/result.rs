//! result — the typed result of one series, as every stage after the analysis passes it on.
//!
//! Owns: [`SeriesResult`] and its nested types, the one shape of "what became of a series": built once by
//! `pipeline::SeriesWork::finish_with_slices`, completed by the follow-up link, the exam's alert claim and the
//! alert decision (`pipeline`), and read by the DICOM outputs, the webhook, the log line, the metrics and the
//! dashboard. Its JSON (the stored result, the webhook body, `analyze --json`, the dashboard's series payload) is
//! [`SeriesResult::to_json`]: serde_json's `Value` with its keys sorted, byte for byte what the untyped result was
//! (`tests/golden.rs` proves it). Stored results are read back with [`SeriesResult::from_json`].
//! Hands on: the result to `store` as JSON (`store` keeps JSON; the conversion is at its boundary).
//! Never: computes a figure (that is `analysis`) or decides an alert (that is `pipeline`); depends on nothing
//! above `analysis`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::analysis::followup::FollowUp;
use crate::analysis::lung_guard::LungGuardReport;
use crate::analysis::regions::Regional;
use crate::analysis::{Lesion, SeriesAnalysis};
use crate::model::ModelIdentity;

/// What became of one series: its identity, the slices it had, the figures when it was analysed, the comparison
/// with the patient's prior study, and the alert decision. Optional parts are absent from the JSON when unset; a
/// stored result missing a field reads back with its default (results are kept across upgrades).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SeriesResult {
    /// Study Instance UID of the series.
    pub study_instance_uid: String,
    /// Series Instance UID.
    pub series_instance_uid: String,
    /// Salted hash of patient ID and name (never the raw identifiers).
    pub patient_key: String,
    /// Study Date (DA, possibly empty): orders the patient's studies for follow-up.
    pub study_date: String,
    /// Analysed, or skipped for the reasons in `skip_reasons`.
    pub status: SeriesStatus,
    /// The eligibility rules the series breaks (the daemon skips it for them; `analyze` only lists them).
    pub skip_reasons: Vec<String>,
    /// Slices seen (instances, or frames of a multi-frame instance).
    pub n_slices: usize,
    /// Slices the figures come from (0 when skipped).
    pub analysed_slices: usize,
    /// Instances whose pixels could not be used, with why.
    pub slice_errors: Vec<SliceError>,
    /// Voxel depth: the analysis' when analysed, else the median step between positions (None: one position).
    pub slice_spacing_mm: Option<f64>,
    /// Pairs of position-order indices with missing slices between them.
    pub gaps: Vec<(usize, usize)>,
    /// Position-order indices whose position repeats the previous slice's.
    pub duplicates: Vec<usize>,
    /// The segmented slices' SOP Instance UIDs in position order (the DICOM outputs' evidence).
    pub slice_sop_instance_uids: Vec<String>,
    /// Frame numbers of those slices, only when some slice is a frame of a multi-frame instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slice_frame_numbers: Option<Vec<u32>>,
    /// The model that segmented the slices.
    pub model: ModelIdentity,
    /// The engine that ran it (`ort`, `tract`, `tensorrt`).
    pub engine: String,
    /// Stage timings, milliseconds.
    pub timings_ms: Timings,
    /// When the series' first instance arrived (RFC 3339).
    pub received_at: String,
    /// When the analysis finished (RFC 3339); seeds the DICOM outputs' UIDs and content time.
    pub completed_at: String,
    /// Flagged: involvement above the threshold (false when skipped).
    pub positive: bool,
    /// The figures; absent when the series was not analysed.
    #[serde(flatten)]
    pub figures: Option<Figures>,
    /// The comparison with the patient's prior study, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub follow_up: Option<FollowUp>,
    /// Set (daemon) when another series of the study already holds the exam's alert.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub study_alert: Option<StudyAlert>,
    /// Whether the daemon alerted for this result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<bool>,
    /// Why it alerted (`positive`, `progression`); empty when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert_reasons: Option<Vec<String>>,
    /// The store's version of this result, where the caller shows it (the daemon's log and webhook, `analyze
    /// --store`); the stored JSON itself has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// The files `analyze --dicom-out` wrote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dicom_outputs: Option<Vec<PathBuf>>,
}

/// Whether the series was analysed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeriesStatus {
    /// Figures computed.
    Analysed,
    /// Not analysed (an eligibility rule, or no usable slice).
    #[default]
    Skipped,
}

/// One instance whose pixels could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceError {
    /// Its SOP Instance UID.
    pub sop_instance_uid: String,
    /// Why (the error chain).
    pub error: String,
}

/// Stage timings of a series, milliseconds (one decimal).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Decoding and normalising the pixels.
    pub decode: f64,
    /// The engine.
    pub infer: f64,
    /// Masks, placement and the 3D analysis.
    pub analysis: f64,
    /// All three.
    pub total: f64,
}

/// The figures of an analysed series ([`SeriesAnalysis`] less `positive` and `slice_spacing_mm`, which the result
/// carries for every series).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Lesions, ordered by id.
    pub lesions: Vec<Lesion>,
    /// Lung volume (lesion included), mL.
    pub lung_volume_ml: f64,
    /// Volume of the surviving lesions, mL.
    pub lesion_volume_ml: f64,
    /// lesion / lung × 100.
    pub involvement_percent: f64,
    /// Position-order indices of the slices holding lesion.
    pub positive_slices: Vec<usize>,
    /// For each position-order index, the index of that slice among the segmented ones.
    pub slice_order: Vec<usize>,
    /// Per-lung and per-zone involvement and the severity score.
    pub regional: Regional,
    /// Lung-labelled components dropped as implausible, mL.
    #[serde(default)]
    pub dropped_lung_ml: f64,
    /// What the lung guard did.
    #[serde(default)]
    pub lung_guard: LungGuardReport,
}

impl Figures {
    /// The JSON figures of an analysis (its masks stay behind).
    pub fn of(a: &SeriesAnalysis) -> Figures {
        Figures {
            lesions: a.lesions.clone(),
            lung_volume_ml: a.lung_volume_ml,
            lesion_volume_ml: a.lesion_volume_ml,
            involvement_percent: a.involvement_percent,
            positive_slices: a.positive_slices.clone(),
            slice_order: a.slice_order.clone(),
            regional: a.regional.clone(),
            dropped_lung_ml: a.dropped_lung_ml,
            lung_guard: a.lung_guard.clone(),
        }
    }
}

/// The series of the same study that holds the exam's alert, and the reasons this one withheld.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StudyAlert {
    /// The alerting series.
    pub series_instance_uid: String,
    /// This result's alert reasons, withheld (empty when it had none).
    pub withheld_reasons: Vec<String>,
}

impl SeriesResult {
    /// Whether the figures were computed.
    pub fn is_analysed(&self) -> bool {
        self.status == SeriesStatus::Analysed
    }

    /// Involvement, % (0 when not analysed).
    pub fn involvement_percent(&self) -> f64 {
        self.figures.as_ref().map_or(0.0, |f| f.involvement_percent)
    }

    /// Lesions (none when not analysed).
    pub fn lesions(&self) -> &[Lesion] {
        self.figures.as_ref().map_or(&[], |f| &f.lesions)
    }

    /// Whether the comparison with the prior study shows progression.
    pub fn progression(&self) -> bool {
        self.follow_up.as_ref().is_some_and(|f| f.progression)
    }

    /// The result JSON: keys sorted (serde_json's `Value` map), so the bytes are those the untyped result had.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("a SeriesResult is always JSON")
    }

    /// A stored result JSON read back.
    pub fn from_json(v: Value) -> serde_json::Result<SeriesResult> {
        serde_json::from_value(v)
    }
}
