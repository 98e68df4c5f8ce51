//! The sender (`lungsentry send` / `echo` library functions) against DCMTK's `storescp`.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lungsentry::scu::{echo_peer, send_files, Peer, SendOptions};

use common::{data_dir, files_under};

fn meta_uid(path: &Path) -> String {
    let obj = dicom_object::OpenFileOptions::new()
        .read_until(dicom_dictionary_std::tags::PIXEL_DATA)
        .open_file(path)
        .unwrap();
    obj.meta().media_storage_sop_instance_uid().to_string()
}

/// A DCMTK storescp in a temp dir on a free port, killed on drop.
struct StoreScp {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for StoreScp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port not handed out before in this process (tests run in parallel; the kernel may hand the same
/// ephemeral port to two `bind(0)` calls once the first listener is closed).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// `extra` are storescp options (e.g. `+xa` to accept every transfer syntax it knows).
fn start_storescp(extra: &[&str]) -> StoreScp {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new("/usr/bin/storescp")
        .args(["-aet", "STORESCP", "-od"])
        .arg(dir.path())
        .args(extra)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Ready when a real C-ECHO association succeeds: a bare TCP probe that connects and hangs up leaves storescp
    // (one association at a time) tearing down an aborted association, and a connection made then can be reset.
    let deadline = Instant::now() + Duration::from_secs(10);
    let echo_ok = || {
        Command::new("/usr/bin/echoscu")
            .args(["-aec", "STORESCP", "127.0.0.1", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    while !echo_ok() {
        assert!(Instant::now() < deadline, "storescp did not answer C-ECHO");
        assert!(child.try_wait().unwrap().is_none(), "storescp exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    StoreScp { child, port, dir }
}

fn peer(port: u16) -> Peer {
    Peer {
        host: "127.0.0.1".into(),
        port,
        called_ae: "STORESCP".into(),
        calling_ae: "LUNGSENTRY-SCU".into(),
        timeout: Duration::from_secs(30),
    }
}

/// The real files, with copies of the Siemens JPEG 2000 ones whose dataset lacks SOP Class/Instance UID
/// (only their meta group has them; storescp checks the dataset and answers 0xA900): the copies get the
/// meta group's UIDs written into the dataset with `dcmodify`.
fn complete_copies(tmp: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut ready = Vec::new();
    let mut incomplete = Vec::new();
    for f in common::real_dicom_files() {
        match common::dcmtk_sendable_copy(&f, tmp) {
            Some(copy) => {
                ready.push(copy);
                incomplete.push(f);
            }
            None => ready.push(f),
        }
    }
    (ready, incomplete)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_real_data_to_storescp() {
    let scp = start_storescp(&["+xa"]);
    let tmp = tempfile::tempdir().unwrap();
    let (ready, incomplete) = complete_copies(tmp.path());
    assert_eq!(incomplete.len(), 20);
    let opts = SendOptions { peer: peer(scp.port), rate: None };
    // the copies go as a folder (walked), the untouched originals as files
    let mut inputs: Vec<PathBuf> = ready.iter().filter(|p| !p.starts_with(tmp.path())).cloned().collect();
    inputs.push(tmp.path().to_path_buf());
    let report = send_files(&opts, &inputs).await.unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.sent.len(), ready.len());

    let expected: BTreeSet<String> = ready.iter().map(|p| meta_uid(p)).collect();
    let reported: BTreeSet<String> = report.sent.iter().map(|s| s.sop_instance_uid.clone()).collect();
    assert_eq!(reported, expected);
    // what storescp wrote: same instances, and the JPEG 2000 files kept their transfer syntax
    let received = files_under(scp.dir.path());
    let got: BTreeSet<String> = received.iter().map(|p| meta_uid(p)).collect();
    assert_eq!(got, expected);
    let j2k = received
        .iter()
        .filter(|p| {
            let o = dicom_object::OpenFileOptions::new()
                .read_until(dicom_dictionary_std::tags::PIXEL_DATA)
                .open_file(p)
                .unwrap();
            o.meta().transfer_syntax() == "1.2.840.10008.1.2.4.90"
        })
        .count();
    assert_eq!(j2k, 20);

    // an original whose dataset lacks its UIDs: storescp refuses it, and the report says with which status
    let report = send_files(&opts, &incomplete[..1]).await.unwrap();
    assert!(report.sent.is_empty());
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].status, Some(0xA900), "{:?}", report.failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_file_fails_cleanly_when_peer_wants_uncompressed_and_native_is_reencoded() {
    // storescp without options accepts only the uncompressed syntaxes; -xi: implicit VR LE only
    let scp = start_storescp(&["+xi"]);
    let real = data_dir().join("real-dicom");
    let j2k = files_under(&real.join("siemens-abdomen-j2k-series")).into_iter().min().unwrap();
    let explicit = real.join("lidc-idri-2-slices/0.dcm");
    let opts = SendOptions { peer: peer(scp.port), rate: None };
    let report = send_files(&opts, &[j2k.clone(), explicit.clone()]).await.unwrap();
    assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
    assert_eq!(report.failed[0].path, j2k);
    assert!(report.failed[0].reason.contains("presentation context"), "{}", report.failed[0].reason);
    assert_eq!(report.sent.len(), 1);
    let received = files_under(scp.dir.path());
    assert_eq!(received.len(), 1);
    let o = dicom_object::open_file(&received[0]).unwrap();
    assert_eq!(o.meta().transfer_syntax(), "1.2.840.10008.1.2", "explicit file should arrive re-encoded as implicit");
    assert_eq!(o.meta().media_storage_sop_instance_uid(), meta_uid(&explicit));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_and_paced_send() {
    let scp = start_storescp(&[]);
    echo_peer(&peer(scp.port)).await.unwrap();
    let mut wrong = peer(scp.port);
    wrong.port = free_port();
    assert!(echo_peer(&wrong).await.is_err(), "echo to a closed port must fail");

    // 5 images at 10 images/s: the 5th leaves 0.4 s after the first
    let dir = data_dir().join("real-dicom/covid19-ny-sbu-axial");
    let mut files = files_under(&dir);
    files.sort();
    files.truncate(5);
    let opts = SendOptions { peer: peer(scp.port), rate: Some(10.0) };
    let report = send_files(&opts, &files).await.unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.sent.len(), 5);
    assert!(report.elapsed >= Duration::from_millis(390), "{:?}", report.elapsed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_dicom_named_directly_fails_and_cli_exits_non_zero() {
    let scp = start_storescp(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("notes.txt");
    std::fs::write(&junk, "not a DICOM file").unwrap();
    let report =
        send_files(&SendOptions { peer: peer(scp.port), rate: None }, std::slice::from_ref(&junk)).await.unwrap();
    assert_eq!(report.failed.len(), 1);
    assert!(report.sent.is_empty());
    // inside a folder it is skipped, not failed
    let report =
        send_files(&SendOptions { peer: peer(scp.port), rate: None }, &[tmp.path().to_path_buf()]).await.unwrap();
    assert!(report.failed.is_empty());
    assert_eq!(report.skipped.len(), 1);

    // the binary: one FAILED line, a summary, non-zero exit
    let bin = env!("CARGO_BIN_EXE_lungsentry");
    let good = data_dir().join("real-dicom/lidc-idri-2-slices/0.dcm");
    let out = tokio::process::Command::new(bin)
        .args(["send", "--host", "127.0.0.1", "--port", &scp.port.to_string(), "--called-ae", "STORESCP"])
        .arg(&good)
        .arg(&junk)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stderr.contains("FAILED") && stderr.contains("notes.txt"), "{stderr}");
    assert!(stdout.contains("sent 1 of 2"), "{stdout}");
}
