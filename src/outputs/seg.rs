//! The binary DICOM Segmentation: segment 1 "Lung" (lesion included), segment 2 "COVID-19 lesion". One frame per
//! (segment, source slice) where the segment has pixels — a segment with none anywhere keeps one empty frame on the
//! middle slice so every segment is described by at least one frame. Frames reference their source instance and
//! carry its position; the SEG shares the source Frame of Reference.

use dicom_core::value::PrimitiveValue;
use dicom_core::VR;
use dicom_dictionary_std::tags;

use super::common::{code, code_seq, derived_uid, ds, el, obj, part10, seq, strs, Code, Obj};
use super::{
    BuildContext, ObjectKind, OutputError, OutputObject, SourceSlice, SEGMENTATION_STORAGE, SEG_SERIES_NUMBER,
};

/// Segment category of the lungs.
pub const ANATOMICAL_STRUCTURE: Code = code("91723000", "SCT", "Anatomical Structure");
/// Segment type of the lungs (also the lesions' anatomic region).
pub const LUNG: Code = code("39607008", "SCT", "Lung");
/// Segment category of the lesions.
pub const MORPHOLOGICALLY_ABNORMAL: Code = code("49755003", "SCT", "Morphologically Abnormal Structure");
/// Segment type of the lesions.
pub const LESION: Code = code("52988006", "SCT", "Lesion");
/// Algorithm family (CID 7162).
pub const ARTIFICIAL_INTELLIGENCE: Code = code("123110", "DCM", "Artificial Intelligence");
const SOURCE_IMAGE_PURPOSE: Code = code("121322", "DCM", "Source image for image processing operation");
const SEGMENTATION_DERIVATION: Code = code("113076", "DCM", "Segmentation");

/// Segment number of the lungs.
pub const LUNG_SEGMENT: u16 = 1;
/// Segment number of the lesions.
pub const LESION_SEGMENT: u16 = 2;

/// Algorithm identification item (Segmentation Algorithm Identification Sequence).
fn algorithm_item(ctx: &BuildContext) -> Obj {
    obj(vec![
        code_seq(tags::ALGORITHM_FAMILY_CODE_SEQUENCE, &ARTIFICIAL_INTELLIGENCE),
        el(tags::ALGORITHM_VERSION, VR::LO, ctx.producer.algorithm_version.as_str()),
        el(tags::ALGORITHM_NAME, VR::LO, ctx.producer.algorithm_name.as_str()),
    ])
}

fn segment_item(ctx: &BuildContext, number: u16) -> Obj {
    let (label, description, category, kind, lab): (&str, &str, &Code, &Code, [u16; 3]) = if number == LUNG_SEGMENT {
        ("Lung", "Both lungs, lesions included", &ANATOMICAL_STRUCTURE, &LUNG, [21168, 53249, 5176])
    } else {
        (
            "COVID-19 lesion",
            "COVID-19 pneumonia lesions (ground-glass opacity and consolidation)",
            &MORPHOLOGICALLY_ABNORMAL,
            &LESION,
            [34891, 53479, 50166],
        )
    };
    let mut elems = vec![
        code_seq(tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE, category),
        el(tags::SEGMENT_NUMBER, VR::US, number),
        el(tags::SEGMENT_LABEL, VR::LO, label),
        el(tags::SEGMENT_DESCRIPTION, VR::ST, description),
        seq(tags::SEGMENTATION_ALGORITHM_IDENTIFICATION_SEQUENCE, vec![algorithm_item(ctx)]),
        el(tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC"),
        el(tags::SEGMENT_ALGORITHM_NAME, VR::LO, ctx.producer.algorithm_name.as_str()),
        el(tags::RECOMMENDED_DISPLAY_CIE_LAB_VALUE, VR::US, PrimitiveValue::U16(lab.to_vec().into())),
        code_seq(tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE, kind),
    ];
    if number == LESION_SEGMENT {
        elems.push(code_seq(tags::ANATOMIC_REGION_SEQUENCE, &LUNG));
    }
    obj(elems)
}

/// Appends the bits of `mask` (row-major, first pixel in the least significant bit) to a frame bitstream.
fn push_bits(bits: &mut Vec<u8>, nbits: &mut usize, mask: Option<&crate::analysis::BitMask>, npx: usize) {
    let need = (*nbits + npx).div_ceil(8);
    bits.resize(need, 0);
    if let Some(m) = mask {
        for i in 0..npx {
            if m.get_index(i) {
                let b = *nbits + i;
                bits[b / 8] |= 1 << (b % 8);
            }
        }
    }
    *nbits += npx;
}

fn image_position(s: &SourceSlice) -> Vec<String> {
    let p = s.meta.image_position.unwrap_or([0.0; 3]);
    p.iter().map(|v| ds(*v)).collect()
}

/// Builds the SEG.
pub fn build(ctx: &BuildContext, slices: &[SourceSlice]) -> Result<OutputObject, OutputError> {
    let h = &ctx.header;
    let first = &slices[0];
    let (rows, cols) = (first.lung.rows, first.lung.cols);
    if slices.iter().any(|s| s.lung.rows != rows || s.lung.cols != cols || s.lesion.rows != rows) {
        return Err(OutputError::Build("source slices differ in size; one SEG needs one frame size".to_string()));
    }
    let npx = rows * cols;
    let sop_instance_uid = derived_uid(&ctx.seed, "seg");
    let series_uid = derived_uid(&ctx.seed, "seg-series");
    let dim_org_uid = derived_uid(&ctx.seed, "seg-dimension-organization");
    let (date, time) = ctx.content_time.clone();

    // Frames: segment-major, then position order.
    let mut frames: Vec<(u16, usize)> = Vec::new();
    for seg in [LUNG_SEGMENT, LESION_SEGMENT] {
        let mask_of = |s: &SourceSlice| if seg == LUNG_SEGMENT { s.lung.count() } else { s.lesion.count() };
        let with_pixels: Vec<usize> = (0..slices.len()).filter(|&i| mask_of(&slices[i]) > 0).collect();
        if with_pixels.is_empty() {
            frames.push((seg, slices.len() / 2));
        } else {
            frames.extend(with_pixels.into_iter().map(|i| (seg, i)));
        }
    }
    let mut bits = Vec::new();
    let mut nbits = 0usize;
    let mut per_frame = Vec::with_capacity(frames.len());
    for &(seg, i) in &frames {
        let s = &slices[i];
        let mask = if seg == LUNG_SEGMENT { &s.lung } else { &s.lesion };
        push_bits(&mut bits, &mut nbits, Some(mask), npx);
        let mut source = vec![
            el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, s.meta.sop_class_uid.as_str()),
            el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, s.meta.sop_instance_uid.as_str()),
        ];
        if let Some(f) = s.frame {
            source.push(el(tags::REFERENCED_FRAME_NUMBER, VR::IS, f.to_string()));
        }
        source.extend([
            el(tags::SPATIAL_LOCATIONS_PRESERVED, VR::CS, "YES"),
            code_seq(tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE, &SOURCE_IMAGE_PURPOSE),
        ]);
        let source = obj(source);
        per_frame.push(obj(vec![
            seq(
                tags::DERIVATION_IMAGE_SEQUENCE,
                vec![obj(vec![
                    seq(tags::SOURCE_IMAGE_SEQUENCE, vec![source]),
                    code_seq(tags::DERIVATION_CODE_SEQUENCE, &SEGMENTATION_DERIVATION),
                ])],
            ),
            seq(
                tags::FRAME_CONTENT_SEQUENCE,
                vec![obj(vec![el(
                    tags::DIMENSION_INDEX_VALUES,
                    VR::UL,
                    PrimitiveValue::U32(vec![seg as u32, i as u32 + 1].into()),
                )])],
            ),
            seq(
                tags::PLANE_POSITION_SEQUENCE,
                vec![obj(vec![strs(tags::IMAGE_POSITION_PATIENT, VR::DS, &image_position(s))])],
            ),
            seq(
                tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                vec![obj(vec![el(tags::REFERENCED_SEGMENT_NUMBER, VR::US, seg)])],
            ),
        ]));
    }
    if bits.len() % 2 == 1 {
        bits.push(0);
    }

    let orientation = first.meta.image_orientation.unwrap_or([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    let spacing = first.meta.pixel_spacing.unwrap_or([1.0, 1.0]);
    let thickness = first.meta.slice_thickness.unwrap_or(1.0);
    let mut measures = vec![
        el(tags::SLICE_THICKNESS, VR::DS, ds(thickness)),
        strs(tags::PIXEL_SPACING, VR::DS, &[ds(spacing[0]), ds(spacing[1])]),
    ];
    if let Some(sp) = slice_spacing(slices) {
        measures.push(el(tags::SPACING_BETWEEN_SLICES, VR::DS, ds(sp)));
    }
    let shared = obj(vec![
        seq(
            tags::PLANE_ORIENTATION_SEQUENCE,
            vec![obj(vec![strs(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                &orientation.iter().map(|v| ds(*v)).collect::<Vec<_>>(),
            )])],
        ),
        seq(tags::PIXEL_MEASURES_SEQUENCE, vec![obj(measures)]),
    ]);

    // One item per source instance (a multi-frame instance is referenced once; its frames per frame above).
    let mut seen = std::collections::HashSet::new();
    let referenced: Vec<Obj> = slices
        .iter()
        .filter(|s| seen.insert(s.meta.sop_instance_uid.as_str()))
        .map(|s| {
            obj(vec![
                el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, s.meta.sop_class_uid.as_str()),
                el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, s.meta.sop_instance_uid.as_str()),
            ])
        })
        .collect();
    let dimension = |pointer, group, label: &str| {
        obj(vec![
            el(tags::DIMENSION_ORGANIZATION_UID, VR::UI, dim_org_uid.as_str()),
            el(tags::DIMENSION_INDEX_POINTER, VR::AT, PrimitiveValue::Tags(vec![pointer].into())),
            el(tags::FUNCTIONAL_GROUP_POINTER, VR::AT, PrimitiveValue::Tags(vec![group].into())),
            el(tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, label),
        ])
    };

    let mut elems = h.patient_study();
    elems.extend(ctx.producer.equipment());
    elems.extend([
        strs(tags::IMAGE_TYPE, VR::CS, &["DERIVED".to_string(), "PRIMARY".to_string()]),
        el(tags::INSTANCE_CREATION_DATE, VR::DA, date.as_str()),
        el(tags::INSTANCE_CREATION_TIME, VR::TM, time.as_str()),
        el(tags::SOP_CLASS_UID, VR::UI, SEGMENTATION_STORAGE),
        el(tags::SOP_INSTANCE_UID, VR::UI, sop_instance_uid.as_str()),
        el(tags::SERIES_DATE, VR::DA, date.as_str()),
        el(tags::CONTENT_DATE, VR::DA, date.as_str()),
        el(tags::SERIES_TIME, VR::TM, time.as_str()),
        el(tags::CONTENT_TIME, VR::TM, time.as_str()),
        el(tags::MODALITY, VR::CS, "SEG"),
        el(tags::SERIES_DESCRIPTION, VR::LO, "lungsentry lung and COVID-19 lesion segmentation"),
        seq(
            tags::REFERENCED_SERIES_SEQUENCE,
            vec![obj(vec![
                seq(tags::REFERENCED_INSTANCE_SEQUENCE, referenced.clone()),
                el(tags::SERIES_INSTANCE_UID, VR::UI, h.series_instance_uid.as_str()),
            ])],
        ),
        seq(tags::SOURCE_IMAGE_SEQUENCE, referenced),
        el(tags::SERIES_INSTANCE_UID, VR::UI, series_uid.as_str()),
        el(tags::SERIES_NUMBER, VR::IS, SEG_SERIES_NUMBER.to_string()),
        el(tags::INSTANCE_NUMBER, VR::IS, "1"),
        el(tags::FRAME_OF_REFERENCE_UID, VR::UI, h.frame_of_reference_uid.as_str()),
        el(tags::POSITION_REFERENCE_INDICATOR, VR::LO, h.position_reference_indicator.as_str()),
        seq(
            tags::DIMENSION_ORGANIZATION_SEQUENCE,
            vec![obj(vec![el(tags::DIMENSION_ORGANIZATION_UID, VR::UI, dim_org_uid.as_str())])],
        ),
        seq(
            tags::DIMENSION_INDEX_SEQUENCE,
            vec![
                dimension(tags::REFERENCED_SEGMENT_NUMBER, tags::SEGMENT_IDENTIFICATION_SEQUENCE, "Segment Number"),
                dimension(tags::IMAGE_POSITION_PATIENT, tags::PLANE_POSITION_SEQUENCE, "Image Position Patient"),
            ],
        ),
        el(tags::SAMPLES_PER_PIXEL, VR::US, 1u16),
        el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        el(tags::NUMBER_OF_FRAMES, VR::IS, frames.len().to_string()),
        el(tags::ROWS, VR::US, rows as u16),
        el(tags::COLUMNS, VR::US, cols as u16),
        el(tags::BITS_ALLOCATED, VR::US, 1u16),
        el(tags::BITS_STORED, VR::US, 1u16),
        el(tags::HIGH_BIT, VR::US, 0u16),
        el(tags::PIXEL_REPRESENTATION, VR::US, 0u16),
        el(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"),
        el(tags::SEGMENTATION_TYPE, VR::CS, "BINARY"),
        seq(tags::SEGMENT_SEQUENCE, vec![segment_item(ctx, LUNG_SEGMENT), segment_item(ctx, LESION_SEGMENT)]),
        // Lesion pixels are lung pixels too.
        el(tags::SEGMENTS_OVERLAP, VR::CS, "YES"),
        el(tags::CONTENT_LABEL, VR::CS, "LUNGSENTRY"),
        el(tags::CONTENT_DESCRIPTION, VR::LO, "Lung and COVID-19 lesion segmentation"),
        el(tags::CONTENT_CREATOR_NAME, VR::PN, ""),
        el(tags::PRESENTATION_LUT_SHAPE, VR::CS, "IDENTITY"),
        seq(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]),
        seq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame),
        el(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(bits.into())),
    ]);
    Ok(OutputObject {
        kind: ObjectKind::Seg,
        sop_class_uid: SEGMENTATION_STORAGE.to_string(),
        sop_instance_uid,
        file: part10(obj(elems))?,
    })
}

/// Median distance between consecutive slice positions along the normal, if there are two or more slices.
fn slice_spacing(slices: &[SourceSlice]) -> Option<f64> {
    let n = slices[0].meta.normal()?;
    let mut z: Vec<f64> =
        slices.iter().filter_map(|s| s.meta.image_position.map(|p| p[0] * n[0] + p[1] * n[1] + p[2] * n[2])).collect();
    z.sort_by(|a, b| a.total_cmp(b));
    let mut gaps: Vec<f64> = z.windows(2).map(|w| w[1] - w[0]).filter(|g| *g > 1e-6).collect();
    if gaps.is_empty() {
        return None;
    }
    gaps.sort_by(|a, b| a.total_cmp(b));
    Some(gaps[gaps.len() / 2])
}
