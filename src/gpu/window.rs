//! gpu::window — host side of `kernels/window.cu`: stored 16-bit pixels of a batch of slices → the model's
//! N×C×H×W input (fp16 for TensorRT, fp32 for the CPU engines), one launch for the whole batch.
//!
//! Owns: checking a batch can go to the GPU (16-bit samples, one size and one stored-value format), the kernel's
//! parameter block and geometry tables — computed by the CPU path's own functions ([`ClahePlan`],
//! `preprocess::linear_table`), so both sides use identical numbers — and the upload through a pinned buffer.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use super::{GpuError, GpuRuntime};
use crate::decode::{StoredFrame, StoredRescale};
use crate::model::InputContract;
use crate::preprocess::{linear_table, ClahePlan};

/// Threads per block (`WINDOW_THREADS` in the kernel).
pub const THREADS: u32 = 512;
/// Entries of the per-slice stored value → u8 table in shared memory (`VALUE_TABLE_CAP` in the kernel).
pub const VALUE_TABLE_CAP: u32 = 8192;

/// The kernel's parameter block (`struct WindowParams` in `kernels/window.cu`; same field order and types).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct WindowParams {
    pub rows: i32,
    pub cols: i32,
    pub out_h: i32,
    pub out_w: i32,
    pub channels: i32,
    pub n_slices: i32,
    pub shift: i32,
    pub bits_stored: i32,
    pub is_signed: i32,
    pub monochrome1: i32,
    pub smin_plus_smax: i32,
    pub has_padding: i32,
    pub pad_lo: i32,
    pub pad_hi: i32,
    pub clip_lo: f64,
    pub clip_hi: f64,
    pub tiles_x: i32,
    pub tiles_y: i32,
    pub ext_rows: i32,
    pub ext_cols: i32,
    pub tile_w: i32,
    pub tile_h: i32,
    pub clip_count: i32,
    pub lut_scale: f32,
}

// SAFETY: plain-old-data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for WindowParams {}

/// Output element type of the windowing kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputPrecision {
    /// IEEE half (TensorRT FP16 engines).
    F16,
    /// f32 (tract, ONNX Runtime).
    F32,
}

/// Everything but the pixels: parameters and geometry tables for one batch shape.
#[derive(Debug, Clone)]
pub struct WindowPlan {
    pub params: WindowParams,
    resize_x: Vec<i32>,
    resize_y: Vec<i32>,
    clahe_xi: Vec<i32>,
    clahe_xw: Vec<f32>,
    clahe_yi: Vec<i32>,
    clahe_yw: Vec<f32>,
}

fn same_format(a: &StoredRescale, b: &StoredRescale) -> bool {
    let (fa, fb) = (a.format, b.format);
    fa.bits_allocated == fb.bits_allocated
        && fa.bits_stored == fb.bits_stored
        && fa.high_bit == fb.high_bit
        && fa.signed == fb.signed
        && a.pad_range == b.pad_range
        && a.monochrome1 == b.monochrome1
}

impl WindowPlan {
    /// The plan for `frames` (all of one size and stored-value format, 16-bit) under `input`.
    pub fn new(frames: &[&StoredFrame], input: &InputContract) -> Result<WindowPlan, GpuError> {
        let first = frames.first().ok_or_else(|| GpuError::Input("empty batch".into()))?;
        let (rows, cols) = (first.geometry.rows, first.geometry.cols);
        let r = first.rescale;
        if r.format.bits_allocated != 16 {
            return Err(GpuError::Input(format!(
                "BitsAllocated {} (the kernel reads 16-bit samples)",
                r.format.bits_allocated
            )));
        }
        if let Some(f) =
            frames.iter().find(|f| (f.geometry.rows, f.geometry.cols) != (rows, cols) || !same_format(&f.rescale, &r))
        {
            return Err(GpuError::Input(format!(
                "mixed batch: {}×{} vs {}×{} or another stored-value format",
                f.geometry.rows, f.geometry.cols, rows, cols
            )));
        }
        if input.normalisation != "minmax_clahe" || input.clahe_tiles == 0 {
            return Err(GpuError::Input(format!("normalisation {:?} has no GPU kernel", input.normalisation)));
        }
        let tiles = input.clahe_tiles;
        let plan = ClahePlan::new(rows, cols, input.clahe_clip_limit as f64, tiles, tiles);
        let (smin, smax) = r.format.range();
        let (pad_lo, pad_hi) = r.pad_range.unwrap_or((0, -1));
        let clamp_i32 = |v: i64| v.clamp(i32::MIN as i64, i32::MAX as i64) as i32;
        let params = WindowParams {
            rows: rows as i32,
            cols: cols as i32,
            out_h: input.height as i32,
            out_w: input.width as i32,
            channels: input.channels as i32,
            n_slices: frames.len() as i32,
            shift: (r.format.high_bit + 1).saturating_sub(r.format.bits_stored) as i32,
            bits_stored: r.format.bits_stored as i32,
            is_signed: r.format.signed as i32,
            monochrome1: r.monochrome1 as i32,
            smin_plus_smax: (smin + smax) as i32,
            has_padding: r.pad_range.is_some() as i32,
            pad_lo: clamp_i32(pad_lo),
            pad_hi: clamp_i32(pad_hi),
            clip_lo: input.hu_clip[0] as f64,
            clip_hi: input.hu_clip[1] as f64,
            tiles_x: tiles as i32,
            tiles_y: tiles as i32,
            ext_rows: plan.ext_rows as i32,
            ext_cols: plan.ext_cols as i32,
            tile_w: plan.tile_w as i32,
            tile_h: plan.tile_h as i32,
            clip_count: plan.clip as i32,
            lut_scale: plan.lut_scale,
        };
        let flat4 = |t: Vec<(usize, usize, i32, i32)>| -> Vec<i32> {
            t.into_iter().flat_map(|(a, b, c, d)| [a as i32, b as i32, c, d]).collect()
        };
        Ok(WindowPlan {
            params,
            resize_x: flat4(linear_table(cols, input.width, true)),
            resize_y: flat4(linear_table(rows, input.height, false)),
            clahe_xi: plan.xs.iter().flat_map(|&(a, b, _, _)| [a as i32, b as i32]).collect(),
            clahe_xw: plan.xs.iter().flat_map(|&(_, _, w, w1)| [w, w1]).collect(),
            clahe_yi: plan.ys.iter().flat_map(|&(a, b, _, _)| [a as i32, b as i32]).collect(),
            clahe_yw: plan.ys.iter().flat_map(|&(_, _, w, w1)| [w, w1]).collect(),
        })
    }

    /// The geometry tables as the kernel reads them: resize taps x and y (4 × i32 each), CLAHE LUT offsets and
    /// weights per column, tile rows and weights per row (2 × i32 / 2 × f32 each).
    #[allow(clippy::type_complexity)] // the six kernel arguments in their order, named in the doc
    pub fn tables(&self) -> (&[i32], &[i32], &[i32], &[f32], &[i32], &[f32]) {
        (&self.resize_x, &self.resize_y, &self.clahe_xi, &self.clahe_xw, &self.clahe_yi, &self.clahe_yw)
    }

    /// Dynamic shared memory per block: tile histograms (u32; the tile LUTs overwrite them) and the stored value →
    /// u8 table (`VALUE_TABLE_CAP` in the kernel).
    pub fn shared_bytes(&self) -> u32 {
        (self.params.tiles_x * self.params.tiles_y * 256 * 4) as u32 + VALUE_TABLE_CAP
    }

    /// Elements of the output: N × C × H × W.
    pub fn output_len(&self) -> usize {
        let p = &self.params;
        (p.n_slices * p.channels * p.out_h * p.out_w) as usize
    }
}

/// A batch on the device, ready for (repeated) launches.
pub struct WindowBatch {
    pub plan: WindowPlan,
    raw: CudaSlice<u16>,
    rescale: CudaSlice<f64>,
    tables: [CudaSlice<i32>; 4],
    weights: [CudaSlice<f32>; 2],
}

impl WindowBatch {
    /// Uploads the samples of `frames` (through one pinned staging buffer) and the plan's tables on `stream`.
    pub fn upload(
        rt: &GpuRuntime,
        stream: &Arc<CudaStream>,
        frames: &[&StoredFrame],
        input: &InputContract,
    ) -> Result<WindowBatch, GpuError> {
        let plan = WindowPlan::new(frames, input)?;
        let npx = (plan.params.rows * plan.params.cols) as usize;
        // SAFETY: every element is written below before the copy reads it.
        let mut pinned = unsafe { rt.context().alloc_pinned::<u16>(npx * frames.len())? };
        {
            let dst = pinned.as_mut_slice()?;
            for (f, chunk) in frames.iter().zip(dst.chunks_exact_mut(npx)) {
                for (d, b) in chunk.iter_mut().zip(f.data.chunks_exact(2)) {
                    *d = u16::from_ne_bytes([b[0], b[1]]);
                }
            }
        }
        let mut raw = stream.alloc_zeros::<u16>(npx * frames.len())?;
        stream.memcpy_htod(&pinned, &mut raw)?;
        let rescale: Vec<f64> = frames.iter().flat_map(|f| [f.rescale.slope, f.rescale.intercept]).collect();
        Ok(WindowBatch {
            rescale: stream.clone_htod(&rescale)?,
            tables: [
                stream.clone_htod(&plan.resize_x)?,
                stream.clone_htod(&plan.resize_y)?,
                stream.clone_htod(&plan.clahe_xi)?,
                stream.clone_htod(&plan.clahe_yi)?,
            ],
            weights: [stream.clone_htod(&plan.clahe_xw)?, stream.clone_htod(&plan.clahe_yw)?],
            raw,
            plan,
        })
    }

    /// Bytes the kernel must move at least: the samples once plus the output once.
    pub fn min_bytes(&self, precision: InputPrecision) -> usize {
        let out = match precision {
            InputPrecision::F16 => 2,
            InputPrecision::F32 => 4,
        };
        self.raw.len() * 2 + self.plan.output_len() * out
    }

    fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.plan.params.n_slices as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: self.plan.shared_bytes(),
        }
    }

    fn launch<T: DeviceRepr>(
        &self,
        f: &cudarc::driver::CudaFunction,
        stream: &Arc<CudaStream>,
        out: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        if out.len() != self.plan.output_len() {
            return Err(GpuError::Input(format!("output has {} elements, need {}", out.len(), self.plan.output_len())));
        }
        let cfg = self.config();
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            cfg.shared_mem_bytes as i32,
        )?;
        let mut b = stream.launch_builder(f);
        b.arg(&self.raw).arg(&self.rescale).arg(&self.plan.params);
        b.arg(&self.tables[0]).arg(&self.tables[1]).arg(&self.tables[2]).arg(&self.weights[0]);
        b.arg(&self.tables[3]).arg(&self.weights[1]).arg(out);
        // SAFETY: argument order and types match the kernel signature; buffer sizes follow the plan (checked above).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// fp16 model input (IEEE half bits) into `out` (N×C×H×W), e.g. the TensorRT engine's input binding.
    pub fn run_f16(&self, rt: &GpuRuntime, stream: &Arc<CudaStream>, out: &mut CudaSlice<u16>) -> Result<(), GpuError> {
        self.launch(&rt.window_f16, stream, out)
    }

    /// f32 model input into `out` (N×C×H×W).
    pub fn run_f32(&self, rt: &GpuRuntime, stream: &Arc<CudaStream>, out: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        self.launch(&rt.window_f32, stream, out)
    }
}
