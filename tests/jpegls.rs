//! JPEG-LS (DICOM transfer syntaxes 1.2.840.10008.1.2.4.80 lossless and .81 near-lossless), encoded by DCMTK
//! `dcmcjpls`: decoded to the very HU values of the uncompressed slice (lossless) or within the NEAR bound
//! (near-lossless); and a phantom series re-encoded lossless and sent with `storescu` to a real `lungsentry serve`
//! gives the same result JSON as the uncompressed series (timings aside).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{storescu, Daemon};

/// `dcmcjpls [extra] src dst`.
fn jpegls(src: &Path, dst: &Path, extra: &[&str]) {
    let out = Command::new("dcmcjpls").args(extra).arg(src).arg(dst).output().expect("dcmcjpls (DCMTK)");
    assert!(out.status.success(), "dcmcjpls: {}", String::from_utf8_lossy(&out.stderr));
}

fn hu(path: &Path) -> (String, Vec<f32>) {
    let obj = dicom_object::open_file(path).unwrap();
    let ts = obj.meta().transfer_syntax().trim_end_matches('\0').to_string();
    let frames = lungsentry::decode::decode_hu_frames(&obj).unwrap();
    assert_eq!(frames.len(), 1);
    (ts, frames[0].hu.clone())
}

#[test]
fn lossless_and_near_lossless_slices_decode() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    common::phantom(&src, 2601, 2, "severe");
    let f = &common::dcm_files(&src)[1];
    let (_, raw) = hu(f);
    let ll = tmp.path().join("ll.dcm");
    jpegls(f, &ll, &[]);
    let (ts, decoded) = hu(&ll);
    assert_eq!(ts, "1.2.840.10008.1.2.4.80");
    assert_eq!(decoded, raw, "lossless JPEG-LS must decode to the same HU");
    let nl = tmp.path().join("nl.dcm");
    jpegls(f, &nl, &["+en", "+md", "2"]);
    let (ts, decoded) = hu(&nl);
    assert_eq!(ts, "1.2.840.10008.1.2.4.81");
    let worst = raw.iter().zip(&decoded).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 2.0, "near-lossless (NEAR 2, slope 1) off by {worst} HU");
    assert!(decoded != raw, "near-lossless is not expected to be exact on a noisy phantom");
}

#[test]
fn a_jpegls_series_over_storescu_gives_the_uncompressed_result() {
    if !common::model_shipped() {
        panic!("models/manifest.toml missing: the shipped model is needed");
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("native");
    let truth = common::phantom(&src, 2602, 24, "severe");
    let series = truth["series_instance_uid"].as_str().unwrap().to_string();
    let ls = tmp.path().join("jpegls");
    std::fs::create_dir_all(&ls).unwrap();
    for f in common::dcm_files(&src) {
        jpegls(&f, &ls.join(f.file_name().unwrap()), &[]);
    }
    let d = Daemon::start(&tmp.path().join("d"), "[series]\nquiet_period_s = 1.0\n");
    let (ok, out) = storescu(d.port, "CT1", &[&src], true);
    assert!(ok, "{out}");
    let native = d.wait_result(&series, 1, Duration::from_secs(600));
    // The same SOP instances again, JPEG-LS encoded and sent as such (`-xt`: propose JPEG-LS lossless, as a scanner
    // configured for it does): other bytes, so a re-analysis (version 2) of the same series.
    let out = Command::new("storescu")
        .args(["-v", "-xt", "-aet", "CT1", "-aec", "LUNGSENTRY", "+sd", "127.0.0.1", &d.port.to_string()])
        .arg(&ls)
        .output()
        .expect("storescu (DCMTK)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("E: "), "{text}");
    assert_eq!(text.matches("Received Store Response (Success)").count(), 24, "{text}");
    assert!(!text.contains("-> Little Endian"), "sent as JPEG-LS, not converted: {text}");
    let compressed = d.wait_result(&series, 2, Duration::from_secs(600));
    let store = d.store();
    let spooled = store.series_instances(&series).unwrap();
    assert_eq!(spooled.len(), 24);
    for i in &spooled {
        let obj = dicom_object::open_file(&i.path).unwrap();
        assert_eq!(obj.meta().transfer_syntax().trim_end_matches('\0'), "1.2.840.10008.1.2.4.80", "kept as received");
    }
    assert_eq!(native.result["status"], "analysed", "{}", native.result);
    assert!(!native.result["lesions"].as_array().unwrap().is_empty(), "lesions to compare: {}", native.result);
    let strip = |v: &serde_json::Value| {
        let mut v = v.clone();
        for k in ["timings_ms", "received_at", "completed_at", "alert", "alert_reasons", "version"] {
            v.as_object_mut().unwrap().remove(k);
        }
        v
    };
    assert_eq!(strip(&native.result), strip(&compressed.result), "JPEG-LS result differs from the uncompressed one");
}
