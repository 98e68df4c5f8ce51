//! lung_guard::seed — one slice's seeding (step 4 of the `lung_guard` module doc) on bit rows and runs: what
//! [`super::guard`] runs at completion, where the alert waits for it, and [`super::pre_seed`] while slices stream in.
//!
//! The same rule as the pixel seeding it replaced (`lung_guard::pixels`, kept as the reference), computed without
//! visiting pixels one by one: components are labelled on horizontal runs (union-find across adjacent rows),
//! dilations are runs widened in-row then rows OR-ed together 64 pixels per word, overlaps are popcounts, and holes
//! are the runs of unset pixels not connected to the image border. Every step is integer or bit arithmetic, and the
//! one floating-point step (a small piece's centre) adds the same integers, so the masks are the reference's bit for
//! bit (unit tests `the_row_*`, and the RICORD series in `tests/lung_guard.rs`). On the RICORD series (248 slices
//! 512², 212 seeded at completion) the seeding at completion takes 30–50 ms on the 2-core box against the pixel
//! seeding's 360–830 ms (the same box and load, `RUST_LOG=lungsentry=debug lungsentry analyze`).
//!
//! Owns: [`seed_with`], and the bit-row [`Plane`] it works on.
//! Hands on: (kept model lung, field, each small piece's centre and airway verdict in label order) to `guard_with`
//! and `pre_seed`.
//! Never: decides which air is kept (the 3D rule in `guard` does), or looks at HU.

use super::{radius_px, AIRWAY_MAX_CM2, NEAR_MM, SEED_DILATION_MM, WHOLE_OVERLAP_FRACTION};
use crate::analysis::{BitMask, PlacedSlice};

/// Horizontal runs of set pixels: (row, first column, last column inclusive), raster order.
type Runs = [(usize, usize, usize)];

/// One slice's share of [`super::guard`]: the kept air `k` less airway pieces (the airway rule is `airway_at` of a
/// small piece's centre x, patient mm), dilated into the lung field, and the model lung components it seeds.
/// Returns (kept model lung, field, each small piece's centre x and verdict, label order).
pub(super) fn seed_with(
    s: &PlacedSlice,
    k: &BitMask,
    airway_at: &dyn Fn(f64) -> bool,
) -> (BitMask, BitMask, Vec<(f64, bool)>) {
    let seg = &s.segmentation;
    let (rows, cols) = (seg.rows, seg.cols);
    let k_runs = k.runs();
    if k_runs.is_empty() {
        return (BitMask::new(rows, cols), BitMask::new(rows, cols), Vec::new());
    }
    let px_cm2 = s.pixel_spacing[0] * s.pixel_spacing[1] / 100.0;

    // Airways out: small kept pieces (8-connectivity) near the mid-line. A piece's centre is the mean of its pixels'
    // image row and column: integer sums, exact in f64 whatever the order they are added in.
    let (air_label, pieces) = label_runs(&k_runs, true);
    let mut size = vec![0u64; pieces];
    let mut sum_row = vec![0u64; pieces];
    let mut sum_col = vec![0u64; pieces];
    for (&(r, a, b), &l) in k_runs.iter().zip(&air_label) {
        let n = (b - a + 1) as u64;
        size[l as usize] += n;
        sum_row[l as usize] += r as u64 * n;
        // a + … + b; (a + b) and (b − a + 1) have opposite parities, so the product is even.
        sum_col[l as usize] += (a + b) as u64 * n / 2;
    }
    let mut small_pieces = Vec::new();
    let airway: Vec<bool> = (0..pieces)
        .map(|l| {
            let n = size[l] as f64;
            if n * px_cm2 >= AIRWAY_MAX_CM2 {
                return false;
            }
            let x = s.point(sum_row[l] as f64 / n, sum_col[l] as f64 / n)[0];
            let verdict = airway_at(x);
            small_pieces.push((x, verdict));
            verdict
        })
        .collect();
    let air: Vec<(usize, usize, usize)> =
        k_runs.iter().zip(&air_label).filter(|(_, &l)| !airway[l as usize]).map(|(&run, _)| run).collect();

    // The field, and the model's lung components (8-connectivity) it seeds.
    let field = Plane::dilated(rows, cols, &air, radius_px(s, SEED_DILATION_MM));
    let lung_runs = seg.lung.runs();
    let (model_label, components) = label_runs(&lung_runs, true);
    let mut model_size = vec![0usize; components];
    let mut overlap = vec![0usize; components];
    for (&(r, a, b), &l) in lung_runs.iter().zip(&model_label) {
        model_size[l as usize] += b - a + 1;
        overlap[l as usize] += field.count_in(r, a, b);
    }
    // A component with WHOLE_OVERLAP_FRACTION of its pixels in the field is kept whole; of the others, the pixels
    // within NEAR_MM of the kept air.
    let whole: Vec<bool> =
        (0..components).map(|l| overlap[l] as f64 >= WHOLE_OVERLAP_FRACTION * model_size[l] as f64).collect();
    let near = Plane::dilated(rows, cols, &air, radius_px(s, NEAR_MM));
    let mut kept = Plane::new(rows, cols);
    let mut partial = Plane::new(rows, cols);
    for (&(r, a, b), &l) in lung_runs.iter().zip(&model_label) {
        if whole[l as usize] {
            kept.set_run(r, a, b);
        } else {
            partial.set_run(r, a, b);
        }
    }
    partial.and(&near);
    kept.or(&partial);
    // Model pixels in the field or enclosed by the kept lung and the field (a lesion island the model set apart
    // inside a consolidation it called background) are kept too: the model within the field with its holes filled.
    let mut filled = kept.clone();
    filled.or(&field);
    let holes = filled.holes();
    filled.or(&holes);
    let mut model = Plane::new(rows, cols);
    for &(r, a, b) in &lung_runs {
        model.set_run(r, a, b);
    }
    model.and(&filled);
    kept.or(&model);
    (kept.to_bitmask(), field.to_bitmask(), small_pieces)
}

/// Connected components of `runs` (raster order), 8- or 4-connected across adjacent rows: each run's component,
/// numbered from 0 in the order of the components' first pixels in raster order (the order a pixel-by-pixel
/// labelling finds them), and the number of components.
pub(super) fn label_runs(runs: &Runs, eight: bool) -> (Vec<u32>, usize) {
    let mut parent: Vec<u32> = (0..runs.len() as u32).collect();
    fn find(parent: &mut [u32], mut i: u32) -> u32 {
        while parent[i as usize] != i {
            parent[i as usize] = parent[parent[i as usize] as usize];
            i = parent[i as usize];
        }
        i
    }
    // Two runs of adjacent rows touch when their column ranges, widened by one for 8-connectivity, overlap.
    let slack = eight as usize;
    // The runs of the row above the current one (empty when that row has none).
    let mut prev = 0..0;
    let mut i = 0;
    while i < runs.len() {
        let row = runs[i].0;
        let start = i;
        while i < runs.len() && runs[i].0 == row {
            i += 1;
        }
        if start == 0 || runs[start - 1].0 + 1 != row {
            prev = start..start;
        }
        let mut j = prev.start;
        for c in start..i {
            let (_, a, b) = runs[c];
            while j < prev.end && runs[j].2 + slack < a {
                j += 1;
            }
            let mut k = j;
            while k < prev.end && runs[k].1 <= b + slack {
                let (x, y) = (find(&mut parent, c as u32), find(&mut parent, k as u32));
                if x != y {
                    parent[x.max(y) as usize] = x.min(y);
                }
                k += 1;
            }
        }
        prev = start..i;
    }
    let mut id = vec![u32::MAX; runs.len()];
    let mut label = Vec::with_capacity(runs.len());
    let mut n = 0u32;
    for i in 0..runs.len() as u32 {
        let root = find(&mut parent, i) as usize;
        if id[root] == u32::MAX {
            id[root] = n;
            n += 1;
        }
        label.push(id[root]);
    }
    (label, n as usize)
}

/// A rows×cols binary mask stored a row at a time in 64-bit words (pixel (r, c) at word r × `words_per_row` + c / 64,
/// bit c % 64); the bits past `cols` in a row's last word are always 0.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Plane {
    rows: usize,
    cols: usize,
    words_per_row: usize,
    words: Vec<u64>,
}

impl Plane {
    pub(super) fn new(rows: usize, cols: usize) -> Plane {
        let words_per_row = cols.div_ceil(64);
        Plane { rows, cols, words_per_row, words: vec![0; rows * words_per_row] }
    }

    /// Sets columns `a..=b` of row `r`.
    pub(super) fn set_run(&mut self, r: usize, a: usize, b: usize) {
        let row = &mut self.words[r * self.words_per_row..(r + 1) * self.words_per_row];
        let (wa, wb) = (a / 64, b / 64);
        let lo = u64::MAX << (a % 64);
        let hi = u64::MAX >> (63 - b % 64);
        if wa == wb {
            row[wa] |= lo & hi;
        } else {
            row[wa] |= lo;
            row[wa + 1..wb].fill(u64::MAX);
            row[wb] |= hi;
        }
    }

    /// Set pixels among columns `a..=b` of row `r`.
    fn count_in(&self, r: usize, a: usize, b: usize) -> usize {
        let row = &self.words[r * self.words_per_row..(r + 1) * self.words_per_row];
        let (wa, wb) = (a / 64, b / 64);
        let lo = u64::MAX << (a % 64);
        let hi = u64::MAX >> (63 - b % 64);
        if wa == wb {
            return (row[wa] & lo & hi).count_ones() as usize;
        }
        let inner: u32 = row[wa + 1..wb].iter().map(|w| w.count_ones()).sum();
        ((row[wa] & lo).count_ones() + inner + (row[wb] & hi).count_ones()) as usize
    }

    fn and(&mut self, other: &Plane) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w &= o;
        }
    }

    fn or(&mut self, other: &Plane) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
    }

    /// `runs` dilated by a square of Chebyshev radius `r`, clipped to the image: each run widened by `r` in its row
    /// (clipped), then each row the OR of the widened rows within `r` of it.
    pub(super) fn dilated(rows: usize, cols: usize, runs: &Runs, r: usize) -> Plane {
        let mut h = Plane::new(rows, cols);
        for &(row, a, b) in runs {
            h.set_run(row, a.saturating_sub(r), (b + r).min(cols - 1));
        }
        if r == 0 {
            return h;
        }
        // Rows padded with r empty rows on each side: padded row p is image row p − r. After the doubling steps,
        // row p of `span` is the OR of padded rows p..p + len (past the end: empty); the output row y, the OR of
        // padded rows y..y + 2r + 1, is that of two windows of `len` ≥ half of 2r + 1 that cover it.
        let wpr = h.words_per_row;
        let padded_rows = rows + 2 * r;
        let mut span = vec![0u64; padded_rows * wpr];
        span[r * wpr..(r + rows) * wpr].copy_from_slice(&h.words);
        let mut len = 1;
        while 2 * len <= 2 * r + 1 {
            // Ascending rows: row p + len is read before it is updated.
            for p in 0..padded_rows.saturating_sub(len) {
                let (head, tail) = span.split_at_mut((p + len) * wpr);
                for (w, o) in head[p * wpr..(p + 1) * wpr].iter_mut().zip(&tail[..wpr]) {
                    *w |= o;
                }
            }
            len *= 2;
        }
        let second = 2 * r + 1 - len;
        for y in 0..rows {
            let out = &mut h.words[y * wpr..(y + 1) * wpr];
            let (first, last) = (&span[y * wpr..(y + 1) * wpr], &span[(y + second) * wpr..(y + second + 1) * wpr]);
            for ((o, a), b) in out.iter_mut().zip(first).zip(last) {
                *o = a | b;
            }
        }
        h
    }

    /// The first column in `from..cols` of row `r` whose pixel equals `value`, or `cols`.
    fn next(&self, r: usize, from: usize, value: bool) -> usize {
        let row = &self.words[r * self.words_per_row..(r + 1) * self.words_per_row];
        let mut c = from;
        while c < self.cols {
            let word = if value { row[c / 64] } else { !row[c / 64] };
            let rest = word >> (c % 64);
            if rest != 0 {
                return (c + rest.trailing_zeros() as usize).min(self.cols);
            }
            c = (c / 64 + 1) * 64;
        }
        self.cols
    }

    /// Horizontal runs of pixels equal to `value`, raster order.
    pub(super) fn runs(&self, value: bool) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        for r in 0..self.rows {
            let mut c = 0;
            loop {
                let a = self.next(r, c, value);
                if a >= self.cols {
                    break;
                }
                let b = self.next(r, a, !value);
                out.push((r, a, b - 1));
                c = b;
            }
        }
        out
    }

    /// The holes: unset pixels not 4-connected to the image border through unset pixels.
    pub(super) fn holes(&self) -> Plane {
        let gaps = self.runs(false);
        let (label, n) = label_runs(&gaps, false);
        let mut outside = vec![false; n];
        for (&(r, a, b), &l) in gaps.iter().zip(&label) {
            if r == 0 || r + 1 == self.rows || a == 0 || b + 1 == self.cols {
                outside[l as usize] = true;
            }
        }
        let mut holes = Plane::new(self.rows, self.cols);
        for (&(r, a, b), &l) in gaps.iter().zip(&label) {
            if !outside[l as usize] {
                holes.set_run(r, a, b);
            }
        }
        holes
    }

    pub(super) fn to_bitmask(&self) -> BitMask {
        let mut m = BitMask::new(self.rows, self.cols);
        for (r, a, b) in self.runs(true) {
            m.set_range(r * self.cols + a, r * self.cols + b + 1);
        }
        m
    }
}
