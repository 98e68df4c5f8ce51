//! analyze — offline analysis of files and folders with the daemon's own series logic.
//!
//! Owns: walking the given paths, grouping instances by series, and printing one result per series. Every CT
//! series is analysed however short (single slices too); the result lists the eligibility rules the daemon
//! would have skipped it for (`skip_reasons`). Never: listens on the network or writes the daemon's store.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::config::Config;
use crate::instance::InstanceMeta;
use crate::model::Model;
use crate::pipeline::{InferenceContext, SeriesWork};

/// `lungsentry analyze` options.
#[derive(clap::Args, Debug, Clone)]
pub struct AnalyzeArgs {
    /// DICOM files or folders (recursed).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// One JSON object per series per line (otherwise a short human summary per series).
    #[arg(long)]
    pub json: bool,
    /// Engine: auto, tract, ort, tensorrt.
    #[arg(long, default_value = "auto")]
    pub engine: String,
    /// Config file (thresholds, series rules); embedded defaults otherwise.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Also write the DICOM outputs (SEG, SR, key images) of each analysed series into DIR/<SeriesInstanceUID>/.
    #[arg(long, value_name = "DIR")]
    pub dicom_out: Option<PathBuf>,
    /// With --dicom-out: which objects (comma-separated: seg, sr, key_images).
    #[arg(long, value_delimiter = ',', default_value = "seg,sr,key_images")]
    pub objects: Vec<crate::outputs::ObjectKind>,
    /// With --dicom-out: at most this many key images per series.
    #[arg(long, default_value_t = 3)]
    pub key_images: usize,
}

/// Every file under `paths` (folders recursed, sorted for a stable order).
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let md = std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
        if md.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
            entries.sort();
            for e in entries {
                walk(&e, out)?;
            }
        } else {
            out.push(p.to_path_buf());
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        walk(p, &mut out)?;
    }
    Ok(out)
}

/// Reads DICOM files (skipping, with a note on stderr, anything that is not DICOM) and groups by series.
pub fn group_by_series(files: &[PathBuf]) -> BTreeMap<String, Vec<(InstanceMeta, PathBuf)>> {
    let mut series: BTreeMap<String, Vec<(InstanceMeta, PathBuf)>> = BTreeMap::new();
    for f in files {
        let obj = match crate::spool::read_instance(f) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("skipping {}: not a readable DICOM file ({e:#})", f.display());
                continue;
            }
        };
        match InstanceMeta::from_file(&obj) {
            Ok(m) => series.entry(m.series_instance_uid.clone()).or_default().push((m, f.clone())),
            Err(e) => eprintln!("skipping {}: {e}", f.display()),
        }
    }
    series
}

pub fn run(args: AnalyzeArgs) -> Result<()> {
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let kind: crate::config::EngineKind = args.engine.parse()?;
    let model = Model::load(&config.engine.manifest)?;
    let engine = crate::engine::load_engine_in(kind, &model, &config.engine.tensorrt_engines)?;
    let salt = config.alerts.patient_key_salt.clone().unwrap_or_default().into_bytes();
    let ctx = InferenceContext { model, engine, config };
    let files = collect_files(&args.paths)?;
    let groups = group_by_series(&files);
    if groups.is_empty() {
        bail!("no DICOM instances found under the given paths");
    }
    let mut results = Vec::new();
    for (_, instances) in groups {
        let received_at = crate::pipeline::chrono_now();
        let mut work = SeriesWork::default();
        let patient_key = instances
            .first()
            .map(|(m, _)| crate::store::patient_key(&salt, &m.patient_id, &m.patient_name))
            .unwrap_or_default();
        for (meta, path) in instances {
            work.add(&ctx, meta, &path);
        }
        let (mut result, slices) =
            work.finish_with_slices(&ctx, &patient_key, &received_at, &crate::pipeline::chrono_now(), false);
        if let Some(dir) = &args.dicom_out {
            let series_uid = result["series_instance_uid"].as_str().unwrap_or("unknown").to_string();
            let opts = crate::outputs::OutputOptions {
                kinds: args.objects.clone(),
                key_images: args.key_images,
                uid_seed: String::new(),
            };
            match crate::outputs::build(&result, &slices, &opts) {
                Ok(objects) => {
                    let paths = crate::outputs::write_dir(&objects, &dir.join(&series_uid))?;
                    result["dicom_outputs"] = serde_json::json!(paths);
                }
                Err(e) => eprintln!("{series_uid}: no DICOM outputs: {e}"),
            }
        }
        results.push(result);
    }
    link_follow_ups(&mut results, (&ctx.config.analysis).into());
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for result in &results {
        if args.json {
            writeln!(out, "{}", serde_json::to_string(result)?)?;
        } else {
            writeln!(out, "{}", summary_line(result))?;
        }
    }
    Ok(())
}

/// Orders results by patient and study date and adds `follow_up` to each one that has an earlier study of the
/// same patient — the daemon's rule ([`crate::analysis::followup`]) applied to the series given together.
pub fn link_follow_ups(results: &mut [serde_json::Value], rule: crate::analysis::followup::ProgressionRule) {
    use crate::analysis::followup;
    let key = |r: &serde_json::Value, f: &str| r[f].as_str().unwrap_or("").to_string();
    results.sort_by_key(|r| (key(r, "patient_key"), key(r, "study_date"), key(r, "series_instance_uid")));
    for i in 0..results.len() {
        let pk = key(&results[i], "patient_key");
        if pk.is_empty() || !followup::comparable(&results[i]) {
            continue;
        }
        let history: Vec<serde_json::Value> =
            results[..i].iter().filter(|r| key(r, "patient_key") == pk).cloned().collect();
        if let Some(prior) = followup::pick_prior(&results[i], &history) {
            let f = followup::compare(&results[i], prior, rule);
            results[i]["follow_up"] = serde_json::to_value(&f).unwrap_or(serde_json::Value::Null);
        }
    }
}

/// One human line per series.
pub fn summary_line(r: &serde_json::Value) -> String {
    let series = r["series_instance_uid"].as_str().unwrap_or("?");
    if r["status"] == "skipped" {
        return format!("{series}: skipped — {}", r["skip_reasons"]);
    }
    format!(
        "{series}: {} — involvement {:.2} % (R {:.2} / L {:.2}, severity score {}/25), {} lesion(s), lung {:.0} mL, \
         {} of {} slices analysed{}{}",
        if r["positive"].as_bool().unwrap_or(false) { "POSITIVE" } else { "negative" },
        r["involvement_percent"].as_f64().unwrap_or(0.0),
        r["regional"]["lungs"][0]["involvement_percent"].as_f64().unwrap_or(0.0),
        r["regional"]["lungs"][1]["involvement_percent"].as_f64().unwrap_or(0.0),
        r["regional"]["severity_score"],
        r["lesions"].as_array().map(|a| a.len()).unwrap_or(0),
        r["lung_volume_ml"].as_f64().unwrap_or(0.0),
        r["analysed_slices"],
        r["n_slices"],
        match r["skip_reasons"].as_array() {
            Some(a) if !a.is_empty() => format!(" (the daemon would skip it: {})", r["skip_reasons"]),
            _ => String::new(),
        },
        match r.get("follow_up") {
            Some(f) => format!(
                "; vs {}: {:+.2} points{}, lesions new {} grown {} shrunk {} stable {} resolved {}",
                f["prior_study_date"].as_str().unwrap_or("?"),
                f["involvement_change_points"].as_f64().unwrap_or(0.0),
                if f["progression"].as_bool().unwrap_or(false) { " PROGRESSION" } else { "" },
                f["new"],
                f["grown"],
                f["shrunk"],
                f["stable"],
                f["resolved"]
            ),
            None => String::new(),
        }
    )
}
