//! analysis::segment — one slice's class scores (model resolution) → its masks at native resolution.
//! Owns: the bilinear upsampling of the score maps and the per-pixel argmax (interpolating only near class
//! boundaries, with the same result as interpolating everywhere), lesion ⊂ lung, the lesion pixels' HU, the slice's
//! highest lesion probability, and the air candidate the lung guard reads later.
//! Hands on: [`SliceSegmentation`], kept per slice until the series analysis (`series`).
//! Never: looks across slices (that is `series` and `components`).

use serde::{Deserialize, Serialize};

use super::{lung_guard, BitMask, LESION_CLASS, LUNG_CLASS};
use crate::decode::HuSlice;

/// One slice's segmentation at native resolution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SliceSegmentation {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Lung, including lesion pixels (lesion implies lung).
    pub lung: BitMask,
    /// Lesion (before the 3D minimum-volume filter).
    pub lesion: BitMask,
    /// HU of each lesion pixel, in raster order of the lesion mask, so mean HU per 3D lesion needs no HU slice.
    pub lesion_hu: Vec<f32>,
    /// Highest lesion probability (softmax of the scores, at model resolution) anywhere in the slice.
    pub max_lesion_probability: f32,
    /// Air-density pixels inside the body contour less its gas pieces, from the HU slice
    /// ([`lung_guard::air_mask`]'s `candidate`); the lung guard's input at completion. `None` when the masks were made
    /// without HU (hand-built fixtures): the series is then analysed without the guard.
    #[serde(default)]
    pub air: Option<BitMask>,
    /// The lung guard's seeding of this slice done ahead, while the series streams in (see
    /// [`lung_guard::PreSeed`]); `None` when not made (then the guard seeds the slice at completion).
    #[serde(skip)]
    pub pre_seed: Option<lung_guard::PreSeed>,
}

/// Bilinear upsampling table (half-pixel centres, clamped): two source indices and the weight of the second.
pub(crate) fn upsample_table(src: usize, dst: usize) -> Vec<(usize, usize, f32)> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5).clamp(0.0, (src - 1) as f64);
            let s0 = f.floor() as usize;
            let s1 = (s0 + 1).min(src - 1);
            (s0, s1, (f - s0 as f64) as f32)
        })
        .collect()
}

/// Highest softmax probability of `class` over the pixels of one K×H×W score map.
pub fn max_class_probability(scores: &[f32], classes: usize, h: usize, w: usize, class: usize) -> f32 {
    let plane = h * w;
    let mut best = 0f32;
    // A pixel whose class score is far below its top score cannot beat `best` (its probability is at most
    // exp(score − top)): skipped without the exponentials. The margin keeps the skip exact in f32.
    let mut skip_below = f32::NEG_INFINITY;
    for p in 0..plane {
        let m = (0..classes).map(|k| scores[k * plane + p]).fold(f32::NEG_INFINITY, f32::max);
        if scores[class * plane + p] - m < skip_below {
            continue;
        }
        let denom: f32 = (0..classes).map(|k| (scores[k * plane + p] - m).exp()).sum();
        let prob = (scores[class * plane + p] - m).exp() / denom;
        if prob > best {
            best = prob;
            skip_below = if best > 0.0 { best.ln() - 1e-3 } else { f32::NEG_INFINITY };
        }
    }
    best
}

/// Per low-resolution pixel: the argmax class when it wins by a margin no f32 rounding of the bilinear
/// interpolation can undo, else `u8::MAX`. An output pixel whose four source pixels all carry the same class
/// takes it without interpolating: a convex combination of score vectors that all rank that class first by
/// such a margin ranks it first too. So the result is the same as interpolating every pixel.
fn sure_classes(scores: &[f32], classes: usize, plane: usize) -> Vec<u8> {
    (0..plane)
        .map(|p| {
            let (mut best, mut top, mut second, mut mag) = (0usize, f32::NEG_INFINITY, f32::NEG_INFINITY, 0f32);
            for k in 0..classes {
                let v = scores[k * plane + p];
                mag = mag.max(v.abs());
                if v > top {
                    second = top;
                    top = v;
                    best = k;
                } else if v > second {
                    second = v;
                }
            }
            // Interpolation error is a few ulp of the largest score involved; 1e-4 relative is far beyond it.
            let sure = top.is_finite() && second.is_finite() && top - second > 1e-4 * (1.0 + mag);
            if sure && best < u8::MAX as usize {
                best as u8
            } else {
                u8::MAX
            }
        })
        .collect()
}

/// Turns one slice's K×H×W scores (logits or probabilities, channel order background, lung, lesion) into masks at
/// the native rows×cols of `hu`: each class map is upsampled bilinearly (half-pixel centres), then argmax per
/// pixel (ties go to the lower class). Lesion pixels count as lung too; their HU values are kept.
/// Only pixels near a class boundary are interpolated (see `sure_classes`); the masks are the same.
pub fn segment_slice(scores: &[f32], classes: usize, h: usize, w: usize, hu: &HuSlice) -> SliceSegmentation {
    assert!(classes > LESION_CLASS, "segment_slice: need background, lung and lesion channels");
    assert_eq!(scores.len(), classes * h * w, "segment_slice: scores are not K×H×W");
    assert_eq!(hu.hu.len(), hu.rows * hu.cols, "segment_slice: HU slice is not rows×cols");
    let (rows, cols) = (hu.rows, hu.cols);
    let xt = upsample_table(w, cols);
    let yt = upsample_table(h, rows);
    let plane = h * w;
    let sure = sure_classes(scores, classes, plane);
    let mut lung = BitMask::new(rows, cols);
    let mut lesion = BitMask::new(rows, cols);
    let mut lesion_hu = Vec::new();
    let mut vals = vec![0f32; classes];
    for (r, &(y0, y1, fy)) in yt.iter().enumerate() {
        for (c, &(x0, x1, fx)) in xt.iter().enumerate() {
            let a = sure[y0 * w + x0];
            let best = if a != u8::MAX && a == sure[y0 * w + x1] && a == sure[y1 * w + x0] && a == sure[y1 * w + x1] {
                a as usize
            } else {
                for (k, v) in vals.iter_mut().enumerate() {
                    let m = &scores[k * plane..(k + 1) * plane];
                    let top = m[y0 * w + x0] * (1.0 - fx) + m[y0 * w + x1] * fx;
                    let bottom = m[y1 * w + x0] * (1.0 - fx) + m[y1 * w + x1] * fx;
                    *v = top * (1.0 - fy) + bottom * fy;
                }
                let mut best = 0;
                for k in 1..classes {
                    if vals[k] > vals[best] {
                        best = k;
                    }
                }
                best
            };
            if best == LESION_CLASS {
                lesion.set(r, c, true);
                lung.set(r, c, true);
                lesion_hu.push(hu.hu[r * cols + c]);
            } else if best == LUNG_CLASS {
                lung.set(r, c, true);
            }
        }
    }
    SliceSegmentation {
        rows,
        cols,
        lung,
        lesion,
        lesion_hu,
        max_lesion_probability: max_class_probability(scores, classes, h, w, LESION_CLASS),
        air: Some(lung_guard::air_mask(hu).candidate),
        pre_seed: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition: every output pixel interpolated, then argmax (ties to the lower class).
    fn segment_slice_reference(
        scores: &[f32],
        classes: usize,
        h: usize,
        w: usize,
        hu: &HuSlice,
    ) -> (Vec<u8>, Vec<f32>) {
        let (xt, yt, plane) = (upsample_table(w, hu.cols), upsample_table(h, hu.rows), h * w);
        let (mut out, mut lesion_hu) = (Vec::new(), Vec::new());
        for (r, &(y0, y1, fy)) in yt.iter().enumerate() {
            for (c, &(x0, x1, fx)) in xt.iter().enumerate() {
                let v: Vec<f32> = (0..classes)
                    .map(|k| {
                        let m = &scores[k * plane..(k + 1) * plane];
                        let top = m[y0 * w + x0] * (1.0 - fx) + m[y0 * w + x1] * fx;
                        let bottom = m[y1 * w + x0] * (1.0 - fx) + m[y1 * w + x1] * fx;
                        top * (1.0 - fy) + bottom * fy
                    })
                    .collect();
                let best = (1..classes).fold(0, |b, k| if v[k] > v[b] { k } else { b });
                if best == LESION_CLASS {
                    lesion_hu.push(hu.hu[r * hu.cols + c]);
                }
                out.push(best as u8);
            }
        }
        (out, lesion_hu)
    }

    #[test]
    fn segment_slice_interpolating_only_near_boundaries_equals_the_definition() {
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for (trial, &(h, w, rows, cols)) in [(64, 64, 160, 160), (32, 48, 100, 75), (64, 64, 64, 64)].iter().enumerate()
        {
            let plane = h * w;
            let mut scores = vec![0f32; 3 * plane];
            for y in 0..h {
                for x in 0..w {
                    // Smooth blobs (large uniform regions), plus exact ties, near-ties and large magnitudes.
                    let (fy, fx) = (y as f64 / h as f64, x as f64 / w as f64);
                    let lung = 8.0 * ((fx * 6.0).sin() * (fy * 5.0).cos()) + rnd() - 0.5;
                    let lesion = 6.0 * ((fx * 9.0 + 1.0).cos() * (fy * 7.0).sin()) - 2.0 + rnd() - 0.5;
                    let mut v = [0.0f32, lung as f32, lesion as f32];
                    match (y * w + x) % 37 {
                        0 => v[2] = v[1],
                        1 => v[2] = v[1] + 1e-6,
                        2 => v = [v[0] * 1e4, v[1] * 1e4, v[2] * 1e4],
                        _ => {}
                    }
                    for k in 0..3 {
                        scores[k * plane + y * w + x] = v[k];
                    }
                }
            }
            let hu = HuSlice::from_hu(rows, cols, (0..rows * cols).map(|i| (i % 2000) as f32 - 1000.0).collect());
            let seg = segment_slice(&scores, 3, h, w, &hu);
            let (want, want_hu) = segment_slice_reference(&scores, 3, h, w, &hu);
            for r in 0..rows {
                for c in 0..cols {
                    let got = if seg.lesion.get(r, c) {
                        2
                    } else if seg.lung.get(r, c) {
                        1
                    } else {
                        0
                    };
                    assert_eq!(got, want[r * cols + c], "trial {trial} pixel ({r}, {c})");
                }
            }
            assert_eq!(seg.lesion_hu, want_hu, "trial {trial}");
            assert!(want.contains(&2) && want.contains(&1) && want.contains(&0), "trial {trial}: all classes present");
            // The maximum probability with skipped pixels, against every pixel's softmax.
            let full = (0..plane)
                .map(|p| {
                    let v: Vec<f32> = (0..3).map(|k| scores[k * plane + p]).collect();
                    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let d: f32 = v.iter().map(|x| (x - m).exp()).sum();
                    (v[2] - m).exp() / d
                })
                .fold(0f32, f32::max);
            assert_eq!(seg.max_lesion_probability, full, "trial {trial}");
        }
    }
}
