//! One flag per exam, on a real `lungsentry serve` fed by DCMTK storescu: a study holding a 1.25 mm and a 5 mm
//! reconstruction of the same positive phantom (the thick one typed `DERIVED\PRIMARY\AXIAL`, as PET/CT scanners
//! do) gives two analysed results and one webhook alert, the second result linked to the alerted series; a
//! `DERIVED\SECONDARY` copy is skipped; and after a daemon restart a further positive reconstruction of the
//! study still does not alert.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{storescu, webhook_receiver, Daemon};

/// `lungsentry phantom` with an explicit slice thickness; returns truth.json.
fn phantom(out: &Path, seed: u64, slices: usize, thickness: &str) -> serde_json::Value {
    let st = Command::new(common::bin())
        .args(["phantom", "--out"])
        .arg(out)
        .args(["--seed", &seed.to_string(), "--slices", &slices.to_string(), "--thickness", thickness])
        .args(["--size", "512", "--severity", "severe"])
        .output()
        .expect("run lungsentry phantom");
    assert!(st.status.success(), "phantom: {}", String::from_utf8_lossy(&st.stderr));
    serde_json::from_slice(&std::fs::read(out.join("truth/truth.json")).unwrap()).unwrap()
}

/// Copies the `.dcm` files of `src` to `dst` as another series of the same study (DCMTK dcmodify: new Series
/// Instance UID `series_uid`, new SOP Instance UIDs, Image Type `image_type`).
fn as_reconstruction(src: &Path, dst: &Path, series_uid: &str, image_type: &str) {
    std::fs::create_dir_all(dst).unwrap();
    let mut files = Vec::new();
    for f in common::dcm_files(src) {
        let to = dst.join(f.file_name().unwrap());
        std::fs::copy(&f, &to).unwrap();
        files.push(to);
    }
    let st = Command::new("dcmodify")
        .args(["-nb", "-gin", "-m", &format!("(0020,000e)={series_uid}"), "-m", &format!("(0008,0008)={image_type}")])
        .args(&files)
        .output()
        .expect("dcmodify");
    assert!(st.status.success(), "dcmodify: {}", String::from_utf8_lossy(&st.stderr));
}

#[test]
fn a_study_with_two_reconstructions_alerts_once_even_after_a_restart() {
    if !common::model_shipped() {
        panic!("models/manifest.toml missing: the shipped model is needed");
    }
    let tmp = tempfile::tempdir().unwrap();
    let thin = tmp.path().join("thin");
    let thick_src = tmp.path().join("thick-src");
    let thin_truth = phantom(&thin, 2501, 48, "1.25");
    let thick_truth = phantom(&thick_src, 2501, 24, "5");
    let study = thin_truth["study_instance_uid"].as_str().unwrap().to_string();
    assert_eq!(thick_truth["study_instance_uid"], study.as_str(), "same seed, same study");
    let thin_uid = thin_truth["series_instance_uid"].as_str().unwrap().to_string();
    let (thick_uid, secondary_uid, late_uid) = (format!("{study}.5"), format!("{study}.6"), format!("{study}.7"));
    let thick = tmp.path().join("thick");
    as_reconstruction(&thick_src, &thick, &thick_uid, "DERIVED\\PRIMARY\\AXIAL");
    let secondary = tmp.path().join("secondary");
    as_reconstruction(&thick_src, &secondary, &secondary_uid, "DERIVED\\SECONDARY\\AXIAL");

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (hook, got) = webhook_receiver(&rt);
    let config = format!("[series]\nquiet_period_s = 1.0\n\n[alerts]\nwebhook_url = \"http://{hook}/alert\"\n");
    let d = Daemon::start(&tmp.path().join("d"), &config);
    let (ok, out) = storescu(d.port, "CT1", &[&thin], true);
    assert!(ok, "{out}");
    let a = d.wait_result(&thin_uid, 1, Duration::from_secs(600));
    let (ok, out) = storescu(d.port, "CT1", &[&thick, &secondary], true);
    assert!(ok, "{out}");
    let b = d.wait_result(&thick_uid, 1, Duration::from_secs(600));
    let c = d.wait_result(&secondary_uid, 1, Duration::from_secs(600));

    assert_eq!(a.result["status"], "analysed", "{}", a.result);
    assert!(a.positive, "the thin reconstruction must be flagged: {}", a.result);
    assert_eq!(a.result["alert"], true);
    assert!(a.result.get("study_alert").is_none(), "{}", a.result);
    // DERIVED\PRIMARY\AXIAL is analysed; positive too, but the study already alerted: linked, no alert.
    assert_eq!(b.result["status"], "analysed", "{}", b.result);
    assert!(b.positive, "the thick reconstruction must be flagged: {}", b.result);
    assert_eq!(b.result["alert"], false, "{}", b.result);
    assert_eq!(b.result["study_alert"]["series_instance_uid"], thin_uid.as_str());
    assert_eq!(b.result["study_alert"]["withheld_reasons"], serde_json::json!(["positive"]));
    // DERIVED\SECONDARY is skipped.
    assert_eq!(c.result["status"], "skipped", "{}", c.result);
    let reasons = c.result["skip_reasons"].to_string();
    assert!(reasons.contains("derived/secondary"), "{reasons}");

    // Exactly one alert row was ever queued (rows are queued in the result's transaction), and it is delivered.
    let store = d.store();
    let counts = store.outbox_counts().unwrap();
    assert_eq!(counts.pending + counts.delivered, 1, "{counts:?}");
    while store.outbox_counts().unwrap().delivered < 1 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let alerts = got.lock().unwrap().clone();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(alerts[0].0.starts_with(&format!("{thin_uid}/v")), "{alerts:?}");
    // By default (alerts.include_patient_identifiers off) neither the webhook body nor the log names the patient.
    let first = dicom_object::open_file(&common::dcm_files(&thin)[0]).unwrap();
    let accession =
        first.element(dicom_dictionary_std::tags::ACCESSION_NUMBER).unwrap().to_str().unwrap().trim().to_string();
    let identifiers =
        [thin_truth["patient_name"].as_str().unwrap(), thin_truth["patient_id"].as_str().unwrap(), &accession];
    for id in identifiers {
        assert!(id.len() >= 6, "{id:?}");
        assert!(!alerts[0].2.contains(id), "{id} in the webhook body: {}", alerts[0].2);
        assert!(!d.log().contains(id), "{id} in the daemon log");
    }

    // After a restart, a later positive reconstruction of the alerted study still does not alert.
    let d = d.restart();
    let late = tmp.path().join("late");
    as_reconstruction(&thick_src, &late, &late_uid, "ORIGINAL\\PRIMARY\\AXIAL");
    let (ok, out) = storescu(d.port, "CT1", &[&late], true);
    assert!(ok, "{out}");
    let l = d.wait_result(&late_uid, 1, Duration::from_secs(600));
    assert!(l.positive, "{}", l.result);
    assert_eq!(l.result["alert"], false, "{}", l.result);
    assert_eq!(l.result["study_alert"]["series_instance_uid"], thin_uid.as_str());
    let counts = d.store().outbox_counts().unwrap();
    assert_eq!(counts.pending + counts.delivered, 1, "no second alert row: {counts:?}");
}
