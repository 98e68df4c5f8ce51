//! End to end through real DCMTK peers: `storescu` → `lungsentry serve` (a separate process) → results in the
//! store and alerts at a real HTTP webhook receiver.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn skip_without_model() -> bool {
    if !model_shipped() {
        eprintln!("SKIP: models/manifest.toml is not shipped yet");
        return true;
    }
    false
}

/// A 300-slice 512² positive phantom and a 120-slice negative phantom through DCMTK storescu and the daemon.
/// Plumbing checks always hold whatever the model says: 420 success statuses, both series analysed with every
/// slice, one signed webhook alert per positive result (never more), no patient identifier in webhooks or logs.
/// With `model_quality` it also checks the model's accuracy goals: the positive flagged, involvement within
/// 1 point of truth, the negative not flagged, exactly one alert.
fn positive_and_negative(model_quality: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let pos = tmp.path().join("pos");
    let neg = tmp.path().join("neg");
    let pos_truth = phantom(&pos, 20_001, 300, "moderate");
    let neg_truth = phantom(&neg, 20_002, 120, "none");
    let rt = runtime();
    let (hook, got) = webhook_receiver(&rt);
    let d = Daemon::start(
        &tmp.path().join("d"),
        &format!("[series]\nquiet_period_s = 1.0\n\n[alerts]\nwebhook_url = \"http://{hook}/alert\"\nwebhook_secret = \"s3cret\"\n"),
    );
    let (ok, out) = storescu(d.port, "CT1", &[&pos, &neg], true);
    assert!(ok, "storescu failed:\n{out}");
    assert_eq!(out.matches("Received Store Response (Success)").count(), 420, "{out}");

    let p = d.wait_result(pos_truth["series_instance_uid"].as_str().unwrap(), 1, Duration::from_secs(600));
    let n = d.wait_result(neg_truth["series_instance_uid"].as_str().unwrap(), 1, Duration::from_secs(600));
    let truth_inv = pos_truth["involvement_percent"].as_f64().unwrap();
    let got_inv = p.involvement_percent;
    eprintln!(
        "positive: truth {truth_inv:.2} %, measured {got_inv:.2} % (flag {}); negative: measured {:.3} % (flag {})",
        p.positive, n.involvement_percent, n.positive
    );
    for (r, slices) in [(&p, 300), (&n, 120)] {
        assert_eq!(r.result["status"], "analysed", "{}", r.result);
        assert_eq!(r.result["n_slices"], slices);
        assert_eq!(r.result["analysed_slices"], slices);
        assert_eq!(r.version, 1);
        assert!(r.result["patient_key"].as_str().unwrap().len() >= 16);
        assert_eq!(r.positive, r.involvement_percent > 0.4, "flag must follow the 0.4 % threshold");
    }

    // One alert per positive result, signed, with its dedup key, and no patient identifiers anywhere.
    std::thread::sleep(Duration::from_secs(3));
    let alerts = got.lock().unwrap().clone();
    let positives: Vec<&lungsentry::store::StoredResult> = [&p, &n].into_iter().filter(|r| r.positive).collect();
    assert_eq!(alerts.len(), positives.len(), "alerts: {alerts:?}");
    for (key, sig, body) in &alerts {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(positives.iter().any(|r| r.series_instance_uid == v["series_instance_uid"].as_str().unwrap()));
        assert_eq!(key, v["dedup_key"].as_str().unwrap());
        assert_eq!(sig, &lungsentry::notify::signature(b"s3cret", body.as_bytes()));
        for t in [&pos_truth, &neg_truth] {
            assert!(!body.contains(t["patient_id"].as_str().unwrap()), "patient id leaked into a webhook body");
        }
    }
    for t in [&pos_truth, &neg_truth] {
        assert!(!d.log().contains(t["patient_id"].as_str().unwrap()), "patient id leaked into the log");
    }
    if model_quality {
        assert!(p.positive, "positive phantom not flagged: {}", p.result);
        assert!((got_inv - truth_inv).abs() <= 1.0, "involvement {got_inv} vs truth {truth_inv}");
        assert!(!n.positive, "negative phantom flagged: {}", n.result);
        assert_eq!(alerts.len(), 1);
    }
}

#[test]
fn positive_and_negative_phantoms_over_dcmtk() {
    if skip_without_model() {
        return;
    }
    positive_and_negative(false);
}

/// Issue 2's acceptance with the model's accuracy: ignored until the shipped model meets the phantom goals
/// (see models/MODEL_CARD.md). Run: `scripts/test --test e2e_serve -- --ignored`.
#[test]
#[ignore = "needs a model meeting the phantom accuracy goals (involvement within 1 point, no false positive)"]
fn positive_and_negative_phantoms_meet_the_accuracy_goals() {
    positive_and_negative(true);
}

/// A scanner's retry of a whole analysed series (the same bytes again) is acknowledged and changes nothing: no new
/// result version, no revision step, the series stays analysed, no second alert. A corrected instance (same SOP
/// Instance UID, other bytes) sent after the analysis re-opens the series and is analysed: result version 2.
#[test]
fn a_retried_series_changes_nothing_and_a_corrected_instance_is_analysed_again() {
    if skip_without_model() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("series");
    let truth = phantom(&src, 20_031, 24, "severe");
    let series_uid = truth["series_instance_uid"].as_str().unwrap().to_string();
    let rt = runtime();
    let (hook, got) = webhook_receiver(&rt);
    let d = Daemon::start(
        &tmp.path().join("d"),
        &format!("[series]\nquiet_period_s = 1.0\n\n[alerts]\nwebhook_url = \"http://{hook}/alert\"\n"),
    );
    let send = |paths: &[&Path], n: usize| {
        let (ok, out) = storescu(d.port, "CT1", paths, true);
        assert!(ok, "storescu failed:\n{out}");
        assert_eq!(out.matches("Received Store Response (Success)").count(), n, "{out}");
    };
    send(&[&src], 24);
    let v1 = d.wait_result(&series_uid, 1, Duration::from_secs(300));
    assert_eq!((v1.version, v1.result["n_slices"].as_u64()), (1, Some(24)));
    assert!(v1.positive, "a severe phantom: {}", v1.result);
    let store = d.store();
    let before = store.series(&series_uid).unwrap().unwrap();
    assert_eq!(before.state, "analysed");

    // The retry: every instance acknowledged again, nothing else happens.
    send(&[&src], 24);
    std::thread::sleep(Duration::from_secs(6)); // > quiet period + the completion ticker
    let after = store.series(&series_uid).unwrap().unwrap();
    assert_eq!((after.state.as_str(), after.revision), ("analysed", before.revision), "{after:?}");
    assert_eq!(store.latest_result(&series_uid).unwrap().unwrap().version, 1, "a retry made a new result version");
    assert!(store.series_pending_analysis().unwrap().is_empty(), "a restart would analyse the retry again");
    assert_eq!(got.lock().unwrap().len(), 1, "one alert for one positive result");

    // A corrected instance: same SOP Instance UID, other bytes.
    let fixed = tmp.path().join("fixed");
    std::fs::create_dir_all(&fixed).unwrap();
    let one = fixed.join("IM00006.dcm");
    std::fs::copy(src.join("IM00006.dcm"), &one).unwrap();
    let st = std::process::Command::new("dcmodify")
        .args(["-nb", "-i", "(0020,4000)=corrected by the scanner"])
        .arg(&one)
        .status()
        .expect("run dcmodify (apt-get install dcmtk)");
    assert!(st.success());
    send(&[&fixed], 1);
    let v2 = d.wait_result(&series_uid, 2, Duration::from_secs(300));
    assert_eq!((v2.version, v2.result["n_slices"].as_u64()), (2, Some(24)), "{}", v2.result);
    let last = store.series(&series_uid).unwrap().unwrap();
    assert_eq!((last.state.as_str(), last.revision), ("analysed", before.revision + 1), "{last:?}");
}

/// kill -9 mid-series, restart: every acknowledged instance is there, the series completes and is analysed,
/// and the alert goes out exactly once.
#[test]
fn kill9_mid_series_loses_nothing_acknowledged() {
    if skip_without_model() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pos = tmp.path().join("pos");
    let truth = phantom(&pos, 20_003, 160, "severe");
    let series_uid = truth["series_instance_uid"].as_str().unwrap().to_string();
    let rt = runtime();
    let (hook, got) = webhook_receiver(&rt);
    let mut d = Daemon::start(
        &tmp.path().join("d"),
        &format!("[series]\nquiet_period_s = 1.0\nstable_timeout_s = 8.0\n\n[alerts]\nwebhook_url = \"http://{hook}/alert\"\n"),
    );
    // Acknowledgements are paced by the engine (bounded per-series queue), so the kill lands mid-series.
    let sender = std::process::Command::new("storescu")
        .args(["-v", "-aet", "CT1", "-aec", "LUNGSENTRY", "+sd", "+r", "+sp", "*.dcm", "127.0.0.1"])
        .arg(d.port.to_string())
        .arg(&pos)
        .env("TCP_NODELAY", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let store = d.store();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while store.series_instances(&series_uid).unwrap().len() < 60 {
        assert!(std::time::Instant::now() < deadline, "instances not arriving; log:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    d.kill9();
    let out = sender.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let acked = text.matches("Received Store Response (Success)").count();
    assert!((30..160).contains(&acked), "the kill did not land mid-series: {acked} acknowledged");
    let present = store.series_instances(&series_uid).unwrap();
    eprintln!("acknowledged before the kill (per sender): {acked}; present after: {}", present.len());
    assert!(present.len() >= acked, "acknowledged {acked} but only {} present", present.len());
    for lungsentry::store::StoredInstance { path, .. } in &present {
        assert!(path.exists(), "spooled file {} missing", path.display());
    }
    drop(store);

    // Restart; the scanner resends the whole series (its retry after the failed association).
    let d = d.restart();
    let (ok, out) = storescu(d.port, "CT1", &[&pos], true);
    assert!(ok, "{out}");
    // Under load the resumed series may complete (stable_timeout_s) before the re-send has caught up: that gives
    // an early partial version; the re-sent instances re-open it and a later version holds all 160.
    let mut r = d.wait_result(&series_uid, 1, Duration::from_secs(600));
    while r.result["n_slices"] != 160 {
        r = d.wait_result(&series_uid, r.version + 1, Duration::from_secs(600));
    }
    assert!(r.positive, "{}", r.result);
    std::thread::sleep(Duration::from_secs(4));
    let alerts = got.lock().unwrap().clone();
    assert_eq!(alerts.len(), 1, "alert must go out exactly once: {alerts:?}");
}

fn make_bad_files(src: &Path, out: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    use dicom_dictionary_std::tags;
    std::fs::create_dir_all(out).unwrap();
    let mut obj = dicom_object::open_file(src).unwrap();
    obj.remove_element(tags::PIXEL_DATA);
    obj.update_meta(|m| m.media_storage_sop_instance_uid = format!("{}.1", m.media_storage_sop_instance_uid()));
    let uid = obj.meta().media_storage_sop_instance_uid().to_string();
    obj.put(dicom_core::DataElement::new(tags::SOP_INSTANCE_UID, dicom_core::VR::UI, uid.as_str()));
    let no_pixels = out.join("no-pixels.dcm");
    obj.write_to_file(&no_pixels).unwrap();

    let mut obj = dicom_object::open_file(src).unwrap();
    obj.put(dicom_core::DataElement::new(
        tags::PIXEL_DATA,
        dicom_core::VR::OW,
        dicom_core::PrimitiveValue::from(vec![0u8; 1000]),
    ));
    obj.update_meta(|m| m.media_storage_sop_instance_uid = format!("{}.2", m.media_storage_sop_instance_uid()));
    let uid = obj.meta().media_storage_sop_instance_uid().to_string();
    obj.put(dicom_core::DataElement::new(tags::SOP_INSTANCE_UID, dicom_core::VR::UI, uid.as_str()));
    let short = out.join("short-pixels.dcm");
    obj.write_to_file(&short).unwrap();
    (no_pixels, short)
}

/// Allow-list rejection and failure statuses for unusable datasets; the daemon keeps serving.
#[test]
fn allow_list_and_bad_datasets() {
    if skip_without_model() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ph = tmp.path().join("ph");
    phantom(&ph, 20_004, 4, "none");
    let d = Daemon::start(&tmp.path().join("d"), "[[dicom.allowed_peers]]\nae_title = \"CT1\"\nhost = \"127.0.0.1\"\n");
    let (ok, out) = storescu(d.port, "INTRUDER", &[&ph], true);
    assert!(!ok, "unknown calling AE must be rejected:\n{out}");
    assert!(out.contains("Rejected") || out.contains("rejected"), "{out}");

    let (no_pixels, short) = make_bad_files(&ph.join("IM00001.dcm"), &tmp.path().join("bad"));
    for f in [&no_pixels, &short] {
        let (ok, out) = storescu(d.port, "CT1", &[f.as_path()], true);
        assert!(!ok || !out.contains("Received Store Response (Success)"), "{} accepted:\n{out}", f.display());
        assert!(out.contains("Received Store Response"), "no response for {}:\n{out}", f.display());
    }
    // Still serving the next association.
    let (ok, out) = storescu(d.port, "CT1", &[&ph], true);
    assert!(ok, "{out}");
    assert_eq!(out.matches("Received Store Response (Success)").count(), 4, "{out}");
}

/// Every real file under $LUNGSENTRY_DATA/real-dicom but the Siemens JPEG 2000 series is accepted by storescu
/// with success and every series of them gets a result: analysed, or skipped with a stated reason. The Siemens
/// slices carry blank Study/Series/SOP Instance UIDs in the dataset (Type 1 attributes): each is refused with
/// C000, `lungsentry send` reports every one failed and exits non-zero, the daemon logs the attribute, and
/// nothing of the series is stored or has a result (issue 21).
#[test]
fn every_real_dicom_file_is_analysed_or_skipped_and_the_blank_uid_series_refused() {
    if skip_without_model() {
        return;
    }
    let real = data_dir().join("real-dicom");
    let files = lungsentry::tools::analyze::collect_files(std::slice::from_ref(&real)).unwrap();
    let groups = lungsentry::tools::analyze::group_by_series(&files);
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("d"), "[series]\nquiet_period_s = 0.5\n");
    // The Siemens files have a blank SOPClassUID in the dataset (only the file meta keeps it): DCMTK storescu
    // cannot propose a presentation context for them ("unknown SOP class") and fails before sending, so they go
    // through `lungsentry send`, which proposes from the file meta. Everything else goes through storescu.
    let j2k = real.join("siemens-abdomen-j2k-series");
    let others: Vec<std::path::PathBuf> =
        std::fs::read_dir(&real).unwrap().map(|e| e.unwrap().path()).filter(|p| *p != j2k).collect();
    let other_refs: Vec<&Path> = others.iter().map(|p| p.as_path()).collect();
    let (ok, out) = storescu(d.port, "CT1", &other_refs, true);
    assert!(ok, "{out}");
    let j2k_files = lungsentry::tools::analyze::collect_files(std::slice::from_ref(&j2k)).unwrap();
    let n_j2k = j2k_files.len();
    assert_eq!(n_j2k, 20);
    assert_eq!(out.matches("Received Store Response (Success)").count(), files.len() - n_j2k, "{out}");
    let out = std::process::Command::new(bin())
        .args(["send", "--host", "127.0.0.1", "--port", &d.port.to_string(), "--calling-ae", "CT1"])
        .arg(&j2k)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "send must exit non-zero when files are refused: {text}");
    assert!(text.contains(&format!("sent 0 of {n_j2k} file(s)")), "{text}");
    assert!(text.contains(&format!("{n_j2k} failed")), "{text}");
    assert!(text.contains(&format!("{n_j2k} file(s) were not stored")), "{text}");
    // The sender is told why, in each C-STORE-RSP's Error Comment.
    assert_eq!(
        text.matches("peer answered status 0xC000 (StudyInstanceUID is empty (Type 1 attribute))").count(),
        n_j2k,
        "{text}"
    );
    let log = d.log();
    assert!(log.contains("StudyInstanceUID is empty (Type 1 attribute)"), "the reason is not logged:\n{log}");
    // Nothing of the Siemens series is stored: neither its instances (by the file meta's SOP Instance UID, the
    // one the command carried) nor a result under the UID `analyze` derives for it.
    let store = d.store();
    let j2k_series = lungsentry::tools::analyze::group_by_series(&j2k_files);
    assert_eq!(j2k_series.len(), 1);
    for (uid, instances) in &j2k_series {
        assert!(store.latest_result(uid).unwrap().is_none(), "a result for the refused series {uid}");
        let db = rusqlite::Connection::open(d.dir.join("data/lungsentry.sqlite")).unwrap();
        for (_, path) in instances {
            let sop = dicom_object::open_file(path).unwrap().meta().media_storage_sop_instance_uid().to_string();
            let sop = sop.trim_end_matches(['\0', ' ']);
            let n: i64 = db
                .query_row("SELECT COUNT(*) FROM instances WHERE sop_instance_uid = ?1", [sop], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 0, "refused instance {sop} is in the store");
        }
    }
    let stored: i64 = rusqlite::Connection::open(d.dir.join("data/lungsentry.sqlite"))
        .unwrap()
        .query_row("SELECT COUNT(*) FROM instances", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored as usize, files.len() - n_j2k, "only the accepted files are stored");
    for uid in groups.keys().filter(|u| !j2k_series.contains_key(*u)) {
        let r = d.wait_result(uid, 1, Duration::from_secs(300));
        let status = r.result["status"].as_str().unwrap();
        let reasons = r.result["skip_reasons"].as_array().unwrap();
        eprintln!("{}: {status} {:?}", &uid[..uid.len().min(24)], reasons);
        assert!(status == "analysed" || (status == "skipped" && !reasons.is_empty()), "{}", r.result);
    }
    assert!(store.latest_result(j2k_series.keys().next().unwrap()).unwrap().is_none());
}
