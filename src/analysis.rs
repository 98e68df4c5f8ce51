//! analysis — from class scores to masks, 3D lesions, volumes and the involvement flag.
//!
//! Owns: upsampling each slice's score maps to native resolution and taking the argmax (lesion implies lung);
//! bit-packed masks; 3D lesion components (26-connectivity across adjacent slices) with the small ones dropped;
//! per-lesion volume, mean HU, extent, centroid and side; lung and lesion volumes; involvement and the positive flag.
//! Per-lung / per-zone involvement and the severity score: [`regions`]; comparison with a prior study: [`followup`].
//! Hands on: [`SeriesAnalysis`] (serialisable; its field names are the result JSON's) to `store`/`notify`.
//! Never: decodes pixels, runs the model, or decides what happens with a positive result.

pub mod followup;
pub mod lung_guard;
pub mod regions;

use serde::{Deserialize, Serialize};

use crate::config::AnalysisConfig;
use crate::preprocess::HuSlice;

/// Class channel of lung in the model output (manifest order: background, lung, lesion).
pub const LUNG_CLASS: usize = 1;
/// Class channel of lesion in the model output.
pub const LESION_CLASS: usize = 2;

/// A rows×cols binary mask, one bit per pixel (row-major).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitMask {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Bits, pixel i at word i / 64, bit i % 64.
    words: Vec<u64>,
}

impl BitMask {
    /// An all-zero mask.
    pub fn new(rows: usize, cols: usize) -> BitMask {
        BitMask { rows, cols, words: vec![0; (rows * cols).div_ceil(64)] }
    }

    /// Builds a mask from one bool per pixel (row-major).
    pub fn from_bools(rows: usize, cols: usize, px: &[bool]) -> BitMask {
        assert_eq!(px.len(), rows * cols, "BitMask::from_bools: length is not rows×cols");
        let mut m = BitMask::new(rows, cols);
        for (i, &b) in px.iter().enumerate() {
            if b {
                m.words[i / 64] |= 1 << (i % 64);
            }
        }
        m
    }

    /// Builds a mask from packed 32-bit words (pixel i at word i / 32, bit i % 32: the GPU decode kernel's
    /// layout); bits past rows×cols are ignored.
    pub fn from_u32_words(rows: usize, cols: usize, words: &[u32]) -> BitMask {
        assert!(words.len() * 32 >= rows * cols, "BitMask::from_u32_words: too few words for rows×cols");
        let mut m = BitMask::new(rows, cols);
        for (i, w) in m.words.iter_mut().enumerate() {
            let lo = words.get(2 * i).copied().unwrap_or(0) as u64;
            let hi = words.get(2 * i + 1).copied().unwrap_or(0) as u64;
            *w = lo | (hi << 32);
        }
        let n = rows * cols;
        if n % 64 != 0 {
            if let Some(last) = m.words.last_mut() {
                *last &= (1u64 << (n % 64)) - 1;
            }
        }
        m
    }

    /// Pixel (row, col).
    #[inline]
    pub fn get(&self, row: usize, col: usize) -> bool {
        self.get_index(row * self.cols + col)
    }

    /// Pixel by row-major index.
    #[inline]
    pub fn get_index(&self, i: usize) -> bool {
        (self.words[i / 64] >> (i % 64)) & 1 == 1
    }

    /// Sets pixel (row, col).
    #[inline]
    pub fn set(&mut self, row: usize, col: usize, value: bool) {
        let i = row * self.cols + col;
        if value {
            self.words[i / 64] |= 1 << (i % 64);
        } else {
            self.words[i / 64] &= !(1 << (i % 64));
        }
    }

    /// Sets pixels `from..to` (row-major indices), a word at a time.
    pub(crate) fn set_range(&mut self, from: usize, to: usize) {
        let mut i = from;
        while i < to {
            let (w, b) = (i / 64, i % 64);
            let n = (64 - b).min(to - i);
            let bits = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << b };
            self.words[w] |= bits;
            i += n;
        }
    }

    /// Number of set pixels.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// One bool per pixel.
    pub fn to_bools(&self) -> Vec<bool> {
        (0..self.rows * self.cols).map(|i| self.get_index(i)).collect()
    }

    /// Horizontal runs of set pixels in raster order: (row, first col, last col inclusive). Scans 64 pixels per
    /// step (the 3D analysis calls it for every mask of a series; pixel by pixel it was most of that analysis).
    pub fn runs(&self) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        for r in 0..self.rows {
            let (row_start, row_end) = (r * self.cols, (r + 1) * self.cols);
            let mut i = row_start;
            loop {
                let a = self.next_bit(i, row_end, true);
                if a >= row_end {
                    break;
                }
                let b = self.next_bit(a, row_end, false);
                out.push((r, a - row_start, b - 1 - row_start));
                i = b;
            }
        }
        out
    }

    /// The first pixel index in `from..end` whose bit equals `value`, or `end`.
    #[inline]
    fn next_bit(&self, from: usize, end: usize, value: bool) -> usize {
        let mut i = from;
        while i < end {
            let word = if value { self.words[i / 64] } else { !self.words[i / 64] };
            let rest = word >> (i % 64);
            if rest != 0 {
                return (i + rest.trailing_zeros() as usize).min(end);
            }
            i = (i / 64 + 1) * 64;
        }
        end
    }

    /// Bytes the mask holds (for memory accounting).
    pub fn heap_bytes(&self) -> usize {
        self.words.len() * 8
    }
}

/// A binary mask stored as its horizontal runs (row, first col, last col inclusive), 6 bytes per run: a lung mask of
/// a 512² slice is a few thousand runs (~10 KB against the bit mask's 32 KB) and a lesion mask usually a few
/// hundred. Series workers keep every received slice's masks in this form until the 3D analysis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMask {
    rows: usize,
    cols: usize,
    runs: Vec<[u16; 3]>,
}

impl RunMask {
    /// The runs of `m` (DICOM rows and columns are 16-bit, so every index fits).
    pub fn from_bitmask(m: &BitMask) -> RunMask {
        assert!(m.rows <= 1 << 16 && m.cols <= 1 << 16, "RunMask: more than 65536 rows or columns");
        let mut runs: Vec<[u16; 3]> = m.runs().into_iter().map(|(r, a, b)| [r as u16, a as u16, b as u16]).collect();
        runs.shrink_to_fit();
        RunMask { rows: m.rows, cols: m.cols, runs }
    }

    /// The bit mask again.
    pub fn to_bitmask(&self) -> BitMask {
        let mut m = BitMask::new(self.rows, self.cols);
        for &[r, a, b] in &self.runs {
            m.set_range(r as usize * self.cols + a as usize, r as usize * self.cols + b as usize + 1);
        }
        m
    }

    /// Bytes the runs hold (for memory accounting).
    pub fn heap_bytes(&self) -> usize {
        self.runs.capacity() * 6
    }
}

/// One slice's segmentation at native resolution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SliceSegmentation {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Lung, including lesion pixels (lesion implies lung).
    pub lung: BitMask,
    /// Lesion (before the 3D minimum-volume filter).
    pub lesion: BitMask,
    /// HU of each lesion pixel, in raster order of the lesion mask, so mean HU per 3D lesion needs no HU slice.
    pub lesion_hu: Vec<f32>,
    /// Highest lesion probability (softmax of the scores, at model resolution) anywhere in the slice.
    pub max_lesion_probability: f32,
    /// Air-density pixels inside the body contour less its gas pieces, from the HU slice
    /// ([`lung_guard::air_mask`]'s `candidate`); the lung guard's input at completion. `None` when the masks were made
    /// without HU (hand-built fixtures): the series is then analysed without the guard.
    #[serde(default)]
    pub air: Option<BitMask>,
    /// The lung guard's seeding of this slice done ahead, while the series streams in (see
    /// [`lung_guard::PreSeed`]); `None` when not made (then the guard seeds the slice at completion).
    #[serde(skip)]
    pub pre_seed: Option<lung_guard::PreSeed>,
}

/// Bilinear upsampling table (half-pixel centres, clamped): two source indices and the weight of the second.
pub(crate) fn upsample_table(src: usize, dst: usize) -> Vec<(usize, usize, f32)> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5).clamp(0.0, (src - 1) as f64);
            let s0 = f.floor() as usize;
            let s1 = (s0 + 1).min(src - 1);
            (s0, s1, (f - s0 as f64) as f32)
        })
        .collect()
}

/// Highest softmax probability of `class` over the pixels of one K×H×W score map.
pub fn max_class_probability(scores: &[f32], classes: usize, h: usize, w: usize, class: usize) -> f32 {
    let plane = h * w;
    let mut best = 0f32;
    // A pixel whose class score is far below its top score cannot beat `best` (its probability is at most
    // exp(score − top)): skipped without the exponentials. The margin keeps the skip exact in f32.
    let mut skip_below = f32::NEG_INFINITY;
    for p in 0..plane {
        let m = (0..classes).map(|k| scores[k * plane + p]).fold(f32::NEG_INFINITY, f32::max);
        if scores[class * plane + p] - m < skip_below {
            continue;
        }
        let denom: f32 = (0..classes).map(|k| (scores[k * plane + p] - m).exp()).sum();
        let prob = (scores[class * plane + p] - m).exp() / denom;
        if prob > best {
            best = prob;
            skip_below = if best > 0.0 { best.ln() - 1e-3 } else { f32::NEG_INFINITY };
        }
    }
    best
}

/// Per low-resolution pixel: the argmax class when it wins by a margin no f32 rounding of the bilinear
/// interpolation can undo, else `u8::MAX`. An output pixel whose four source pixels all carry the same class
/// takes it without interpolating: a convex combination of score vectors that all rank that class first by
/// such a margin ranks it first too. So the result is the same as interpolating every pixel.
fn sure_classes(scores: &[f32], classes: usize, plane: usize) -> Vec<u8> {
    (0..plane)
        .map(|p| {
            let (mut best, mut top, mut second, mut mag) = (0usize, f32::NEG_INFINITY, f32::NEG_INFINITY, 0f32);
            for k in 0..classes {
                let v = scores[k * plane + p];
                mag = mag.max(v.abs());
                if v > top {
                    second = top;
                    top = v;
                    best = k;
                } else if v > second {
                    second = v;
                }
            }
            // Interpolation error is a few ulp of the largest score involved; 1e-4 relative is far beyond it.
            let sure = top.is_finite() && second.is_finite() && top - second > 1e-4 * (1.0 + mag);
            if sure && best < u8::MAX as usize {
                best as u8
            } else {
                u8::MAX
            }
        })
        .collect()
}

/// Turns one slice's K×H×W scores (logits or probabilities, channel order background, lung, lesion) into masks at
/// the native rows×cols of `hu`: each class map is upsampled bilinearly (half-pixel centres), then argmax per
/// pixel (ties go to the lower class). Lesion pixels count as lung too; their HU values are kept.
/// Only pixels near a class boundary are interpolated (see `sure_classes`); the masks are the same.
pub fn segment_slice(scores: &[f32], classes: usize, h: usize, w: usize, hu: &HuSlice) -> SliceSegmentation {
    assert!(classes > LESION_CLASS, "segment_slice: need background, lung and lesion channels");
    assert_eq!(scores.len(), classes * h * w, "segment_slice: scores are not K×H×W");
    assert_eq!(hu.hu.len(), hu.rows * hu.cols, "segment_slice: HU slice is not rows×cols");
    let (rows, cols) = (hu.rows, hu.cols);
    let xt = upsample_table(w, cols);
    let yt = upsample_table(h, rows);
    let plane = h * w;
    let sure = sure_classes(scores, classes, plane);
    let mut lung = BitMask::new(rows, cols);
    let mut lesion = BitMask::new(rows, cols);
    let mut lesion_hu = Vec::new();
    let mut vals = vec![0f32; classes];
    for (r, &(y0, y1, fy)) in yt.iter().enumerate() {
        for (c, &(x0, x1, fx)) in xt.iter().enumerate() {
            let a = sure[y0 * w + x0];
            let best = if a != u8::MAX && a == sure[y0 * w + x1] && a == sure[y1 * w + x0] && a == sure[y1 * w + x1] {
                a as usize
            } else {
                for (k, v) in vals.iter_mut().enumerate() {
                    let m = &scores[k * plane..(k + 1) * plane];
                    let top = m[y0 * w + x0] * (1.0 - fx) + m[y0 * w + x1] * fx;
                    let bottom = m[y1 * w + x0] * (1.0 - fx) + m[y1 * w + x1] * fx;
                    *v = top * (1.0 - fy) + bottom * fy;
                }
                let mut best = 0;
                for k in 1..classes {
                    if vals[k] > vals[best] {
                        best = k;
                    }
                }
                best
            };
            if best == LESION_CLASS {
                lesion.set(r, c, true);
                lung.set(r, c, true);
                lesion_hu.push(hu.hu[r * cols + c]);
            } else if best == LUNG_CLASS {
                lung.set(r, c, true);
            }
        }
    }
    SliceSegmentation {
        rows,
        cols,
        lung,
        lesion,
        lesion_hu,
        max_lesion_probability: max_class_probability(scores, classes, h, w, LESION_CLASS),
        air: Some(lung_guard::air_mask(hu).candidate),
        pre_seed: None,
    }
}

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
    fn point(&self, row: f64, col: f64) -> [f64; 3] {
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
}

impl From<&AnalysisConfig> for AnalysisParams {
    fn from(c: &AnalysisConfig) -> Self {
        AnalysisParams {
            min_lesion_volume_ml: c.min_lesion_volume_ml,
            positive_threshold_percent: c.positive_threshold_percent,
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
}

/// Joins `runs` (indices per slice in `slice_runs`, raster order) into 3D components: 8-connectivity in-plane,
/// 26-connectivity between adjacent slices of the same size.
fn components_3d(sorted: &[&PlacedSlice], runs: &[Run], slice_runs: &[Vec<u32>]) -> Dsu {
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

/// Of the 3D components (26-connectivity) of the per-slice lung masks `lung_in` (position order: the lung guard's
/// output, or the model's masks when the guard does not apply), keeps the two largest and every other one of
/// at least 5 % of the largest's volume; the rest (isolated air-like blobs such as bowel gas or an oesophagus, which
/// the 2D model can call lung) are dropped. Returns the kept masks (position order) and the dropped volume (mL).
fn plausible_lungs(
    sorted: &[&PlacedSlice],
    lung_in: &[&BitMask],
    voxel_ml: impl Fn(&PlacedSlice) -> f64,
) -> (Vec<BitMask>, f64) {
    let mut runs: Vec<Run> = Vec::new();
    let mut slice_runs: Vec<Vec<u32>> = Vec::with_capacity(sorted.len());
    for (si, lung) in lung_in.iter().enumerate() {
        let mut idx = Vec::new();
        for (r, c0, c1) in lung.runs() {
            idx.push(runs.len() as u32);
            runs.push(Run { slice: si, row: r, start: c0, end: c1, hu_sum: 0.0 });
        }
        slice_runs.push(idx);
    }
    let mut dsu = components_3d(&sorted, &runs, &slice_runs);
    // Per component, indexed by its root (a run index): volume, then whether it is kept.
    let roots: Vec<u32> = (0..runs.len() as u32).map(|i| dsu.find(i)).collect();
    let mut volume = vec![0f64; runs.len()];
    for (run, &root) in runs.iter().zip(&roots) {
        volume[root as usize] += (run.end - run.start + 1) as f64 * voxel_ml(sorted[run.slice]);
    }
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

/// Disjoint-set forest over lesion runs.
struct Dsu {
    parent: Vec<u32>,
}

impl Dsu {
    fn find(&mut self, mut x: u32) -> u32 {
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

/// One horizontal run of lesion pixels.
struct Run {
    slice: usize,
    row: usize,
    start: usize,
    end: usize,
    hu_sum: f64,
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

    // Lesion runs per slice, each with its HU sum.
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
            // Only the parts inside the kept lungs (lesion implies lung).
            let mut c = c0;
            while c <= c1 {
                if !lung.get(r, c) {
                    c += 1;
                    continue;
                }
                let start = c;
                let mut hu_sum = 0.0;
                while c <= c1 && lung.get(r, c) {
                    hu_sum += hus.map_or(0.0, |v| v[c - c0] as f64);
                    c += 1;
                }
                idx.push(runs.len() as u32);
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
    for (root, a) in comps {
        if a.volume_ml < params.min_lesion_volume_ml {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition: every output pixel interpolated, then argmax (ties to the lower class).
    fn segment_slice_reference(
        scores: &[f32],
        classes: usize,
        h: usize,
        w: usize,
        hu: &HuSlice,
    ) -> (Vec<u8>, Vec<f32>) {
        let (xt, yt, plane) = (upsample_table(w, hu.cols), upsample_table(h, hu.rows), h * w);
        let (mut out, mut lesion_hu) = (Vec::new(), Vec::new());
        for (r, &(y0, y1, fy)) in yt.iter().enumerate() {
            for (c, &(x0, x1, fx)) in xt.iter().enumerate() {
                let v: Vec<f32> = (0..classes)
                    .map(|k| {
                        let m = &scores[k * plane..(k + 1) * plane];
                        let top = m[y0 * w + x0] * (1.0 - fx) + m[y0 * w + x1] * fx;
                        let bottom = m[y1 * w + x0] * (1.0 - fx) + m[y1 * w + x1] * fx;
                        top * (1.0 - fy) + bottom * fy
                    })
                    .collect();
                let best = (1..classes).fold(0, |b, k| if v[k] > v[b] { k } else { b });
                if best == LESION_CLASS {
                    lesion_hu.push(hu.hu[r * hu.cols + c]);
                }
                out.push(best as u8);
            }
        }
        (out, lesion_hu)
    }

    #[test]
    fn segment_slice_interpolating_only_near_boundaries_equals_the_definition() {
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for (trial, &(h, w, rows, cols)) in [(64, 64, 160, 160), (32, 48, 100, 75), (64, 64, 64, 64)].iter().enumerate()
        {
            let plane = h * w;
            let mut scores = vec![0f32; 3 * plane];
            for y in 0..h {
                for x in 0..w {
                    // Smooth blobs (large uniform regions), plus exact ties, near-ties and large magnitudes.
                    let (fy, fx) = (y as f64 / h as f64, x as f64 / w as f64);
                    let lung = 8.0 * ((fx * 6.0).sin() * (fy * 5.0).cos()) + rnd() - 0.5;
                    let lesion = 6.0 * ((fx * 9.0 + 1.0).cos() * (fy * 7.0).sin()) - 2.0 + rnd() - 0.5;
                    let mut v = [0.0f32, lung as f32, lesion as f32];
                    match (y * w + x) % 37 {
                        0 => v[2] = v[1],
                        1 => v[2] = v[1] + 1e-6,
                        2 => v = [v[0] * 1e4, v[1] * 1e4, v[2] * 1e4],
                        _ => {}
                    }
                    for k in 0..3 {
                        scores[k * plane + y * w + x] = v[k];
                    }
                }
            }
            let hu = HuSlice::from_hu(rows, cols, (0..rows * cols).map(|i| (i % 2000) as f32 - 1000.0).collect());
            let seg = segment_slice(&scores, 3, h, w, &hu);
            let (want, want_hu) = segment_slice_reference(&scores, 3, h, w, &hu);
            for r in 0..rows {
                for c in 0..cols {
                    let got = if seg.lesion.get(r, c) {
                        2
                    } else if seg.lung.get(r, c) {
                        1
                    } else {
                        0
                    };
                    assert_eq!(got, want[r * cols + c], "trial {trial} pixel ({r}, {c})");
                }
            }
            assert_eq!(seg.lesion_hu, want_hu, "trial {trial}");
            assert!(want.contains(&2) && want.contains(&1) && want.contains(&0), "trial {trial}: all classes present");
            // The maximum probability with skipped pixels, against every pixel's softmax.
            let full = (0..plane)
                .map(|p| {
                    let v: Vec<f32> = (0..3).map(|k| scores[k * plane + p]).collect();
                    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let d: f32 = v.iter().map(|x| (x - m).exp()).sum();
                    (v[2] - m).exp() / d
                })
                .fold(0f32, f32::max);
            assert_eq!(seg.max_lesion_probability, full, "trial {trial}");
        }
    }

    #[test]
    fn run_mask_round_trips_and_is_smaller_than_bits_for_lung_shapes() {
        // Two lung-like ellipses, a lesion blob, isolated pixels and runs touching both edges.
        let (rows, cols) = (512, 512);
        let mut m = BitMask::new(rows, cols);
        for r in 0..rows {
            for c in 0..cols {
                let (y, x) = (r as f64 - 256.0, c as f64);
                let left = ((x - 160.0) / 90.0).powi(2) + (y / 170.0).powi(2) < 1.0;
                let right = ((x - 352.0) / 90.0).powi(2) + (y / 170.0).powi(2) < 1.0;
                if left || right || c == 0 || c == cols - 1 || (r * 7 + c * 13) % 997 == 0 {
                    m.set(r, c, true);
                }
            }
        }
        // The word-at-a-time scan against the pixel-by-pixel definition.
        let mut naive = Vec::new();
        for r in 0..rows {
            let mut c = 0;
            while c < cols {
                if m.get(r, c) {
                    let s = c;
                    while c + 1 < cols && m.get(r, c + 1) {
                        c += 1;
                    }
                    naive.push((r, s, c));
                }
                c += 1;
            }
        }
        assert_eq!(m.runs(), naive);
        let packed = RunMask::from_bitmask(&m);
        assert_eq!(packed.to_bitmask(), m);
        // Odd sizes: rows that do not start on a word boundary, a full row, a single pixel at the very end.
        let mut odd = BitMask::new(7, 37);
        for c in 0..37 {
            odd.set(2, c, true);
        }
        for (r, c) in [(0, 36), (1, 0), (3, 5), (3, 6), (6, 36), (4, 27), (4, 28), (4, 29)] {
            odd.set(r, c, true);
        }
        assert_eq!(odd.runs(), vec![(0, 36, 36), (1, 0, 0), (2, 0, 36), (3, 5, 6), (4, 27, 29), (6, 36, 36)]);
        assert_eq!(RunMask::from_bitmask(&odd).to_bitmask(), odd);
        assert!(packed.heap_bytes() < m.heap_bytes() / 2, "{} vs {}", packed.heap_bytes(), m.heap_bytes());
        let empty = BitMask::new(rows, cols);
        let packed = RunMask::from_bitmask(&empty);
        assert_eq!(packed.heap_bytes(), 0);
        assert_eq!(packed.to_bitmask(), empty);
    }
}
