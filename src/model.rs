//! The shipped model: its manifest (`models/manifest.toml`) and the integrity check at load.
//!
//! Owns: the input contract (name, shape, dtype, normalisation), the class list and the sha256 of the ONNX file.
//! The daemon refuses to start on a model whose sha256 does not match its manifest.
//! Never: runs the model (that is `engine`) or prepares pixels (that is `preprocess`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `models/manifest.toml`, parsed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub model: ModelInfo,
    pub input: InputContract,
    pub output: OutputContract,
}

/// Identity of the model file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    /// Human name, reported in every result.
    pub name: String,
    /// Model version, reported in every result.
    pub version: String,
    /// ONNX file, relative to the manifest's folder.
    pub file: String,
    /// Lower-case hex sha256 of the ONNX file.
    pub sha256: String,
}

/// What the model expects: N×C×H×W float32 with N dynamic.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputContract {
    /// ONNX input name.
    pub name: String,
    /// Channels per sample (1 for 2D; 2k+1 for a 2.5D model stacking k neighbours each side).
    pub channels: usize,
    /// Input height in pixels.
    pub height: usize,
    /// Input width in pixels.
    pub width: usize,
    /// Always "float32" for now.
    pub dtype: String,
    /// How a HU slice becomes model input; see `preprocess::normalise`. Known: "minmax_clahe".
    pub normalisation: String,
    /// HU range clipped before the per-slice min-max.
    pub hu_clip: [f32; 2],
    /// CLAHE clip limit (OpenCV semantics).
    pub clahe_clip_limit: f32,
    /// CLAHE tile grid (tiles × tiles).
    pub clahe_tiles: usize,
}

/// What the model returns: N×classes×H×W scores.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputContract {
    /// ONNX output name.
    pub name: String,
    /// "logits" or "probabilities"; argmax is the same either way.
    pub kind: String,
    /// Class names in channel order: background, lung, lesion.
    pub classes: Vec<String>,
}

/// A manifest plus the verified path of its model file.
#[derive(Debug, Clone)]
pub struct Model {
    pub manifest: Manifest,
    pub onnx_path: PathBuf,
}

impl Model {
    /// Loads the manifest, checks the contract is one we can serve, and verifies the file's sha256.
    pub fn load(manifest_path: &Path) -> Result<Model> {
        let text = std::fs::read_to_string(manifest_path)
            .with_context(|| format!("reading model manifest {}", manifest_path.display()))?;
        let manifest: Manifest =
            toml::from_str(&text).with_context(|| format!("parsing model manifest {}", manifest_path.display()))?;
        if manifest.input.dtype != "float32" {
            bail!("model manifest: input.dtype {:?} unsupported (float32 only)", manifest.input.dtype);
        }
        if manifest.input.normalisation != "minmax_clahe" {
            bail!("model manifest: input.normalisation {:?} unsupported", manifest.input.normalisation);
        }
        if manifest.output.classes.len() != 3 {
            bail!("model manifest: expected 3 classes (background, lung, lesion), got {:?}", manifest.output.classes);
        }
        let dir = manifest_path.parent().unwrap_or(Path::new("."));
        let onnx_path = dir.join(&manifest.model.file);
        let bytes = std::fs::read(&onnx_path).with_context(|| format!("reading model {}", onnx_path.display()))?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if !actual.eq_ignore_ascii_case(&manifest.model.sha256) {
            bail!(
                "model {} has sha256 {actual} but its manifest says {}: refusing to load a model that is not the one shipped",
                onnx_path.display(),
                manifest.model.sha256
            );
        }
        Ok(Model { manifest, onnx_path })
    }

    /// Identity reported in results: name, version, sha256.
    pub fn identity(&self) -> ModelIdentity {
        ModelIdentity {
            name: self.manifest.model.name.clone(),
            version: self.manifest.model.version.clone(),
            sha256: self.manifest.model.sha256.clone(),
        }
    }
}

/// `model{name, version, sha256}` in the result JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub name: String,
    pub version: String,
    pub sha256: String,
}
