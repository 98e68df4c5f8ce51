//! analysis::components — horizontal runs of a series' masks joined into 3D components (8-connectivity in-plane,
//! 26-connectivity between adjacent slices of the same size), and the lung rule built on them.
//! Owns: the run list and its disjoint-set forest ([`Run`], [`Dsu`], [`components_3d`], shared with the lung guard)
//! and [`plausible_lungs`] (the two largest lung components and every other one of at least 5 % of the largest).
//! Hands on: components (as forest roots) to `series` (3D lesions) and `lung_guard`; the kept lung masks to `series`.
//! Never: measures lesions or decides the flag (that is `series`).

use super::{BitMask, PlacedSlice};

/// Joins `runs` (indices per slice in `slice_runs`, raster order) into 3D components: 8-connectivity in-plane,
/// 26-connectivity between adjacent slices of the same size.
pub(super) fn components_3d(sorted: &[&PlacedSlice], runs: &[Run], slice_runs: &[Vec<u32>]) -> Dsu {
    let mut dsu = Dsu { parent: (0..runs.len() as u32).collect() };
    for si in 0..sorted.len() {
        link_runs(runs, &slice_runs[si], &slice_runs[si], 1, &mut dsu, true);
        if si + 1 < sorted.len() {
            let (a, b) = (&sorted[si].segmentation, &sorted[si + 1].segmentation);
            if a.rows == b.rows && a.cols == b.cols {
                link_runs(runs, &slice_runs[si], &slice_runs[si + 1], 1, &mut dsu, false);
            }
        }
    }
    dsu
}

/// The 3D components of per-slice masks (position order): their runs, each run's component root (a run index), and
/// per root the component's volume (mL; 0 for a run that is not a root).
pub(super) struct MaskComponents {
    pub runs: Vec<Run>,
    pub roots: Vec<u32>,
    pub volume: Vec<f64>,
}

/// Runs of `masks` (position order, one per slice of `sorted`) joined by [`components_3d`], with their volumes.
pub(super) fn mask_components(
    sorted: &[&PlacedSlice],
    masks: &[&BitMask],
    voxel_ml: impl Fn(&PlacedSlice) -> f64,
) -> MaskComponents {
    let mut runs: Vec<Run> = Vec::new();
    let mut slice_runs: Vec<Vec<u32>> = Vec::with_capacity(sorted.len());
    for (si, mask) in masks.iter().enumerate() {
        let mut idx = Vec::new();
        for (r, c0, c1) in mask.runs() {
            idx.push(runs.len() as u32);
            runs.push(Run { slice: si, row: r, start: c0, end: c1, hu_sum: 0.0 });
        }
        slice_runs.push(idx);
    }
    let mut dsu = components_3d(sorted, &runs, &slice_runs);
    let roots: Vec<u32> = (0..runs.len() as u32).map(|i| dsu.find(i)).collect();
    let mut volume = vec![0f64; runs.len()];
    for (run, &root) in runs.iter().zip(&roots) {
        volume[root as usize] += (run.end - run.start + 1) as f64 * voxel_ml(sorted[run.slice]);
    }
    MaskComponents { runs, roots, volume }
}

/// Of the 3D components (26-connectivity) of the per-slice lung masks `lung_in` (position order: the lung guard's
/// output, or the model's masks when the guard does not apply), keeps the two largest and every other one of
/// at least 5 % of the largest's volume; the rest (isolated air-like blobs such as bowel gas or an oesophagus, which
/// the 2D model can call lung) are dropped. Returns the kept masks (position order) and the dropped volume (mL).
pub(super) fn plausible_lungs(
    sorted: &[&PlacedSlice],
    lung_in: &[&BitMask],
    voxel_ml: impl Fn(&PlacedSlice) -> f64,
) -> (Vec<BitMask>, f64) {
    // Per component, indexed by its root (a run index): volume, then whether it is kept.
    let MaskComponents { runs, roots, volume } = mask_components(sorted, lung_in, voxel_ml);
    let mut by_size: Vec<(u32, f64)> =
        (0..runs.len()).filter(|&i| roots[i] == i as u32).map(|i| (i as u32, volume[i])).collect();
    by_size.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let largest = by_size.first().map_or(0.0, |x| x.1);
    let mut keep = vec![false; runs.len()];
    let mut dropped = 0.0;
    for (i, &(root, v)) in by_size.iter().enumerate() {
        if i < 2 || v >= 0.05 * largest {
            keep[root as usize] = true;
        } else {
            dropped += v;
        }
    }
    let mut masks: Vec<BitMask> =
        sorted.iter().map(|s| BitMask::new(s.segmentation.rows, s.segmentation.cols)).collect();
    for (run, &root) in runs.iter().zip(&roots) {
        if keep[root as usize] {
            let at = run.row * masks[run.slice].cols;
            masks[run.slice].set_range(at + run.start, at + run.end + 1);
        }
    }
    (masks, dropped)
}

/// Disjoint-set forest over runs (a component is the runs under one root).
pub(super) struct Dsu {
    parent: Vec<u32>,
}

impl Dsu {
    pub(super) fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let p = self.parent[x as usize];
            self.parent[x as usize] = self.parent[p as usize];
            x = p;
        }
        x
    }
    fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
            self.parent[hi as usize] = lo;
        }
    }
}

/// One horizontal run of mask pixels (lesion, or lung for the lung rules).
pub(super) struct Run {
    /// Slice index (position order).
    pub(super) slice: usize,
    /// Row.
    pub(super) row: usize,
    /// First column.
    pub(super) start: usize,
    /// Last column, inclusive.
    pub(super) end: usize,
    /// Sum of the run's HU (lesion runs; 0 for lung runs).
    pub(super) hu_sum: f64,
}

/// Links runs of slice `a` rows to runs of slice `b` that touch with 8-connectivity in-plane (same slice, adjacent
/// rows) or 26-connectivity across slices (rows r−1..=r+1). `a_runs`/`b_runs` are indices into `runs`, raster order.
fn link_runs(runs: &[Run], a_runs: &[u32], b_runs: &[u32], row_delta_max: isize, dsu: &mut Dsu, same_slice: bool) {
    // Group b's runs by row for lookup.
    let mut j0 = 0usize;
    for &ia in a_runs {
        let ra = &runs[ia as usize];
        let lo_row = ra.row as isize - row_delta_max;
        let hi_row = ra.row as isize + row_delta_max;
        // advance the window start in b
        while j0 < b_runs.len() && (runs[b_runs[j0] as usize].row as isize) < lo_row {
            j0 += 1;
        }
        let mut j = j0;
        while j < b_runs.len() {
            let rb = &runs[b_runs[j] as usize];
            if rb.row as isize > hi_row {
                break;
            }
            if !(same_slice && rb.row == ra.row) && rb.start <= ra.end + 1 && ra.start <= rb.end + 1 {
                dsu.union(ia, b_runs[j]);
            }
            j += 1;
        }
    }
}
