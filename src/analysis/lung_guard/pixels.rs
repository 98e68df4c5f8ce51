//! lung_guard::pixels — one slice's seeding (step 4 of the `lung_guard` module doc) done pixel by pixel in a window
//! of the slice: how the guard seeded until the seeding on bit rows and runs (`lung_guard::seed`) replaced it.
//!
//! Owns: the reference seeding. `seed` must equal it bit for bit (unit tests on random slices,
//! `tests/lung_guard.rs` on the real RICORD series); [`super::Seeding::Pixels`] runs the guard with it, for those
//! tests and for A/B timings.
//! Hands on: (kept model lung, field, small pieces' centres and verdicts) to `guard_with`.
//! Never: runs on the product's path (`guard` seeds with `seed`), or differs from `seed` in any pixel.

use super::morphology::{dilate, fill_holes, label};
use super::{radius_px, AIRWAY_MAX_CM2, NEAR_MM, SEED_DILATION_MM, WHOLE_OVERLAP_FRACTION};
use crate::analysis::{BitMask, PlacedSlice};

/// One slice's share of [`super::guard`]: the kept air `k` less airway pieces, dilated into the lung field, and the
/// model lung components it seeds (see the `lung_guard` module doc), with the airway rule as a function of a small
/// piece's centre x (patient mm). Returns (kept model lung, field, each small piece's centre and verdict in label
/// order).
///
/// The work is done in a window: the bounding box of the kept air and the model lung, widened by the largest
/// dilation radius plus one pixel (clamped to the image). The result is the full-image one exactly: every
/// dilation of the air stays inside the window, the model's components lie inside it, and the unset margin
/// connects to the image border around it, so hole filling sees the same outside (a lung slice is a third of the
/// image or less: the guard at completion, where the alert waits for it, does a third of the pixel work).
pub(super) fn seed_with(
    s: &PlacedSlice,
    k: &BitMask,
    airway: &dyn Fn(f64) -> bool,
) -> (BitMask, BitMask, Vec<(f64, bool)>) {
    let seg = &s.segmentation;
    let (rows, cols) = (seg.rows, seg.cols);
    if k.count() == 0 {
        return (BitMask::new(rows, cols), BitMask::new(rows, cols), Vec::new());
    }
    let margin = radius_px(s, NEAR_MM).max(radius_px(s, SEED_DILATION_MM)) + 1;
    let (k_runs, lung_runs) = (k.runs(), seg.lung.runs());
    let (mut r0, mut r1, mut c0, mut c1) = (usize::MAX, 0, usize::MAX, 0);
    for &(r, a, b) in k_runs.iter().chain(&lung_runs) {
        (r0, r1, c0, c1) = (r0.min(r), r1.max(r), c0.min(a), c1.max(b));
    }
    let window = Window {
        r0: r0.saturating_sub(margin),
        c0: c0.saturating_sub(margin),
        rows: (r1 + margin).min(rows - 1) + 1 - r0.saturating_sub(margin),
        cols: (c1 + margin).min(cols - 1) + 1 - c0.saturating_sub(margin),
    };
    seed_in_with(s, &k_runs, &lung_runs, airway, window)
}

/// A rectangle of a slice: its first row and column and its size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Window {
    /// First row.
    pub(super) r0: usize,
    /// First column.
    pub(super) c0: usize,
    /// Rows.
    pub(super) rows: usize,
    /// Columns.
    pub(super) cols: usize,
}

/// [`seed_with`] within `w`, which must hold every run of `k_runs` (kept air) and `lung_runs` (model lung) with a
/// margin of the largest dilation radius plus one pixel, or be the whole slice.
pub(super) fn seed_in_with(
    s: &PlacedSlice,
    k_runs: &[(usize, usize, usize)],
    lung_runs: &[(usize, usize, usize)],
    airway_at: &dyn Fn(f64) -> bool,
    w: Window,
) -> (BitMask, BitMask, Vec<(f64, bool)>) {
    let seg = &s.segmentation;
    let (rows, cols) = (w.rows, w.cols);
    let px_cm2 = s.pixel_spacing[0] * s.pixel_spacing[1] / 100.0;
    let crop = |runs: &[(usize, usize, usize)]| -> Vec<bool> {
        let mut v = vec![false; rows * cols];
        for &(r, a, b) in runs {
            let at = (r - w.r0) * cols;
            v[at + a - w.c0..=at + b - w.c0].fill(true);
        }
        v
    };
    // Airways out: small kept pieces near the mid-line.
    let mut air = crop(k_runs);
    let (labels, sizes) = label(&air, rows, cols, true);
    let mut centre = vec![(0.0f64, 0.0f64); sizes.len()];
    for (i, &l) in labels.iter().enumerate() {
        if l != 0 {
            // Image coordinates, summed in raster order: the same sums as over the whole slice.
            centre[l as usize].0 += (i / cols + w.r0) as f64;
            centre[l as usize].1 += (i % cols + w.c0) as f64;
        }
    }
    let mut small_pieces = Vec::new();
    let airway: Vec<bool> = (0..sizes.len())
        .map(|l| {
            if l == 0 || sizes[l] == 0 {
                return false;
            }
            let n = sizes[l] as f64;
            if n * px_cm2 >= AIRWAY_MAX_CM2 {
                return false;
            }
            let x = s.point(centre[l].0 / n, centre[l].1 / n)[0];
            let verdict = airway_at(x);
            small_pieces.push((x, verdict));
            verdict
        })
        .collect();
    for (a, &l) in air.iter_mut().zip(&labels) {
        if airway[l as usize] {
            *a = false;
        }
    }
    // The field, and the model's lung components it seeds.
    let f = dilate(&air, rows, cols, radius_px(s, SEED_DILATION_MM));
    let model = crop(lung_runs);
    let (mlabels, msizes) = label(&model, rows, cols, true);
    let mut overlap = vec![0usize; msizes.len()];
    for (&l, &inside) in mlabels.iter().zip(&f) {
        if l != 0 && inside {
            overlap[l as usize] += 1;
        }
    }
    // A component with WHOLE_OVERLAP_FRACTION of its pixels in the field is kept whole; of the others, the pixels
    // within NEAR_MM of the kept air.
    let whole: Vec<bool> =
        (0..msizes.len()).map(|l| l != 0 && overlap[l] as f64 >= WHOLE_OVERLAP_FRACTION * msizes[l] as f64).collect();
    let near = dilate(&air, rows, cols, radius_px(s, NEAR_MM));
    let mut kept_px: Vec<bool> =
        mlabels.iter().zip(&near).map(|(&l, &near)| l != 0 && (whole[l as usize] || near)).collect();
    // Model pixels enclosed by the kept lung and the field (a lesion island the model set apart inside a
    // consolidation it called background) are kept too: the field with its holes filled.
    let with_field: Vec<bool> = kept_px.iter().zip(&f).map(|(k, f)| *k || *f).collect();
    for ((k, inside), &l) in kept_px.iter_mut().zip(fill_holes(&with_field, rows, cols)).zip(&mlabels) {
        *k |= l != 0 && inside;
    }
    let uncrop = |px: &[bool]| -> BitMask {
        let mut m = BitMask::new(seg.rows, seg.cols);
        for (r, line) in px.chunks_exact(cols).enumerate() {
            let at = (r + w.r0) * seg.cols + w.c0;
            let mut c = 0;
            while c < cols {
                if !line[c] {
                    c += 1;
                    continue;
                }
                let start = c;
                while c < cols && line[c] {
                    c += 1;
                }
                m.set_range(at + start, at + c);
            }
        }
        m
    };
    (uncrop(&kept_px), uncrop(&f), small_pieces)
}
