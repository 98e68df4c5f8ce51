//! lung_guard::pixels — the guard's per-slice steps done pixel by pixel, as they were before bit rows and runs
//! replaced them: one slice's seeding (step 4 of the `lung_guard` module doc, in a window of the slice; replaced by
//! `lung_guard::seed`) and one slice's air mask (`air_mask`, `non_gas_air`; replaced by `lung_guard::air`).
//!
//! Owns: the reference seeding and the reference air mask. `seed` and `air` must equal them bit for bit (unit tests
//! on random slices and the HU fixtures, `tests/lung_guard.rs` on the real RICORD series);
//! [`super::Seeding::Pixels`] runs the guard with the seeding, [`super::AirMasking::Pixels`] makes the air mask, for
//! those tests and for A/B timings (`benches/air_mask.rs`).
//! Hands on: (kept model lung, field, small pieces' centres and verdicts) to `guard_with`; a [`BodyAir`] to
//! `air_mask_with`.
//! Never: runs on the product's path (`guard` seeds with `seed`, `air_mask` uses `air`), or differs from `seed` and
//! `air` in any pixel.

use super::morphology::{dilate, erode, fill_holes, label};
use super::{
    radius_px, BodyAir, AIRWAY_MAX_CM2, AIR_HU, BODY_OPEN_MM, GAS_CORE_MIN_CM2, GAS_CORE_MM, GAS_HU, GAS_PIECE_MAX_CM2,
    GAS_RIM_MM, MAX_GAS_FRACTION, NEAR_MM, SEED_DILATION_MM, WHOLE_OVERLAP_FRACTION,
};
use crate::analysis::{BitMask, PlacedSlice};
use crate::decode::HuSlice;

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

/// The reference [`super::air_mask`]: air-density pixels (HU < [`AIR_HU`]) inside the patient's body contour, and
/// the gas among them (see the `lung_guard` module doc), pixel by pixel.
pub(super) fn air_mask(hu: &HuSlice) -> BodyAir {
    let (rows, cols) = (hu.rows, hu.cols);
    let min_spacing = hu.pixel_spacing[0].min(hu.pixel_spacing[1]);
    let r = if min_spacing > 0.0 { (BODY_OPEN_MM / min_spacing).round().max(1.0) as usize } else { 1 };
    let air: Vec<bool> = hu.hu.iter().map(|&v| v < AIR_HU).collect();
    let tissue: Vec<bool> = air.iter().map(|a| !a).collect();
    let opened = dilate(&erode(&tissue, rows, cols, r), rows, cols, r);
    let (labels, sizes) = label(&opened, rows, cols, false);
    let Some(body) = sizes.iter().enumerate().skip(1).max_by_key(|&(_, &n)| n).map(|(l, _)| l as u32) else {
        return BodyAir {
            air: BitMask::new(rows, cols),
            gas: BitMask::new(rows, cols),
            candidate: BitMask::new(rows, cols),
        };
    };
    let body_px: Vec<bool> = labels.iter().map(|&l| l == body).collect();
    let filled = fill_holes(&body_px, rows, cols);
    let inside: Vec<bool> = air.iter().zip(&filled).map(|(a, f)| *a && *f).collect();
    let gas: Vec<bool> = inside.iter().zip(&hu.hu).map(|(a, &v)| *a && v < GAS_HU).collect();
    let air = BitMask::from_bools(rows, cols, &inside);
    let gas = BitMask::from_bools(rows, cols, &gas);
    let candidate = non_gas_air(&air, &gas, hu.pixel_spacing);
    BodyAir { air, gas, candidate }
}

/// The air of one slice that is not gas: pure-gas cores (the gas mask opened by [`GAS_CORE_MM`]: noise speckles in
/// lung do not survive it) are taken out with a rim of [`GAS_RIM_MM`] (their partial-volume edge), then every
/// in-plane piece (8-connectivity) with more than [`MAX_GAS_FRACTION`] of pure gas left is dropped (gas pockets too
/// small or thin for a core).
pub(super) fn non_gas_air(air: &BitMask, gas: &BitMask, pixel_spacing: [f64; 2]) -> BitMask {
    let (rows, cols) = (air.rows, air.cols);
    let min_spacing = pixel_spacing[0].min(pixel_spacing[1]);
    let px = |mm: f64| if min_spacing > 0.0 { (mm / min_spacing).round() as usize } else { 0 };
    let gas = gas.to_bools();
    let mut air = air.to_bools();
    if gas.iter().any(|&g| g) {
        let r = px(GAS_CORE_MM).max(1);
        let mut core = dilate(&erode(&gas, rows, cols, r), rows, cols, r);
        // Only large cores (stomach, colon, trachea): the small cysts of a diseased or emphysematous lung stay.
        let (labels, sizes) = label(&core, rows, cols, false);
        let px_cm2 = pixel_spacing[0] * pixel_spacing[1] / 100.0;
        for (c, &l) in core.iter_mut().zip(&labels) {
            *c &= l != 0 && sizes[l as usize] as f64 * px_cm2 >= GAS_CORE_MIN_CM2;
        }
        if core.iter().any(|&c| c) {
            for (a, x) in air.iter_mut().zip(dilate(&core, rows, cols, px(GAS_RIM_MM))) {
                *a &= !x;
            }
        }
    }
    let (labels, sizes) = label(&air, rows, cols, true);
    let mut n_gas = vec![0usize; sizes.len()];
    for (&l, &g) in labels.iter().zip(&gas) {
        if l != 0 && g {
            n_gas[l as usize] += 1;
        }
    }
    let px_cm2 = pixel_spacing[0] * pixel_spacing[1] / 100.0;
    let keep: Vec<bool> = (0..sizes.len())
        .map(|l| sizes[l] as f64 * px_cm2 >= GAS_PIECE_MAX_CM2 || n_gas[l] as f64 <= MAX_GAS_FRACTION * sizes[l] as f64)
        .collect();
    let px: Vec<bool> = labels.iter().map(|&l| l != 0 && keep[l as usize]).collect();
    BitMask::from_bools(rows, cols, &px)
}
