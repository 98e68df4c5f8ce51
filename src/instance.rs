//! One received DICOM instance, as the pipeline sees it: the attributes that route and order it.
//!
//! Owns: extracting grouping/ordering/eligibility attributes from a parsed dataset, once, at receive time.
//! Hands to `spool` (which stores them beside the file) and `series` (which groups and orders by them).
//! Refuses: an instance whose Study, Series or SOP Instance UID is not a UID ([`crate::uid`]: digits and dots,
//! no empty component, at most 64 characters) — `..`, `a/b` or a 65-character value is never grouped, stored or
//! named after ([`InstanceError::InvalidUid`], a C000 status at receive). At receive
//! ([`InstanceMeta::from_received`]) a Study, Series or SOP Instance UID that is *absent or blank* in the dataset
//! is refused too ([`InstanceError::Missing`], [`InstanceError::Empty`]): they are Type 1 attributes, and a UID
//! invented for them would only hide a broken sender. Local files (`lungsentry analyze`, `eval`) are read more
//! leniently ([`InstanceMeta::from_file`]): a blank SOP Instance UID comes from the file meta and blank
//! Study/Series UIDs are derived from the other study/series attributes (recorded in `derived_uids`; `series`
//! skips such a series with the reason), as anonymisers leave them.
//! Never: decodes pixel data (that is `decode`).

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use serde::{Deserialize, Serialize};

/// CT Image Storage.
pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
/// Enhanced CT Image Storage (multi-frame; geometry in the functional groups).
pub const ENHANCED_CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2.1";
/// Legacy Converted Enhanced CT Image Storage (a classic CT series converted to one multi-frame instance).
pub const LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2.2";

/// Why an instance cannot be accepted at all (becomes a C000-range failure status).
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// A required attribute is absent (and no command/file-meta value stands in for it).
    #[error("{0} is missing (Type 1 attribute)")]
    Missing(&'static str),
    /// A Study/Series/SOP Instance UID is present but empty or only padding, in a dataset received from a peer.
    #[error("{0} is empty (Type 1 attribute)")]
    Empty(&'static str),
    /// A Study/Series/SOP Instance UID that breaks the UI value representation.
    #[error("{attribute} {value} {reason}: not a valid UID")]
    InvalidUid {
        /// Which attribute.
        attribute: &'static str,
        /// The value as received, quoted and escaped, cut at 80 characters (for the log).
        value: String,
        /// What is wrong with it.
        reason: crate::uid::UidError,
    },
}

/// Refuses a routing UID that is not a UID (see the module docs).
fn check_uid(attribute: &'static str, value: &str) -> Result<(), InstanceError> {
    crate::uid::check(value).map_err(|reason| {
        let shown: String = value.chars().take(80).collect();
        let cut = if shown.len() < value.len() { "…" } else { "" };
        InstanceError::InvalidUid { attribute, value: format!("{shown:?}{cut}"), reason }
    })
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
    /// Images in Acquisition (0020,1002): how many images the sender says the acquisition holds (the completion
    /// tracker's count rule; absent in many series).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_in_acquisition: Option<u32>,
    /// Identifiers a local file lacked (e.g. an anonymiser blanked them) and that were derived instead: SOP
    /// Instance UID from the file meta, Study/Series UIDs from a hash of the other study/series attributes. Always
    /// empty for an instance received from a peer (the receive path refuses blank UIDs); `series` does not analyse
    /// a series grouped by a derived UID (only `analyze`/`eval` on files, or a store written by a version that
    /// accepted them, can hold one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub derived_uids: Vec<String>,
}

/// An attribute's text value without DICOM padding (NUL or space), `None` when absent or not text.
pub(crate) fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    obj.element(tag).ok().and_then(|e| e.to_str().ok()).map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
}

/// A UID under the 2.25 root from a hash of the attributes that identify a study or series.
fn derived_uid(kind: &str, basis: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(format!("lungsentry-derived-{kind}|{basis}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    format!("2.25.{}", u128::from_be_bytes(b))
}

/// The identifying UIDs a received dataset must carry itself (Type 1: present and not blank).
const RECEIVED_TYPE1_UIDS: [(&str, Tag); 3] = [
    ("StudyInstanceUID", tags::STUDY_INSTANCE_UID),
    ("SeriesInstanceUID", tags::SERIES_INSTANCE_UID),
    ("SOPInstanceUID", tags::SOP_INSTANCE_UID),
];

impl InstanceMeta {
    /// The receive path's reading of a dataset a peer sent: Study, Series and SOP Instance UIDs absent or blank
    /// (empty or only padding) in the dataset are refused ([`InstanceError::Missing`], [`InstanceError::Empty`])
    /// instead of derived; then as [`InstanceMeta::from_object`] (a blank SOP Class UID still comes from the
    /// command). The returned `derived_uids` is always empty.
    pub fn from_received(obj: &InMemDicomObject, sop_class_hint: Option<&str>) -> Result<InstanceMeta, InstanceError> {
        for (attribute, tag) in RECEIVED_TYPE1_UIDS {
            if obj.element(tag).is_err() {
                return Err(InstanceError::Missing(attribute));
            }
            if text(obj, tag).is_none_or(|s| s.is_empty()) {
                return Err(InstanceError::Empty(attribute));
            }
        }
        Self::from_object_with(obj, sop_class_hint, None)
    }

    /// Extracts the routing attributes. SOP Class/Instance UIDs missing from the dataset are taken from the
    /// hints (the C-STORE command, or the file meta); without them they are required.
    pub fn from_object(obj: &InMemDicomObject, sop_class_hint: Option<&str>) -> Result<InstanceMeta, InstanceError> {
        Self::from_object_with(obj, sop_class_hint, None)
    }

    /// Reads a Part-10 file's attributes, with the file meta as the fallback for blank SOP UIDs.
    pub fn from_file(obj: &dicom_object::FileDicomObject<InMemDicomObject>) -> Result<InstanceMeta, InstanceError> {
        let m = obj.meta();
        let class = m.media_storage_sop_class_uid().trim_end_matches(['\0', ' ']).to_string();
        let inst = m.media_storage_sop_instance_uid().trim_end_matches(['\0', ' ']).to_string();
        Self::from_object_with(obj, Some(&class), Some(&inst))
    }

    /// [`InstanceMeta::from_object`] with a SOP Instance UID hint as well.
    pub fn from_object_with(
        obj: &InMemDicomObject,
        sop_class_hint: Option<&str>,
        sop_instance_hint: Option<&str>,
    ) -> Result<InstanceMeta, InstanceError> {
        let mut derived_uids = Vec::new();
        let hint = |h: Option<&str>| h.map(str::to_string).filter(|s| !s.is_empty());
        let sop_instance_uid = match text(obj, tags::SOP_INSTANCE_UID).filter(|s| !s.is_empty()) {
            Some(s) => s,
            None => {
                let h = hint(sop_instance_hint).ok_or(InstanceError::Missing("SOPInstanceUID"))?;
                derived_uids.push("SOPInstanceUID".to_string());
                h
            }
        };
        let sop_class_uid = match text(obj, tags::SOP_CLASS_UID).filter(|s| !s.is_empty()) {
            Some(s) => s,
            None => hint(sop_class_hint).ok_or(InstanceError::Missing("SOPClassUID"))?,
        };
        let attrs = |list: &[Tag]| -> String {
            list.iter().map(|t| text(obj, *t).unwrap_or_default()).collect::<Vec<_>>().join("|")
        };
        let study_basis = attrs(&[
            tags::PATIENT_ID,
            tags::PATIENT_NAME,
            tags::STUDY_DATE,
            tags::STUDY_TIME,
            tags::ACCESSION_NUMBER,
            tags::STUDY_ID,
        ]);
        let study_instance_uid = match text(obj, tags::STUDY_INSTANCE_UID).filter(|s| !s.is_empty()) {
            Some(s) => s,
            None => {
                derived_uids.push("StudyInstanceUID".to_string());
                derived_uid("study", &study_basis)
            }
        };
        let series_instance_uid = match text(obj, tags::SERIES_INSTANCE_UID).filter(|s| !s.is_empty()) {
            Some(s) => s,
            None => {
                derived_uids.push("SeriesInstanceUID".to_string());
                let basis = attrs(&[
                    tags::SERIES_NUMBER,
                    tags::SERIES_DATE,
                    tags::SERIES_TIME,
                    tags::MODALITY,
                    tags::FRAME_OF_REFERENCE_UID,
                    tags::SERIES_DESCRIPTION,
                ]);
                derived_uid("series", &format!("{study_basis}|{basis}"))
            }
        };
        check_uid("SOPInstanceUID", &sop_instance_uid)?;
        check_uid("StudyInstanceUID", &study_instance_uid)?;
        check_uid("SeriesInstanceUID", &series_instance_uid)?;
        // Geometry: the attribute itself (classic CT), else the first frame's per-frame or the shared functional
        // group (Enhanced / Legacy Converted Enhanced CT; each frame's own is read when its pixels are decoded).
        let geometry = |seq: Tag, tag: Tag| crate::decode::functional_floats(obj, 0, seq, tag);
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
            image_position: geometry(tags::PLANE_POSITION_SEQUENCE, tags::IMAGE_POSITION_PATIENT).and_then(arr3),
            image_orientation: geometry(tags::PLANE_ORIENTATION_SEQUENCE, tags::IMAGE_ORIENTATION_PATIENT)
                .and_then(arr6),
            slice_thickness: geometry(tags::PIXEL_MEASURES_SEQUENCE, tags::SLICE_THICKNESS)
                .and_then(|v| v.first().copied()),
            pixel_spacing: geometry(tags::PIXEL_MEASURES_SEQUENCE, tags::PIXEL_SPACING).and_then(arr2),
            instance_number: text(obj, tags::INSTANCE_NUMBER).and_then(|s| s.parse::<f64>().ok()).map(|f| f as i64),
            rows: obj.element(tags::ROWS).ok().and_then(|e| e.to_int::<u32>().ok()),
            columns: obj.element(tags::COLUMNS).ok().and_then(|e| e.to_int::<u32>().ok()),
            number_of_frames: text(obj, tags::NUMBER_OF_FRAMES).and_then(|s| s.parse().ok()).unwrap_or(1),
            has_pixel_data: obj.element(tags::PIXEL_DATA).is_ok(),
            images_in_acquisition: text(obj, tags::IMAGES_IN_ACQUISITION).and_then(|s| s.trim().parse().ok()),
            derived_uids,
        })
    }

    /// Slice normal from the orientation (row × column), if present.
    pub fn normal(&self) -> Option<[f64; 3]> {
        let o = self.image_orientation?;
        let n = [o[1] * o[5] - o[2] * o[4], o[2] * o[3] - o[0] * o[5], o[0] * o[4] - o[1] * o[3]];
        let len = (n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).sqrt();
        (len > 1e-6).then(|| [n[0] / len, n[1] / len, n[2] / len])
    }

    /// Whether the SOP class is one we analyse (CT, Enhanced CT or Legacy Converted Enhanced CT images).
    pub fn is_ct_image_class(&self) -> bool {
        self.sop_class_uid == CT_IMAGE_STORAGE || self.is_multi_frame_ct_class()
    }

    /// Whether the SOP class is a multi-frame CT (Enhanced or Legacy Converted Enhanced CT): every frame is a slice.
    pub fn is_multi_frame_ct_class(&self) -> bool {
        self.sop_class_uid == ENHANCED_CT_IMAGE_STORAGE
            || self.sop_class_uid == LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE
    }
}
