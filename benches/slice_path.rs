//! The series worker's per-slice path (`pipeline::SeriesWork::segment`) stage by stage on a real series, and the
//! lung guard's air mask on bit rows against the pixel-by-pixel reference in the same run (issue 24: at 20 img/s
//! the worker has 50 ms per slice, on the cores the receive path also uses).
//!
//!     cargo bench --bench slice_path [-- [DIR] [--engine tract|ort|auto|tensorrt] [--slices N]]
//!
//! DIR: a directory of single-frame CT instances, one series (default: the RICORD series
//! `$LUNGSENTRY_DATA/real-ct-series/covid-ricord-1a-001012/axial_248`, LUNGSENTRY_DATA defaulting to
//! `../shared/data`); engine: tract unless told (the engine the 0.5 s row at 20 img/s is short on); N: the first N
//! instances (default all). Prints, per stage, the mean and the 90th percentile ms per slice: reading the file,
//! decoding the pixel data (JPEG Lossless for RICORD), HU, preprocessing, inference, the model's masks (argmax and
//! upsampling, `segment_slice` without its air mask), the air mask (bit rows, as the product runs it), the pre-seed;
//! then the preprocessing's steps one by one, the pixel air mask on the same slices, the ratio pixel / rows, and whether the two are equal (they must be,
//! bit for bit; the bench exits 1 otherwise). One slice at a time on one thread, as a worker runs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use lungsentry::analysis::lung_guard::{self, AirMasking};
use lungsentry::analysis::{segment_slice, PlacedSlice};
use lungsentry::config::EngineKind;
use lungsentry::model::Model;
use lungsentry::preprocess;

fn main() -> anyhow::Result<()> {
    let (mut dir, mut engine_name, mut limit) = (None, "tract".to_string(), usize::MAX);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--engine" => engine_name = args.next().unwrap_or_default(),
            "--slices" => limit = args.next().and_then(|n| n.parse().ok()).unwrap_or(usize::MAX),
            "--bench" => {}
            _ => dir = Some(PathBuf::from(a)),
        }
    }
    let dir = dir.unwrap_or_else(|| {
        let data = std::env::var("LUNGSENTRY_DATA")
            .map(PathBuf::from)
            .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
        data.join("real-ct-series/covid-ricord-1a-001012/axial_248")
    });
    let kind: EngineKind = engine_name.parse()?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    files.sort();
    files.truncate(limit);
    anyhow::ensure!(!files.is_empty(), "no .dcm file in {}", dir.display());
    let model = Model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/manifest.toml"))?;
    let engine = lungsentry::engine::load_engine(kind, &model)?;
    let input = &model.manifest.input;
    let classes = model.manifest.output.classes.len();

    const STAGES: [&str; 8] =
        ["read file", "decode pixels", "HU", "preprocess", "inference", "model masks", "air mask (rows)", "pre-seed"];
    let mut ms: Vec<Vec<f64>> = vec![Vec::new(); STAGES.len()];
    let mut hus = Vec::with_capacity(files.len());
    let mut rows_air = Vec::with_capacity(files.len());
    let mut x = vec![0f32; input.channels * input.height * input.width];
    let since = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    for f in &files {
        let t = Instant::now();
        let obj = lungsentry::spool::read_instance(f)?;
        ms[0].push(since(t));
        let t = Instant::now();
        let frame = lungsentry::decode::decode_stored_frames(&obj)?.into_iter().next();
        ms[1].push(since(t));
        let t = Instant::now();
        let hu = frame.ok_or_else(|| anyhow::anyhow!("{}: no frame", f.display()))?.into_hu();
        ms[2].push(since(t));
        let t = Instant::now();
        preprocess::prepare(&hu, input, &mut x)?;
        ms[3].push(since(t));
        let t = Instant::now();
        let scores = engine.infer(&x, 1)?;
        ms[4].push(since(t));
        let t = Instant::now();
        let seg = segment_slice(&scores, classes, input.height, input.width, &hu);
        let segment = since(t);
        let t = Instant::now();
        let air = std::hint::black_box(lung_guard::air_mask_with(&hu, AirMasking::Rows));
        let air_ms = since(t);
        // `segment_slice` makes the air mask too: its own share is the rest.
        ms[5].push((segment - air_ms).max(0.0));
        ms[6].push(air_ms);
        let mut placed = PlacedSlice {
            segmentation: seg,
            position_mm: 0.0,
            image_position: hu.image_position.unwrap_or([0.0; 3]),
            image_orientation: hu.image_orientation.unwrap_or([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
            pixel_spacing: hu.pixel_spacing,
            slice_thickness: hu.slice_thickness,
        };
        let t = Instant::now();
        placed.segmentation.pre_seed = lung_guard::pre_seed(&placed);
        ms[7].push(since(t));
        rows_air.push(air);
        hus.push(hu);
    }
    let (rows, cols) = (hus[0].rows, hus[0].cols);
    println!("{} slices {rows}×{cols} from {}, engine {engine_name}", files.len(), dir.display());
    println!("{:18} {:>9} {:>9}", "stage", "mean ms", "p90 ms");
    let mut total = 0.0;
    for (name, v) in STAGES.iter().zip(&ms) {
        let (mean, p90) = stats(v);
        total += mean;
        println!("{name:18} {mean:9.2} {p90:9.2}");
    }
    println!("{:18} {total:9.2}", "sum of means");

    // The preprocessing's steps, one at a time on the same slices.
    let mut steps = [0f64; 4];
    for hu in &hus {
        let t = Instant::now();
        let u8img = preprocess::minmax_u8(&hu.hu, input.hu_clip);
        steps[0] += since(t);
        let t = Instant::now();
        let tiles = input.clahe_tiles;
        let eq = preprocess::clahe_u8(&u8img, hu.rows, hu.cols, input.clahe_clip_limit as f64, tiles, tiles);
        steps[1] += since(t);
        let t = Instant::now();
        let img = preprocess::resize_bilinear_u8(&eq, hu.rows, hu.cols, input.height, input.width);
        steps[2] += since(t);
        let t = Instant::now();
        preprocess::u8_to_input(&img, &mut x);
        steps[3] += since(t);
    }
    let n = hus.len() as f64;
    println!(
        "preprocess, mean ms per slice: min-max {:.2}, CLAHE {:.2}, resize {:.2}, /255 {:.2}",
        steps[0] / n,
        steps[1] / n,
        steps[2] / n,
        steps[3] / n
    );

    // The reference on the same slices, then the product's again (so neither has the warmer caches).
    let mut pixel_ms = Vec::with_capacity(hus.len());
    let mut equal = true;
    for (hu, rows_out) in hus.iter().zip(&rows_air) {
        let t = Instant::now();
        let reference = std::hint::black_box(lung_guard::air_mask_with(hu, AirMasking::Pixels));
        pixel_ms.push(since(t));
        equal &= &reference == rows_out;
    }
    let mut again_ms = Vec::with_capacity(hus.len());
    for hu in &hus {
        let t = Instant::now();
        std::hint::black_box(lung_guard::air_mask_with(hu, AirMasking::Rows));
        again_ms.push(since(t));
    }
    let (pixels, _) = stats(&pixel_ms);
    let (rows_first, _) = stats(&ms[6]);
    let (rows_again, _) = stats(&again_ms);
    let rows_best = rows_first.min(rows_again);
    println!(
        "air mask, mean ms per slice: pixels {pixels:.2}, rows {rows_first:.2} (in the path) / {rows_again:.2} (alone); \
         ratio pixels / rows {:.1}; bit for bit equal on every slice: {equal}",
        pixels / rows_best
    );
    anyhow::ensure!(equal, "the air mask on rows differs from the pixel reference");
    Ok(())
}

/// Mean and 90th percentile.
fn stats(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let p90 = s.get((s.len() * 9 / 10).min(s.len().saturating_sub(1))).copied().unwrap_or(0.0);
    (s.iter().sum::<f64>() / s.len().max(1) as f64, p90)
}
