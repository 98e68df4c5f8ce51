//! Series analysis on synthetic masks with known answers: component counting (26-connectivity), minimum volume,
//! volumes and involvement, mean HU, side, and upsampling + argmax on a hand-built score map.

use lungsentry::analysis::{analyse_series, segment_slice, AnalysisParams, BitMask, PlacedSlice, SliceSegmentation};
use lungsentry::decode::HuSlice;

const N: usize = 32;

/// Axial slice at z (mm), 1 mm pixels, LPS identity orientation, first pixel at (-16, -16, z).
fn placed(z: f64, lung: &[bool], lesion: &[bool], lesion_hu: f32) -> PlacedSlice {
    let lesion_mask = BitMask::from_bools(N, N, lesion);
    let lung_px: Vec<bool> = lung.iter().zip(lesion).map(|(a, b)| *a || *b).collect();
    let count = lesion_mask.count();
    PlacedSlice {
        segmentation: SliceSegmentation {
            rows: N,
            cols: N,
            lung: BitMask::from_bools(N, N, &lung_px),
            lesion: lesion_mask,
            lesion_hu: vec![lesion_hu; count],
            max_lesion_probability: if count > 0 { 0.9 } else { 0.1 },
            air: None,
            pre_seed: None,
        },
        position_mm: z,
        image_position: [-16.0, -16.0, z],
        image_orientation: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        pixel_spacing: [1.0, 1.0],
        slice_thickness: Some(1.0),
    }
}

fn rect(r0: usize, r1: usize, c0: usize, c1: usize) -> Vec<bool> {
    let mut m = vec![false; N * N];
    for r in r0..r1 {
        for c in c0..c1 {
            m[r * N + c] = true;
        }
    }
    m
}

fn or(a: &[bool], b: &[bool]) -> Vec<bool> {
    a.iter().zip(b).map(|(x, y)| *x || *y).collect()
}

fn params(min_ml: f64) -> AnalysisParams {
    AnalysisParams {
        min_lesion_volume_ml: min_ml,
        positive_threshold_percent: 0.4,
        lesion_min_hu: None,
        partial_volume_rule: false,
    }
}

#[test]
fn two_separate_blobs_and_volumes() {
    // Lung: whole 32×32 plane on 10 slices at 1 mm → 10 240 mm³ = 10.24 mL.
    let lung = vec![true; N * N];
    // Blob A (patient right, low x): 4×4 on slices 2..=4 (48 voxels); blob B (patient left, high x): 2×5 on 6..=7.
    let a = rect(5, 9, 2, 6);
    let b = rect(20, 22, 25, 30);
    let slices: Vec<PlacedSlice> = (0..10)
        .rev() // unsorted input: analysis sorts by position
        .map(|z| {
            let mut les = vec![false; N * N];
            if (2..=4).contains(&z) {
                les = or(&les, &a);
            }
            if (6..=7).contains(&z) {
                les = or(&les, &b);
            }
            placed(z as f64, &lung, &les, if z < 5 { -300.0 } else { -600.0 })
        })
        .collect();
    let res = analyse_series(&slices, &params(0.0));
    assert_eq!(res.lesions.len(), 2);
    assert!((res.lung_volume_ml - 10.24).abs() < 1e-9, "{}", res.lung_volume_ml);
    let l1 = &res.lesions[0];
    assert_eq!((l1.first_slice, l1.last_slice), (2, 4));
    assert!((l1.volume_ml - 0.048).abs() < 1e-9);
    assert!((l1.mean_hu + 300.0).abs() < 1e-9);
    assert_eq!(l1.side, "right");
    // centroid: rows 5..9 → y -16+6.5, cols 2..6 → x -16+3.5, z 3
    assert!((l1.centroid_mm[0] - (-12.5)).abs() < 1e-9);
    assert!((l1.centroid_mm[1] - (-9.5)).abs() < 1e-9);
    assert!((l1.centroid_mm[2] - 3.0).abs() < 1e-9);
    let l2 = &res.lesions[1];
    assert_eq!((l2.first_slice, l2.last_slice), (6, 7));
    assert!((l2.volume_ml - 0.020).abs() < 1e-9);
    assert!((l2.mean_hu + 600.0).abs() < 1e-9);
    assert_eq!(l2.side, "left");
    assert!((res.lesion_volume_ml - 0.068).abs() < 1e-9);
    assert!((res.involvement_percent - 0.068 / 10.24 * 100.0).abs() < 1e-9);
    assert!(res.positive, "0.66 % > 0.4 %");
    assert_eq!(res.positive_slices, vec![2, 3, 4, 6, 7]);
    assert_eq!(res.slice_order[0], 9, "input index of the lowest slice");
    assert_eq!(res.lesion_masks[3].count(), 16);
    // JSON field names are the result's.
    let v = serde_json::to_value(&res).unwrap();
    for k in ["lesions", "lung_volume_ml", "lesion_volume_ml", "involvement_percent", "positive_slices", "positive"] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    for k in ["id", "volume_ml", "mean_hu", "first_slice", "last_slice", "centroid_mm", "side"] {
        assert!(v["lesions"][0].get(k).is_some(), "missing lesions[].{k}");
    }
    assert!(v.get("lesion_masks").is_none());
}

#[test]
fn diagonal_touch_across_slices_joins_with_26_connectivity() {
    let lung = vec![true; N * N];
    // Slice 0: pixel (10,10); slice 1: pixel (11,11) — only a corner (3D diagonal) touches.
    let s0 = rect(10, 11, 10, 11);
    let s1 = rect(11, 12, 11, 12);
    // Slice 2: (20,20) and (21,22): in-plane they do not touch (column gap of 1).
    let s2 = or(&rect(20, 21, 20, 21), &rect(21, 22, 22, 23));
    // Slice 3: an in-plane diagonal pair (5,5),(6,6): 8-connected → one component.
    let s3 = or(&rect(5, 6, 5, 6), &rect(6, 7, 6, 7));
    let slices = vec![
        placed(0.0, &lung, &s0, 0.0),
        placed(1.0, &lung, &s1, 0.0),
        placed(2.0, &lung, &s2, 0.0),
        placed(3.0, &lung, &s3, 0.0),
    ];
    let res = analyse_series(&slices, &params(0.0));
    // {s0+s1}, s2 (20,20), s2 (21,22), s3 pair → 4 components. (s2 (20,20) vs s1 (11,11): far apart; s3 vs s2: far.)
    assert_eq!(res.lesions.len(), 4, "{:?}", res.lesions);
    assert_eq!((res.lesions[0].first_slice, res.lesions[0].last_slice), (0, 1));
    assert!((res.lesions[0].volume_ml - 0.002).abs() < 1e-12);
    // Slices two apart never connect: move s1 away and s0/s2 stay separate.
    let slices =
        vec![placed(0.0, &lung, &s0, 0.0), placed(1.0, &lung, &vec![false; N * N], 0.0), placed(2.0, &lung, &s0, 0.0)];
    assert_eq!(analyse_series(&slices, &params(0.0)).lesions.len(), 2);
}

#[test]
fn tiny_component_is_dropped_and_not_counted() {
    let lung = vec![true; N * N];
    let big = rect(2, 12, 2, 12); // 100 voxels per slice × 3 slices = 0.3 mL
    let tiny = rect(25, 26, 25, 27); // 2 voxels on one slice = 0.002 mL
    let slices: Vec<PlacedSlice> =
        (0..3).map(|z| placed(z as f64, &lung, &if z == 1 { or(&big, &tiny) } else { big.clone() }, -500.0)).collect();
    let res = analyse_series(&slices, &params(0.01));
    assert_eq!(res.lesions.len(), 1);
    assert!((res.lesion_volume_ml - 0.3).abs() < 1e-9);
    assert_eq!(res.lesion_masks[1].count(), 100, "dropped pixels are no longer lesion");
    assert!(!res.lesion_masks[1].get(25, 25));
    // ... but they still count as lung.
    assert!((res.lung_volume_ml - 3.0 * 1024.0 / 1000.0).abs() < 1e-9);
    // Without the filter both survive.
    assert_eq!(analyse_series(&slices, &params(0.0)).lesions.len(), 2);
}

#[test]
fn involvement_threshold_no_lung_and_spacing() {
    // No lung at all → involvement 0, negative.
    let empty = vec![false; N * N];
    let res = analyse_series(&[placed(0.0, &empty, &empty, 0.0)], &params(0.0));
    assert_eq!(res.involvement_percent, 0.0);
    assert!(!res.positive);
    assert!(res.lesions.is_empty() && res.positive_slices.is_empty());
    // Single slice: the voxel depth is the slice thickness (2.5 mm here).
    let lung = rect(0, 10, 0, 10);
    let mut s = placed(0.0, &lung, &empty, 0.0);
    s.slice_thickness = Some(2.5);
    let res = analyse_series(&[s], &params(0.0));
    assert!((res.lung_volume_ml - 0.25).abs() < 1e-12);
    assert_eq!(res.slice_spacing_mm, 2.5);
    // Spacing = median gap: positions 0, 2, 4, 10 → gaps 2, 2, 6 → 2 mm.
    let slices: Vec<PlacedSlice> = [0.0, 2.0, 4.0, 10.0].iter().map(|&z| placed(z, &lung, &empty, 0.0)).collect();
    let res = analyse_series(&slices, &params(0.0));
    assert_eq!(res.slice_spacing_mm, 2.0);
    assert!((res.lung_volume_ml - 4.0 * 0.2).abs() < 1e-12);
    // 1 lesion voxel (0.002 mL) in 0.4 mL of lung = 0.5 %: positive at 0.4 %, not at 0.5 %.
    let les = rect(0, 1, 0, 1);
    let mut slices: Vec<PlacedSlice> = [0.0, 2.0].iter().map(|&z| placed(z, &lung, &empty, 0.0)).collect();
    slices[0] = placed(0.0, &lung, &les, 0.0);
    let res = analyse_series(&slices, &params(0.0));
    assert!((res.involvement_percent - 0.5).abs() < 1e-9, "{}", res.involvement_percent);
    assert!(res.positive);
    let res = analyse_series(
        &slices,
        &AnalysisParams {
            min_lesion_volume_ml: 0.0,
            positive_threshold_percent: 0.5,
            lesion_min_hu: None,
            partial_volume_rule: false,
        },
    );
    assert!(!res.positive, "exactly at the threshold is not above it");
}

#[test]
fn upsampling_and_argmax_on_a_hand_built_score_map() {
    // 2×2 model output, 3 classes, upsampled to 4×4.
    // background high in the top-left model pixel, lung elsewhere, lesion very high in the bottom-right.
    let (h, w) = (2, 2);
    let bg = [5.0, 0.0, 0.0, 0.0];
    let lung = [0.0, 5.0, 5.0, 0.0];
    let lesion = [0.0, 0.0, 0.0, 10.0];
    let scores: Vec<f32> = bg.iter().chain(&lung).chain(&lesion).copied().collect();
    let hu: Vec<f32> = (0..16).map(|i| i as f32 * 10.0).collect();
    let slice = HuSlice::from_hu(4, 4, hu);
    let seg = segment_slice(&scores, 3, h, w, &slice);
    // Half-pixel centres: output pixel 0 maps to source -0.25 (clamped 0) → exactly model pixel (0,0);
    // output 1 → 0.25, 2 → 0.75, 3 → 1.25 (clamped 1).
    // (0,0): bg 5 → background. (3,3): lesion 10 → lesion. (0,3): lung 5 → lung.
    assert!(!seg.lung.get(0, 0) && !seg.lesion.get(0, 0));
    assert!(seg.lesion.get(3, 3) && seg.lung.get(3, 3), "lesion implies lung");
    assert!(seg.lung.get(0, 3) && !seg.lesion.get(0, 3));
    // (1,1): src (0.25,0.25): bg = 5·.75·.75 = 2.8125, lung = 5·(.75·.25+.25·.75) = 1.875, lesion = 10·.0625 = .625
    assert!(!seg.lung.get(1, 1));
    // (2,2): src (.75,.75): bg .3125, lung 1.875, lesion 5.625 → lesion
    assert!(seg.lesion.get(2, 2));
    // (1,2): src (.25,.75): bg 5·.75·.25=.9375, lung 5·(.75·.75+.25·.25)=3.125, lesion 10·.25·.75=1.875 → lung
    assert!(seg.lung.get(1, 2) && !seg.lesion.get(1, 2));
    // Lesion HU kept in raster order.
    let expected: Vec<f32> = (0..16).filter(|i| seg.lesion.get(i / 4, i % 4)).map(|i| i as f32 * 10.0).collect();
    assert_eq!(seg.lesion_hu, expected);
    assert!(seg.lesion_hu.contains(&150.0));
    // max lesion probability: softmax(0,0,10) at the bottom-right model pixel.
    let p = 10f32.exp() / (2.0 + 10f32.exp());
    assert!((seg.max_lesion_probability - p).abs() < 1e-6);
}

#[test]
fn bitmask_is_small_for_a_large_series() {
    // 300 slices of 512² stay under 20 MB of mask memory (two masks per slice).
    let m = BitMask::new(512, 512);
    assert_eq!(m.heap_bytes(), 512 * 512 / 8);
    assert!(300 * 2 * m.heap_bytes() < 20 << 20);
}

#[test]
fn regional_involvement_by_lung_and_zone_and_severity_score() {
    // Two lungs: patient right = low x (cols 2..14), patient left = high x (cols 18..30), 9 slices z = 0..8 (z up).
    // A lesion fills the right lung's rows 4..12 (half of its 16 rows) on the lowest 3 slices (its lower third),
    // and the left lung has a small lesion (2×2) on the top slice.
    let right = rect(4, 20, 2, 14);
    let left = rect(4, 20, 18, 30);
    let lungs = or(&right, &left);
    let slices: Vec<PlacedSlice> = (0..9)
        .map(|z| {
            let mut les = vec![false; N * N];
            if z < 3 {
                les = or(&les, &rect(4, 12, 2, 14));
            }
            if z == 8 {
                les = or(&les, &rect(10, 12, 20, 22));
            }
            placed(z as f64, &lungs, &les, -500.0)
        })
        .collect();
    let r = analyse_series(&slices, &params(0.0));
    let g = &r.regional;
    let by = |lung: &str, zone: &str| {
        g.lungs.iter().chain(&g.zones).find(|x| x.lung == lung && x.zone == zone).unwrap().clone()
    };
    // Right lung: 16×12 px × 9 slices = 1.728 mL; lesion 8×12 × 3 = 0.288 mL → 16.67 %.
    let rw = by("right", "whole");
    assert!((rw.lung_volume_ml - 1.728).abs() < 1e-9, "{rw:?}");
    assert!((rw.involvement_percent - 100.0 / 6.0).abs() < 1e-6, "{rw:?}");
    // All of it in the lower third: 50 % there, none above.
    assert!((by("right", "lower").involvement_percent - 50.0).abs() < 1e-6);
    assert_eq!(by("right", "upper").lesion_volume_ml, 0.0);
    assert_eq!(by("right", "middle").lesion_volume_ml, 0.0);
    // Left: 4 px on the top slice → upper third, 4 / (192×3) = 0.69 %.
    assert!((by("left", "upper").involvement_percent - 400.0 / 576.0).abs() < 1e-6);
    assert_eq!(by("left", "lower").lesion_volume_ml, 0.0);
    // Zones split each lung's volume in thirds.
    for z in ["upper", "middle", "lower"] {
        assert!((by("left", z).lung_volume_ml - 0.576).abs() < 1e-9);
    }
    // Chung-style score: RLL 50 % → 4, LUL (upper+middle: 4 / 1152 = 0.35 %) → 1, others 0 → 5.
    let score = |l: &str| g.lobes.iter().find(|x| x.lobe == l).unwrap().score;
    assert_eq!((score("RUL"), score("RML"), score("RLL"), score("LUL"), score("LLL")), (0, 0, 4, 1, 0));
    assert_eq!(g.severity_score, 5);
    assert!(g.score_basis.contains("lobe proxies"));
    // The totals are unchanged by the split.
    let sum: f64 = g.lungs.iter().map(|x| x.lesion_volume_ml).sum();
    assert!((sum - r.lesion_volume_ml).abs() < 1e-9);
}

#[test]
fn isolated_lung_labelled_blobs_are_dropped_with_their_lesions() {
    // Two lungs on slices 5..15; a small separate "lung" blob (bowel gas called lung by the model) on slices
    // 0..2, not touching the lungs, holding a "lesion".
    let lungs = or(&rect(4, 20, 2, 14), &rect(4, 20, 18, 30));
    let blob = rect(26, 30, 14, 18);
    let slices: Vec<PlacedSlice> = (0..15)
        .map(|z| {
            if z < 3 {
                placed(z as f64, &blob, &rect(27, 29, 15, 17), -300.0)
            } else if z >= 5 {
                placed(z as f64, &lungs, &vec![false; N * N], 0.0)
            } else {
                placed(z as f64, &vec![false; N * N], &vec![false; N * N], 0.0)
            }
        })
        .collect();
    // Every blob counts as a component; with only two lungs and one blob, the blob is the third largest and
    // smaller than 5 % of the largest lung (48 vs 1920 voxels): dropped, and its lesion with it.
    let r = analyse_series(&slices, &params(0.0));
    assert!((r.dropped_lung_ml - 0.048).abs() < 1e-9, "{}", r.dropped_lung_ml);
    assert!((r.lung_volume_ml - 3.84).abs() < 1e-9, "{}", r.lung_volume_ml);
    assert_eq!(r.lesion_volume_ml, 0.0);
    assert!(r.lesions.is_empty());
    assert!(!r.positive);
}

#[test]
fn lesion_pixels_below_the_hu_floor_count_as_lung() {
    // One 4×4 lesion on 3 slices at 1 mm: its left half at -850 HU (aerated lung), its right half at -500 HU.
    let lung = vec![true; N * N];
    let les = rect(10, 14, 10, 14);
    let slices: Vec<PlacedSlice> = (0..3)
        .map(|z| {
            let mut s = placed(z as f64, &lung, &les, 0.0);
            // lesion_hu follows the lesion's pixels in raster order: 4 rows of [-850, -850, -500, -500]
            s.segmentation.lesion_hu = (0..16).map(|i| if i % 4 < 2 { -850.0 } else { -500.0 }).collect();
            s
        })
        .collect();
    let without = analyse_series(&slices, &params(0.0));
    assert!((without.lesion_volume_ml - 0.048).abs() < 1e-9, "{}", without.lesion_volume_ml);
    let floor = AnalysisParams { lesion_min_hu: Some(-700.0), ..params(0.0) };
    let with = analyse_series(&slices, &floor);
    assert_eq!(with.lesions.len(), 1);
    assert!((with.lesion_volume_ml - 0.024).abs() < 1e-9, "{}", with.lesion_volume_ml);
    assert!((with.lesions[0].mean_hu + 500.0).abs() < 1e-9, "{}", with.lesions[0].mean_hu);
    // The aerated half stays lung: the lung volume does not change, the lesion masks hold the dense half only.
    assert!((with.lung_volume_ml - without.lung_volume_ml).abs() < 1e-12);
    assert_eq!(with.lesion_masks[1].count(), 8);
    assert!(with.lesion_masks[1].get(10, 12) && !with.lesion_masks[1].get(10, 11));
    // A floor above every lesion pixel leaves no lesion and a negative series.
    let all = analyse_series(&slices, &AnalysisParams { lesion_min_hu: Some(-400.0), ..params(0.0) });
    assert!(all.lesions.is_empty() && !all.positive);
}

/// Ten 1 mm axial slices of whole-plane lung, except that the slice at patient z = `dome_z` has a 8×8 block of
/// tissue (no lung) in the middle, and a 4×4 lesion over that block on the slices at `lesion_z`. With
/// `flip_normal`, the slice normal points to the feet (position along it = -z), so position order runs head to foot.
fn dome_series(dome_z: usize, lesion_z: &[usize], flip_normal: bool) -> Vec<PlacedSlice> {
    let les = rect(10, 14, 10, 14);
    let none = vec![false; N * N];
    let dome = rect(8, 16, 8, 16);
    (0..10)
        .map(|z| {
            let lung: Vec<bool> = if z == dome_z { dome.iter().map(|d| !d).collect() } else { vec![true; N * N] };
            let lesion = if lesion_z.contains(&z) { &les } else { &none };
            let mut s = placed(z as f64, &lung, lesion, -500.0);
            if flip_normal {
                s.image_orientation = [1.0, 0.0, 0.0, 0.0, -1.0, 0.0];
                s.position_mm = -(z as f64);
            }
            s
        })
        .collect()
}

#[test]
fn a_lesion_one_slice_thick_on_the_tissue_below_is_partial_volume() {
    let rule = AnalysisParams { partial_volume_rule: true, ..params(0.0) };
    for flip in [false, true] {
        // A 4×4 patch on the slice just above the dome: every voxel has tissue directly below it.
        let thin = dome_series(0, &[1], flip);
        let off = analyse_series(&thin, &params(0.0));
        assert_eq!(off.lesions.len(), 1, "flip {flip}");
        let on = analyse_series(&thin, &rule);
        assert!(on.lesions.is_empty() && on.lesion_volume_ml == 0.0, "flip {flip}: {:?}", on.lesions);
        assert!((on.partial_volume_ml - 0.016).abs() < 1e-9, "flip {flip}: {}", on.partial_volume_ml);
        // It stays lung: the lung volume is the same with the rule as without.
        assert!((on.lung_volume_ml - off.lung_volume_ml).abs() < 1e-12);
        // A lesion three slices deep resting on the same dome is a lesion of the lung: a third of it is on tissue.
        let deep = analyse_series(&dome_series(0, &[1, 2, 3], flip), &rule);
        assert_eq!(deep.lesions.len(), 1, "flip {flip}");
        assert!((deep.lesion_volume_ml - 0.048).abs() < 1e-9);
        assert_eq!(deep.partial_volume_ml, 0.0);
        // Tissue above a lesion (the dome on the slice over it, toward the head) is not what the rule looks at.
        let above = analyse_series(&dome_series(9, &[8], flip), &rule);
        assert_eq!(above.lesions.len(), 1, "flip {flip}");
        // The lowest slice of the series has nothing below it to judge by: its lesion stays.
        let lowest = analyse_series(&dome_series(5, &[0], flip), &rule);
        assert_eq!(lowest.lesions.len(), 1, "flip {flip}");
    }
    // A gap of more than 1.5 spacings between the lesion's slice and the one below: no neighbour, the lesion stays.
    let mut gapped = dome_series(0, &[1], false);
    gapped[0].position_mm = -3.0;
    gapped[0].image_position[2] = -3.0;
    assert_eq!(analyse_series(&gapped, &rule).lesions.len(), 1);
    // A single slice never counts as resting on tissue.
    let single = vec![dome_series(0, &[1], false).swap_remove(1)];
    assert_eq!(analyse_series(&single, &rule).lesions.len(), 1);
}
