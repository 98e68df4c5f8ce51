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
//!   the completion step that the alert waits for seeds only the other slices (34 of 300 on the 300-slice phantom,
//!   212 of 248 on the RICORD series: small air specks the 3D rule drops change a slice's kept air).
//!
//! The seeding (step 4) runs on bit rows and runs (`seed`: labelling by union-find over runs, dilation by whole
//! words, holes as the unset runs not connected to the border), a tenth of the pixel seeding's time; the pixel-by-pixel
//! seeding it replaced (`pixels`) stays as the reference it equals bit for bit ([`Seeding::Pixels`]). So does the
//! per-slice [`air_mask`] (`air`: openings by run dilation, body and gas pieces labelled on runs, holes on the gaps;
//! the pixel air mask stays as [`AirMasking::Pixels`]). Files: `plane` (the bit-row primitives), `seed` and `air` (on
//! them), `pixels` (the references), `morphology` (the pixel helpers of the references), `tests`, `tests_air`.
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

use super::{mask_components, BitMask, MaskComponents, PlacedSlice, RunMask};
use crate::decode::HuSlice;
mod air;
mod morphology;
mod pixels;
mod plane;
mod seed;
#[cfg(test)]
mod tests;

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
/// module doc), on bit rows ([`AirMasking::Rows`]).
pub fn air_mask(hu: &HuSlice) -> BodyAir {
    air_mask_with(hu, AirMasking::Rows)
}

/// How [`air_mask_with`] computes a slice's air. Both give the same masks bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AirMasking {
    /// The product's: on bit rows and runs (`lung_guard::air`).
    Rows,
    /// The reference: pixel by pixel (`lung_guard::pixels`; how the air mask was made before bit rows, for the
    /// tests that prove the two equal, and A/B timings).
    Pixels,
}

/// [`air_mask`] computed as `masking` says.
pub fn air_mask_with(hu: &HuSlice, masking: AirMasking) -> BodyAir {
    match masking {
        AirMasking::Rows => air::air_mask(hu),
        AirMasking::Pixels => pixels::air_mask(hu),
    }
}

/// How [`guard_with`] seeds a slice (step 4 of the module doc). Both give the same masks bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seeding {
    /// The product's: on bit rows and runs, with a slice's [`PreSeed`] taken where it holds.
    Rows,
    /// The reference: every slice seeded again pixel by pixel, pre-seeds ignored (how the guard seeded before
    /// pre-seeds and bit rows; for the tests that prove the two equal, and A/B timings).
    Pixels,
}

/// The guard over a series' slices in position order (`None` when a slice has no air mask). `voxel_ml` gives a
/// slice's voxel volume; `spacing` is the series' voxel depth, mm.
pub fn guard(sorted: &[&PlacedSlice], voxel_ml: impl Fn(&PlacedSlice) -> f64, spacing: f64) -> Option<Guarded> {
    guard_with(sorted, voxel_ml, spacing, Seeding::Rows)
}

/// [`guard`] with the seeding chosen.
pub fn guard_with(
    sorted: &[&PlacedSlice],
    voxel_ml: impl Fn(&PlacedSlice) -> f64,
    spacing: f64,
    seeding: Seeding,
) -> Option<Guarded> {
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
    // Per component, indexed by its root (a run index): volume, then whether it is kept.
    let MaskComponents { runs, roots, volume } = mask_components(sorted, &candidates, &voxel_ml);
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
        match (&s.segmentation.pre_seed, seeding) {
            (Some(p), Seeding::Rows) if all_kept[si] && p.holds_for(midline_x) => {
                (p.lung.to_bitmask(), p.field.to_bitmask(), true)
            }
            _ => {
                let (lung, field) = seed_for(s, k, midline_x, seeding);
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
        seeding = ?seeding,
        air_not_all_kept = all_kept.iter().filter(|a| !**a).count(),
        airway_verdict_changed =
            sorted.iter().filter(|s| s.segmentation.pre_seed.as_ref().is_some_and(|p| !p.holds_for(midline_x))).count(),
        "lung guard: 3D air components, per-slice seeding"
    );
    let mut lung = Vec::with_capacity(sorted.len());
    let mut field = Vec::with_capacity(sorted.len());
    for (s, (kept_lung, f, _)) in sorted.iter().zip(per_slice) {
        report.removed_lung_ml += (s.segmentation.lung.count() - kept_lung.count()) as f64 * voxel_ml(s);
        report.slices_with_lung_field += (f.count() > 0) as usize;
        lung.push(kept_lung);
        field.push(f);
    }
    Some(Guarded { lung, field, report })
}

/// One slice's share of [`guard`]: the kept air `k` less airway pieces, dilated into the lung field, and the model
/// lung components it seeds (see the module doc). Returns (kept model lung, field).
fn seed_for(s: &PlacedSlice, k: &BitMask, midline_x: f64, seeding: Seeding) -> (BitMask, BitMask) {
    let airway = |x| is_airway(x, midline_x);
    let (lung, field, _) = match seeding {
        Seeding::Rows => seed::seed_with(s, k, &airway),
        Seeding::Pixels => pixels::seed_with(s, k, &airway),
    };
    (lung, field)
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
/// are then those [`seed_for`] would make, bit for bit (unit test
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

/// The [`PreSeed`] of a slice (`None` without an air mask): [`seed_for`] with all of the slice's air kept and the
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
    let (lung, field, small_pieces) = seed::seed_with(s, air, &|x| is_airway(x, provisional));
    Some(PreSeed { small_pieces, lung: RunMask::from_bitmask(&lung), field: RunMask::from_bitmask(&field) })
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
