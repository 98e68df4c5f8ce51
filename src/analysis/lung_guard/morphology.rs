//! lung_guard::morphology — pixel-level binary morphology on rows×cols bool masks: square dilation and erosion,
//! connected-component labelling, hole filling.
//!
//! Owns: the helpers of the pixel-by-pixel references (`lung_guard::pixels`: the air mask and the seeding), and the
//! definitions the bit-row primitives (`lung_guard::plane`) are tested against.
//! Hands on: plain `Vec<bool>` / label vectors to its callers in `lung_guard`.
//! Never: runs on the product's path (`air` and `seed` work on bit rows).

/// Square dilation (Chebyshev radius `r`) of a rows×cols mask: separable, prefix counts per line.
pub(super) fn dilate(m: &[bool], rows: usize, cols: usize, r: usize) -> Vec<bool> {
    if r == 0 || rows == 0 || cols == 0 {
        return m.to_vec();
    }
    // Horizontal: a running count of set pixels in the window [c − r, c + r] of each row.
    let mut h = vec![false; rows * cols];
    for (src, dst) in m.chunks_exact(cols).zip(h.chunks_exact_mut(cols)) {
        let mut n = src[..r.min(cols)].iter().filter(|&&b| b).count();
        for c in 0..cols {
            if c + r < cols && src[c + r] {
                n += 1;
            }
            if c > r && src[c - r - 1] {
                n -= 1;
            }
            dst[c] = n > 0;
        }
    }
    // Vertical: the same per column, rows streamed in order (one count per column).
    let mut out = vec![false; rows * cols];
    let mut n = vec![0u32; cols];
    for row in 0..r.min(rows) {
        for (k, &b) in n.iter_mut().zip(&h[row * cols..(row + 1) * cols]) {
            *k += b as u32;
        }
    }
    for row in 0..rows {
        if row + r < rows {
            for (k, &b) in n.iter_mut().zip(&h[(row + r) * cols..(row + r + 1) * cols]) {
                *k += b as u32;
            }
        }
        if row > r {
            for (k, &b) in n.iter_mut().zip(&h[(row - r - 1) * cols..(row - r) * cols]) {
                *k -= b as u32;
            }
        }
        for (o, &k) in out[row * cols..(row + 1) * cols].iter_mut().zip(&n) {
            *o = k > 0;
        }
    }
    out
}

/// Square erosion: the complement of the dilation of the complement (outside the image counts as set).
pub(super) fn erode(m: &[bool], rows: usize, cols: usize, r: usize) -> Vec<bool> {
    let inv: Vec<bool> = m.iter().map(|b| !b).collect();
    dilate(&inv, rows, cols, r).into_iter().map(|b| !b).collect()
}

/// Connected components of the set pixels (4- or 8-connectivity): a label per pixel (0 = unset, components from
/// 1) and each label's pixel count (index 0 unused).
pub(super) fn label(m: &[bool], rows: usize, cols: usize, eight: bool) -> (Vec<u32>, Vec<usize>) {
    let mut labels = vec![0u32; rows * cols];
    let mut sizes = vec![0usize];
    let mut stack = Vec::new();
    for start in 0..rows * cols {
        if !m[start] || labels[start] != 0 {
            continue;
        }
        let l = sizes.len() as u32;
        sizes.push(0);
        labels[start] = l;
        stack.push(start);
        while let Some(i) = stack.pop() {
            sizes[l as usize] += 1;
            let (r, c) = ((i / cols) as isize, (i % cols) as isize);
            for (dr, dc) in [(-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)]
                .into_iter()
                .take(if eight { 8 } else { 4 })
            {
                let (nr, nc) = (r + dr, c + dc);
                if nr < 0 || nc < 0 || nr >= rows as isize || nc >= cols as isize {
                    continue;
                }
                let j = nr as usize * cols + nc as usize;
                if m[j] && labels[j] == 0 {
                    labels[j] = l;
                    stack.push(j);
                }
            }
        }
    }
    (labels, sizes)
}

/// The mask with its holes filled: every unset pixel not 4-connected to the image border through unset pixels.
pub(super) fn fill_holes(m: &[bool], rows: usize, cols: usize) -> Vec<bool> {
    let mut outside = vec![false; rows * cols];
    if rows == 0 || cols == 0 {
        return m.to_vec();
    }
    let mut stack: Vec<usize> = Vec::new();
    let seed = |i: usize, outside: &mut Vec<bool>, stack: &mut Vec<usize>| {
        if !m[i] && !outside[i] {
            outside[i] = true;
            stack.push(i);
        }
    };
    for c in 0..cols {
        seed(c, &mut outside, &mut stack);
        seed((rows - 1) * cols + c, &mut outside, &mut stack);
    }
    for r in 0..rows {
        seed(r * cols, &mut outside, &mut stack);
        seed(r * cols + cols - 1, &mut outside, &mut stack);
    }
    while let Some(i) = stack.pop() {
        let (r, c) = (i / cols, i % cols);
        if r > 0 {
            seed(i - cols, &mut outside, &mut stack);
        }
        if r + 1 < rows {
            seed(i + cols, &mut outside, &mut stack);
        }
        if c > 0 {
            seed(i - 1, &mut outside, &mut stack);
        }
        if c + 1 < cols {
            seed(i + 1, &mut outside, &mut stack);
        }
    }
    outside.into_iter().map(|o| !o).collect()
}
