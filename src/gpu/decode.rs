//! gpu::decode — host side of `kernels/decode.cu`: a batch of class scores on the device → lung and lesion masks
//! at native resolution, per-slice pixel counts and the highest lesion probability per slice.
//!
//! Owns: the kernel's parameter block, the upsampling taps (the CPU path's own `analysis::upsample_table`), the
//! launches, and turning the packed words into [`BitMask`]s for the 3D connected-component step on the CPU.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use super::{GpuError, GpuRuntime};
use crate::analysis::{upsample_table, BitMask, LESION_CLASS};

/// Threads per block (`DECODE_THREADS` in the kernel).
pub const THREADS: u32 = 256;
/// Most classes the kernel reads (`MAX_CLASSES`).
pub const MAX_CLASSES: usize = 8;

/// The kernel's parameter block (`struct DecodeParams` in `kernels/decode.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeParams {
    pub classes: i32,
    pub h: i32,
    pub w: i32,
    pub rows: i32,
    pub cols: i32,
    pub words: i32,
}

// SAFETY: plain-old-data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for DecodeParams {}

impl DecodeParams {
    /// Parameters for K×h×w scores decoded to rows×cols.
    pub fn new(classes: usize, (h, w): (usize, usize), (rows, cols): (usize, usize)) -> DecodeParams {
        DecodeParams {
            classes: classes as i32,
            h: h as i32,
            w: w as i32,
            rows: rows as i32,
            cols: cols as i32,
            words: (rows * cols).div_ceil(32) as i32,
        }
    }
}

/// The upsampling taps as the kernel reads them: column (x0, x1) pairs, column weights, row pairs, row weights —
/// from `analysis::upsample_table`, the CPU path's own table.
pub fn upsample_taps((h, w): (usize, usize), (rows, cols): (usize, usize)) -> (Vec<i32>, Vec<f32>, Vec<i32>, Vec<f32>) {
    let xt = upsample_table(w, cols);
    let yt = upsample_table(h, rows);
    (
        xt.iter().flat_map(|&(a, b, _)| [a as i32, b as i32]).collect(),
        xt.iter().map(|t| t.2).collect(),
        yt.iter().flat_map(|&(a, b, _)| [a as i32, b as i32]).collect(),
        yt.iter().map(|t| t.2).collect(),
    )
}

/// Masks and counts of a decoded batch, back on the host.
#[derive(Debug, Clone)]
pub struct DecodedSlices {
    /// Native rows.
    pub rows: usize,
    /// Native columns.
    pub cols: usize,
    /// u32 words per slice plane.
    pub words: usize,
    /// N planes of lung bits (lung or lesion).
    pub lung_words: Vec<u32>,
    /// N planes of lesion bits.
    pub lesion_words: Vec<u32>,
    /// Per slice: (lung pixels incl. lesion, lesion pixels), counted on the device.
    pub counts: Vec<(u32, u32)>,
    /// Per slice: highest lesion softmax probability at model resolution.
    pub max_lesion_probability: Vec<f32>,
}

impl DecodedSlices {
    /// Lung mask (lesion included) of slice `n`.
    pub fn lung_mask(&self, n: usize) -> BitMask {
        BitMask::from_u32_words(self.rows, self.cols, &self.lung_words[n * self.words..(n + 1) * self.words])
    }

    /// Lesion mask of slice `n`.
    pub fn lesion_mask(&self, n: usize) -> BitMask {
        BitMask::from_u32_words(self.rows, self.cols, &self.lesion_words[n * self.words..(n + 1) * self.words])
    }
}

/// Device buffers and taps for decoding batches of one shape.
pub struct DecodePlan {
    pub params: DecodeParams,
    pub n: usize,
    x_idx: CudaSlice<i32>,
    x_w: CudaSlice<f32>,
    y_idx: CudaSlice<i32>,
    y_w: CudaSlice<f32>,
    lung: CudaSlice<u32>,
    lesion: CudaSlice<u32>,
    counts: CudaSlice<u32>,
    maxprob: CudaSlice<f32>,
}

/// Score element type.
pub trait ScoreType: DeviceRepr {
    /// Bytes per score.
    const BYTES: usize;
    /// The decode and max-probability kernels for this type.
    fn kernels(rt: &GpuRuntime) -> (&cudarc::driver::CudaFunction, &cudarc::driver::CudaFunction);
}

impl ScoreType for f32 {
    const BYTES: usize = 4;
    fn kernels(rt: &GpuRuntime) -> (&cudarc::driver::CudaFunction, &cudarc::driver::CudaFunction) {
        (&rt.decode_f32, &rt.maxprob_f32)
    }
}

/// IEEE half bits.
impl ScoreType for u16 {
    const BYTES: usize = 2;
    fn kernels(rt: &GpuRuntime) -> (&cudarc::driver::CudaFunction, &cudarc::driver::CudaFunction) {
        (&rt.decode_f16, &rt.maxprob_f16)
    }
}

impl DecodePlan {
    /// Buffers for `n` slices of K×h×w scores decoded to rows×cols.
    pub fn new(
        stream: &Arc<CudaStream>,
        n: usize,
        classes: usize,
        (h, w): (usize, usize),
        (rows, cols): (usize, usize),
    ) -> Result<DecodePlan, GpuError> {
        if classes <= LESION_CLASS || classes > MAX_CLASSES {
            return Err(GpuError::Input(format!("{classes} classes (the kernel handles 3..={MAX_CLASSES})")));
        }
        if n == 0 || h == 0 || w == 0 || rows == 0 || cols == 0 {
            return Err(GpuError::Input("empty batch".into()));
        }
        let params = DecodeParams::new(classes, (h, w), (rows, cols));
        let words = params.words as usize;
        let (xi, xw, yi, yw) = upsample_taps((h, w), (rows, cols));
        Ok(DecodePlan {
            params,
            n,
            x_idx: stream.clone_htod(&xi)?,
            x_w: stream.clone_htod(&xw)?,
            y_idx: stream.clone_htod(&yi)?,
            y_w: stream.clone_htod(&yw)?,
            lung: stream.alloc_zeros(n * words)?,
            lesion: stream.alloc_zeros(n * words)?,
            counts: stream.alloc_zeros(n * 2)?,
            maxprob: stream.alloc_zeros(n)?,
        })
    }

    /// Bytes the decode kernel must move at least: the scores once plus both bit planes and the counts.
    pub fn min_bytes<S: ScoreType>(&self) -> usize {
        let p = &self.params;
        self.n * (p.classes * p.h * p.w) as usize * S::BYTES + self.lung.len() * 4 * 2 + self.counts.len() * 4
    }

    /// Launches the decode kernel (masks + counts) and the max-probability kernel on `stream`.
    pub fn run<S: ScoreType>(
        &mut self,
        rt: &GpuRuntime,
        stream: &Arc<CudaStream>,
        scores: &CudaSlice<S>,
    ) -> Result<(), GpuError> {
        self.run_masks(rt, stream, scores)?;
        self.run_maxprob(rt, stream, scores)
    }

    fn check_scores<S: ScoreType>(&self, scores: &CudaSlice<S>) -> Result<(), GpuError> {
        let p = self.params;
        let per = (p.classes * p.h * p.w) as usize;
        if scores.len() != self.n * per {
            return Err(GpuError::Input(format!("scores have {} values, need {}×{per}", scores.len(), self.n)));
        }
        Ok(())
    }

    /// The launch shape for `pixels` per slice: one grid row of THREADS-pixel blocks per slice. (Blocks striding
    /// over their slice, 16 per slice, measured 9 % slower on an H100: docs/PERFORMANCE.md.)
    pub fn config(&self, pixels: i32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((pixels as u32).div_ceil(THREADS), self.n as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The decode kernel alone: masks and counts.
    pub fn run_masks<S: ScoreType>(
        &mut self,
        rt: &GpuRuntime,
        stream: &Arc<CudaStream>,
        scores: &CudaSlice<S>,
    ) -> Result<(), GpuError> {
        self.check_scores(scores)?;
        let p = self.params;
        stream.memset_zeros(&mut self.counts)?;
        let cfg = self.config(p.rows * p.cols);
        let mut b = stream.launch_builder(S::kernels(rt).0);
        b.arg(scores).arg(&p).arg(&self.x_idx).arg(&self.x_w).arg(&self.y_idx).arg(&self.y_w);
        b.arg(&mut self.lung).arg(&mut self.lesion).arg(&mut self.counts);
        // SAFETY: argument order and types match `ls_decode_*`; sizes follow the plan (scores checked above).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// The max-probability kernel alone.
    pub fn run_maxprob<S: ScoreType>(
        &mut self,
        rt: &GpuRuntime,
        stream: &Arc<CudaStream>,
        scores: &CudaSlice<S>,
    ) -> Result<(), GpuError> {
        self.check_scores(scores)?;
        let p = self.params;
        stream.memset_zeros(&mut self.maxprob)?;
        let cfg = self.config(p.h * p.w);
        let mut b = stream.launch_builder(S::kernels(rt).1);
        b.arg(scores).arg(&p).arg(&mut self.maxprob);
        // SAFETY: argument order and types match `ls_lesion_maxprob_*`; sizes follow the plan.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Copies the results of the last [`DecodePlan::run`] to the host (waits for the stream).
    pub fn download(&self, stream: &Arc<CudaStream>) -> Result<DecodedSlices, GpuError> {
        let counts = stream.clone_dtoh(&self.counts)?;
        let out = DecodedSlices {
            rows: self.params.rows as usize,
            cols: self.params.cols as usize,
            words: self.params.words as usize,
            lung_words: stream.clone_dtoh(&self.lung)?,
            lesion_words: stream.clone_dtoh(&self.lesion)?,
            counts: counts.chunks_exact(2).map(|c| (c[0], c[1])).collect(),
            max_lesion_probability: stream.clone_dtoh(&self.maxprob)?,
        };
        stream.synchronize()?;
        Ok(out)
    }
}
