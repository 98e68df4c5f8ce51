//! engine — runs the model: one small trait, with tract (always built), ONNX Runtime (`ort` feature) and
//! TensorRT (`tensorrt` feature) behind it.
//!
//! Owns: loading the verified ONNX file, batching, and returning raw scores in the manifest's output layout.
//! `auto` picks the fastest engine that loads and logs which.
//! Never: normalises pixels (that is `preprocess`) or interprets scores (that is `analysis`).

use std::path::Path;

use anyhow::{bail, Result};

use crate::config::EngineKind;
use crate::model::Model;

#[cfg(feature = "ort")]
pub mod ort;
#[cfg(feature = "tensorrt")]
pub mod tensorrt;
pub mod tract;

/// A loaded model that turns a batch of prepared slices into class scores.
pub trait Engine: Send + Sync {
    /// Short name reported in results ("tract", "ort", "tensorrt").
    fn name(&self) -> &'static str;
    /// `input` is N×C×H×W float32 (N = `n`) laid out as the manifest's input contract; returns N×K×H×W scores
    /// (K classes) in the same order.
    fn infer(&self, input: &[f32], n: usize) -> Result<Vec<f32>>;
}

/// Threads an engine may use: the machine's available parallelism.
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Checks an input buffer against the contract: `n` × channels × height × width floats.
pub(crate) fn check_input(model: &Model, input: &[f32], n: usize) -> Result<usize> {
    let i = &model.manifest.input;
    let per = i.channels * i.height * i.width;
    if input.len() != n * per {
        bail!(
            "engine input has {} floats, expected {n}×{}×{}×{} = {}",
            input.len(),
            i.channels,
            i.height,
            i.width,
            n * per
        );
    }
    Ok(per)
}

/// Loads the engine `kind` for `model`, TensorRT engines from the default folder (see [`load_engine_in`]).
pub fn load_engine(kind: EngineKind, model: &Model) -> Result<Box<dyn Engine>> {
    load_engine_in(kind, model, &crate::config::EngineConfig::default().tensorrt_engines)
}

/// Loads the engine `kind` for `model`. `Auto` tries ONNX Runtime first (faster on CPU), then tract, and logs which
/// one was picked and why. `Tensorrt` loads the engine for this model, GPU and TensorRT from `tensorrt_dir`; when
/// that is impossible (no `tensorrt` feature, no GPU, no TensorRT runtime, no or a mismatched engine file) it says
/// why in a warning and falls back to the CPU engine `Auto` picks — results name the engine that ran.
pub fn load_engine_in(kind: EngineKind, model: &Model, tensorrt_dir: &Path) -> Result<Box<dyn Engine>> {
    match kind {
        EngineKind::Tract => Ok(Box::new(tract::TractEngine::load(model)?)),
        EngineKind::Ort => load_ort(model),
        EngineKind::Tensorrt => match load_tensorrt(model, tensorrt_dir) {
            Ok(e) => Ok(e),
            Err(why) => {
                tracing::warn!(engine = "tensorrt", reason = %format!("{why:#}"),
                    "TensorRT engine unavailable; falling back to the CPU engine");
                load_engine_in(EngineKind::Auto, model, tensorrt_dir)
            }
        },
        EngineKind::Auto => match load_ort(model) {
            Ok(e) => {
                tracing::info!(engine = "ort", "engine auto: picked ONNX Runtime (its library loaded)");
                Ok(e)
            }
            Err(why) => {
                tracing::info!(engine = "tract", reason = %format!("{why:#}"), "engine auto: ONNX Runtime unavailable, picked tract");
                Ok(Box::new(tract::TractEngine::load(model)?))
            }
        },
    }
}

#[cfg(feature = "tensorrt")]
fn load_tensorrt(model: &Model, dir: &Path) -> Result<Box<dyn Engine>> {
    Ok(Box::new(tensorrt::TensorRtEngine::load(model, dir)?))
}

#[cfg(not(feature = "tensorrt"))]
fn load_tensorrt(_model: &Model, _dir: &Path) -> Result<Box<dyn Engine>> {
    bail!("this build has no `tensorrt` feature")
}

#[cfg(feature = "ort")]
fn load_ort(model: &Model) -> Result<Box<dyn Engine>> {
    Ok(Box::new(ort::OrtEngine::load(model)?))
}

#[cfg(not(feature = "ort"))]
fn load_ort(_model: &Model) -> Result<Box<dyn Engine>> {
    bail!("engine \"ort\" is not available: this build has no `ort` feature")
}
