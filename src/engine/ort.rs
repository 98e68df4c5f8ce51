//! ort — ONNX Runtime, loaded at run time (`load-dynamic`), so the binary builds and runs without it.
//!
//! Where the library comes from, in order: `ORT_DYLIB_PATH`; the PyPI `onnxruntime` wheel's
//! `onnxruntime/capi/libonnxruntime.so*` (found by asking `python3` where the package lives);
//! `/usr/lib/lungsentry/libonnxruntime.so`; `/usr/local/lib/libonnxruntime.so`; `/usr/lib/libonnxruntime.so`.
//! A missing or unloadable library is an error, never a panic (the path is checked before `ort` touches it, and
//! the loading itself runs under `catch_unwind`).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;

use super::{available_threads, check_input, Engine};
use crate::model::Model;

/// The process-wide ONNX Runtime environment (ort allows one per process), or why it could not be made.
static ENVIRONMENT: OnceLock<std::result::Result<(PathBuf, Environment), String>> = OnceLock::new();

/// Candidate library paths, in the documented order; only existing files are returned.
pub fn library_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH") {
        if !p.is_empty() {
            out.push(PathBuf::from(p));
            // An explicit choice is the only candidate: falling back silently would hide a misconfiguration.
            return out;
        }
    }
    if let Some(dir) = python_wheel_dir() {
        let capi = dir.join("capi");
        if let Ok(rd) = std::fs::read_dir(&capi) {
            let mut libs: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libonnxruntime.so") || n == "libonnxruntime.dylib")
                })
                .collect();
            libs.sort();
            out.extend(libs);
        }
    }
    for p in ["/usr/lib/lungsentry/libonnxruntime.so", "/usr/local/lib/libonnxruntime.so", "/usr/lib/libonnxruntime.so"]
    {
        out.push(PathBuf::from(p));
    }
    out.into_iter().filter(|p| p.is_file()).collect()
}

/// The installed `onnxruntime` Python package folder, if `python3` has one.
fn python_wheel_dir() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    let p = PathBuf::from(s.trim());
    p.is_dir().then_some(p)
}

fn make_environment() -> std::result::Result<(PathBuf, Environment), String> {
    let explicit = std::env::var("ORT_DYLIB_PATH").ok().filter(|s| !s.is_empty());
    let candidates = library_candidates();
    if candidates.is_empty() {
        return Err(match explicit {
            Some(p) => format!("ORT_DYLIB_PATH={p} does not name an existing file"),
            None => "no ONNX Runtime library found (set ORT_DYLIB_PATH, install the onnxruntime Python wheel, or \
                     place libonnxruntime.so in /usr/lib/lungsentry)"
                .to_string(),
        });
    }
    let mut errors = Vec::new();
    for path in candidates {
        let attempt = std::panic::catch_unwind(|| -> std::result::Result<Environment, String> {
            let builder = ort::init_from(&path).map_err(|e| e.to_string())?;
            builder.with_name("lungsentry").build().map_err(|e| e.to_string())
        });
        match attempt {
            Ok(Ok(env)) => return Ok((path, env)),
            Ok(Err(e)) => errors.push(format!("{}: {e}", path.display())),
            Err(_) => errors.push(format!("{}: loading panicked", path.display())),
        }
        // ort keeps the first library it loaded; after a failure past dlopen no other candidate can be tried.
        break;
    }
    Err(format!("ONNX Runtime failed to load: {}", errors.join("; ")))
}

/// The environment, created on first use; the library path it came from.
fn environment() -> Result<(&'static Path, &'static Environment)> {
    match ENVIRONMENT.get_or_init(make_environment) {
        Ok((p, e)) => Ok((p.as_path(), e)),
        Err(e) => Err(anyhow!("{e}")),
    }
}

/// ONNX Runtime running the shipped model on the CPU execution provider.
pub struct OrtEngine {
    /// ort sessions need `&mut` to run; batches are serialised (ORT parallelises inside each run).
    session: Mutex<Session>,
    /// Input name from the manifest.
    input_name: String,
    /// Output name from the manifest.
    output_name: String,
    /// The model (for contract checks).
    model: Model,
}

impl OrtEngine {
    /// Loads the library (once per process) and builds a session with intra-op threads = available cores.
    pub fn load(model: &Model) -> Result<OrtEngine> {
        let (lib, env) = environment()?;
        let threads = available_threads();
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<Session> {
            let builder = Session::builder(env).map_err(|e| anyhow!("ort: session builder: {e}"))?;
            let mut builder = builder
                .with_optimization_level(GraphOptimizationLevel::All)
                .map_err(|e| anyhow!("ort: optimisation level: {e}"))?
                .with_intra_threads(threads)
                .map_err(|e| anyhow!("ort: intra-op threads: {e}"))?;
            builder
                .commit_from_file(&model.onnx_path)
                .map_err(|e| anyhow!("ort: loading {}: {e}", model.onnx_path.display()))
        }));
        let session = match built {
            Ok(r) => r?,
            Err(_) => bail!("ort: building the session panicked (library {})", lib.display()),
        };
        let input_name = model.manifest.input.name.clone();
        let output_name = model.manifest.output.name.clone();
        if !session.inputs().iter().any(|o| o.name() == input_name) {
            bail!("ort: the model has no input named {input_name:?} (manifest input.name)");
        }
        if !session.outputs().iter().any(|o| o.name() == output_name) {
            bail!("ort: the model has no output named {output_name:?} (manifest output.name)");
        }
        tracing::info!(library = %lib.display(), threads, "ONNX Runtime session ready");
        Ok(OrtEngine { session: Mutex::new(session), input_name, output_name, model: model.clone() })
    }
}

impl Engine for OrtEngine {
    fn name(&self) -> &'static str {
        "ort"
    }

    fn infer(&self, input: &[f32], n: usize) -> Result<Vec<f32>> {
        check_input(&self.model, input, n)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let i = &self.model.manifest.input;
        let classes = self.model.manifest.output.classes.len();
        let tensor = TensorRef::from_array_view(([n, i.channels, i.height, i.width], input))
            .map_err(|e| anyhow!("ort: input tensor: {e}"))?;
        let mut session = self.session.lock().map_err(|_| anyhow!("ort: session lock poisoned"))?;
        let outputs =
            session.run(ort::inputs![self.input_name.as_str() => tensor]).map_err(|e| anyhow!("ort: run: {e}"))?;
        let value = outputs.get(&self.output_name).with_context(|| format!("ort: no output {:?}", self.output_name))?;
        let (shape, data) = value.try_extract_tensor::<f32>().map_err(|e| anyhow!("ort: output: {e}"))?;
        let expected = [n as i64, classes as i64, i.height as i64, i.width as i64];
        if shape.iter().copied().collect::<Vec<i64>>() != expected {
            bail!("ort: output shape {:?}, expected {:?}", shape, expected);
        }
        Ok(data.to_vec())
    }
}
