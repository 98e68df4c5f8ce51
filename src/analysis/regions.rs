//! regions — where the involvement is: per lung (right/left), per zone (upper/middle/lower third of each lung's
//! cranio-caudal extent), and a CT severity score in the style of Chung et al. 2020 (five lobes × 0–5).
//!
//! Owns: splitting the lung and surviving-lesion masks by side (the lungs' mid-line in patient x) and by zone,
//! and scoring. The five lobes are approximated by zones (`score_basis` says so in every result): right upper /
//! middle / lower lobe = the right lung's upper / middle / lower third; left upper lobe (with the lingula) = the
//! left lung's upper and middle thirds; left lower lobe = its lower third. No lobe model is used.
//! Never: segments anything or changes the series totals.

use serde::{Deserialize, Serialize};

use super::{BitMask, PlacedSlice};

/// What the severity score's lobes stand for.
pub const SCORE_BASIS: &str = "zones as lobe proxies: thirds of each lung's cranio-caudal extent \
(RUL/RML/RLL = right upper/middle/lower third; LUL = left upper + middle third; LLL = left lower third); no lobe model";

/// Lung and lesion volume of one region.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegionInvolvement {
    /// "right" / "left" (patient sides).
    pub lung: String,
    /// "whole", "upper", "middle" or "lower".
    pub zone: String,
    /// Lung volume in the region (lesion included), mL.
    pub lung_volume_ml: f64,
    /// Surviving lesion volume in the region, mL.
    pub lesion_volume_ml: f64,
    /// lesion / lung × 100 (0 when the region has no lung).
    pub involvement_percent: f64,
    /// Volume-weighted centre of the region's lung voxels, patient LPS mm (whole lungs only; follow-up aligns
    /// studies with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub centroid_mm: Option<[f64; 3]>,
}

/// One lobe's score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LobeScore {
    /// RUL, RML, RLL, LUL, LLL.
    pub lobe: String,
    /// Involvement of the lobe proxy, %.
    pub involvement_percent: f64,
    /// 0 none, 1 < 5 %, 2 5–25 %, 3 26–49 %, 4 50–75 %, 5 > 75 %.
    pub score: u8,
}

/// Regional involvement and severity score of a series.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Regional {
    /// Right and left lung.
    pub lungs: Vec<RegionInvolvement>,
    /// Upper/middle/lower of the right lung, then of the left.
    pub zones: Vec<RegionInvolvement>,
    /// Sum of the five lobe scores, 0–25.
    pub severity_score: u8,
    /// The five lobe scores.
    pub lobes: Vec<LobeScore>,
    /// What the lobes are (see [`SCORE_BASIS`]).
    pub score_basis: String,
}

/// Chung et al.'s 0–5 lobe score of an involvement percentage.
pub fn lobe_score(percent: f64, any_lesion: bool) -> u8 {
    if !any_lesion || percent <= 0.0 {
        0
    } else if percent < 5.0 {
        1
    } else if percent <= 25.0 {
        2
    } else if percent < 50.0 {
        3
    } else if percent <= 75.0 {
        4
    } else {
        5
    }
}

/// Per-slice, per-side voxel volumes (mL): lung and lesion.
#[derive(Debug, Clone, Copy, Default)]
struct SideVolumes {
    lung: [f64; 2],
    lesion: [f64; 2],
    /// Σ voxel_ml × LPS position of lung voxels, per side.
    moment: [[f64; 3]; 2],
}

/// Splits the kept `lungs` of `sorted` slices (position order) and their surviving `lesion_masks` by side of `midline_x` (patient x;
/// LPS: x grows towards the patient's left) and by thirds of each lung's extent along patient z (superior +).
pub fn regional(
    sorted: &[&PlacedSlice],
    lungs: &[BitMask],
    lesion_masks: &[BitMask],
    midline_x: f64,
    spacing_mm: f64,
) -> Regional {
    const RIGHT: usize = 0;
    const LEFT: usize = 1;
    let mut per_slice = Vec::with_capacity(sorted.len());
    let mut z = Vec::with_capacity(sorted.len());
    for (si, s) in sorted.iter().enumerate() {
        let seg = &s.segmentation;
        let voxel_ml = s.pixel_spacing[0] * s.pixel_spacing[1] * spacing_mm / 1000.0;
        let mut v = SideVolumes::default();
        for (r, c0, c1) in lungs[si].runs() {
            for c in c0..=c1 {
                let p = s.point(r as f64, c as f64);
                let side = if p[0] > midline_x { LEFT } else { RIGHT };
                v.lung[side] += voxel_ml;
                for k in 0..3 {
                    v.moment[side][k] += voxel_ml * p[k];
                }
                if lesion_masks.get(si).is_some_and(|m| m.rows == seg.rows && m.get(r, c)) {
                    v.lesion[side] += voxel_ml;
                }
            }
        }
        // Patient z of the slice centre (superior is +z in LPS).
        z.push(s.point(seg.rows as f64 / 2.0, seg.cols as f64 / 2.0)[2]);
        per_slice.push(v);
    }
    let names = ["right", "left"];
    let zone_names = ["upper", "middle", "lower"];
    let mut lungs = Vec::new();
    let mut zones = Vec::new();
    for side in [RIGHT, LEFT] {
        let mut whole = RegionInvolvement { lung: names[side].into(), zone: "whole".into(), ..Default::default() };
        // This lung's cranio-caudal extent.
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for (v, &zz) in per_slice.iter().zip(&z) {
            if v.lung[side] > 0.0 {
                lo = lo.min(zz);
                hi = hi.max(zz);
            }
        }
        let mut zr: Vec<RegionInvolvement> = zone_names
            .iter()
            .map(|n| RegionInvolvement { lung: names[side].into(), zone: (*n).into(), ..Default::default() })
            .collect();
        for (v, &zz) in per_slice.iter().zip(&z) {
            if v.lung[side] <= 0.0 {
                continue;
            }
            whole.lung_volume_ml += v.lung[side];
            whole.lesion_volume_ml += v.lesion[side];
            let m = whole.centroid_mm.get_or_insert([0.0; 3]);
            for k in 0..3 {
                m[k] += v.moment[side][k];
            }
            // 0 = upper third (highest z), 2 = lower third.
            let t = if hi > lo { (hi - zz) / (hi - lo) } else { 0.5 };
            let k = ((t * 3.0).floor() as usize).min(2);
            zr[k].lung_volume_ml += v.lung[side];
            zr[k].lesion_volume_ml += v.lesion[side];
        }
        if let Some(m) = whole.centroid_mm.as_mut() {
            for x in m.iter_mut() {
                *x /= whole.lung_volume_ml;
            }
        }
        for r in std::iter::once(&mut whole).chain(zr.iter_mut()) {
            r.involvement_percent =
                if r.lung_volume_ml > 0.0 { 100.0 * r.lesion_volume_ml / r.lung_volume_ml } else { 0.0 };
        }
        lungs.push(whole);
        zones.extend(zr);
    }
    // Lobe proxies: zones[0..3] right U/M/L, zones[3..6] left U/M/L.
    let merge = |idx: &[usize]| -> (f64, bool) {
        let (l, s): (f64, f64) =
            idx.iter().fold((0.0, 0.0), |(l, s), &i| (l + zones[i].lung_volume_ml, s + zones[i].lesion_volume_ml));
        (if l > 0.0 { 100.0 * s / l } else { 0.0 }, s > 0.0)
    };
    let lobes: Vec<LobeScore> = [("RUL", &[0][..]), ("RML", &[1]), ("RLL", &[2]), ("LUL", &[3, 4]), ("LLL", &[5])]
        .iter()
        .map(|(name, idx)| {
            let (p, any) = merge(idx);
            LobeScore { lobe: (*name).into(), involvement_percent: p, score: lobe_score(p, any) }
        })
        .collect();
    Regional {
        severity_score: lobes.iter().map(|l| l.score).sum(),
        lungs,
        zones,
        lobes,
        score_basis: SCORE_BASIS.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chung_bands() {
        assert_eq!(lobe_score(0.0, false), 0);
        assert_eq!(lobe_score(0.01, true), 1);
        assert_eq!(lobe_score(4.99, true), 1);
        assert_eq!(lobe_score(5.0, true), 2);
        assert_eq!(lobe_score(25.0, true), 2);
        assert_eq!(lobe_score(30.0, true), 3);
        assert_eq!(lobe_score(50.0, true), 4);
        assert_eq!(lobe_score(75.0, true), 4);
        assert_eq!(lobe_score(75.1, true), 5);
    }
}
