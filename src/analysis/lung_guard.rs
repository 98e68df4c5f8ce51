//! lung_guard — the product rule that lung and lesion pixels count only where the CT's own HU anatomy has lung.
//!
//! A 2D model trained on chest slices reads abdomen slices of real scans as chest: bowel gas and stomach air as
//! lung, liver, spleen and bowel wall as lesion (issue 26). This module checks the model's masks against the air
//! the scan itself shows, in 3D over the whole series, at completion. Rule, constants and measurements:
//! `models/MODEL_CARD.md`, "Lung guard (product rule)".
//!
//! Owns:
//! - [`air_mask`] (per slice, computed on the CPU from the HU slice wherever a [`SliceSegmentation`] is made, so
//!   the GPU kernels need no change): [`BodyAir`], the air-density pixels (HU < [`AIR_HU`]) inside the patient's
//!   body contour, and the pure gas among them (HU < [`GAS_HU`]). The body is the largest 4-connected tissue
//!   component after an opening of [`BODY_OPEN_MM`] (which cuts a thin table shell, blankets and leads off the
//!   patient), holes filled: the air around the patient and inside a table cradle is not "inside".
//! - [`guard`] (per series, slices in position order):
//!   1. per slice, the air that is not gas: pure-gas cores (gas opened by [`GAS_CORE_MM`]) are taken out with a rim
//!      of [`GAS_RIM_MM`], then in-plane pieces with more than [`MAX_GAS_FRACTION`] of pure gas are dropped —
//!      bowel and stomach gas and airway lumens, before any 3D linking, so a gas-filled colon or a stomach bubble
//!      touching a lung base does not join the lung;
//!   2. 3D components of the rest (8-connectivity in-plane, 26 across adjacent slices, as the lesion components);
//!      a component is lung when its volume is at least [`MIN_COMPONENT_FRACTION`] of the largest one **and** at
//!      least `min(`[`MIN_LUNG_ML`]`, `[`MIN_SECTION_CM2`]` × series extent)` (the second term is what a series too
//!      thin for a 3D volume, a single slice, is held to: a cross-section of 10 cm²);
//!   3. airways: a kept in-plane piece smaller than [`AIRWAY_MAX_CM2`] whose centre lies within
//!      [`AIRWAY_MIDLINE_MM`] of the kept air's mid-line (trachea, main bronchi, oesophageal air that is not pure
//!      gas) is not lung field;
//!   4. the lung field is the kept air dilated by [`SEED_DILATION_MM`]. A 2D component (8-connectivity) of the
//!      model's lung mask (lesion included) with at least [`WHOLE_OVERLAP_FRACTION`] of its pixels in the field is
//!      kept **whole**; of the other components only the pixels within [`NEAR_MM`] of the kept air are kept.
//!      Keeping whole components is how the field is closed: a dense consolidation against the heart or the
//!      chest wall has no air, but the model labels it together with the aerated lung it borders, so it stays in
//!      (a closing or hull of the air would have to guess how thick a consolidation may be). Model pixels in a
//!      hole of (kept lung ∪ field) are kept too (hole filling: a lesion island the model set apart inside a
//!      consolidation it called background). An abdominal blob that only touches a thin costophrenic recess keeps
//!      only its edge;
//!   5. a slice with no kept air keeps no lung and no lesion.
//! - [`pre_seed`] (per slice, while the series streams in): step 4 done ahead on the assumption that all of the
//!   slice's air will be kept, with the small pieces' airway verdicts under a provisional mid-line; [`guard`] takes
//!   it only where that assumption and every verdict hold at completion (then it is exactly step 4's result), so
//!   the completion step that the alert waits for seeds only the other slices (34 of 300 on the 300-slice phantom).
//!
//! Complements `plausible_lungs` (the model-shape rule in `analysis`), which it does not replace: the guard runs
//! first, on HU anatomy; `plausible_lungs` then drops small isolated lung-labelled 3D components of what the guard
//! kept. Lesion pixels outside the kept lungs do not count, so guarding the lung masks guards the lesions.
//! Hands on: the guarded lung masks and the lung field (position order) and a [`LungGuardReport`] (in the result
//! JSON as `lung_guard`) to `analyse_series`.
//! Never: changes the model's masks while streaming (the pre-seed is kept beside them), runs the model, or adds a
//! pixel the model did not label; applies
//! when a slice has no air mask (masks made without HU: the series is analysed as before).
//!
//! [`SliceSegmentation`]: super::SliceSegmentation

use serde::{Deserialize, Serialize};

use super::{components_3d, BitMask, PlacedSlice, Run, RunMask};
use crate::preprocess::HuSlice;

/// Air density, HU: below it a pixel is air or aerated lung. Normal lung is about −850 HU, ground glass −700 to
/// −300, fat −100: −400 keeps the lung with its partial-volume rim and never takes fat or soft tissue.
pub const AIR_HU: f32 = -400.0;
/// Pure gas, HU: air-density voxels below it are gas rather than aerated lung. Lung parenchyma (about −850 HU, with
/// vessels and partial volume) has almost none (0–5 % of its air voxels on every real series and slice here); bowel
/// and stomach gas has 25–65 % (partial volume and noise put the rest above).
pub const GAS_HU: f32 = -950.0;
/// Radius of the opening applied to the tissue mask before the body is picked, mm: structures thinner than about
/// twice this (table shell, mattress skin, blankets, ECG leads) do not join the patient to the table.
pub const BODY_OPEN_MM: f64 = 2.0;
/// A 3D air component (of the non-gas air) is lung only if its volume is at least this fraction of the largest
/// component's.
pub const MIN_COMPONENT_FRACTION: f64 = 0.05;
/// … and at least this volume, mL (non-gas bowel air in the trimmed real series: at most ~30 mL; a chest's
/// lungs: litres).
pub const MIN_LUNG_ML: f64 = 40.0;
/// … or, for a series too short for [`MIN_LUNG_ML`] to be reachable, this cross-section times the series extent
/// (one slice: one slice thickness): cm². Lungs on a chest slice are tens of cm² each; gas loops at kidney level a
/// few cm².
pub const MIN_SECTION_CM2: f64 = 10.0;
/// Pure-gas cores: the gas mask opened with this radius, mm (a core is at least about twice this across; noise
/// speckles in lung are not cores).
pub const GAS_CORE_MM: f64 = 2.5;
/// … when at least this large, cm² (a stomach bubble, a colon pocket, the trachea; the cysts of a diseased or
/// emphysematous lung are smaller and stay).
pub const GAS_CORE_MIN_CM2: f64 = 1.0;
/// … taken out of the air with this rim, mm (their partial-volume edge, and the diaphragm between a stomach bubble
/// and the lung it touches in-plane).
pub const GAS_RIM_MM: f64 = 5.0;
/// An in-plane air piece (after the gas cores are out) with more than this fraction of its pixels below [`GAS_HU`]
/// is gas (a bowel pocket too small or thin for a core), not lung, whatever its size. Noisy lung has up to 20 %
/// (phantoms), real lung 0–7 %. (Lungs with very severe emphysema read partly as gas: a known limit.)
pub const MAX_GAS_FRACTION: f64 = 0.3;
/// … tested on pieces smaller than this only, cm² (a large piece with that much gas and no large core is lung with
/// many small cysts, not bowel).
pub const GAS_PIECE_MAX_CM2: f64 = 20.0;
/// A kept in-plane air piece smaller than this (cm²) near the mid-line is airway, not lung field.
pub const AIRWAY_MAX_CM2: f64 = 4.0;
/// "Near the mid-line": centre within this distance (mm, patient x) of the kept air's mid-line on the series.
pub const AIRWAY_MIDLINE_MM: f64 = 25.0;
/// The lung field is the kept air dilated by this, mm (reaches the lung's partial-volume rim and pixels the model
/// labels just outside the air).
pub const SEED_DILATION_MM: f64 = 3.0;
/// A model lung component (8-connectivity, lesion included) with at least this fraction of its pixels in the lung
/// field is kept whole (aerated lung with the consolidation it borders); of the others only the pixels within
/// [`NEAR_MM`] of the kept air (an abdominal blob touching a lung base's thin costophrenic recess keeps only its
/// edge; a small lesion island the model set apart from the lung it lies in keeps all of itself).
pub const WHOLE_OVERLAP_FRACTION: f64 = 0.2;
/// See [`WHOLE_OVERLAP_FRACTION`], mm.
pub const NEAR_MM: f64 = 15.0;

/// One slice's air: inside the body, within it pure gas, and the air that is not gas (the guard's per-slice input,
/// the only part a slice keeps until completion).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BodyAir {
    /// Air-density pixels (HU < [`AIR_HU`]) inside the body contour.
    pub air: BitMask,
    /// The part of `air` below [`GAS_HU`].
    pub gas: BitMask,
    /// `air` without its gas pieces (see `non_gas_air`): what the guard links in 3D (`SliceSegmentation::air`). It
    /// depends on this slice only, so it is made while the series streams in, not at completion, where the alert
    /// waits for the guard.
    pub candidate: BitMask,
}

/// What the guard did to a series (the result JSON's `lung_guard`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LungGuardReport {
    /// Whether the guard ran (false when a slice has no air mask, e.g. masks made without HU).
    pub applied: bool,
    /// 3D air components inside the body.
    pub air_components: usize,
    /// Of them, kept as lung.
    pub lung_components: usize,
    /// Volume of the kept air (airways included), mL.
    pub lung_air_ml: f64,
    /// Slices (position order) with a lung field.
    pub slices_with_lung_field: usize,
    /// Model lung (lesion included) dropped by the guard, mL.
    pub removed_lung_ml: f64,
    /// The figures without the guard (`plausible_lungs` only), for comparison: lung volume, mL.
    pub unguarded_lung_volume_ml: f64,
    /// Surviving lesion volume without the guard, mL.
    pub unguarded_lesion_volume_ml: f64,
    /// Involvement without the guard, %.
    pub unguarded_involvement_percent: f64,
}

/// The guard's outcome for a series.
#[derive(Debug, Clone)]
pub struct Guarded {
    /// Model lung masks restricted to the components the field seeds, position order.
    pub lung: Vec<BitMask>,
    /// The lung field per slice (kept air, airways out, dilated), position order.
    pub field: Vec<BitMask>,
    /// What was done (the `unguarded_*` figures are filled in by the caller).
    pub report: LungGuardReport,
}

/// Air-density pixels (HU < [`AIR_HU`]) inside the patient's body contour, and the gas among them (see the
/// module doc).
pub fn air_mask(hu: &HuSlice) -> BodyAir {
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

/// The guard over a series' slices in position order (`None` when a slice has no air mask). `voxel_ml` gives a
/// slice's voxel volume; `spacing` is the series' voxel depth, mm.
pub fn guard(sorted: &[&PlacedSlice], voxel_ml: impl Fn(&PlacedSlice) -> f64, spacing: f64) -> Option<Guarded> {
    // Per slice, the air that is not gas (see `non_gas_air`, made with the slice), before any 3D linking: a
    // gas-filled colon touching a lung base across slices, or a stomach bubble touching it in-plane, does not join
    // the lung.
    let candidates: Vec<&BitMask> = sorted.iter().map(|s| s.segmentation.air.as_ref()).collect::<Option<_>>()?;
    for (s, a) in sorted.iter().zip(&candidates) {
        if (a.rows, a.cols) != (s.segmentation.rows, s.segmentation.cols) {
            return None;
        }
    }
    let mut report = LungGuardReport { applied: true, ..Default::default() };
    let t0 = std::time::Instant::now();

    // 3D components of what is left, and the size rules.
    let mut runs: Vec<Run> = Vec::new();
    let mut slice_runs: Vec<Vec<u32>> = Vec::with_capacity(sorted.len());
    for (si, a) in candidates.iter().enumerate() {
        let mut idx = Vec::new();
        for (r, c0, c1) in a.runs() {
            idx.push(runs.len() as u32);
            runs.push(Run { slice: si, row: r, start: c0, end: c1, hu_sum: 0.0 });
        }
        slice_runs.push(idx);
    }
    let mut dsu = components_3d(sorted, &runs, &slice_runs);
    // Per component, indexed by its root (a run index): volume, then whether it is kept.
    let roots: Vec<u32> = (0..runs.len() as u32).map(|i| dsu.find(i)).collect();
    let mut volume = vec![0f64; runs.len()];
    for (run, &root) in runs.iter().zip(&roots) {
        volume[root as usize] += (run.end - run.start + 1) as f64 * voxel_ml(sorted[run.slice]);
    }
    let components: Vec<usize> = (0..runs.len()).filter(|&i| roots[i] == i as u32).collect();
    let largest = components.iter().map(|&r| volume[r]).fold(0.0, f64::max);
    let extent_cm = sorted.len() as f64 * spacing / 10.0;
    let min_ml = MIN_LUNG_ML.min(MIN_SECTION_CM2 * extent_cm).max(MIN_COMPONENT_FRACTION * largest);
    let mut keep = vec![false; runs.len()];
    for &r in &components {
        keep[r] = volume[r] > 0.0 && volume[r] >= min_ml;
    }
    report.air_components = components.len();
    report.lung_components = components.iter().filter(|&&r| keep[r]).count();
    report.lung_air_ml = components.iter().filter(|&&r| keep[r]).map(|&r| volume[r]).sum();

    let mut kept: Vec<BitMask> =
        sorted.iter().map(|s| BitMask::new(s.segmentation.rows, s.segmentation.cols)).collect();
    let (mut min_x, mut max_x) = (f64::INFINITY, f64::NEG_INFINITY);
    for (run, &root) in runs.iter().zip(&roots) {
        if keep[root as usize] {
            let cols = kept[run.slice].cols;
            kept[run.slice].set_range(run.row * cols + run.start, run.row * cols + run.end + 1);
            for c in [run.start, run.end] {
                let x = sorted[run.slice].point(run.row as f64, c as f64)[0];
                min_x = min_x.min(x);
                max_x = max_x.max(x);
            }
        }
    }
    let midline_x = (min_x + max_x) / 2.0;

    // A slice whose air was all kept may have been seeded already (see `PreSeed`).
    let mut all_kept = vec![true; sorted.len()];
    for (run, &root) in runs.iter().zip(&roots) {
        if !keep[root as usize] {
            all_kept[run.slice] = false;
        }
    }
    let t_seed = std::time::Instant::now();
    let per_slice = par_map(&kept, |si, k| {
        let s = sorted[si];
        match &s.segmentation.pre_seed {
            Some(p) if all_kept[si] && p.holds_for(midline_x) => (p.lung.to_bitmask(), p.field.to_bitmask(), true),
            _ => {
                let (lung, field) = seed(s, k, midline_x);
                (lung, field, false)
            }
        }
    });
    tracing::debug!(
        components_ms = (t_seed - t0).as_secs_f64() * 1e3,
        seed_ms = t_seed.elapsed().as_secs_f64() * 1e3,
        air_runs = runs.len(),
        pre_seeded = per_slice.iter().filter(|p| p.2).count(),
        slices = sorted.len(),
        air_not_all_kept = all_kept.iter().filter(|a| !**a).count(),
        airway_verdict_changed =
            sorted.iter().filter(|s| s.segmentation.pre_seed.as_ref().is_some_and(|p| !p.holds_for(midline_x))).count(),
        "lung guard: 3D air components, per-slice seeding"
    );
    let mut lung = Vec::with_capacity(sorted.len());
    let mut field = Vec::with_capacity(sorted.len());
    for (s, (kept_lung, f, _)) in sorted.iter().zip(per_slice) {
        report.removed_lung_ml += (s.segmentation.lung.count() - kept_lung.count()) as f64 * voxel_ml(*s);
        report.slices_with_lung_field += (f.count() > 0) as usize;
        lung.push(kept_lung);
        field.push(f);
    }
    Some(Guarded { lung, field, report })
}

/// One slice's share of [`guard`]: the kept air `k` less airway pieces, dilated into the lung field, and the model
/// lung components it seeds (see the module doc). Returns (kept model lung, field).
///
/// The work is done in a window: the bounding box of the kept air and the model lung, widened by the largest
/// dilation radius plus one pixel (clamped to the image). The result is the full-image one exactly: every
/// dilation of the air stays inside the window, the model's components lie inside it, and the unset margin
/// connects to the image border around it, so hole filling sees the same outside (a lung slice is a third of the
/// image or less: the guard at completion, where the alert waits for it, does a third of the pixel work).
fn seed(s: &PlacedSlice, k: &BitMask, midline_x: f64) -> (BitMask, BitMask) {
    let (lung, field, _) = seed_with(s, k, &|x| is_airway(x, midline_x));
    (lung, field)
}

/// [`seed`] with the airway rule as a function of a small piece's centre x (patient mm); also returns the
/// small pieces' centres and what the rule said of each (label order), which is what a [`PreSeed`] checks.
fn seed_with(s: &PlacedSlice, k: &BitMask, airway: &dyn Fn(f64) -> bool) -> (BitMask, BitMask, Vec<(f64, bool)>) {
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

/// The airway rule for a small in-plane piece of kept air whose centre is at patient x `x`, mm.
fn is_airway(x: f64, midline_x: f64) -> bool {
    (x - midline_x).abs() < AIRWAY_MIDLINE_MM
}

/// One slice's seeding done while the series streams in, on the assumption the 3D decision will keep all of its
/// air (true of every chest slice whose air is all lung), so that completion, where the alert waits, only checks
/// it. The seeding is a function of the kept air, the model lung and which small air pieces are airways; the
/// airway rule needs the series' mid-line, unknown until completion, so the small pieces' centres are kept with
/// what a provisional mid-line (the slice's own air's) made of them. [`guard`] uses the pre-seed only when the
/// slice's air was all kept **and** the series' mid-line gives every small piece the same verdict: the masks
/// are then those [`seed`] would make, bit for bit (unit test
/// `a_pre_seed_is_used_only_where_it_equals_the_seed`); otherwise it seeds the slice again.
#[derive(Debug, Clone, PartialEq)]
pub struct PreSeed {
    /// Centre x (patient mm) of each small in-plane piece of the slice's air, and whether the provisional
    /// mid-line made it an airway.
    small_pieces: Vec<(f64, bool)>,
    /// The kept model lung on that assumption.
    lung: RunMask,
    /// The lung field on that assumption.
    field: RunMask,
}

impl PreSeed {
    /// Whether the series' mid-line `midline_x` judges every small piece as the provisional one did.
    fn holds_for(&self, midline_x: f64) -> bool {
        self.small_pieces.iter().all(|&(x, airway)| is_airway(x, midline_x) == airway)
    }
}

/// The [`PreSeed`] of a slice (`None` without an air mask): [`seed`] with all of the slice's air kept and the
/// mid-line of that air.
pub fn pre_seed(s: &PlacedSlice) -> Option<PreSeed> {
    let air = s.segmentation.air.as_ref()?;
    if (air.rows, air.cols) != (s.segmentation.rows, s.segmentation.cols) {
        return None;
    }
    let (mut min_x, mut max_x) = (f64::INFINITY, f64::NEG_INFINITY);
    for (r, c0, c1) in air.runs() {
        for c in [c0, c1] {
            let x = s.point(r as f64, c as f64)[0];
            min_x = min_x.min(x);
            max_x = max_x.max(x);
        }
    }
    let provisional = (min_x + max_x) / 2.0;
    let (lung, field, small_pieces) = seed_with(s, air, &|x| is_airway(x, provisional));
    Some(PreSeed { small_pieces, lung: RunMask::from_bitmask(&lung), field: RunMask::from_bitmask(&field) })
}

/// A rectangle of a slice: its first row and column and its size.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    r0: usize,
    c0: usize,
    rows: usize,
    cols: usize,
}

/// Dilation radius in pixels of `mm` on this slice (the smaller pixel spacing).
fn radius_px(s: &PlacedSlice, mm: f64) -> usize {
    let min_spacing = s.pixel_spacing[0].min(s.pixel_spacing[1]);
    if min_spacing > 0.0 {
        (mm / min_spacing).round() as usize
    } else {
        0
    }
}

/// [`seed`] within `w`, which must hold every run of `k_runs` (kept air) and `lung_runs` (model lung) with a
/// margin of the largest dilation radius plus one pixel, or be the whole slice.
#[cfg(test)]
fn seed_in(
    s: &PlacedSlice,
    k_runs: &[(usize, usize, usize)],
    lung_runs: &[(usize, usize, usize)],
    midline_x: f64,
    w: Window,
) -> (BitMask, BitMask) {
    let (lung, field, _) = seed_in_with(s, k_runs, lung_runs, &|x| is_airway(x, midline_x), w);
    (lung, field)
}

/// [`seed_in`] with the airway rule as a function of a small piece's centre x; also returns each small piece's
/// centre and verdict (label order).
fn seed_in_with(
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

/// The air of one slice that is not gas: pure-gas cores (the gas mask opened by [`GAS_CORE_MM`]: noise speckles in
/// lung do not survive it) are taken out with a rim of [`GAS_RIM_MM`] (their partial-volume edge), then every
/// in-plane piece (8-connectivity) with more than [`MAX_GAS_FRACTION`] of pure gas left is dropped (gas pockets too
/// small or thin for a core).
fn non_gas_air(air: &BitMask, gas: &BitMask, pixel_spacing: [f64; 2]) -> BitMask {
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

/// `f` over `items` on up to 8 scoped threads (slices are independent; the guard runs at completion, where the
/// alert waits for it).
fn par_map<T: Sync, U: Send>(items: &[T], f: impl Fn(usize, &T) -> U + Sync) -> Vec<U> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
    if threads == 1 || items.len() < 2 {
        return items.iter().enumerate().map(|(i, t)| f(i, t)).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .enumerate()
            .map(|(ci, part)| {
                scope.spawn(move || part.iter().enumerate().map(|(i, t)| f(ci * chunk + i, t)).collect::<Vec<U>>())
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("lung guard worker panicked")).collect()
    })
}

/// Square dilation (Chebyshev radius `r`) of a rows×cols mask: separable, prefix counts per line.
fn dilate(m: &[bool], rows: usize, cols: usize, r: usize) -> Vec<bool> {
    if r == 0 || rows == 0 || cols == 0 {
        return m.to_vec();
    }
    // Horizontal: a running count of set pixels in the window [c − r, c + r] of each row.
    let mut h = vec![false; rows * cols];
    for (src, dst) in m.chunks_exact(cols).zip(h.chunks_exact_mut(cols)) {
        let mut n = src[..r.min(cols)].iter().filter(|&&b| b).count();
        for c in 0..cols {
            if c + r < cols && src[c + r] {
                n += 1;
            }
            if c > r && src[c - r - 1] {
                n -= 1;
            }
            dst[c] = n > 0;
        }
    }
    // Vertical: the same per column, rows streamed in order (one count per column).
    let mut out = vec![false; rows * cols];
    let mut n = vec![0u32; cols];
    for row in 0..r.min(rows) {
        for (k, &b) in n.iter_mut().zip(&h[row * cols..(row + 1) * cols]) {
            *k += b as u32;
        }
    }
    for row in 0..rows {
        if row + r < rows {
            for (k, &b) in n.iter_mut().zip(&h[(row + r) * cols..(row + r + 1) * cols]) {
                *k += b as u32;
            }
        }
        if row > r {
            for (k, &b) in n.iter_mut().zip(&h[(row - r - 1) * cols..(row - r) * cols]) {
                *k -= b as u32;
            }
        }
        for (o, &k) in out[row * cols..(row + 1) * cols].iter_mut().zip(&n) {
            *o = k > 0;
        }
    }
    out
}

/// Square erosion: the complement of the dilation of the complement (outside the image counts as set).
fn erode(m: &[bool], rows: usize, cols: usize, r: usize) -> Vec<bool> {
    let inv: Vec<bool> = m.iter().map(|b| !b).collect();
    dilate(&inv, rows, cols, r).into_iter().map(|b| !b).collect()
}

/// Connected components of the set pixels (4- or 8-connectivity): a label per pixel (0 = unset, components from
/// 1) and each label's pixel count (index 0 unused).
fn label(m: &[bool], rows: usize, cols: usize, eight: bool) -> (Vec<u32>, Vec<usize>) {
    let mut labels = vec![0u32; rows * cols];
    let mut sizes = vec![0usize];
    let mut stack = Vec::new();
    for start in 0..rows * cols {
        if !m[start] || labels[start] != 0 {
            continue;
        }
        let l = sizes.len() as u32;
        sizes.push(0);
        labels[start] = l;
        stack.push(start);
        while let Some(i) = stack.pop() {
            sizes[l as usize] += 1;
            let (r, c) = ((i / cols) as isize, (i % cols) as isize);
            for (dr, dc) in [(-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)]
                .into_iter()
                .take(if eight { 8 } else { 4 })
            {
                let (nr, nc) = (r + dr, c + dc);
                if nr < 0 || nc < 0 || nr >= rows as isize || nc >= cols as isize {
                    continue;
                }
                let j = nr as usize * cols + nc as usize;
                if m[j] && labels[j] == 0 {
                    labels[j] = l;
                    stack.push(j);
                }
            }
        }
    }
    (labels, sizes)
}

/// The mask with its holes filled: every unset pixel not 4-connected to the image border through unset pixels.
fn fill_holes(m: &[bool], rows: usize, cols: usize) -> Vec<bool> {
    let mut outside = vec![false; rows * cols];
    if rows == 0 || cols == 0 {
        return m.to_vec();
    }
    let mut stack: Vec<usize> = Vec::new();
    let seed = |i: usize, outside: &mut Vec<bool>, stack: &mut Vec<usize>| {
        if !m[i] && !outside[i] {
            outside[i] = true;
            stack.push(i);
        }
    };
    for c in 0..cols {
        seed(c, &mut outside, &mut stack);
        seed((rows - 1) * cols + c, &mut outside, &mut stack);
    }
    for r in 0..rows {
        seed(r * cols, &mut outside, &mut stack);
        seed(r * cols + cols - 1, &mut outside, &mut stack);
    }
    while let Some(i) = stack.pop() {
        let (r, c) = (i / cols, i % cols);
        if r > 0 {
            seed(i - cols, &mut outside, &mut stack);
        }
        if r + 1 < rows {
            seed(i + cols, &mut outside, &mut stack);
        }
        if c > 0 {
            seed(i - 1, &mut outside, &mut stack);
        }
        if c + 1 < cols {
            seed(i + 1, &mut outside, &mut stack);
        }
    }
    outside.into_iter().map(|o| !o).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{analyse_series, AnalysisParams, SliceSegmentation};

    const N: usize = 64;
    /// Pixel spacing of the synthetic slices, mm (a 320 mm field; one pixel = 0.25 cm²).
    const PX_MM: f64 = 5.0;

    fn ellipse(r: usize, c: usize, (cr, cc, ar, ac): (f64, f64, f64, f64)) -> bool {
        ((r as f64 - cr) / ar).powi(2) + ((c as f64 - cc) / ac).powi(2) < 1.0
    }
    const BODY: (f64, f64, f64, f64) = (32.0, 32.0, 27.0, 30.0);
    const RIGHT_LUNG: (f64, f64, f64, f64) = (32.0, 18.0, 14.0, 9.0);
    const LEFT_LUNG: (f64, f64, f64, f64) = (32.0, 46.0, 14.0, 9.0);

    /// A consolidation against the right lung's lateral-posterior wall: dense (no air), labelled lesion.
    fn consolidation(r: usize, c: usize) -> bool {
        ellipse(r, c, RIGHT_LUNG) && r >= 38 && c <= 18
    }

    fn hu_slice(f: impl Fn(usize, usize) -> f32) -> HuSlice {
        let mut s = HuSlice::from_hu(N, N, (0..N * N).map(|i| f(i / N, i % N)).collect());
        s.pixel_spacing = [PX_MM, PX_MM];
        s
    }

    /// A chest slice: body, two aerated lungs (−850 HU) with a dense consolidation in the right one.
    fn chest_hu() -> HuSlice {
        hu_slice(|r, c| {
            if consolidation(r, c) {
                30.0
            } else if ellipse(r, c, RIGHT_LUNG) || ellipse(r, c, LEFT_LUNG) {
                -850.0
            } else if ellipse(r, c, BODY) {
                40.0
            } else {
                -1000.0
            }
        })
    }

    /// A slice below the lungs: body with a 3×3 gas pocket (2.25 cm²) at −900 HU (air density, not pure gas: a small
    /// pocket in a thick slice), so that only the size rules can drop it.
    fn gas(r: usize, c: usize) -> bool {
        (20..23).contains(&r) && (30..33).contains(&c)
    }
    fn abdomen_hu() -> HuSlice {
        hu_slice(|r, c| {
            if gas(r, c) {
                -900.0
            } else if ellipse(r, c, BODY) {
                40.0
            } else {
                -1000.0
            }
        })
    }

    fn mask(f: impl Fn(usize, usize) -> bool) -> Vec<bool> {
        (0..N * N).map(|i| f(i / N, i % N)).collect()
    }

    fn placed(z: f64, hu: &HuSlice, lung: Vec<bool>, lesion: Vec<bool>) -> PlacedSlice {
        let lung: Vec<bool> = lung.iter().zip(&lesion).map(|(a, b)| *a || *b).collect();
        let lesion = BitMask::from_bools(N, N, &lesion);
        PlacedSlice {
            segmentation: SliceSegmentation {
                rows: N,
                cols: N,
                lung: BitMask::from_bools(N, N, &lung),
                lesion_hu: vec![0.0; lesion.count()],
                lesion,
                max_lesion_probability: 0.5,
                air: Some(air_mask(hu).candidate),
                pre_seed: None,
            },
            position_mm: z,
            image_position: [0.0, 0.0, z],
            image_orientation: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            pixel_spacing: [PX_MM, PX_MM],
            slice_thickness: Some(PX_MM),
        }
    }

    /// The model's view of a chest slice: both lungs with the consolidation as lesion.
    fn chest(z: f64) -> PlacedSlice {
        let lungs = mask(|r, c| ellipse(r, c, RIGHT_LUNG) || ellipse(r, c, LEFT_LUNG));
        placed(z, &chest_hu(), lungs, mask(consolidation))
    }

    /// The model's mistake on an abdomen slice: the gas read as lung, the wall around it as lesion.
    fn abdomen(z: f64) -> PlacedSlice {
        let wall = mask(|r, c| (18..25).contains(&r) && (28..35).contains(&c) && !gas(r, c));
        placed(z, &abdomen_hu(), mask(gas), wall)
    }

    fn params() -> AnalysisParams {
        AnalysisParams { min_lesion_volume_ml: 0.0, positive_threshold_percent: 0.4 }
    }

    #[test]
    fn air_mask_is_the_air_inside_the_body_not_around_it_nor_in_the_table() {
        // The chest slice on a table: a 1-pixel table top touching the body, and a cradle below it enclosing air.
        let base = chest_hu();
        let hu = hu_slice(|r, c| {
            let table = r == 59 || r == 63 || ((59..=63).contains(&r) && (c == 4 || c == 59));
            if table && (4..=59).contains(&c) {
                200.0
            } else {
                base.hu[r * N + c]
            }
        });
        let air = air_mask(&hu).air;
        for r in 0..N {
            for c in 0..N {
                let lung = (ellipse(r, c, RIGHT_LUNG) || ellipse(r, c, LEFT_LUNG)) && !consolidation(r, c);
                assert_eq!(air.get(r, c), lung, "pixel ({r}, {c})");
            }
        }
        // Without the opening the cradle would be a hole of the body joined to the table: it is air, enclosed.
        assert!(hu.hu[61 * N + 30] < AIR_HU);
        // No body at all (an empty field of view): no air inside.
        assert_eq!(air_mask(&hu_slice(|_, _| -1000.0)).air.count(), 0);
        // Gas is the part below −950 HU.
        let pocket = air_mask(&abdomen_hu());
        assert_eq!((pocket.air.count(), pocket.gas.count()), (9, 0));
        let pure = hu_slice(|r, c| if gas(r, c) || !ellipse(r, c, BODY) { -1000.0 } else { 40.0 });
        assert_eq!((air_mask(&pure).air.count(), air_mask(&pure).gas.count()), (9, 9));
        assert_eq!(air_mask(&chest_hu()).gas.count(), 0);
    }

    #[test]
    fn lungs_are_kept_whole_with_their_consolidation_and_abdomen_slices_lose_lung_and_lesion() {
        // Abdomen slices z = 0..25, chest slices z = 30..70 (5 mm apart).
        let slices: Vec<PlacedSlice> =
            (0..15).map(|k| if k < 6 { abdomen(k as f64 * 5.0) } else { chest(k as f64 * 5.0) }).collect();
        let sorted: Vec<&PlacedSlice> = slices.iter().collect();
        let voxel_ml = |s: &PlacedSlice| s.pixel_spacing[0] * s.pixel_spacing[1] * 5.0 / 1000.0;
        let g = guard(&sorted, voxel_ml, 5.0).expect("every slice has an air mask");
        // Two lungs (9 slices each, ~0.5 L) kept; the gas pocket (6 slices × 2.25 cm² × 0.5 cm = 6.75 mL) is not.
        assert_eq!((g.report.air_components, g.report.lung_components), (3, 2), "{:?}", g.report);
        for (k, s) in slices.iter().enumerate() {
            if k < 6 {
                assert_eq!(g.lung[k].count(), 0, "abdomen slice {k}");
                assert_eq!(g.field[k].count(), 0, "abdomen slice {k}");
            } else {
                // The consolidation has no air; it is kept because the model labels it with the lung it borders.
                assert_eq!(g.lung[k], s.segmentation.lung, "chest slice {k}");
                assert!(mask(consolidation).iter().enumerate().any(|(i, &b)| b && !g.field[k].get_index(i)));
            }
        }
        assert_eq!(g.report.slices_with_lung_field, 9);
        assert!((g.report.removed_lung_ml - 6.0 * 49.0 * 0.125).abs() < 1e-9, "{:?}", g.report);

        let r = analyse_series(&slices, &params());
        let consolidation_ml = 9.0 * mask(consolidation).iter().filter(|&&b| b).count() as f64 * 0.125;
        assert!((r.lesion_volume_ml - consolidation_ml).abs() < 1e-9, "{} vs {consolidation_ml}", r.lesion_volume_ml);
        assert_eq!(r.lesions.len(), 1);
        assert!(r.lung_guard.applied);
        assert!((r.lung_guard.unguarded_lesion_volume_ml - consolidation_ml - 6.0 * 40.0 * 0.125).abs() < 1e-9);
        assert!(r.lung_guard.unguarded_involvement_percent > r.involvement_percent);
        assert!(r.positive_slices.iter().all(|&k| k >= 6));
    }

    #[test]
    fn a_pre_seed_is_used_only_where_it_equals_the_seed() {
        let voxel_ml = |s: &PlacedSlice| s.pixel_spacing[0] * s.pixel_spacing[1] * 5.0 / 1000.0;
        let run = |slices: &[PlacedSlice]| guard(&slices.iter().collect::<Vec<_>>(), voxel_ml, 5.0).unwrap();
        // Abdomen slices (their gas pocket is not kept: not all of their air is lung) below chest slices.
        let plain: Vec<PlacedSlice> =
            (0..15).map(|k| if k < 6 { abdomen(k as f64 * 5.0) } else { chest(k as f64 * 5.0) }).collect();
        let mut pre = plain.clone();
        for s in &mut pre {
            s.segmentation.pre_seed = pre_seed(s);
            assert!(s.segmentation.pre_seed.is_some());
        }
        let (g0, g1) = (run(&plain), run(&pre));
        assert_eq!((&g0.lung, &g0.field, &g0.report), (&g1.lung, &g1.field, &g1.report), "same masks either way");
        // Which slices used theirs: a marked pre-seed (its field is one corner pixel) shows it. On slice 10 the
        // marked pre-seed also claims a small piece the series' mid-line judges otherwise.
        let mut marked = plain.clone();
        for (k, s) in marked.iter_mut().enumerate() {
            let mut p = pre_seed(s).unwrap();
            let mut corner = BitMask::new(N, N);
            corner.set(0, 0, true);
            p.field = RunMask::from_bitmask(&corner);
            if k == 10 {
                p.small_pieces.push((1e6, true));
            }
            s.segmentation.pre_seed = Some(p);
        }
        let g2 = run(&marked);
        for k in 0..15 {
            let used = g2.field[k].get(0, 0);
            assert_eq!(used, k >= 6 && k != 10, "slice {k}");
            if !used {
                assert_eq!(g2.field[k], g0.field[k], "slice {k} seeded again");
            }
        }
        // The provisional verdicts hold only for a mid-line that judges every small piece the same.
        let p = PreSeed {
            small_pieces: vec![(0.0, true), (100.0, false)],
            lung: RunMask::from_bitmask(&BitMask::new(1, 1)),
            field: RunMask::from_bitmask(&BitMask::new(1, 1)),
        };
        assert!(p.holds_for(0.0) && p.holds_for(AIRWAY_MIDLINE_MM * 0.5));
        assert!(!p.holds_for(AIRWAY_MIDLINE_MM * 1.5), "the first piece is no longer an airway");
        assert!(!p.holds_for(100.0), "the second one becomes one");
    }

    #[test]
    fn single_slices_a_chest_keeps_its_lungs_an_abdomen_gets_nothing() {
        let r = analyse_series(&[chest(0.0)], &params());
        assert!(r.lung_guard.applied);
        assert_eq!(r.lung_masks[0], chest(0.0).segmentation.lung);
        assert!(r.lesion_volume_ml > 0.0);
        let r = analyse_series(&[abdomen(0.0)], &params());
        assert!(r.lung_guard.applied);
        assert_eq!((r.lung_volume_ml, r.lesion_volume_ml, r.positive), (0.0, 0.0, false));
        assert!(r.lung_guard.unguarded_lesion_volume_ml > 0.0, "the model's mistake is there to be removed");
    }

    #[test]
    fn a_small_midline_airway_piece_is_not_lung_field() {
        // Chest slices z = 0..40; a trachea (3×3, 2.25 cm²) between the lungs on the top three, joined to both
        // lungs by a bronchus on the lowest of them (so it is part of a kept 3D component). The model calls the
        // trachea lung.
        let trachea = |r: usize, c: usize| (29..32).contains(&r) && (31..34).contains(&c);
        let bronchus = |r: usize, c: usize| (29..31).contains(&r) && (25..40).contains(&c);
        let slices: Vec<PlacedSlice> = (0..9)
            .map(|k| {
                let z = k as f64 * 5.0;
                if k < 6 {
                    return chest(z);
                }
                let base = chest_hu();
                let with_bronchus = k == 6;
                // −900 HU: an airway in partial volume, not pure gas (pure gas is taken out by the gas rule).
                let hu = hu_slice(|r, c| {
                    if trachea(r, c) || (with_bronchus && bronchus(r, c)) {
                        -900.0
                    } else {
                        base.hu[r * N + c]
                    }
                });
                let lungs = mask(|r, c| ellipse(r, c, RIGHT_LUNG) || ellipse(r, c, LEFT_LUNG) || trachea(r, c));
                placed(z, &hu, lungs, mask(consolidation))
            })
            .collect();
        let sorted: Vec<&PlacedSlice> = slices.iter().collect();
        let g = guard(&sorted, |s| s.pixel_spacing[0] * s.pixel_spacing[1] * 5.0 / 1000.0, 5.0).unwrap();
        assert_eq!(g.report.lung_components, 1, "the bronchus joins lungs and trachea: {:?}", g.report);
        for k in 7..9 {
            assert!(!g.lung[k].get(30, 32), "slice {k}: the trachea is not lung");
            assert!(g.lung[k].get(32, 18) && g.lung[k].get(32, 46), "slice {k}: the lungs are");
        }
    }

    #[test]
    fn a_large_pocket_of_pure_gas_is_not_lung_aerated_lung_of_the_same_size_is() {
        // One slice, one 6×20 px (30 cm²) air pocket the model calls lung with a lesion rim: large enough for the
        // size rules either way; only its density decides.
        let pocket = |r: usize, c: usize| (20..26).contains(&r) && (22..42).contains(&c);
        let rim = |r: usize, c: usize| (18..28).contains(&r) && (20..44).contains(&c) && !pocket(r, c);
        for (hu_in, lung) in [(-1000.0, false), (-850.0, true)] {
            let hu = hu_slice(|r, c| {
                if pocket(r, c) {
                    hu_in
                } else if ellipse(r, c, BODY) {
                    40.0
                } else {
                    -1000.0
                }
            });
            let r = analyse_series(&[placed(0.0, &hu, mask(pocket), mask(rim))], &params());
            assert_eq!(r.lung_guard.lung_components, lung as usize, "{hu_in} HU: {:?}", r.lung_guard);
            assert_eq!(r.lesion_volume_ml > 0.0, lung, "{hu_in} HU");
        }
    }

    #[test]
    fn without_air_masks_the_guard_does_not_apply() {
        let mut s = chest(0.0);
        s.segmentation.air = None;
        let r = analyse_series(&[abdomen(5.0), s], &params());
        assert!(!r.lung_guard.applied);
        assert!(r.lesion_volume_ml > 0.0);
    }

    /// The windowed per-slice step equals the same step over the whole slice, on 256² slices at 0.7 mm (windows
    /// much smaller than the slice) with pieces of every kind: kept air with small mid-line pieces (airways), model
    /// components inside, partly inside and far from the field, holes, and pieces touching the image edge (a window
    /// clamped to the image).
    #[test]
    fn the_windowed_seed_equals_the_whole_slice_seed() {
        const M: usize = 256;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let mut partial_cases = 0;
        for case in 0..24 {
            let mut k = vec![false; M * M];
            let mut lung = vec![false; M * M];
            let blob = |m: &mut Vec<bool>, (cr, cc, ar, ac): (usize, usize, usize, usize), hole: bool| {
                for r in 0..M {
                    for c in 0..M {
                        let d =
                            ((r as f64 - cr as f64) / ar as f64).powi(2) + ((c as f64 - cc as f64) / ac as f64).powi(2);
                        if d < 1.0 && !(hole && d < 0.2) {
                            m[r * M + c] = true;
                        }
                    }
                }
            };
            // Lungs somewhere (an edge case now and then), a small mid-line piece, model blobs near and far.
            let edge = case % 6 == 5;
            let (lr, lc) = if edge { (8, 10) } else { (60 + next(100), 40 + next(60)) };
            blob(&mut k, (lr, lc, 10 + next(30), 8 + next(20)), false);
            blob(&mut k, (60 + next(100), 150 + next(60), 10 + next(30), 8 + next(20)), false);
            blob(&mut k, (100 + next(40), 126 + next(4), 2, 2), false);
            blob(&mut lung, (lr, lc, 14 + next(30), 12 + next(20)), case % 2 == 0);
            blob(&mut lung, (next(M), next(M), 3 + next(20), 3 + next(20)), case % 3 == 0);
            blob(&mut lung, (next(M), next(M), 2 + next(6), 2 + next(6)), false);
            let mut s = PlacedSlice {
                segmentation: SliceSegmentation {
                    rows: M,
                    cols: M,
                    lung: BitMask::from_bools(M, M, &lung),
                    lesion: BitMask::new(M, M),
                    lesion_hu: Vec::new(),
                    max_lesion_probability: 0.5,
                    air: None,
                    pre_seed: None,
                },
                position_mm: 0.0,
                image_position: [-90.0, -90.0, 0.0],
                image_orientation: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
                pixel_spacing: [0.7, 0.7],
                slice_thickness: Some(1.0),
            };
            if case % 4 == 3 {
                s.pixel_spacing = [0.7, 0.9];
            }
            let kept = BitMask::from_bools(M, M, &k);
            let midline_x = s.point(0.0, 127.0)[0];
            let whole = Window { r0: 0, c0: 0, rows: M, cols: M };
            let (k_runs, lung_runs) = (kept.runs(), s.segmentation.lung.runs());
            let reference = seed_in(&s, &k_runs, &lung_runs, midline_x, whole);
            let windowed = seed(&s, &kept, midline_x);
            assert!(reference.0.count() > 0 && reference.1.count() > 0, "case {case}: nothing kept");
            assert_eq!(windowed.0, reference.0, "case {case}: kept lung differs");
            assert_eq!(windowed.1, reference.1, "case {case}: field differs");
            let lr = s.segmentation.lung.count() - reference.0.count();
            partial_cases += (lr > 0) as usize;
        }
        assert!(partial_cases > 0, "no case dropped model lung: the partial-keep path went untested");
    }

    #[test]
    fn morphology_helpers_match_their_definitions() {
        let (rows, cols) = (9, 11);
        let m: Vec<bool> = (0..rows * cols).map(|i| i % 7 == 0 || i % 13 == 0).collect();
        for r in 0..3 {
            let d = dilate(&m, rows, cols, r);
            let e = erode(&m, rows, cols, r);
            for i in 0..rows * cols {
                let (y, x) = ((i / cols) as isize, (i % cols) as isize);
                let near = |want: bool| {
                    (-(r as isize)..=r as isize).any(|dy| {
                        (-(r as isize)..=r as isize).any(|dx| {
                            let (yy, xx) = (y + dy, x + dx);
                            yy >= 0
                                && xx >= 0
                                && yy < rows as isize
                                && xx < cols as isize
                                && m[yy as usize * cols + xx as usize] == want
                        })
                    })
                };
                assert_eq!(d[i], near(true), "dilate r={r} at {i}");
                assert_eq!(e[i], !near(false), "erode r={r} at {i}");
            }
        }
        // A ring with a hole, and a C shape whose inside reaches the border.
        let ring: Vec<bool> = (0..49)
            .map(|i| {
                let (y, x) = (i / 7, i % 7);
                (1..6).contains(&y) && (1..6).contains(&x) && !(y == 3 && x == 3)
            })
            .collect();
        let filled = fill_holes(&ring, 7, 7);
        assert!(filled[3 * 7 + 3] && !filled[0]);
        let (labels, sizes) = label(&ring, 7, 7, false);
        assert_eq!(sizes.len(), 2);
        assert_eq!(labels[3 * 7 + 3], 0);
        let diag = vec![true, false, false, true];
        assert_eq!(label(&diag, 2, 2, false).1.len(), 3);
        assert_eq!(label(&diag, 2, 2, true).1.len(), 2);
    }
}
