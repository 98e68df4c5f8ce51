//! eval — the paper's metrics over labelled 2D image folders or labelled phantom series (issue 3).
//!
//! Owns: `lungsentry eval`. Two modes:
//! - `--images DIR --masks DIR [--lungs DIR]`: 2D image folders, PNG or JPEG (`.png`, `.jpg`, `.jpeg`; any size,
//!   already the normalised image, 8-bit, or 16-bit scaled to 8 bits — PNG by its high byte, JPEG by its sample
//!   precision; colour images by their first channel; masks matched by file stem, any nonzero pixel = lesion). Reports lesion Dice (global and mean per image), mean
//!   per-image IoU with the paper's convention (1 for a normal image with no prediction, 0 for a false positive),
//!   slice-level accuracy / sensitivity / specificity, AUC of the per-slice maximum lesion probability (softmax of
//!   the scores), lung Dice when lung masks are given, and ms/slice — per engine.
//! - `--series DIR...`: phantom folders (`lungsentry phantom`: DICOM files + `labels.raw` u8 z,y,x + `truth.json`).
//!   Runs the same series path as the daemon (decode → HU → contract → engine → masks → 3D analysis) and reports
//!   voxel Dice, involvement error and series-level sensitivity/specificity at the 0.4 % threshold, plus the
//!   image-level metrics above over all slices of all series (`slice_level`).
//! - `--real MANIFEST`: real CT series without masks, judged by their expected flag (`real.rs`): per-series
//!   involvement, lung volume, lesions, positive slices, slice specificity of negative series, series sensitivity /
//!   specificity, and (`--overlays DIR`) key images of the worst false-positive slices.
//!
//! Parts: [`metrics`] (overlap, confusion, AUC), [`images`] (PNG / JPEG readers), [`real`] (`--real`), [`overlay`]
//! (key images); this file holds the command, the image-folder and phantom-series modes.
//! Never: changes a model or writes anything but its report (stdout, `--out`) and `--overlays`.

pub mod images;
pub mod metrics;
pub mod overlay;
pub mod real;

use images::files_by_stem;
pub use images::{read_gray_image, read_jpeg_gray, read_png_gray, GrayImage, IMAGE_EXTENSIONS};
pub use metrics::{auc, Confusion, Overlap, SliceMetrics};

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::analysis::{self, AnalysisParams, PlacedSlice};
use crate::config::{AnalysisConfig, EngineKind};
use crate::decode::{self, HuSlice};
use crate::engine::{load_engine, Engine};
use crate::model::Model;
use crate::preprocess;

/// `lungsentry eval` options.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Print one JSON object (otherwise a short human summary).
    #[arg(long)]
    pub json: bool,
    /// Folder of PNG or JPEG images, 8- or 16-bit (2D mode).
    #[arg(long, requires = "masks")]
    pub images: Option<PathBuf>,
    /// Folder of lesion masks matched to `--images` by file stem (nonzero = lesion).
    #[arg(long, requires = "images")]
    pub masks: Option<PathBuf>,
    /// Folder of lung masks matched by file stem (optional, 2D mode).
    #[arg(long, requires = "images")]
    pub lungs: Option<PathBuf>,
    /// Phantom series folders (series mode).
    #[arg(long, num_args = 1.., conflicts_with = "images")]
    pub series: Vec<PathBuf>,
    /// Real-series manifest (real mode): `[[series]]` entries with name, path, kind (dicom, dicom-slices,
    /// luna-png) and expected flag (positive, negative); no masks needed.
    #[arg(long, value_name = "MANIFEST", conflicts_with_all = ["images", "series"])]
    pub real: Option<PathBuf>,
    /// Real mode: root of the manifest's relative paths (default: LUNGSENTRY_DATA, else ../shared/data).
    #[arg(long, value_name = "DIR", requires = "real")]
    pub data: Option<PathBuf>,
    /// Real mode: write PNG key images of the worst false-positive slices (most lesion pixels in negative series).
    #[arg(long, value_name = "DIR", requires = "real")]
    pub overlays: Option<PathBuf>,
    /// Real mode: how many slices `--overlays` writes.
    #[arg(long, default_value_t = 12)]
    pub overlay_count: usize,
    /// Also write the JSON report to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Use only the first N images / series (sorted by name).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Engine(s) to evaluate; repeat to compare (auto, tract, ort).
    #[arg(long, default_value = "auto")]
    pub engine: Vec<EngineKind>,
    /// Model manifest.
    #[arg(long, default_value = "models/manifest.toml")]
    pub manifest: PathBuf,
    /// Series mode: positive when involvement exceeds this percentage.
    #[arg(long, default_value_t = 0.4)]
    pub threshold_percent: f64,
    /// Series mode: lesion components below this volume (mL) are dropped (the daemon's default).
    #[arg(long, default_value_t = 0.01)]
    pub min_lesion_volume_ml: f64,
    /// Lesion pixels less dense than this (HU) count as aerated lung (analysis.lesion_min_hu; default: the
    /// daemon's).
    #[arg(long, allow_hyphen_values = true)]
    pub lesion_min_hu: Option<f64>,
    /// A lesion lying one slice thick on the tissue of the slice below counts as lung (analysis.partial_volume_rule;
    /// default: the daemon's).
    #[arg(long)]
    pub partial_volume_rule: bool,
    /// Slices per engine call.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
}

impl EvalArgs {
    /// The daemon's analysis settings with this run's threshold, minimum lesion volume and (when given) HU floor.
    pub(crate) fn analysis_config(&self) -> AnalysisConfig {
        let mut a = AnalysisConfig {
            positive_threshold_percent: self.threshold_percent,
            min_lesion_volume_ml: self.min_lesion_volume_ml,
            ..AnalysisConfig::default()
        };
        if self.lesion_min_hu.is_some() {
            a.lesion_min_hu = self.lesion_min_hu;
        }
        a.partial_volume_rule |= self.partial_volume_rule;
        a
    }
}

fn load_engines(args: &EvalArgs, model: &Model) -> Result<Vec<Box<dyn Engine>>> {
    let mut kinds = args.engine.clone();
    kinds.dedup();
    kinds.iter().map(|k| load_engine(*k, model).with_context(|| format!("loading engine {k:?}"))).collect()
}

/// Result of one engine over the 2D folders.
#[derive(Debug, Serialize)]
pub struct ImageEval {
    pub engine: String,
    pub n_images: usize,
    pub ms_per_slice: f64,
    pub lesion_dice_global: f64,
    pub lesion_dice_mean: f64,
    pub lesion_iou_mean: f64,
    pub slice_accuracy: Option<f64>,
    pub slice_sensitivity: Option<f64>,
    pub slice_specificity: Option<f64>,
    pub slice_auc: Option<f64>,
    pub slice_confusion: Confusion,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lung_dice_global: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lung_dice_mean: Option<f64>,
}

/// Evaluates one engine over prepared image pairs.
pub fn eval_images(
    engine: &dyn Engine,
    model: &Model,
    items: &[(String, PathBuf, PathBuf, Option<PathBuf>)],
    batch: usize,
) -> Result<ImageEval> {
    let inp = &model.manifest.input;
    let classes = model.manifest.output.classes.len();
    let (h, w) = (inp.height, inp.width);
    let plane = h * w;
    if inp.channels != 1 {
        bail!("2D evaluation needs a single-channel model (manifest input.channels = {})", inp.channels);
    }
    let mut slices = SliceMetrics::default();
    let mut lung_all = Overlap::default();
    let mut lung_dice_sum = 0.0;
    let mut lung_n = 0usize;
    let mut infer_s = 0.0;
    for chunk in items.chunks(batch.max(1)) {
        let mut x = vec![0f32; chunk.len() * plane];
        for (i, (_, img, _, _)) in chunk.iter().enumerate() {
            let g = read_gray_image(img)?;
            let r = preprocess::resize_bilinear_u8(&g.px, g.rows, g.cols, h, w);
            preprocess::u8_to_input(&r, &mut x[i * plane..(i + 1) * plane]);
        }
        let t = Instant::now();
        let scores = engine.infer(&x, chunk.len())?;
        infer_s += t.elapsed().as_secs_f64();
        for (i, (stem, _, mask, lung)) in chunk.iter().enumerate() {
            let m = read_gray_image(mask)?;
            let s = &scores[i * classes * plane..(i + 1) * classes * plane];
            let dummy = HuSlice::from_hu(m.rows, m.cols, vec![0.0; m.rows * m.cols]);
            let seg = analysis::segment_slice(s, classes, h, w, &dummy);
            let truth: Vec<bool> = m.px.iter().map(|&v| v != 0).collect();
            let o = Overlap::count(seg.lesion.to_bools().into_iter(), truth.iter().copied());
            slices.add(o, seg.lesion.count() > 0, seg.max_lesion_probability as f64);
            if let Some(lp) = lung {
                let l = read_gray_image(lp)?;
                if (l.rows, l.cols) != (m.rows, m.cols) {
                    bail!("{stem}: lung mask is {}×{}, lesion mask {}×{}", l.rows, l.cols, m.rows, m.cols);
                }
                let lo = Overlap::count(seg.lung.to_bools().into_iter(), l.px.iter().map(|&v| v != 0));
                lung_all.add(lo);
                lung_dice_sum += lo.dice();
                lung_n += 1;
            }
        }
    }
    let n = items.len().max(1) as f64;
    Ok(ImageEval {
        engine: engine.name().to_string(),
        n_images: items.len(),
        ms_per_slice: infer_s * 1000.0 / n,
        lesion_dice_global: slices.lesion.dice(),
        lesion_dice_mean: slices.dice_sum / n,
        lesion_iou_mean: slices.iou_sum / n,
        slice_accuracy: slices.confusion.accuracy(),
        slice_sensitivity: slices.confusion.sensitivity(),
        slice_specificity: slices.confusion.specificity(),
        slice_auc: auc(&slices.max_prob, &slices.truth_pos),
        slice_confusion: slices.confusion,
        lung_dice_global: (lung_n > 0).then(|| lung_all.dice()),
        lung_dice_mean: (lung_n > 0).then(|| lung_dice_sum / lung_n as f64),
    })
}

fn run_images(args: &EvalArgs, model: &Model, images: &Path, masks: &Path) -> Result<Value> {
    let imgs = files_by_stem(images, IMAGE_EXTENSIONS)?;
    let msks = files_by_stem(masks, IMAGE_EXTENSIONS)?;
    let lungs = args.lungs.as_deref().map(|d| files_by_stem(d, IMAGE_EXTENSIONS)).transpose()?;
    let mut items = Vec::new();
    for (stem, img) in &imgs {
        let Some(mask) = msks.get(stem) else { bail!("no mask for image {stem} in {}", masks.display()) };
        let lung = match &lungs {
            Some(l) => Some(l.get(stem).with_context(|| format!("no lung mask for image {stem}"))?.clone()),
            None => None,
        };
        items.push((stem.clone(), img.clone(), mask.clone(), lung));
    }
    if let Some(n) = args.limit {
        items.truncate(n);
    }
    if items.is_empty() {
        bail!("no PNG or JPEG images in {}", images.display());
    }
    let mut out = Vec::new();
    for engine in load_engines(args, model)? {
        out.push(eval_images(engine.as_ref(), model, &items, args.batch)?);
    }
    Ok(json!({"mode": "images", "model": model.identity(), "n_images": items.len(), "engines": out}))
}

/// Truth of a phantom folder as eval reads it (a subset of `truth.json`).
#[derive(Debug, serde::Deserialize)]
struct PhantomTruthView {
    n_slices: usize,
    size: usize,
    involvement_percent: f64,
    positive: bool,
    lung_volume_ml: f64,
    lesion_volume_ml: f64,
    files: Vec<String>,
}

/// Per-series evaluation result.
#[derive(Debug, Serialize)]
pub struct SeriesEval {
    pub series: String,
    pub truth_involvement_percent: f64,
    pub predicted_involvement_percent: f64,
    pub involvement_error: f64,
    pub truth_positive: bool,
    pub predicted_positive: bool,
    pub truth_lung_volume_ml: f64,
    pub predicted_lung_volume_ml: f64,
    pub truth_lesion_volume_ml: f64,
    pub predicted_lesion_volume_ml: f64,
    pub lesion_dice: f64,
    pub lung_dice: f64,
    pub n_lesions: usize,
    pub ms_per_slice: f64,
    /// Image-level metrics of this series' slices.
    #[serde(skip)]
    pub slices: SliceMetrics,
}

/// The product's per-slice path for a batch of HU slices: the model's input contract, one engine call, masks at
/// native resolution (`analysis::segment_slice`). Returns the segmentations (in `hus` order) and the engine call's
/// seconds.
pub(crate) fn segment_batch(
    engine: &dyn Engine,
    model: &Model,
    hus: &[HuSlice],
) -> Result<(Vec<analysis::SliceSegmentation>, f64)> {
    let inp = &model.manifest.input;
    let classes = model.manifest.output.classes.len();
    let plane = inp.height * inp.width;
    let mut x = vec![0f32; hus.len() * plane];
    for (hu, xi) in hus.iter().zip(x.chunks_exact_mut(plane)) {
        preprocess::prepare(hu, inp, xi)?;
    }
    let t = Instant::now();
    let scores = engine.infer(&x, hus.len())?;
    let secs = t.elapsed().as_secs_f64();
    let segs = hus
        .iter()
        .zip(scores.chunks_exact(classes * plane))
        .map(|(hu, s)| analysis::segment_slice(s, classes, inp.height, inp.width, hu))
        .collect();
    Ok((segs, secs))
}

/// Runs one engine over one phantom folder.
pub fn eval_series(
    engine: &dyn Engine,
    model: &Model,
    dir: &Path,
    params: &AnalysisParams,
    batch: usize,
) -> Result<SeriesEval> {
    let truth: PhantomTruthView = serde_json::from_slice(
        &std::fs::read(crate::tools::phantom::truth_file(dir, "truth.json"))
            .with_context(|| format!("reading the truth.json of {}", dir.display()))?,
    )
    .with_context(|| format!("parsing {}/truth.json", dir.display()))?;
    let labels = std::fs::read(crate::tools::phantom::truth_file(dir, "labels.raw"))
        .with_context(|| format!("reading the labels.raw of {}", dir.display()))?;
    let plane_native = truth.size * truth.size;
    if labels.len() != truth.n_slices * plane_native || truth.files.len() != truth.n_slices {
        bail!("{}: labels.raw / files do not match n_slices × size²", dir.display());
    }
    let mut placed = Vec::with_capacity(truth.n_slices);
    let mut lesion_o = Overlap::default();
    let mut lung_o = Overlap::default();
    let mut slices = SliceMetrics::default();
    let mut infer_s = 0.0;
    let file_idx: Vec<usize> = (0..truth.files.len()).collect();
    for chunk in file_idx.chunks(batch.max(1)) {
        let mut hus = Vec::with_capacity(chunk.len());
        for &fi in chunk {
            let obj = crate::spool::read_instance(&dir.join(&truth.files[fi]))?;
            hus.push(decode::decode_hu_frames(&obj)?.into_iter().next().context("no frame")?);
        }
        let (segs, secs) = segment_batch(engine, model, &hus)?;
        infer_s += secs;
        for ((&fi, hu), seg) in chunk.iter().zip(&hus).zip(segs) {
            if (seg.rows, seg.cols) != (truth.size, truth.size) {
                bail!("{}: slice {fi} is {}×{}, labels are {}²", dir.display(), seg.rows, seg.cols, truth.size);
            }
            let lab = &labels[fi * plane_native..(fi + 1) * plane_native];
            let o = Overlap::count(seg.lesion.to_bools().into_iter(), lab.iter().map(|&v| v == 2));
            lesion_o.add(o);
            slices.add(o, seg.lesion.count() > 0, seg.max_lesion_probability as f64);
            lung_o.add(Overlap::count(seg.lung.to_bools().into_iter(), lab.iter().map(|&v| v >= 1)));
            let orientation = hu.image_orientation.unwrap_or([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
            let position = hu.image_position.unwrap_or([0.0, 0.0, fi as f64]);
            let n = [
                orientation[1] * orientation[5] - orientation[2] * orientation[4],
                orientation[2] * orientation[3] - orientation[0] * orientation[5],
                orientation[0] * orientation[4] - orientation[1] * orientation[3],
            ];
            placed.push(PlacedSlice {
                segmentation: seg,
                position_mm: position[0] * n[0] + position[1] * n[1] + position[2] * n[2],
                image_position: position,
                image_orientation: orientation,
                pixel_spacing: hu.pixel_spacing,
                slice_thickness: hu.slice_thickness,
            });
        }
    }
    let res = analysis::analyse_series(&placed, params);
    Ok(SeriesEval {
        series: dir.display().to_string(),
        truth_involvement_percent: truth.involvement_percent,
        predicted_involvement_percent: res.involvement_percent,
        involvement_error: res.involvement_percent - truth.involvement_percent,
        truth_positive: truth.positive,
        predicted_positive: res.positive,
        truth_lung_volume_ml: truth.lung_volume_ml,
        predicted_lung_volume_ml: res.lung_volume_ml,
        truth_lesion_volume_ml: truth.lesion_volume_ml,
        predicted_lesion_volume_ml: res.lesion_volume_ml,
        lesion_dice: lesion_o.dice(),
        lung_dice: lung_o.dice(),
        n_lesions: res.lesions.len(),
        ms_per_slice: infer_s * 1000.0 / truth.n_slices.max(1) as f64,
        slices,
    })
}

fn run_series(args: &EvalArgs, model: &Model) -> Result<Value> {
    let mut dirs = args.series.clone();
    dirs.sort();
    if let Some(n) = args.limit {
        dirs.truncate(n);
    }
    let params = AnalysisParams::from(&args.analysis_config());
    let mut engines_out = Vec::new();
    for engine in load_engines(args, model)? {
        let mut per = Vec::new();
        let mut conf = Confusion::default();
        let mut all_slices = SliceMetrics::default();
        for d in &dirs {
            let e = eval_series(engine.as_ref(), model, d, &params, args.batch)?;
            conf.add(e.predicted_positive, e.truth_positive);
            all_slices.merge(&e.slices);
            per.push(e);
        }
        let n = per.len().max(1) as f64;
        engines_out.push(json!({
            "engine": engine.name(),
            "n_series": per.len(),
            "involvement_mae": per.iter().map(|e| e.involvement_error.abs()).sum::<f64>() / n,
            "involvement_bias": per.iter().map(|e| e.involvement_error).sum::<f64>() / n,
            "lesion_dice_mean": per.iter().map(|e| e.lesion_dice).sum::<f64>() / n,
            "lung_dice_mean": per.iter().map(|e| e.lung_dice).sum::<f64>() / n,
            "series_sensitivity": conf.sensitivity(),
            "series_specificity": conf.specificity(),
            "series_accuracy": conf.accuracy(),
            "series_confusion": conf,
            "threshold_percent": args.threshold_percent,
            "ms_per_slice": per.iter().map(|e| e.ms_per_slice).sum::<f64>() / n,
            "max_abs_involvement_error": per.iter().map(|e| e.involvement_error.abs()).fold(0.0, f64::max),
            "slice_level": all_slices.report(),
            "series": per,
        }));
    }
    Ok(json!({"mode": "series", "model": model.identity(), "engines": engines_out}))
}

pub fn run(args: EvalArgs) -> Result<()> {
    let model = Model::load(&args.manifest)?;
    let report = match (&args.images, &args.masks) {
        _ if args.real.is_some() => real::run_real(&args, &model, args.real.as_deref().unwrap_or(Path::new("")))?,
        (Some(images), Some(masks)) => run_images(&args, &model, images, masks)?,
        _ if !args.series.is_empty() => run_series(&args, &model)?,
        _ => bail!("eval needs --images DIR --masks DIR [--lungs DIR], --series DIR... or --real MANIFEST"),
    };
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report["mode"] == "real" {
        print!("{}", real::table(&report));
    } else {
        for e in report["engines"].as_array().into_iter().flatten() {
            let mut line = format!("{}:", e["engine"].as_str().unwrap_or("?"));
            for k in [
                "lesion_dice_global",
                "lesion_dice_mean",
                "lesion_iou_mean",
                "slice_accuracy",
                "slice_sensitivity",
                "slice_specificity",
                "slice_auc",
                "lung_dice_global",
                "involvement_mae",
                "lesion_dice_mean",
                "series_sensitivity",
                "series_specificity",
                "ms_per_slice",
            ] {
                if let Some(v) = e.get(k).and_then(|v| v.as_f64()) {
                    line.push_str(&format!(" {k}={v:.4}"));
                }
            }
            println!("{line}");
        }
    }
    Ok(())
}
