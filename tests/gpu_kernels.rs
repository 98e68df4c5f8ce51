//! The GPU kernels without a GPU (`cargo test --features cuda --test gpu_kernels`):
//! - NVRTC (the PyPI `nvidia-cuda-nvrtc` wheel) compiles `kernels/*.cu` to PTX for Jetson Orin (compute_87) and
//!   H100 (compute_90) through `lungsentry gpu ptx`, the same code path the daemon uses at start-up, and the PTX
//!   cache is used on the second run and rebuilt when a cached file is damaged;
//! - `lungsentry gpu info` on a machine without libcuda reports it and does not panic (the CPU fallback);
//! - the kernels' *logic* — the same source files, compiled as C++ under `tests/kernel_emu/emu.h`, one CPU thread
//!   per CUDA thread — against the Rust CPU path: windowing bit-identical in f32 and fp16 on phantom and real
//!   DICOM slices and on odd geometry (padding, MONOCHROME1, 12-bit, sizes not divisible by the CLAHE grid,
//!   up- and down-sampling, neighbour-slice stacking); decoding bit-identical masks and exact counts from f32 and
//!   fp16 scores. Speed and real-hardware behaviour are `scripts/gpu-check`'s job on a GPU machine.
#![cfg(feature = "cuda")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use lungsentry::analysis::segment_slice;
use lungsentry::decode::{decode_stored_frames, HuSlice, StoredFormat, StoredFrame, StoredRescale};
use lungsentry::gpu::decode::{upsample_taps, DecodeParams};
use lungsentry::gpu::f32_to_f16_bits;
use lungsentry::gpu::window::WindowPlan;
use lungsentry::model::InputContract;
use lungsentry::preprocess::prepare;

fn bytes_of<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain-old-data slices viewed as bytes for writing to a file.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

fn read_vec<T: Copy + Default>(p: &Path) -> Vec<T> {
    let b = std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    let n = b.len() / std::mem::size_of::<T>();
    let mut v = vec![T::default(); n];
    // SAFETY: v has room for exactly b.len() bytes.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), v.as_mut_ptr().cast::<u8>(), n * std::mem::size_of::<T>()) };
    v
}

/// The emulation harness, compiled once per test run with the system C++ compiler.
fn harness() -> &'static Path {
    static H: OnceLock<PathBuf> = OnceLock::new();
    H.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-emu-harness");
        let o = Command::new("c++")
            .args(["-std=c++20", "-O2", "-ffp-contract=off", "-pthread", "-Wno-div-by-zero", "-o"])
            .arg(&out)
            .arg(root.join("tests/kernel_emu/harness.cpp"))
            .output()
            .expect("a C++ compiler (c++, g++ 12 or newer) must be installed");
        assert!(o.status.success(), "harness does not compile:\n{}", String::from_utf8_lossy(&o.stderr));
        out
    })
}

fn run_harness(kernel: &str, dir: &Path) {
    let o = Command::new(harness()).arg(kernel).arg(dir).output().unwrap();
    assert!(o.status.success(), "harness {kernel} failed: {}", String::from_utf8_lossy(&o.stderr));
}

fn contract(channels: usize, height: usize, width: usize) -> InputContract {
    let mut c = lungsentry::model::Model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/manifest.toml"))
        .expect("shipped model manifest")
        .manifest
        .input;
    c.channels = channels;
    c.height = height;
    c.width = width;
    c
}

/// Runs the windowing kernel under emulation on one batch and compares with `preprocess::prepare` (and, for
/// channels > 1, neighbour stacking with clamped edges). Returns the number of values compared.
fn check_window(frames: &[StoredFrame], input: &InputContract) -> usize {
    let refs: Vec<&StoredFrame> = frames.iter().collect();
    let plan = WindowPlan::new(&refs, input).expect("batch fits the kernel");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("params.bin"), bytes_of(std::slice::from_ref(&plan.params))).unwrap();
    let raw: Vec<u16> = frames.iter().flat_map(|f| f.samples_u16().expect("16-bit")).collect();
    std::fs::write(d.join("raw.bin"), bytes_of(&raw)).unwrap();
    let rescale: Vec<f64> = frames.iter().flat_map(|f| [f.rescale.slope, f.rescale.intercept]).collect();
    std::fs::write(d.join("rescale.bin"), bytes_of(&rescale)).unwrap();
    let (rx, ry, xi, xw, yi, yw) = plan.tables();
    for (name, b) in [
        ("resize_x.bin", bytes_of(rx)),
        ("resize_y.bin", bytes_of(ry)),
        ("clahe_xi.bin", bytes_of(xi)),
        ("clahe_xw.bin", bytes_of(xw)),
        ("clahe_yi.bin", bytes_of(yi)),
        ("clahe_yw.bin", bytes_of(yw)),
    ] {
        std::fs::write(d.join(name), b).unwrap();
    }
    run_harness("window", d);
    let got32: Vec<f32> = read_vec(&d.join("out_f32.bin"));
    let got16: Vec<u16> = read_vec(&d.join("out_f16.bin"));

    let hw = input.height * input.width;
    let per_slice: Vec<Vec<f32>> = frames
        .iter()
        .map(|f| {
            let hu: HuSlice = f.clone().into_hu();
            let one = InputContract { channels: 1, ..input.clone() };
            let mut out = vec![0f32; hw];
            prepare(&hu, &one, &mut out).unwrap();
            out
        })
        .collect();
    let (n, c) = (frames.len(), input.channels);
    let half = c / 2;
    let mut expected = Vec::with_capacity(n * c * hw);
    for i in 0..n {
        for ch in 0..c {
            let src = (i + ch).saturating_sub(half).min(n - 1);
            expected.extend_from_slice(&per_slice[src]);
        }
    }
    assert_eq!(got32.len(), expected.len(), "output size");
    let bad32 = expected.iter().zip(&got32).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    let first = expected.iter().zip(&got32).position(|(a, b)| a.to_bits() != b.to_bits());
    assert_eq!(bad32, 0, "f32 windowing differs from the CPU path at {bad32} values (first at {first:?})");
    let bad16 = expected.iter().zip(&got16).filter(|(a, &b)| f32_to_f16_bits(**a) != b).count();
    assert_eq!(bad16, 0, "fp16 windowing differs from the CPU path's fp16 rounding at {bad16} values");
    expected.len()
}

fn frames_of(files: &[PathBuf]) -> Vec<StoredFrame> {
    files.iter().flat_map(|f| decode_stored_frames(&lungsentry::spool::read_instance(f).unwrap()).unwrap()).collect()
}

fn dicom_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_none_or(|x| x == "dcm"))
        .collect();
    v.sort();
    v
}

#[test]
fn window_kernel_matches_cpu_on_phantom_series() {
    let tmp = tempfile::tempdir().unwrap();
    common::phantom(tmp.path(), 5150, 4, "severe");
    let frames = frames_of(&dicom_files(tmp.path()));
    assert_eq!(frames.len(), 4);
    let n = check_window(&frames, &contract(1, 256, 256));
    assert_eq!(n, 4 * 256 * 256);
    // 2.5D: three neighbour slices per input, edges clamped.
    check_window(&frames, &contract(3, 256, 256));
}

#[test]
fn window_kernel_matches_cpu_on_real_dicom() {
    let data = common::data_dir().join("real-dicom");
    let mut checked = 0;
    for sub in ["lidc-idri-2-slices", "covid19-ny-sbu-axial", "siemens-abdomen-j2k-series"] {
        let frames = frames_of(&dicom_files(&data.join(sub)));
        assert!(!frames.is_empty(), "{sub}: no slices");
        // One batch per slice: the kernel takes one stored-value format per batch.
        for f in frames.iter().take(6) {
            checked += check_window(std::slice::from_ref(f), &contract(1, 256, 256));
        }
    }
    assert!(checked >= 14 * 256 * 256);
}

/// A synthetic frame with every awkward trait at once.
fn odd_frame(rows: usize, cols: usize, seed: u32, monochrome1: bool) -> StoredFrame {
    let format = StoredFormat { bits_allocated: 16, bits_stored: 12, high_bit: 11, signed: false };
    let mut state = seed.wrapping_mul(2654435761).max(1);
    let mut data = Vec::with_capacity(rows * cols * 2);
    for i in 0..rows * cols {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let (r, c) = (i / cols, i % cols);
        // A disc of "body" (smooth gradient + noise), padding outside, junk in the unused high bits.
        let inside = ((r as f64 - rows as f64 / 2.0).powi(2) + (c as f64 - cols as f64 / 2.0).powi(2)).sqrt()
            < rows.min(cols) as f64 * 0.45;
        let v: u16 = if inside { (1024 + (r * 7 + c * 3) % 900 + (state % 200) as usize) as u16 } else { 4095 };
        data.extend_from_slice(&(v | 0xA000).to_ne_bytes());
    }
    StoredFrame {
        data,
        rescale: StoredRescale { format, pad_range: Some((4000, 4095)), monochrome1, slope: 1.25, intercept: -1400.5 },
        geometry: HuSlice::from_hu(rows, cols, Vec::new()),
    }
}

/// Signed 16-bit samples spread over ±`spread` around 0 and a negative slope (HU falls as the stored value rises).
/// A spread wider than the kernel's stored value → u8 table (8192 values) takes its per-pixel path.
fn wide_frame(rows: usize, cols: usize, seed: u32, spread: i32) -> StoredFrame {
    let format = StoredFormat { bits_allocated: 16, bits_stored: 16, high_bit: 15, signed: true };
    let mut state = seed.wrapping_mul(2654435761).max(1);
    let mut data = Vec::with_capacity(rows * cols * 2);
    for _ in 0..rows * cols {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let v = (state % (2 * spread as u32 + 1)) as i32 - spread;
        data.extend_from_slice(&(v as i16).to_ne_bytes());
    }
    StoredFrame {
        data,
        rescale: StoredRescale { format, pad_range: None, monochrome1: false, slope: -0.37, intercept: 55.25 },
        geometry: HuSlice::from_hu(rows, cols, Vec::new()),
    }
}

#[test]
fn window_kernel_matches_cpu_on_odd_geometry() {
    // 300×203: not divisible by the 8×8 grid (reflect-101 padding), non-square, upsampled in x and downsampled in y
    // to 256×320; 12-bit unsigned with junk high bits; padding range; MONOCHROME1 on one batch.
    let frames: Vec<StoredFrame> = (0..3).map(|s| odd_frame(300, 203, s + 1, false)).collect();
    check_window(&frames, &contract(1, 256, 320));
    let mono: Vec<StoredFrame> = (0..2).map(|s| odd_frame(120, 136, s + 7, true)).collect();
    check_window(&mono, &contract(3, 128, 128));
    // Stored values wider than the value table (per-pixel path) and within it, both with a negative slope.
    let wide: Vec<StoredFrame> = (0..2).map(|s| wide_frame(64, 72, s + 3, 30000)).collect();
    check_window(&wide, &contract(1, 48, 40));
    let narrow: Vec<StoredFrame> = (0..2).map(|s| wide_frame(64, 72, s + 5, 1500)).collect();
    check_window(&narrow, &contract(1, 48, 40));
}

/// Runs the decode kernels under emulation and compares with `analysis::segment_slice`.
fn check_decode(scores: &[f32], n: usize, classes: usize, (h, w): (usize, usize), (rows, cols): (usize, usize)) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = DecodeParams::new(classes, (h, w), (rows, cols));
    std::fs::write(d.join("params.bin"), bytes_of(std::slice::from_ref(&p))).unwrap();
    std::fs::write(d.join("n.bin"), bytes_of(&[n as i32])).unwrap();
    std::fs::write(d.join("scores_f32.bin"), bytes_of(scores)).unwrap();
    let s16: Vec<u16> = scores.iter().map(|&v| f32_to_f16_bits(v)).collect();
    std::fs::write(d.join("scores_f16.bin"), bytes_of(&s16)).unwrap();
    let (xi, xw, yi, yw) = upsample_taps((h, w), (rows, cols));
    std::fs::write(d.join("x_idx.bin"), bytes_of(&xi)).unwrap();
    std::fs::write(d.join("x_w.bin"), bytes_of(&xw)).unwrap();
    std::fs::write(d.join("y_idx.bin"), bytes_of(&yi)).unwrap();
    std::fs::write(d.join("y_w.bin"), bytes_of(&yw)).unwrap();
    run_harness("decode", d);

    let hu = HuSlice::from_hu(rows, cols, vec![0.0; rows * cols]);
    let per = classes * h * w;
    let words = p.words as usize;
    let mut totals = (0usize, 0usize);
    for (suffix, s) in [
        ("f32", scores.to_vec()),
        ("f16", s16.iter().map(|&b| lungsentry::gpu::f16_bits_to_f32(b)).collect::<Vec<f32>>()),
    ] {
        let lung: Vec<u32> = read_vec(&d.join(format!("lung_{suffix}.bin")));
        let lesion: Vec<u32> = read_vec(&d.join(format!("lesion_{suffix}.bin")));
        let counts: Vec<u32> = read_vec(&d.join(format!("counts_{suffix}.bin")));
        let maxprob: Vec<f32> = read_vec(&d.join(format!("maxprob_{suffix}.bin")));
        for i in 0..n {
            let seg = segment_slice(&s[i * per..(i + 1) * per], classes, h, w, &hu);
            let gl = lungsentry::analysis::BitMask::from_u32_words(rows, cols, &lung[i * words..(i + 1) * words]);
            let gx = lungsentry::analysis::BitMask::from_u32_words(rows, cols, &lesion[i * words..(i + 1) * words]);
            assert_eq!(gl, seg.lung, "{suffix} slice {i}: lung mask differs");
            assert_eq!(gx, seg.lesion, "{suffix} slice {i}: lesion mask differs");
            assert_eq!(
                (counts[2 * i] as usize, counts[2 * i + 1] as usize),
                (seg.lung.count(), seg.lesion.count()),
                "{suffix} slice {i}: counts"
            );
            totals.0 += seg.lung.count();
            totals.1 += seg.lesion.count();
            let dp = (maxprob[i] - seg.max_lesion_probability).abs();
            assert!(
                dp <= 1e-5,
                "{suffix} slice {i}: max lesion probability {} vs {}",
                maxprob[i],
                seg.max_lesion_probability
            );
        }
    }
    // The comparison means something only when both classes occur.
    assert!(totals.1 > 0 && totals.0 > totals.1, "no lesion or no lung in the decoded masks: {totals:?}");
}

/// Smooth random logits: each class a sum of a few random blobs, so class borders run through the image.
fn blob_scores(n: usize, classes: usize, h: usize, w: usize, seed: u64) -> Vec<f32> {
    let mut st = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut rnd = || {
        st ^= st << 13;
        st ^= st >> 7;
        st ^= st << 17;
        (st >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n * classes * h * w);
    for _ in 0..n {
        for _ in 0..classes {
            let blobs: Vec<(f64, f64, f64, f64)> =
                (0..5).map(|_| (rnd() * h as f64, rnd() * w as f64, 8.0 + rnd() * 40.0, rnd() * 8.0 - 3.0)).collect();
            for y in 0..h {
                for x in 0..w {
                    let v: f64 = blobs
                        .iter()
                        .map(|&(cy, cx, r, a)| {
                            a * (-((y as f64 - cy).powi(2) + (x as f64 - cx).powi(2)) / (r * r)).exp()
                        })
                        .sum();
                    out.push(v as f32);
                }
            }
        }
    }
    out
}

#[test]
fn decode_kernel_matches_cpu() {
    let scores = blob_scores(2, 3, 256, 256, 17);
    check_decode(&scores, 2, 3, (256, 256), (512, 512));
    // A size whose pixel count is not a multiple of 32 (a partial last word), non-square, 4 classes.
    let scores = blob_scores(2, 4, 96, 80, 23);
    check_decode(&scores, 2, 4, (96, 80), (203, 301));
}

#[test]
fn decode_kernel_matches_cpu_on_model_scores() {
    // Real scores: the shipped model (tract) on a phantom with lesions.
    let tmp = tempfile::tempdir().unwrap();
    common::phantom(tmp.path(), 5151, 10, "severe");
    let frames = frames_of(&dicom_files(tmp.path()));
    let model =
        lungsentry::model::Model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/manifest.toml")).unwrap();
    let input = model.manifest.input.clone();
    let engine = lungsentry::engine::load_engine(lungsentry::config::EngineKind::Tract, &model).unwrap();
    let hw = input.height * input.width;
    let mut x = vec![0f32; frames.len() * hw];
    for (f, out) in frames.iter().zip(x.chunks_exact_mut(hw)) {
        prepare(&f.clone().into_hu(), &input, out).unwrap();
    }
    // The slice with the most lesion pixels (on the CPU path) is decoded under emulation.
    let scores = engine.infer(&x, frames.len()).unwrap();
    let per = 3 * hw;
    let best = (0..frames.len())
        .max_by_key(|&i| {
            segment_slice(&scores[i * per..(i + 1) * per], 3, input.height, input.width, &frames[i].clone().into_hu())
                .lesion
                .count()
        })
        .unwrap();
    let mid = &scores[best * per..(best + 1) * per];
    let (rows, cols) = (frames[best].geometry.rows, frames[best].geometry.cols);
    check_decode(mid, 1, 3, (input.height, input.width), (rows, cols));
}

/// A folder where `libnvrtc.so` (+ builtins) from the pip wheel can be found by name (cudarc loads it by name).
fn nvrtc_dir() -> PathBuf {
    let o = Command::new("python3")
        .args(["-c", "import nvidia, os; print(list(nvidia.__path__)[0])"])
        .output()
        .expect("python3");
    let root = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_string());
    let lib = ["cu13/lib", "cuda_nvrtc/lib"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| {
            d.is_dir()
                && std::fs::read_dir(d)
                    .unwrap()
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("libnvrtc.so"))
        })
        .expect("the nvidia-cuda-nvrtc wheel (scripts/requirements-test.txt) must be installed");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nvrtc-lib");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&lib).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("libnvrtc") {
            std::os::unix::fs::symlink(e.path(), dir.join(&name)).unwrap();
            if name.starts_with("libnvrtc.so.") {
                std::os::unix::fs::symlink(e.path(), dir.join("libnvrtc.so")).unwrap();
            }
        }
    }
    dir
}

#[test]
fn kernels_compile_to_ptx_with_nvrtc_and_cache() {
    let lib = nvrtc_dir();
    let tmp = tempfile::tempdir().unwrap();
    let gpu = |args: &[&str]| {
        let o = Command::new(common::bin()).arg("gpu").args(args).env("LD_LIBRARY_PATH", &lib).output().unwrap();
        assert!(o.status.success(), "gpu {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let out = tmp.path().join("ptx");
    gpu(&["ptx", "--arch", "compute_87", "--arch", "compute_90", "--out", out.to_str().unwrap()]);
    for (arch, sm) in [("compute_87", "sm_87"), ("compute_90", "sm_90")] {
        let w = std::fs::read_to_string(out.join(format!("window-{arch}.ptx"))).unwrap();
        let d = std::fs::read_to_string(out.join(format!("decode-{arch}.ptx"))).unwrap();
        assert!(w.contains(&format!(".target {sm}")), "window PTX targets {sm}");
        for e in ["ls_window_f16", "ls_window_f32"] {
            assert!(w.contains(&format!(".entry {e}(")), "{e} in window PTX");
        }
        for e in ["ls_decode_f16", "ls_decode_f32", "ls_lesion_maxprob_f16", "ls_lesion_maxprob_f32"] {
            assert!(d.contains(&format!(".entry {e}(")), "{e} in decode PTX");
        }
        // --fmad=false: no fused multiply-adds where results must equal the CPU path (they would round
        // differently); only expf's library code in the max-probability kernels has its own explicit ones.
        let entries = w.split(".entry ").skip(1).chain(d.split(".entry ").skip(1));
        for (entry, body) in entries.map(|b| (b[..b.find('(').unwrap()].to_string(), b)) {
            if !entry.starts_with("ls_lesion_maxprob") {
                assert!(!body.contains("fma.rn"), "{arch}: {entry} has fused multiply-adds");
            }
        }
    }
    // The cache: compiled on the first run, read on the second, recompiled when a file is damaged.
    let cache = tmp.path().join("cache");
    let c = cache.to_str().unwrap();
    let first = gpu(&["ptx", "--arch", "compute_87", "--cache", c]);
    assert_eq!(first.matches("compiled").count(), 2, "{first}");
    let second = gpu(&["ptx", "--arch", "compute_87", "--cache", c]);
    assert_eq!(second.matches("from cache").count(), 2, "{second}");
    let victim = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("window"))
        .unwrap();
    std::fs::write(victim.path(), "// truncated").unwrap();
    let third = gpu(&["ptx", "--arch", "compute_87", "--cache", c]);
    assert_eq!(third.matches("from cache").count(), 1, "{third}");
    assert_eq!(third.matches("compiled").count(), 1, "{third}");
}

#[test]
fn gpu_info_without_a_driver_falls_back_cleanly() {
    let o = Command::new(common::bin()).args(["gpu", "info"]).output().unwrap();
    assert!(o.status.success(), "gpu info: {}", String::from_utf8_lossy(&o.stderr));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    if info["driver"] == true {
        // A GPU machine: the kernels must load there.
        assert_eq!(info["kernels_loaded"], true, "{info}");
    } else {
        assert!(info["unavailable"].as_str().unwrap().contains("no CUDA driver"), "{info}");
    }
}
