//! Key images: the most involved slices (largest lesion area after the 3D filter) as RGB Secondary Capture, lung
//! window, lesion contours burned in red, a "NOT FOR DIAGNOSTIC USE — lungsentry <version>" banner above the
//! image and a caption (flag, involvement, slice, lesion area) below it. Text goes into strips added above and
//! below, so it never hides anatomy. [`render`] is also what a PNG view of a slice draws.

use dicom_core::value::PrimitiveValue;
use dicom_core::VR;
use dicom_dictionary_std::tags;

use super::common::{derived_uid, el, obj, part10, seq, strs, Obj};
use super::font;
use super::{
    BuildContext, ObjectKind, OutputError, OutputObject, SourceSlice, KEY_IMAGE_SERIES_NUMBER,
    SECONDARY_CAPTURE_STORAGE,
};
use crate::analysis::BitMask;
use crate::decode::HuSlice;
use crate::result::SeriesResult;

/// Lung window centre, HU.
pub const WINDOW_CENTER: f32 = -600.0;
/// Lung window width, HU.
pub const WINDOW_WIDTH: f32 = 1500.0;
/// Contour colour of lesions.
pub const LESION_RGB: [u8; 3] = [255, 32, 32];
const BANNER_RGB: [u8; 3] = [255, 220, 0];
const CAPTION_RGB: [u8; 3] = [235, 235, 235];

/// An 8-bit RGB image, row-major, pixel-interleaved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width (columns).
    pub width: usize,
    /// Height (rows).
    pub height: usize,
    /// width × height × 3 bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    fn new(width: usize, height: usize) -> RgbImage {
        RgbImage { width, height, data: vec![0; width * height * 3] }
    }

    fn set(&mut self, x: usize, y: usize, rgb: [u8; 3]) {
        if x < self.width && y < self.height {
            let i = (y * self.width + x) * 3;
            self.data[i..i + 3].copy_from_slice(&rgb);
        }
    }

    /// Pixel (x, y).
    pub fn get(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    /// Draws `text` with its top-left corner at (x, y), each font pixel `scale`×`scale`.
    fn text(&mut self, x: usize, y: usize, text: &str, scale: usize, rgb: [u8; 3]) {
        for (k, ch) in text.chars().enumerate() {
            let g = font::glyph(ch);
            let gx = x + k * (font::WIDTH + 1) * scale;
            for (r, row) in g.iter().enumerate() {
                for (c, on) in row.iter().enumerate() {
                    if *on {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                self.set(gx + c * scale + dx, y + r * scale + dy, rgb);
                            }
                        }
                    }
                }
            }
        }
    }

    /// PNG encoding (for HTTP views).
    pub fn to_png(&self) -> Result<Vec<u8>, png::EncodingError> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header()?;
            w.write_image_data(&self.data)?;
        }
        Ok(out)
    }
}

/// The banner text of every key image.
pub fn banner() -> String {
    format!("NOT FOR DIAGNOSTIC USE — lungsentry {}", super::software_version())
}

/// Largest font scale (≥ 1) at which `text` fits in `width`, at most width / 256.
fn fit_scale(text: &str, width: usize) -> usize {
    let max = (width / 256).max(1);
    (1..=max).rev().find(|s| font::text_width(text, *s) + 2 * s <= width).unwrap_or(1)
}

/// Whether pixel (r, c) lies on the lesion boundary: inside with a 4-neighbour outside, or outside with a
/// 4-neighbour inside (a two-pixel line that stays visible when downsampled).
fn on_contour(m: &BitMask, r: usize, c: usize) -> bool {
    let v = m.get(r, c);
    let n = [
        (r > 0).then(|| m.get(r - 1, c)),
        (r + 1 < m.rows).then(|| m.get(r + 1, c)),
        (c > 0).then(|| m.get(r, c - 1)),
        (c + 1 < m.cols).then(|| m.get(r, c + 1)),
    ];
    n.iter().flatten().any(|x| *x != v)
}

/// Renders one slice: lung window, lesion contours, banner strip above, caption strip below.
pub fn render(hu: &HuSlice, lesion: &BitMask, banner: &str, caption: &str) -> RgbImage {
    let (rows, cols) = (hu.rows, hu.cols);
    let (bs, cs) = (fit_scale(banner, cols), fit_scale(caption, cols));
    let strip = (font::HEIGHT + 4) * bs;
    let mut img = RgbImage::new(cols, rows + strip + (font::HEIGHT + 4) * cs);
    let lo = WINDOW_CENTER - WINDOW_WIDTH / 2.0;
    let same_size = lesion.rows == rows && lesion.cols == cols;
    for r in 0..rows {
        for c in 0..cols {
            let g = (((hu.hu[r * cols + c] - lo) / WINDOW_WIDTH).clamp(0.0, 1.0) * 255.0).round() as u8;
            let rgb = if same_size && on_contour(lesion, r, c) { LESION_RGB } else { [g, g, g] };
            img.set(c, r + strip, rgb);
        }
    }
    img.text(bs, 2 * bs, banner, bs, BANNER_RGB);
    img.text(cs, rows + strip + 2 * cs, caption, cs, CAPTION_RGB);
    img
}

/// Indices (position order) of the at most `n` slices with the largest lesion area, in position order.
pub fn most_involved(slices: &[SourceSlice], n: usize) -> Vec<usize> {
    let mut by_area: Vec<(usize, usize)> =
        slices.iter().enumerate().map(|(i, s)| (s.lesion.count(), i)).filter(|(a, _)| *a > 0).collect();
    by_area.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut pick: Vec<usize> = by_area.into_iter().take(n).map(|(_, i)| i).collect();
    pick.sort_unstable();
    pick
}

/// The caption under a key image.
pub fn caption(result: &SeriesResult, slice: usize, n_slices: usize, lesion_area_cm2: f64) -> String {
    format!(
        "{} involvement {:.2}% slice {}/{} lesion area {:.1} cm2",
        if result.positive { "POSITIVE" } else { "negative" },
        result.involvement_percent(),
        slice + 1,
        n_slices,
        lesion_area_cm2
    )
}

/// Patient Orientation (row direction, column direction) letters from direction cosines.
fn orientation_letters(o: [f64; 6]) -> [String; 2] {
    let letters = |v: &[f64]| -> String {
        let mut axes: Vec<(f64, char)> = vec![
            (v[0], if v[0] > 0.0 { 'L' } else { 'R' }),
            (v[1], if v[1] > 0.0 { 'P' } else { 'A' }),
            (v[2], if v[2] > 0.0 { 'H' } else { 'F' }),
        ];
        axes.sort_by(|a, b| b.0.abs().total_cmp(&a.0.abs()));
        axes.iter().filter(|(x, _)| x.abs() > 0.25).map(|(_, l)| *l).collect()
    };
    [letters(&o[0..3]), letters(&o[3..6])]
}

/// Builds the key images (none when no slice has a lesion).
pub(crate) fn build(
    ctx: &BuildContext,
    result: &SeriesResult,
    slices: &[SourceSlice],
    n: usize,
) -> Result<Vec<OutputObject>, OutputError> {
    let h = &ctx.header;
    let series_uid = derived_uid(&ctx.seed, "key-image-series");
    let (date, time) = ctx.content_time.clone();
    let banner = banner();
    let mut out = Vec::new();
    for (k, &i) in most_involved(slices, n).iter().enumerate() {
        let s = &slices[i];
        let src = crate::spool::read_instance(&s.path)
            .map_err(|e| OutputError::Source { path: s.path.clone(), reason: format!("{e:#}") })?;
        let hu = crate::decode::decode_hu_frames(&src)
            .map_err(|e| OutputError::Source { path: s.path.clone(), reason: e.to_string() })?
            .into_iter()
            .nth(s.frame.map(|f| f as usize - 1).unwrap_or(0))
            .ok_or_else(|| OutputError::Source { path: s.path.clone(), reason: "no such frame".to_string() })?;
        let ps = s.meta.pixel_spacing.unwrap_or([1.0, 1.0]);
        let area_cm2 = s.lesion.count() as f64 * ps[0] * ps[1] / 100.0;
        let text = caption(result, i, slices.len(), area_cm2);
        let img = render(&hu, &s.lesion, &banner, &text);
        let sop_instance_uid = derived_uid(&ctx.seed, &format!("key-image|{i}"));
        let orientation = orientation_letters(s.meta.image_orientation.unwrap_or([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]));
        let mut source_elems = vec![
            el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, s.meta.sop_class_uid.as_str()),
            el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, s.meta.sop_instance_uid.as_str()),
        ];
        if let Some(f) = s.frame {
            source_elems.push(el(tags::REFERENCED_FRAME_NUMBER, VR::IS, f.to_string()));
        }
        let source: Obj = obj(source_elems);
        let mut elems = h.patient_study();
        elems.extend(ctx.producer.equipment());
        elems.extend([
            strs(tags::IMAGE_TYPE, VR::CS, &["DERIVED".to_string(), "SECONDARY".to_string()]),
            el(tags::INSTANCE_CREATION_DATE, VR::DA, date.as_str()),
            el(tags::INSTANCE_CREATION_TIME, VR::TM, time.as_str()),
            el(tags::SOP_CLASS_UID, VR::UI, SECONDARY_CAPTURE_STORAGE),
            el(tags::SOP_INSTANCE_UID, VR::UI, sop_instance_uid.as_str()),
            el(tags::SERIES_DATE, VR::DA, date.as_str()),
            el(tags::CONTENT_DATE, VR::DA, date.as_str()),
            el(tags::SERIES_TIME, VR::TM, time.as_str()),
            el(tags::CONTENT_TIME, VR::TM, time.as_str()),
            el(tags::MODALITY, VR::CS, "OT"),
            el(tags::CONVERSION_TYPE, VR::CS, "WSD"),
            // Type 2C: the lungs are a paired structure, both are shown.
            el(tags::LATERALITY, VR::CS, ""),
            el(tags::SERIES_DESCRIPTION, VR::LO, "lungsentry key images NOT FOR DIAGNOSTIC USE"),
            el(tags::DERIVATION_DESCRIPTION, VR::ST, "Lung window; lesion contours from lungsentry burned in"),
            seq(tags::SOURCE_IMAGE_SEQUENCE, vec![source]),
            el(tags::SECONDARY_CAPTURE_DEVICE_MANUFACTURER, VR::LO, "lungsentry"),
            el(tags::SECONDARY_CAPTURE_DEVICE_MANUFACTURER_MODEL_NAME, VR::LO, "lungsentry"),
            el(tags::SECONDARY_CAPTURE_DEVICE_SOFTWARE_VERSIONS, VR::LO, super::software_version()),
            el(tags::DATE_OF_SECONDARY_CAPTURE, VR::DA, date.as_str()),
            el(tags::TIME_OF_SECONDARY_CAPTURE, VR::TM, time.as_str()),
            el(tags::SERIES_INSTANCE_UID, VR::UI, series_uid.as_str()),
            el(tags::SERIES_NUMBER, VR::IS, KEY_IMAGE_SERIES_NUMBER.to_string()),
            el(tags::INSTANCE_NUMBER, VR::IS, (k + 1).to_string()),
            strs(tags::PATIENT_ORIENTATION, VR::CS, &orientation),
            // ASCII only: the source character set (often ISO_IR 100) has no em dash.
            el(tags::IMAGE_COMMENTS, VR::LT, format!("{}. {text}", banner.replace('—', "-"))),
            el(tags::SAMPLES_PER_PIXEL, VR::US, 3u16),
            el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "RGB"),
            el(tags::PLANAR_CONFIGURATION, VR::US, 0u16),
            el(tags::ROWS, VR::US, img.height as u16),
            el(tags::COLUMNS, VR::US, img.width as u16),
            el(tags::BITS_ALLOCATED, VR::US, 8u16),
            el(tags::BITS_STORED, VR::US, 8u16),
            el(tags::HIGH_BIT, VR::US, 7u16),
            el(tags::PIXEL_REPRESENTATION, VR::US, 0u16),
            el(tags::BURNED_IN_ANNOTATION, VR::CS, "YES"),
            el(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"),
            el(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(pad_even(img.data).into())),
        ]);
        out.push(OutputObject {
            kind: ObjectKind::KeyImages,
            sop_class_uid: SECONDARY_CAPTURE_STORAGE.to_string(),
            sop_instance_uid,
            file: part10(obj(elems))?,
        });
    }
    Ok(out)
}

fn pad_even(mut v: Vec<u8>) -> Vec<u8> {
    if v.len() % 2 == 1 {
        v.push(0);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contour_is_drawn_around_a_lesion_and_banner_text_is_inked() {
        let n = 256;
        let hu = HuSlice::from_hu(n, n, vec![-850.0; n * n]);
        let mut m = BitMask::new(n, n);
        for r in 100..120 {
            for c in 100..130 {
                m.set(r, c, true);
            }
        }
        let img = render(&hu, &m, &banner(), "POSITIVE");
        let strip = (font::HEIGHT + 4) * fit_scale(&banner(), n);
        assert_eq!(img.height, n + strip + (font::HEIGHT + 4) * fit_scale("POSITIVE", n));
        // Edge of the lesion is red, its inside and far outside are grey.
        assert_eq!(img.get(100, 100 + strip), LESION_RGB);
        assert_eq!(img.get(99, 110 + strip), LESION_RGB);
        assert_ne!(img.get(115, 110 + strip), LESION_RGB);
        assert_ne!(img.get(10, 10 + strip), LESION_RGB);
        // Some banner pixels carry ink.
        let inked = (0..strip).flat_map(|y| (0..n).map(move |x| (x, y))).filter(|&(x, y)| img.get(x, y) == BANNER_RGB);
        assert!(inked.count() > 50);
    }

    #[test]
    fn most_involved_picks_largest_areas_in_position_order() {
        let meta: crate::instance::InstanceMeta = serde_json::from_value(serde_json::json!({
            "sop_instance_uid": "1", "sop_class_uid": "1", "study_instance_uid": "1", "series_instance_uid": "1",
            "patient_id": "", "patient_name": "", "study_date": "", "modality": "CT", "image_type": [],
            "image_position": null, "image_orientation": null, "slice_thickness": null, "pixel_spacing": null,
            "instance_number": null, "rows": 4, "columns": 4, "number_of_frames": 1, "has_pixel_data": true
        }))
        .unwrap();
        let slice = |k: usize| {
            let mut m = BitMask::new(4, 4);
            for i in 0..k {
                m.set(i / 4, i % 4, true);
            }
            SourceSlice { meta: meta.clone(), frame: None, path: "x".into(), lung: BitMask::new(4, 4), lesion: m }
        };
        let slices: Vec<SourceSlice> = [0, 3, 9, 1, 9, 0].iter().map(|&k| slice(k)).collect();
        assert_eq!(most_involved(&slices, 2), vec![2, 4]);
        assert_eq!(most_involved(&slices, 10), vec![1, 2, 3, 4]);
        assert!(most_involved(&[slice(0)], 3).is_empty());
    }

    #[test]
    fn axial_orientation_letters() {
        assert_eq!(orientation_letters([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]), ["L".to_string(), "P".to_string()]);
    }
}
