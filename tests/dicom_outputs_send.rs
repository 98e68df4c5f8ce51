//! The daemon sends its DICOM outputs from the durable outbox to `[[outputs.dicom]]` destinations, all real peers:
//! DCMTK `storescp` (stores everything), a second lungsentry daemon (accepts Secondary Capture, has no
//! presentation context for SEG or 3D SR: those are parked at once) and a port where nothing listens (retried
//! with back-off, parked after `max_attempts`). After a restart nothing is queued or sent twice. Orthanc (Debian
//! package, started by the test on free ports) files the objects in the original study. A destination that refuses
//! our SOP classes for good (storescp negotiating CT only) parks them, and the token-authenticated dashboard API
//! shows the parked objects (list, series detail, `/api/outputs`). The daemon aborted right after committing a
//! result, or after writing its objects but before queueing them (`LUNGSENTRY_TEST_CRASH_AT`), queues and sends
//! them after the restart, once.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command};

use common::HttpDaemon;
use std::time::{Duration, Instant};

use common::storescp;

/// SOP Instance UIDs of the files storescp wrote (read with dcmdump).
fn received_uids(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let o = Command::new("dcmdump").args(["+P", "0008,0018"]).arg(&p).output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let uid = text.split('[').nth(1).and_then(|s| s.split(']').next()).unwrap_or("").to_string();
        out.push(uid);
    }
    out.sort();
    out
}

type Row = lungsentry::store::DicomOutboxEntry;

/// Waits until every outbox row of the series is delivered or parked.
fn wait_settled(d: &common::Daemon, series: &str, expected_rows: usize, timeout: Duration) -> Vec<Row> {
    let store = d.store();
    let deadline = Instant::now() + timeout;
    loop {
        let rows = store.dicom_outbox_of_series(series).unwrap();
        if rows.len() >= expected_rows && rows.iter().all(|r| r.delivered || r.parked) {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "outbox not settled: {:#?}\nlog:\n{}",
            rows.iter()
                .map(|r| (&r.row.destination, &r.row.kind, r.row.attempts, r.delivered, r.parked, &r.last_error))
                .collect::<Vec<_>>(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn outputs_reach_storescp_refusals_park_and_restart_sends_nothing_twice() {
    if !common::model_shipped() {
        panic!("models/manifest.toml missing: the shipped model is needed");
    }
    let tmp = tempfile::tempdir().unwrap();
    let pacs_dir = tmp.path().join("pacs");
    let (_pacs, pacs_port) = storescp(&pacs_dir, false);
    let refuser = common::Daemon::start(&tmp.path().join("refuser"), "");
    let down_port = common::free_port();
    let extra = format!(
        "[series]\nquiet_period_s = 0.5\n\n[outputs]\nmax_attempts = 2\nkey_images = 2\n\n\
         [[outputs.dicom]]\nae_title = \"PACS\"\nhost = \"127.0.0.1\"\nport = {pacs_port}\n\n\
         [[outputs.dicom]]\nae_title = \"LUNGSENTRY\"\nhost = \"127.0.0.1\"\nport = {}\n\n\
         [[outputs.dicom]]\nae_title = \"DOWN\"\nhost = \"127.0.0.1\"\nport = {down_port}\nobjects = [\"sr\"]\n",
        refuser.port
    );
    let mut d = common::Daemon::start(&tmp.path().join("main"), &extra);

    let src = tmp.path().join("severe");
    let truth = common::phantom(&src, 31, 40, "severe");
    let (ok, out) = common::storescu(d.port, "CT1", &[&src], true);
    assert!(ok, "storescu failed:\n{out}");
    let series = truth["series_instance_uid"].as_str().unwrap().to_string();
    let result = d.wait_result(&series, 1, Duration::from_secs(120));
    assert!(result.positive, "the severe phantom must be flagged");

    // PACS: seg + sr + 2 key images; refuser: the same 4; DOWN: sr only.
    let rows = wait_settled(&d, &series, 9, Duration::from_secs(60));
    assert_eq!(rows.len(), 9, "{rows:#?}");
    let of = |dest: &str| rows.iter().filter(|r| r.row.destination.starts_with(dest)).collect::<Vec<_>>();

    let pacs = of("PACS@");
    assert_eq!(pacs.len(), 4);
    assert!(pacs.iter().all(|r| r.delivered && r.last_status == Some(0)), "storescp stores everything: {pacs:#?}");
    let sent: BTreeSet<String> = pacs.iter().map(|r| r.row.sop_instance_uid.clone()).collect();
    let got: BTreeSet<String> = received_uids(&pacs_dir).into_iter().collect();
    assert_eq!(sent, got, "storescp received exactly the queued objects");

    let refused = of("LUNGSENTRY@");
    for r in &refused {
        if r.row.kind == "key_images" {
            assert!(r.delivered, "Secondary Capture is accepted by lungsentry's SCP: {r:#?}");
        } else {
            assert!(
                r.parked && r.row.attempts == 1,
                "SEG/SR have no presentation context there: parked at once: {r:#?}"
            );
            assert!(r.last_error.as_deref().unwrap_or("").contains("presentation context"), "{r:#?}");
        }
    }
    let down = of("DOWN@");
    assert_eq!(down.len(), 1);
    assert!(down[0].parked && down[0].row.attempts == 2, "nothing listens: retried once, then parked: {down:#?}");

    let counts = d.store().dicom_outbox_counts().unwrap();
    assert_eq!((counts.pending, counts.delivered, counts.parked), (0, 6, 3), "{counts:?}");

    // Restart: nothing is queued again, nothing is sent twice.
    d.kill9();
    let d = d.restart();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(d.store().dicom_outbox_of_series(&series).unwrap().len(), 9);
    assert_eq!(received_uids(&pacs_dir).len(), 4, "no duplicate after the restart");
    drop(refuser);
}

/// Orthanc (Debian package) started by the test on free ports, with its own storage in `dir`.
struct Orthanc {
    child: Child,
    http_port: u16,
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn orthanc(dir: &Path) -> (Orthanc, u16) {
    std::fs::create_dir_all(dir).unwrap();
    let (http_port, dicom_port) = (common::free_port(), common::free_port());
    let config = serde_json::json!({
        "Name": "lungsentry-test",
        "StorageDirectory": dir.join("storage"),
        "IndexDirectory": dir.join("index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "DicomCheckCalledAet": true,
        "RemoteAccessAllowed": false,
        "AuthenticationEnabled": false,
        "Plugins": [],
    });
    let path = dir.join("orthanc.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let log = std::fs::File::create(dir.join("orthanc.log")).unwrap();
    let child = Command::new("Orthanc")
        .arg(&path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("Orthanc (apt-get install orthanc)");
    let o = Orthanc { child, http_port };
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(http_port, "/system").is_none() {
        assert!(
            Instant::now() < deadline,
            "Orthanc did not start: {}",
            std::fs::read_to_string(dir.join("orthanc.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (o, dicom_port)
}

/// JSON body of a plain HTTP/1.0 GET answered 200.
fn http_get(port: u16, path: &str) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    if text.split(' ').nth(1)? != "200" {
        return None;
    }
    serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()
}

#[test]
fn outputs_reach_orthanc_in_the_original_study() {
    if !common::model_shipped() {
        panic!("models/manifest.toml missing: the shipped model is needed");
    }
    let tmp = tempfile::tempdir().unwrap();
    let (o, orthanc_port) = orthanc(&tmp.path().join("orthanc"));
    let extra = format!(
        "[series]\nquiet_period_s = 0.5\n\n[[outputs.dicom]]\nae_title = \"ORTHANC\"\nhost = \"127.0.0.1\"\nport = {orthanc_port}\n"
    );
    let d = common::Daemon::start(&tmp.path().join("main"), &extra);
    let src = tmp.path().join("severe");
    let truth = common::phantom(&src, 51, 30, "severe");
    let (ok, out) = common::storescu(d.port, "CT1", &[&src], true);
    assert!(ok, "storescu failed:\n{out}");
    let series = truth["series_instance_uid"].as_str().unwrap();
    d.wait_result(series, 1, Duration::from_secs(120));
    let store = d.store();
    let deadline = Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let rows = store.dicom_outbox_of_series(series).unwrap();
        if !rows.is_empty() && rows.iter().all(|r| r.delivered || r.parked) {
            break rows;
        }
        assert!(Instant::now() < deadline, "outbox not settled: {rows:#?}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(rows.iter().all(|r| r.delivered), "Orthanc stores every object: {rows:#?}");
    let sent: BTreeSet<String> = rows.iter().map(|r| r.row.sop_instance_uid.clone()).collect();

    // Orthanc's own view: exactly those instances, one study (the CT's), one series per object kind.
    let ids = http_get(o.http_port, "/instances").unwrap();
    let mut got = BTreeSet::new();
    let mut modalities = BTreeSet::new();
    for id in ids.as_array().unwrap() {
        let tags = http_get(o.http_port, &format!("/instances/{}/simplified-tags", id.as_str().unwrap())).unwrap();
        assert_eq!(tags["StudyInstanceUID"], truth["study_instance_uid"], "in the original study");
        got.insert(tags["SOPInstanceUID"].as_str().unwrap().to_string());
        modalities.insert(tags["Modality"].as_str().unwrap().to_string());
    }
    assert_eq!(sent, got);
    assert_eq!(modalities, ["OT", "SEG", "SR"].iter().map(|s| s.to_string()).collect());
    assert_eq!(http_get(o.http_port, "/studies").unwrap().as_array().unwrap().len(), 1);
    assert_eq!(http_get(o.http_port, "/series").unwrap().as_array().unwrap().len(), 3);
}

/// (status, body) of an HTTP/1.0 GET with a bearer token.
fn get_auth(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n{auth}\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split(' ').nth(1).unwrap().parse().unwrap();
    (code, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

#[test]
fn refused_outputs_are_parked_and_shown_by_the_dashboard_api() {
    if !common::model_shipped() {
        panic!("models/manifest.toml missing: the shipped model is needed");
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_pacs, pacs_port) = storescp(&tmp.path().join("ct-only-pacs"), true);
    let token = "parked-token-0123456789";
    let d = HttpDaemon::start(
        &tmp.path().join("d"),
        "",
        &format!(
            "token = \"{token}\"\n\n[outputs]\nkey_images = 1\n\n\
             [[outputs.dicom]]\nae_title = \"PACS\"\nhost = \"127.0.0.1\"\nport = {pacs_port}\n"
        ),
    );
    let src = tmp.path().join("severe");
    let truth = common::phantom(&src, 71, 24, "severe");
    let (ok, out) = common::storescu(d.dicom_port, "CT1", &[&src], true);
    assert!(ok, "storescu failed:\n{out}");
    let series = truth["series_instance_uid"].as_str().unwrap();

    // The series detail lists its outputs; wait until every one is settled.
    let deadline = Instant::now() + Duration::from_secs(180);
    let detail = loop {
        let (code, body) = get_auth(d.http_port, &format!("/api/series/{series}"), Some(token));
        if code == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let outs = v["dicom_outputs"].as_array().unwrap();
            if !outs.is_empty() && outs.iter().all(|o| o["state"] == "parked" || o["state"] == "delivered") {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "outputs never settled: {code} {body}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let outs = detail["dicom_outputs"].as_array().unwrap();
    let kinds: BTreeSet<&str> = outs.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains("seg") && kinds.contains("sr"), "{outs:#?}");
    for o in outs {
        assert_eq!(o["state"], "parked", "storescp negotiating CT only refuses every output: {o}");
        assert_eq!(o["attempts"], 1, "a refusal for good is not retried: {o}");
        assert_eq!(o["destination"], format!("PACS@127.0.0.1:{pacs_port}"));
        assert!(o["last_error"].as_str().unwrap().contains("presentation context"), "{o}");
    }
    let n = outs.len() as u64;

    // The list row counts them; /api/outputs has the total and each parked object; all behind the token.
    let (code, body) = get_auth(d.http_port, "/api/series", Some(token));
    assert_eq!(code, 200);
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let row = list.iter().find(|r| r["series_instance_uid"] == series).expect("series listed");
    assert_eq!(row["parked_outputs"], n, "{row}");
    assert_eq!(get_auth(d.http_port, "/api/outputs", None).0, 401);
    let (code, body) = get_auth(d.http_port, "/api/outputs", Some(token));
    assert_eq!(code, 200, "{body}");
    let o: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(o["counts"]["parked"], n, "{o}");
    assert_eq!(o["counts"]["pending"], 0, "{o}");
    let parked: BTreeSet<&str> =
        o["parked"].as_array().unwrap().iter().map(|p| p["sop_instance_uid"].as_str().unwrap()).collect();
    let expected: BTreeSet<&str> = outs.iter().map(|p| p["sop_instance_uid"].as_str().unwrap()).collect();
    assert_eq!(parked, expected);
    // And the metrics gauge agrees.
    let (_, metrics) = get_auth(d.http_port, "/metrics", Some(token));
    assert!(metrics.contains(&format!("lungsentry_dicom_outbox{{state=\"parked\"}} {n}")), "{metrics}");
}

/// Every file storescp wrote is a distinct SOP instance (no object stored twice).
fn assert_no_duplicates(dir: &Path) -> BTreeSet<String> {
    let uids = received_uids(dir);
    let set: BTreeSet<String> = uids.iter().cloned().collect();
    assert_eq!(set.len(), uids.len(), "an object was stored twice: {uids:?}");
    set
}

#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "needs --features test-hooks (the crash-injection hook; scripts/test runs it)"
)]
fn a_crash_between_result_and_outputs_is_repaired_at_restart() {
    if !common::model_shipped() {
        panic!("models/manifest.toml missing: the shipped model is needed");
    }
    let tmp = tempfile::tempdir().unwrap();
    let pacs_dir = tmp.path().join("pacs");
    let (_pacs, pacs_port) = storescp(&pacs_dir, false);
    let extra = format!(
        "[series]\nquiet_period_s = 0.5\n\n[outputs]\nkey_images = 2\n\n\
         [[outputs.dicom]]\nae_title = \"PACS\"\nhost = \"127.0.0.1\"\nport = {pacs_port}\n"
    );
    let dir = tmp.path().join("main");
    let crash = |point: &'static str| [("LUNGSENTRY_TEST_CRASH_AT", point)];
    let mut d = common::Daemon::start_env(&dir, &extra, &crash("after_result"));
    let mut delivered = BTreeSet::new();
    for (i, point) in ["after_result", "after_output_files"].into_iter().enumerate() {
        if i > 0 {
            d = d.restart_env(&crash(point));
        }
        let src = tmp.path().join(point);
        let truth = common::phantom(&src, 81 + i as u64, 24, "severe");
        let (ok, out) = common::storescu(d.port, "CT1", &[&src], true);
        assert!(ok, "storescu failed:\n{out}");
        let series = truth["series_instance_uid"].as_str().unwrap().to_string();
        // The daemon aborts at the crash point, after the result is committed.
        let st = d.wait_exit(Duration::from_secs(180));
        assert!(!st.success(), "{point}: the daemon should have aborted");
        let store = d.store();
        let result = store.latest_result(&series).unwrap().expect("result committed before the crash");
        assert_eq!(result.version, 1);
        assert!(store.dicom_outbox_of_series(&series).unwrap().is_empty(), "{point}: nothing queued before the crash");
        let awaiting: Vec<String> =
            store.results_awaiting_outputs().unwrap().into_iter().map(|r| r.series_instance_uid).collect();
        assert_eq!(awaiting, vec![series.clone()], "{point}: the result is marked as awaiting its outputs");
        if point == "after_output_files" {
            let files = std::fs::read_dir(dir.join("data/outputs").join(&series).join("v1")).unwrap().count();
            assert!(files >= 3, "{point}: the objects were written before the crash");
        }

        // Restart without the hook: the objects are made and sent, once.
        d = d.restart();
        let rows = wait_settled(&d, &series, 3, Duration::from_secs(180));
        assert!(rows.iter().all(|r| r.delivered && r.row.result_version == 1), "{point}: {rows:#?}");
        let kinds: BTreeSet<&str> = rows.iter().map(|r| r.row.kind.as_str()).collect();
        assert!(kinds.contains("seg") && kinds.contains("sr") && kinds.contains("key_images"), "{point}: {kinds:?}");
        assert_eq!(d.store().latest_result(&series).unwrap().unwrap().version, 1, "{point}: not re-analysed");
        assert!(d.store().results_awaiting_outputs().unwrap().is_empty());
        delivered.extend(rows.iter().map(|r| r.row.sop_instance_uid.clone()));
        assert_eq!(assert_no_duplicates(&pacs_dir), delivered, "{point}: the PACS has exactly the queued objects");
    }
    // One more restart: nothing is rebuilt, queued or sent again.
    let d = d.restart();
    std::thread::sleep(Duration::from_secs(3));
    assert!(d.store().results_awaiting_outputs().unwrap().is_empty());
    assert_eq!(assert_no_duplicates(&pacs_dir), delivered);
    assert_eq!(d.store().dicom_outbox_counts().unwrap().delivered as usize, delivered.len());
}
