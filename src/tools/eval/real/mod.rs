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
//! Never: needs masks, changes a model, or writes anything but its report, the `--out` copy and the overlays.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::overlay;
use super::{read_png_gray, Confusion, EvalArgs};
use crate::analysis::{self, AnalysisParams, BitMask, PlacedSlice};
use crate::config::Config;
use crate::engine::load_engine;
use crate::model::Model;
use crate::pipeline::{InferenceContext, SeriesWork};
use crate::preprocess::{self, HuSlice};
use crate::tools::analyze::{collect_files, group_by_series};

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
                preprocess::decode_hu_frames(&obj)?.into_iter().next().context("no frame")
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
    let now = crate::pipeline::chrono_now();
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

/// HU of a lung-window PNG slice: v × 1500 / 255 − 1350 (L −600, W 1500).
pub fn luna_hu_of(v: u8) -> f32 {
    (v as f64 * 1500.0 / 255.0 - 1350.0) as f32
}

fn luna_hu(path: &Path) -> Result<HuSlice> {
    let g = read_png_gray(path)?;
    Ok(HuSlice::from_hu(g.rows, g.cols, g.px.iter().map(|&v| luna_hu_of(v)).collect()))
}

/// The `z_NNN.png` files of a folder with their slice numbers, in slice order.
pub fn luna_slices(dir: &Path) -> Result<Vec<(u32, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let z = name.strip_prefix("z_").and_then(|s| s.strip_suffix(".png")).and_then(|s| s.parse::<u32>().ok());
        if let Some(z) = z {
            out.push((z, p));
        }
    }
    out.sort();
    if out.is_empty() {
        bail!("no z_NNN.png slices in {}", dir.display());
    }
    Ok(out)
}

/// Spacing a LUNA16 source file states for the patient folder `alias` (keys `pixel_spacing_mm`, `slice_spacing_mm`
/// in `generation_summary.json`'s `per_patient` entry, or columns of that name in the inventory CSV), if any.
fn luna_source_spacing(dir: &Path, alias: &str) -> Option<(f64, f64, String)> {
    let parent = dir.parent()?;
    let from_summary = || -> Option<(f64, f64, String)> {
        let v: Value = serde_json::from_slice(&std::fs::read(parent.join("generation_summary.json")).ok()?).ok()?;
        let p = v["per_patient"].as_array()?.iter().find(|p| p["patient_alias"].as_str() == Some(alias))?;
        Some((p["pixel_spacing_mm"].as_f64()?, p["slice_spacing_mm"].as_f64()?, "generation_summary.json".into()))
    };
    let from_csv = |path: &Path| -> Option<(f64, f64, String)> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut lines = text.lines();
        let head: Vec<&str> = lines.next()?.split(',').map(str::trim).collect();
        let col = |k: &str| head.iter().position(|h| *h == k);
        let (ia, ip, is) = (col("patient_alias")?, col("pixel_spacing_mm")?, col("slice_spacing_mm")?);
        let f: Vec<&str> =
            lines.map(|l| l.split(',').map(str::trim).collect::<Vec<_>>()).find(|f| f.get(ia) == Some(&alias))?;
        let file = path.file_name()?.to_string_lossy().into_owned();
        Some((f.get(ip)?.parse().ok()?, f.get(is)?.parse().ok()?, file))
    };
    from_summary().or_else(|| {
        let mut csvs: Vec<PathBuf> = std::fs::read_dir(parent)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "csv"))
            .collect();
        csvs.sort();
        csvs.iter().find_map(|p| from_csv(p))
    })
}

/// Evaluates a `luna-png` entry: PNG → HU → the daemon's input contract → engine → masks → 3D analysis.
fn eval_luna(
    ctx: &InferenceContext,
    entry: &RealEntry,
    dir: &Path,
    params: &AnalysisParams,
    batch: usize,
) -> Result<RealSeriesEval> {
    let t = Instant::now();
    let files = luna_slices(dir)?;
    let alias = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (px, dz, source) = match (entry.pixel_spacing_mm, entry.slice_spacing_mm) {
        (Some(px), Some(dz)) => (px, dz, "manifest".to_string()),
        (px, dz) => match luna_source_spacing(dir, &alias) {
            Some((spx, sdz, file)) => (px.unwrap_or(spx), dz.unwrap_or(sdz), file),
            None => (
                px.unwrap_or(LUNA_PIXEL_SPACING_MM),
                dz.unwrap_or(LUNA_SLICE_SPACING_MM),
                if px.is_some() || dz.is_some() { "manifest + assumed" } else { "assumed" }.to_string(),
            ),
        },
    };
    let inp = &ctx.model.manifest.input;
    if inp.channels != 1 {
        bail!("luna-png evaluation needs a single-channel model (manifest input.channels = {})", inp.channels);
    }
    let mut placed = Vec::with_capacity(files.len());
    for chunk in files.chunks(batch.max(1)) {
        let mut hus = Vec::with_capacity(chunk.len());
        for (_, p) in chunk {
            let mut hu = luna_hu(p)?;
            hu.pixel_spacing = [px, px];
            hu.pixel_spacing_known = true;
            hus.push(hu);
        }
        let (segs, _) = super::segment_batch(ctx.engine.as_ref(), &ctx.model, &hus)
            .with_context(|| format!("segmenting {} … {}", chunk[0].1.display(), chunk[chunk.len() - 1].1.display()))?;
        for (((z, _), hu), seg) in chunk.iter().zip(&hus).zip(segs) {
            // Patient LPS: z_NNN rises towards the head; the image centred on the table axis.
            let zmm = *z as f64 * dz;
            placed.push(PlacedSlice {
                segmentation: seg,
                position_mm: zmm,
                image_position: [-(hu.cols as f64) * px / 2.0, -(hu.rows as f64) * px / 2.0, zmm],
                image_orientation: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
                pixel_spacing: [px, px],
                slice_thickness: Some(dz),
            });
        }
    }
    let res = analysis::analyse_series(&placed, params);
    let mut result = serde_json::to_value(&res).context("serialising the analysis")?;
    result["status"] = json!("analysed");
    let slices = res
        .slice_order
        .iter()
        .zip(res.lung_masks.iter().zip(&res.lesion_masks))
        .map(|(&i, (lung, lesion))| (SliceSource::LunaPng(files[i].1.clone()), lung.clone(), lesion.clone()))
        .collect();
    let geometry = Geometry { pixel_spacing_mm: [px, px], slice_spacing_mm: res.slice_spacing_mm, source };
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    Ok(series_eval(entry, entry.name.clone(), dir, &result, slices, files.len(), geometry, ms))
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

/// One written overlay.
#[derive(Debug, Serialize)]
struct OverlayRow {
    file: String,
    series: String,
    slice_index: usize,
    slice_file: String,
    lesion_px: usize,
    lung_px: usize,
}

/// Writes the `n` slices of negative series with the most surviving lesion pixels as PNG key images into `dir`.
fn write_overlays(series: &[RealSeriesEval], dir: &Path, n: usize) -> Result<Vec<OverlayRow>> {
    let mut cands: Vec<(usize, usize, usize)> = Vec::new(); // (lesion_px, series, slice)
    for (si, s) in series.iter().enumerate() {
        for (k, kept) in s.kept.iter().enumerate() {
            let c = kept.lesion.count();
            if c > 0 {
                cands.push((c, si, k));
            }
        }
    }
    cands.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = Vec::new();
    for (rank, &(c, si, k)) in cands.iter().take(n).enumerate() {
        let s = &series[si];
        let kept = &s.kept[k];
        let hu = kept.source.load_hu()?;
        let img = overlay::render(&hu, &kept.lung, &kept.lesion);
        let safe: String =
            s.name.chars().map(|ch| if ch.is_ascii_alphanumeric() || "-_.".contains(ch) { ch } else { '_' }).collect();
        let file = format!("{:02}-{safe}-slice{k:03}-{c}px.png", rank + 1);
        std::fs::write(dir.join(&file), img.to_png()?).with_context(|| format!("writing {file}"))?;
        out.push(OverlayRow {
            file,
            series: s.name.clone(),
            slice_index: k,
            slice_file: kept.source.file_name(),
            lesion_px: c,
            lung_px: kept.lung.count(),
        });
    }
    Ok(out)
}

/// `lungsentry eval --real MANIFEST`: one report object with one block per engine.
pub fn run_real(args: &EvalArgs, model: &Model, manifest_path: &Path) -> Result<Value> {
    let manifest = RealManifest::load(manifest_path)?;
    let root = data_root(args.data.as_deref());
    let mut config = Config::default();
    config.analysis.positive_threshold_percent = args.threshold_percent;
    config.analysis.min_lesion_volume_ml = args.min_lesion_volume_ml;
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
        "engines": engines_out,
    }))
}

fn opt(v: &Value, digits: usize) -> String {
    v.as_f64().map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "-".into())
}

/// The human table of a `--real` report.
pub fn table(report: &Value) -> String {
    let mut s = String::new();
    let m = &report["model"];
    for (i, e) in report["engines"].as_array().into_iter().flatten().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        s.push_str(&format!(
            "engine {} — model {} {} — series positive above {} % involvement\n",
            e["engine"].as_str().unwrap_or("?"),
            m["name"].as_str().unwrap_or("?"),
            m["version"].as_str().unwrap_or("?"),
            report["threshold_percent"]
        ));
        s.push_str(&format!(
            "{:<44} {:<12} {:<8} {:<8} {:>8} {:>8} {:>7} {:>11} {:>10}  {}\n",
            "series",
            "kind",
            "expected",
            "flag",
            "invol %",
            "lung mL",
            "lesions",
            "pos slices",
            "slice spec",
            "verdict"
        ));
        for r in e["series"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "{:<44} {:<12} {:<8} {:<8} {:>8} {:>8} {:>7} {:>11} {:>10}  {}\n",
                r["name"].as_str().unwrap_or("?"),
                r["kind"].as_str().unwrap_or("?"),
                r["expected"].as_str().unwrap_or("?"),
                match (r["status"].as_str(), r["positive"].as_bool()) {
                    (Some("skipped"), _) => "skipped",
                    (_, Some(true)) => "POSITIVE",
                    _ => "negative",
                },
                opt(&r["involvement_percent"], 2),
                opt(&r["lung_volume_ml"], 0),
                r["lesion_count"].to_string(),
                format!("{}/{}", r["positive_slices"], r["analysed_slices"]),
                opt(&r["slice_specificity"], 3),
                match r["flag_correct"].as_bool() {
                    Some(true) => "ok".to_string(),
                    Some(false) => "WRONG".to_string(),
                    None => format!("not analysed: {}", r["skip_reasons"][0].as_str().unwrap_or("?")),
                },
            ));
        }
        let c = &e["series_confusion"];
        s.push_str(&format!(
            "series sensitivity {} ({}/{} positive series flagged), specificity {} ({}/{} negative series clear); \
             negative slices without a lesion voxel {} ({}/{})\n",
            opt(&e["series_sensitivity"], 3),
            c["tp"],
            c["tp"].as_u64().unwrap_or(0) + c["fn"].as_u64().unwrap_or(0),
            opt(&e["series_specificity"], 3),
            c["tn"],
            c["tn"].as_u64().unwrap_or(0) + c["fp"].as_u64().unwrap_or(0),
            opt(&e["negative_slice_specificity"], 3),
            e["negative_slices_without_lesion"],
            e["negative_slices"],
        ));
        if e["n_skipped"].as_u64().unwrap_or(0) > 0 {
            s.push_str(&format!(
                "{} series not analysed (no slice the daemon analyses), left out of both\n",
                e["n_skipped"]
            ));
        }
        for o in e["overlays"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "overlay {}: {} slice {} ({}), {} lesion px\n",
                o["file"].as_str().unwrap_or("?"),
                o["series"].as_str().unwrap_or("?"),
                o["slice_index"],
                o["slice_file"].as_str().unwrap_or("?"),
                o["lesion_px"]
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luna_hu_matches_the_lung_window() {
        assert_eq!(luna_hu_of(0), -1350.0);
        assert_eq!(luna_hu_of(255), 150.0);
        // L -600: the window centre is v = 127.5.
        assert!(luna_hu_of(127) < -600.0 && luna_hu_of(128) > -600.0, "{} {}", luna_hu_of(127), luna_hu_of(128));
        assert!((luna_hu_of(17) - (-1250.0)).abs() < 1e-3, "{}", luna_hu_of(17));
    }

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

    #[test]
    fn luna_slices_are_ordered_by_number_and_other_files_ignored() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["z_010.png", "z_002.png", "z_100.png", "notes.txt", "y_001.png"] {
            std::fs::write(dir.path().join(n), b"").unwrap();
        }
        let z: Vec<u32> = luna_slices(dir.path()).unwrap().into_iter().map(|(z, _)| z).collect();
        assert_eq!(z, [2, 10, 100]);
        let empty = tempfile::tempdir().unwrap();
        assert!(luna_slices(empty.path()).is_err());
    }

    #[test]
    fn luna_spacing_is_read_from_the_inventory_when_it_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let pat = dir.path().join("normal_patient_9");
        std::fs::create_dir(&pat).unwrap();
        assert!(luna_source_spacing(&pat, "normal_patient_9").is_none());
        std::fs::write(
            dir.path().join("inventory.csv"),
            "patient_alias,pixel_spacing_mm,slice_spacing_mm\nnormal_patient_8,1,1\nnormal_patient_9,1.5,2.5\n",
        )
        .unwrap();
        assert_eq!(luna_source_spacing(&pat, "normal_patient_9"), Some((1.5, 2.5, "inventory.csv".into())));
    }
}
