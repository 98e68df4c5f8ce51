//! preprocess — turns a HU slice into the model's input, by the manifest's input contract.
//!
//! Owns: the input contract "minmax_clahe": HU clip → per-slice min-max to 8 bit → CLAHE (OpenCV semantics) →
//! bilinear resize to the model's input size (OpenCV INTER_LINEAR semantics) → /255, and the geometry tables the
//! GPU windowing kernel shares with it ([`ClahePlan`], `linear_table`). The Python trainer implements the same
//! contract with numpy/OpenCV; `tests/preprocess.rs` checks the two agree on real slices.
//! Hands on: N×C×H×W float32 input (one H×W plane per slice) to `engine`.
//! Never: decodes DICOM (that is `decode`), runs the model or interprets its output.

use crate::model::InputContract;

use crate::decode::HuSlice;

/// Why a slice cannot become model input: the slice and the contract disagree, or the contract is not one this
/// build implements.
#[derive(Debug, thiserror::Error)]
#[error("input contract: {0}")]
pub struct ContractError(pub String);

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
pub fn normalise_u8(slice: &HuSlice, input: &InputContract) -> Result<Vec<u8>, ContractError> {
    if input.normalisation != "minmax_clahe" {
        return Err(ContractError(format!("unknown normalisation {:?}", input.normalisation)));
    }
    if slice.hu.len() != slice.rows * slice.cols {
        return Err(ContractError(format!("slice has {} values for {}×{}", slice.hu.len(), slice.rows, slice.cols)));
    }
    if input.clahe_tiles == 0 {
        return Err(ContractError("clahe_tiles is 0".into()));
    }
    let u8img = minmax_u8(&slice.hu, input.hu_clip);
    let eq =
        clahe_u8(&u8img, slice.rows, slice.cols, input.clahe_clip_limit as f64, input.clahe_tiles, input.clahe_tiles);
    Ok(resize_bilinear_u8(&eq, slice.rows, slice.cols, input.height, input.width))
}

/// Writes one slice as model input (height×width float32 in 0..=1) into `out` (length height × width).
pub fn prepare(slice: &HuSlice, input: &InputContract, out: &mut [f32]) -> Result<(), ContractError> {
    if out.len() != input.height * input.width {
        return Err(ContractError(format!(
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
    fn resize_halving_is_block_average() {
        let src: Vec<u8> = (0..16).map(|i| (i * 10) as u8).collect();
        let out = resize_bilinear_u8(&src, 4, 4, 2, 2);
        // top-left block: 0,10,40,50 → 25
        assert_eq!(out[0], 25);
        assert_eq!(out[3], ((100 + 110 + 140 + 150 + 2) / 4) as u8);
    }
}
