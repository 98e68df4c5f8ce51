//! engine::tensorrt — the model as a TensorRT FP16 engine (`tensorrt` feature), through the C++ shim in
//! `tensorrt/shim.cpp` (deserialize, query I/O tensors, `setTensorAddress`, `enqueueV3` on our CUDA stream).
//!
//! Owns: finding the engine file — named by model sha256, GPU name and TensorRT version, so an engine built for
//! another model, card or TensorRT is never loaded ([`engine_file_name`]) — checking its I/O against the manifest,
//! and running batches within the engine's optimisation profile. Engines are built by `scripts/build-engine`
//! (trtexec `--fp16`), on the appliance by its first-boot unit. Any failure here is an error the caller turns into
//! a warning and the CPU engine (`engine::load_engine`).

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::Engine;
use crate::model::Model;

#[repr(C)]
struct LsTrt {
    _private: [u8; 0],
}

extern "C" {
    fn ls_trt_library_version(libnvinfer: *const c_char, err: *mut c_char, errlen: usize) -> i32;
    fn ls_trt_header_version() -> i32;
    fn ls_trt_open(
        libnvinfer: *const c_char,
        blob: *const c_void,
        len: usize,
        err: *mut c_char,
        errlen: usize,
    ) -> *mut LsTrt;
    fn ls_trt_close(t: *mut LsTrt);
    fn ls_trt_last_error(t: *mut LsTrt) -> *const c_char;
    fn ls_trt_io_count(t: *mut LsTrt) -> i32;
    fn ls_trt_io_info(
        t: *mut LsTrt,
        i: i32,
        name: *mut c_char,
        namelen: usize,
        is_input: *mut i32,
        dtype: *mut i32,
        dims: *mut i64,
        nb_dims: *mut i32,
        max_dims: *mut i64,
    ) -> i32;
    fn ls_trt_set_input_shape(t: *mut LsTrt, name: *const c_char, dims: *const i64, nb_dims: i32) -> i32;
    fn ls_trt_set_tensor_address(t: *mut LsTrt, name: *const c_char, ptr: *mut c_void) -> i32;
    fn ls_trt_enqueue(t: *mut LsTrt, stream: *mut c_void) -> i32;
}

/// TensorRT `DataType::kFLOAT`.
const DT_FLOAT: i32 = 0;
/// TensorRT `DataType::kHALF`.
const DT_HALF: i32 = 1;

fn err_text(buf: &[u8]) -> String {
    CStr::from_bytes_until_nul(buf).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Version of the TensorRT library that loads here (major·10000 + minor·100 + patch), or why none does.
pub fn library_version() -> Result<i32> {
    let mut err = [0u8; 512];
    // SAFETY: NULL selects the default soname; err is a writable buffer of the given length.
    let v = unsafe { ls_trt_library_version(std::ptr::null(), err.as_mut_ptr().cast(), err.len()) };
    if v < 0 {
        bail!("TensorRT runtime not available: {}", err_text(&err));
    }
    Ok(v)
}

/// TensorRT version of the headers the shim was compiled against.
pub fn header_version() -> i32 {
    // SAFETY: returns a constant.
    unsafe { ls_trt_header_version() }
}

/// `<model name>-<sha256[..16]>-<gpu slug>-trt<version>.engine`: the one engine file a model, a GPU model and a
/// TensorRT version may use.
pub fn engine_file_name(model: &Model, gpu_name: &str, trt_version: i32) -> String {
    let slug: String = gpu_name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    let sha = &model.manifest.model.sha256;
    format!("{}-{}-{}-trt{}.engine", model.manifest.model.name, &sha[..sha.len().min(16)], slug, trt_version)
}

/// The engine path for `model` on GPU 0 with the TensorRT that loads here.
pub fn engine_path(model: &Model, dir: &Path) -> Result<PathBuf> {
    let ctx = open_context()?;
    Ok(dir.join(engine_file_name(model, &ctx.name()?, library_version()?)))
}

fn open_context() -> Result<Arc<CudaContext>> {
    if !crate::gpu::driver_present() {
        bail!("no CUDA driver (libcuda) on this machine");
    }
    std::panic::catch_unwind(|| CudaContext::new(0))
        .map_err(|_| anyhow!("CUDA bindings panicked opening device 0"))?
        .map_err(|e| anyhow!("opening CUDA device 0: {e:?}"))
}

struct Handle(*mut LsTrt);

// SAFETY: the handle is only used under the engine's Mutex, one thread at a time.
unsafe impl Send for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the pointer came from ls_trt_open and is closed once.
        unsafe { ls_trt_close(self.0) }
    }
}

struct State {
    handle: Handle,
    input: CudaSlice<u8>,
    output: CudaSlice<u8>,
}

/// A deserialized engine with its buffers for `max_batch` slices.
pub struct TensorRtEngine {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    state: Mutex<State>,
    input_name: CString,
    output_name: CString,
    input_half: bool,
    output_half: bool,
    /// Largest batch of the engine's optimisation profile.
    pub max_batch: usize,
    per_input: usize,
    per_output: usize,
    chw: [i64; 3],
    /// The file it was loaded from.
    pub path: PathBuf,
}

impl TensorRtEngine {
    /// Loads the engine for `model` from `dir` (see [`engine_file_name`]); a missing or mismatched engine, no GPU or
    /// no TensorRT runtime is an error that says which.
    pub fn load(model: &Model, dir: &Path) -> Result<TensorRtEngine> {
        let ctx = open_context()?;
        let version = library_version()?;
        let name = engine_file_name(model, &ctx.name()?, version);
        let path = dir.join(&name);
        if !path.exists() {
            let others: Vec<String> = std::fs::read_dir(dir)
                .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            bail!(
                "no TensorRT engine {} (for this model, GPU and TensorRT {version}); found {:?}; build it with \
                 scripts/build-engine",
                path.display(),
                others
            );
        }
        let blob = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        ctx.bind_to_thread().map_err(|e| anyhow!("{e:?}"))?;
        let mut err = [0u8; 1024];
        // SAFETY: blob outlives the call; err is writable.
        let raw = unsafe {
            ls_trt_open(std::ptr::null(), blob.as_ptr().cast(), blob.len(), err.as_mut_ptr().cast(), err.len())
        };
        if raw.is_null() {
            bail!("TensorRT could not load {}: {}", path.display(), err_text(&err));
        }
        let handle = Handle(raw);
        let i = &model.manifest.input;
        let classes = model.manifest.output.classes.len();
        let (mut input, mut output) = (None, None);
        // SAFETY: valid handle.
        let count = unsafe { ls_trt_io_count(handle.0) };
        for k in 0..count {
            let mut nm = [0u8; 256];
            let (mut is_input, mut dtype, mut nb) = (0i32, 0i32, 0i32);
            let mut dims = [0i64; 8];
            let mut max = [0i64; 8];
            // SAFETY: buffers are writable with the given sizes (TensorRT's MAX_DIMS is 8).
            let rc = unsafe {
                ls_trt_io_info(
                    handle.0,
                    k,
                    nm.as_mut_ptr().cast(),
                    nm.len(),
                    &mut is_input,
                    &mut dtype,
                    dims.as_mut_ptr(),
                    &mut nb,
                    max.as_mut_ptr(),
                )
            };
            if rc != 0 {
                bail!("TensorRT I/O query failed");
            }
            let entry = (err_text(&nm), dtype, dims[..nb as usize].to_vec(), max[0]);
            if is_input == 1 {
                input = Some(entry)
            } else {
                output = Some(entry)
            }
        }
        let (Some((in_name, in_dt, in_dims, max_batch)), Some((out_name, out_dt, out_dims, _))) = (input, output)
        else {
            bail!("engine {} needs one input and one output tensor", path.display());
        };
        if count != 2 {
            bail!("engine {} has {count} I/O tensors, expected 2", path.display());
        }
        let want_in = [i.channels as i64, i.height as i64, i.width as i64];
        let want_out = [classes as i64, i.height as i64, i.width as i64];
        if in_dims.len() != 4 || in_dims[1..] != want_in || out_dims.len() != 4 || out_dims[1..] != want_out {
            bail!(
                "engine {} has input {in_dims:?} / output {out_dims:?}, the manifest says N×{want_in:?} / N×{want_out:?}",
                path.display()
            );
        }
        for (what, dt) in [("input", in_dt), ("output", out_dt)] {
            if dt != DT_FLOAT && dt != DT_HALF {
                bail!("engine {} {what} has TensorRT data type {dt} (expected float or half)", path.display());
            }
        }
        let max_batch = if in_dims[0] > 0 { in_dims[0] } else { max_batch }.max(1) as usize;
        let per_input = want_in.iter().product::<i64>() as usize;
        let per_output = want_out.iter().product::<i64>() as usize;
        let size = |dt: i32| if dt == DT_HALF { 2 } else { 4 };
        let stream = ctx.new_stream().map_err(|e| anyhow!("{e:?}"))?;
        let input_buf = stream.alloc_zeros::<u8>(max_batch * per_input * size(in_dt)).map_err(|e| anyhow!("{e:?}"))?;
        let output_buf =
            stream.alloc_zeros::<u8>(max_batch * per_output * size(out_dt)).map_err(|e| anyhow!("{e:?}"))?;
        tracing::info!(path = %path.display(), trt = version, max_batch, input_half = in_dt == DT_HALF,
            output_half = out_dt == DT_HALF, "TensorRT engine loaded");
        Ok(TensorRtEngine {
            ctx,
            stream,
            state: Mutex::new(State { handle, input: input_buf, output: output_buf }),
            input_name: CString::new(in_name)?,
            output_name: CString::new(out_name)?,
            input_half: in_dt == DT_HALF,
            output_half: out_dt == DT_HALF,
            max_batch,
            per_input,
            per_output,
            chw: want_in,
            path,
        })
    }

    /// Binds `input` and `output` device buffers for `n` slices and enqueues inference on `stream` (the GPU series
    /// path: `gpu::window` writes the input, `gpu::decode` reads the output; nothing crosses to the host).
    ///
    /// # Safety
    /// `input` and `output` must hold `n` slices in the engine's I/O types and stay alive until `stream` is
    /// synchronized.
    pub unsafe fn enqueue_device(
        &self,
        input: cudarc::driver::sys::CUdeviceptr,
        output: cudarc::driver::sys::CUdeviceptr,
        n: usize,
        stream: &CudaStream,
    ) -> Result<()> {
        let st = self.state.lock().map_err(|_| anyhow!("TensorRT state poisoned"))?;
        // SAFETY: `st.handle` is the live handle and stays locked for the call; the buffers are the caller's
        // contract above, passed on unchanged.
        unsafe { self.enqueue_locked(st.handle.0, input, output, n, stream) }
    }

    /// Sets the input shape and both tensor addresses on `h` and enqueues on `stream`.
    ///
    /// # Safety
    /// `h` is this engine's live handle, held under its state lock for the whole call (TensorRT contexts are not
    /// thread-safe); `input` and `output` hold `n` slices in the engine's I/O types and stay alive until `stream`
    /// is synchronized.
    unsafe fn enqueue_locked(
        &self,
        h: *mut LsTrt,
        input: cudarc::driver::sys::CUdeviceptr,
        output: cudarc::driver::sys::CUdeviceptr,
        n: usize,
        stream: &CudaStream,
    ) -> Result<()> {
        if n == 0 || n > self.max_batch {
            bail!("batch of {n} outside the engine's profile (1..={})", self.max_batch);
        }
        let fail = || {
            // SAFETY: valid handle; the message is copied before the next call.
            let msg = unsafe { CStr::from_ptr(ls_trt_last_error(h)) };
            anyhow!("TensorRT: {}", msg.to_string_lossy())
        };
        let shape = [n as i64, self.chw[0], self.chw[1], self.chw[2]];
        // SAFETY: `h` is live and exclusively ours (the contract above); the name is a NUL-terminated CString of
        // this engine and `shape` holds the 4 dims passed, both alive for the call (the shim copies them).
        if unsafe { ls_trt_set_input_shape(h, self.input_name.as_ptr(), shape.as_ptr(), 4) } != 0 {
            return Err(fail());
        }
        // SAFETY: as above; the device addresses hold `n` slices and outlive the enqueued work (the contract).
        if unsafe { ls_trt_set_tensor_address(h, self.input_name.as_ptr(), input as *mut c_void) } != 0
            // SAFETY: the same for the output tensor.
            || unsafe { ls_trt_set_tensor_address(h, self.output_name.as_ptr(), output as *mut c_void) } != 0
        {
            return Err(fail());
        }
        // SAFETY: `stream` is a live CUDA stream of the context the engine was opened in; both tensor addresses
        // were set just above.
        if unsafe { ls_trt_enqueue(h, stream.cu_stream() as *mut c_void) } != 0 {
            return Err(fail());
        }
        Ok(())
    }
}

impl Engine for TensorRtEngine {
    fn name(&self) -> &'static str {
        "tensorrt"
    }

    /// Host f32 in, host f32 out (converted to and from the engine's fp16 I/O), in batches of at most `max_batch`.
    fn infer(&self, input: &[f32], n: usize) -> Result<Vec<f32>> {
        if input.len() != n * self.per_input {
            bail!("engine input has {} floats, expected {n}×{}", input.len(), self.per_input);
        }
        let mut st = self.state.lock().map_err(|_| anyhow!("TensorRT state poisoned"))?;
        self.ctx.bind_to_thread().map_err(|e| anyhow!("{e:?}"))?;
        let mut out = Vec::with_capacity(n * self.per_output);
        for (chunk_no, chunk) in input.chunks(self.max_batch * self.per_input).enumerate() {
            let b = chunk.len() / self.per_input;
            let bytes: Vec<u8> = if self.input_half {
                chunk.iter().flat_map(|&v| crate::gpu::f32_to_f16_bits(v).to_ne_bytes()).collect()
            } else {
                chunk.iter().flat_map(|&v| v.to_ne_bytes()).collect()
            };
            let st = &mut *st;
            let handle = st.handle.0;
            let mut view = st.input.slice_mut(0..bytes.len());
            self.stream.memcpy_htod(&bytes, &mut view).map_err(|e| anyhow!("{e:?}"))?;
            let out_bytes = b * self.per_output * if self.output_half { 2 } else { 4 };
            {
                let (ip, _g1) = st.input.device_ptr(&self.stream);
                let (op, _g2) = st.output.device_ptr_mut(&self.stream);
                // SAFETY: both buffers hold max_batch ≥ b slices in the engine's types and live until the sync below.
                unsafe { self.enqueue_locked(handle, ip, op, b, &self.stream) }
                    .with_context(|| format!("batch {chunk_no}"))?;
            }
            let host = self.stream.clone_dtoh(&st.output.slice(0..out_bytes)).map_err(|e| anyhow!("{e:?}"))?;
            self.stream.synchronize().map_err(|e| anyhow!("{e:?}"))?;
            if self.output_half {
                out.extend(host.chunks_exact(2).map(|c| crate::gpu::f16_bits_to_f32(u16::from_ne_bytes([c[0], c[1]]))));
            } else {
                out.extend(host.chunks_exact(4).map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]])));
            }
        }
        Ok(out)
    }
}
