//! analysis::mask — the binary masks of a slice: [`BitMask`] (one bit per pixel, what the analysis computes on)
//! and [`RunMask`] (horizontal runs, what a series worker keeps per received slice until the 3D analysis).
//! Owns: setting, counting and scanning pixels (runs a word at a time), and the conversions between the two forms.
//! Never: knows what a mask means (lung, lesion, air) or where its slice sits in the patient.

use serde::{Deserialize, Serialize};

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

#[cfg(test)]
mod tests {
    use super::*;

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
