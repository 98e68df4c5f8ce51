//! lung_guard::air — one slice's [`BodyAir`] (the body's air, its pure gas, and the air that is not gas) on bit
//! rows and runs: what [`super::air_mask`] runs for every slice while the series streams in, on the worker that
//! also segments it.
//!
//! The same rule as the pixel-by-pixel air mask it replaced (`lung_guard::pixels`, kept as the reference), computed
//! on the primitives of `lung_guard::plane`: thresholds packed 64 pixels a word, openings as run dilations of the
//! complement then of the runs left, components labelled on runs by union-find (numbered as a raster-order flood
//! fill numbers them, so ties for the largest body resolve the same way), holes as the unset runs not connected to
//! the border, gas counts as popcounts. Integer and bit arithmetic only, and the areas compared in cm² are the same
//! pixel counts times the same factor, so every mask is the reference's bit for bit (unit tests
//! `the_row_air_mask_*`).
//!
//! Owns: [`air_mask`] and [`non_gas_air`] on planes.
//! Hands on: the [`BodyAir`] to `lung_guard::air_mask` (and from there to `SliceSegmentation::air`).
//! Never: looks at the model's masks, or at other slices.

use super::plane::{pieces, runs_of, Plane};
use super::{
    BodyAir, AIR_HU, BODY_OPEN_MM, GAS_CORE_MIN_CM2, GAS_CORE_MM, GAS_HU, GAS_PIECE_MAX_CM2, GAS_RIM_MM,
    MAX_GAS_FRACTION,
};
use crate::analysis::BitMask;
use crate::decode::HuSlice;

/// Air-density pixels inside the patient's body contour, and the gas among them (see the `lung_guard` module doc).
pub(super) fn air_mask(hu: &HuSlice) -> BodyAir {
    let (rows, cols) = (hu.rows, hu.cols);
    let min_spacing = hu.pixel_spacing[0].min(hu.pixel_spacing[1]);
    let r = if min_spacing > 0.0 { (BODY_OPEN_MM / min_spacing).round().max(1.0) as usize } else { 1 };
    let air = Plane::below(rows, cols, &hu.hu, AIR_HU);
    // The tissue opened by r: eroded (the complement of the air dilated), then dilated.
    let opened = opening(&air, r, true);
    let runs = opened.runs(true);
    let (label, size) = pieces(&runs, false);
    // The largest component; of equal ones the last (as `Iterator::max_by_key` picks in the reference).
    let Some(body) = size.iter().enumerate().max_by_key(|&(_, &n)| n).map(|(l, _)| l as u32) else {
        return BodyAir {
            air: BitMask::new(rows, cols),
            gas: BitMask::new(rows, cols),
            candidate: BitMask::new(rows, cols),
        };
    };
    let mut inside = Plane::from_runs(rows, cols, &runs_of(&runs, &label, |l| l == body));
    let holes = inside.holes();
    inside.or(&holes);
    inside.and(&air);
    let mut gas = Plane::below(rows, cols, &hu.hu, GAS_HU);
    gas.and(&inside);
    let candidate = non_gas_air(&inside, &gas, hu.pixel_spacing);
    BodyAir { air: inside.to_bitmask(), gas: gas.to_bitmask(), candidate: candidate.to_bitmask() }
}

/// The opening by a square of radius `r` of `m`, or of its complement when `complement` (erosion: the complement
/// of the dilated complement, outside the image counting as set; then the dilation of what is left).
fn opening(m: &Plane, r: usize, complement: bool) -> Plane {
    let (rows, cols) = m.size();
    let outside = m.runs(complement);
    let eroded = Plane::dilated(rows, cols, &outside, r).not();
    Plane::dilated(rows, cols, &eroded.runs(true), r)
}

/// The air of one slice that is not gas (see the reference, `lung_guard::pixels::non_gas_air`): large pure-gas cores
/// out with their rim, then the in-plane pieces (8-connectivity) with more than [`MAX_GAS_FRACTION`] of gas.
pub(super) fn non_gas_air(air: &Plane, gas: &Plane, pixel_spacing: [f64; 2]) -> Plane {
    let (rows, cols) = air.size();
    let min_spacing = pixel_spacing[0].min(pixel_spacing[1]);
    let px = |mm: f64| if min_spacing > 0.0 { (mm / min_spacing).round() as usize } else { 0 };
    let px_cm2 = pixel_spacing[0] * pixel_spacing[1] / 100.0;
    let mut air = air.clone();
    if gas.any() {
        let core = opening(gas, px(GAS_CORE_MM).max(1), false);
        // Only large cores (stomach, colon, trachea): the small cysts of a diseased or emphysematous lung stay.
        let runs = core.runs(true);
        let (label, size) = pieces(&runs, false);
        let large = runs_of(&runs, &label, |l| size[l as usize] as f64 * px_cm2 >= GAS_CORE_MIN_CM2);
        if !large.is_empty() {
            air.and_not(&Plane::dilated(rows, cols, &large, px(GAS_RIM_MM)));
        }
    }
    let runs = air.runs(true);
    let (label, size) = pieces(&runs, true);
    let mut n_gas = vec![0usize; size.len()];
    for (&(r, a, b), &l) in runs.iter().zip(&label) {
        n_gas[l as usize] += gas.count_in(r, a, b);
    }
    let keep: Vec<bool> = (0..size.len())
        .map(|l| size[l] as f64 * px_cm2 >= GAS_PIECE_MAX_CM2 || n_gas[l] as f64 <= MAX_GAS_FRACTION * size[l] as f64)
        .collect();
    Plane::from_runs(rows, cols, &runs_of(&runs, &label, |l| keep[l as usize]))
}
