//! engine — runs the model: one small trait, with tract (always built), ONNX Runtime (`ort` feature) and
//! TensorRT (`tensorrt` feature) behind it.
//!
//! Owns: loading the verified ONNX file, batching, and returning raw scores in the manifest's output layout.
//! `auto` picks the fastest engine that loads and logs which.
//! Never: normalises pixels (that is `preprocess`) or interprets scores (that is `analysis`).

use anyhow::{bail, Result};

use crate::config::EngineKind;
use crate::model::Model;

#[cfg(feature = "ort")]
pub mod ort;
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

/// Loads the engine `kind` for `model`. `Auto` tries ONNX Runtime first (faster on CPU), then tract, and logs which
/// one was picked and why.
pub fn load_engine(kind: EngineKind, model: &Model) -> Result<Box<dyn Engine>> {
    match kind {
        EngineKind::Tract => Ok(Box::new(tract::TractEngine::load(model)?)),
        EngineKind::Ort => load_ort(model),
        EngineKind::Tensorrt => {
            bail!("engine \"tensorrt\" is not available in this build (it needs the `tensorrt` feature and its shim)")
        }
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

#[cfg(feature = "ort")]
fn load_ort(model: &Model) -> Result<Box<dyn Engine>> {
    Ok(Box::new(ort::OrtEngine::load(model)?))
}

#[cfg(not(feature = "ort"))]
fn load_ort(_model: &Model) -> Result<Box<dyn Engine>> {
    bail!("engine \"ort\" is not available: this build has no `ort` feature")
}
