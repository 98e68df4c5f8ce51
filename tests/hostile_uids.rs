//! Peer-controlled UIDs never become paths (issue 21).
//!
//! - A real `lungsentry serve` gets, through DCMTK `storescu` in one association, a phantom series interleaved
//!   with copies of one of its slices whose Study, Series or SOP Instance UID is `..`, `.`, `../x`, `a/b`, has
//!   an empty component, 65 characters or non-digits, or whose Study or Series UID is blank: each is refused with
//!   C000 (and the reason is logged), each good slice after it is stored. A copy whose SOP Instance UID is blank
//!   in the dataset only (the file meta keeps a good one), which storescu will not send, goes through
//!   `lungsentry send` (the command takes the file meta's UID): refused with C000 too. Blank UIDs are Type 1
//!   violations; none is stored under a derived UID. The series is analysed, its DICOM outputs delivered to DCMTK
//!   `storescp`; then a retention pass (age) purges it; after a restart with disk-pressure purging, a second
//!   series is analysed and delivered and the next instance's disk-pressure purge removes it. Afterwards the data
//!   dir, its SQLite file (integrity_check), salt and token are intact, and nothing outside the data dir was
//!   created or removed. (An empty SOP Instance UID in the command too is a raw-wire case of
//!   `tests/malformed_corpus.rs`.)
//! - A store written before UIDs were checked (rows with Series UIDs `..`, `.`, `../x`, `a/b`, spool paths that
//!   point at the store file or outside the data dir, output directories named as the old code named them):
//!   retention's age pass and disk-pressure purge delete only what is strictly inside the data dir.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;

/// Every file and directory under `root` except those under `skip`, with its size and modification time.
fn snapshot(root: &Path, skip: &[PathBuf]) -> BTreeMap<PathBuf, (u64, Option<SystemTime>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if skip.iter().any(|s| p.starts_with(s)) {
                continue;
            }
            let md = std::fs::symlink_metadata(&p).unwrap();
            out.insert(p.clone(), (if md.is_dir() { 0 } else { md.len() }, md.modified().ok()));
            if md.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

fn db(data: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(data.join("lungsentry.sqlite")).unwrap()
}

fn integrity(data: &Path) -> String {
    db(data).query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap()
}

fn wait_until(what: &str, timeout: Duration, d: &Daemon, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; log:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// storescu -v -nh (no halt on a failure status) of `files` in this order, one association; returns each file's
/// response line.
fn send_each(port: u16, files: &[PathBuf]) -> (BTreeMap<PathBuf, String>, String) {
    let out = Command::new("storescu")
        .args(["-v", "-nh", "-aet", "CT1", "-aec", "LUNGSENTRY", "127.0.0.1", &port.to_string()])
        .args(files)
        .env("TCP_NODELAY", "1")
        .output()
        .expect("storescu");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let mut by_file = BTreeMap::new();
    let mut current: Option<PathBuf> = None;
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("I: Sending file: ") {
            current = Some(PathBuf::from(p.trim()));
        } else if line.contains("Received Store Response") {
            if let Some(p) = current.take() {
                by_file.insert(p, line.to_string());
            }
        }
    }
    (by_file, text)
}

/// Copies of `slice` into `dir`, one per (attribute, bad value), each with its own SOP Instance UID unless the
/// SOP Instance UID is the bad one; returns (file, attribute, SOP Instance UID sent).
fn hostile_copies(slice: &Path, dir: &Path) -> Vec<(PathBuf, &'static str, String)> {
    std::fs::create_dir_all(dir).unwrap();
    let mut out = Vec::new();
    let mut n = 0;
    for (attr, tag) in [
        ("StudyInstanceUID", tags::STUDY_INSTANCE_UID),
        ("SeriesInstanceUID", tags::SERIES_INSTANCE_UID),
        ("SOPInstanceUID", tags::SOP_INSTANCE_UID),
    ] {
        for (label, value) in common::bad_uids() {
            n += 1;
            let mut o = dicom_object::open_file(slice).unwrap();
            let sop = if attr == "SOPInstanceUID" {
                value.clone()
            } else {
                format!("{}.77{n}", o.meta().media_storage_sop_instance_uid().trim_end_matches('\0'))
            };
            o.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(sop.as_str())));
            o.update_meta(|m| m.media_storage_sop_instance_uid = sop.clone());
            o.put(DataElement::new(tag, VR::UI, PrimitiveValue::from(value.as_str())));
            let p = dir.join(format!("{attr}-{label}.dcm"));
            o.write_to_file(&p).unwrap();
            out.push((p, attr, sop));
        }
    }
    out
}

/// Copies of `slice` with a blank Study or a blank Series UID, each with its own SOP Instance UID; returns (file,
/// attribute, SOP Instance UID sent).
fn blank_study_series_copies(slice: &Path, dir: &Path) -> Vec<(PathBuf, &'static str, String)> {
    let mut out = Vec::new();
    for (i, (attr, tag)) in
        [("StudyInstanceUID", tags::STUDY_INSTANCE_UID), ("SeriesInstanceUID", tags::SERIES_INSTANCE_UID)]
            .into_iter()
            .enumerate()
    {
        let mut o = dicom_object::open_file(slice).unwrap();
        let sop = format!("{}.99{i}", o.meta().media_storage_sop_instance_uid().trim_end_matches('\0'));
        o.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(sop.as_str())));
        o.update_meta(|m| m.media_storage_sop_instance_uid = sop.clone());
        o.put(DataElement::new(tag, VR::UI, PrimitiveValue::from("")));
        let p = dir.join(format!("blank-{attr}.dcm"));
        o.write_to_file(&p).unwrap();
        out.push((p, attr, sop));
    }
    out
}

/// A copy of `slice` whose dataset SOP Instance UID is blank while its file meta (which `lungsentry send` puts in
/// the command) keeps a good one; returns (file, that UID).
fn blank_sop_in_dataset_copy(slice: &Path, dir: &Path) -> (PathBuf, String) {
    let mut o = dicom_object::open_file(slice).unwrap();
    let sop = format!("{}.999", o.meta().media_storage_sop_instance_uid().trim_end_matches('\0'));
    o.update_meta(|m| m.media_storage_sop_instance_uid = sop.clone());
    o.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from("")));
    let p = dir.join("blank-SOPInstanceUID-dataset-only.dcm");
    o.write_to_file(&p).unwrap();
    (p, sop)
}

#[test]
fn hostile_uids_are_refused_and_purges_stay_inside_the_data_dir() {
    if !model_shipped() {
        eprintln!("SKIP: models/manifest.toml is not shipped yet");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (a_dir, b_dir, c_dir) = (root.join("a"), root.join("b"), root.join("c"));
    let a = phantom(&a_dir, 21_001, 24, "severe")["series_instance_uid"].as_str().unwrap().to_string();
    let b = phantom(&b_dir, 21_002, 24, "severe")["series_instance_uid"].as_str().unwrap().to_string();
    phantom(&c_dir, 21_003, 2, "none");
    let a_files = dcm_files(&a_dir);
    let hostile = hostile_copies(&a_files[0], &root.join("hostile"));
    let blank = blank_study_series_copies(&a_files[0], &root.join("hostile"));
    let (blank_sop_file, blank_sop) = blank_sop_in_dataset_copy(&a_files[0], &root.join("hostile"));
    // Bait the old failure modes: files beside the data dir and next to where `../x` would land.
    for bait in ["outside.txt", "x", "d/x", "d/outside.txt"] {
        let p = root.join(bait);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"not the daemon's").unwrap();
    }
    let (pacs_dir, dir) = (root.join("pacs"), root.join("d"));
    let data = dir.join("data");
    let (_pacs, pacs_port) = storescp(&pacs_dir, false);
    let outputs = format!(
        "[outputs]\nkey_images = 1\n\n[[outputs.dicom]]\nae_title = \"PACS\"\nhost = \"127.0.0.1\"\nport = {pacs_port}\n"
    );
    let series = "[series]\nquiet_period_s = 0.5\nstable_timeout_s = 5.0\n";
    let mut d = Daemon::start_full(&dir, "", "retention_hours = 0.002\n", &format!("{series}\n{outputs}"));
    let skip = [data.clone(), pacs_dir.clone(), dir.join("daemon.log"), dir.join("lungsentry.toml")];
    let before = snapshot(root, &skip);
    let salt = std::fs::read(data.join("patient-key.salt")).unwrap();

    // One association: hostile copy, good slice, hostile copy, good slice, … (the blank Study/Series copies among
    // them).
    let refused: Vec<&(PathBuf, &str, String)> = hostile.iter().chain(&blank).collect();
    let mut order = Vec::new();
    let mut good = a_files.iter();
    for (p, _, _) in refused.iter() {
        order.push(p.clone());
        if let Some(g) = good.next() {
            order.push(g.clone());
        }
    }
    order.extend(good.cloned());
    let (responses, text) = send_each(d.port, &order);
    for (p, _, _) in refused.iter().copied() {
        let r = responses.get(p).unwrap_or_else(|| panic!("no response for {}:\n{text}", p.display()));
        assert!(r.contains("Error: CannotUnderstand"), "{}: {r}\n{text}", p.display());
    }
    for g in &a_files {
        let r = responses.get(g).unwrap_or_else(|| panic!("no response for {}:\n{text}", g.display()));
        assert!(r.contains("(Success)"), "{}: {r}", g.display());
    }
    // The blank SOP Instance UID in the dataset, with a good one in the command: through `lungsentry send`.
    let sent = Command::new(bin())
        .args(["send", "--host", "127.0.0.1", "--port", &d.port.to_string(), "--calling-ae", "CT1"])
        .arg(&blank_sop_file)
        .output()
        .unwrap();
    let sent_text = format!("{}{}", String::from_utf8_lossy(&sent.stdout), String::from_utf8_lossy(&sent.stderr));
    assert!(!sent.status.success(), "send must fail when the peer refuses: {sent_text}");
    assert!(sent_text.contains("peer answered status 0xC000"), "{sent_text}");
    assert!(sent_text.contains("sent 0 of 1 file(s)"), "{sent_text}");
    let log = d.log();
    for attr in ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"] {
        for (_, v) in common::bad_uids() {
            let shown = format!("{attr} {v:?}");
            assert!(log.contains(&shown), "the refusal of {shown} is not logged:\n{log}");
        }
        let shown = format!("{attr} is empty (Type 1 attribute)");
        assert!(log.contains(&shown), "the refusal of a blank {attr} is not logged:\n{log}");
    }
    // Nothing of the refused instances is stored (no derived UID either): A is the only series.
    let conn = db(&data);
    for sop in refused.iter().map(|h| &h.2).chain([&blank_sop]) {
        let n: i64 =
            conn.query_row("SELECT COUNT(*) FROM instances WHERE sop_instance_uid = ?1", [sop], |r| r.get(0)).unwrap();
        assert_eq!(n, 0, "refused instance {sop:?} is in the store");
    }
    let bad_rows: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM instances WHERE series_instance_uid GLOB '*[^0-9.]*' OR study_instance_uid GLOB \
             '*[^0-9.]*' OR sop_instance_uid GLOB '*[^0-9.]*' OR series_instance_uid LIKE '%..%' \
             OR sop_instance_uid LIKE '%..%' OR length(sop_instance_uid) > 64",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(bad_rows, 0, "an instance with a malformed UID was stored");
    let series: Vec<String> = conn
        .prepare("SELECT DISTINCT series_instance_uid FROM instances")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(series, vec![a.clone()], "only A's good slices are stored");
    drop(conn);

    // The series is analysed, its outputs written and delivered; then the age pass purges pixels and outputs.
    d.wait_result(&a, 1, Duration::from_secs(300));
    let a_outputs = data.join("outputs").join(&a);
    wait_until("A's outputs delivered", Duration::from_secs(120), &d, || {
        let rows = d.store().dicom_outbox_of_series(&a).unwrap();
        !rows.is_empty() && rows.iter().all(|r| r.delivered)
    });
    assert!(a_outputs.is_dir(), "A's outputs were written");
    wait_until("the age pass to purge A", Duration::from_secs(120), &d, || {
        !a_outputs.exists() && d.store().pixels_purged_at(&a).unwrap().is_some()
    });
    assert_eq!(integrity(&data), "ok");

    // Restart with disk-pressure purging (every pass is above 1 %) and no age limit.
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    let cfg = cfg.replace("purge_high_water_percent = 100.0", "purge_high_water_percent = 1.0");
    let cfg = cfg.replace("retention_hours = 0.002", "retention_hours = 0");
    std::fs::write(&d.config, cfg).unwrap();
    d = d.restart();
    let (responses, text) = send_each(d.port, &refused.iter().map(|h| h.0.clone()).collect::<Vec<_>>());
    assert!(responses.values().all(|r| r.contains("Error: CannotUnderstand")), "{text}");
    assert_eq!(responses.len(), refused.len(), "{text}");
    let (ok, out) = storescu(d.port, "CT1", &[&b_dir], true);
    assert!(ok, "{out}");
    d.wait_result(&b, 1, Duration::from_secs(300));
    let b_outputs = data.join("outputs").join(&b);
    wait_until("B's outputs delivered", Duration::from_secs(120), &d, || {
        let rows = d.store().dicom_outbox_of_series(&b).unwrap();
        !rows.is_empty() && rows.iter().all(|r| r.delivered)
    });
    assert!(b_outputs.is_dir(), "B's outputs were written");
    // The next instance finds the disk above the purge mark: B (finished, delivered) is purged for it.
    let (ok, out) = storescu(d.port, "CT1", &[&c_dir], true);
    assert!(ok, "{out}");
    wait_until("the disk-pressure purge of B", Duration::from_secs(120), &d, || !b_outputs.exists());
    assert!(d.log().contains("disk above storage.purge_high_water_percent"), "{}", d.log());

    // The data dir and its store are intact; nothing outside it changed.
    assert_eq!(integrity(&data), "ok");
    assert_eq!(std::fs::read(data.join("patient-key.salt")).unwrap(), salt);
    for p in ["spool", "spool/tmp", "outputs", "keyimages"] {
        assert!(data.join(p).is_dir(), "{p} is gone");
    }
    let store = d.store();
    for s in [&a, &b] {
        assert!(store.latest_result(s).unwrap().is_some(), "result of {s} kept");
        assert!(store.pixels_purged_at(s).unwrap().is_some(), "{s} was purged");
    }
    let after = snapshot(root, &skip);
    assert_eq!(before, after, "something outside the data dir was created, changed or removed");
    assert!(d.child.try_wait().unwrap().is_none(), "daemon died; log:\n{}", d.log());
    d.kill9();
}

/// What an older version could have stored (it did not check UIDs): the purges must still stay inside.
#[test]
fn purges_of_a_store_with_malformed_uids_stay_inside_the_data_dir() {
    use lungsentry::retention::Retention;
    use lungsentry::spool::SpooledInstance;
    use lungsentry::store::Store;

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = root.join("d/data");
    std::fs::create_dir_all(data.join("outputs")).unwrap();
    std::fs::create_dir_all(data.join("keyimages")).unwrap();
    let store = Arc::new(Store::open(&data.join("lungsentry.sqlite")).unwrap());
    let salt = lungsentry::store::load_or_create_salt(&data).unwrap();
    std::fs::write(root.join("d/victim.txt"), b"outside").unwrap();
    std::fs::write(root.join("x"), b"outside").unwrap();
    // Old-style output directories and key images: the old code kept dots, so `..` named the data dir itself.
    std::fs::write(data.join("outputs/1.2.3.dcm"), b"another series' output").unwrap();
    std::fs::write(data.join("keyimages/..png"), b"an old key image").unwrap();
    let bad_series = ["..", ".", "../x", "a/b", "1.2..3", ""];
    let inst = |series: &str, n: usize, path: PathBuf| SpooledInstance {
        meta: common::ct_meta(format!("1.9.{n}"), "..".into(), series, n as i64),
        path,
        transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
        bytes: 1000,
        unchanged_since_ms: None,
    };
    // Spool paths as rows could hold them: the store file, the data dir, a file outside, a `..` path, and one
    // real spool file (which must go).
    let real = data.join("spool/ab/abcdef/1.9.5.dcm");
    std::fs::create_dir_all(real.parent().unwrap()).unwrap();
    std::fs::write(&real, vec![1u8; 1000]).unwrap();
    let paths = [
        data.join("lungsentry.sqlite"),
        data.clone(),
        root.join("d/victim.txt"),
        data.join("spool/../../victim.txt"),
        data.join("outputs/.."),
        real.clone(),
    ];
    let json = serde_json::json!({"status": "analysed"});
    for (i, s) in bad_series.iter().enumerate() {
        store.record_instance(&inst(s, i, paths[i].clone()), 1, "pk").unwrap();
        store.record_result(s, false, 0.0, &json, false).unwrap();
    }
    let skip = [data.join("lungsentry.sqlite-wal"), data.join("lungsentry.sqlite-shm"), data.join("lungsentry.sqlite")];
    let before = snapshot(root, &skip);

    // Age pass, then disk pressure (above 0 %: every finished series is purged).
    let cfg = lungsentry::config::StorageConfig {
        data_dir: data.clone(),
        retention_hours: 1e-9,
        purge_high_water_percent: 0.0,
        ..Default::default()
    };
    let retention = Retention::new(store.clone(), cfg.clone(), Arc::new(RwLock::new(())));
    std::thread::sleep(Duration::from_millis(20));
    let aged = retention.purge_expired().unwrap();
    assert_eq!(aged.series, bad_series.len(), "{aged:?}");
    assert_eq!(aged.files, 1, "only the real spool file is deleted: {aged:?}");
    assert!(!real.exists());
    for s in bad_series {
        store.record_instance(&inst(s, 9, data.join("spool/ab/abcdef/1.9.5.dcm")), 2, "pk").unwrap();
        store.record_result(s, false, 0.0, &json, false).unwrap();
    }
    std::fs::create_dir_all(real.parent().unwrap()).unwrap();
    std::fs::write(&real, vec![1u8; 1000]).unwrap();
    let pressure = Retention::new(store.clone(), cfg, Arc::new(RwLock::new(())));
    let r = pressure.relieve_pressure().unwrap();
    assert!(r.series >= 1, "{r:?}");
    assert!(!real.exists());
    std::fs::create_dir_all(real.parent().unwrap()).unwrap();

    // Everything else is as it was: the store (integrity ok, rows kept), salt, old files, files outside.
    assert_eq!(integrity(&data), "ok");
    assert_eq!(lungsentry::store::load_or_create_salt(&data).unwrap(), salt);
    for s in bad_series {
        assert!(store.latest_result(s).unwrap().is_some());
    }
    let mut after = snapshot(root, &skip);
    let mut before = before;
    // The one real spool file (and its directories, recreated above) is the only difference allowed.
    before.retain(|p, _| !p.starts_with(data.join("spool/ab")));
    after.retain(|p, _| !p.starts_with(data.join("spool/ab")));
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>());
    for (p, v) in &before {
        if !p.is_dir() {
            assert_eq!(after[p], *v, "{} changed", p.display());
        }
    }
}
