//! gpu — our CUDA kernels on the GPU: windowing (stored pixels → model input) and decoding (scores → masks and
//! per-slice counts), through cudarc with libcuda and NVRTC loaded at run time (`cuda` feature).
//!
//! Owns: finding the GPU (never a panic: no libcuda or no device → `None` and one log line, the caller uses the
//! CPU path), compiling `kernels/*.cu` at start-up ([`ptx`], cached on disk by source hash + architecture),
//! loading the kernels, streams (one per series: [`GpuRuntime::new_stream`]) and pinned host buffers.
//! The kernels reproduce `preprocess::normalise_u8` and `analysis::segment_slice` exactly (see their sources);
//! `tools::gpu_check` (`lungsentry gpu check`) measures that on a phantom series and times them against the
//! memory-bandwidth floor.
//! Never: decides what the masks mean (that is `analysis`) or runs the network (that is `engine`).

use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};

pub mod decode;
pub mod ptx;
pub mod window;

/// Why the GPU path is not available or failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// libcuda could not be loaded (no NVIDIA driver).
    #[error("no CUDA driver (libcuda) on this machine")]
    NoDriver,
    /// libnvrtc could not be loaded.
    #[error("no NVRTC library (libnvrtc) on this machine")]
    NoNvrtc,
    /// NVRTC refused a kernel.
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    /// A CUDA driver call failed.
    #[error("CUDA: {0}")]
    Driver(String),
    /// The input does not fit what the kernels handle.
    #[error("GPU input: {0}")]
    Input(String),
}

impl From<cudarc::driver::DriverError> for GpuError {
    fn from(e: cudarc::driver::DriverError) -> GpuError {
        GpuError::Driver(format!("{e:?}"))
    }
}

/// Whether libcuda can be loaded (checked first: cudarc panics when it is missing).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the candidate library names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The loaded kernels on one device.
pub struct GpuRuntime {
    ctx: Arc<CudaContext>,
    _modules: Vec<Arc<CudaModule>>,
    pub(crate) window_f16: CudaFunction,
    pub(crate) window_f32: CudaFunction,
    pub(crate) decode_f16: CudaFunction,
    pub(crate) decode_f32: CudaFunction,
    pub(crate) maxprob_f16: CudaFunction,
    pub(crate) maxprob_f32: CudaFunction,
    /// Device name as the driver reports it.
    pub device_name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// How many kernel files came from the PTX cache (the rest were compiled now).
    pub ptx_from_cache: usize,
}

impl GpuRuntime {
    /// Opens device `ordinal`, compiles (or reads cached) PTX for its architecture and loads the kernels.
    pub fn open(ordinal: usize, ptx_cache: Option<&Path>) -> Result<GpuRuntime, GpuError> {
        if !driver_present() {
            return Err(GpuError::NoDriver);
        }
        if !ptx::nvrtc_present() {
            return Err(GpuError::NoNvrtc);
        }
        let ctx = CudaContext::new(ordinal)?;
        let compute_capability = ctx.compute_capability()?;
        let device_name = ctx.name()?;
        let arch = ptx::arch_for(compute_capability);
        let mut modules = Vec::new();
        let mut ptx_from_cache = 0;
        for k in ptx::KERNELS {
            let (src, cached) = ptx::load_or_compile(&k, &arch, ptx_cache)?;
            ptx_from_cache += cached as usize;
            modules.push(ctx.load_module(cudarc::nvrtc::Ptx::from_src(src))?);
        }
        let f = |m: usize, name: &str| modules[m].load_function(name);
        let rt = GpuRuntime {
            window_f16: f(0, "ls_window_f16")?,
            window_f32: f(0, "ls_window_f32")?,
            decode_f16: f(1, "ls_decode_f16")?,
            decode_f32: f(1, "ls_decode_f32")?,
            maxprob_f16: f(1, "ls_lesion_maxprob_f16")?,
            maxprob_f32: f(1, "ls_lesion_maxprob_f32")?,
            _modules: modules,
            ctx,
            device_name,
            compute_capability,
            ptx_from_cache,
        };
        Ok(rt)
    }

    /// [`GpuRuntime::open`] that never fails: any reason (no driver, no device, NVRTC error, even a panic inside the
    /// bindings) is logged once as a warning and gives `None`, so the caller keeps the CPU path.
    pub fn try_open(ordinal: usize, ptx_cache: Option<&Path>) -> Option<GpuRuntime> {
        match std::panic::catch_unwind(|| GpuRuntime::open(ordinal, ptx_cache)) {
            Ok(Ok(rt)) => {
                tracing::info!(device = %rt.device_name, cc = ?rt.compute_capability, ptx_from_cache = rt.ptx_from_cache,
                    "GPU kernels loaded");
                Some(rt)
            }
            Ok(Err(e)) => {
                tracing::warn!(reason = %e, "GPU path unavailable; using the CPU path");
                None
            }
            Err(_) => {
                tracing::warn!("GPU path unavailable (CUDA bindings panicked); using the CPU path");
                None
            }
        }
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// A new stream (one per series, so series overlap on the device).
    pub fn new_stream(&self) -> Result<Arc<CudaStream>, GpuError> {
        Ok(self.ctx.new_stream()?)
    }
}

/// IEEE binary16 bits of an f32, round to nearest even (as the kernels' `cvt.rn.f16.f32`).
pub fn f32_to_f16_bits(v: f32) -> u16 {
    half::f16::from_f32(v).to_bits()
}

/// f32 value of IEEE binary16 bits.
pub fn f16_bits_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}
