//! Phantom generator: determinism, DICOM validity against DCMTK and dicom3tools, and truth that matches the
//! written labels and pixels (including follow-up change records).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_dictionary_std::tags;
use lungsentry::tools::phantom::{generate, PhantomOptions, PhantomTruth, Severity};

fn opts(dir: &Path, seed: u64, sev: Severity) -> PhantomOptions {
    let mut o = PhantomOptions::new(dir, seed);
    o.size = 128;
    o.slices = 48;
    o.thickness = Some(5.0);
    o.severity = sev;
    o
}

fn make(seed: u64, sev: Severity) -> (tempfile::TempDir, PhantomTruth) {
    let dir = tempfile::tempdir().unwrap();
    let t = generate(&opts(dir.path(), seed, sev)).unwrap();
    (dir, t)
}

/// Every file of a phantom folder by its relative path (the truth files are in `truth/`).
fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if p.is_dir() {
            for (k, v) in files_of(&p) {
                m.insert(format!("{name}/{k}"), v);
            }
        } else {
            m.insert(name, std::fs::read(&p).unwrap());
        }
    }
    m
}

/// HU values of one slice, decoded with the file's rescale and pixel representation.
fn slice_hu(path: &Path) -> Vec<f64> {
    let obj = dicom_object::open_file(path).unwrap();
    let int = |t| obj.element(t).unwrap().to_int::<i32>().unwrap();
    let f = |t| obj.element(t).unwrap().to_float64().unwrap();
    let signed = int(tags::PIXEL_REPRESENTATION) == 1;
    let (slope, icpt) = (f(tags::RESCALE_SLOPE), f(tags::RESCALE_INTERCEPT));
    let bytes = obj.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap().to_vec();
    bytes
        .chunks_exact(2)
        .map(|b| {
            let raw = u16::from_le_bytes([b[0], b[1]]);
            let v = if signed { raw as i16 as f64 } else { raw as f64 };
            v * slope + icpt
        })
        .collect()
}

#[test]
fn same_seed_gives_identical_files_and_different_seeds_differ() {
    let (a, ta) = make(11, Severity::Moderate);
    let (b, tb) = make(11, Severity::Moderate);
    let (c, _) = make(12, Severity::Moderate);
    let fa = files_of(a.path());
    let fb = files_of(b.path());
    assert_eq!(fa.len(), 48 + 4);
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (k, v) in &fa {
        assert!(v == &fb[k], "{k} differs between two runs of the same seed");
    }
    assert_eq!(ta, tb);
    let fc = files_of(c.path());
    assert_ne!(fa["IM00020.dcm"], fc["IM00020.dcm"]);
    assert_ne!(fa["truth/labels.raw"], fc["truth/labels.raw"]);
    assert!(fa.keys().filter(|k| !k.ends_with(".dcm")).all(|k| k.starts_with("truth/")), "{:?}", fa.keys());
}

#[test]
fn dcmdump_and_dciodvfy_accept_a_slice() {
    for seed in [3u64, 4, 5, 6] {
        let (d, t) = make(seed, Severity::Mild);
        let f = d.path().join(&t.files[t.n_slices / 2]);
        let out = Command::new("dcmdump").arg(&f).output().expect("dcmdump (DCMTK) must be installed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "dcmdump failed: {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("=CTImageStorage"), "{text}");
        assert!(text.contains("LittleEndianExplicit"), "{text}");
        assert!(text.contains(&t.patient_id));
        let dciodvfy = Path::new("/usr/bin/dciodvfy");
        assert!(
            dciodvfy.exists(),
            "dciodvfy is missing: install dicom3tools (apt-get install -y dicom3tools), as CI does"
        );
        let out = Command::new(dciodvfy).arg(&f).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("Error")).collect();
        assert!(errors.is_empty(), "dciodvfy errors for seed {seed}:\n{text}");
    }
}

#[test]
fn truth_matches_written_labels_and_pixels() {
    let (d, t) = make(21, Severity::Moderate);
    let plane = t.size * t.size;
    let labels = std::fs::read(d.path().join("truth/labels.raw")).unwrap();
    let ids: Vec<u16> = std::fs::read(d.path().join("truth/lesion_ids.raw"))
        .unwrap()
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    assert_eq!(labels.len(), t.n_slices * plane);
    assert_eq!(ids.len(), labels.len());
    let lj: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("truth/labels.json")).unwrap()).unwrap();
    assert_eq!(lj["dims"], serde_json::json!([t.n_slices, t.size, t.size]));
    assert_eq!(lj["files"].as_array().unwrap().len(), t.n_slices);
    let voxel_ml = t.spacing[0] * t.spacing[1] * t.spacing[2] / 1000.0;
    let lung = labels.iter().filter(|&&v| v >= 1).count() as f64;
    let lesion = labels.iter().filter(|&&v| v == 2).count() as f64;
    assert!(labels.iter().all(|&v| v <= 2));
    for (l, id) in labels.iter().zip(&ids) {
        assert_eq!(*l == 2, *id > 0, "lesion label and lesion id disagree");
    }
    assert!((t.lung_volume_ml - lung * voxel_ml).abs() < 1e-6);
    assert!((t.lesion_volume_ml - lesion * voxel_ml).abs() < 1e-6);
    assert!((t.involvement_percent - 100.0 * lesion / lung).abs() < 1e-9);
    assert!(t.lung_volume_ml > 1500.0 && t.lung_volume_ml < 9000.0, "lung volume {}", t.lung_volume_ml);
    assert!(t.involvement_percent > 2.0 && t.involvement_percent < 30.0, "moderate gave {}", t.involvement_percent);
    assert!(t.positive);
    // per-lesion volumes and mean HU recomputed from files
    let mut hu_sum: BTreeMap<u16, (f64, u64)> = BTreeMap::new();
    let (mut lung_hu, mut lung_n) = (0.0, 0u64);
    for (i, f) in t.files.iter().enumerate() {
        let hu = slice_hu(&d.path().join(f));
        assert_eq!(hu.len(), plane);
        for p in 0..plane {
            let k = i * plane + p;
            if ids[k] > 0 {
                let e = hu_sum.entry(ids[k]).or_default();
                e.0 += hu[p];
                e.1 += 1;
            } else if labels[k] == 1 {
                lung_hu += hu[p];
                lung_n += 1;
            }
        }
    }
    let lung_mean = lung_hu / lung_n as f64;
    assert!((-900.0..=-760.0).contains(&lung_mean), "lung mean HU {lung_mean}");
    assert!((lung_mean - t.lung_mean_hu).abs() < 1e-6);
    assert_eq!(hu_sum.len(), t.lesions.len());
    for l in &t.lesions {
        let (s, n) = hu_sum[&l.id];
        assert_eq!(n, l.voxels);
        assert!((l.volume_ml - n as f64 * voxel_ml).abs() < 1e-9);
        assert!((l.mean_hu - s / n as f64).abs() < 1e-6);
        assert!(l.mean_hu > lung_mean + 50.0, "lesion {} not denser than lung: {}", l.id, l.mean_hu);
        assert!(l.side == "left" || l.side == "right");
    }
    let classes: std::collections::BTreeSet<&str> = t.lesions.iter().map(|l| l.class.as_str()).collect();
    for c in ["ggo", "consolidation", "crazy_paving"] {
        assert!(classes.contains(c), "class {c} missing: {classes:?}");
    }
    let cons: Vec<f64> = t.lesions.iter().filter(|l| l.class == "consolidation").map(|l| l.mean_hu).collect();
    let ggo: Vec<f64> = t.lesions.iter().filter(|l| l.class == "ggo").map(|l| l.mean_hu).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(mean(&cons) > mean(&ggo), "consolidation {cons:?} vs ggo {ggo:?}");
}

#[test]
fn severity_orders_involvement_and_none_has_no_lesions() {
    for seed in [31u64, 32] {
        let (d, none) = make(seed, Severity::None);
        let labels = std::fs::read(d.path().join("truth/labels.raw")).unwrap();
        assert!(labels.iter().all(|&v| v <= 1));
        assert!(labels.contains(&1));
        assert_eq!(none.involvement_percent, 0.0);
        assert!(!none.positive && none.lesions.is_empty());
        let inv: Vec<f64> = [Severity::Mild, Severity::Moderate, Severity::Severe]
            .into_iter()
            .map(|s| make(seed, s).1.involvement_percent)
            .collect();
        assert!(inv[0] > 0.3 && inv[0] < 6.0, "mild {inv:?}");
        assert!(inv[0] < inv[1] && inv[1] < inv[2], "not ordered: {inv:?}");
        assert!(inv[2] > 15.0 && inv[2] < 55.0, "severe {inv:?}");
    }
}

#[test]
fn follow_up_is_same_patient_with_consistent_changes() {
    let (prior_dir, prior) = make(41, Severity::Moderate);
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 41, Severity::Moderate);
    o.follow_up_of = Some(PathBuf::from(prior_dir.path()));
    let t = generate(&o).unwrap();
    assert_eq!(t.patient_id, prior.patient_id);
    assert_eq!(t.patient_name, prior.patient_name);
    assert_ne!(t.study_instance_uid, prior.study_instance_uid);
    assert_ne!(t.series_instance_uid, prior.series_instance_uid);
    assert!(t.study_date > prior.study_date);
    let f = t.follow_up.as_ref().expect("follow_up block");
    assert_eq!(f.of_study_instance_uid, prior.study_instance_uid);
    assert!((f.involvement_before - prior.involvement_percent).abs() < 1e-9);
    assert_eq!(f.involvement_after, t.involvement_percent);
    let shift = (f.motion_mm.iter().map(|v| v * v).sum::<f64>()).sqrt();
    assert!(shift > 0.5 && shift < 25.0, "shift {shift}");
    assert!(f.motion_deg.iter().all(|a| a.abs() <= 3.01), "{:?}", f.motion_deg);
    let mut kinds = std::collections::BTreeSet::new();
    for c in &f.changes {
        kinds.insert(c.change.as_str());
        match c.change.as_str() {
            "grown" => assert!(c.volume_after_ml >= 1.2 * c.volume_before_ml, "{c:?}"),
            "shrunk" => assert!(c.volume_after_ml <= 0.8 * c.volume_before_ml, "{c:?}"),
            "stable" => {
                assert!(c.volume_after_ml > 0.8 * c.volume_before_ml && c.volume_after_ml < 1.2 * c.volume_before_ml)
            }
            "resolved" => assert!(c.id.is_none() && c.volume_after_ml == 0.0 && c.prior_id.is_some()),
            "new" => assert!(c.prior_id.is_none() && c.volume_before_ml == 0.0 && c.volume_after_ml > 0.0),
            other => panic!("unknown change {other}"),
        }
        if let Some(pid) = c.prior_id {
            let p = prior.lesions.iter().find(|l| l.id == pid).unwrap();
            assert!((p.volume_ml - c.volume_before_ml).abs() < 1e-9 * p.volume_ml.max(1.0));
        }
        if let Some(id) = c.id {
            let l = t.lesions.iter().find(|l| l.id == id).unwrap();
            assert!((l.volume_ml - c.volume_after_ml).abs() < 1e-12);
        }
    }
    assert_eq!(f.changes.iter().filter(|c| c.id.is_some()).count(), t.lesions.len());
    assert!(kinds.contains("new") && kinds.contains("resolved") && kinds.contains("grown"), "{kinds:?}");
    // the follow-up of the same prior is reproducible
    let dir2 = tempfile::tempdir().unwrap();
    let mut o2 = o.clone();
    o2.out = dir2.path().to_path_buf();
    assert_eq!(generate(&o2).unwrap().follow_up, t.follow_up);
}

#[test]
fn cli_writes_series_and_prints_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lungsentry"))
        .args(["phantom", "--seed", "7", "--slices", "12", "--size", "96", "--severity", "severe", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.contains("slices=12") && line.contains("involvement="), "{line}");
    assert!(dir.path().join("IM00012.dcm").exists());
    let t: PhantomTruth = serde_json::from_slice(&std::fs::read(dir.path().join("truth/truth.json")).unwrap()).unwrap();
    assert_eq!(t.n_slices, 12);
    let bad = Command::new(env!("CARGO_BIN_EXE_lungsentry"))
        .args(["phantom", "--severity", "extreme", "--out"])
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

/// `storescu +sd DIR` (DCMTK's scan of a folder, not recursive by default) on a phantom folder sends every slice
/// and nothing else: the truth files are in `truth/`, which it does not enter.
#[test]
fn storescu_scan_directories_sends_a_phantom_folder_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let series = dir.path().join("series");
    let mut o = opts(&series, 9, Severity::Mild);
    o.slices = 6;
    o.size = 64;
    let t = generate(&o).unwrap();
    let (_scp, port) = common::storescp(&dir.path().join("pacs"), false);
    let out = Command::new("storescu")
        .args(["-aec", "PACS", "+sd", "127.0.0.1", &port.to_string()])
        .arg(&series)
        .output()
        .expect("storescu (DCMTK)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("E: "), "storescu +sd failed:\n{text}");
    let received = std::fs::read_dir(dir.path().join("pacs")).unwrap().count();
    assert_eq!(received, t.n_slices, "every slice and nothing else received");
    assert!(series.join("truth/truth.json").exists() && series.join("truth/labels.raw").exists());
}
