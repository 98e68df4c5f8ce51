//! engine — runs the model: one small trait, with tract (always built), ONNX Runtime (`ort` feature) and
//! TensorRT (`tensorrt` feature) behind it.
//!
//! Owns: loading the verified ONNX file, batching, and returning raw scores in the manifest's output layout.
//! `auto` picks the fastest engine that loads and logs which.
//! Never: normalises pixels (that is `preprocess`) or interprets scores (that is `analysis`).

use anyhow::Result;

/// A loaded model that turns a batch of prepared slices into class scores.
pub trait Engine: Send + Sync {
    /// Short name reported in results ("tract", "ort", "tensorrt").
    fn name(&self) -> &'static str;
    /// `input` is N×C×H×W float32 (N = `n`) laid out as the manifest's input contract; returns N×K×H×W scores
    /// (K classes) in the same order.
    fn infer(&self, input: &[f32], n: usize) -> Result<Vec<f32>>;
}
