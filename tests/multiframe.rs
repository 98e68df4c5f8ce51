//! Multi-frame CT: a phantom series converted by highdicom into one Legacy Converted Enhanced CT instance, and
//! the same relabelled Enhanced CT, sent with DCMTK storescu to a real `lungsentry serve`, give the involvement,
//! lung volume, lesions and positive slices of the classic series (timings aside); and `analyze --dicom-out` on
//! the multi-frame instance writes SEG, SR and key images that reference its frames and that dciodvfy accepts.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{storescu, Daemon};

/// Converts the classic slices in `src` into one multi-frame file `out` (`kind`: legacy | enhanced); returns its
/// Series Instance UID and frame count.
fn multiframe(src: &Path, out: &Path, kind: &str) -> (String, usize) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/multiframe_ct.py");
    let o = Command::new("python3").arg(script).arg(src).arg(out).arg(kind).output().expect("python3");
    assert!(o.status.success(), "highdicom conversion: {}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let (uid, n) = text.trim().split_once(' ').unwrap();
    (uid.to_string(), n.parse().unwrap())
}

/// The parts of a result that must not depend on how the slices were packed.
fn figures(r: &serde_json::Value) -> serde_json::Value {
    let mut lesions = r["lesions"].clone();
    for l in lesions.as_array_mut().into_iter().flatten() {
        l.as_object_mut().unwrap().remove("id");
    }
    serde_json::json!({
        "status": r["status"], "positive": r["positive"], "n_slices": r["n_slices"],
        "analysed_slices": r["analysed_slices"], "involvement_percent": r["involvement_percent"],
        "lung_volume_ml": r["lung_volume_ml"], "lesion_volume_ml": r["lesion_volume_ml"], "lesions": lesions,
        "positive_slices": r["positive_slices"], "slice_spacing_mm": r["slice_spacing_mm"], "regional": r["regional"],
    })
}

/// `a` equals `b`, numbers within 1e-6 relative (highdicom rewrites DS geometry, which may round the last digit).
fn approx_eq(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value::*;
    match (a, b) {
        (Number(x), Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 1e-6 * x.abs().max(y.abs()).max(1.0)
        }
        (Array(x), Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| approx_eq(p, q)),
        (Object(x), Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| approx_eq(v, w)))
        }
        _ => a == b,
    }
}

fn dciodvfy_errors(f: &Path) -> Vec<String> {
    let o = Command::new("dciodvfy").arg(f).output().expect("dciodvfy (dicom3tools)");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    text.lines().filter(|l| l.starts_with("Error")).map(str::to_string).collect()
}

#[test]
fn legacy_converted_and_enhanced_ct_give_the_classic_result() {
    if !common::model_shipped() {
        panic!("models/manifest.toml missing: the shipped model is needed");
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("classic");
    let truth = common::phantom(&src, 2701, 24, "severe");
    let classic_uid = truth["series_instance_uid"].as_str().unwrap().to_string();
    let (lce_dir, enh_dir) = (tmp.path().join("lce"), tmp.path().join("enhanced"));
    std::fs::create_dir_all(&lce_dir).unwrap();
    std::fs::create_dir_all(&enh_dir).unwrap();
    let (lce_uid, n) = multiframe(&src, &lce_dir.join("lce.dcm"), "legacy");
    let (enh_uid, m) = multiframe(&src, &enh_dir.join("enhanced.dcm"), "enhanced");
    assert_eq!((n, m), (24, 24));

    let d = Daemon::start(&tmp.path().join("d"), "[series]\nquiet_period_s = 1.0\n");
    let (ok, out) = storescu(d.port, "CT1", &[&src], true);
    assert!(ok, "{out}");
    // `-R`: propose the SOP classes of the files (DCMTK's default list has no Legacy Converted Enhanced CT).
    for dir in [&lce_dir, &enh_dir] {
        let out = Command::new("storescu")
            .args(["-v", "-R", "-aet", "CT1", "-aec", "LUNGSENTRY", "+sd", "127.0.0.1", &d.port.to_string()])
            .arg(dir)
            .output()
            .expect("storescu (DCMTK)");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("Received Store Response (Success)"), "{text}");
    }
    let classic = d.wait_result(&classic_uid, 1, Duration::from_secs(600));
    let lce = d.wait_result(&lce_uid, 1, Duration::from_secs(600));
    let enh = d.wait_result(&enh_uid, 1, Duration::from_secs(600));
    assert_eq!(classic.result["status"], "analysed", "{}", classic.result);
    assert!(classic.positive, "{}", classic.result);
    for (what, r) in [("Legacy Converted Enhanced CT", &lce), ("Enhanced CT", &enh)] {
        let (got, want) = (figures(&r.result), figures(&classic.result));
        assert!(approx_eq(&got, &want), "{what} differs from the classic series:\n{got}\nvs\n{want}");
        let frames = r.result["slice_frame_numbers"].as_array().unwrap();
        assert_eq!(frames.len(), 24, "{what}: every frame a slice");
    }

    // Offline, with DICOM outputs: SEG, SR and key images reference the frames and pass dciodvfy.
    let out = tmp.path().join("outputs");
    let o = Command::new(common::bin())
        .args(["analyze", "--json", "--dicom-out"])
        .arg(&out)
        .arg(&lce_dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let series_out = out.join(&lce_uid);
    let mut files: Vec<_> = std::fs::read_dir(&series_out).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.iter().any(|f| f.ends_with("seg.dcm")) && files.iter().any(|f| f.ends_with("sr.dcm")), "{files:?}");
    assert!(files.iter().any(|f| f.file_name().unwrap().to_string_lossy().starts_with("key-")), "{files:?}");
    for f in &files {
        let errors = dciodvfy_errors(f);
        assert!(errors.is_empty(), "dciodvfy {}:\n{}", f.display(), errors.join("\n"));
    }
    let dump = |f: &Path| {
        let o = Command::new("dcmdump").arg(f).output().unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let seg = dump(&series_out.join("seg.dcm"));
    assert!(seg.contains("ReferencedFrameNumber"), "the SEG references source frames");
    let key = dump(files.iter().find(|f| f.file_name().unwrap().to_string_lossy().starts_with("key-")).unwrap());
    assert!(key.contains("ReferencedFrameNumber"), "the key image references its source frame");
}

/// A real series (covid-ricord-1a-001012, 248 axial slices) as Legacy Converted Enhanced CT: `analyze` gives the
/// classic series' figures.
#[test]
fn a_real_series_as_legacy_converted_enhanced_ct_gives_the_classic_result() {
    let src = common::data_dir().join("real-ct-series/covid-ricord-1a-001012/axial_248");
    let tmp = tempfile::tempdir().unwrap();
    let lce_dir = tmp.path().join("lce");
    std::fs::create_dir_all(&lce_dir).unwrap();
    let (_, n) = multiframe(&src, &lce_dir.join("lce.dcm"), "legacy");
    assert_eq!(n, common::dcm_files(&src).len());
    let o = Command::new(common::bin()).args(["analyze", "--json"]).arg(&src).arg(&lce_dir).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let results: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(results.len(), 2, "one classic and one multi-frame series");
    let (got, want) = (figures(&results[1]), figures(&results[0]));
    let (got, want) = if results[0]["slice_frame_numbers"].is_array() { (want, got) } else { (got, want) };
    assert_eq!(want["status"], "analysed", "{want}");
    assert!(approx_eq(&got, &want), "multi-frame differs from the classic series:\n{got}\nvs\n{want}");
}
