//! eval --real — real CT series without masks, judged only by the flag a radiologist would expect (issue 26).
//!
//! Owns: the real-series manifest (`[[series]]` entries: name, path, kind, expected flag), turning each entry into
//! the series the product would see, and the report: per series involvement, lung volume, lesion count, slices
//! holding a surviving lesion voxel, slice specificity of negative series, the flag against the expected one; then
//! series sensitivity / specificity over the manifest, and (`--overlays DIR`) PNG key images of the worst
//! false-positive slices for a human to look at.
//!
//! Kinds:
//! - `dicom`: a folder of DICOM files. Read and grouped as `analyze` does ([`collect_files`], [`group_by_series`]),
//!   each series segmented and analysed by the daemon's own [`SeriesWork`] (decode → HU → input contract → engine
//!   → masks → 3D analysis), so what is measured is the product's result. A folder holding several series gives one
//!   row per series.
//! - `dicom-slices`: a folder of single-slice files, each its own one-slice series (same path as `dicom`).
//! - `luna-png`: 8-bit PNG slices `z_NNN.png` in lung window L -600 / W 1500 (HU = v × 1500 / 255 − 1350), 256²
//!   (resized from 512²), `z` rising towards the head. They become [`HuSlice`]s and go through the daemon's input
//!   contract ([`preprocess::prepare`]), the engine, [`analysis::segment_slice`] and [`analysis::analyse_series`].
//!   The PNGs carry no geometry: pixel and slice spacing come from the manifest entry, else from the source's
//!   `generation_summary.json` / inventory CSV when they name one (today they do not), else the documented
//!   assumption [`LUNA_PIXEL_SPACING_MM`] / [`LUNA_SLICE_SPACING_MM`] — the report says which. Involvement is a
//!   ratio, so spacing moves it only through the minimum lesion volume.
//!
//! Parts: `luna` (the `luna-png` kind), `report` (overlays and the printed table); this file holds the
//! manifest, the DICOM kinds and the report object.
//!
//! Never: needs masks, changes a model, or writes anything but its report, the `--out` copy and the overlays.

mod luna;
mod report;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Confusion, EvalArgs};
use crate::analysis::{AnalysisParams, BitMask};
use crate::config::Config;
use crate::decode::{self, HuSlice};
use crate::engine::load_engine;
use crate::model::Model;
use crate::pipeline::{InferenceContext, SeriesWork};
use crate::tools::analyze::{collect_files, group_by_series};
use luna::{eval_luna, luna_hu};
pub use luna::{luna_hu_of, luna_slices};
pub use report::table;
use report::write_overlays;

/// Assumed in-plane pixel spacing of the LUNA16 PNGs, mm: LIDC-IDRI chest CTs are about 0.7 mm at 512² (the
/// chest fills the 256² PNGs edge to edge, a ~350 mm field of view), halved in resolution by the 512 → 256 resize.
pub const LUNA_PIXEL_SPACING_MM: f64 = 1.4;
/// Assumed slice spacing of the LUNA16 PNGs, mm: the common LIDC-IDRI reconstruction interval; 276 slices then
/// span 345 mm, upper abdomen to neck, as the images show.
pub const LUNA_SLICE_SPACING_MM: f64 = 1.25;

/// What a manifest entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RealKind {
    /// A folder of DICOM files (one or more series).
    Dicom,
    /// A folder of single-slice DICOM files, each evaluated as its own series.
    DicomSlices,
    /// A folder of lung-window 8-bit PNG slices `z_NNN.png`.
    LunaPng,
}

/// The flag a reader expects for an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expected {
    Positive,
    Negative,
}

impl Expected {
    fn positive(self) -> bool {
        self == Expected::Positive
    }
}

/// One `[[series]]` entry of a real-series manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealEntry {
    /// Short name used in the report.
    pub name: String,
    /// Folder, relative to the data root (`--data`, else `LUNGSENTRY_DATA`) unless absolute.
    pub path: PathBuf,
    /// How the folder is read.
    pub kind: RealKind,
    /// The flag this series should get.
    pub expected: Expected,
    /// `luna-png`: in-plane pixel spacing, mm (overrides the source's files and the assumption).
    pub pixel_spacing_mm: Option<f64>,
    /// `luna-png`: slice spacing, mm.
    pub slice_spacing_mm: Option<f64>,
    /// Free text (provenance, why the expected flag), carried into the report.
    pub note: Option<String>,
}

/// A real-series manifest (`models/eval-real-validation.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealManifest {
    /// What this set is for.
    pub description: Option<String>,
    /// The entries, evaluated in this order.
    pub series: Vec<RealEntry>,
}

impl RealManifest {
    /// Reads and checks a manifest (unknown keys and kinds are errors naming them).
    pub fn load(path: &Path) -> Result<RealManifest> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let m: RealManifest = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if m.series.is_empty() {
            bail!("{}: no [[series]] entries", path.display());
        }
        let mut names = std::collections::BTreeSet::new();
        for e in &m.series {
            if !names.insert(e.name.as_str()) {
                bail!("{}: series name {:?} is used twice", path.display(), e.name);
            }
            if e.kind != RealKind::LunaPng && (e.pixel_spacing_mm.is_some() || e.slice_spacing_mm.is_some()) {
                bail!("{}: {}: pixel_spacing_mm / slice_spacing_mm apply to luna-png only", path.display(), e.name);
            }
            for v in [e.pixel_spacing_mm, e.slice_spacing_mm].into_iter().flatten() {
                if !(v > 0.0 && v.is_finite()) {
                    bail!("{}: {}: spacing must be a positive number of mm", path.display(), e.name);
                }
            }
        }
        Ok(m)
    }
}

/// The data root relative entry paths are resolved against: `--data`, else `LUNGSENTRY_DATA`, else `../shared/data`.
pub fn data_root(flag: Option<&Path>) -> PathBuf {
    let root = flag
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("LUNGSENTRY_DATA").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("../shared/data"));
    std::fs::canonicalize(&root).unwrap_or(root)
}

/// Where pixel and slice spacing came from.
#[derive(Debug, Clone, Serialize)]
pub struct Geometry {
    /// Row, column spacing of the first analysed slice, mm.
    pub pixel_spacing_mm: [f64; 2],
    /// Voxel depth the 3D analysis used, mm.
    pub slice_spacing_mm: f64,
    /// `dicom`, `manifest`, the source file that gave it, or `assumed`.
    pub source: String,
}

/// One slice's line in the report (position order, feet to head for axial series).
#[derive(Debug, Clone, Serialize)]
pub struct SliceRow {
    /// Index in position order.
    pub index: usize,
    /// The file it came from (name only).
    pub file: String,
    /// Lesion pixels that survived the 3D analysis.
    pub lesion_px: usize,
    /// Kept lung pixels (lesion included).
    pub lung_px: usize,
}

/// Where a slice's pixels can be read again (for overlays).
#[derive(Debug, Clone)]
enum SliceSource {
    Dicom(PathBuf),
    LunaPng(PathBuf),
}

impl SliceSource {
    fn file_name(&self) -> String {
        let p = match self {
            SliceSource::Dicom(p) | SliceSource::LunaPng(p) => p,
        };
        p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// The slice in HU, as the product saw it.
    fn load_hu(&self) -> Result<HuSlice> {
        match self {
            SliceSource::Dicom(p) => {
                let obj = crate::spool::read_instance(p)?;
                decode::decode_hu_frames(&obj)?.into_iter().next().context("no frame")
            }
            SliceSource::LunaPng(p) => luna_hu(p),
        }
    }
}

/// A slice's final masks, kept for the overlays of negative series.
struct KeptSlice {
    source: SliceSource,
    lung: BitMask,
    lesion: BitMask,
}

/// The evaluation of one series.
#[derive(Debug, Serialize)]
pub struct RealSeriesEval {
    /// Entry name, `entry/file` for `dicom-slices`, `entry/#k` when a folder holds several series.
    pub name: String,
    /// The manifest entry it came from.
    pub entry: String,
    pub kind: RealKind,
    /// Folder or file.
    pub path: String,
    pub expected: Expected,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub series_instance_uid: Option<String>,
    /// `analysed`, or `skipped` when no slice could be analysed.
    pub status: String,
    /// Files (instances) of the series.
    pub n_slices: usize,
    /// Slices that were segmented and analysed.
    pub analysed_slices: usize,
    /// Analysed slices holding at least one surviving lesion voxel.
    pub positive_slices: usize,
    /// Negative series: analysed slices without a surviving lesion voxel / analysed slices.
    pub slice_specificity: Option<f64>,
    pub involvement_percent: f64,
    pub lung_volume_ml: f64,
    pub lesion_volume_ml: f64,
    pub lesion_count: usize,
    pub largest_lesion_ml: f64,
    /// The product's flag.
    pub positive: bool,
    /// positive == expected; None when the series was skipped (no slice the daemon analyses: it gets no flag and
    /// counts in neither sensitivity nor specificity).
    pub flag_correct: Option<bool>,
    /// Rules the daemon would have skipped the series for (it is analysed anyway, as `analyze` does).
    pub skip_reasons: Vec<String>,
    /// Slices whose pixels could not be used, with the reason.
    pub slice_errors: Vec<String>,
    pub geometry: Geometry,
    /// What the analysis' lung guard did (the result's `lung_guard`, as the product reports it), when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lung_guard: Option<Value>,
    /// Wall time of decode + inference + analysis, ms.
    pub ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub slices: Vec<SliceRow>,
    /// Final masks per slice (negative series only), for the overlays.
    #[serde(skip)]
    kept: Vec<KeptSlice>,
}

impl std::fmt::Debug for KeptSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptSlice").field("source", &self.source).finish()
    }
}

/// The figures of a series from the product's result JSON (`SeriesWork` or `SeriesAnalysis` serialised), its
/// slices in position order and where they came from.
#[allow(clippy::too_many_arguments)]
fn series_eval(
    entry: &RealEntry,
    name: String,
    path: &Path,
    result: &Value,
    slices: Vec<(SliceSource, BitMask, BitMask)>,
    n_slices: usize,
    geometry: Geometry,
    ms: f64,
) -> RealSeriesEval {
    let analysed = !slices.is_empty() && result["status"].as_str() != Some("skipped");
    let rows: Vec<SliceRow> = slices
        .iter()
        .enumerate()
        .map(|(i, (src, lung, lesion))| SliceRow {
            index: i,
            file: src.file_name(),
            lesion_px: lesion.count(),
            lung_px: lung.count(),
        })
        .collect();
    let positive_slices = rows.iter().filter(|r| r.lesion_px > 0).count();
    let lesions = result["lesions"].as_array().cloned().unwrap_or_default();
    let positive = result["positive"].as_bool().unwrap_or(false);
    let negative = !entry.expected.positive();
    let slice_specificity =
        (negative && !rows.is_empty()).then(|| (rows.len() - positive_slices) as f64 / rows.len() as f64);
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|x| match x {
                Value::String(s) => s.clone(),
                other => match (other["sop_instance_uid"].as_str(), other["error"].as_str()) {
                    (Some(uid), Some(e)) => format!("{uid}: {e}"),
                    _ => other.to_string(),
                },
            })
            .collect()
    };
    let kept = if negative {
        slices.into_iter().map(|(source, lung, lesion)| KeptSlice { source, lung, lesion }).collect()
    } else {
        Vec::new()
    };
    RealSeriesEval {
        name,
        entry: entry.name.clone(),
        kind: entry.kind,
        path: path.display().to_string(),
        expected: entry.expected,
        series_instance_uid: result["series_instance_uid"].as_str().map(str::to_string),
        status: if analysed { "analysed" } else { "skipped" }.to_string(),
        n_slices,
        analysed_slices: rows.len(),
        positive_slices,
        slice_specificity,
        involvement_percent: result["involvement_percent"].as_f64().unwrap_or(0.0),
        lung_volume_ml: result["lung_volume_ml"].as_f64().unwrap_or(0.0),
        lesion_volume_ml: result["lesion_volume_ml"].as_f64().unwrap_or(0.0),
        lesion_count: lesions.len(),
        largest_lesion_ml: lesions.iter().filter_map(|l| l["volume_ml"].as_f64()).fold(0.0, f64::max),
        positive,
        flag_correct: analysed.then_some(positive == entry.expected.positive()),
        skip_reasons: strings(&result["skip_reasons"]),
        slice_errors: strings(&result["slice_errors"]),
        geometry,
        lung_guard: result.get("lung_guard").filter(|v| !v.is_null()).cloned(),
        ms,
        note: entry.note.clone(),
        slices: rows,
        kept,
    }
}

/// Runs one DICOM series (already grouped) through the daemon's `SeriesWork`.
fn eval_dicom_series(
    ctx: &InferenceContext,
    entry: &RealEntry,
    name: String,
    path: &Path,
    instances: Vec<(crate::instance::InstanceMeta, PathBuf)>,
) -> RealSeriesEval {
    let t = Instant::now();
    let n = instances.len();
    let mut work = SeriesWork::default();
    for (meta, p) in instances {
        work.add(ctx, meta, &p);
    }
    let now = crate::clock::now_rfc3339();
    let (result, source) = work.finish_with_slices(ctx, "", &now, &now, false);
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let geometry = Geometry {
        pixel_spacing_mm: source.first().and_then(|s| s.meta.pixel_spacing).unwrap_or([1.0, 1.0]),
        slice_spacing_mm: result.slice_spacing_mm.unwrap_or(0.0),
        source: "dicom".into(),
    };
    let slices = source.into_iter().map(|s| (SliceSource::Dicom(s.path), s.lung, s.lesion)).collect();
    // The evaluation reads results as JSON (its image and NIfTI entries make theirs as JSON).
    series_eval(entry, name, path, &result.to_json(), slices, n, geometry, ms)
}

/// Evaluates a `dicom` entry (one row per series in the folder) or a `dicom-slices` entry (one row per file).
fn eval_dicom_entry(ctx: &InferenceContext, entry: &RealEntry, dir: &Path) -> Result<Vec<RealSeriesEval>> {
    let files = collect_files(&[dir.to_path_buf()])?;
    let mut out = Vec::new();
    match entry.kind {
        RealKind::Dicom => {
            let groups = group_by_series(&files);
            if groups.is_empty() {
                bail!("{}: no DICOM instances in {}", entry.name, dir.display());
            }
            let several = groups.len() > 1;
            for (k, (_uid, instances)) in groups.into_iter().enumerate() {
                let name = if several { format!("{}/#{}", entry.name, k + 1) } else { entry.name.clone() };
                out.push(eval_dicom_series(ctx, entry, name, dir, instances));
            }
        }
        RealKind::DicomSlices => {
            for f in &files {
                let groups = group_by_series(std::slice::from_ref(f));
                let Some((_, instances)) = groups.into_iter().next() else { continue };
                let stem = f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                out.push(eval_dicom_series(ctx, entry, format!("{}/{stem}", entry.name), f, instances));
            }
            if out.is_empty() {
                bail!("{}: no DICOM instances in {}", entry.name, dir.display());
            }
        }
        RealKind::LunaPng => unreachable!("luna-png is not DICOM"),
    }
    Ok(out)
}

/// Per-entry summary line (a `dicom-slices` entry counts each slice).
#[derive(Debug, Serialize)]
struct EntrySummary {
    entry: String,
    kind: RealKind,
    expected: Expected,
    n_series: usize,
    flagged_positive: usize,
    /// Series with no analysable slice (no flag).
    skipped: usize,
    correct: usize,
}

/// `lungsentry eval --real MANIFEST`: one report object with one block per engine.
pub fn run_real(args: &EvalArgs, model: &Model, manifest_path: &Path) -> Result<Value> {
    let manifest = RealManifest::load(manifest_path)?;
    let root = data_root(args.data.as_deref());
    let mut config = Config { analysis: args.analysis_config(), ..Config::default() };
    config.engine.manifest = args.manifest.clone();
    let params = AnalysisParams::from(&config.analysis);
    let resolve = |e: &RealEntry| -> Result<PathBuf> {
        let p = if e.path.is_absolute() { e.path.clone() } else { root.join(&e.path) };
        if !p.is_dir() {
            bail!("{}: folder {} does not exist (data root {})", e.name, p.display(), root.display());
        }
        Ok(p)
    };
    let dirs: Vec<PathBuf> = manifest.series.iter().map(resolve).collect::<Result<_>>()?;
    let mut kinds = args.engine.clone();
    kinds.dedup();
    let mut engines_out = Vec::new();
    for (ei, kind) in kinds.iter().enumerate() {
        let engine = load_engine(*kind, model).with_context(|| format!("loading engine {kind:?}"))?;
        let ctx = InferenceContext { model: model.clone(), engine, config: config.clone() };
        let mut series = Vec::new();
        for (e, dir) in manifest.series.iter().zip(&dirs) {
            eprintln!("eval --real [{}]: {} ({:?}, {})", ctx.engine.name(), e.name, e.kind, dir.display());
            match e.kind {
                RealKind::Dicom | RealKind::DicomSlices => series.extend(eval_dicom_entry(&ctx, e, dir)?),
                RealKind::LunaPng => series.push(eval_luna(&ctx, e, dir, &params, args.batch)?),
            }
        }
        let mut conf = Confusion::default();
        for s in series.iter().filter(|s| s.flag_correct.is_some()) {
            conf.add(s.positive, s.expected.positive());
        }
        let skipped = series.iter().filter(|s| s.flag_correct.is_none()).count();
        let neg: Vec<&RealSeriesEval> = series.iter().filter(|s| !s.expected.positive()).collect();
        let neg_slices: usize = neg.iter().map(|s| s.analysed_slices).sum();
        let neg_clear: usize = neg.iter().map(|s| s.analysed_slices - s.positive_slices).sum();
        let by_entry: Vec<EntrySummary> = manifest
            .series
            .iter()
            .map(|e| {
                let rows: Vec<&RealSeriesEval> = series.iter().filter(|s| s.entry == e.name).collect();
                EntrySummary {
                    entry: e.name.clone(),
                    kind: e.kind,
                    expected: e.expected,
                    n_series: rows.len(),
                    flagged_positive: rows.iter().filter(|s| s.positive).count(),
                    skipped: rows.iter().filter(|s| s.flag_correct.is_none()).count(),
                    correct: rows.iter().filter(|s| s.flag_correct == Some(true)).count(),
                }
            })
            .collect();
        // Overlays from the first engine only (the same slices for every engine would only repeat them).
        let overlays = match &args.overlays {
            Some(dir) if ei == 0 => write_overlays(&series, dir, args.overlay_count)?,
            _ => Vec::new(),
        };
        engines_out.push(json!({
            "engine": ctx.engine.name(),
            "n_series": series.len(),
            "n_skipped": skipped,
            "series_confusion": conf,
            "series_sensitivity": conf.sensitivity(),
            "series_specificity": conf.specificity(),
            "series_accuracy": conf.accuracy(),
            "negative_slices": neg_slices,
            "negative_slices_without_lesion": neg_clear,
            "negative_slice_specificity": (neg_slices > 0).then(|| neg_clear as f64 / neg_slices as f64),
            "by_entry": by_entry,
            "overlays": overlays,
            "series": series,
        }));
    }
    Ok(json!({
        "mode": "real",
        "manifest": manifest_path.display().to_string(),
        "description": manifest.description,
        "data_root": root.display().to_string(),
        "model": model.identity(),
        "threshold_percent": args.threshold_percent,
        "min_lesion_volume_ml": args.min_lesion_volume_ml,
        "lesion_min_hu": config.analysis.lesion_min_hu,
        "partial_volume_rule": config.analysis.partial_volume_rule,
        "engines": engines_out,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_rejects_unknown_kinds_keys_and_misplaced_spacing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.toml");
        let write = |t: &str| std::fs::write(&p, t).unwrap();
        write("[[series]]\nname = \"a\"\npath = \"x\"\nkind = \"luna-png\"\nexpected = \"negative\"\nslice_spacing_mm = 2.5\n");
        let m = RealManifest::load(&p).unwrap();
        assert_eq!(m.series[0].kind, RealKind::LunaPng);
        assert_eq!(m.series[0].expected, Expected::Negative);
        write("[[series]]\nname = \"a\"\npath = \"x\"\nkind = \"nifti\"\nexpected = \"negative\"\n");
        assert!(format!("{:#}", RealManifest::load(&p).unwrap_err()).contains("nifti"));
        write("[[series]]\nname = \"a\"\npath = \"x\"\nkind = \"dicom\"\nexpected = \"maybe\"\n");
        assert!(format!("{:#}", RealManifest::load(&p).unwrap_err()).contains("maybe"));
        write("[[series]]\nname = \"a\"\npath = \"x\"\nkind = \"dicom\"\nexpected = \"positive\"\ncolour = 1\n");
        assert!(format!("{:#}", RealManifest::load(&p).unwrap_err()).contains("colour"));
        write(
            "[[series]]\nname = \"a\"\npath = \"x\"\nkind = \"dicom\"\nexpected = \"positive\"\npixel_spacing_mm = 1\n",
        );
        assert!(format!("{:#}", RealManifest::load(&p).unwrap_err()).contains("luna-png only"));
        write("[[series]]\nname = \"a\"\npath = \"x\"\nkind = \"dicom\"\nexpected = \"positive\"\n[[series]]\nname = \"a\"\npath = \"y\"\nkind = \"dicom\"\nexpected = \"positive\"\n");
        assert!(format!("{:#}", RealManifest::load(&p).unwrap_err()).contains("twice"));
    }
}
