//! One received DICOM instance, as the pipeline sees it: the attributes that route and order it.
//!
//! Owns: extracting grouping/ordering/eligibility attributes from a parsed dataset, once, at receive time.
//! Hands to `spool` (which stores them beside the file) and `series` (which groups and orders by them).
//! Never: decodes pixel data (that is `preprocess`).

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use serde::{Deserialize, Serialize};

/// CT Image Storage.
pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
/// Enhanced CT Image Storage.
pub const ENHANCED_CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2.1";

/// Why an instance cannot be accepted at all (becomes a C000-range failure status).
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("missing required attribute {0}")]
    Missing(&'static str),
}

/// The attributes of one instance that the pipeline routes, groups and orders by.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceMeta {
    /// SOP Instance UID: identity of the instance; a repeat replaces the earlier copy.
    pub sop_instance_uid: String,
    /// SOP Class UID: CT, Enhanced CT, or another class stored but not analysed.
    pub sop_class_uid: String,
    /// Study Instance UID.
    pub study_instance_uid: String,
    /// Series Instance UID: the grouping key.
    pub series_instance_uid: String,
    /// Raw Patient ID; stays in the local store, never in logs or webhooks (use `patient_key`).
    pub patient_id: String,
    /// Raw Patient Name; same rule as `patient_id`.
    pub patient_name: String,
    /// Study Date (DA, YYYYMMDD) for follow-up ordering.
    pub study_date: String,
    /// Modality (CT expected for analysis).
    pub modality: String,
    /// Image Type values (ORIGINAL/DERIVED, PRIMARY/SECONDARY, LOCALIZER, ...), upper case.
    pub image_type: Vec<String>,
    /// Image Position (Patient), mm.
    pub image_position: Option<[f64; 3]>,
    /// Image Orientation (Patient): row then column direction cosines.
    pub image_orientation: Option<[f64; 6]>,
    /// Slice Thickness, mm.
    pub slice_thickness: Option<f64>,
    /// Pixel Spacing (row spacing, column spacing), mm.
    pub pixel_spacing: Option<[f64; 2]>,
    /// Instance Number, a fallback ordering when positions are missing.
    pub instance_number: Option<i64>,
    /// Rows.
    pub rows: Option<u32>,
    /// Columns.
    pub columns: Option<u32>,
    /// Number of Frames (Enhanced CT); 1 when absent.
    pub number_of_frames: u32,
    /// Whether Pixel Data is present at all.
    pub has_pixel_data: bool,
}

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    obj.element(tag).ok().and_then(|e| e.to_str().ok()).map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
}

fn floats(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    obj.element(tag).ok().and_then(|e| e.to_multi_float64().ok())
}

impl InstanceMeta {
    /// Extracts the routing attributes; only the UIDs are required.
    pub fn from_object(obj: &InMemDicomObject, sop_class_hint: Option<&str>) -> Result<InstanceMeta, InstanceError> {
        let req = |tag: Tag, name: &'static str| text(obj, tag).filter(|s| !s.is_empty()).ok_or(InstanceError::Missing(name));
        let sop_instance_uid = req(tags::SOP_INSTANCE_UID, "SOPInstanceUID")?;
        let sop_class_uid = match text(obj, tags::SOP_CLASS_UID).filter(|s| !s.is_empty()) {
            Some(s) => s,
            None => sop_class_hint.map(str::to_string).ok_or(InstanceError::Missing("SOPClassUID"))?,
        };
        let study_instance_uid = req(tags::STUDY_INSTANCE_UID, "StudyInstanceUID")?;
        let series_instance_uid = req(tags::SERIES_INSTANCE_UID, "SeriesInstanceUID")?;
        let arr3 = |v: Vec<f64>| (v.len() >= 3).then(|| [v[0], v[1], v[2]]);
        let arr6 = |v: Vec<f64>| (v.len() >= 6).then(|| [v[0], v[1], v[2], v[3], v[4], v[5]]);
        let arr2 = |v: Vec<f64>| (v.len() >= 2).then(|| [v[0], v[1]]);
        Ok(InstanceMeta {
            sop_instance_uid,
            sop_class_uid,
            study_instance_uid,
            series_instance_uid,
            patient_id: text(obj, tags::PATIENT_ID).unwrap_or_default(),
            patient_name: text(obj, tags::PATIENT_NAME).unwrap_or_default(),
            study_date: text(obj, tags::STUDY_DATE).unwrap_or_default(),
            modality: text(obj, tags::MODALITY).unwrap_or_default().to_ascii_uppercase(),
            image_type: text(obj, tags::IMAGE_TYPE)
                .map(|s| s.split('\\').map(|p| p.trim().to_ascii_uppercase()).collect())
                .unwrap_or_default(),
            image_position: floats(obj, tags::IMAGE_POSITION_PATIENT).and_then(arr3),
            image_orientation: floats(obj, tags::IMAGE_ORIENTATION_PATIENT).and_then(arr6),
            slice_thickness: floats(obj, tags::SLICE_THICKNESS).and_then(|v| v.first().copied()),
            pixel_spacing: floats(obj, tags::PIXEL_SPACING).and_then(arr2),
            instance_number: text(obj, tags::INSTANCE_NUMBER).and_then(|s| s.parse::<f64>().ok()).map(|f| f as i64),
            rows: obj.element(tags::ROWS).ok().and_then(|e| e.to_int::<u32>().ok()),
            columns: obj.element(tags::COLUMNS).ok().and_then(|e| e.to_int::<u32>().ok()),
            number_of_frames: text(obj, tags::NUMBER_OF_FRAMES).and_then(|s| s.parse().ok()).unwrap_or(1),
            has_pixel_data: obj.element(tags::PIXEL_DATA).is_ok(),
        })
    }

    /// Slice normal from the orientation (row × column), if present.
    pub fn normal(&self) -> Option<[f64; 3]> {
        let o = self.image_orientation?;
        let n = [o[1] * o[5] - o[2] * o[4], o[2] * o[3] - o[0] * o[5], o[0] * o[4] - o[1] * o[3]];
        let len = (n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).sqrt();
        (len > 1e-6).then(|| [n[0] / len, n[1] / len, n[2] / len])
    }

    /// Whether the SOP class is one we analyse (CT or Enhanced CT images).
    pub fn is_ct_image_class(&self) -> bool {
        self.sop_class_uid == CT_IMAGE_STORAGE || self.sop_class_uid == ENHANCED_CT_IMAGE_STORAGE
    }
}
