//! analyze — offline analysis of files and folders with the daemon's own series logic.
//!
//! Owns: walking the given paths, grouping instances by series, and printing one result per series. Every CT
//! series is analysed however short (single slices too); the result lists the eligibility rules the daemon
//! would have skipped it for (`skip_reasons`).
//!
//! Results are recorded in a store exactly as the daemon records them (instances with their file paths, then a
//! versioned result), and follow-up linking reads the patient's history from that store, so series given together
//! link in study-date order and, with `--store PATH`, also to prior results already in that SQLite store (the
//! daemon's `data_dir/lungsentry.sqlite`, or one kept between `analyze` runs). Without `--store` a temporary store
//! is used and deleted at exit. Patient keys use `alerts.patient_key_salt`, else (with `--store`) the salt file
//! beside the store (the daemon's, when it is the daemon's data dir), else no salt.
//! Never: listens on the network, sends anything, or copies the input files.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::config::Config;
use crate::instance::InstanceMeta;
use crate::model::Model;
use crate::pipeline::{InferenceContext, SeriesWork};
use crate::result::SeriesResult;
use crate::store::Store;

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
    /// SQLite store (the daemon's schema) to record results in and to link follow-ups against; default: a
    /// temporary one, deleted at exit.
    #[arg(long, value_name = "PATH")]
    pub store: Option<PathBuf>,
}

/// One input file of a series.
struct InputInstance {
    meta: InstanceMeta,
    path: PathBuf,
    transfer_syntax_uid: String,
    bytes: u64,
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
    group_inputs(files).into_iter().map(|(k, v)| (k, v.into_iter().map(|i| (i.meta, i.path)).collect())).collect()
}

fn group_inputs(files: &[PathBuf]) -> BTreeMap<String, Vec<InputInstance>> {
    let mut series: BTreeMap<String, Vec<InputInstance>> = BTreeMap::new();
    for f in files {
        let obj = match crate::spool::read_instance(f) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("skipping {}: not a readable DICOM file ({e:#})", f.display());
                continue;
            }
        };
        let transfer_syntax_uid = obj.meta().transfer_syntax().trim_end_matches('\0').to_string();
        let bytes = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
        match InstanceMeta::from_file(&obj) {
            Ok(meta) => series.entry(meta.series_instance_uid.clone()).or_default().push(InputInstance {
                meta,
                path: f.clone(),
                transfer_syntax_uid,
                bytes,
            }),
            Err(e) => eprintln!("skipping {}: {e}", f.display()),
        }
    }
    series
}

/// The store `analyze` records into: the named one, or a temporary one removed on drop.
struct RunStore {
    store: Store,
    /// The temporary directory to remove (None for `--store`).
    temporary: Option<PathBuf>,
}

impl Drop for RunStore {
    fn drop(&mut self) {
        if let Some(dir) = &self.temporary {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Opens `--store PATH` (with the salt beside it unless the config names one), or a temporary store.
fn open_store(path: Option<&Path>, config: &Config) -> Result<(RunStore, Vec<u8>)> {
    let configured = config.alerts.patient_key_salt.clone().map(String::into_bytes);
    match path {
        Some(p) => {
            let store = Store::open(p)?;
            let salt = match configured {
                Some(s) => s,
                None => {
                    let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                    crate::store::load_or_create_salt(dir)?
                }
            };
            Ok((RunStore { store, temporary: None }, salt))
        }
        None => {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let dir =
                std::env::temp_dir().join(format!("lungsentry-analyze-{}-{}", std::process::id(), nanos.as_nanos()));
            let store = Store::open(&dir.join("lungsentry.sqlite"))?;
            Ok((RunStore { store, temporary: Some(dir) }, configured.unwrap_or_default()))
        }
    }
}

pub fn run(args: AnalyzeArgs) -> Result<()> {
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let kind: crate::config::EngineKind = args.engine.parse()?;
    let model = Model::load(&config.engine.manifest)?;
    let engine = crate::engine::load_engine_in(kind, &model, &config.engine.tensorrt_engines)?;
    let (run_store, salt) = open_store(args.store.as_deref(), &config)?;
    let store = &run_store.store;
    let ctx = InferenceContext { model, engine, config };
    let files = collect_files(&args.paths)?;
    let groups = group_inputs(&files);
    if groups.is_empty() {
        bail!("no DICOM instances found under the given paths");
    }
    // Patient, then study date: each series links to the earlier ones, as the daemon links arrivals.
    let key_of = |v: &Vec<InputInstance>| {
        v.first()
            .map(|i| crate::store::patient_key(&salt, &i.meta.patient_id, &i.meta.patient_name))
            .unwrap_or_default()
    };
    let mut groups: Vec<(String, Vec<InputInstance>)> = groups.into_values().map(|v| (key_of(&v), v)).collect();
    groups.sort_by_cached_key(|(k, v)| {
        let m = &v[0].meta;
        (k.clone(), m.study_date.clone(), m.series_instance_uid.clone())
    });
    let rule = (&ctx.config.analysis).into();
    let mut results = Vec::new();
    for (patient_key, instances) in groups {
        let received_at = crate::clock::now_rfc3339();
        let mut work = SeriesWork::default();
        for i in &instances {
            let spooled = crate::spool::SpooledInstance {
                meta: i.meta.clone(),
                path: std::fs::canonicalize(&i.path).unwrap_or_else(|_| i.path.clone()),
                transfer_syntax_uid: i.transfer_syntax_uid.clone(),
                bytes: i.bytes,
                unchanged_since_ms: None,
            };
            store.record_instance(&spooled, 0, &patient_key)?;
        }
        for i in instances {
            work.add(&ctx, i.meta, &i.path);
        }
        let (mut result, slices) =
            work.finish_with_slices(&ctx, &patient_key, &received_at, &crate::clock::now_rfc3339(), false);
        let series_uid = Some(result.series_instance_uid.clone()).filter(|s| !s.is_empty()).unwrap_or("unknown".into());
        // As the daemon links (later studies already in a kept store link back to this one; no alerts offline).
        let links = crate::pipeline::link_follow_ups(store, &patient_key, &series_uid, &mut result, rule, false, None)?;
        let version = store.record_result_with_outputs(crate::store::NewResult {
            series_uid: &series_uid,
            revision: None,
            positive: result.positive,
            involvement_percent: result.involvement_percent(),
            result_json: &result.to_json(),
            alert: false,
            outputs_due: false,
            links: &links,
        })?;
        for l in &links {
            eprintln!(
                "{}: version {} now compares with the earlier study {series_uid} (given after it)",
                l.series_instance_uid, l.result_version
            );
        }
        if args.store.is_some() {
            result.version = Some(version);
        }
        if let Some(dir) = &args.dicom_out {
            let opts = crate::outputs::OutputOptions {
                kinds: args.objects.clone(),
                key_images: args.key_images,
                uid_seed: String::new(),
                amendment: None,
            };
            match crate::outputs::build(&result, &slices, &opts) {
                Ok(objects) => {
                    let paths = crate::outputs::write_dir(&objects, &dir.join(&series_uid))?;
                    result.dicom_outputs = Some(paths);
                }
                Err(e) => eprintln!("{series_uid}: no DICOM outputs: {e}"),
            }
        }
        results.push(result);
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for result in &results {
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&result.to_json())?)?;
        } else {
            writeln!(out, "{}", summary_line(result))?;
        }
    }
    Ok(())
}

/// One human line per series.
pub fn summary_line(r: &SeriesResult) -> String {
    let series = Some(r.series_instance_uid.as_str()).filter(|s| !s.is_empty()).unwrap_or("?");
    let skip_reasons = serde_json::json!(r.skip_reasons);
    let Some(figures) = r.figures.as_ref().filter(|_| r.is_analysed()) else {
        return format!("{series}: skipped — {skip_reasons}");
    };
    let lung = |i: usize| figures.regional.lungs.get(i).map_or(0.0, |l| l.involvement_percent);
    format!(
        "{series}: {} — involvement {:.2} % (R {:.2} / L {:.2}, severity score {}/25), {} lesion(s), lung {:.0} mL, \
         {} of {} slices analysed{}{}",
        if r.positive { "POSITIVE" } else { "negative" },
        figures.involvement_percent,
        lung(0),
        lung(1),
        figures.regional.severity_score,
        figures.lesions.len(),
        figures.lung_volume_ml,
        r.analysed_slices,
        r.n_slices,
        if r.skip_reasons.is_empty() { String::new() } else { format!(" (the daemon would skip it: {skip_reasons})") },
        match &r.follow_up {
            Some(f) => format!(
                "; vs {}: {:+.2} points{}, lesions new {} grown {} shrunk {} stable {} resolved {}",
                f.prior_study_date,
                f.involvement_change_points,
                if f.progression { " PROGRESSION" } else { "" },
                f.new,
                f.grown,
                f.shrunk,
                f.stable,
                f.resolved
            ),
            None => String::new(),
        }
    )
}
