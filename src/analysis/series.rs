//! analysis::series — a series' segmented slices → its [`SeriesAnalysis`].
//! Owns: sorting the slices by position and the voxel depth (median spacing, else slice thickness); running the lung
//! guard and, beside it, the unguarded analysis whose figures the report keeps; per analysis: the plausible lungs and
//! their volume and mid-line, the 3D lesions (components of the lesion runs inside the kept lungs) with the small
//! ones dropped, each lesion's volume, mean HU, extent, centroid and side, involvement, positive slices and the flag,
//! and the regional figures (`regions`).
//! Hands on: [`SeriesAnalysis`] (serialisable; its field names are the result JSON's).
//! Never: segments a slice (that is `segment`) or decides what happens with a positive result.

use serde::{Deserialize, Serialize};

use super::components::{components_3d, plausible_lungs, Run};
use super::{lung_guard, regions, BitMask, SliceSegmentation};
use crate::config::AnalysisConfig;

/// A segmented slice with where it sits in the patient.
#[derive(Debug, Clone)]
pub struct PlacedSlice {
    /// The slice's masks.
    pub segmentation: SliceSegmentation,
    /// Position along the series' slice normal, mm (sorting key and spacing source).
    pub position_mm: f64,
    /// Image Position (Patient) of the first pixel, mm (LPS).
    pub image_position: [f64; 3],
    /// Image Orientation (Patient): row direction then column direction cosines.
    pub image_orientation: [f64; 6],
    /// Pixel Spacing: row spacing (between rows), column spacing (between columns), mm.
    pub pixel_spacing: [f64; 2],
    /// Slice Thickness, mm (voxel depth when the series has a single slice).
    pub slice_thickness: Option<f64>,
}

impl PlacedSlice {
    /// LPS coordinates of pixel (row, col) — `col` may be fractional (run sums).
    pub(super) fn point(&self, row: f64, col: f64) -> [f64; 3] {
        let o = &self.image_orientation;
        let p = &self.image_position;
        let (dr, dc) = (self.pixel_spacing[0], self.pixel_spacing[1]);
        [
            p[0] + o[0] * dc * col + o[3] * dr * row,
            p[1] + o[1] * dc * col + o[4] * dr * row,
            p[2] + o[2] * dc * col + o[5] * dr * row,
        ]
    }
}

/// Thresholds of the series analysis.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AnalysisParams {
    /// 3D lesion components smaller than this (mL) are dropped and no longer count as lesion.
    pub min_lesion_volume_ml: f64,
    /// Positive when involvement exceeds this percentage.
    pub positive_threshold_percent: f64,
    /// Lesion pixels less dense than this (HU) are aerated lung, not lesion (None: no floor).
    #[serde(default)]
    pub lesion_min_hu: Option<f64>,
    /// The partial-volume rule ([`PARTIAL_VOLUME_FRACTION`]): a lesion lying on non-lung tissue in the slice below
    /// it is a diaphragm or heart dome cut by the slice, counted as lung.
    #[serde(default)]
    pub partial_volume_rule: bool,
}

/// The partial-volume rule: a 3D lesion at least this share of whose voxels have, directly below them (the
/// adjacent caudal slice, same row and column), no lung is not lesion but lung. A slice that cuts the top of the
/// liver or heart dome averages soft tissue into the aerated lung above it: a round hazy patch, one slice thick,
/// that in 2D looks like ground glass (the largest false lesions of the validation normal Pancreas-CT-CB-001, issue
/// 26). A lesion of the lung has depth: at most the voxels of its lowest slice rest on tissue, so a lesion two slices
/// deep has about half. 0.9 asks for a component essentially one voxel layer thick over tissue, with a ragged
/// tenth allowed. Only on axial series with a caudal neighbour within 1.5 spacings on the same pixel grid; the lowest
/// slice of a series and single slices never count as resting on tissue.
pub const PARTIAL_VOLUME_FRACTION: f64 = 0.9;

impl From<&AnalysisConfig> for AnalysisParams {
    fn from(c: &AnalysisConfig) -> Self {
        AnalysisParams {
            min_lesion_volume_ml: c.min_lesion_volume_ml,
            positive_threshold_percent: c.positive_threshold_percent,
            lesion_min_hu: c.lesion_min_hu,
            partial_volume_rule: c.partial_volume_rule,
        }
    }
}

/// One 3D lesion (a connected component of lesion voxels that survived the minimum volume).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lesion {
    /// 1-based, in order of first appearance (lowest slice, then raster order).
    pub id: u32,
    /// Volume, mL.
    pub volume_ml: f64,
    /// Mean HU of its voxels.
    pub mean_hu: f64,
    /// First slice index (in position order) it appears on.
    pub first_slice: usize,
    /// Last slice index (in position order) it appears on.
    pub last_slice: usize,
    /// Centroid in patient coordinates (DICOM LPS), mm.
    pub centroid_mm: [f64; 3],
    /// "left" or "right" (patient side), relative to the lungs' mid-line.
    pub side: String,
}

/// The outcome of a series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesAnalysis {
    /// Lesions, largest first is not implied: ordered by id.
    pub lesions: Vec<Lesion>,
    /// Lung volume (lesion included), mL.
    pub lung_volume_ml: f64,
    /// Volume of the surviving lesions, mL.
    pub lesion_volume_ml: f64,
    /// lesion / lung × 100; 0 when no lung was found.
    pub involvement_percent: f64,
    /// Slice indices (position order) holding at least one surviving lesion voxel.
    pub positive_slices: Vec<usize>,
    /// involvement_percent > the positive threshold.
    pub positive: bool,
    /// Voxel depth used, mm (median spacing between positions; slice thickness for a single slice).
    pub slice_spacing_mm: f64,
    /// For each position-order index, the index of that slice in the input.
    pub slice_order: Vec<usize>,
    /// Surviving lesion mask per slice, position order (not part of the JSON result).
    #[serde(skip)]
    pub lesion_masks: Vec<BitMask>,
    /// Kept lung mask per slice (implausible components dropped), position order (not part of the JSON result).
    #[serde(skip)]
    pub lung_masks: Vec<BitMask>,
    /// Per-lung and per-zone involvement and the severity score.
    pub regional: regions::Regional,
    /// Volume of lung-labelled 3D components dropped as implausible (e.g. bowel gas below the diaphragm), mL.
    #[serde(default)]
    pub dropped_lung_ml: f64,
    /// What the lung guard (HU anatomy, [`lung_guard`]) did, with the figures it changed as they were without it.
    #[serde(default)]
    pub lung_guard: lung_guard::LungGuardReport,
    /// Volume of the lesion components the partial-volume rule counted as lung, mL (not part of the JSON result).
    #[serde(skip)]
    pub partial_volume_ml: f64,
}

/// For each slice (position order), the slice directly below it (caudal, lower patient z) when there is one the
/// partial-volume rule may look at: an axial series (slice normal within 25° of the patient's z axis), the two
/// slices adjacent in position order, at most 1.5 spacings apart, on the same pixel grid (size, spacing, in-plane
/// origin within half a pixel).
fn caudal_neighbours(sorted: &[&PlacedSlice], spacing: f64) -> Vec<Option<usize>> {
    let mut below = vec![None; sorted.len()];
    for i in 1..sorted.len() {
        let (a, b) = (sorted[i - 1], sorted[i]);
        let o = &a.image_orientation;
        let normal_z = o[0] * o[4] - o[1] * o[3];
        let gap = (b.position_mm - a.position_mm).abs();
        let same_grid = a.segmentation.rows == b.segmentation.rows
            && a.segmentation.cols == b.segmentation.cols
            && (a.pixel_spacing[0] - b.pixel_spacing[0]).abs() < 1e-3
            && (a.pixel_spacing[1] - b.pixel_spacing[1]).abs() < 1e-3
            && (a.image_position[0] - b.image_position[0]).abs() < a.pixel_spacing[1] / 2.0
            && (a.image_position[1] - b.image_position[1]).abs() < a.pixel_spacing[0] / 2.0;
        if normal_z.abs() < 0.9 || gap < 1e-6 || gap > 1.5 * spacing || !same_grid {
            continue;
        }
        if b.image_position[2] > a.image_position[2] {
            below[i] = Some(i - 1);
        } else {
            below[i - 1] = Some(i);
        }
    }
    below
}

/// Median of the gaps between consecutive sorted positions (ignoring duplicates), if any.
fn median_spacing(positions: &[f64]) -> Option<f64> {
    let mut gaps: Vec<f64> = positions.windows(2).map(|w| (w[1] - w[0]).abs()).filter(|g| *g > 1e-6).collect();
    if gaps.is_empty() {
        return None;
    }
    gaps.sort_by(|a, b| a.total_cmp(b));
    let n = gaps.len();
    Some(if n % 2 == 1 { gaps[n / 2] } else { (gaps[n / 2 - 1] + gaps[n / 2]) / 2.0 })
}

/// Runs the 3D analysis over a series' segmented slices (any order; they are sorted by position).
pub fn analyse_series(slices: &[PlacedSlice], params: &AnalysisParams) -> SeriesAnalysis {
    let mut order: Vec<usize> = (0..slices.len()).collect();
    order.sort_by(|&a, &b| slices[a].position_mm.total_cmp(&slices[b].position_mm));
    let sorted: Vec<&PlacedSlice> = order.iter().map(|&i| &slices[i]).collect();
    let positions: Vec<f64> = sorted.iter().map(|s| s.position_mm).collect();
    let spacing = median_spacing(&positions)
        .or_else(|| sorted.first().and_then(|s| s.slice_thickness).filter(|t| *t > 0.0))
        .unwrap_or(1.0);
    let voxel_ml = |s: &PlacedSlice| s.pixel_spacing[0] * s.pixel_spacing[1] * spacing / 1000.0;
    let model_lungs: Vec<&BitMask> = sorted.iter().map(|s| &s.segmentation.lung).collect();
    // The lung guard (HU anatomy) first; the same analysis on the model's own masks gives the unguarded figures.
    // The two are independent, so the unguarded one runs on its own thread meanwhile (the alert waits for both:
    // they are in the result it carries).
    let t0 = std::time::Instant::now();
    let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
    let (guarded, unguarded) = std::thread::scope(|scope| {
        let unguarded = scope.spawn(|| {
            let t = std::time::Instant::now();
            (analyse_sorted(&sorted, &model_lungs, params, spacing), ms(t))
        });
        let guarded = lung_guard::guard(&sorted, voxel_ml, spacing).map(|g| {
            let guard_ms = ms(t0);
            let t = std::time::Instant::now();
            let lungs: Vec<&BitMask> = g.lung.iter().collect();
            let r = analyse_sorted(&sorted, &lungs, params, spacing);
            tracing::debug!(guard_ms, guarded_ms = ms(t), "analysis: lung guard, guarded 3D analysis");
            (r, g.report)
        });
        let (unguarded, unguarded_ms) = unguarded.join().expect("unguarded analysis panicked");
        tracing::debug!(unguarded_ms, total_ms = ms(t0), slices = sorted.len(), "analysis: unguarded 3D analysis");
        (guarded, unguarded)
    });
    let mut r = match guarded {
        Some((mut r, report)) => {
            r.lung_guard = lung_guard::LungGuardReport {
                unguarded_lung_volume_ml: unguarded.lung_volume_ml,
                unguarded_lesion_volume_ml: unguarded.lesion_volume_ml,
                unguarded_involvement_percent: unguarded.involvement_percent,
                ..report
            };
            r
        }
        None => unguarded,
    };
    r.slice_order = order;
    r
}

/// The 3D analysis of slices in position order, with `lung_in` as each slice's lung mask (lesion pixels outside
/// the kept lungs do not count). `slice_order` and `lung_guard` are left for the caller.
fn analyse_sorted(
    sorted: &[&PlacedSlice],
    lung_in: &[&BitMask],
    params: &AnalysisParams,
    spacing: f64,
) -> SeriesAnalysis {
    let voxel_ml = |s: &PlacedSlice| s.pixel_spacing[0] * s.pixel_spacing[1] * spacing / 1000.0;

    // The lungs: 3D components of the lung masks that are plausibly lungs (see `plausible_lungs`).
    let (lungs, dropped_lung_ml) = plausible_lungs(sorted, lung_in, voxel_ml);
    // Lung volume and the lungs' mid-line (centre of their x extent in patient coordinates).
    let mut lung_volume_ml = 0.0;
    let (mut min_x, mut max_x) = (f64::INFINITY, f64::NEG_INFINITY);
    for (s, lung) in sorted.iter().zip(&lungs) {
        lung_volume_ml += lung.count() as f64 * voxel_ml(s);
        for (r, c0, c1) in lung.runs() {
            for c in [c0, c1] {
                let x = s.point(r as f64, c as f64)[0];
                min_x = min_x.min(x);
                max_x = max_x.max(x);
            }
        }
    }
    let midline_x = if min_x.is_finite() { (min_x + max_x) / 2.0 } else { f64::NAN };

    // Lesion runs per slice, each with its HU sum (and, for the partial-volume rule, how many of its pixels have no
    // lung directly below them).
    let below = if params.partial_volume_rule { caudal_neighbours(sorted, spacing) } else { vec![None; sorted.len()] };
    let mut on_tissue: Vec<u32> = Vec::new();
    let mut runs: Vec<Run> = Vec::new();
    let mut slice_runs: Vec<Vec<u32>> = Vec::with_capacity(sorted.len());
    for (si, s) in sorted.iter().enumerate() {
        let seg = &s.segmentation;
        let mut idx = Vec::new();
        let mut hu_offset = 0usize;
        let lung = &lungs[si];
        for (r, c0, c1) in seg.lesion.runs() {
            let len = c1 - c0 + 1;
            let hus = seg.lesion_hu.get(hu_offset..hu_offset + len);
            hu_offset += len;
            // Only the parts inside the kept lungs (lesion implies lung), and dense enough to be lesion.
            let counts = |c: usize| {
                lung.get(r, c)
                    && match (params.lesion_min_hu, hus) {
                        (Some(floor), Some(v)) => v[c - c0] as f64 >= floor,
                        _ => true,
                    }
            };
            let mut c = c0;
            while c <= c1 {
                if !counts(c) {
                    c += 1;
                    continue;
                }
                let start = c;
                let mut hu_sum = 0.0;
                while c <= c1 && counts(c) {
                    hu_sum += hus.map_or(0.0, |v| v[c - c0] as f64);
                    c += 1;
                }
                idx.push(runs.len() as u32);
                on_tissue.push(below[si].map_or(0, |b| (start..c).filter(|&k| !lungs[b].get(r, k)).count() as u32));
                runs.push(Run { slice: si, row: r, start, end: c - 1, hu_sum });
            }
        }
        slice_runs.push(idx);
    }
    let mut dsu = components_3d(sorted, &runs, &slice_runs);

    // Accumulate per component (root).
    #[derive(Default, Clone)]
    struct Acc {
        voxels: f64,
        on_tissue: f64,
        volume_ml: f64,
        hu_sum: f64,
        coord_sum: [f64; 3],
        first: usize,
        last: usize,
        seen: bool,
        order: usize,
    }
    let mut accs: std::collections::HashMap<u32, Acc> = std::collections::HashMap::new();
    for (i, run) in runs.iter().enumerate() {
        let root = dsu.find(i as u32);
        let s = sorted[run.slice];
        let len = (run.end - run.start + 1) as f64;
        let mid_col = (run.start + run.end) as f64 / 2.0;
        let p = s.point(run.row as f64, mid_col);
        let next_order = accs.len();
        let a = accs.entry(root).or_insert_with(|| Acc { first: run.slice, order: next_order, ..Default::default() });
        if !a.seen {
            a.seen = true;
            a.first = run.slice;
        }
        a.voxels += len;
        a.on_tissue += on_tissue[i] as f64;
        a.volume_ml += len * voxel_ml(s);
        a.hu_sum += run.hu_sum;
        for k in 0..3 {
            a.coord_sum[k] += p[k] * len;
        }
        a.first = a.first.min(run.slice);
        a.last = a.last.max(run.slice);
    }
    let mut comps: Vec<(u32, Acc)> = accs.into_iter().collect();
    comps.sort_by_key(|(_, a)| a.order);
    let mut kept_roots = std::collections::HashSet::new();
    let mut lesions = Vec::new();
    let mut lesion_volume_ml = 0.0;
    let mut partial_volume_ml = 0.0;
    for (root, a) in comps {
        if a.volume_ml < params.min_lesion_volume_ml {
            continue;
        }
        if params.partial_volume_rule && a.on_tissue >= PARTIAL_VOLUME_FRACTION * a.voxels {
            partial_volume_ml += a.volume_ml;
            continue;
        }
        kept_roots.insert(root);
        let centroid = [a.coord_sum[0] / a.voxels, a.coord_sum[1] / a.voxels, a.coord_sum[2] / a.voxels];
        let side = if centroid[0] > midline_x { "left" } else { "right" };
        lesion_volume_ml += a.volume_ml;
        lesions.push(Lesion {
            id: lesions.len() as u32 + 1,
            volume_ml: a.volume_ml,
            mean_hu: a.hu_sum / a.voxels,
            first_slice: a.first,
            last_slice: a.last,
            centroid_mm: centroid,
            side: side.to_string(),
        });
    }

    let mut lesion_masks: Vec<BitMask> =
        sorted.iter().map(|s| BitMask::new(s.segmentation.rows, s.segmentation.cols)).collect();
    let mut positive = vec![false; sorted.len()];
    for (i, run) in runs.iter().enumerate() {
        if kept_roots.contains(&dsu.find(i as u32)) {
            positive[run.slice] = true;
            for c in run.start..=run.end {
                lesion_masks[run.slice].set(run.row, c, true);
            }
        }
    }
    let involvement_percent = if lung_volume_ml > 0.0 { lesion_volume_ml / lung_volume_ml * 100.0 } else { 0.0 };
    let regional = regions::regional(sorted, &lungs, &lesion_masks, midline_x, spacing);
    SeriesAnalysis {
        lesions,
        lung_volume_ml,
        lesion_volume_ml,
        involvement_percent,
        positive_slices: positive.iter().enumerate().filter(|(_, p)| **p).map(|(i, _)| i).collect(),
        positive: involvement_percent > params.positive_threshold_percent,
        slice_spacing_mm: spacing,
        slice_order: Vec::new(),
        lesion_masks,
        regional,
        dropped_lung_ml,
        lung_masks: lungs,
        lung_guard: lung_guard::LungGuardReport::default(),
        partial_volume_ml,
    }
}
