//! preprocess — turns a decoded DICOM object into HU slices, and a HU slice into model input.
//!
//! Owns: pixel decoding (native, RLE, JPEG lossless, JPEG 2000, deflated — through dicom-pixeldata, with its LUTs
//! switched off), stored-value interpretation (bits stored, sign, padding, MONOCHROME1), the modality rescale to
//! Hounsfield units (classic and Enhanced CT functional groups), and the input contract "minmax_clahe":
//! HU clip → per-slice min-max to 8 bit → CLAHE (OpenCV semantics) → bilinear resize (OpenCV INTER_LINEAR
//! semantics) → /255. The Python trainer implements the same contract with numpy/OpenCV; `tests/preprocess.rs`
//! checks the two agree on real slices.
//! Hands on: [`HuSlice`] (native resolution, kept by the caller for analysis) and N×C×H×W float32 input.
//! Never: runs the model or interprets its output.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::{FileDicomObject, InMemDicomObject};
use dicom_pixeldata::PixelDecoder;
use serde::{Deserialize, Serialize};

use crate::model::InputContract;

/// Largest Rows or Columns accepted before decoding (a guard against absurd allocations).
pub const MAX_DIMENSION: u32 = 4096;
/// HU given to padding pixels (PixelPaddingValue): air.
pub const PADDING_HU: f32 = -1024.0;

/// Why a DICOM object cannot become HU slices, or a slice cannot become model input.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
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
    #[error("input contract: {0}")]
    Contract(String),
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
pub fn decode_hu_frames(obj: &FileDicomObject<InMemDicomObject>) -> Result<Vec<HuSlice>, PreprocessError> {
    Ok(decode_stored_frames(obj)?.into_iter().map(StoredFrame::into_hu).collect())
}

/// Every frame of a CT (or Enhanced CT) object as stored values plus what turns them into HU (see
/// [`decode_hu_frames`], which is this followed by [`StoredFrame::into_hu`]; the GPU path uploads the stored values).
pub fn decode_stored_frames(obj: &FileDicomObject<InMemDicomObject>) -> Result<Vec<StoredFrame>, PreprocessError> {
    let rows = elem_int(obj, tags::ROWS).ok_or(PreprocessError::Missing("Rows"))?;
    let cols = elem_int(obj, tags::COLUMNS).ok_or(PreprocessError::Missing("Columns"))?;
    if rows < 1 || cols < 1 || rows > MAX_DIMENSION as i64 || cols > MAX_DIMENSION as i64 {
        return Err(PreprocessError::Dimensions {
            rows: rows.clamp(0, u32::MAX as i64) as u32,
            cols: cols.clamp(0, u32::MAX as i64) as u32,
            max: MAX_DIMENSION,
        });
    }
    let (rows, cols) = (rows as usize, cols as usize);
    let samples = elem_int(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    if samples != 1 {
        return Err(PreprocessError::Unsupported(format!("SamplesPerPixel {samples} (CT must be 1)")));
    }
    let bits_allocated = elem_int(obj, tags::BITS_ALLOCATED).ok_or(PreprocessError::Missing("BitsAllocated"))?;
    if !matches!(bits_allocated, 8 | 16 | 32) {
        return Err(PreprocessError::Unsupported(format!("BitsAllocated {bits_allocated} (expected 8, 16 or 32)")));
    }
    let bits_stored = elem_int(obj, tags::BITS_STORED).unwrap_or(bits_allocated);
    if bits_stored < 1 || bits_stored > bits_allocated {
        return Err(PreprocessError::Invalid {
            name: "BitsStored",
            detail: format!("{bits_stored} with BitsAllocated {bits_allocated}"),
        });
    }
    let high_bit = elem_int(obj, tags::HIGH_BIT).unwrap_or(bits_stored - 1);
    if high_bit < bits_stored - 1 || high_bit >= bits_allocated {
        return Err(PreprocessError::Invalid {
            name: "HighBit",
            detail: format!("{high_bit} with BitsStored {bits_stored}, BitsAllocated {bits_allocated}"),
        });
    }
    let signed = match elem_int(obj, tags::PIXEL_REPRESENTATION).unwrap_or(0) {
        0 => false,
        1 => true,
        other => {
            return Err(PreprocessError::Invalid { name: "PixelRepresentation", detail: format!("{other}") });
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
        other => return Err(PreprocessError::Unsupported(format!("PhotometricInterpretation {other}"))),
    };
    let frames = elem_str(obj, tags::NUMBER_OF_FRAMES).and_then(|s| s.parse::<i64>().ok()).unwrap_or(1).max(1);
    if frames > 100_000 {
        return Err(PreprocessError::Invalid { name: "NumberOfFrames", detail: format!("{frames}") });
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
                    return Err(PreprocessError::Invalid {
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
            PreprocessError::Decode(format!("decoder panicked: {msg}"))
        })?
        .map_err(|e| PreprocessError::Decode(e.to_string()))?;
    let data = decoded.data();
    let bytes_per_sample = (fmt.bits_allocated / 8) as usize;
    let frame_bytes = rows * cols * bytes_per_sample;

    let thickness = elem_floats(obj, tags::SLICE_THICKNESS).map(|v| v[0]);
    let mut out = Vec::with_capacity(frames as usize);
    for frame in 0..frames {
        let start = frame as usize * frame_bytes;
        let buf = data.get(start..start + frame_bytes).ok_or(PreprocessError::Truncated {
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
            return Err(PreprocessError::Invalid {
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

/// Step 1–2 of "minmax_clahe": clip to `hu_clip`, then per-slice min-max to 0..=255 in f64, rounded half away
/// from zero — exactly `models/train/normalise.py::minmax_u8` (`floor((v - lo) / (hi - lo) * 255 + 0.5)`);
/// a constant slice is all 0.
pub fn minmax_u8(hu: &[f32], hu_clip: [f32; 2]) -> Vec<u8> {
    let (clo, chi) = (hu_clip[0] as f64, hu_clip[1] as f64);
    let clip = |v: f32| (v as f64).max(clo).min(chi);
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for &v in hu {
        let v = clip(v);
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if hu.is_empty() || hi <= lo {
        return vec![0; hu.len()];
    }
    let range = hi - lo;
    hu.iter()
        .map(|&v| {
            let x = (clip(v) - lo) / range * 255.0;
            // x ≥ 0 (clip(v) ≥ lo): truncation is floor here, without a libm call per pixel on x86-64.
            ((x + 0.5) as u32).min(255) as u8
        })
        .collect()
}

/// OpenCV `borderInterpolate` for BORDER_REFLECT_101.
pub(crate) fn reflect101(mut p: isize, len: usize) -> usize {
    let len = len as isize;
    if len == 1 {
        return 0;
    }
    while p < 0 || p >= len {
        if p < 0 {
            p = -p;
        } else {
            p = 2 * len - 2 - p;
        }
    }
    p as usize
}

/// OpenCV `saturate_cast<uchar>(float)`: round half to even, then clamp.
#[inline]
fn sat_u8(v: f32) -> u8 {
    // Below 2^22, adding and subtracting 1.5 × 2^23 rounds to an integer, half to even (the default FP rounding
    // mode), exactly as `round_ties_even` but without a libm call per pixel on x86-64.
    const MAGIC: f32 = 12_582_912.0;
    let r = if v.abs() < 4_194_304.0 { (v + MAGIC) - MAGIC } else { v.round_ties_even() };
    if r <= 0.0 {
        0
    } else if r >= 255.0 {
        255
    } else {
        r as u8
    }
}

/// The geometry of one CLAHE application (shared by [`clahe_u8`] and the GPU kernel, so both use the same numbers).
#[derive(Debug, Clone)]
pub struct ClahePlan {
    /// Size of the (reflect-101 padded) image the tile histograms are taken from.
    pub ext_rows: usize,
    /// See `ext_rows`.
    pub ext_cols: usize,
    /// Tile size in pixels.
    pub tile_w: usize,
    /// See `tile_w`.
    pub tile_h: usize,
    /// Histogram clip count per bin (0: no clipping).
    pub clip: i64,
    /// LUT scale, 255 / tile area (f32, as OpenCV).
    pub lut_scale: f32,
    /// Per column: LUT offset of the left and right tile (tile index × 256) and the weights of right and left.
    pub xs: Vec<(usize, usize, f32, f32)>,
    /// Per row: upper and lower tile row, and the weights of lower and upper.
    pub ys: Vec<(usize, usize, f32, f32)>,
}

impl ClahePlan {
    /// The plan for a rows×cols image and a tiles_x×tiles_y grid (OpenCV pads both axes as soon as one is not
    /// divisible, by `tiles - size % tiles`, which is a whole extra tile on a divisible axis).
    pub fn new(rows: usize, cols: usize, clip_limit: f64, tiles_x: usize, tiles_y: usize) -> ClahePlan {
        let (ext_rows, ext_cols) = if cols % tiles_x == 0 && rows % tiles_y == 0 {
            (rows, cols)
        } else {
            (rows + tiles_y - rows % tiles_y, cols + tiles_x - cols % tiles_x)
        };
        let tile_w = ext_cols / tiles_x;
        let tile_h = ext_rows / tiles_y;
        let tile_area = (tile_w * tile_h) as i64;
        let lut_scale = 255.0f32 / tile_area as f32;
        let clip = if clip_limit > 0.0 { ((clip_limit * tile_area as f64 / 256.0) as i64).max(1) } else { 0 };
        let inv_tw = 1.0f32 / tile_w as f32;
        let inv_th = 1.0f32 / tile_h as f32;
        let xs = (0..cols)
            .map(|x| {
                let txf = x as f32 * inv_tw - 0.5f32;
                let tx1 = txf.floor() as isize;
                let xa = txf - tx1 as f32;
                let tx2 = (tx1 + 1).min(tiles_x as isize - 1) as usize;
                (tx1.max(0) as usize * 256, tx2 * 256, xa, 1.0f32 - xa)
            })
            .collect();
        let ys = (0..rows)
            .map(|y| {
                let tyf = y as f32 * inv_th - 0.5f32;
                let ty1 = tyf.floor() as isize;
                let ya = tyf - ty1 as f32;
                let ty2 = (ty1 + 1).min(tiles_y as isize - 1) as usize;
                (ty1.max(0) as usize, ty2, ya, 1.0f32 - ya)
            })
            .collect();
        ClahePlan { ext_rows, ext_cols, tile_w, tile_h, clip, lut_scale, xs, ys }
    }
}

/// CLAHE with the exact semantics of OpenCV's `cv2.createCLAHE(clipLimit, (tiles_x, tiles_y)).apply` on an 8-bit
/// image (CPU path of modules/imgproc/src/clahe.cpp): reflect-101 padding when the size is not divisible by the
/// grid, per-tile clipped histograms with OpenCV's redistribution, LUT = cvRound(cumsum × 255 / tileArea), and
/// bilinear interpolation between the four nearest tile LUTs in float32.
pub fn clahe_u8(src: &[u8], rows: usize, cols: usize, clip_limit: f64, tiles_x: usize, tiles_y: usize) -> Vec<u8> {
    assert_eq!(src.len(), rows * cols, "clahe_u8: buffer is not rows×cols");
    assert!(tiles_x > 0 && tiles_y > 0, "clahe_u8: empty tile grid");
    if rows == 0 || cols == 0 {
        return Vec::new();
    }
    let plan = ClahePlan::new(rows, cols, clip_limit, tiles_x, tiles_y);
    let (ext_rows, ext_cols) = (plan.ext_rows, plan.ext_cols);
    // Image the LUTs are computed from: the source, or the source padded (reflect-101).
    let ext: std::borrow::Cow<[u8]> = if (ext_rows, ext_cols) == (rows, cols) {
        std::borrow::Cow::Borrowed(src)
    } else {
        let mut buf = vec![0u8; ext_rows * ext_cols];
        for y in 0..ext_rows {
            let sy = reflect101(y as isize, rows);
            for x in 0..ext_cols {
                buf[y * ext_cols + x] = src[sy * cols + reflect101(x as isize, cols)];
            }
        }
        std::borrow::Cow::Owned(buf)
    };
    let (tile_w, tile_h, clip, lut_scale) = (plan.tile_w, plan.tile_h, plan.clip, plan.lut_scale);

    let mut luts = vec![0u8; tiles_x * tiles_y * 256];
    for ty in 0..tiles_y {
        for tx in 0..tiles_x {
            let mut hist = [0i64; 256];
            for y in ty * tile_h..(ty + 1) * tile_h {
                let row = &ext[y * ext_cols + tx * tile_w..y * ext_cols + (tx + 1) * tile_w];
                for &p in row {
                    hist[p as usize] += 1;
                }
            }
            if clip > 0 {
                let mut clipped = 0i64;
                for h in hist.iter_mut() {
                    if *h > clip {
                        clipped += *h - clip;
                        *h = clip;
                    }
                }
                let batch = clipped / 256;
                let mut residual = clipped - batch * 256;
                for h in hist.iter_mut() {
                    *h += batch;
                }
                if residual != 0 {
                    let step = (256 / residual).max(1) as usize;
                    let mut i = 0usize;
                    while i < 256 && residual > 0 {
                        hist[i] += 1;
                        i += step;
                        residual -= 1;
                    }
                }
            }
            let lut = &mut luts[(ty * tiles_x + tx) * 256..(ty * tiles_x + tx + 1) * 256];
            let mut sum = 0i64;
            for i in 0..256 {
                sum += hist[i];
                lut[i] = sat_u8(sum as i32 as f32 * lut_scale);
            }
        }
    }

    // Interpolation over the original (unpadded) image.
    let xs = &plan.xs;
    let mut dst = vec![0u8; rows * cols];
    for y in 0..rows {
        let (ty1, ty2, ya, ya1) = plan.ys[y];
        let plane1 = &luts[ty1 * tiles_x * 256..];
        let plane2 = &luts[ty2 * tiles_x * 256..];
        for x in 0..cols {
            let v = src[y * cols + x] as usize;
            let (i1, i2, xa, xa1) = xs[x];
            let res = (plane1[i1 + v] as f32 * xa1 + plane1[i2 + v] as f32 * xa) * ya1
                + (plane2[i1 + v] as f32 * xa1 + plane2[i2 + v] as f32 * xa) * ya;
            dst[y * cols + x] = sat_u8(res);
        }
    }
    dst
}

const RESIZE_COEF_SCALE: f32 = 2048.0;

/// Per destination index: the two source indices and their fixed-point weights (OpenCV INTER_LINEAR tables).
pub(crate) fn linear_table(
    src_len: usize,
    dst_len: usize,
    clamp_fraction_at_start: bool,
) -> Vec<(usize, usize, i32, i32)> {
    let scale = 1.0f64 / (dst_len as f64 / src_len as f64);
    (0..dst_len)
        .map(|d| {
            let mut f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let mut s = f.floor() as isize;
            f -= s as f32;
            if clamp_fraction_at_start && s < 0 {
                f = 0.0;
                s = 0;
            }
            if clamp_fraction_at_start && s >= src_len as isize - 1 {
                f = 0.0;
                s = src_len as isize - 1;
            }
            let a0 = ((1.0f32 - f) * RESIZE_COEF_SCALE).round_ties_even() as i32;
            let a1 = (f * RESIZE_COEF_SCALE).round_ties_even() as i32;
            let s0 = s.clamp(0, src_len as isize - 1) as usize;
            let s1 = (s + 1).clamp(0, src_len as isize - 1) as usize;
            (s0, s1, a0, a1)
        })
        .collect()
}

/// Bilinear resize of an 8-bit image with OpenCV `cv2.resize(..., interpolation=cv2.INTER_LINEAR)` semantics:
/// half-pixel centres (`sx = (dx + 0.5) × scale − 0.5`), edges clamped, 11-bit fixed-point weights, rounded
/// result (OpenCV's vector path; within 1 LSB of its scalar path).
pub fn resize_bilinear_u8(src: &[u8], rows: usize, cols: usize, out_rows: usize, out_cols: usize) -> Vec<u8> {
    assert_eq!(src.len(), rows * cols, "resize_bilinear_u8: buffer is not rows×cols");
    if rows == out_rows && cols == out_cols {
        return src.to_vec();
    }
    if rows == 0 || cols == 0 || out_rows == 0 || out_cols == 0 {
        return vec![0; out_rows * out_cols];
    }
    let xt = linear_table(cols, out_cols, true);
    let yt = linear_table(rows, out_rows, false);
    // Horizontal pass per source row, cached for the two rows a destination row needs.
    let hrow = |r: usize| -> Vec<i32> {
        let row = &src[r * cols..(r + 1) * cols];
        xt.iter().map(|&(s0, s1, a0, a1)| row[s0] as i32 * a0 + row[s1] as i32 * a1).collect()
    };
    let mut cache: Vec<Option<Vec<i32>>> = vec![None; rows];
    let mut out = vec![0u8; out_rows * out_cols];
    for (dy, &(s0, s1, b0, b1)) in yt.iter().enumerate() {
        if cache[s0].is_none() {
            cache[s0] = Some(hrow(s0));
        }
        if cache[s1].is_none() {
            cache[s1] = Some(hrow(s1));
        }
        let r0 = cache[s0].as_ref().expect("cached row");
        let r1 = cache[s1].as_ref().expect("cached row");
        let dst = &mut out[dy * out_cols..(dy + 1) * out_cols];
        for x in 0..out_cols {
            // OpenCV VResizeLinearVec_32s8u: ((b0·(S0>>4))>>16 + (b1·(S1>>4))>>16 + 2) >> 2, saturated.
            let t0 = (b0 * (r0[x] >> 4)) >> 16;
            let t1 = (b1 * (r1[x] >> 4)) >> 16;
            dst[x] = ((t0 + t1 + 2) >> 2).clamp(0, 255) as u8;
        }
        // Rows no longer needed can be dropped.
        if let Some(&(next0, _, _, _)) = yt.get(dy + 1) {
            for r in cache.iter_mut().take(next0) {
                *r = None;
            }
        }
    }
    out
}

/// The 8-bit image of the contract at model resolution: min-max, CLAHE, resize (everything but the /255).
pub fn normalise_u8(slice: &HuSlice, input: &InputContract) -> Result<Vec<u8>, PreprocessError> {
    if input.normalisation != "minmax_clahe" {
        return Err(PreprocessError::Contract(format!("unknown normalisation {:?}", input.normalisation)));
    }
    if slice.hu.len() != slice.rows * slice.cols {
        return Err(PreprocessError::Contract(format!(
            "slice has {} values for {}×{}",
            slice.hu.len(),
            slice.rows,
            slice.cols
        )));
    }
    if input.clahe_tiles == 0 {
        return Err(PreprocessError::Contract("clahe_tiles is 0".into()));
    }
    let u8img = minmax_u8(&slice.hu, input.hu_clip);
    let eq =
        clahe_u8(&u8img, slice.rows, slice.cols, input.clahe_clip_limit as f64, input.clahe_tiles, input.clahe_tiles);
    Ok(resize_bilinear_u8(&eq, slice.rows, slice.cols, input.height, input.width))
}

/// Writes one slice as model input (height×width float32 in 0..=1) into `out` (length height × width).
pub fn prepare(slice: &HuSlice, input: &InputContract, out: &mut [f32]) -> Result<(), PreprocessError> {
    if out.len() != input.height * input.width {
        return Err(PreprocessError::Contract(format!(
            "output buffer has {} floats, the contract needs {}×{}",
            out.len(),
            input.height,
            input.width
        )));
    }
    let img = normalise_u8(slice, input)?;
    u8_to_input(&img, out);
    Ok(())
}

/// Step 5 of the contract: u8 / 255 (also used for images that are already the normalised 8-bit picture).
pub fn u8_to_input(img: &[u8], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(img) {
        *o = v as f32 / 255.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sat_u8_rounds_half_to_even_like_round_ties_even() {
        let reference = |v: f32| v.round_ties_even().clamp(0.0, 255.0) as u8;
        let mut v = -3.0f32;
        while v < 260.0 {
            for x in [v, f32::from_bits(v.to_bits() + 1), f32::from_bits(v.to_bits().saturating_sub(1))] {
                assert_eq!(sat_u8(x), reference(x), "{x}");
            }
            v += 0.125;
        }
        for x in [0.5f32, 1.5, 2.5, 254.5, 255.5, -0.5, 1e9, -1e9, 4_194_303.5, 8_388_609.0] {
            assert_eq!(sat_u8(x), reference(x), "{x}");
        }
    }

    #[test]
    fn reflect101_matches_opencv() {
        // OpenCV: len 5, idx -1 → 1, idx 5 → 3, idx 6 → 2.
        assert_eq!(reflect101(-1, 5), 1);
        assert_eq!(reflect101(5, 5), 3);
        assert_eq!(reflect101(6, 5), 2);
        assert_eq!(reflect101(3, 1), 0);
    }

    #[test]
    fn minmax_spans_full_range() {
        let v = minmax_u8(&[-2000.0, -1024.0, 0.0, 3071.0, 5000.0], [-1024.0, 3071.0]);
        assert_eq!(v[0], 0);
        assert_eq!(v[1], 0);
        assert_eq!(v[3], 255);
        assert_eq!(v[4], 255);
        assert_eq!(v[2], ((1024.0f64 / 4095.0 * 255.0).round()) as u8);
        assert_eq!(minmax_u8(&[5.0; 4], [-1024.0, 3071.0]), vec![0; 4]);
    }

    #[test]
    fn stored_values_sign_and_mask() {
        let f = StoredFormat { bits_allocated: 16, bits_stored: 12, high_bit: 11, signed: true };
        assert_eq!(f.interpret(0x0FFF), -1);
        assert_eq!(f.interpret(0xF7FF), 2047);
        let u = StoredFormat { signed: false, ..f };
        assert_eq!(u.interpret(0xF123), 0x123);
    }

    #[test]
    fn resize_halving_is_block_average() {
        let src: Vec<u8> = (0..16).map(|i| (i * 10) as u8).collect();
        let out = resize_bilinear_u8(&src, 4, 4, 2, 2);
        // top-left block: 0,10,40,50 → 25
        assert_eq!(out[0], 25);
        assert_eq!(out[3], ((100 + 110 + 140 + 150 + 2) / 4) as u8);
    }
}
