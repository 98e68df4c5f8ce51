//! Overlays for a human reader of `eval --real`: one slice side by side, plain lung window on the left, the same
//! with the kept lung outlined in cyan and the surviving lesion filled in translucent red (solid red border) on
//! the right. Slices under 512 pixels wide are enlarged by pixel repetition so thin findings stay visible.
//!
//! Owns: pixels only (no text: the file name and the report say which slice it is). Never: changes masks.

use crate::analysis::BitMask;
use crate::decode::HuSlice;
use crate::outputs::keyimage::{RgbImage, LESION_RGB, WINDOW_CENTER, WINDOW_WIDTH};

/// Outline colour of the kept lung.
pub const LUNG_RGB: [u8; 3] = [0, 210, 255];
/// Black gap between the two panels, pixels.
const GAP: usize = 8;

/// Whether (r, c) is in `m` with a 4-neighbour outside it (the inner boundary).
fn on_edge(m: &BitMask, r: usize, c: usize) -> bool {
    m.get(r, c)
        && ((r == 0 || !m.get(r - 1, c))
            || (r + 1 == m.rows || !m.get(r + 1, c))
            || (c == 0 || !m.get(r, c - 1))
            || (c + 1 == m.cols || !m.get(r, c + 1)))
}

/// Renders `hu` with its lung and lesion masks (masks of another size are not drawn).
pub fn render(hu: &HuSlice, lung: &BitMask, lesion: &BitMask) -> RgbImage {
    let (rows, cols) = (hu.rows, hu.cols);
    let scale = (512 / cols.max(1)).max(1);
    let (pw, ph) = (cols * scale, rows * scale);
    let width = 2 * pw + GAP;
    let mut data = vec![0u8; width * ph * 3];
    let lo = WINDOW_CENTER - WINDOW_WIDTH / 2.0;
    let fits = |m: &BitMask| m.rows == rows && m.cols == cols;
    let (draw_lung, draw_lesion) = (fits(lung), fits(lesion));
    for r in 0..rows {
        for c in 0..cols {
            let g = (((hu.hu[r * cols + c] - lo) / WINDOW_WIDTH).clamp(0.0, 1.0) * 255.0).round() as u8;
            let gray = [g, g, g];
            let marked = if draw_lesion && on_edge(lesion, r, c) {
                LESION_RGB
            } else if draw_lesion && lesion.get(r, c) {
                [((g as u16 + 255) / 2) as u8, g / 2, g / 2]
            } else if draw_lung && on_edge(lung, r, c) {
                LUNG_RGB
            } else {
                gray
            };
            for dy in 0..scale {
                let y = r * scale + dy;
                for dx in 0..scale {
                    let x = c * scale + dx;
                    let i = (y * width + x) * 3;
                    data[i..i + 3].copy_from_slice(&gray);
                    let j = (y * width + pw + GAP + x) * 3;
                    data[j..j + 3].copy_from_slice(&marked);
                }
            }
        }
    }
    RgbImage { width, height: ph, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lesion_and_lung_are_drawn_on_the_right_panel_only() {
        let (rows, cols) = (256, 256);
        let hu = HuSlice::from_hu(rows, cols, vec![-800.0; rows * cols]);
        let mut lung = BitMask::new(rows, cols);
        let mut lesion = BitMask::new(rows, cols);
        for r in 50..150 {
            for c in 50..150 {
                lung.set(r, c, true);
                if (90..110).contains(&r) && (90..110).contains(&c) {
                    lesion.set(r, c, true);
                }
            }
        }
        let img = render(&hu, &lung, &lesion);
        assert_eq!((img.width, img.height), (2 * 512 + GAP, 512));
        let right = 512 + GAP;
        // Left panel: plain gray everywhere.
        let g = img.get(100 * 2, 100 * 2);
        assert_eq!(g[0], g[1]);
        assert_eq!(img.get(50 * 2, 100 * 2), g);
        // Right panel: lung edge cyan, lesion edge red, lesion inside reddish, elsewhere gray.
        assert_eq!(img.get(right + 50 * 2, 100 * 2), LUNG_RGB);
        assert_eq!(img.get(right + 90 * 2, 100 * 2), LESION_RGB);
        let inside = img.get(right + 100 * 2, 100 * 2);
        assert!(inside[0] > inside[1] && inside[0] > g[0], "{inside:?}");
        assert_eq!(img.get(right + 10, 10), img.get(10, 10));
    }
}
