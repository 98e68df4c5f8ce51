//! DICOM Part-10 writer for phantom slices: CT Image Storage, Explicit VR Little Endian.
//!
//! Owns: the attribute set of a phantom CT instance (patient, study, series, frame of reference, equipment,
//! image plane, image pixel, CT image, SOP common). Hands on: files on disk. Never: computes pixels.

use std::path::Path;

use anyhow::{Context, Result};
use dicom_core::value::{PrimitiveValue, C};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::InMemDicomObject;

use super::render::Scanner;
use crate::instance::CT_IMAGE_STORAGE;

/// Decimal strings (DS) within 16 characters; the DICOM outputs format theirs the same way.
pub use crate::dicom::ds;
/// Explicit VR Little Endian: every phantom slice uses it.
pub use crate::dicom::EXPLICIT_VR_LE;
/// Our implementation class UID (a fixed 2.25 UID).
const IMPLEMENTATION_UID: &str = "2.25.148361305921370813472683839447914736211";

/// Attributes shared by every slice of a series.
#[derive(Debug, Clone)]
pub struct SeriesHeader {
    pub patient_name: String,
    pub patient_id: String,
    pub birth_date: String,
    pub sex: String,
    pub study_uid: String,
    pub series_uid: String,
    pub frame_uid: String,
    /// Root of per-instance UIDs; instance i gets `<root>.<i+1>`.
    pub instance_uid_root: String,
    pub study_date: String,
    pub study_time: String,
    pub study_id: String,
    pub accession: String,
    pub series_number: i32,
    pub scanner: Scanner,
    pub size: usize,
    /// Patient x, y of pixel (0, 0).
    pub x0: f64,
    pub y0: f64,
}

fn el(tag: Tag, vr: VR, v: impl Into<PrimitiveValue>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, v.into())
}

fn strs(tag: Tag, vr: VR, v: &[&str]) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::Strs(v.iter().map(|s| s.to_string()).collect()))
}

/// Instance UID of slice i.
pub fn instance_uid(h: &SeriesHeader, i: usize) -> String {
    format!("{}.{}", h.instance_uid_root, i + 1)
}

/// Writes slice i (0-based) at patient z with the given stored pixels.
pub fn write_slice(path: &Path, h: &SeriesHeader, i: usize, z: f64, stored: Vec<u16>) -> Result<()> {
    let sc = &h.scanner;
    let n = h.size as u16;
    let ps = ds(sc.pixel_spacing);
    let pos = [ds(h.x0), ds(h.y0), ds(z)];
    let uid = instance_uid(h, i);
    let mut obj = InMemDicomObject::from_element_iter([
        el(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100"),
        strs(tags::IMAGE_TYPE, VR::CS, &["ORIGINAL", "PRIMARY", "AXIAL"]),
        el(tags::SOP_CLASS_UID, VR::UI, CT_IMAGE_STORAGE),
        el(tags::SOP_INSTANCE_UID, VR::UI, uid.as_str()),
        el(tags::STUDY_DATE, VR::DA, h.study_date.as_str()),
        el(tags::SERIES_DATE, VR::DA, h.study_date.as_str()),
        el(tags::ACQUISITION_DATE, VR::DA, h.study_date.as_str()),
        el(tags::CONTENT_DATE, VR::DA, h.study_date.as_str()),
        el(tags::STUDY_TIME, VR::TM, h.study_time.as_str()),
        el(tags::SERIES_TIME, VR::TM, h.study_time.as_str()),
        el(tags::ACQUISITION_TIME, VR::TM, h.study_time.as_str()),
        el(tags::CONTENT_TIME, VR::TM, h.study_time.as_str()),
        el(tags::ACCESSION_NUMBER, VR::SH, h.accession.as_str()),
        el(tags::MODALITY, VR::CS, "CT"),
        el(tags::MANUFACTURER, VR::LO, "LUNGSENTRY PHANTOM"),
        el(tags::REFERRING_PHYSICIAN_NAME, VR::PN, ""),
        el(tags::STUDY_DESCRIPTION, VR::LO, "CT CHEST WITHOUT CONTRAST"),
        el(tags::SERIES_DESCRIPTION, VR::LO, format!("AXIAL {} {}", ds(sc.slice_mm), sc.kernel)),
        el(tags::MANUFACTURER_MODEL_NAME, VR::LO, sc.model.as_str()),
        el(tags::PATIENT_NAME, VR::PN, h.patient_name.as_str()),
        el(tags::PATIENT_ID, VR::LO, h.patient_id.as_str()),
        el(tags::PATIENT_BIRTH_DATE, VR::DA, h.birth_date.as_str()),
        el(tags::PATIENT_SEX, VR::CS, h.sex.as_str()),
        el(tags::BODY_PART_EXAMINED, VR::CS, "CHEST"),
        el(tags::SLICE_THICKNESS, VR::DS, ds(sc.slice_mm)),
        el(tags::KVP, VR::DS, ds(sc.kvp as f64)),
        el(tags::SPACING_BETWEEN_SLICES, VR::DS, ds(sc.slice_mm)),
        el(tags::DATA_COLLECTION_DIAMETER, VR::DS, ds(500.0)),
        el(tags::RECONSTRUCTION_DIAMETER, VR::DS, ds(sc.fov)),
        el(tags::X_RAY_TUBE_CURRENT, VR::IS, sc.ma.to_string()),
        el(tags::CONVOLUTION_KERNEL, VR::SH, sc.kernel.as_str()),
        el(tags::PATIENT_POSITION, VR::CS, "HFS"),
        el(tags::STUDY_INSTANCE_UID, VR::UI, h.study_uid.as_str()),
        el(tags::SERIES_INSTANCE_UID, VR::UI, h.series_uid.as_str()),
        el(tags::STUDY_ID, VR::SH, h.study_id.as_str()),
        el(tags::SERIES_NUMBER, VR::IS, h.series_number.to_string()),
        el(tags::ACQUISITION_NUMBER, VR::IS, "1"),
        el(tags::INSTANCE_NUMBER, VR::IS, (i + 1).to_string()),
        strs(tags::IMAGE_POSITION_PATIENT, VR::DS, &[&pos[0], &pos[1], &pos[2]]),
        strs(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, &["1", "0", "0", "0", "1", "0"]),
        el(tags::FRAME_OF_REFERENCE_UID, VR::UI, h.frame_uid.as_str()),
        el(tags::POSITION_REFERENCE_INDICATOR, VR::LO, ""),
        el(tags::SLICE_LOCATION, VR::DS, ds(z)),
        el(tags::SAMPLES_PER_PIXEL, VR::US, 1u16),
        el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        el(tags::ROWS, VR::US, n),
        el(tags::COLUMNS, VR::US, n),
        strs(tags::PIXEL_SPACING, VR::DS, &[&ps, &ps]),
        el(tags::BITS_ALLOCATED, VR::US, 16u16),
        el(tags::BITS_STORED, VR::US, sc.bits_stored),
        el(tags::HIGH_BIT, VR::US, sc.bits_stored - 1),
        el(tags::PIXEL_REPRESENTATION, VR::US, if sc.signed { 1u16 } else { 0u16 }),
        strs(tags::WINDOW_CENTER, VR::DS, &["-600", "40"]),
        strs(tags::WINDOW_WIDTH, VR::DS, &["1500", "400"]),
        el(tags::RESCALE_INTERCEPT, VR::DS, ds(sc.intercept)),
        el(tags::RESCALE_SLOPE, VR::DS, "1"),
        el(tags::RESCALE_TYPE, VR::LO, "HU"),
        DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(C::from_vec(stored))),
    ]);
    if let Some(p) = sc.padding {
        if sc.signed {
            obj.put(el(tags::PIXEL_PADDING_VALUE, VR::SS, p as i16));
        } else {
            obj.put(el(tags::PIXEL_PADDING_VALUE, VR::US, p as u16));
        }
    }
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(EXPLICIT_VR_LE)
                .implementation_class_uid(IMPLEMENTATION_UID)
                .implementation_version_name("LUNGSENTRY_01"),
        )
        .context("building file meta")?;
    file.write_to_file(path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
