//! phantom — synthetic chest CT series with exact ground truth, for training, tests and demos.
//!
//! Owns: `lungsentry phantom` and [`generate`]: a seeded procedural patient (`anatomy`), COVID-19 lesions at a
//! chosen severity (`lesions`), a scanner model (`render`: pose, kernel blur, noise, quantisation) and the
//! Part-10 writer (`dicom`). Output folder: `IM00001.dcm`… (one CT Image Storage instance per slice, head to
//! feet) and, in its subfolder `truth/` (where `storescu +sd DIR`, which does not recurse by default, does not
//! trip on them), `labels.raw` (u8: 0 background, 1 lung, 2 lesion), `lesion_ids.raw` (u16 lesion id),
//! `labels.json`, and `truth.json` (volumes and involvement counted from the written labels, plus the generation
//! parameters so `--follow-up-of` can regenerate the same patient). Same options → byte-identical files.
//! [`truth_file`] finds a truth file in a phantom folder, also in one written before the subfolder existed.
//! Hands on: files only. Never: reads the clock or OS randomness, or anything but an earlier phantom's truth.

pub mod anatomy;
pub mod dicom;
pub mod lesions;
pub mod render;
pub mod rng;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use anatomy::Anatomy;
use lesions::LesionSpec;
use render::{Pose, Scanner, Scene, SliceOut};
use rng::Rng;

/// `lungsentry phantom` options.
#[derive(clap::Args, Debug, Clone)]
pub struct PhantomArgs {
    /// Output folder (created); gets the DICOM files, and labels and truth.json in its `truth/` subfolder.
    #[arg(long)]
    pub out: PathBuf,
    /// Random seed; the same seed gives the same series byte for byte.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Number of slices.
    #[arg(long, default_value_t = 120)]
    pub slices: usize,
    /// Rows = columns.
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Slice thickness (= spacing) in mm; chosen from the seed when absent.
    #[arg(long)]
    pub thickness: Option<f64>,
    /// Lesion burden.
    #[arg(long, default_value = "moderate")]
    pub severity: String,
    /// Make a follow-up study of the patient in this earlier phantom folder, with known lesion changes.
    #[arg(long)]
    pub follow_up_of: Option<PathBuf>,
}

/// Subfolder of a phantom folder holding its truth files (labels, lesion ids, truth.json).
pub const TRUTH_DIR: &str = "truth";

/// Path of the truth file `name` (`truth.json`, `labels.raw`, `lesion_ids.raw`, `labels.json`) of the phantom
/// folder `dir`: `dir/truth/name`, or `dir/name` where only that exists (folders written by older versions).
pub fn truth_file(dir: &Path, name: &str) -> PathBuf {
    let sub = dir.join(TRUTH_DIR).join(name);
    let flat = dir.join(name);
    if !sub.exists() && flat.exists() {
        flat
    } else {
        sub
    }
}

/// Lesion burden: the fraction of lung volume involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// No lesions.
    None,
    /// About 0.5–5 % of lung volume.
    Mild,
    /// About 5–20 %.
    Moderate,
    /// About 20–50 %.
    Severe,
}

impl FromStr for Severity {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Severity> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "none" => Severity::None,
            "mild" => Severity::Mild,
            "moderate" => Severity::Moderate,
            "severe" => Severity::Severe,
            other => bail!("--severity: expected none|mild|moderate|severe, got {other:?}"),
        })
    }
}

impl Severity {
    /// Name as written in truth.json.
    pub fn name(self) -> &'static str {
        match self {
            Severity::None => "none",
            Severity::Mild => "mild",
            Severity::Moderate => "moderate",
            Severity::Severe => "severe",
        }
    }

    /// The band an involvement percentage falls in.
    pub fn of_involvement(pct: f64) -> Severity {
        if pct <= 0.0 {
            Severity::None
        } else if pct < 5.0 {
            Severity::Mild
        } else if pct < 20.0 {
            Severity::Moderate
        } else {
            Severity::Severe
        }
    }
}

/// What to generate (the library form of [`PhantomArgs`]).
#[derive(Debug, Clone)]
pub struct PhantomOptions {
    /// Output folder (created).
    pub out: PathBuf,
    /// Seed.
    pub seed: u64,
    /// Number of slices (ignored for follow-ups: taken from the prior).
    pub slices: usize,
    /// Rows = columns (ignored for follow-ups).
    pub size: usize,
    /// Slice spacing override, mm (ignored for follow-ups).
    pub thickness: Option<f64>,
    /// Lesion burden (ignored for follow-ups: lesions evolve from the prior).
    pub severity: Severity,
    /// Earlier phantom folder to follow up.
    pub follow_up_of: Option<PathBuf>,
    /// Worker threads (0 = all cores).
    pub threads: usize,
}

impl PhantomOptions {
    /// Options with defaults: 120 slices of 512², moderate, thickness from the seed.
    pub fn new(out: impl Into<PathBuf>, seed: u64) -> PhantomOptions {
        PhantomOptions {
            out: out.into(),
            seed,
            slices: 120,
            size: 512,
            thickness: None,
            severity: Severity::Moderate,
            follow_up_of: None,
            threads: 0,
        }
    }
}

impl TryFrom<PhantomArgs> for PhantomOptions {
    type Error = anyhow::Error;
    fn try_from(a: PhantomArgs) -> Result<PhantomOptions> {
        Ok(PhantomOptions {
            out: a.out,
            seed: a.seed,
            slices: a.slices,
            size: a.size,
            thickness: a.thickness,
            severity: a.severity.parse()?,
            follow_up_of: a.follow_up_of,
            threads: 0,
        })
    }
}

/// Synthetic patient demographics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Patient {
    /// Patient ID.
    pub id: String,
    /// Patient Name (PN).
    pub name: String,
    /// Birth date, YYYYMMDD.
    pub birth_date: String,
    /// M or F.
    pub sex: String,
}

/// Everything needed to regenerate a phantom (stored in truth.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Patient seed (anatomy, vessel tree).
    pub seed: u64,
    /// Requested severity of the first study.
    pub severity: Severity,
    /// Slices.
    pub slices: usize,
    /// Rows = columns.
    pub size: usize,
    /// Protocol.
    pub scanner: Scanner,
    /// Patient placement in this study.
    pub pose: Pose,
    /// Lesions in body coordinates (only those with voxels in this study).
    pub lesions: Vec<LesionSpec>,
    /// Seed of this study's quantum noise.
    pub noise_seed: u64,
    /// 0 for the first study, +1 per follow-up.
    pub study_index: u32,
    /// Study date as days since 1970-01-01.
    pub study_day: i64,
    /// Demographics.
    pub patient: Patient,
    /// Body-z range scanned in the first study (lesions stay inside it).
    pub body_z_range: [f64; 2],
}

/// Ground truth of one lesion, counted from the written voxels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LesionTruth {
    /// Lesion id (value in lesion_ids.raw).
    pub id: u16,
    /// "ggo", "consolidation" or "crazy_paving".
    pub class: String,
    /// Voxels labelled with this id.
    pub voxels: u64,
    /// Volume, ml.
    pub volume_ml: f64,
    /// Centroid in patient coordinates, mm.
    pub centroid_mm: [f64; 3],
    /// Mean stored HU over its voxels.
    pub mean_hu: f64,
    /// "left" or "right" lung.
    pub side: String,
}

/// One lesion's change between a prior study and this follow-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LesionChange {
    /// Id in the prior study (null for new lesions).
    pub prior_id: Option<u16>,
    /// Id in this study (null for resolved lesions).
    pub id: Option<u16>,
    /// "grown" (≥ ×1.2), "shrunk" (≤ ×0.8), "stable", "resolved" or "new" — from the measured volumes.
    pub change: String,
    pub volume_before_ml: f64,
    pub volume_after_ml: f64,
    pub mean_hu_before: Option<f64>,
    pub mean_hu_after: Option<f64>,
}

/// Follow-up relation to the prior study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FollowUp {
    /// Study Instance UID of the prior study.
    pub of_study_instance_uid: String,
    /// Prior study folder as given.
    pub of_path: String,
    /// Per-lesion changes.
    pub changes: Vec<LesionChange>,
    /// Involvement (%) of the prior and of this study.
    pub involvement_before: f64,
    pub involvement_after: f64,
    /// Rigid motion of the patient relative to the prior study: rotation (deg about z, x, y) and shift (mm).
    pub motion_deg: [f64; 3],
    pub motion_mm: [f64; 3],
}

/// truth.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhantomTruth {
    pub seed: u64,
    /// Severity band of the measured involvement ("none" | "mild" | "moderate" | "severe").
    pub severity: String,
    pub n_slices: usize,
    pub size: usize,
    /// Voxel spacing [z, y, x], mm.
    pub spacing: [f64; 3],
    pub lung_volume_ml: f64,
    pub lesion_volume_ml: f64,
    /// 100 × lesion voxels / lung voxels.
    pub involvement_percent: f64,
    /// involvement_percent > 0.4.
    pub positive: bool,
    /// Mean HU of lung voxels that are not lesion.
    pub lung_mean_hu: f64,
    pub lesions: Vec<LesionTruth>,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub frame_of_reference_uid: String,
    pub patient_id: String,
    pub patient_name: String,
    pub study_date: String,
    /// DICOM files, slice order (same order as labels.raw).
    pub files: Vec<String>,
    /// Regeneration parameters.
    pub generation: Generation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow_up: Option<FollowUp>,
}

/// A 2.25 UID from a seed, a purpose and an index.
fn uid(seed: u64, label: &str, index: u64) -> String {
    let mut r = Rng::indexed(seed, label, index);
    let v = ((r.next_u64() as u128) << 64) | r.next_u64() as u128;
    format!("2.25.{}", v >> 1)
}

/// Writes the phantom described by `opts`; returns its truth (also written to truth.json).
pub fn generate(opts: &PhantomOptions) -> Result<PhantomTruth> {
    let (gen, prior) = match &opts.follow_up_of {
        None => (first_study(opts)?, None),
        Some(dir) => {
            let path = truth_file(dir, "truth.json");
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let prior: PhantomTruth =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            (follow_up_study(&prior, opts.seed)?, Some((prior, dir.clone())))
        }
    };
    write_study(opts, gen, prior)
}

fn first_study(opts: &PhantomOptions) -> Result<Generation> {
    if opts.size < 16 || opts.size > 4096 {
        bail!("--size must be between 16 and 4096");
    }
    if opts.slices == 0 || opts.slices > 4000 {
        bail!("--slices must be between 1 and 4000");
    }
    if let Some(t) = opts.thickness {
        if !(0.1..=20.0).contains(&t) {
            bail!("--thickness must be between 0.1 and 20 mm");
        }
    }
    let seed = opts.seed;
    let scanner = Scanner::from_seed(seed, opts.size, opts.slices, opts.thickness);
    let anat = Anatomy::new(seed, scanner.fov);
    let mut r = Rng::stream(seed, "pose");
    let z_center_body = -0.5 * anat.h as f64 * r.range(0.92, 1.06);
    let scan_mid = scanner.z_top - 0.5 * (opts.slices - 1) as f64 * scanner.slice_mm;
    let pose = Pose {
        rotation: Pose::rotation_from_deg(r.range(-2.0, 2.0), 0.0, 0.0),
        translation: [r.range(-6.0, 6.0), r.range(-8.0, 8.0), scan_mid - z_center_body],
    };
    let z_hi = scanner.z_top - pose.translation[2];
    let z_lo = z_hi - (opts.slices - 1) as f64 * scanner.slice_mm;
    let lesions = lesions::place(&anat, seed, opts.severity, z_lo, z_hi);
    let birth_year = 1935 + (r.below(65) as i64);
    let patient = Patient {
        id: format!("PHANTOM-{seed}"),
        name: format!("PHANTOM^{seed}"),
        birth_date: format!("{birth_year:04}{:02}{:02}", 1 + r.below(12), 1 + r.below(28)),
        sex: if r.chance(0.5) { "M" } else { "F" }.to_string(),
    };
    Ok(Generation {
        seed,
        severity: opts.severity,
        slices: opts.slices,
        size: opts.size,
        scanner,
        pose,
        lesions,
        noise_seed: Rng::stream(seed, "noise").next_u64(),
        study_index: 0,
        study_day: 18_322 + r.below(700) as i64, // from 2020-03-01
        patient,
        body_z_range: [z_lo, z_hi],
    })
}

fn follow_up_study(prior: &PhantomTruth, extra_seed: u64) -> Result<Generation> {
    let p = &prior.generation;
    let index = p.study_index + 1;
    let fseed = rng::mix64(p.seed ^ rng::mix64(index as u64) ^ rng::mix64(extra_seed.wrapping_add(0x5eed)));
    let anat = Anatomy::new(p.seed, p.scanner.fov);
    let mut r = Rng::stream(fseed, "follow-up");
    // small rigid motion about the lung centre
    let about = p.pose.apply([0.0, 0.0, -0.5 * anat.h as f64]);
    let rd = Pose::rotation_from_deg(r.range(-3.0, 3.0), r.range(-1.5, 1.5), r.range(-1.5, 1.5));
    let dir = r.unit3();
    let mag = r.range(2.0, 6.0);
    let td = [dir[0] * mag, dir[1] * mag, dir[2] * mag];
    let pose = p.pose.moved(rd, about, td);
    let [z_lo, z_hi] = p.body_z_range;
    let (lesions, _) = lesions::evolve(&anat, &p.lesions, fseed, z_lo + 4.0, z_hi - 4.0);
    Ok(Generation {
        seed: p.seed,
        severity: p.severity,
        slices: p.slices,
        size: p.size,
        scanner: p.scanner.clone(),
        pose,
        lesions,
        noise_seed: Rng::stream(fseed, "noise").next_u64(),
        study_index: index,
        study_day: p.study_day + 5 + r.below(56) as i64,
        patient: p.patient.clone(),
        body_z_range: p.body_z_range,
    })
}

/// Integer sums over all slices.
#[derive(Default)]
struct Totals {
    lung: u64,
    lung_only: u64,
    lung_sum_hu: i64,
    lesions: Vec<render::LesionSums>,
}

fn write_study(
    opts: &PhantomOptions,
    mut gen: Generation,
    prior: Option<(PhantomTruth, PathBuf)>,
) -> Result<PhantomTruth> {
    let out = &opts.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let anat = Anatomy::new(gen.seed, gen.scanner.fov);
    let (n, size) = (gen.slices, gen.size);
    let scene =
        Scene::new(anat, gen.pose.clone(), gen.scanner.clone(), size, n, &gen.lesions, gen.seed, gen.noise_seed);
    let study_key = rng::mix64(gen.seed ^ rng::mix64(gen.study_index as u64 + 1));
    let study_uid = uid(study_key, "study", 0);
    let series_uid = uid(study_key, "series", 0);
    let frame_uid = uid(study_key, "frame", 0);
    let mut tr = Rng::stream(study_key, "time");
    let header = dicom::SeriesHeader {
        patient_name: gen.patient.name.clone(),
        patient_id: gen.patient.id.clone(),
        birth_date: gen.patient.birth_date.clone(),
        sex: gen.patient.sex.clone(),
        study_uid: study_uid.clone(),
        series_uid: series_uid.clone(),
        frame_uid: frame_uid.clone(),
        instance_uid_root: uid(study_key, "instance", 0),
        study_date: crate::clock::dicom_date(gen.study_day),
        study_time: format!("{:02}{:02}{:02}", 7 + tr.below(12), tr.below(60), tr.below(60)),
        study_id: format!("{}", 1000 + tr.below(9000)),
        accession: format!("ACC{:08}", tr.below(100_000_000)),
        series_number: 2 + tr.below(4) as i32,
        scanner: gen.scanner.clone(),
        size,
        x0: scene.geom.x0,
        y0: scene.geom.y0,
    };
    let files: Vec<String> = (0..n).map(|i| format!("IM{:05}.dcm", i + 1)).collect();
    let max_id = gen.lesions.iter().map(|l| l.id as usize).max().unwrap_or(0);
    let truth_dir = out.join(TRUTH_DIR);
    std::fs::create_dir_all(&truth_dir).with_context(|| format!("creating {}", truth_dir.display()))?;
    let labels_f = File::create(truth_dir.join("labels.raw")).context("creating labels.raw")?;
    let ids_f = File::create(truth_dir.join("lesion_ids.raw")).context("creating lesion_ids.raw")?;
    labels_f.set_len((n * size * size) as u64)?;
    ids_f.set_len((n * size * size * 2) as u64)?;
    let threads = if opts.threads > 0 {
        opts.threads
    } else {
        std::thread::available_parallelism().map(|v| v.get()).unwrap_or(2)
    };
    let next = AtomicUsize::new(0);
    let totals = Mutex::new(Totals { lesions: vec![Default::default(); max_id + 1], ..Default::default() });
    let first_err: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.min(n) {
            s.spawn(|| {
                let mut local = Totals { lesions: vec![Default::default(); max_id + 1], ..Default::default() };
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n || first_err.lock().unwrap().is_some() {
                        break;
                    }
                    let res = (|| -> Result<()> {
                        let sl: SliceOut = scene.render(i, max_id);
                        let plane = size * size;
                        labels_f.write_all_at(&sl.labels, (i * plane) as u64)?;
                        let id_bytes: Vec<u8> = sl.ids.iter().flat_map(|v| v.to_le_bytes()).collect();
                        ids_f.write_all_at(&id_bytes, (i * plane * 2) as u64)?;
                        local.lung += sl.lung_voxels;
                        local.lung_only += sl.lung_only_voxels;
                        local.lung_sum_hu += sl.lung_sum_hu;
                        for (acc, v) in local.lesions.iter_mut().zip(&sl.lesions) {
                            acc.voxels += v.voxels;
                            acc.sum_hu += v.sum_hu;
                            acc.sum_c += v.sum_c;
                            acc.sum_r += v.sum_r;
                            acc.sum_i += v.sum_i;
                        }
                        dicom::write_slice(&out.join(&files[i]), &header, i, scene.geom.z(i), sl.stored)?;
                        Ok(())
                    })();
                    if let Err(e) = res {
                        first_err.lock().unwrap().get_or_insert(e);
                        break;
                    }
                }
                let mut t = totals.lock().unwrap();
                t.lung += local.lung;
                t.lung_only += local.lung_only;
                t.lung_sum_hu += local.lung_sum_hu;
                for (acc, v) in t.lesions.iter_mut().zip(&local.lesions) {
                    acc.voxels += v.voxels;
                    acc.sum_hu += v.sum_hu;
                    acc.sum_c += v.sum_c;
                    acc.sum_r += v.sum_r;
                    acc.sum_i += v.sum_i;
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap() {
        return Err(e);
    }
    let t = totals.into_inner().unwrap();
    let g = &scene.geom;
    let voxel_ml = g.ps * g.ps * g.dz / 1000.0;
    let mut lesion_truth = Vec::new();
    for s in &gen.lesions {
        let e = &t.lesions[s.id as usize];
        if e.voxels == 0 {
            continue;
        }
        let v = e.voxels as f64;
        lesion_truth.push(LesionTruth {
            id: s.id,
            class: s.class.name().to_string(),
            voxels: e.voxels,
            volume_ml: v * voxel_ml,
            centroid_mm: [
                g.x0 + g.ps * e.sum_c as f64 / v,
                g.y0 + g.ps * e.sum_r as f64 / v,
                g.z_top - g.dz * e.sum_i as f64 / v,
            ],
            mean_hu: e.sum_hu as f64 / v,
            side: if s.center[0] < 0.0 { "right" } else { "left" }.to_string(),
        });
    }
    // only lesions that are visible are carried forward
    gen.lesions.retain(|s| t.lesions[s.id as usize].voxels > 0);
    let lesion_voxels: u64 = lesion_truth.iter().map(|l| l.voxels).sum();
    let involvement = if t.lung > 0 { 100.0 * lesion_voxels as f64 / t.lung as f64 } else { 0.0 };
    let follow_up = prior.map(|(p, dir)| follow_up_changes(&p, &dir, &lesion_truth, involvement, &gen));
    let truth = PhantomTruth {
        seed: gen.seed,
        severity: if gen.study_index == 0 {
            gen.severity.name().to_string()
        } else {
            Severity::of_involvement(involvement).name().to_string()
        },
        n_slices: n,
        size,
        spacing: [g.dz, g.ps, g.ps],
        lung_volume_ml: t.lung as f64 * voxel_ml,
        lesion_volume_ml: lesion_voxels as f64 * voxel_ml,
        involvement_percent: involvement,
        positive: involvement > 0.4,
        lung_mean_hu: if t.lung_only > 0 { t.lung_sum_hu as f64 / t.lung_only as f64 } else { 0.0 },
        lesions: lesion_truth,
        study_instance_uid: study_uid,
        series_instance_uid: series_uid,
        frame_of_reference_uid: frame_uid,
        patient_id: gen.patient.id.clone(),
        patient_name: gen.patient.name.clone(),
        study_date: crate::clock::dicom_date(gen.study_day),
        files: files.clone(),
        generation: gen,
        follow_up,
    };
    let labels_json = serde_json::json!({
        "dims": [n, size, size],
        "dtype": "u8",
        "spacing_mm": [g.dz, g.ps, g.ps],
        "files": files,
        "values": {"0": "background", "1": "lung", "2": "lesion"},
        "lesion_ids": {"file": "lesion_ids.raw", "dtype": "u16le"},
    });
    write_json(&truth_dir.join("labels.json"), &labels_json)?;
    write_json(&truth_dir.join("truth.json"), &truth)?;
    Ok(truth)
}

fn follow_up_changes(
    prior: &PhantomTruth,
    dir: &Path,
    now: &[LesionTruth],
    involvement: f64,
    gen: &Generation,
) -> FollowUp {
    let mut changes = Vec::new();
    for pl in &prior.lesions {
        let cur = now.iter().find(|l| l.id == pl.id);
        let (change, after, hu_after, id) = match cur {
            None => ("resolved", 0.0, None, None),
            Some(c) => {
                let ratio = c.volume_ml / pl.volume_ml.max(1e-9);
                let ch = if ratio >= 1.2 {
                    "grown"
                } else if ratio <= 0.8 {
                    "shrunk"
                } else {
                    "stable"
                };
                (ch, c.volume_ml, Some(c.mean_hu), Some(c.id))
            }
        };
        changes.push(LesionChange {
            prior_id: Some(pl.id),
            id,
            change: change.to_string(),
            volume_before_ml: pl.volume_ml,
            volume_after_ml: after,
            mean_hu_before: Some(pl.mean_hu),
            mean_hu_after: hu_after,
        });
    }
    for c in now {
        if !prior.lesions.iter().any(|p| p.id == c.id) {
            changes.push(LesionChange {
                prior_id: None,
                id: Some(c.id),
                change: "new".to_string(),
                volume_before_ml: 0.0,
                volume_after_ml: c.volume_ml,
                mean_hu_before: None,
                mean_hu_after: Some(c.mean_hu),
            });
        }
    }
    let rp = &prior.generation.pose.rotation;
    let rn = &gen.pose.rotation;
    // relative rotation angle about z (yaw) etc., small-angle read-out of R_now · R_priorᵀ
    let rel = render::mat(
        *rn,
        [[rp[0][0], rp[1][0], rp[2][0]], [rp[0][1], rp[1][1], rp[2][1]], [rp[0][2], rp[1][2], rp[2][2]]],
    );
    let motion_deg = [
        rel[1][0].atan2(rel[0][0]).to_degrees(),
        rel[2][1].atan2(rel[2][2]).to_degrees(),
        (-rel[2][0]).asin().to_degrees(),
    ];
    let c_prior = prior.generation.pose.apply([0.0, 0.0, -130.0]);
    let c_now = gen.pose.apply([0.0, 0.0, -130.0]);
    FollowUp {
        of_study_instance_uid: prior.study_instance_uid.clone(),
        of_path: dir.display().to_string(),
        changes,
        involvement_before: prior.involvement_percent,
        involvement_after: involvement,
        motion_deg,
        motion_mm: [c_now[0] - c_prior[0], c_now[1] - c_prior[1], c_now[2] - c_prior[2]],
    }
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// `lungsentry phantom`: writes the series and prints one summary line.
pub fn run(args: PhantomArgs) -> Result<()> {
    let opts = PhantomOptions::try_from(args)?;
    let t = generate(&opts)?;
    println!(
        "{} slices={} size={} involvement={:.2}% lesions={} severity={}{}",
        opts.out.display(),
        t.n_slices,
        t.size,
        t.involvement_percent,
        t.lesions.len(),
        t.severity,
        match &t.follow_up {
            Some(f) => format!(" follow_up_of={} changes={}", f.of_study_instance_uid, f.changes.len()),
            None => String::new(),
        }
    );
    Ok(())
}
