use super::morphology::{dilate, erode, fill_holes, label};
use super::*;
use crate::analysis::{analyse_series, AnalysisParams, SliceSegmentation};

mod air;

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
    AnalysisParams {
        min_lesion_volume_ml: 0.0,
        positive_threshold_percent: 0.4,
        lesion_min_hu: None,
        partial_volume_rule: false,
    }
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
    let slices: Vec<PlacedSlice> =
        (0..9)
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

/// A xorshift generator: `next(n)` is in 0..n.
fn rng(seed: u64) -> impl FnMut(usize) -> usize {
    let mut state = seed;
    move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    }
}

/// A random rows×cols slice at 0.7 mm (0.7 × 0.9 mm for one case in four) with pieces of every kind: kept air
/// (two lungs, a small mid-line piece, specks), model components inside, partly inside and far from the field,
/// with holes, and pieces touching the image edge (one case in six). Returns the slice, its kept air and the
/// mid-line x.
fn random_slice(
    next: &mut impl FnMut(usize) -> usize,
    rows: usize,
    cols: usize,
    case: usize,
) -> (PlacedSlice, BitMask, f64) {
    let mut k = vec![false; rows * cols];
    let mut lung = vec![false; rows * cols];
    let blob = |m: &mut Vec<bool>, (cr, cc, ar, ac): (usize, usize, usize, usize), hole: bool| {
        for r in 0..rows {
            for c in 0..cols {
                let d = ((r as f64 - cr as f64) / ar as f64).powi(2) + ((c as f64 - cc as f64) / ac as f64).powi(2);
                if d < 1.0 && !(hole && d < 0.2) {
                    m[r * cols + c] = true;
                }
            }
        }
    };
    let (h, w) = (rows / 4, cols / 4);
    // Lungs somewhere (an edge case now and then), a small mid-line piece, specks, model blobs near and far.
    let edge = case % 6 == 5;
    let (lr, lc) = if edge { (8, 10) } else { (h + next(h * 2), w / 2 + next(w)) };
    blob(&mut k, (lr, lc, 4 + next(h / 2), 4 + next(w / 3)), false);
    blob(&mut k, (h + next(h * 2), 2 * w + w / 3 + next(w), 4 + next(h / 2), 4 + next(w / 3)), case % 5 == 0);
    blob(&mut k, (h + next(h), cols / 2 - 1 + next(4), 2, 2), false);
    for _ in 0..next(12) {
        k[next(rows * cols)] = true;
    }
    if edge {
        k[(rows - 1) * cols + cols - 1] = true;
        lung[(rows - 1) * cols..].iter_mut().for_each(|p| *p = true);
    }
    blob(&mut lung, (lr, lc, 6 + next(h / 2), 6 + next(w / 3)), case % 2 == 0);
    blob(&mut lung, (next(rows), next(cols), 3 + next(h / 3), 3 + next(w / 3)), case % 3 == 0);
    blob(&mut lung, (next(rows), next(cols), 2 + next(6), 2 + next(6)), false);
    let mut s = PlacedSlice {
        segmentation: SliceSegmentation {
            rows,
            cols,
            lung: BitMask::from_bools(rows, cols, &lung),
            lesion: BitMask::new(rows, cols),
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
    let midline_x = s.point(0.0, (cols / 2) as f64 - 1.0)[0];
    (s, BitMask::from_bools(rows, cols, &k), midline_x)
}

/// The windowed pixel seeding equals the same seeding over the whole slice, on 256² slices at 0.7 mm (windows
/// much smaller than the slice).
#[test]
fn the_windowed_seed_equals_the_whole_slice_seed() {
    const M: usize = 256;
    let mut next = rng(0x2545_f491_4f6c_dd1d);
    let mut partial_cases = 0;
    for case in 0..24 {
        let (s, kept, midline_x) = random_slice(&mut next, M, M, case);
        let whole = pixels::Window { r0: 0, c0: 0, rows: M, cols: M };
        let (k_runs, lung_runs) = (kept.runs(), s.segmentation.lung.runs());
        let airway = |x| is_airway(x, midline_x);
        let reference = pixels::seed_in_with(&s, &k_runs, &lung_runs, &airway, whole);
        let windowed = pixels::seed_with(&s, &kept, &airway);
        assert!(reference.0.count() > 0 && reference.1.count() > 0, "case {case}: nothing kept");
        assert_eq!(windowed, reference, "case {case}");
        let lr = s.segmentation.lung.count() - reference.0.count();
        partial_cases += (lr > 0) as usize;
    }
    assert!(partial_cases > 0, "no case dropped model lung: the partial-keep path went untested");
}

/// The seeding on bit rows equals the pixel seeding bit for bit (kept lung, field, the small pieces' centres and
/// verdicts in the same order), on random slices of sizes that are and are not multiples of 64 columns (words
/// split across rows), with airway verdicts both ways, holes, pieces at the image edge, nothing kept.
#[test]
fn the_row_seed_equals_the_pixel_seed() {
    let mut next = rng(0x9e37_79b9_7f4a_7c15);
    let (mut partial, mut airways, mut not_airways) = (0, 0, 0);
    for (case, (rows, cols)) in
        [(256, 256), (200, 130), (97, 64), (64, 65), (130, 190), (300, 127), (512, 512), (80, 63)]
            .into_iter()
            .cycle()
            .take(40)
            .enumerate()
    {
        let (s, kept, midline_x) = random_slice(&mut next, rows, cols, case);
        // Midlines that make the small mid-line piece an airway and ones that do not.
        let shift = [0.0, AIRWAY_MIDLINE_MM * 2.0, -AIRWAY_MIDLINE_MM * 0.9][case % 3];
        let airway = |x| is_airway(x, midline_x + shift);
        let reference = pixels::seed_with(&s, &kept, &airway);
        let rows_seed = seed::seed_with(&s, &kept, &airway);
        assert_eq!(rows_seed, reference, "case {case} ({rows}×{cols})");
        partial += (s.segmentation.lung.count() > reference.0.count()) as usize;
        airways += reference.2.iter().filter(|p| p.1).count();
        not_airways += reference.2.iter().filter(|p| !p.1).count();
    }
    assert!(partial > 0 && airways > 0 && not_airways > 0, "{partial} {airways} {not_airways}");
    // Nothing kept, and a kept air that is all airway.
    let (mut s, _, _) = random_slice(&mut next, 64, 70, 0);
    let empty = BitMask::new(64, 70);
    assert_eq!(seed::seed_with(&s, &empty, &|_| true), pixels::seed_with(&s, &empty, &|_| true));
    let mut speck = BitMask::new(64, 70);
    speck.set(10, 69, true);
    speck.set(11, 68, true);
    s.segmentation.lung = speck.clone();
    let all_airway = seed::seed_with(&s, &speck, &|_| true);
    assert_eq!(all_airway, pixels::seed_with(&s, &speck, &|_| true));
    assert_eq!((all_airway.0.count(), all_airway.1.count(), all_airway.2.len()), (0, 0, 1), "one 8-connected piece");
}

/// A lesion island the model set apart inside a consolidation it called background is kept through the hole
/// filling, by both seedings; once the ring around it is open to any of the four image borders it is not.
#[test]
fn the_row_seed_fills_holes_as_the_pixel_seed_does() {
    let (rows, cols) = (140, 150);
    let d = |r: usize, c: usize| ((r as f64 - 70.0) / 50.0).powi(2) + ((c as f64 - 75.0) / 50.0).powi(2);
    let island = |r: usize, c: usize| (68..72).contains(&r) && (73..77).contains(&c);
    // The channel that opens the ring's model (narrow) and air (wide) towards a border: none, left, right, up, down.
    let channel = |r: usize, c: usize, open: usize, half: usize| match open {
        1 => c < 73 && r.abs_diff(70) < half,
        2 => c > 77 && r.abs_diff(70) < half,
        3 => r < 67 && c.abs_diff(75) < half,
        4 => r > 72 && c.abs_diff(75) < half,
        _ => false,
    };
    let (mut s, _, _) = random_slice(&mut rng(7), rows, cols, 0);
    s.pixel_spacing = [0.7, 0.7];
    for open in 0..5 {
        let lung: Vec<bool> = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                ((0.3..1.0).contains(&d(r, c)) && !channel(r, c, open, 2)) || island(r, c)
            })
            .collect();
        // Air along the ring's outer rim only: the island is far (> NEAR_MM) from it and its own component.
        let air: Vec<bool> = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                (0.9..1.0).contains(&d(r, c)) && !channel(r, c, open, 10)
            })
            .collect();
        s.segmentation.lung = BitMask::from_bools(rows, cols, &lung);
        let air = BitMask::from_bools(rows, cols, &air);
        let reference = pixels::seed_with(&s, &air, &|_| false);
        assert_eq!(reference.0.get(70, 75), open == 0, "open {open}: the island is kept through the hole filling");
        assert!(reference.0.get(40, 40), "open {open}: the ring is kept whole");
        assert_eq!(seed::seed_with(&s, &air, &|_| false), reference, "open {open}");
    }
}

/// The guard with the bit-row seeding and pre-seeds gives the masks and report of the pixel seeding without
/// them, on the synthetic series (chest, abdomen, airway slices).
#[test]
fn the_guard_seeding_on_rows_equals_the_guard_seeding_on_pixels() {
    let voxel_ml = |s: &PlacedSlice| s.pixel_spacing[0] * s.pixel_spacing[1] * 5.0 / 1000.0;
    let mut slices: Vec<PlacedSlice> =
        (0..15).map(|k| if k < 6 { abdomen(k as f64 * 5.0) } else { chest(k as f64 * 5.0) }).collect();
    let sorted: Vec<&PlacedSlice> = slices.iter().collect();
    let reference = guard_with(&sorted, voxel_ml, 5.0, Seeding::Pixels).unwrap();
    let rows = guard_with(&sorted, voxel_ml, 5.0, Seeding::Rows).unwrap();
    assert_eq!((&rows.lung, &rows.field, &rows.report), (&reference.lung, &reference.field, &reference.report));
    for s in &mut slices {
        s.segmentation.pre_seed = pre_seed(s);
    }
    let sorted: Vec<&PlacedSlice> = slices.iter().collect();
    let pre = guard_with(&sorted, voxel_ml, 5.0, Seeding::Rows).unwrap();
    assert_eq!((&pre.lung, &pre.field, &pre.report), (&reference.lung, &reference.field, &reference.report));
    assert!(reference.lung.iter().any(|m| m.count() > 0) && reference.lung.iter().any(|m| m.count() == 0));
}

/// The bit-row primitives equal the pixel helpers on random masks (empty, sparse to dense, full; sizes around word
/// boundaries, one row, one column, none): the square dilation, the labelling (8- and 4-connectivity: the same
/// partition, numbered in the same order) and the holes.
#[test]
fn the_row_primitives_equal_the_pixel_helpers() {
    let mut next = rng(0x51_7cc1_b727_220a);
    for (case, (rows, cols)) in
        [(1, 1), (7, 63), (9, 64), (33, 65), (40, 130), (64, 129), (2, 200), (1, 70), (70, 1), (0, 5), (5, 0)]
            .into_iter()
            .enumerate()
    {
        for density in [0, 5, 30, 50, 65, 90, 100] {
            let m: Vec<bool> = (0..rows * cols).map(|_| next(100) < density).collect();
            let mask = BitMask::from_bools(rows, cols, &m);
            let runs = mask.runs();
            let plane = |px: &[bool]| BitMask::from_bools(rows, cols, px);
            for r in [0, 1, 2, 3, 5, 21] {
                let rows_dilated = plane::Plane::dilated(rows, cols, &runs, r).to_bitmask();
                assert_eq!(rows_dilated, plane(&dilate(&m, rows, cols, r)), "case {case}, {density} %, r {r}");
            }
            for eight in [true, false] {
                let (label_px, sizes) = label(&m, rows, cols, eight);
                let (label_run, n) = plane::label_runs(&runs, eight);
                assert_eq!(n, sizes.len() - 1, "case {case}, {density} %, eight {eight}");
                for (&(r, a, b), &l) in runs.iter().zip(&label_run) {
                    for c in a..=b {
                        assert_eq!(label_px[r * cols + c], l + 1, "case {case}, {density} %, eight {eight}");
                    }
                }
            }
            let mut p = plane::Plane::new(rows, cols);
            for &(r, a, b) in &runs {
                p.set_run(r, a, b);
            }
            let holes = p.holes().to_bitmask();
            let filled: Vec<bool> = fill_holes(&m, rows, cols).iter().zip(&m).map(|(f, m)| *f && !m).collect();
            assert_eq!(holes, plane(&filled), "case {case}, {density} %");
        }
    }
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
