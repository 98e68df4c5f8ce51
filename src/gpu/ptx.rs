//! gpu::ptx — our CUDA kernels (`kernels/*.cu`, embedded in the binary) compiled to PTX by NVRTC, cached on disk.
//!
//! Owns: the kernel sources, the NVRTC options (`--fmad=false`, so float math rounds as the CPU path does), and the
//! PTX cache: one file per kernel keyed by sha256(source, options, NVRTC version) and the target architecture.
//! Needs only libnvrtc, not a GPU: `lungsentry gpu ptx` compiles for any architecture (what CI checks).
//! Never: loads libcuda or launches anything (that is `gpu::GpuRuntime`).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::GpuError;

/// One kernel source file.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File name under `kernels/`.
    pub name: &'static str,
    /// CUDA C++ source.
    pub source: &'static str,
    /// `extern "C"` entry points it must define.
    pub entries: &'static [&'static str],
}

/// Stored pixels → model input.
pub const WINDOW: KernelSource = KernelSource {
    name: "window.cu",
    source: include_str!("../../kernels/window.cu"),
    entries: &["ls_window_f16", "ls_window_f32"],
};

/// Scores → masks and counts.
pub const DECODE: KernelSource = KernelSource {
    name: "decode.cu",
    source: include_str!("../../kernels/decode.cu"),
    entries: &["ls_decode_f16", "ls_decode_f32", "ls_lesion_maxprob_f16", "ls_lesion_maxprob_f32"],
};

/// Every kernel the runtime loads.
pub const KERNELS: [KernelSource; 2] = [WINDOW, DECODE];

/// Whether libnvrtc can be loaded (checked before any NVRTC call: cudarc panics when the library is missing).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the candidate library names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32), GpuError> {
    if !nvrtc_present() {
        return Err(GpuError::NoNvrtc);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers; the library is present.
    let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(GpuError::Nvrtc(format!("nvrtcVersion failed: {rc:?}")));
    }
    Ok((major, minor))
}

/// The options every kernel is compiled with, for a virtual architecture such as `compute_90`.
pub fn options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--fmad=false".into(), "-std=c++17".into()]
}

/// `compute_XY` for a compute capability.
pub fn arch_for(cc: (i32, i32)) -> String {
    format!("compute_{}{}", cc.0, cc.1)
}

/// Compiles one kernel for `arch` and checks its entry points are in the PTX.
pub fn compile(k: &KernelSource, arch: &str) -> Result<String, GpuError> {
    if !nvrtc_present() {
        return Err(GpuError::NoNvrtc);
    }
    let opts = cudarc::nvrtc::CompileOptions { options: options(arch), ..Default::default() };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(k.source, opts)
        .map_err(|e| GpuError::Nvrtc(format!("{}: {e:?}", k.name)))?
        .to_src();
    for entry in k.entries {
        if !ptx.contains(&format!(".entry {entry}(")) {
            return Err(GpuError::Nvrtc(format!("{}: PTX lacks entry {entry}", k.name)));
        }
    }
    Ok(ptx)
}

/// Cache file name for one kernel: `<name>-<arch>-<sha256 of source, options and NVRTC version>.ptx`.
pub fn cache_file_name(k: &KernelSource, arch: &str, nvrtc: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(k.source.as_bytes());
    for o in options(arch) {
        h.update(b"\0");
        h.update(o.as_bytes());
    }
    h.update(format!("\0nvrtc {}.{}", nvrtc.0, nvrtc.1).as_bytes());
    let digest = hex::encode(h.finalize());
    format!("{}-{arch}-{}.ptx", k.name.trim_end_matches(".cu"), &digest[..16])
}

/// The PTX of `k` for `arch`: read from `cache_dir` when a file of the right key is there, else compiled (and
/// written there atomically when a cache folder is given). Returns the PTX and whether it came from the cache.
pub fn load_or_compile(k: &KernelSource, arch: &str, cache_dir: Option<&Path>) -> Result<(String, bool), GpuError> {
    let nvrtc = nvrtc_version()?;
    let path: Option<PathBuf> = cache_dir.map(|d| d.join(cache_file_name(k, arch, nvrtc)));
    if let Some(p) = &path {
        if let Ok(ptx) = std::fs::read_to_string(p) {
            if k.entries.iter().all(|e| ptx.contains(&format!(".entry {e}("))) {
                return Ok((ptx, true));
            }
            tracing::warn!(path = %p.display(), "cached PTX is incomplete; recompiling");
        }
    }
    let ptx = compile(k, arch)?;
    if let (Some(p), Some(dir)) = (&path, cache_dir) {
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            let tmp = p.with_extension("ptx.tmp");
            std::fs::write(&tmp, &ptx)?;
            std::fs::rename(&tmp, p)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %p.display(), error = %e, "could not cache PTX (compiling again next start)");
        }
    }
    Ok((ptx, false))
}
