//! gpu_check::check — `lungsentry gpu check`: the GPU kernels against the CPU path on a phantom series, and their speed
//! against the memory-bandwidth floor. What the device script (`scripts/gpu-check`) runs on a GPU machine.
//!
//! Owns: the comparison (windowing: bit-identical inputs in f32, identical fp16 bits; decoding: identical masks and
//! counts from the same f32 scores, ≥ 99.99 % identical voxels and counts within 0.1 % from fp16 scores) and the
//! timings (CUDA events, median of repeats; the floor is bytes moved ÷ measured device-to-device copy bandwidth).
//! Writes `gpu-check.json` and `gpu-check.md` (a table for docs/PERFORMANCE.md) into `--out`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use serde_json::json;

use crate::analysis::segment_slice;
use crate::decode::{decode_stored_frames, StoredFrame};
use crate::gpu::decode::DecodePlan;
use crate::gpu::window::{InputPrecision, WindowBatch};
use crate::gpu::{f16_bits_to_f32, f32_to_f16_bits, GpuRuntime};
use crate::model::Model;
use crate::preprocess::{normalise_u8, u8_to_input};

/// `lungsentry gpu check` options.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Slices in the phantom series.
    #[arg(long, default_value_t = 300)]
    pub slices: usize,
    /// Rows = columns of the phantom.
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Phantom seed.
    #[arg(long, default_value_t = 4242)]
    pub seed: u64,
    /// Use this folder of DICOM slices instead of generating a phantom.
    #[arg(long)]
    pub series: Option<PathBuf>,
    /// Engine for the scores both decoders read (tract, ort).
    #[arg(long, default_value = "auto")]
    pub engine: String,
    /// Model manifest (default: the configured one).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Timed repeats per kernel (median reported).
    #[arg(long, default_value_t = 20)]
    pub repeats: usize,
    /// Where gpu-check.json and gpu-check.md go.
    #[arg(long)]
    pub out: PathBuf,
    /// PTX cache folder.
    #[arg(long)]
    pub ptx_cache: Option<PathBuf>,
}

/// A scratch folder removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn median(mut v: Vec<f32>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2] as f64
}

/// Times `f` (which enqueues work on `stream`) with CUDA events: one warm-up, then the median of `repeats`, ms.
fn time_ms(
    rt: &GpuRuntime,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    repeats: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    f()?;
    stream.synchronize()?;
    let ctx = rt.context();
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let a = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let b = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        a.record(stream)?;
        f()?;
        b.record(stream)?;
        b.synchronize()?;
        times.push(a.elapsed_ms(&b)?);
    }
    Ok(median(times))
}

fn load_series(args: &CheckArgs, scratch: &std::path::Path) -> Result<Vec<StoredFrame>> {
    let dir = match &args.series {
        Some(d) => d.clone(),
        None => {
            let mut o = crate::tools::phantom::PhantomOptions::new(scratch.join("phantom"), args.seed);
            o.slices = args.slices;
            o.size = args.size;
            crate::tools::phantom::generate(&o).context("generating the phantom series")?;
            o.out
        }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
        .collect();
    files.sort();
    let mut frames = Vec::with_capacity(files.len());
    for f in &files {
        let obj = crate::spool::read_instance(f)?;
        frames.extend(decode_stored_frames(&obj).with_context(|| format!("decoding {}", f.display()))?);
    }
    if frames.is_empty() {
        bail!("no slices in {}", dir.display());
    }
    Ok(frames)
}

type Report = serde_json::Map<String, serde_json::Value>;

/// Registers, local memory and resident blocks per SM of each kernel at the shape it was launched with.
fn kernel_attributes(rt: &GpuRuntime, batch: &WindowBatch, plan: &DecodePlan) -> Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    let window_smem = batch.plan.shared_bytes() as usize;
    let kernels = [
        ("ls_window_f16", &rt.window_f16, crate::gpu::window::THREADS, window_smem),
        ("ls_window_f32", &rt.window_f32, crate::gpu::window::THREADS, window_smem),
        ("ls_decode_f16", &rt.decode_f16, crate::gpu::decode::THREADS, 0),
        ("ls_decode_f32", &rt.decode_f32, crate::gpu::decode::THREADS, 0),
        ("ls_lesion_maxprob_f16", &rt.maxprob_f16, crate::gpu::decode::THREADS, 0),
    ];
    for (name, f, threads, smem) in kernels {
        out.insert(
            name.into(),
            json!({
                "registers": f.num_regs()?,
                "local_bytes": f.local_size_bytes()?,
                "static_shared_bytes": f.shared_size_bytes()?,
                "dynamic_shared_bytes": smem,
                "threads": threads,
                "blocks_per_sm": f.occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)?,
            }),
        );
    }
    out.insert("decode_blocks_per_slice".into(), json!(plan.config(plan.params.rows * plan.params.cols).grid_dim.0));
    Ok(serde_json::Value::Object(out))
}

/// Writes what is known so far, so a failure part-way (a device run is scarce) still leaves every earlier figure.
fn flush(out: &std::path::Path, rep: &Report) -> Result<()> {
    std::fs::write(out.join("gpu-check.json"), serde_json::to_string_pretty(rep)?)?;
    Ok(())
}

/// Runs the check; returns the JSON report (also written to `--out`, with an `error` entry when a stage failed).
pub fn run(args: CheckArgs) -> Result<serde_json::Value> {
    std::fs::create_dir_all(&args.out)?;
    let mut rep = Report::new();
    let result = run_into(&args, &mut rep);
    if let Err(e) = &result {
        rep.insert("error".into(), json!(format!("{e:#}")));
    }
    flush(&args.out, &rep)?;
    result.map(|()| serde_json::Value::Object(rep))
}

fn run_into(args: &CheckArgs, rep: &mut Report) -> Result<()> {
    let rt = GpuRuntime::open(0, args.ptx_cache.as_deref()).context("opening the GPU")?;
    rep.insert("device".into(), json!(rt.device_name));
    rep.insert("compute_capability".into(), json!(format!("{}.{}", rt.compute_capability.0, rt.compute_capability.1)));
    flush(&args.out, rep)?;
    let stream = rt.new_stream()?;
    let scratch = Scratch(std::env::temp_dir().join(format!("lungsentry-gpu-check-{}", std::process::id())));
    let config = crate::config::Config::default();
    let manifest = args.manifest.clone().unwrap_or(config.engine.manifest.clone());
    let model = Model::load(&manifest)?;
    let input = model.manifest.input.clone();
    if input.channels != 1 {
        bail!("the check compares 2D models (channels 1); this one has {}", input.channels);
    }
    let classes = model.manifest.output.classes.len();
    let t = Instant::now();
    let frames = load_series(args, &scratch.0)?;
    let n = frames.len();
    let (rows, cols) = (frames[0].geometry.rows, frames[0].geometry.cols);
    tracing::info!(slices = n, rows, cols, secs = t.elapsed().as_secs_f64(), "series loaded");

    // CPU path: HU, normalised input.
    let hw = input.height * input.width;
    let t = Instant::now();
    let hus: Vec<_> = frames.iter().cloned().map(StoredFrame::into_hu).collect();
    let mut cpu_input = vec![0f32; n * hw];
    for (hu, out) in hus.iter().zip(cpu_input.chunks_exact_mut(hw)) {
        u8_to_input(&normalise_u8(hu, &input)?, out);
    }
    let cpu_window_ms = t.elapsed().as_secs_f64() * 1e3;

    // GPU windowing, f32 and f16, against the CPU input.
    let refs: Vec<&StoredFrame> = frames.iter().collect();
    let batch = WindowBatch::upload(&rt, &stream, &refs, &input)?;
    let mut out32: CudaSlice<f32> = stream.alloc_zeros(n * hw)?;
    let mut out16: CudaSlice<u16> = stream.alloc_zeros(n * hw)?;
    batch.run_f32(&rt, &stream, &mut out32)?;
    batch.run_f16(&rt, &stream, &mut out16)?;
    let gpu32 = stream.clone_dtoh(&out32)?;
    let gpu16 = stream.clone_dtoh(&out16)?;
    stream.synchronize()?;
    let win32_diff = cpu_input.iter().zip(&gpu32).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    let win16_diff = cpu_input.iter().zip(&gpu16).filter(|(a, &b)| f32_to_f16_bits(**a) != b).count();
    let win_max_abs = cpu_input.iter().zip(&gpu32).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    rep.insert(
        "window".into(),
        json!({
            "f32_values_differing": win32_diff,
            "f32_max_abs_difference": win_max_abs,
            "f16_values_differing": win16_diff,
            "values": n * hw,
            "f16_sample": f16_bits_to_f32(gpu16[hw / 2 + input.width / 2]),
        }),
    );
    flush(&args.out, rep)?;

    // Bandwidth: device-to-device copy of 1 GiB (read + write), the same repeats.
    let copy_elems = 256usize << 20; // u32 → 1 GiB
    let src: CudaSlice<u32> = stream.alloc_zeros(copy_elems)?;
    let mut dst: CudaSlice<u32> = stream.alloc_zeros(copy_elems)?;
    let copy_ms = time_ms(&rt, &stream, args.repeats, || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    let bandwidth = (2 * copy_elems * 4) as f64 / (copy_ms * 1e-3);
    drop((src, dst));

    let win16_ms = time_ms(&rt, &stream, args.repeats, || Ok(batch.run_f16(&rt, &stream, &mut out16)?))?;
    let win32_ms = time_ms(&rt, &stream, args.repeats, || Ok(batch.run_f32(&rt, &stream, &mut out32)?))?;
    rep.insert("copy_bandwidth_gb_s".into(), json!(bandwidth / 1e9));
    rep.insert("window_ms".into(), json!({"f16": win16_ms, "f32": win32_ms}));
    flush(&args.out, rep)?;
    tracing::info!(bandwidth_gb_s = bandwidth / 1e9, win16_ms, win32_ms, "windowing timed");

    // Scores from a CPU engine, then both decoders.
    let kind: crate::config::EngineKind = args.engine.parse()?;
    let engine = crate::engine::load_engine(kind, &model)?;
    let t = Instant::now();
    let per_scores = classes * hw;
    let mut scores = Vec::with_capacity(n * per_scores);
    for chunk in cpu_input.chunks(8 * hw) {
        scores.extend(engine.infer(chunk, chunk.len() / hw)?);
    }
    let engine_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let cpu_seg: Vec<_> = hus
        .iter()
        .zip(scores.chunks_exact(per_scores))
        .map(|(hu, s)| segment_slice(s, classes, input.height, input.width, hu))
        .collect();
    let cpu_decode_ms = t.elapsed().as_secs_f64() * 1e3;

    let scores_dev: CudaSlice<f32> = stream.clone_htod(&scores)?;
    let scores16: Vec<u16> = scores.iter().map(|&v| f32_to_f16_bits(v)).collect();
    let scores16_dev: CudaSlice<u16> = stream.clone_htod(&scores16)?;
    let mut plan = DecodePlan::new(&stream, n, classes, (input.height, input.width), (rows, cols))?;
    plan.run(&rt, &stream, &scores_dev)?;
    let dec32 = plan.download(&stream)?;
    plan.run(&rt, &stream, &scores16_dev)?;
    let dec16 = plan.download(&stream)?;

    let total_voxels = (n * rows * cols) as f64;
    let compare = |d: &crate::gpu::decode::DecodedSlices, cpu_seg: &[crate::analysis::SliceSegmentation]| {
        let mut differing = 0usize;
        let mut worst_count = 0f64;
        let mut exact_counts = true;
        let mut maxprob_diff = 0f32;
        let mut counts_unlike_masks = 0usize;
        for (i, seg) in cpu_seg.iter().enumerate() {
            let (gl, gx) = (d.lung_mask(i), d.lesion_mask(i));
            // A voxel differs when its label differs: (lung, lesion) bits as a pair.
            let a = seg.lung.to_bools();
            let b = seg.lesion.to_bools();
            let c = gl.to_bools();
            let e = gx.to_bools();
            differing += (0..a.len()).filter(|&k| a[k] != c[k] || b[k] != e[k]).count();
            let (cl, cx) = (seg.lung.count() as f64, seg.lesion.count() as f64);
            let (dl, dx) = (d.counts[i].0 as f64, d.counts[i].1 as f64);
            if (dl, dx) != (cl, cx) {
                exact_counts = false;
            }
            // The device counts must equal the device masks; relative to the CPU within the tolerance.
            if (gl.count(), gx.count()) != (d.counts[i].0 as usize, d.counts[i].1 as usize) {
                counts_unlike_masks += 1;
            }
            for (cpu, gpu) in [(cl, dl), (cx, dx)] {
                let rel = if cpu == 0.0 {
                    if gpu == 0.0 {
                        0.0
                    } else {
                        1.0
                    }
                } else {
                    (gpu - cpu).abs() / cpu
                };
                worst_count = worst_count.max(rel);
            }
            maxprob_diff = maxprob_diff.max((seg.max_lesion_probability - d.max_lesion_probability[i]).abs());
        }
        json!({
            "differing_voxels": differing,
            "identical_fraction": 1.0 - differing as f64 / total_voxels,
            "counts_identical": exact_counts,
            "slices_whose_device_counts_differ_from_device_masks": counts_unlike_masks,
            "worst_count_relative_difference": worst_count,
            "max_lesion_probability_max_abs_difference": maxprob_diff,
        })
    };
    let decode32 = compare(&dec32, &cpu_seg);
    let decode16 = compare(&dec16, &cpu_seg);
    // The CPU path on the same fp16-rounded scores (what it decodes behind a TensorRT FP16 engine): any difference
    // left is the kernel's, not the rounding's.
    let scores16_f32: Vec<f32> = scores16.iter().map(|&h| f16_bits_to_f32(h)).collect();
    let cpu_seg16: Vec<_> = hus
        .iter()
        .zip(scores16_f32.chunks_exact(per_scores))
        .map(|(hu, s)| segment_slice(s, classes, input.height, input.width, hu))
        .collect();
    let decode16_same = compare(&dec16, &cpu_seg16);

    let dec16_ms = time_ms(&rt, &stream, args.repeats, || Ok(plan.run(&rt, &stream, &scores16_dev)?))?;
    let dec32_ms = time_ms(&rt, &stream, args.repeats, || Ok(plan.run(&rt, &stream, &scores_dev)?))?;
    let dec16_masks_ms = time_ms(&rt, &stream, args.repeats, || Ok(plan.run_masks(&rt, &stream, &scores16_dev)?))?;
    let dec16_maxprob_ms =
        time_ms(&rt, &stream, args.repeats, || Ok(plan.run_maxprob(&rt, &stream, &scores16_dev)?))?;
    rep.insert(
        "decode_fp16_parts_ms".into(),
        json!({"masks_and_counts": dec16_masks_ms, "max_probability": dec16_maxprob_ms}),
    );
    let floor_ms = |bytes: usize| bytes as f64 / bandwidth * 1e3;
    let row = |name: &str, ms: f64, bytes: usize| {
        json!({"kernel": name, "ms": ms, "bytes": bytes, "floor_ms": floor_ms(bytes),
               "fraction_of_bandwidth": floor_ms(bytes) / ms})
    };
    let timings = vec![
        row("window → fp16", win16_ms, batch.min_bytes(InputPrecision::F16)),
        row("window → fp32", win32_ms, batch.min_bytes(InputPrecision::F32)),
        row("decode fp16 scores", dec16_ms, plan.min_bytes::<u16>()),
        row("decode fp32 scores", dec32_ms, plan.min_bytes::<f32>()),
    ];
    let report = json!({
        "series": {"slices": n, "rows": rows, "cols": cols, "input": [input.height, input.width], "classes": classes},
        "engine_for_scores": engine.name(),
        "decode_f32_scores": decode32,
        "decode_f16_scores": decode16,
        "decode_f16_scores_vs_cpu_on_the_same_f16_scores": decode16_same,
        "kernels": kernel_attributes(&rt, &batch, &plan)?,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "timings": timings,
        "cpu_ms": {"window_single_thread": cpu_window_ms, "decode_single_thread": cpu_decode_ms, "engine": engine_ms},
    });
    let mut md = format!(
        "GPU: {} (cc {}), {} slices of {}×{} → {}×{}; copy bandwidth {:.0} GB/s\n\n\
         | kernel | ms | floor ms | % of bandwidth |\n|---|---|---|---|\n",
        rt.device_name,
        rep["compute_capability"].as_str().unwrap_or(""),
        n,
        rows,
        cols,
        input.height,
        input.width,
        bandwidth / 1e9
    );
    for t in report["timings"].as_array().into_iter().flatten() {
        md += &format!(
            "| {} | {:.3} | {:.3} | {:.0} % |\n",
            t["kernel"].as_str().unwrap_or(""),
            t["ms"].as_f64().unwrap_or(0.0),
            t["floor_ms"].as_f64().unwrap_or(0.0),
            100.0 * t["fraction_of_bandwidth"].as_f64().unwrap_or(0.0)
        );
    }
    for (k, v) in report.as_object().into_iter().flatten() {
        rep.insert(k.clone(), v.clone());
    }
    std::fs::write(args.out.join("gpu-check.md"), md)?;
    Ok(())
}
