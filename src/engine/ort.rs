//! ort — ONNX Runtime, loaded at run time (`load-dynamic`), so the binary builds and runs without it.
//!
//! Where the library comes from, in order: `ORT_DYLIB_PATH`; the PyPI `onnxruntime` wheel's
//! `onnxruntime/capi/libonnxruntime.so*` (found by asking `python3` where the package lives);
//! `/usr/lib/lungsentry/libonnxruntime.so`; `/usr/local/lib/libonnxruntime.so`; `/usr/lib/libonnxruntime.so`.
//! A missing or unloadable library is an error, never a panic (the path is checked before `ort` touches it, and
//! the loading itself runs under `catch_unwind`).
//!
//! A candidate built for another CPU architecture (its ELF header's `e_machine` is not this binary's: the x86_64
//! wheel seen by an aarch64 binary under qemu-user, a copied library) is skipped with a warning naming both
//! architectures, before `ort` dlopens it, so the next candidate is tried (ort keeps the first library it
//! dlopened, so only a pre-check can skip one) and, with none left, `auto` falls back to tract.

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
    let (candidates, mut errors) = same_architecture(candidates, std::env::consts::ARCH);
    // ort keeps the first library it loaded; after a failure past dlopen no other candidate can be tried, so only the
    // first candidate of the right architecture is attempted.
    if let Some(path) = candidates.into_iter().next() {
        let attempt = std::panic::catch_unwind(|| -> std::result::Result<Environment, String> {
            let builder = ort::init_from(&path).map_err(|e| e.to_string())?;
            builder.with_name("lungsentry").build().map_err(|e| e.to_string())
        });
        match attempt {
            Ok(Ok(env)) => return Ok((path, env)),
            Ok(Err(e)) => errors.push(format!("{}: {e}", path.display())),
            Err(_) => errors.push(format!("{}: loading panicked", path.display())),
        }
    }
    Err(format!("ONNX Runtime failed to load: {}", errors.join("; ")))
}

/// A library whose ELF `e_machine` is not the running binary's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchMismatch {
    /// The library's architecture (`std::env::consts::ARCH` spelling, or `e_machine N` when unknown).
    pub library: String,
    /// This binary's architecture (`std::env::consts::ARCH`).
    pub binary: &'static str,
}

/// ELF `e_machine` values of the architectures Rust names in `std::env::consts::ARCH`.
const ELF_MACHINES: &[(u16, &str)] = &[
    (3, "x86"),
    (8, "mips"),
    (20, "powerpc"),
    (21, "powerpc64"),
    (22, "s390x"),
    (40, "arm"),
    (62, "x86_64"),
    (183, "aarch64"),
    (243, "riscv64"),
    (258, "loongarch64"),
];

/// The `e_machine` field of an ELF file's header, or `None` when the file is not ELF (a macOS dylib, a text stub:
/// left for the loader to judge) or is too short to say.
pub fn elf_machine(path: &Path) -> std::io::Result<Option<u16>> {
    use std::io::Read;
    let mut head = [0u8; 20];
    let mut f = std::fs::File::open(path)?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    if n < head.len() || head[..4] != *b"\x7fELF" {
        return Ok(None);
    }
    // e_ident[EI_DATA] (offset 5): 1 little-endian, 2 big-endian; e_machine is the u16 at offset 18 in both classes.
    let bytes = [head[18], head[19]];
    Ok(match head[5] {
        1 => Some(u16::from_le_bytes(bytes)),
        2 => Some(u16::from_be_bytes(bytes)),
        _ => None,
    })
}

/// Checks that the library at `path` is built for the architecture this binary runs on. Files that are not ELF,
/// cannot be read, or come from an architecture missing in [`ELF_MACHINES`] on either side pass (the loader
/// judges them).
pub fn check_architecture(path: &Path) -> std::result::Result<(), ArchMismatch> {
    check_architecture_for(path, std::env::consts::ARCH)
}

fn check_architecture_for(path: &Path, binary: &'static str) -> std::result::Result<(), ArchMismatch> {
    let Ok(Some(machine)) = elf_machine(path) else { return Ok(()) };
    let Some(&(want, _)) = ELF_MACHINES.iter().find(|(_, a)| *a == binary) else { return Ok(()) };
    if machine == want {
        return Ok(());
    }
    let library = ELF_MACHINES
        .iter()
        .find(|(m, _)| *m == machine)
        .map(|(_, a)| a.to_string())
        .unwrap_or_else(|| format!("e_machine {machine}"));
    Err(ArchMismatch { library, binary })
}

/// Splits `candidates` into those built for `binary`'s architecture (in order) and one message per library
/// skipped for another architecture, each also logged as a warning naming both architectures.
fn same_architecture(candidates: Vec<PathBuf>, binary: &'static str) -> (Vec<PathBuf>, Vec<String>) {
    let mut kept = Vec::new();
    let mut skipped = Vec::new();
    for path in candidates {
        match check_architecture_for(&path, binary) {
            Ok(()) => kept.push(path),
            Err(m) => {
                tracing::warn!(library = %path.display(), library_arch = %m.library, binary_arch = m.binary,
                    "skipping ONNX Runtime library {}: built for {}, this binary is {}", path.display(), m.library,
                    m.binary);
                skipped.push(format!(
                    "{}: built for {}, this binary is {} (skipped)",
                    path.display(),
                    m.library,
                    m.binary
                ));
            }
        }
    }
    (kept, skipped)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 little-endian header (e_ident + e_type + e_machine): what the check reads.
    fn synthetic_elf(dir: &Path, name: &str, machine: u16) -> PathBuf {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2; // ELFCLASS64
        h[5] = 1; // ELFDATA2LSB
        h[6] = 1; // EV_CURRENT
        h[16..18].copy_from_slice(&3u16.to_le_bytes()); // ET_DYN
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        let p = dir.join(name);
        std::fs::write(&p, h).unwrap();
        p
    }

    #[test]
    fn the_running_binary_is_its_own_architecture() {
        let exe = std::env::current_exe().unwrap();
        assert!(elf_machine(&exe).unwrap().is_some(), "the test binary is ELF");
        assert_eq!(check_architecture(&exe), Ok(()));
    }

    #[test]
    fn a_synthetic_header_of_the_other_architecture_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let arm = synthetic_elf(dir.path(), "libonnxruntime-arm.so", 183);
        let x86 = synthetic_elf(dir.path(), "libonnxruntime-x86.so", 62);
        assert_eq!(elf_machine(&arm).unwrap(), Some(183));
        assert_eq!(check_architecture_for(&arm, "aarch64"), Ok(()));
        assert_eq!(
            check_architecture_for(&arm, "x86_64"),
            Err(ArchMismatch { library: "aarch64".into(), binary: "x86_64" })
        );
        assert_eq!(check_architecture_for(&x86, "x86_64"), Ok(()));
        assert_eq!(
            check_architecture_for(&x86, "aarch64"),
            Err(ArchMismatch { library: "x86_64".into(), binary: "aarch64" })
        );
        let odd = synthetic_elf(dir.path(), "odd.so", 9999);
        assert_eq!(check_architecture_for(&odd, "aarch64").unwrap_err().library, "e_machine 9999");
    }

    #[test]
    fn the_wheels_real_library_is_x86_64_on_an_x86_64_host() {
        // A real shared library, not a synthetic header: the onnxruntime wheel's (scripts/test installs it).
        let Some(lib) = python_wheel_dir().and_then(|d| {
            std::fs::read_dir(d.join("capi"))
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so")))
        }) else {
            eprintln!("no onnxruntime wheel here: real-library check not run");
            return;
        };
        assert_eq!(check_architecture(&lib), Ok(()), "{} is the host's architecture", lib.display());
        if std::env::consts::ARCH == "x86_64" {
            assert_eq!(elf_machine(&lib).unwrap(), Some(62));
            let m = check_architecture_for(&lib, "aarch64").unwrap_err();
            assert_eq!(m, ArchMismatch { library: "x86_64".into(), binary: "aarch64" });
        }
    }

    #[test]
    fn files_that_are_not_elf_are_left_to_the_loader() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("libonnxruntime.so");
        std::fs::write(&text, "INPUT(libonnxruntime.so.1)\n").unwrap();
        assert_eq!(elf_machine(&text).unwrap(), None);
        assert_eq!(check_architecture_for(&text, "aarch64"), Ok(()));
        let short = dir.path().join("short.so");
        std::fs::write(&short, b"\x7fELF").unwrap();
        assert_eq!(elf_machine(&short).unwrap(), None);
    }

    #[test]
    fn a_foreign_candidate_is_skipped_and_the_next_one_kept_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let wheel_x86 = synthetic_elf(dir.path(), "wheel-libonnxruntime.so", 62);
        let local_arm = synthetic_elf(dir.path(), "local-libonnxruntime.so", 183);
        let later_arm = synthetic_elf(dir.path(), "later-libonnxruntime.so", 183);
        let (kept, skipped) =
            same_architecture(vec![wheel_x86.clone(), local_arm.clone(), later_arm.clone()], "aarch64");
        assert_eq!(kept, vec![local_arm, later_arm]);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].contains("wheel-libonnxruntime.so") && skipped[0].contains("built for x86_64"));
        assert!(skipped[0].contains("this binary is aarch64"), "{}", skipped[0]);
        let (kept, skipped) = same_architecture(vec![wheel_x86], "aarch64");
        assert!(kept.is_empty() && skipped.len() == 1);
    }
}
