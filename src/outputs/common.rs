//! Attribute building blocks shared by the SEG, SR and key-image writers: element constructors, coded concepts,
//! UIDs derived from a seed, the patient/study attributes copied from the source series, and Part-10 wrapping.

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{FileDicomObject, InMemDicomObject};

use super::OutputError;

/// Explicit VR Little Endian: every object we write uses it.
pub use crate::dicom::EXPLICIT_VR_LE;
/// Our implementation class UID (same as the phantom writer's).
pub const IMPLEMENTATION_UID: &str = "2.25.148361305921370813472683839447914736211";

/// A dataset.
pub type Obj = InMemDicomObject;
/// One element of a dataset.
pub type Elem = DataElement<InMemDicomObject>;

/// A coded concept (Code Sequence Macro): value, coding scheme designator, meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    /// Code Value.
    pub value: &'static str,
    /// Coding Scheme Designator (SCT, DCM, LN, UCUM, RFC5646, or our local 99LSENTRY).
    pub scheme: &'static str,
    /// Code Meaning.
    pub meaning: &'static str,
}

/// A code literal.
pub const fn code(value: &'static str, scheme: &'static str, meaning: &'static str) -> Code {
    Code { value, scheme, meaning }
}

/// Element with a single value.
pub fn el(tag: Tag, vr: VR, v: impl Into<PrimitiveValue>) -> Elem {
    DataElement::new(tag, vr, v.into())
}

/// Element with several string values (backslash-separated on the wire).
pub fn strs(tag: Tag, vr: VR, v: &[String]) -> Elem {
    DataElement::new(tag, vr, PrimitiveValue::Strs(v.iter().cloned().collect()))
}

/// A sequence element (undefined length).
pub fn seq(tag: Tag, items: Vec<Obj>) -> Elem {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

/// Dataset from elements.
pub fn obj(elems: Vec<Elem>) -> Obj {
    InMemDicomObject::from_element_iter(elems)
}

/// One Code Sequence item.
pub fn code_item(c: &Code) -> Obj {
    obj(vec![
        el(tags::CODE_VALUE, VR::SH, c.value),
        el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, c.scheme),
        el(tags::CODE_MEANING, VR::LO, c.meaning),
    ])
}

/// A sequence holding one code.
pub fn code_seq(tag: Tag, c: &Code) -> Elem {
    seq(tag, vec![code_item(c)])
}

/// A DS value within 16 characters.
pub fn ds(v: f64) -> String {
    crate::dicom::ds(v)
}

/// A UID under the 2.25 root, a hash of `seed` and `what`: rebuilding the objects of the same result version gives
/// the same UIDs, so a receiver sees a resend as the same instance, never a duplicate.
pub fn derived_uid(seed: &str, what: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(format!("lungsentry-output|{seed}|{what}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    format!("2.25.{}", u128::from_be_bytes(b))
}

/// DICOM DA and TM (UTC) from an RFC 3339 timestamp such as `2026-11-27T06:21:48.186Z`.
pub fn da_tm(rfc3339: &str) -> (String, String) {
    let digits: String = rfc3339.chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.len() >= 14 {
        (digits[..8].to_string(), digits[8..14].to_string())
    } else {
        ("19700101".to_string(), "000000".to_string())
    }
}

/// The attributes of the source series that our objects copy (patient, study, frame of reference, geometry).
#[derive(Debug, Clone, Default)]
pub struct SourceHeader {
    /// Specific Character Set of the source (copied so names keep their encoding); empty = default repertoire.
    pub specific_character_set: Vec<String>,
    /// Patient module, Type 2 attributes.
    pub patient_name: String,
    pub patient_id: String,
    pub patient_birth_date: String,
    pub patient_sex: String,
    /// General Study module.
    pub study_instance_uid: String,
    pub study_date: String,
    pub study_time: String,
    pub referring_physician_name: String,
    pub study_id: String,
    pub accession_number: String,
    pub study_description: String,
    /// Source series (referenced by every object).
    pub series_instance_uid: String,
    /// Frame of Reference UID shared by the SEG (derived from the series UID when the source has none).
    pub frame_of_reference_uid: String,
    /// Position Reference Indicator (Type 2 in the Frame of Reference module).
    pub position_reference_indicator: String,
}

fn text(o: &Obj, tag: Tag) -> String {
    o.element(tag)
        .ok()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
        .unwrap_or_default()
}

impl SourceHeader {
    /// Reads the copied attributes from one source instance.
    pub fn from_object(o: &Obj) -> SourceHeader {
        let charset = o
            .element(tags::SPECIFIC_CHARACTER_SET)
            .ok()
            .and_then(|e| e.to_multi_str().ok().map(|v| v.iter().map(|s| s.trim().to_string()).collect()))
            .unwrap_or_default();
        let series = text(o, tags::SERIES_INSTANCE_UID);
        let mut frame = text(o, tags::FRAME_OF_REFERENCE_UID);
        if frame.is_empty() {
            frame = derived_uid(&series, "frame-of-reference");
        }
        SourceHeader {
            specific_character_set: charset,
            patient_name: text(o, tags::PATIENT_NAME),
            patient_id: text(o, tags::PATIENT_ID),
            patient_birth_date: text(o, tags::PATIENT_BIRTH_DATE),
            patient_sex: text(o, tags::PATIENT_SEX),
            study_instance_uid: text(o, tags::STUDY_INSTANCE_UID),
            study_date: text(o, tags::STUDY_DATE),
            study_time: text(o, tags::STUDY_TIME),
            referring_physician_name: text(o, tags::REFERRING_PHYSICIAN_NAME),
            study_id: text(o, tags::STUDY_ID),
            accession_number: text(o, tags::ACCESSION_NUMBER),
            study_description: text(o, tags::STUDY_DESCRIPTION),
            series_instance_uid: series,
            frame_of_reference_uid: frame,
            position_reference_indicator: text(o, tags::POSITION_REFERENCE_INDICATOR),
        }
    }

    /// SOP Common (character set), Patient and General Study module elements.
    pub fn patient_study(&self) -> Vec<Elem> {
        let mut v = Vec::new();
        if !self.specific_character_set.is_empty() {
            v.push(strs(tags::SPECIFIC_CHARACTER_SET, VR::CS, &self.specific_character_set));
        }
        v.extend([
            el(tags::PATIENT_NAME, VR::PN, self.patient_name.as_str()),
            el(tags::PATIENT_ID, VR::LO, self.patient_id.as_str()),
            el(tags::PATIENT_BIRTH_DATE, VR::DA, self.patient_birth_date.as_str()),
            el(tags::PATIENT_SEX, VR::CS, self.patient_sex.as_str()),
            el(tags::STUDY_INSTANCE_UID, VR::UI, self.study_instance_uid.as_str()),
            el(tags::STUDY_DATE, VR::DA, self.study_date.as_str()),
            el(tags::STUDY_TIME, VR::TM, self.study_time.as_str()),
            el(tags::REFERRING_PHYSICIAN_NAME, VR::PN, self.referring_physician_name.as_str()),
            el(tags::STUDY_ID, VR::SH, self.study_id.as_str()),
            el(tags::ACCESSION_NUMBER, VR::SH, self.accession_number.as_str()),
        ]);
        if !self.study_description.is_empty() {
            v.push(el(tags::STUDY_DESCRIPTION, VR::LO, self.study_description.as_str()));
        }
        v
    }
}

/// The identity of what made an object: goes into General / Enhanced General Equipment and algorithm
/// identification.
#[derive(Debug, Clone)]
pub struct Producer {
    /// Manufacturer (0008,0070).
    pub manufacturer: String,
    /// Manufacturer's Model Name: the product.
    pub model_name: String,
    /// Device Serial Number: the appliance (host name).
    pub device_serial: String,
    /// Software Versions: lungsentry's version.
    pub software_version: String,
    /// Algorithm (model) name.
    pub algorithm_name: String,
    /// Algorithm (model) version.
    pub algorithm_version: String,
}

impl Producer {
    /// General Equipment + Enhanced General Equipment module elements.
    pub fn equipment(&self) -> Vec<Elem> {
        vec![
            el(tags::MANUFACTURER, VR::LO, self.manufacturer.as_str()),
            el(tags::MANUFACTURER_MODEL_NAME, VR::LO, self.model_name.as_str()),
            el(tags::DEVICE_SERIAL_NUMBER, VR::LO, self.device_serial.as_str()),
            el(tags::SOFTWARE_VERSIONS, VR::LO, self.software_version.as_str()),
        ]
    }
}

/// Wraps a dataset into a Part-10 file object (Explicit VR Little Endian).
pub fn part10(o: Obj) -> Result<FileDicomObject<InMemDicomObject>, OutputError> {
    o.with_meta(
        FileMetaTableBuilder::new()
            .transfer_syntax(EXPLICIT_VR_LE)
            .implementation_class_uid(IMPLEMENTATION_UID)
            .implementation_version_name("LUNGSENTRY_01"),
    )
    .map_err(|e| OutputError::Build(format!("file meta: {e}")))
}
