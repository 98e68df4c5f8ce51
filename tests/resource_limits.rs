//! Resource limits of a real `lungsentry serve` (issue 21): the memory budget shared by every association
//! (`dicom.max_buffered_mb`) under peers that all send a maximum-size message at once, and the cap on dashboard
//! live-view clients (`http.max_sse_clients`) with the live view still pushing a new result.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use dicom_ul::pdu::PDataValueType;
use dicom_ul::{ClientAssociationOptions, Pdu};
use lungsentry::receive::dimse::{command_pdv, CommandSet, MessageAssembler};

/// `dicom.max_message_mb` of the memory test: every peer sends a message of (almost) this size.
const MAX_MESSAGE_MB: u64 = 40;
/// `dicom.max_buffered_mb` of the memory test: room for one maximum-size message and the spool's copy of it.
const BUDGET_MB: u64 = 96;
/// What the daemon may use above its idle high-water mark besides the budget: per-association PDU and read
/// buffers (16 × ~0.5 MiB), the runtime's and allocator's slack, the series bookkeeping of what was stored.
/// Documented in docs/RELIABILITY.md ("Memory budget").
const MARGIN_MB: u64 = 64;
/// Associations sending at once (the default `dicom.max_associations`).
const PEERS: usize = 16;

/// Peak resident set (VmHWM) of a process, MiB.
fn vm_hwm_mb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb / 1024
}

/// A Raw Data instance whose private OB element makes the Explicit VR LE dataset `size` bytes, split around that
/// element's value: (bytes before the value, value length, bytes after). The SOP Instance UID is `sop` (all the
/// same length, so every peer's prefix is equally long).
fn raw_data_parts(sop: &str, series: &str, size: usize) -> (Vec<u8>, usize, Vec<u8>) {
    let build = |value_len: usize| {
        let mut obj = InMemDicomObject::new_empty();
        let mut put = |tag: Tag, vr: VR, v: &str| obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
        put(tags::SOP_CLASS_UID, VR::UI, uids::RAW_DATA_STORAGE);
        put(tags::SOP_INSTANCE_UID, VR::UI, sop);
        put(tags::STUDY_INSTANCE_UID, VR::UI, "1.2.826.0.1.3680043.10.1021.1");
        put(tags::SERIES_INSTANCE_UID, VR::UI, series);
        put(tags::MODALITY, VR::CS, "OT");
        put(tags::PATIENT_ID, VR::LO, "BIGMSG");
        put(tags::PATIENT_NAME, VR::PN, "Budget^Test");
        obj.put(DataElement::new(Tag(0x0009, 0x0010), VR::LO, PrimitiveValue::from("LUNGSENTRY TEST ")));
        obj.put(DataElement::new(Tag(0x0009, 0x1010), VR::OB, PrimitiveValue::from(vec![0u8; value_len])));
        let mut out = Vec::new();
        obj.write_dataset_with_ts(
            &mut out,
            &dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .unwrap();
        out
    };
    let small = build(2);
    let value_len = (size - small.len() + 2) & !1;
    // The OB header: tag (0009,1010), "OB", 2 reserved bytes, 4-byte length; the value follows it.
    let header = [0x09u8, 0x00, 0x10, 0x10, b'O', b'B', 0, 0];
    let at = small.windows(8).position(|w| w == header).expect("OB element header") + 12;
    let mut prefix = small[..at].to_vec();
    prefix[at - 4..at].copy_from_slice(&(value_len as u32).to_le_bytes());
    let suffix = small[at + 2..].to_vec();
    (prefix, value_len, suffix)
}

/// One peer: associates, sends one C-STORE of `prefix` + `value_len` zero bytes + `suffix`, returns its status.
async fn send_big(port: u16, sop: String, prefix: Vec<u8>, value_len: usize, suffix: Vec<u8>) -> Result<u16, String> {
    let mut assoc = ClientAssociationOptions::new()
        .calling_ae_title("CT1")
        .called_ae_title("LUNGSENTRY")
        .with_presentation_context(uids::RAW_DATA_STORAGE, vec![uids::EXPLICIT_VR_LITTLE_ENDIAN])
        .max_pdu_length(131_072 - 6)
        .read_timeout(Duration::from_secs(120))
        .write_timeout(Duration::from_secs(120))
        .establish_async(format!("127.0.0.1:{port}").as_str())
        .await
        .map_err(|e| format!("associate: {e}"))?;
    let pc = assoc.presentation_contexts().first().ok_or("no accepted context")?.id;
    let cmd = CommandSet::store_rq(1, uids::RAW_DATA_STORAGE, &sop).encode().map_err(|e| e.to_string())?;
    assoc.send(&Pdu::PData { data: vec![command_pdv(pc, cmd)] }).await.map_err(|e| format!("command: {e}"))?;
    {
        use tokio::io::AsyncWriteExt;
        let zeros = vec![0u8; 1 << 20];
        let mut w = assoc.send_pdata(pc);
        w.write_all(&prefix).await.map_err(|e| e.to_string())?;
        let mut left = value_len;
        while left > 0 {
            let n = left.min(zeros.len());
            w.write_all(&zeros[..n]).await.map_err(|e| format!("dataset: {e}"))?;
            left -= n;
        }
        w.write_all(&suffix).await.map_err(|e| e.to_string())?;
        w.finish().await.map_err(|e| e.to_string())?;
    }
    let mut asm = MessageAssembler::new(1 << 20);
    loop {
        match assoc.receive().await.map_err(|e| format!("response: {e}"))? {
            Pdu::PData { data } => {
                for pdv in data {
                    assert_eq!(pdv.value_type, PDataValueType::Command);
                    if let Some(m) = asm.push(pdv).map_err(|e| e.to_string())? {
                        let status = m.command.status.ok_or("response without status")?;
                        let _ = assoc.release().await;
                        return Ok(status);
                    }
                }
            }
            other => return Err(format!("unexpected PDU {other:?}")),
        }
    }
}

#[test]
fn sixteen_maximum_size_messages_at_once_stay_within_the_memory_budget() {
    if !common::model_shipped() {
        panic!("models/manifest.toml missing: the shipped model is needed");
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = common::Daemon::start_with(
        &tmp.path().join("d"),
        &format!("max_message_mb = {MAX_MESSAGE_MB}\nmax_buffered_mb = {BUDGET_MB}\n"),
        "",
    );
    let pid = d.child.id();
    std::thread::sleep(Duration::from_secs(1));
    let idle_peak = vm_hwm_mb(pid);

    // Every peer's message is 16 KiB under the cap (command included), i.e. allowed by max_message_mb alone.
    let size = (MAX_MESSAGE_MB << 20) as usize - 16 * 1024;
    let series = "1.2.826.0.1.3680043.10.1021.2";
    let peers: Vec<_> = (0..PEERS)
        .map(|i| {
            let sop = format!("1.2.826.0.1.3680043.10.1021.3.{:02}", i + 10);
            let (prefix, value_len, suffix) = raw_data_parts(&sop, series, size);
            (sop, prefix, value_len, suffix)
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let statuses: Vec<Result<u16, String>> = rt.block_on(async {
        let tasks: Vec<_> =
            peers.into_iter().map(|(sop, p, n, s)| tokio::spawn(send_big(d.port, sop, p, n, s))).collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let peak = vm_hwm_mb(pid);
    let stored = statuses.iter().filter(|s| matches!(s, Ok(0x0000))).count();
    let refused = statuses.iter().filter(|s| matches!(s, Ok(0xA700))).count();
    eprintln!(
        "{PEERS} peers × {MAX_MESSAGE_MB} MiB, budget {BUDGET_MB} MiB: stored {stored}, refused A700 {refused}; \
         VmHWM idle {idle_peak} MiB -> {peak} MiB (+{} MiB)",
        peak.saturating_sub(idle_peak)
    );
    assert_eq!(stored + refused, PEERS, "every peer gets success or A700, nothing else: {statuses:?}\n{}", d.log());
    assert!(refused >= 1, "{PEERS} × {MAX_MESSAGE_MB} MiB cannot fit in {BUDGET_MB} MiB: some must be refused");
    assert!(
        stored >= 1,
        "the budget holds a maximum-size message: at least one must be stored: {statuses:?}\n{}",
        d.log().lines().filter(|l| l.contains("C-STORE")).collect::<Vec<_>>().join("\n")
    );
    assert!(
        peak <= idle_peak + BUDGET_MB + MARGIN_MB,
        "peak RSS {peak} MiB exceeds idle peak {idle_peak} + budget {BUDGET_MB} + margin {MARGIN_MB} MiB"
    );
    assert!(d.log().contains("dicom.max_buffered_mb"), "the refusals are logged with the key");

    // Still up, and the next normal series is stored whole.
    let src = tmp.path().join("normal");
    let truth = common::phantom(&src, 2107, 8, "moderate");
    let (ok, out) = common::storescu(d.port, "CT1", &[&src], true);
    assert!(ok, "{out}\n{}", d.log());
    let uid = truth["series_instance_uid"].as_str().unwrap();
    let row = d.store().series(uid).unwrap().expect("the normal series is recorded");
    assert_eq!(row.n_instances, 8);
}

/// The header block and an open stream of `GET path` (HTTP/1.0, bearer token).
fn open_get(port: u16, path: &str, token: &str) -> (String, BufReader<std::net::TcpStream>) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    (head, r)
}

/// The next `data:` line of an SSE stream, parsed.
fn next_list(r: &mut BufReader<std::net::TcpStream>) -> Vec<serde_json::Value> {
    loop {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "SSE stream ended");
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            return serde_json::from_str(data).unwrap();
        }
    }
}

#[test]
fn live_view_clients_are_capped_and_still_see_a_new_result() {
    if !common::model_shipped() {
        panic!("models/manifest.toml missing: the shipped model is needed");
    }
    let token = "test-token-sse-cap-0123";
    let tmp = tempfile::tempdir().unwrap();
    let d =
        common::HttpDaemon::start(&tmp.path().join("d"), "", &format!("token = \"{token}\"\nmax_sse_clients = 2\n"));

    let (h1, mut c1) = open_get(d.http_port, "/api/events", token);
    let (h2, mut c2) = open_get(d.http_port, "/api/events", token);
    assert!(h1.starts_with("HTTP/1.0 200") || h1.starts_with("HTTP/1.1 200"), "{h1}");
    assert!(h2.contains(" 200 "), "{h2}");
    assert!(next_list(&mut c1).is_empty() && next_list(&mut c2).is_empty(), "an empty list at once");

    // The third is refused, clearly.
    let (h3, mut r3) = open_get(d.http_port, "/api/events", token);
    let mut body = String::new();
    r3.read_to_string(&mut body).unwrap();
    assert!(h3.contains(" 503 "), "{h3}");
    assert!(body.contains("too many live-view clients") && body.contains("http.max_sse_clients"), "{body}");

    // A new result reaches both connected clients.
    let src = tmp.path().join("s");
    let truth = common::phantom(&src, 2108, 20, "moderate");
    let (ok, out) = common::storescu(d.dicom_port, "CT1", &[&src], true);
    assert!(ok, "{out}");
    let uid = truth["series_instance_uid"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    for c in [&mut c1, &mut c2] {
        loop {
            assert!(Instant::now() < deadline, "no result pushed on the live view");
            let list = next_list(c);
            if list.iter().any(|r| r["series_instance_uid"] == uid && r["version"].as_u64() == Some(1)) {
                break;
            }
        }
    }

    // A client that leaves frees its slot (the server notices at its next write: an event or the 15 s keep-alive).
    drop(c1);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (h, _r) = open_get(d.http_port, "/api/events", token);
        if h.contains(" 200 ") {
            break;
        }
        assert!(h.contains(" 503 ") && Instant::now() < deadline, "the freed slot was never given again: {h}");
        std::thread::sleep(Duration::from_secs(1));
    }
}
