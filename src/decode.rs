//! decode — turns a DICOM CT object into Hounsfield-unit slices.
//!
//! Owns: pixel decoding (native, deflated, RLE, JPEG baseline and lossless, JPEG-LS, JPEG 2000 — through
//! dicom-pixeldata, with its LUTs switched off) and what is refused before any codec runs (Rows/Columns out of
//! bounds, a codestream header that disagrees with them; a codec panic on a lying fragment is one decode error);
//! stored-value interpretation (bits stored, sign, padding, MONOCHROME1); frames; the modality rescale to
//! Hounsfield units, classic and through the Enhanced CT functional groups (which `instance` also reads, for the
//! slice geometry, through [`functional_floats`]).
//! Hands on: [`HuSlice`] (native resolution: kept by the caller for analysis, turned into model input by
//! `preprocess`) and, for the GPU path, [`StoredFrame`] (stored values plus what turns them into HU).
//! Never: windows, normalises or resamples for the model (that is `preprocess`); knows nothing of the model.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::{FileDicomObject, InMemDicomObject};
use dicom_pixeldata::PixelDecoder;
use serde::{Deserialize, Serialize};

/// Largest Rows or Columns accepted before decoding (a guard against absurd allocations).
pub const MAX_DIMENSION: u32 = 4096;
/// HU given to padding pixels (PixelPaddingValue): air.
pub const PADDING_HU: f32 = -1024.0;

/// Why a DICOM object cannot become HU slices.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("missing attribute {0}")]
    Missing(&'static str),
    #[error("attribute {name} has an unusable value: {detail}")]
    Invalid { name: &'static str, detail: String },
    #[error("image of {rows}×{cols} pixels is outside the accepted bounds (1..={max} each)")]
    Dimensions { rows: u32, cols: u32, max: u32 },
    #[error("unsupported pixel format: {0}")]
    Unsupported(String),
    #[error("decoding pixel data: {0}")]
    Decode(String),
    #[error("pixel data too short: frame {frame} needs bytes {needed} but only {available} were decoded")]
    Truncated { frame: u32, needed: usize, available: usize },
}

/// One axial slice in Hounsfield units at native resolution, with the geometry analysis needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HuSlice {
    /// Rows (image height).
    pub rows: usize,
    /// Columns (image width).
    pub cols: usize,
    /// rows×cols HU values, row-major; padding pixels are already [`PADDING_HU`].
    pub hu: Vec<f32>,
    /// Pixel Spacing (row spacing = distance between rows, column spacing), mm; (1, 1) when absent.
    pub pixel_spacing: [f64; 2],
    /// Whether `pixel_spacing` came from the object (false: the 1 mm default was used).
    pub pixel_spacing_known: bool,
    /// Image Position (Patient) of the first pixel, mm (per frame for Enhanced CT).
    pub image_position: Option<[f64; 3]>,
    /// Image Orientation (Patient): row then column direction cosines.
    pub image_orientation: Option<[f64; 6]>,
    /// Slice Thickness, mm.
    pub slice_thickness: Option<f64>,
    /// Frame index within its object (0 for single-frame CT).
    pub frame: u32,
}

impl HuSlice {
    /// A slice with no geometry beyond its size (synthetic data, 2D evaluation).
    pub fn from_hu(rows: usize, cols: usize, hu: Vec<f32>) -> HuSlice {
        HuSlice {
            rows,
            cols,
            hu,
            pixel_spacing: [1.0, 1.0],
            pixel_spacing_known: false,
            image_position: None,
            image_orientation: None,
            slice_thickness: None,
            frame: 0,
        }
    }
}

fn elem_floats(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    obj.element(tag).ok().and_then(|e| e.to_multi_float64().ok()).filter(|v| !v.is_empty())
}

fn elem_int(obj: &InMemDicomObject, tag: Tag) -> Option<i64> {
    obj.element(tag).ok().and_then(|e| e.to_int::<i64>().ok())
}

fn elem_str(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    obj.element(tag).ok().and_then(|e| e.to_str().ok()).map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
}

/// First item of sequence `seq` inside a functional-group item.
fn group_item(group: &InMemDicomObject, seq: Tag) -> Option<&InMemDicomObject> {
    group.element(seq).ok()?.items()?.first()
}

/// Looks `tag` up inside `seq` of the per-frame functional group of `frame`, then the shared group, then at the top
/// level — the precedence of the Enhanced CT functional groups.
pub fn functional_floats(obj: &InMemDicomObject, frame: u32, seq: Tag, tag: Tag) -> Option<Vec<f64>> {
    let per_frame = obj
        .element(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .ok()
        .and_then(|e| e.items())
        .and_then(|items| items.get(frame as usize))
        .and_then(|g| group_item(g, seq))
        .and_then(|i| elem_floats(i, tag));
    per_frame
        .or_else(|| {
            obj.element(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE)
                .ok()
                .and_then(|e| e.items())
                .and_then(|items| items.first())
                .and_then(|g| group_item(g, seq))
                .and_then(|i| elem_floats(i, tag))
        })
        .or_else(|| elem_floats(obj, tag))
}

/// How stored values are laid out and interpreted.
#[derive(Debug, Clone, Copy)]
pub struct StoredFormat {
    /// Bits Allocated (8, 16 or 32).
    pub bits_allocated: u16,
    /// Bits Stored.
    pub bits_stored: u16,
    /// High Bit.
    pub high_bit: u16,
    /// Pixel Representation 1.
    pub signed: bool,
}

/// Everything that turns one frame's stored values into HU.
#[derive(Debug, Clone, Copy)]
pub struct StoredRescale {
    /// Sample layout and interpretation.
    pub format: StoredFormat,
    /// Stored-value padding range (inclusive), from PixelPaddingValue (and PixelPaddingRangeLimit).
    pub pad_range: Option<(i64, i64)>,
    /// MONOCHROME1: stored values are inverted (min + max − v) before the rescale.
    pub monochrome1: bool,
    /// Rescale Slope.
    pub slope: f64,
    /// Rescale Intercept.
    pub intercept: f64,
}

/// One decoded frame before the modality rescale: native-endian samples plus the slice geometry (whose `hu` is
/// empty until [`StoredFrame::into_hu`]).
#[derive(Debug, Clone)]
pub struct StoredFrame {
    /// rows × cols samples of `bits_allocated / 8` bytes each, native endian.
    pub data: Vec<u8>,
    /// How to read them.
    pub rescale: StoredRescale,
    /// Size and geometry; `hu` is empty.
    pub geometry: HuSlice,
}

impl StoredFrame {
    /// The 16-bit samples (None unless BitsAllocated is 16): what the GPU windowing kernel reads.
    pub fn samples_u16(&self) -> Option<Vec<u16>> {
        (self.rescale.format.bits_allocated == 16)
            .then(|| self.data.chunks_exact(2).map(|b| u16::from_ne_bytes([b[0], b[1]])).collect())
    }

    /// HU = stored × slope + intercept (f64, rounded to f32); padding → [`PADDING_HU`].
    pub fn into_hu(self) -> HuSlice {
        let r = self.rescale;
        let fmt = r.format;
        let (smin, smax) = fmt.range();
        let n = self.geometry.rows * self.geometry.cols;
        let mut hu = Vec::with_capacity(n);
        for i in 0..n {
            let mut v = fmt.sample(&self.data, i);
            if let Some((lo, hi)) = r.pad_range {
                if v >= lo && v <= hi {
                    hu.push(PADDING_HU);
                    continue;
                }
            }
            if r.monochrome1 {
                v = smin + smax - v;
            }
            hu.push((v as f64 * r.slope + r.intercept) as f32);
        }
        HuSlice { hu, ..self.geometry }
    }
}

impl StoredFormat {
    /// Reads sample `i` of a native-endian frame buffer as a stored value (masked to BitsStored, sign-extended).
    #[inline]
    fn sample(&self, data: &[u8], i: usize) -> i64 {
        let raw: u64 = match self.bits_allocated {
            8 => data[i] as u64,
            16 => u16::from_ne_bytes([data[2 * i], data[2 * i + 1]]) as u64,
            _ => u32::from_ne_bytes([data[4 * i], data[4 * i + 1], data[4 * i + 2], data[4 * i + 3]]) as u64,
        };
        self.interpret(raw)
    }

    /// A raw sample masked to BitsStored (from HighBit) and sign-extended.
    #[inline]
    pub fn interpret(&self, raw: u64) -> i64 {
        let shift = (self.high_bit + 1).saturating_sub(self.bits_stored) as u32;
        let mask = if self.bits_stored >= 64 { u64::MAX } else { (1u64 << self.bits_stored) - 1 };
        let v = (raw >> shift) & mask;
        if self.signed && self.bits_stored < 64 && (v >> (self.bits_stored - 1)) & 1 == 1 {
            v as i64 - (1i64 << self.bits_stored)
        } else {
            v as i64
        }
    }

    /// Smallest and largest stored value.
    pub fn range(&self) -> (i64, i64) {
        if self.signed {
            (-(1i64 << (self.bits_stored - 1)), (1i64 << (self.bits_stored - 1)) - 1)
        } else {
            (0, (1i64 << self.bits_stored) - 1)
        }
    }
}

/// (rows, columns) from the header of a JPEG (SOFn) or JPEG 2000 (SIZ) codestream at the start of a fragment;
/// None when the fragment does not start one (RLE, continuation fragments) or the header is unreadable.
pub fn codestream_size(f: &[u8]) -> Option<(u32, u32)> {
    let be16 = |p: usize| f.get(p..p + 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as u32);
    let be32 = |p: usize| f.get(p..p + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    if f.starts_with(&[0xFF, 0xD8]) {
        // JPEG: walk marker segments to the first SOFn (C0–CF except C4 DHT, C8 JPG, CC DAC).
        let mut p = 2;
        while p + 4 <= f.len() {
            if f[p] != 0xFF {
                return None;
            }
            let marker = f[p + 1];
            if marker == 0xFF {
                p += 1; // fill byte
                continue;
            }
            let len = be16(p + 2)? as usize;
            if (0xC0..=0xCF).contains(&marker) && ![0xC4, 0xC8, 0xCC].contains(&marker) {
                return Some((be16(p + 5)?, be16(p + 7)?));
            }
            if marker == 0xDA {
                return None;
            }
            p += 2 + len;
        }
        return None;
    }
    // JPEG 2000: a raw codestream (SOC FF4F, then SIZ FF51), or a JP2 file with the codestream in a box.
    let soc = f.windows(4).take(256).position(|w| w == [0xFF, 0x4F, 0xFF, 0x51])?;
    let siz = soc + 2;
    let (xsiz, ysiz, xo, yo) = (be32(siz + 6)?, be32(siz + 10)?, be32(siz + 14)?, be32(siz + 18)?);
    Some((ysiz.checked_sub(yo)?, xsiz.checked_sub(xo)?))
}

/// Decodes every frame of a CT (or Enhanced CT) object into HU slices.
///
/// Pixel data is decoded without any modality or VOI LUT; the stored values are masked to BitsStored and
/// sign-extended per PixelRepresentation; pixels equal to PixelPaddingValue (or inside the
/// PixelPaddingValue..PixelPaddingRangeLimit range) become [`PADDING_HU`]; MONOCHROME1 stored values are inverted;
/// then HU = stored × RescaleSlope + RescaleIntercept, taken per frame from the functional groups when present.
pub fn decode_hu_frames(obj: &FileDicomObject<InMemDicomObject>) -> Result<Vec<HuSlice>, DecodeError> {
    Ok(decode_stored_frames(obj)?.into_iter().map(StoredFrame::into_hu).collect())
}

/// Every frame of a CT (or Enhanced CT) object as stored values plus what turns them into HU (see
/// [`decode_hu_frames`], which is this followed by [`StoredFrame::into_hu`]; the GPU path uploads the stored values).
pub fn decode_stored_frames(obj: &FileDicomObject<InMemDicomObject>) -> Result<Vec<StoredFrame>, DecodeError> {
    let rows = elem_int(obj, tags::ROWS).ok_or(DecodeError::Missing("Rows"))?;
    let cols = elem_int(obj, tags::COLUMNS).ok_or(DecodeError::Missing("Columns"))?;
    if rows < 1 || cols < 1 || rows > MAX_DIMENSION as i64 || cols > MAX_DIMENSION as i64 {
        return Err(DecodeError::Dimensions {
            rows: rows.clamp(0, u32::MAX as i64) as u32,
            cols: cols.clamp(0, u32::MAX as i64) as u32,
            max: MAX_DIMENSION,
        });
    }
    let (rows, cols) = (rows as usize, cols as usize);
    let samples = elem_int(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    if samples != 1 {
        return Err(DecodeError::Unsupported(format!("SamplesPerPixel {samples} (CT must be 1)")));
    }
    let bits_allocated = elem_int(obj, tags::BITS_ALLOCATED).ok_or(DecodeError::Missing("BitsAllocated"))?;
    if !matches!(bits_allocated, 8 | 16 | 32) {
        return Err(DecodeError::Unsupported(format!("BitsAllocated {bits_allocated} (expected 8, 16 or 32)")));
    }
    let bits_stored = elem_int(obj, tags::BITS_STORED).unwrap_or(bits_allocated);
    if bits_stored < 1 || bits_stored > bits_allocated {
        return Err(DecodeError::Invalid {
            name: "BitsStored",
            detail: format!("{bits_stored} with BitsAllocated {bits_allocated}"),
        });
    }
    let high_bit = elem_int(obj, tags::HIGH_BIT).unwrap_or(bits_stored - 1);
    if high_bit < bits_stored - 1 || high_bit >= bits_allocated {
        return Err(DecodeError::Invalid {
            name: "HighBit",
            detail: format!("{high_bit} with BitsStored {bits_stored}, BitsAllocated {bits_allocated}"),
        });
    }
    let signed = match elem_int(obj, tags::PIXEL_REPRESENTATION).unwrap_or(0) {
        0 => false,
        1 => true,
        other => {
            return Err(DecodeError::Invalid { name: "PixelRepresentation", detail: format!("{other}") });
        }
    };
    let fmt = StoredFormat {
        bits_allocated: bits_allocated as u16,
        bits_stored: bits_stored as u16,
        high_bit: high_bit as u16,
        signed,
    };
    let photometric = elem_str(obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_else(|| "MONOCHROME2".into());
    let monochrome1 = match photometric.as_str() {
        "MONOCHROME1" => true,
        "MONOCHROME2" => false,
        other => return Err(DecodeError::Unsupported(format!("PhotometricInterpretation {other}"))),
    };
    let frames = elem_str(obj, tags::NUMBER_OF_FRAMES).and_then(|s| s.parse::<i64>().ok()).unwrap_or(1).max(1);
    if frames > 100_000 {
        return Err(DecodeError::Invalid { name: "NumberOfFrames", detail: format!("{frames}") });
    }
    let frames = frames as u32;

    // Padding, in stored-value space. The VR (US or SS) may not tell the sign, so re-interpret the raw bits.
    let padding = |tag: Tag| {
        elem_int(obj, tag).map(|v| {
            let raw = (v as u64) & if fmt.bits_allocated >= 64 { u64::MAX } else { (1u64 << fmt.bits_allocated) - 1 };
            let wide = StoredFormat { bits_stored: fmt.bits_allocated, high_bit: fmt.bits_allocated - 1, ..fmt };
            wide.interpret(raw)
        })
    };
    let pad_value = padding(tags::PIXEL_PADDING_VALUE);
    let pad_limit = padding(tags::PIXEL_PADDING_RANGE_LIMIT);
    let pad_range = pad_value.map(|p| match pad_limit {
        Some(l) => (p.min(l), p.max(l)),
        None => (p, p),
    });

    // A codestream whose own header claims another size than Rows×Columns would make the codec allocate (and
    // grind through) what the header says — 65535² for a lying JPEG SOF — so it is refused before decoding.
    if let Some(fragments) = obj.element(tags::PIXEL_DATA).ok().and_then(|e| e.value().fragments()) {
        for f in fragments {
            if let Some((h, w)) = codestream_size(f) {
                if (h as usize, w as usize) != (rows, cols) {
                    return Err(DecodeError::Invalid {
                        name: "PixelData",
                        detail: format!("codestream header says {h}×{w}, the dataset says {rows}×{cols}"),
                    });
                }
            }
        }
    }

    // dicom-pixeldata insists on attributes real scanners sometimes omit (HighBit, PixelRepresentation, ...):
    // decode a copy with the values used above filled in when any is missing.
    let patched;
    let obj = if [
        tags::HIGH_BIT,
        tags::BITS_STORED,
        tags::PIXEL_REPRESENTATION,
        tags::SAMPLES_PER_PIXEL,
        tags::PHOTOMETRIC_INTERPRETATION,
    ]
    .iter()
    .any(|t| obj.element(*t).is_err())
    {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        let mut o = obj.clone();
        o.put(DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(fmt.high_bit)));
        o.put(DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(fmt.bits_stored)));
        o.put(DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(signed as u16)));
        o.put(DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)));
        o.put(DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, PrimitiveValue::from(photometric.as_str())));
        patched = o;
        &patched
    } else {
        obj
    };
    // The codecs behind dicom-pixeldata index into fragment bytes a peer controls; some panic on lying headers
    // (an RLE header whose segment offsets point past the fragment). A panic here is one bad slice, not a bad
    // series: it becomes a decode error (corpus case dataset/rle-header-offsets-out-of-range).
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| obj.decode_pixel_data()))
        .map_err(|p| {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            DecodeError::Decode(format!("decoder panicked: {msg}"))
        })?
        .map_err(|e| DecodeError::Decode(e.to_string()))?;
    let data = decoded.data();
    let bytes_per_sample = (fmt.bits_allocated / 8) as usize;
    let frame_bytes = rows * cols * bytes_per_sample;

    let thickness = elem_floats(obj, tags::SLICE_THICKNESS).map(|v| v[0]);
    let mut out = Vec::with_capacity(frames as usize);
    for frame in 0..frames {
        let start = frame as usize * frame_bytes;
        let buf = data.get(start..start + frame_bytes).ok_or(DecodeError::Truncated {
            frame,
            needed: start + frame_bytes,
            available: data.len(),
        })?;
        let slope = functional_floats(obj, frame, tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE, tags::RESCALE_SLOPE)
            .map(|v| v[0])
            .unwrap_or(1.0);
        let intercept =
            functional_floats(obj, frame, tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE, tags::RESCALE_INTERCEPT)
                .map(|v| v[0])
                .unwrap_or(0.0);
        if !slope.is_finite() || !intercept.is_finite() || slope == 0.0 {
            return Err(DecodeError::Invalid {
                name: "RescaleSlope/RescaleIntercept",
                detail: format!("slope {slope}, intercept {intercept}"),
            });
        }
        let spacing = functional_floats(obj, frame, tags::PIXEL_MEASURES_SEQUENCE, tags::PIXEL_SPACING)
            .filter(|v| v.len() >= 2 && v[0] > 0.0 && v[1] > 0.0);
        let position = functional_floats(obj, frame, tags::PLANE_POSITION_SEQUENCE, tags::IMAGE_POSITION_PATIENT)
            .filter(|v| v.len() >= 3)
            .map(|v| [v[0], v[1], v[2]]);
        let orientation =
            functional_floats(obj, frame, tags::PLANE_ORIENTATION_SEQUENCE, tags::IMAGE_ORIENTATION_PATIENT)
                .filter(|v| v.len() >= 6)
                .map(|v| [v[0], v[1], v[2], v[3], v[4], v[5]]);
        let frame_thickness = functional_floats(obj, frame, tags::PIXEL_MEASURES_SEQUENCE, tags::SLICE_THICKNESS)
            .map(|v| v[0])
            .or(thickness);
        out.push(StoredFrame {
            data: buf.to_vec(),
            rescale: StoredRescale { format: fmt, pad_range, monochrome1, slope, intercept },
            geometry: HuSlice {
                rows,
                cols,
                hu: Vec::new(),
                pixel_spacing: spacing.as_ref().map(|v| [v[0], v[1]]).unwrap_or([1.0, 1.0]),
                pixel_spacing_known: spacing.is_some(),
                image_position: position,
                image_orientation: orientation,
                slice_thickness: frame_thickness,
                frame,
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_sign_and_mask() {
        let f = StoredFormat { bits_allocated: 16, bits_stored: 12, high_bit: 11, signed: true };
        assert_eq!(f.interpret(0x0FFF), -1);
        assert_eq!(f.interpret(0xF7FF), 2047);
        let u = StoredFormat { signed: false, ..f };
        assert_eq!(u.interpret(0xF123), 0x123);
    }
}
