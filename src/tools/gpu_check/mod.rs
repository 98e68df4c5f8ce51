//! gpu_check — `lungsentry gpu …`: what an engineer runs on a GPU machine or in CI (`cuda` feature).
//!
//! `info` says whether the GPU path is usable here and why not; `ptx` compiles the kernels with NVRTC for named
//! architectures (no GPU needed: the CI check); `check` ([`check`]) compares the kernels with the CPU path and
//! times them.
//! Owns: the command line and its JSON. Hands on: reports only. Never: holds a kernel or anything the daemon runs
//! (that is `crate::gpu`, which the engines and the pipeline use).

pub mod check;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;

use crate::gpu::{driver_present, ptx, GpuRuntime};

/// `lungsentry gpu` options.
#[derive(Debug, clap::Args)]
pub struct GpuArgs {
    #[command(subcommand)]
    command: GpuCommand,
}

#[derive(Debug, Subcommand)]
enum GpuCommand {
    /// Whether this machine can run the GPU path (driver, NVRTC, device, kernels), as JSON.
    Info {
        /// PTX cache folder.
        #[arg(long)]
        ptx_cache: Option<PathBuf>,
    },
    /// Compile every kernel to PTX for the given virtual architectures (compute_87 = Jetson Orin, compute_90 =
    /// H100); needs libnvrtc only.
    Ptx {
        /// Virtual architectures.
        #[arg(long = "arch", default_values_t = ["compute_87".to_string(), "compute_90".to_string()])]
        archs: Vec<String>,
        /// Output folder (<kernel>-<arch>.ptx).
        #[arg(long, required_unless_present = "cache")]
        out: Option<PathBuf>,
        /// Go through the start-up PTX cache in this folder instead (prints "compiled" or "from cache").
        #[arg(long)]
        cache: Option<PathBuf>,
    },
    /// Compare the GPU kernels with the CPU path on a phantom series and time them (writes gpu-check.json/.md).
    Check(check::CheckArgs),
    /// The TensorRT engine file the daemon will load for this model, GPU and TensorRT (JSON with the trtexec
    /// inputs); what scripts/build-engine builds.
    #[cfg(feature = "tensorrt")]
    EnginePath {
        /// Model manifest (default: the configured one).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Engine folder (default: the configured one).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Runs `lungsentry gpu …`.
pub fn run(args: GpuArgs) -> Result<()> {
    match args.command {
        GpuCommand::Info { ptx_cache } => {
            let mut info = serde_json::json!({
                "driver": driver_present(),
                "nvrtc": ptx::nvrtc_present(),
                "nvrtc_version": ptx::nvrtc_version().ok().map(|(a, b)| format!("{a}.{b}")),
            });
            match std::panic::catch_unwind(|| GpuRuntime::open(0, ptx_cache.as_deref())) {
                Ok(Ok(rt)) => {
                    info["device"] = rt.device_name.clone().into();
                    info["compute_capability"] =
                        format!("{}.{}", rt.compute_capability.0, rt.compute_capability.1).into();
                    info["kernels_loaded"] = true.into();
                    info["ptx_from_cache"] = rt.ptx_from_cache.into();
                }
                Ok(Err(e)) => info["unavailable"] = e.to_string().into(),
                Err(_) => info["unavailable"] = "CUDA bindings panicked".into(),
            }
            println!("{}", serde_json::to_string_pretty(&info)?);
            Ok(())
        }
        GpuCommand::Ptx { archs, out, cache } => {
            if !ptx::nvrtc_present() {
                bail!("libnvrtc not found (install the nvidia-cuda-nvrtc wheel or the CUDA toolkit; see scripts/nvrtc-env)");
            }
            let version = ptx::nvrtc_version()?;
            for arch in &archs {
                for k in ptx::KERNELS {
                    if let Some(dir) = &cache {
                        let (_, cached) = ptx::load_or_compile(&k, arch, Some(dir))?;
                        println!("{} {arch}: {}", k.name, if cached { "from cache" } else { "compiled" });
                        continue;
                    }
                    let out = out.as_ref().expect("clap requires --out without --cache");
                    std::fs::create_dir_all(out)?;
                    let src = ptx::compile(&k, arch)?;
                    let path = out.join(format!("{}-{arch}.ptx", k.name.trim_end_matches(".cu")));
                    std::fs::write(&path, &src)?;
                    println!(
                        "{} {} bytes, entries {:?} (NVRTC {}.{})",
                        path.display(),
                        src.len(),
                        k.entries,
                        version.0,
                        version.1
                    );
                }
            }
            Ok(())
        }
        #[cfg(feature = "tensorrt")]
        GpuCommand::EnginePath { manifest, dir } => {
            let defaults = crate::config::EngineConfig::default();
            let manifest = manifest.unwrap_or(defaults.manifest);
            let model = crate::model::Model::load(&manifest)?;
            let dir = dir.unwrap_or(defaults.tensorrt_engines);
            let path = crate::engine::tensorrt::engine_path(&model, &dir)?;
            let i = &model.manifest.input;
            let shape = |n: usize| format!("{}:{n}x{}x{}x{}", i.name, i.channels, i.height, i.width);
            let info = serde_json::json!({
                "engine": path,
                "onnx": &model.onnx_path,
                "tensorrt_library": crate::engine::tensorrt::library_version()?,
                "tensorrt_headers": crate::engine::tensorrt::header_version(),
                "min_shapes": shape(1),
                "opt_shapes": shape(8),
                "max_shapes": shape(32),
            });
            println!("{}", serde_json::to_string_pretty(&info)?);
            Ok(())
        }
        GpuCommand::Check(a) => {
            let report = check::run(a)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}
