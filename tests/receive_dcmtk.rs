//! The receiver (SCP) against real DCMTK peers (`echoscu`, `storescu`) and a few hand-made protocol
//! violations, on an ephemeral loopback port with an in-process consumer answering the events.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::pdu::{PDataValue, PDataValueType};
use dicom_ul::{ClientAssociationOptions, Pdu};
use lungsentry::config::{AllowedPeer, DicomConfig};
use lungsentry::receive::dimse::{command_pdv, CommandSet};
use lungsentry::receive::{self, status, ReceiveEvent, Tuning};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use common::real_dicom_files;

fn sop_instance_of(path: &Path) -> String {
    let obj = dicom_object::OpenFileOptions::new()
        .read_until(dicom_dictionary_std::tags::PIXEL_DATA)
        .open_file(path)
        .unwrap();
    obj.meta().media_storage_sop_instance_uid().to_string()
}

/// What the consumer saw of one instance.
#[derive(Debug, Clone)]
struct Seen {
    sop_class: String,
    sop_instance: String,
    transfer_syntax: String,
    /// SOP Instance UID read back from the dataset bytes (None = did not parse).
    parsed_instance: Option<String>,
    calling_ae: String,
}

/// A listener on an ephemeral port plus a consumer that answers with `reply` (0xFFFF = drop the reply).
struct Scp {
    port: u16,
    reply: Arc<AtomicU16>,
    /// Milliseconds the consumer waits before answering (an instance "in flight").
    delay_ms: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<Seen>>>,
    released: Arc<Mutex<Vec<(u64, bool)>>>,
    shutdown: watch::Sender<bool>,
    listener: JoinHandle<anyhow::Result<()>>,
}

const DROP_REPLY: u16 = 0xFFFF;

async fn start_scp(cfg: DicomConfig, tuning: Tuning) -> Scp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, mut rx) = mpsc::channel::<ReceiveEvent>(16);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let reply = Arc::new(AtomicU16::new(status::SUCCESS));
    let delay_ms = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let released = Arc::new(Mutex::new(Vec::new()));
    {
        let (reply, seen, released, delay_ms) = (reply.clone(), seen.clone(), released.clone(), delay_ms.clone());
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                match ev {
                    ReceiveEvent::Instance(inst, reply_tx) => {
                        let parsed_instance = TransferSyntaxRegistry.get(&inst.transfer_syntax_uid).and_then(|ts| {
                            InMemDicomObject::read_dataset_with_ts(&inst.dataset[..], ts).ok().and_then(|o| {
                                o.get(dicom_dictionary_std::tags::SOP_INSTANCE_UID)
                                    .and_then(|e| e.to_str().ok())
                                    .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
                            })
                        });
                        seen.lock().unwrap().push(Seen {
                            sop_class: inst.sop_class_uid.clone(),
                            sop_instance: inst.sop_instance_uid.clone(),
                            transfer_syntax: inst.transfer_syntax_uid.clone(),
                            parsed_instance,
                            calling_ae: inst.calling_ae.clone(),
                        });
                        let code = reply.load(Ordering::SeqCst);
                        let delay = Duration::from_millis(delay_ms.load(Ordering::SeqCst));
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            if code != DROP_REPLY {
                                let _ = reply_tx.send(code.into());
                            }
                        });
                    }
                    ReceiveEvent::Released { association, aborted } => {
                        released.lock().unwrap().push((association, aborted))
                    }
                    ReceiveEvent::Opened { .. } => {}
                }
            }
        });
    }
    let listener = tokio::spawn(receive::run_with(cfg, listener, tx, shutdown_rx, tuning));
    Scp { port, reply, delay_ms, seen, released, shutdown, listener }
}

fn cfg() -> DicomConfig {
    DicomConfig { association_idle_timeout_s: 10, ..DicomConfig::default() }
}

async fn dcmtk(program: &str, args: &[&str], env_nodelay: bool) -> Output {
    let mut cmd = tokio::process::Command::new(format!("/usr/bin/{program}"));
    cmd.args(args);
    if env_nodelay {
        cmd.env("TCP_NODELAY", "1");
    } else {
        cmd.env_remove("TCP_NODELAY");
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output()).await.expect("DCMTK tool hung").unwrap();
    out
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

async fn stop(scp: Scp) {
    scp.shutdown.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(15), scp.listener).await.expect("listener did not stop").unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoscu_succeeds_and_wrong_called_ae_is_rejected() {
    let scp = start_scp(cfg(), Tuning::default()).await;
    let port = scp.port.to_string();
    let ok = dcmtk("echoscu", &["-aec", "LUNGSENTRY", "-aet", "ECHOER", "127.0.0.1", &port], false).await;
    assert!(ok.status.success(), "echoscu failed: {}", text(&ok));
    let bad = dcmtk("echoscu", &["-aec", "SOMEONE-ELSE", "127.0.0.1", &port], false).await;
    assert!(!bad.status.success(), "wrong called AE accepted: {}", text(&bad));
    assert!(text(&bad).to_lowercase().contains("reject"), "{}", text(&bad));
    // released event for the successful echo association, not for the rejected one
    tokio::time::sleep(Duration::from_millis(200)).await;
    let released = scp.released.lock().unwrap().clone();
    assert_eq!(released.len(), 1, "{released:?}");
    assert!(!released[0].1, "echo association should be released, not aborted");
    stop(scp).await;
}

/// Copies of the real files that DCMTK's storescu can send: the Siemens JPEG 2000 files carry their SOP
/// class/instance UIDs only in the meta group (storescu reads them from the dataset), so the copies get them
/// written into the dataset with `dcmodify`; the other files are used in place.
fn storescu_ready_files(tmp: &Path) -> Vec<PathBuf> {
    real_dicom_files().into_iter().map(|f| common::dcmtk_sendable_copy(&f, tmp).unwrap_or(f)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storescu_real_data_arrives_intact() {
    let scp = start_scp(cfg(), Tuning::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let files = storescu_ready_files(tmp.path());
    let port = scp.port.to_string();
    // -xv: JPEG 2000 lossless and the uncompressed syntaxes, one presentation context each
    let mut args = vec!["-aec", "LUNGSENTRY", "-aet", "CT1", "-xv", "127.0.0.1", &port];
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    args.extend(names.iter().map(String::as_str));
    let out = dcmtk("storescu", &args, true).await;
    assert!(out.status.success(), "storescu failed: {}", text(&out));

    let seen = scp.seen.lock().unwrap().clone();
    let expected: BTreeSet<String> = files.iter().map(|p| sop_instance_of(p)).collect();
    let got: BTreeSet<String> = seen.iter().map(|s| s.sop_instance.clone()).collect();
    assert_eq!(seen.len(), files.len());
    assert_eq!(got, expected);
    for s in &seen {
        assert_eq!(s.parsed_instance.as_deref(), Some(s.sop_instance.as_str()), "dataset did not parse back: {s:?}");
        assert_eq!(s.sop_class, "1.2.840.10008.5.1.4.1.1.2");
        assert_eq!(s.calling_ae, "CT1");
    }
    // the JPEG 2000 series travelled as stored (no decompression on the way), the rest as explicit LE
    let j2k = seen.iter().filter(|s| s.transfer_syntax == "1.2.840.10008.1.2.4.90").count();
    assert_eq!(j2k, 20, "{:?}", seen.iter().map(|s| &s.transfer_syntax).collect::<Vec<_>>());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(scp.released.lock().unwrap().iter().filter(|r| !r.1).count(), 1);

    // RLE and JPEG lossless (SV1) copies made by DCMTK arrive in those syntaxes
    let src = &real_dicom_files()[0];
    let rle = tmp.path().join("rle.dcm");
    let jpl = tmp.path().join("jpeg-lossless.dcm");
    assert!(std::process::Command::new("/usr/bin/dcmcrle").arg(src).arg(&rle).status().unwrap().success());
    assert!(std::process::Command::new("/usr/bin/dcmcjpeg").arg(src).arg(&jpl).status().unwrap().success());
    for (file, option, ts) in [(&rle, "-xr", "1.2.840.10008.1.2.5"), (&jpl, "-xs", "1.2.840.10008.1.2.4.70")] {
        let name = file.display().to_string();
        let out = dcmtk("storescu", &["-aec", "LUNGSENTRY", option, "127.0.0.1", &port, &name], true).await;
        assert!(out.status.success(), "storescu {option} failed: {}", text(&out));
        let last = scp.seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(last.transfer_syntax, ts);
        assert_eq!(last.parsed_instance.as_deref(), Some(last.sop_instance.as_str()));
    }
    stop(scp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_rejects_unknown_calling_ae() {
    let mut c = cfg();
    c.allowed_peers = vec![AllowedPeer { ae_title: "CT1".into(), host: "127.0.0.1".into() }];
    let scp = start_scp(c, Tuning::default()).await;
    let port = scp.port.to_string();
    let file = real_dicom_files()[0].display().to_string();
    let denied = dcmtk("storescu", &["-aec", "LUNGSENTRY", "-aet", "X", "127.0.0.1", &port, &file], true).await;
    assert!(!denied.status.success(), "unknown calling AE accepted: {}", text(&denied));
    assert!(text(&denied).to_lowercase().contains("reject"), "{}", text(&denied));
    assert!(scp.seen.lock().unwrap().is_empty());
    let allowed = dcmtk("storescu", &["-aec", "LUNGSENTRY", "-aet", "CT1", "127.0.0.1", &port, &file], true).await;
    assert!(allowed.status.success(), "{}", text(&allowed));
    assert_eq!(scp.seen.lock().unwrap().len(), 1);
    stop(scp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_status_reaches_storescu_and_next_association_is_served() {
    let scp = start_scp(cfg(), Tuning::default()).await;
    let port = scp.port.to_string();
    let file = real_dicom_files()[0].display().to_string();

    scp.reply.store(status::OUT_OF_RESOURCES, Ordering::SeqCst);
    let refused = dcmtk("storescu", &["-v", "-aec", "LUNGSENTRY", "127.0.0.1", &port, &file], true).await;
    let t = text(&refused);
    println!("{t}");
    assert!(!refused.status.success(), "storescu exited 0 on a refused store: {t}");
    assert!(t.contains("0xa700") || t.contains("Refused: OutOfResources"), "status not reported: {t}");

    // a dropped reply is never success
    scp.reply.store(DROP_REPLY, Ordering::SeqCst);
    let dropped = dcmtk("storescu", &["-v", "-aec", "LUNGSENTRY", "127.0.0.1", &port, &file], true).await;
    let t = text(&dropped);
    assert!(!dropped.status.success(), "dropped reply reported as stored: {t}");
    assert!(t.contains("0xa700") || t.contains("Refused: OutOfResources"), "dropped reply not refused: {t}");

    scp.reply.store(status::SUCCESS, Ordering::SeqCst);
    let ok = dcmtk("storescu", &["-v", "-aec", "LUNGSENTRY", "127.0.0.1", &port, &file], true).await;
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(text(&ok).contains("Success"), "{}", text(&ok));
    assert_eq!(scp.seen.lock().unwrap().len(), 3);
    stop(scp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_instance_in_flight() {
    let scp = start_scp(cfg(), Tuning::default()).await;
    scp.delay_ms.store(1500, Ordering::SeqCst);
    let port = scp.port.to_string();
    let files: Vec<String> = real_dicom_files()[..3].iter().map(|p| p.display().to_string()).collect();
    let mut args = vec!["-v", "-aec", "LUNGSENTRY", "127.0.0.1", &port];
    args.extend(files.iter().map(String::as_str));
    let storescu = {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::spawn(async move {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            dcmtk("storescu", &a, true).await
        })
    };
    // wait until the first instance is with the consumer (its reply delayed), then stop the daemon
    let deadline = Instant::now() + Duration::from_secs(20);
    while scp.seen.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "first instance never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t = Instant::now();
    let (seen, released) = (scp.seen.clone(), scp.released.clone());
    stop(scp).await;
    assert!(t.elapsed() >= Duration::from_millis(1000), "listener returned before the reply: {:?}", t.elapsed());
    let out = storescu.await.unwrap();
    let t = text(&out);
    assert!(t.contains("Status Success") || t.contains("Success"), "in-flight instance not answered with success: {t}");
    assert!(!out.status.success(), "storescu should see the abort of the rest: {t}");
    assert_eq!(seen.lock().unwrap().len(), 1, "no new instance may be taken after shutdown");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(released.lock().unwrap().as_slice().iter().map(|r| r.1).collect::<Vec<_>>(), vec![true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_associations_bounds_concurrent_peers() {
    let mut c = cfg();
    c.max_associations = 1;
    let scp = start_scp(c, Tuning::default()).await;
    let holder = raw_client(scp.port, "1.2.840.10008.1.1").await;
    let port = scp.port.to_string();
    let echo = tokio::spawn(async move { dcmtk("echoscu", &["-aec", "LUNGSENTRY", "127.0.0.1", &port], true).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!echo.is_finished(), "a second association was served beyond max_associations = 1");
    holder.release().await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), echo).await.expect("waiting peer never served").unwrap();
    assert!(out.status.success(), "{}", text(&out));
    stop(scp).await;
}

/// Establishes an association with our own client (for protocol cases DCMTK will not produce).
async fn raw_client(
    port: u16,
    abstract_syntax: &str,
) -> dicom_ul::association::client::AsyncClientAssociation<tokio::net::TcpStream> {
    ClientAssociationOptions::new()
        .calling_ae_title("RAW")
        .called_ae_title("LUNGSENTRY")
        .with_presentation_context(abstract_syntax, vec!["1.2.840.10008.1.2"])
        .establish_async(format!("127.0.0.1:{port}"))
        .await
        .unwrap()
}

async fn response(assoc: &mut dicom_ul::association::client::AsyncClientAssociation<tokio::net::TcpStream>) -> Pdu {
    tokio::time::timeout(Duration::from_secs(10), assoc.receive()).await.expect("no answer").unwrap()
}

fn command_of(pdu: Pdu) -> CommandSet {
    match pdu {
        Pdu::PData { data } => CommandSet::decode(&data[0].data).unwrap(),
        other => panic!("expected P-DATA, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_command_oversize_and_bad_command_set() {
    let mut c = cfg();
    c.max_message_mb = 1;
    let scp = start_scp(c, Tuning::default()).await;

    // unknown DIMSE command (C-FIND-RQ on Verification) → 0x0211 response, association still usable
    let mut a = raw_client(scp.port, "1.2.840.10008.1.1").await;
    let pc = a.presentation_contexts()[0].id;
    let find = CommandSet {
        command_field: 0x0020,
        message_id: Some(9),
        affected_sop_class_uid: Some("1.2.840.10008.1.1".into()),
        ..Default::default()
    };
    a.send(&Pdu::PData { data: vec![command_pdv(pc, find.encode().unwrap())] }).await.unwrap();
    let rsp = command_of(response(&mut a).await);
    assert_eq!(rsp.command_field, 0x8020);
    assert_eq!(rsp.status, Some(status::UNRECOGNIZED_OPERATION));
    assert_eq!(rsp.message_id_being_responded_to, Some(9));
    a.send(&Pdu::PData { data: vec![command_pdv(pc, CommandSet::echo_rq(10).encode().unwrap())] }).await.unwrap();
    assert_eq!(command_of(response(&mut a).await).status, Some(status::SUCCESS));
    a.release().await.unwrap();

    // a C-STORE over the 1 MiB cap → 0xA700 with UIDs echoed, then the same association stores a small one
    let ct = "1.2.840.10008.5.1.4.1.1.2";
    let mut a = raw_client(scp.port, ct).await;
    let pc = a.presentation_contexts()[0].id;
    let big = CommandSet::store_rq(1, ct, "1.2.3.4.5");
    a.send(&Pdu::PData { data: vec![command_pdv(pc, big.encode().unwrap())] }).await.unwrap();
    let chunk = 16_000;
    let total = 1_300_000;
    let mut sent = 0;
    while sent < total {
        let n = chunk.min(total - sent);
        sent += n;
        a.send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Data,
                is_last: sent == total,
                data: vec![0; n],
            }],
        })
        .await
        .unwrap();
    }
    let rsp = command_of(response(&mut a).await);
    assert_eq!(rsp.status, Some(status::OUT_OF_RESOURCES));
    assert_eq!(rsp.command_field, 0x8001);
    assert_eq!(rsp.message_id_being_responded_to, Some(1));
    assert_eq!(rsp.affected_sop_instance_uid.as_deref(), Some("1.2.3.4.5"));
    assert_eq!(rsp.affected_sop_class_uid.as_deref(), Some(ct));
    assert!(scp.seen.lock().unwrap().is_empty(), "oversize message must not reach the consumer");
    let small = CommandSet::store_rq(2, ct, "1.2.3.4.6");
    let mut dataset = Vec::new();
    let obj = InMemDicomObject::from_element_iter([dicom_core::DataElement::new(
        dicom_dictionary_std::tags::SOP_INSTANCE_UID,
        dicom_core::VR::UI,
        dicom_core::PrimitiveValue::from("1.2.3.4.6\0"),
    )]);
    obj.write_dataset_with_ts(
        &mut dataset,
        &dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased(),
    )
    .unwrap();
    a.send(&Pdu::PData { data: vec![command_pdv(pc, small.encode().unwrap())] }).await.unwrap();
    a.send(&Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: pc,
            value_type: PDataValueType::Data,
            is_last: true,
            data: dataset,
        }],
    })
    .await
    .unwrap();
    let rsp = command_of(response(&mut a).await);
    assert_eq!(rsp.status, Some(status::SUCCESS));
    assert_eq!(scp.seen.lock().unwrap()[0].parsed_instance.as_deref(), Some("1.2.3.4.6"));
    a.release().await.unwrap();

    // garbage command set → A-ABORT for that association; the daemon keeps serving others
    let mut a = raw_client(scp.port, "1.2.840.10008.1.1").await;
    let pc = a.presentation_contexts()[0].id;
    a.send(&Pdu::PData { data: vec![command_pdv(pc, vec![0xde, 0xad, 0xbe, 0xef, 1, 2])] }).await.unwrap();
    assert!(matches!(response(&mut a).await, Pdu::AbortRQ { .. }));
    let ok = dcmtk("echoscu", &["-aec", "LUNGSENTRY", "127.0.0.1", &scp.port.to_string()], true).await;
    assert!(ok.status.success(), "{}", text(&ok));
    stop(scp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_aborts_silent_peers() {
    let mut c = cfg();
    c.association_idle_timeout_s = 1;
    let scp = start_scp(c, Tuning::default()).await;

    // connects and never sends the A-ASSOCIATE-RQ
    let t = Instant::now();
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", scp.port)).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut got))
        .await
        .expect("silent peer not dropped")
        .unwrap();
    assert!(t.elapsed() >= Duration::from_millis(900), "{:?}", t.elapsed());
    assert_eq!(got.first(), Some(&0x07), "expected an A-ABORT PDU, got {got:?}");

    // associates, then goes quiet
    let mut a = raw_client(scp.port, "1.2.840.10008.1.1").await;
    let t = Instant::now();
    assert!(matches!(response(&mut a).await, Pdu::AbortRQ { .. }));
    assert!(t.elapsed() >= Duration::from_millis(900) && t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(scp.released.lock().unwrap().last().map(|r| r.1), Some(true), "idle association must end as aborted");
    stop(scp).await;
}

/// Timing of storescu pushing ~120 real images with Nagle on (DCMTK's default) and off (TCP_NODELAY=1),
/// against the receiver with and without TCP_QUICKACK. Prints the figures; asserts that every run stored
/// everything and that quick ACKs keep a Nagle sender out of the 40 ms delayed-ACK stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timing_nagle_sender_vs_quickack() {
    let tmp = tempfile::tempdir().unwrap();
    let files: Vec<String> = storescu_ready_files(tmp.path()).iter().map(|p| p.display().to_string()).collect();
    let mut list = Vec::new();
    for _ in 0..3 {
        list.extend(files.iter().cloned());
    }
    let mut results = Vec::new();
    for quickack in [false, true] {
        for nodelay in [false, true] {
            let scp = start_scp(cfg(), Tuning { tcp_quickack: quickack, ..Tuning::default() }).await;
            let port = scp.port.to_string();
            let mut args = vec!["-aec", "LUNGSENTRY", "-xv", "127.0.0.1", &port];
            args.extend(list.iter().map(String::as_str));
            let t = Instant::now();
            let out = dcmtk("storescu", &args, nodelay).await;
            let secs = t.elapsed().as_secs_f64();
            assert!(out.status.success(), "{}", text(&out));
            assert_eq!(scp.seen.lock().unwrap().len(), list.len());
            println!(
                "storescu {} images, sender TCP_NODELAY={} receiver quickack={}: {:.2} s, {:.1} ms/image",
                list.len(),
                nodelay as u8,
                quickack,
                secs,
                secs * 1e3 / list.len() as f64
            );
            results.push((quickack, nodelay, secs / list.len() as f64));
            stop(scp).await;
        }
    }
    // Measured on the dev box (Linux loopback, DCMTK 3.6.7): 26.6 ms/image Nagle without quickack (the 40 ms
    // delayed-ACK stall on most images), 2.3 ms/image Nagle with quickack, 2.4-3.0 ms/image with TCP_NODELAY=1.
    let per_image =
        |quickack: bool, nodelay: bool| results.iter().find(|r| r.0 == quickack && r.1 == nodelay).unwrap().2;
    let (with, without) = (per_image(true, false), per_image(false, false));
    assert!(
        with < 0.015 && with < 0.6 * without,
        "Nagle sender still stalls with quickack: {:.1} ms/image (without quickack {:.1})",
        with * 1e3,
        without * 1e3
    );
}
