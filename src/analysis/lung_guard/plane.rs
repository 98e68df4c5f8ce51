//! lung_guard::plane — the bit-row primitives the guard's per-slice steps run on: a binary mask stored a row at a
//! time in 64-bit words ([`Plane`]), its horizontal runs, square dilation by whole words, hole filling on the gaps
//! between runs, and connected components of runs by union-find ([`label_runs`], with [`pieces`] for their sizes and
//! [`runs_of`] to select them).
//!
//! Owns: those primitives. Each equals its pixel-by-pixel definition in `lung_guard::morphology` bit for bit (unit
//! test `the_row_primitives_equal_the_pixel_helpers`).
//! Hands on: planes, runs and run labels to `seed` (the seeding) and `air` (the per-slice air mask).
//! Never: knows what a mask means (air, gas, lung, field).

use crate::analysis::BitMask;

/// Horizontal runs of set pixels: (row, first column, last column inclusive), raster order.
pub(super) type Runs = [(usize, usize, usize)];

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

/// The components of `runs` ([`label_runs`]: each run's, raster order of first pixels) and each one's pixel count.
pub(super) fn pieces(runs: &Runs, eight: bool) -> (Vec<u32>, Vec<usize>) {
    let (label, n) = label_runs(runs, eight);
    let mut size = vec![0usize; n];
    for (&(_, a, b), &l) in runs.iter().zip(&label) {
        size[l as usize] += b - a + 1;
    }
    (label, size)
}

/// The runs whose component (`label`, per run) `keep` takes.
pub(super) fn runs_of(runs: &Runs, label: &[u32], keep: impl Fn(u32) -> bool) -> Vec<(usize, usize, usize)> {
    runs.iter().zip(label).filter(|(_, &l)| keep(l)).map(|(&run, _)| run).collect()
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

    /// (rows, cols).
    pub(super) fn size(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The plane of `runs` (each run's columns set).
    pub(super) fn from_runs(rows: usize, cols: usize, runs: &Runs) -> Plane {
        let mut p = Plane::new(rows, cols);
        for &(r, a, b) in runs {
            p.set_run(r, a, b);
        }
        p
    }

    /// The pixels of a rows×cols image (row-major `values`) below `threshold`, 64 a step.
    pub(super) fn below(rows: usize, cols: usize, values: &[f32], threshold: f32) -> Plane {
        assert_eq!(values.len(), rows * cols, "Plane::below: length is not rows×cols");
        let mut p = Plane::new(rows, cols);
        if cols == 0 {
            return p;
        }
        for (row, out) in values.chunks_exact(cols).zip(p.words.chunks_exact_mut(p.words_per_row)) {
            for (chunk, w) in row.chunks(64).zip(out.iter_mut()) {
                *w = chunk.iter().enumerate().fold(0u64, |acc, (i, &v)| acc | (((v < threshold) as u64) << i));
            }
        }
        p
    }

    /// The complement (the bits past `cols` stay 0).
    pub(super) fn not(&self) -> Plane {
        let mut p = self.clone();
        let tail = self.cols % 64;
        for row in p.words.chunks_exact_mut(self.words_per_row.max(1)) {
            for w in row.iter_mut() {
                *w = !*w;
            }
            if tail != 0 {
                if let Some(last) = row.last_mut() {
                    *last &= (1u64 << tail) - 1;
                }
            }
        }
        p
    }

    /// Clears the pixels set in `other`.
    pub(super) fn and_not(&mut self, other: &Plane) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w &= !o;
        }
    }

    /// Whether any pixel is set.
    pub(super) fn any(&self) -> bool {
        self.words.iter().any(|&w| w != 0)
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
    pub(super) fn count_in(&self, r: usize, a: usize, b: usize) -> usize {
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

    pub(super) fn and(&mut self, other: &Plane) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w &= o;
        }
    }

    pub(super) fn or(&mut self, other: &Plane) {
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
