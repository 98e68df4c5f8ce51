//! DICOM outputs (SEG, TID 1500 SR, key-image Secondary Capture) from `lungsentry analyze --dicom-out`, checked by
//! real readers: `dciodvfy` (dicom3tools) must report no error on any object, and pydicom + highdicom read them
//! back (tests/py/check_dicom_outputs.py) with structure, codes, references and numbers equal to the result JSON —
//! including the regional figures (per lung and zone, severity score and its basis) and, for a follow-up study, the
//! comparison with the prior (involvement change, progression, each lesion's change class).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `analyze --json --dicom-out` on one phantom; returns the result, its JSON line as printed (serde_json's
/// default parser may round the last digit, so the Python check reads the printed text) and the output folder.
fn analyze_with_outputs(src: &Path, out: &Path, extra: &[&str]) -> (serde_json::Value, String, PathBuf) {
    let o = Command::new(common::bin())
        .arg("analyze")
        .arg(src)
        .args(["--json", "--dicom-out"])
        .arg(out)
        .args(extra)
        .output()
        .expect("run lungsentry analyze");
    assert!(o.status.success(), "analyze failed: {}", String::from_utf8_lossy(&o.stderr));
    let line = String::from_utf8(o.stdout).unwrap();
    let line = line.lines().next().expect("one result").to_string();
    let result: serde_json::Value = serde_json::from_str(&line).unwrap();
    let dir = out.join(result["series_instance_uid"].as_str().unwrap());
    (result, line, dir)
}

fn dciodvfy_errors(f: &Path) -> Vec<String> {
    let o = Command::new("dciodvfy").arg(f).output().expect("dciodvfy (dicom3tools) must be installed");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    text.lines().filter(|l| l.starts_with("Error")).map(str::to_string).collect()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

fn python_check(result: &serde_json::Value, line: &str, src: &Path, dir: &Path, tmp: &Path) -> String {
    let rpath = tmp.join(format!("{}.json", result["series_instance_uid"].as_str().unwrap()));
    std::fs::write(&rpath, line).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/check_dicom_outputs.py");
    let o = Command::new("python3")
        .arg(script)
        .arg(&rpath)
        .arg(src)
        .arg(dir)
        .arg(env!("CARGO_PKG_VERSION"))
        .output()
        .expect("python3");
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "pydicom/highdicom check failed:\n{out}");
    eprintln!("{out}");
    out
}

#[test]
fn seg_sr_and_key_images_validate_and_read_back() {
    if !common::model_shipped() {
        panic!("models/manifest.toml missing: the shipped model is needed");
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let cases = [("severe", 11u64), ("none", 12u64)];
    for (severity, seed) in cases {
        let src = tmp.path().join(severity);
        common::phantom(&src, seed, 40, severity);
        let (result, line, dir) = analyze_with_outputs(&src, &out, &[]);
        assert_eq!(result["status"], "analysed");
        if severity == "severe" {
            assert_eq!(result["positive"], true, "the severe phantom must be flagged");
        }
        let written = files(&dir);
        let names: Vec<String> = written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into()).collect();
        assert!(names.contains(&"seg.dcm".to_string()) && names.contains(&"sr.dcm".to_string()), "{names:?}");
        if severity == "severe" {
            assert!(names.iter().any(|n| n.starts_with("key-")), "a positive series has key images: {names:?}");
        }
        assert_eq!(result["dicom_outputs"].as_array().unwrap().len(), written.len());
        for f in &written {
            let errors = dciodvfy_errors(f);
            assert!(errors.is_empty(), "dciodvfy errors in {}:\n{}", f.display(), errors.join("\n"));
        }
        python_check(&result, &line, &src, &dir, tmp.path());
    }
}

#[test]
fn objects_option_selects_what_is_written() {
    if !common::model_shipped() {
        panic!("models/manifest.toml missing: the shipped model is needed");
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("p");
    common::phantom(&src, 21, 24, "moderate");
    let (_, _, dir) = analyze_with_outputs(&src, &tmp.path().join("out"), &["--objects", "sr"]);
    let names: Vec<String> = files(&dir).iter().map(|p| p.file_name().unwrap().to_string_lossy().into()).collect();
    assert_eq!(names, vec!["sr.dcm".to_string()]);
    // Without a SEG beside it, the SR still validates (no segment references).
    assert!(dciodvfy_errors(&dir.join("sr.dcm")).is_empty());

    let bad = Command::new(common::bin())
        .arg("analyze")
        .arg(&src)
        .args(["--dicom-out", "/tmp/x", "--objects", "seg,rtstruct"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("rtstruct"), "the bad object name is named");
}

#[test]
fn sr_carries_regional_and_follow_up_figures() {
    if !common::model_shipped() {
        panic!("models/manifest.toml missing: the shipped model is needed");
    }
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("baseline"), tmp.path().join("follow-up"));
    common::phantom(&a, 41101, 24, "moderate");
    common::phantom_follow_up(&b, 41102, &a);
    let out = tmp.path().join("out");
    // Both studies in one run: the follow-up is linked before its objects are written.
    let o = Command::new(common::bin())
        .arg("analyze")
        .arg(&b)
        .arg(&a)
        .args(["--json", "--dicom-out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "analyze failed: {}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    let mut checked_follow_up = false;
    for (line, src) in lines.iter().zip([&a, &b]) {
        let result: serde_json::Value = serde_json::from_str(line).unwrap();
        let dir = out.join(result["series_instance_uid"].as_str().unwrap());
        let sr = dir.join("sr.dcm");
        let errors = dciodvfy_errors(&sr);
        assert!(errors.is_empty(), "dciodvfy errors in {}:\n{}", sr.display(), errors.join("\n"));
        let report = python_check(&result, line, src, &dir, tmp.path());
        assert!(report.contains("SR regional ok"), "{report}");
        if result.get("follow_up").is_some() {
            assert!(report.contains("SR follow-up ok"), "{report}");
            checked_follow_up = true;
        }
    }
    assert!(checked_follow_up, "the follow-up study was linked to its baseline");
}
