//! Security properties of a running `lungsentry serve`: the allow-list checks the calling AE title *and* the
//! peer IP; no PatientName / PatientID / AccessionNumber leaves the local store (a phantom carrying marker values
//! goes through DCMTK storescu and every byte the daemon emitted — log, webhook bodies and headers, stored result
//! JSON — is searched); the data dir and everything under it is private (dirs 0700, files 0600).

mod common;
mod corpus;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::*;
use dicom_ul::Pdu;

/// An A-ASSOCIATE-RQ from `source` (a loopback address) calling as `calling_ae`: true if accepted.
fn associate_from(source: &str, port: u16, calling_ae: &str) -> bool {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&format!("{source}:0").parse::<SocketAddr>().unwrap().into()).unwrap();
    sock.connect(&format!("127.0.0.1:{port}").parse::<SocketAddr>().unwrap().into()).unwrap();
    let mut s: TcpStream = sock.into();
    let mut rq = corpus::assoc_rq("LUNGSENTRY", &[(corpus::VERIFICATION.into(), vec![corpus::IMPLICIT.into()])]);
    rq.calling_ae_title = calling_ae.into();
    s.write_all(&corpus::pdu_bytes(&Pdu::AssociationRQ(rq))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    assert!(n > 0, "no answer to the A-ASSOCIATE-RQ");
    match buf[0] {
        0x02 => {
            let _ = s.write_all(&corpus::pdu_bytes(&Pdu::ReleaseRQ));
            true
        }
        0x03 => false,
        other => panic!("unexpected PDU type {other:#04x}"),
    }
}

#[test]
fn allow_list_needs_both_calling_ae_and_peer_ip() {
    if !model_shipped() {
        eprintln!("SKIP: models/manifest.toml is not shipped yet");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ph = tmp.path().join("ph");
    phantom(&ph, 50_001, 2, "none");
    let d = Daemon::start(
        &tmp.path().join("d"),
        "[[dicom.allowed_peers]]\nae_title = \"CT1\"\nhost = \"127.0.0.1\"\n\n[[dicom.allowed_peers]]\nae_title = \"CT2\"\nhost = \"127.0.0.3\"\n",
    );
    assert!(associate_from("127.0.0.1", d.port, "CT1"), "listed AE from its listed host must be accepted");
    assert!(!associate_from("127.0.0.2", d.port, "CT1"), "listed AE from another host must be rejected");
    assert!(!associate_from("127.0.0.1", d.port, "CT2"), "AE listed for another host must be rejected");
    assert!(associate_from("127.0.0.3", d.port, "CT2"), "second entry must be accepted from its host");
    assert!(!associate_from("127.0.0.1", d.port, "INTRUDER"), "unlisted AE must be rejected");

    let (ok, out) = storescu(d.port, "INTRUDER", &[&ph], true);
    assert!(!ok && !out.contains("Store Response"), "storescu as INTRUDER must be rejected:\n{out}");
    assert!(out.contains("Association Rejected"), "{out}");
    let (ok, out) = storescu(d.port, "CT1", &[&ph], true);
    assert!(ok, "{out}");
    let db = rusqlite::Connection::open(d.dir.join("data/lungsentry.sqlite")).unwrap();
    let n: i64 = db.query_row("SELECT COUNT(*) FROM instances", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 2, "only the allowed sender's instances are stored");
    let log = d.log();
    assert!(log.contains("association rejected") && log.contains("127.0.0.2"), "rejections are logged with the peer");
}

const NAME: &str = "ZQMARKERNAME^ZQGIVEN";
const PID: &str = "ZQMARKERID4711";
const ACC: &str = "ZQMARKERACC99";

#[test]
fn no_patient_identifier_leaves_the_store_and_data_dir_is_private() {
    if !model_shipped() {
        eprintln!("SKIP: models/manifest.toml is not shipped yet");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ph = tmp.path().join("ph");
    let truth = phantom(&ph, 50_002, 24, "severe");
    let series_uid = truth["series_instance_uid"].as_str().unwrap().to_string();
    // Marker identifiers written into every file by DCMTK's dcmodify.
    let mut cmd = Command::new("dcmodify");
    cmd.args(["-nb", "-ma", &format!("(0010,0010)={NAME}"), "-ma", &format!("(0010,0020)={PID}")]);
    cmd.args(["-ma", &format!("(0008,0050)={ACC}")]);
    for e in std::fs::read_dir(&ph).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "dcm") {
            cmd.arg(p);
        }
    }
    assert!(cmd.status().unwrap().success(), "dcmodify failed");

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (hook, got) = webhook_receiver(&rt);
    let d = Daemon::start(
        &tmp.path().join("d"),
        &format!("[series]\nquiet_period_s = 0.5\n\n[alerts]\nwebhook_url = \"http://{hook}/alert\"\nwebhook_secret = \"k\"\n"),
    );
    let (ok, out) = storescu(d.port, "CT1", &[&ph], true);
    assert!(ok, "{out}");
    let r = d.wait_result(&series_uid, 1, Duration::from_secs(300));
    assert!(r.positive, "the severe phantom must be flagged for the webhook check to mean anything: {}", r.result);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while got.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no webhook");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The markers reached the daemon: they are in the local store's patients table (and the DICOM files).
    let db = rusqlite::Connection::open(d.dir.join("data/lungsentry.sqlite")).unwrap();
    let (pid, name): (String, String) =
        db.query_row("SELECT patient_id, patient_name FROM patients", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert_eq!((pid.as_str(), name.as_str()), (PID, NAME));

    // Nothing emitted carries them (nor their parts).
    let mut emitted = vec![("daemon log".to_string(), d.log())];
    for (key, sig, body) in got.lock().unwrap().iter() {
        emitted.push(("webhook".into(), format!("{key}\n{sig}\n{body}")));
    }
    let results: Vec<String> = db
        .prepare("SELECT result_json FROM results")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    emitted.push(("stored result JSON".into(), results.join("\n")));
    let outbox: Vec<String> = db
        .prepare("SELECT payload_json FROM outbox")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    emitted.push(("outbox payloads".into(), outbox.join("\n")));
    for (what, text) in &emitted {
        assert!(!text.is_empty() || what == "daemon log", "{what} is empty");
        for marker in [PID, ACC, "ZQMARKERNAME", "ZQGIVEN", "ZQMARKER"] {
            assert!(!text.to_uppercase().contains(marker), "{marker} found in {what}");
        }
    }

    // Private data dir: directories 0700, files 0600 (spool, SQLite and its WAL/SHM, salt).
    let mut checked = 0;
    let mut stack = vec![d.dir.join("data")];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{} has mode {mode:o}", p.display());
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else {
            assert_eq!(mode, 0o600, "{} has mode {mode:o}", p.display());
        }
        checked += 1;
    }
    assert!(checked > 24, "only {checked} paths checked");
}
