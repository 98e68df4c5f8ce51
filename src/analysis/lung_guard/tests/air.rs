//! The air mask on bit rows (`lung_guard::air`, what the product runs) against the pixel-by-pixel reference
//! (`lung_guard::pixels`): the same masks bit for bit on the HU fixtures, on random slices of many sizes and pixel
//! spacings, and `non_gas_air` alone on random air and gas masks; the plane primitives it adds against their
//! definitions.

use super::super::plane::Plane;
use super::super::{air, pixels};
use super::*;

/// Both air masks of `hu`, asserted equal; returns the product's.
fn both(hu: &HuSlice, what: &str) -> BodyAir {
    let rows = air_mask_with(hu, AirMasking::Rows);
    let reference = air_mask_with(hu, AirMasking::Pixels);
    assert_eq!(rows.air, reference.air, "{what}: air");
    assert_eq!(rows.gas, reference.gas, "{what}: gas");
    assert_eq!(rows.candidate, reference.candidate, "{what}: candidate");
    rows
}

/// The fixtures of the other tests (chest, chest on a table with a cradle, abdomen, pure-gas pocket, empty field),
/// at their own pixel spacing and at spacings that change every radius (0 and below: the 1-pixel fallbacks).
#[test]
fn the_row_air_mask_equals_the_pixel_air_mask_on_the_fixtures() {
    let base = chest_hu();
    let on_table = hu_slice(|r, c| {
        let table = r == 59 || r == 63 || ((59..=63).contains(&r) && (c == 4 || c == 59));
        if table && (4..=59).contains(&c) {
            200.0
        } else {
            base.hu[r * N + c]
        }
    });
    let pure = hu_slice(|r, c| if gas(r, c) || !ellipse(r, c, BODY) { -1000.0 } else { 40.0 });
    let big_gas = hu_slice(|r, c| {
        if (14..30).contains(&r) && (24..40).contains(&c) {
            -1000.0
        } else if ellipse(r, c, RIGHT_LUNG) {
            -850.0
        } else if ellipse(r, c, BODY) {
            40.0
        } else {
            -1000.0
        }
    });
    // Two bodies of the same size, each with an air pocket: the last in raster order is the body (as the reference's
    // `max_by_key` picks the last of equal components).
    let twins = hu_slice(|r, c| {
        let in_block = (20..32).contains(&r) && ((5..17).contains(&c) || (40..52).contains(&c));
        let in_hole = (24..27).contains(&r) && ((9..12).contains(&c) || (44..47).contains(&c));
        if in_block && !in_hole {
            40.0
        } else {
            -1000.0
        }
    });
    let empty = hu_slice(|_, _| -1000.0);
    let full = hu_slice(|_, _| 40.0);
    let mut gas_pixels = 0;
    for (name, hu) in [
        ("chest", &base),
        ("table", &on_table),
        ("abdomen", &abdomen_hu()),
        ("pure gas", &pure),
        ("gas pocket", &big_gas),
        ("twins", &twins),
        ("empty", &empty),
        ("all tissue", &full),
    ] {
        for spacing in [[PX_MM, PX_MM], [0.7, 0.7], [0.6, 0.9], [1.0, 1.0], [2.0, 2.0], [0.0, 0.0], [-1.0, 1.0]] {
            let mut hu = hu.clone();
            hu.pixel_spacing = spacing;
            let out = both(&hu, &format!("{name} at {spacing:?}"));
            gas_pixels += out.gas.count();
        }
    }
    // The fixtures exercise the gas steps (cores, rims, gas pieces), not only the body.
    assert!(gas_pixels > 0);
    let pocket = both(&big_gas, "gas pocket");
    assert!(pocket.gas.count() > 0 && pocket.candidate.count() < pocket.air.count(), "{pocket:?}");
    let twins = both(&twins, "twins").air;
    assert!(twins.count() == 9 && twins.get(25, 45), "{twins:?}");
}

/// A random rows×cols HU slice: a body ellipse (sometimes off the image edge) with lungs, gas pockets large and
/// small, a table line, and speckles of every density class at `speckle` per mille.
fn random_hu(next: &mut impl FnMut(usize) -> usize, rows: usize, cols: usize, speckle: usize) -> HuSlice {
    let levels = [-1000.0, -960.0, -850.0, -500.0, -300.0, 40.0, 300.0];
    let f = |n: usize| n as f64;
    let body =
        (f(next(rows + 1)), f(next(cols + 1)), f(rows / 3 + next(rows / 2 + 1)), f(cols / 3 + next(cols / 2 + 1)));
    let lungs: Vec<(f64, f64, f64, f64)> = (0..next(4))
        .map(|_| (f(next(rows + 1)), f(next(cols + 1)), f(1 + next(rows / 4 + 1)), f(1 + next(cols / 4 + 1))))
        .collect();
    let pockets: Vec<(usize, usize, usize, usize, f32)> = (0..next(5))
        .map(|_| {
            let (h, w) = (1 + next(rows / 3 + 1), 1 + next(cols / 3 + 1));
            (next(rows + 1), next(cols + 1), h, w, if next(2) == 0 { -1000.0 } else { -960.0 })
        })
        .collect();
    let table = next(rows + 1);
    let mut hu = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let v = if next(1000) < speckle {
                levels[next(levels.len())]
            } else if let Some(p) =
                pockets.iter().find(|p| (p.0..p.0 + p.2).contains(&r) && (p.1..p.1 + p.3).contains(&c))
            {
                p.4
            } else if lungs.iter().any(|&l| ellipse(r, c, l)) {
                -850.0
            } else if ellipse(r, c, body) || r == table {
                40.0
            } else {
                -1000.0
            };
            hu.push(v);
        }
    }
    HuSlice::from_hu(rows, cols, hu)
}

/// Random slices (sizes around word boundaries, one row, one column, none; no speckle to half speckle) at pixel
/// spacings from 0.5 to 5 mm.
#[test]
fn the_row_air_mask_equals_the_pixel_air_mask_on_random_slices() {
    let mut next = rng(0xa1_2b3c_4d5e_6f70);
    let (mut with_gas, mut with_candidate) = (0, 0);
    for (rows, cols) in [(64, 64), (37, 100), (1, 70), (70, 1), (130, 67), (0, 0), (96, 128), (3, 200), (65, 63)] {
        for speckle in [0, 3, 30, 200, 500] {
            for spacing in [[0.5, 0.5], [0.7, 0.8], [1.0, 1.0], [1.6, 1.6], [5.0, 5.0]] {
                let mut hu = random_hu(&mut next, rows, cols, speckle);
                hu.pixel_spacing = spacing;
                let out = both(&hu, &format!("{rows}×{cols}, speckle {speckle} ‰, {spacing:?}"));
                with_gas += (out.gas.count() > 0) as usize;
                with_candidate += (out.candidate.count() > 0) as usize;
            }
        }
    }
    assert!(with_gas > 20 && with_candidate > 20, "{with_gas}, {with_candidate}");
}

/// `non_gas_air` alone on random air and gas masks (rectangles and noise; gas inside the air or not), spacings that
/// make every core large or none.
#[test]
fn the_row_non_gas_air_equals_the_pixel_one_on_random_masks() {
    let mut next = rng(0x0ddb_a11c_afe5_eed5);
    let mut dropped = 0;
    for (rows, cols) in [(1, 1), (40, 40), (33, 129), (1, 90), (90, 1), (64, 64), (0, 7)] {
        for density in [0, 10, 40, 70, 100] {
            for spacing in [[0.4, 0.4], [0.7, 0.7], [2.0, 2.0], [5.0, 4.0], [0.0, 0.0]] {
                let mut blob = |n: usize| {
                    let mut m = vec![false; rows * cols];
                    for _ in 0..n {
                        let (r0, c0) = (next(rows + 1), next(cols + 1));
                        let (h, w) = (1 + next(rows / 2 + 1), 1 + next(cols / 2 + 1));
                        for r in r0..(r0 + h).min(rows) {
                            m[r * cols + c0..r * cols + (c0 + w).min(cols)].fill(true);
                        }
                    }
                    for px in m.iter_mut() {
                        *px ^= next(100) < density / 4;
                    }
                    m
                };
                let air = blob(3);
                let mut gas = blob(2);
                if density % 20 == 0 {
                    for (g, a) in gas.iter_mut().zip(&air) {
                        *g &= a;
                    }
                }
                let (air, gas) = (BitMask::from_bools(rows, cols, &air), BitMask::from_bools(rows, cols, &gas));
                let reference = pixels::non_gas_air(&air, &gas, spacing);
                let plane = |m: &BitMask| Plane::from_runs(rows, cols, &m.runs());
                let out = air::non_gas_air(&plane(&air), &plane(&gas), spacing).to_bitmask();
                assert_eq!(out, reference, "{rows}×{cols}, {density} %, {spacing:?}");
                dropped += (out.count() < air.count()) as usize;
            }
        }
    }
    assert!(dropped > 20, "{dropped}");
}

/// The plane primitives the air mask adds: a threshold packed into words, the complement, clearing, emptiness.
#[test]
fn the_plane_thresholds_and_complements_equal_their_definitions() {
    let mut next = rng(0x7e57_0fb1_7500);
    for (rows, cols) in [(1, 1), (3, 63), (4, 64), (5, 65), (2, 130), (1, 70), (70, 1), (0, 9), (9, 0)] {
        for density in [0, 10, 50, 90, 100] {
            let values: Vec<f32> = (0..rows * cols).map(|_| if next(100) < density { -600.0 } else { 100.0 }).collect();
            let want: Vec<bool> = values.iter().map(|&v| v < -400.0).collect();
            let p = Plane::below(rows, cols, &values, -400.0);
            assert_eq!(p.to_bitmask(), BitMask::from_bools(rows, cols, &want), "{rows}×{cols} {density} %");
            assert_eq!(p.any(), want.contains(&true));
            let inverse: Vec<bool> = want.iter().map(|b| !b).collect();
            let not = p.not();
            assert_eq!(not.to_bitmask(), BitMask::from_bools(rows, cols, &inverse), "{rows}×{cols} {density} %");
            // The bits past `cols` stay 0: the complement of the complement is the plane itself.
            assert_eq!(not.not(), p);
            let mut cleared = p.clone();
            cleared.and_not(&p);
            assert!(!cleared.any());
            let mut all = p.clone();
            all.or(&not);
            assert_eq!(all.to_bitmask().count(), rows * cols);
            assert_eq!(Plane::from_runs(rows, cols, &p.runs(true)), p);
        }
    }
}
