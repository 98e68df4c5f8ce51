//! lung_guard::seed — one slice's seeding (step 4 of the `lung_guard` module doc) on bit rows and runs: what
//! [`super::guard`] runs at completion, where the alert waits for it, and [`super::pre_seed`] while slices stream in.
//!
//! The same rule as the pixel seeding it replaced (`lung_guard::pixels`, kept as the reference), computed without
//! visiting pixels one by one: components are labelled on horizontal runs (union-find across adjacent rows),
//! dilations are runs widened in-row then rows OR-ed together 64 pixels per word, overlaps are popcounts, and holes
//! are the runs of unset pixels not connected to the image border. Every step is integer or bit arithmetic, and the
//! one floating-point step (a small piece's centre) adds the same integers, so the masks are the reference's bit for
//! bit (unit tests `the_row_*`, and the RICORD series in `tests/lung_guard.rs`). On the RICORD series (248 slices
//! 512², 212 seeded at completion) the seeding at completion takes 30–50 ms on the 2-core box against the pixel
//! seeding's 360–830 ms (the same box and load, `RUST_LOG=lungsentry=debug lungsentry analyze`).
//!
//! Owns: [`seed_with`] (on the bit-row primitives of `lung_guard::plane`).
//! Hands on: (kept model lung, field, each small piece's centre and airway verdict in label order) to `guard_with`
//! and `pre_seed`.
//! Never: decides which air is kept (the 3D rule in `guard` does), or looks at HU.

use super::plane::{label_runs, runs_of, Plane};
use super::{radius_px, AIRWAY_MAX_CM2, NEAR_MM, SEED_DILATION_MM, WHOLE_OVERLAP_FRACTION};
use crate::analysis::{BitMask, PlacedSlice};

/// One slice's share of [`super::guard`]: the kept air `k` less airway pieces (the airway rule is `airway_at` of a
/// small piece's centre x, patient mm), dilated into the lung field, and the model lung components it seeds.
/// Returns (kept model lung, field, each small piece's centre x and verdict, label order).
pub(super) fn seed_with(
    s: &PlacedSlice,
    k: &BitMask,
    airway_at: &dyn Fn(f64) -> bool,
) -> (BitMask, BitMask, Vec<(f64, bool)>) {
    let seg = &s.segmentation;
    let (rows, cols) = (seg.rows, seg.cols);
    let k_runs = k.runs();
    if k_runs.is_empty() {
        return (BitMask::new(rows, cols), BitMask::new(rows, cols), Vec::new());
    }
    let px_cm2 = s.pixel_spacing[0] * s.pixel_spacing[1] / 100.0;

    // Airways out: small kept pieces (8-connectivity) near the mid-line. A piece's centre is the mean of its pixels'
    // image row and column: integer sums, exact in f64 whatever the order they are added in.
    let (air_label, pieces) = label_runs(&k_runs, true);
    let mut size = vec![0u64; pieces];
    let mut sum_row = vec![0u64; pieces];
    let mut sum_col = vec![0u64; pieces];
    for (&(r, a, b), &l) in k_runs.iter().zip(&air_label) {
        let n = (b - a + 1) as u64;
        size[l as usize] += n;
        sum_row[l as usize] += r as u64 * n;
        // a + … + b; (a + b) and (b − a + 1) have opposite parities, so the product is even.
        sum_col[l as usize] += (a + b) as u64 * n / 2;
    }
    let mut small_pieces = Vec::new();
    let airway: Vec<bool> = (0..pieces)
        .map(|l| {
            let n = size[l] as f64;
            if n * px_cm2 >= AIRWAY_MAX_CM2 {
                return false;
            }
            let x = s.point(sum_row[l] as f64 / n, sum_col[l] as f64 / n)[0];
            let verdict = airway_at(x);
            small_pieces.push((x, verdict));
            verdict
        })
        .collect();
    let air = runs_of(&k_runs, &air_label, |l| !airway[l as usize]);

    // The field, and the model's lung components (8-connectivity) it seeds.
    let field = Plane::dilated(rows, cols, &air, radius_px(s, SEED_DILATION_MM));
    let lung_runs = seg.lung.runs();
    let (model_label, components) = label_runs(&lung_runs, true);
    let mut model_size = vec![0usize; components];
    let mut overlap = vec![0usize; components];
    for (&(r, a, b), &l) in lung_runs.iter().zip(&model_label) {
        model_size[l as usize] += b - a + 1;
        overlap[l as usize] += field.count_in(r, a, b);
    }
    // A component with WHOLE_OVERLAP_FRACTION of its pixels in the field is kept whole; of the others, the pixels
    // within NEAR_MM of the kept air.
    let whole: Vec<bool> =
        (0..components).map(|l| overlap[l] as f64 >= WHOLE_OVERLAP_FRACTION * model_size[l] as f64).collect();
    let near = Plane::dilated(rows, cols, &air, radius_px(s, NEAR_MM));
    let mut kept = Plane::new(rows, cols);
    let mut partial = Plane::new(rows, cols);
    for (&(r, a, b), &l) in lung_runs.iter().zip(&model_label) {
        if whole[l as usize] {
            kept.set_run(r, a, b);
        } else {
            partial.set_run(r, a, b);
        }
    }
    partial.and(&near);
    kept.or(&partial);
    // Model pixels in the field or enclosed by the kept lung and the field (a lesion island the model set apart
    // inside a consolidation it called background) are kept too: the model within the field with its holes filled.
    let mut filled = kept.clone();
    filled.or(&field);
    let holes = filled.holes();
    filled.or(&holes);
    let mut model = Plane::new(rows, cols);
    for &(r, a, b) in &lung_runs {
        model.set_run(r, a, b);
    }
    model.and(&filled);
    kept.or(&model);
    (kept.to_bitmask(), field.to_bitmask(), small_pieces)
}
