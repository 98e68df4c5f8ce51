//! Retention, for real: a `lungsentry serve` process receives phantom series over DCMTK `storescu`.
//!
//! - Age: with `retention_hours` tiny, the analysed series' spool files disappear while its result, its alert
//!   (outbox row) and its instance rows remain; a late instance after a restart cannot be re-analysed and the
//!   series says why (state `purged`); re-sending the whole series analyses it again.
//! - Disk pressure: the data dir is a small tmpfs (as in `tests/disk_full.rs`; needs CAP_SYS_ADMIN, else SKIP),
//!   two analysed series sit in it and the disk is filled past `purge_high_water_percent`: a new series is still
//!   accepted in full because the oldest analysed series' pixels are purged first, and only as many as needed;
//!   then, with no high-water purge, an instance that meets a full disk (ENOSPC) purges the oldest series and is
//!   stored instead of refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn db(dir: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.join("data/lungsentry.sqlite")).unwrap()
}

/// (spool path, purged_at) of every instance row of a series.
fn instance_rows(dir: &Path, series_uid: &str) -> Vec<(String, Option<i64>)> {
    db(dir)
        .prepare("SELECT path, purged_at FROM instances WHERE series_instance_uid = ?1")
        .unwrap()
        .query_map([series_uid], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

fn series_state(dir: &Path, series_uid: &str) -> (String, Option<String>, Option<i64>) {
    db(dir)
        .query_row(
            "SELECT state, state_reason, pixels_purged_at FROM series WHERE series_instance_uid = ?1",
            [series_uid],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
}

fn wait_until(what: &str, timeout: Duration, d: &Daemon, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; log:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn send_all(d: &Daemon, paths: &[&Path]) {
    let (ok, out) = storescu(d.port, "CT1", paths, true);
    assert!(ok, "storescu failed:\n{out}");
    assert!(!out.contains("Refused"), "an instance was refused:\n{out}");
}

#[test]
fn pixels_purged_after_retention_hours_results_and_alerts_kept() {
    if !model_shipped() {
        eprintln!("SKIP: models/manifest.toml is not shipped yet");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let series_dir = tmp.path().join("series");
    let truth = phantom(&series_dir, 41_001, 25, "severe");
    let uid = truth["series_instance_uid"].as_str().unwrap().to_string();
    // One slice is held back, to arrive late (after the purge).
    let late_dir = tmp.path().join("late");
    std::fs::create_dir_all(&late_dir).unwrap();
    let files = dcm_files(&series_dir);
    assert_eq!(files.len(), 25);
    let late = late_dir.join(files[12].file_name().unwrap());
    std::fs::rename(&files[12], &late).unwrap();

    let dir = tmp.path().join("d");
    // 0.002 h = 7.2 s; the webhook goes nowhere (port 9), so its alert row stays in the outbox, pending.
    let d = Daemon::start_full(
        &dir,
        "",
        "retention_hours = 0.002\n",
        "[series]\nquiet_period_s = 1.0\nstable_timeout_s = 5.0\n\n[alerts]\nwebhook_url = \"http://127.0.0.1:9/hook\"\n",
    );
    send_all(&d, &[&series_dir]);
    let r = d.wait_result(&uid, 1, Duration::from_secs(300));
    assert_eq!(r.result["n_slices"], 24, "{}", r.result);
    assert_eq!(r.result["positive"], true, "severe phantom must be flagged: {}", r.result);
    let rows = instance_rows(&dir, &uid);
    assert_eq!(rows.len(), 24);
    // Right after the result the pixels are still there (the retention clock counts from the last instance).
    let present_at_result = rows.iter().filter(|(p, _)| Path::new(p).exists()).count();
    let png = lungsentry::dashboard::key_png_path(&dir.join("data"), &uid);
    wait_until("the key image", Duration::from_secs(30), &d, || png.exists());
    eprintln!("spool files present when the result was recorded: {present_at_result}/24");

    // The pixels go after retention_hours.
    wait_until("the spool files to be purged", Duration::from_secs(60), &d, || {
        instance_rows(&dir, &uid).iter().all(|(p, at)| at.is_some() && !Path::new(p).exists())
    });
    let (state, _, purged_at) = series_state(&dir, &uid);
    assert_eq!(state, "analysed");
    assert!(purged_at.is_some(), "series.pixels_purged_at not recorded");
    let spool_left: Vec<_> = walk(&dir.join("data/spool")).into_iter().filter(|p| p.extension().is_some()).collect();
    assert!(spool_left.is_empty(), "spool files left: {spool_left:?}");
    assert!(!png.exists(), "the key image goes with the pixels");
    // Result, masks summary and alert are kept.
    let kept = d.store().latest_result(&uid).unwrap().expect("result kept");
    assert_eq!(kept.version, 1);
    assert_eq!(kept.result, r.result, "the result must not change when pixels are purged");
    assert!(kept.result["lesions"].as_array().is_some_and(|l| !l.is_empty()), "{}", kept.result);
    let alerts: i64 = db(&dir)
        .query_row("SELECT COUNT(*) FROM outbox WHERE dedup_key = ?1", [format!("{uid}/v1")], |r| r.get(0))
        .unwrap();
    assert_eq!(alerts, 1, "the alert row must be kept");
    assert!(d.log().contains("retention: purged"), "no purge log line:\n{}", d.log());

    // A late instance after a restart (no worker holds the slices any more): says the pixels were purged.
    let mut d = d.restart();
    send_all(&d, &[&late]);
    wait_until("the series to say its pixels were purged", Duration::from_secs(120), &d, || {
        series_state(&dir, &uid).0 == "purged"
    });
    let (_, reason, _) = series_state(&dir, &uid);
    let reason = reason.unwrap_or_default();
    assert!(reason.contains("purged by retention") && reason.contains("24 of 25"), "{reason}");
    assert_eq!(d.store().latest_result(&uid).unwrap().unwrap().version, 1, "no partial re-analysis");

    // Re-sending the whole series analyses it again.
    std::fs::rename(&late, series_dir.join(late.file_name().unwrap())).unwrap();
    send_all(&d, &[&series_dir]);
    let r2 = d.wait_result(&uid, 2, Duration::from_secs(300));
    assert_eq!(r2.result["n_slices"], 25, "{}", r2.result);
    assert_eq!(r2.result["status"], "analysed", "{}", r2.result);
    wait_until("the re-analysis to write the key image again", Duration::from_secs(30), &d, || png.exists());
    let check: String = db(&dir).query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    assert!(d.child.try_wait().unwrap().is_none(), "daemon died; log:\n{}", d.log());
    d.kill9();
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn bytes_of(files: &[PathBuf]) -> u64 {
    files.iter().map(|p| std::fs::metadata(p).unwrap().len()).sum()
}

#[test]
fn disk_pressure_purges_oldest_analysed_series_first_to_accept_a_new_one() {
    if !model_shipped() {
        eprintln!("SKIP: models/manifest.toml is not shipped yet");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (a_dir, b_dir, c_dir) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    let a = phantom(&a_dir, 41_101, 40, "moderate")["series_instance_uid"].as_str().unwrap().to_string();
    let b = phantom(&b_dir, 41_102, 40, "none")["series_instance_uid"].as_str().unwrap().to_string();
    let c = phantom(&c_dir, 41_103, 12, "severe")["series_instance_uid"].as_str().unwrap().to_string();
    let dir = tmp.path().join("d");
    let Some(_mount) = Mount::tmpfs(&dir.join("data"), 64) else { return };
    // No age-based purge here: only disk pressure may purge.
    let mut d = Daemon::start_full(
        &dir,
        "",
        "retention_hours = 0\npurge_high_water_percent = 85.0\n",
        "[series]\nquiet_period_s = 1.0\nstable_timeout_s = 5.0\nmin_slices = 10\n",
    );
    send_all(&d, &[&a_dir]);
    d.wait_result(&a, 1, Duration::from_secs(300));
    send_all(&d, &[&b_dir]);
    d.wait_result(&b, 1, Duration::from_secs(300));
    assert!(instance_rows(&dir, &a).iter().all(|(p, at)| at.is_none() && Path::new(p).exists()));

    // Fill the disk: less room than the new series needs, and past the purge high-water mark.
    let need = bytes_of(&dcm_files(&c_dir));
    let filler = fill(&dir.join("data"), need / 3, 256 << 10);
    let free = free_bytes(&dir.join("data"));
    eprintln!("new series needs {} KiB, {} KiB free before it arrives", need / 1024, free / 1024);
    assert!(free < need, "the test must leave less room than the new series needs");

    let out = Command::new("storescu")
        .args(["-v", "-nh", "-aet", "CT1", "-aec", "LUNGSENTRY", "+sd", "+r", "+sp", "*.dcm", "127.0.0.1"])
        .arg(d.port.to_string())
        .arg(&c_dir)
        .env("TCP_NODELAY", "1")
        .output()
        .unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let ok = out.matches("Received Store Response (Success)").count();
    assert_eq!(ok, 12, "every instance of the new series must be accepted:\n{out}\nlog:\n{}", d.log());
    let rc = d.wait_result(&c, 1, Duration::from_secs(300));
    assert_eq!(rc.result["n_slices"], 12, "{}", rc.result);

    // The oldest analysed series (A) lost its pixels, B (newer) kept them; both results are kept.
    let a_rows = instance_rows(&dir, &a);
    assert_eq!(a_rows.len(), 40, "instance rows are kept");
    assert!(a_rows.iter().all(|(p, at)| at.is_some() && !Path::new(p).exists()), "A must be purged");
    assert!(series_state(&dir, &a).2.is_some());
    let b_rows = instance_rows(&dir, &b);
    assert!(
        b_rows.iter().all(|(p, at)| at.is_none() && Path::new(p).exists()),
        "B (newer) must keep its pixels when purging A was enough; log:\n{}",
        d.log()
    );
    assert!(instance_rows(&dir, &c).iter().all(|(p, at)| at.is_none() && Path::new(p).exists()));
    let store = d.store();
    for uid in [&a, &b, &c] {
        assert!(store.latest_result(uid).unwrap().is_some(), "result of {uid} must be kept");
    }
    std::fs::remove_file(&filler).unwrap();
    assert!(d.child.try_wait().unwrap().is_none(), "daemon died; log:\n{}", d.log());

    // No high-water purge this time (threshold 100 %): the disk is simply full when an instance comes. The
    // write fails with ENOSPC, the oldest finished series (B) is purged, and the instance is stored after all.
    let text = std::fs::read_to_string(&d.config).unwrap().replace(
        "purge_high_water_percent = 85.0",
        "purge_high_water_percent = 100.0\ndisk_high_water_percent = 100.0",
    );
    std::fs::write(&d.config, text).unwrap();
    let mut d = d.restart();
    let e_dir = tmp.path().join("e");
    let e = phantom(&e_dir, 41_104, 12, "mild")["series_instance_uid"].as_str().unwrap().to_string();
    let filler = fill(&dir.join("data"), need / 3, 256 << 10);
    let used = 100.0 - 100.0 * free_bytes(&dir.join("data")) as f64 / (64u64 << 20) as f64;
    eprintln!("disk {used:.1} % used before the third series");
    let (ok, out) = storescu(d.port, "CT1", &[e_dir.as_path()], true);
    assert!(ok && out.matches("Received Store Response (Success)").count() == 12, "{out}\nlog:\n{}", d.log());
    d.wait_result(&e, 1, Duration::from_secs(300));
    assert!(instance_rows(&dir, &b).iter().all(|(p, at)| at.is_some() && !Path::new(p).exists()), "B purged");
    assert!(
        instance_rows(&dir, &c).iter().all(|(p, at)| at.is_none() && Path::new(p).exists()),
        "C (newer than B) kept: one purge was enough"
    );
    assert!(d.log().contains("a new instance did not fit on the disk"), "log:\n{}", d.log());
    std::fs::remove_file(&filler).unwrap();
    assert!(d.child.try_wait().unwrap().is_none(), "daemon died; log:\n{}", d.log());
    d.kill9();
}

/// The purge rules on a real store and real files, without a daemon: what may and may not be purged.
#[test]
fn only_finished_series_without_pending_outputs_are_purged_and_a_resend_clears_the_mark() {
    use lungsentry::retention::Retention;
    use lungsentry::spool::SpooledInstance;
    use lungsentry::store::{NewDicomOutput, Store};
    use std::sync::{Arc, RwLock};

    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let store = Arc::new(Store::open(&data.join("lungsentry.sqlite")).unwrap());
    let inst = |series: &str, n: i64| -> SpooledInstance {
        let sop = format!("{series}.{n}");
        let path = data.join("spool").join(series).join(format!("{sop}.dcm"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, vec![7u8; 1000]).unwrap();
        SpooledInstance {
            meta: common::ct_meta(sop, format!("{series}.0"), series, n),
            path,
            transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
            bytes: 1000,
            unchanged_since_ms: None,
        }
    };
    let json = serde_json::json!({"status": "analysed"});
    // done: analysed; receiving: no result; outputs: analysed with a DICOM output pending; moved: analysed, then
    // a new instance (revision past the result).
    for s in ["1.9.1", "1.9.2", "1.9.3", "1.9.4"] {
        for n in 1..=3 {
            store.record_instance(&inst(s, n), 1, "pk").unwrap();
        }
    }
    for s in ["1.9.1", "1.9.3", "1.9.4"] {
        store.record_result(s, false, 0.0, &json, false).unwrap();
    }
    let out = NewDicomOutput {
        destination: "PACS@127.0.0.1:104".into(),
        kind: "sr".into(),
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.34".into(),
        sop_instance_uid: "1.9.3.99".into(),
        path: data.join("outputs/sr.dcm"),
    };
    store.enqueue_dicom_outputs("1.9.3", 1, &[out]).unwrap();
    store.record_instance(&inst("1.9.4", 4), 1, "pk").unwrap();

    // Files made from the pixels: key images of the finished series and of the one with a pending output, and
    // that one's output file.
    for s in ["1.9.1", "1.9.3"] {
        let png = lungsentry::dashboard::key_png_path(&data, s);
        std::fs::create_dir_all(png.parent().unwrap()).unwrap();
        std::fs::write(&png, b"png").unwrap();
    }
    let out_file = lungsentry::outputs::outbox::series_dir(&data, "1.9.3").join("v1/sr.dcm");
    std::fs::create_dir_all(out_file.parent().unwrap()).unwrap();
    std::fs::write(&out_file, b"sr").unwrap();
    let cfg = lungsentry::config::StorageConfig { data_dir: data.clone(), retention_hours: 1e-9, ..Default::default() };
    let retention = Retention::new(store.clone(), cfg, Arc::new(RwLock::new(())));
    std::thread::sleep(Duration::from_millis(20));
    let report = retention.purge_expired().unwrap();
    assert_eq!((report.series, report.files), (1, 3), "{report:?}");
    let present = |s: &str| store.series_instances(s).unwrap().len();
    assert_eq!(present("1.9.1"), 0);
    assert_eq!(store.purged_instance_count("1.9.1").unwrap(), 3);
    assert!(store.pixels_purged_at("1.9.1").unwrap().is_some());
    assert!(!data.join("spool/1.9.1").exists(), "empty series directory removed");
    assert!(!lungsentry::dashboard::key_png_path(&data, "1.9.1").exists(), "key image purged with the pixels");
    assert!(lungsentry::dashboard::key_png_path(&data, "1.9.3").exists(), "kept while its output is pending");
    assert!(out_file.exists(), "a pending output's file is kept");
    assert_eq!((present("1.9.2"), present("1.9.3"), present("1.9.4")), (3, 3, 4), "unfinished series kept");
    assert!(store.latest_result("1.9.1").unwrap().is_some(), "result kept");
    assert_eq!(store.purged_instance_count("1.9.3").unwrap(), 0);

    // The pending output is delivered: now it may go, oldest first.
    let row = store.due_dicom_outbox(i64::MAX, 10).unwrap().remove(0);
    store.mark_dicom_delivered(row.id, 0).unwrap();
    let r = retention.purge_oldest("test").unwrap();
    assert_eq!(r.series, 1);
    assert_eq!(present("1.9.3"), 0);
    assert!(!out_file.exists() && !lungsentry::outputs::outbox::series_dir(&data, "1.9.3").exists());
    assert!(!lungsentry::dashboard::key_png_path(&data, "1.9.3").exists());
    assert!(store.dicom_outbox_of_series("1.9.3").unwrap().len() == 1, "the outbox row stays");
    assert_eq!(retention.purge_oldest("test").unwrap().series, 0, "nothing else is finished");

    // A purged instance stored again is present again.
    store.record_instance(&inst("1.9.1", 2), 2, "pk").unwrap();
    assert_eq!(present("1.9.1"), 1);
    assert_eq!(store.purged_instance_count("1.9.1").unwrap(), 2);
    assert!(store.purge_candidates(None, 10).unwrap().iter().all(|c| c.series_instance_uid != "1.9.1"));
}
