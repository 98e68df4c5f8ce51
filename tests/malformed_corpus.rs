//! The malformed-input corpus (`tests/corpus/`) against a real `lungsentry serve` process: each case is sent
//! over raw TCP (so the exact broken bytes reach the daemon), its answer is checked against the expected status
//! or abort, the daemon must answer a C-ECHO on a fresh association after every case, refused instances must
//! not be in the store and accepted ones must be, and the daemon's peak memory must stay bounded. A few
//! file-shaped cases also go through DCMTK `storescu` to show the status reaches a real sender.
//!
//! `LUNGSENTRY_CORPUS_DUMP=DIR cargo test --release --test malformed_corpus` also writes every case's bytes to
//! DIR (seeds for `fuzz/`).

mod common;
mod corpus;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use corpus::{Case, Expect, Setup, Step};
use dicom_ul::pdu::PresentationContextResultReason;
use dicom_ul::Pdu;
use lungsentry::receive::dimse::CommandSet;

const IDLE_S: u64 = 2;
const MAX_MESSAGE_MB: usize = 2;
/// The daemon's maximum PDU length (receive::Tuning default).
const MAX_PDU: u32 = 131_072 - 6;

/// Makes a 64² phantom slice (the corpus base) in `dir` and returns its first file.
fn small_phantom(dir: &Path) -> std::path::PathBuf {
    let st = std::process::Command::new(bin())
        .args(["phantom", "--out"])
        .arg(dir)
        .args(["--seed", "606", "--slices", "2", "--size", "64", "--severity", "none"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    dir.join("IM00001.dcm")
}

/// What came back on one connection.
#[derive(Debug, Default)]
struct Answer {
    /// PDUs received, in order.
    pdus: Vec<Pdu>,
    /// The daemon closed the connection.
    closed: bool,
    /// Time from the last step to the deciding PDU or the close.
    after_ms: u64,
}

impl Answer {
    fn first_status(&self) -> Option<u16> {
        self.pdus.iter().find_map(|p| match p {
            Pdu::PData { data } if !data.is_empty() => CommandSet::decode(&data[0].data).ok().and_then(|c| c.status),
            _ => None,
        })
    }
    fn has(&self, f: impl Fn(&Pdu) -> bool) -> bool {
        self.pdus.iter().any(f)
    }
    fn summary(&self) -> String {
        let names: Vec<String> = self
            .pdus
            .iter()
            .map(|p| match p {
                Pdu::PData { .. } => format!("P-DATA(status {:04X?})", self.first_status()),
                Pdu::AssociationAC(_) => "A-ASSOCIATE-AC".into(),
                Pdu::AssociationRJ(_) => "A-ASSOCIATE-RJ".into(),
                Pdu::AbortRQ { .. } => "A-ABORT".into(),
                Pdu::ReleaseRP => "A-RELEASE-RP".into(),
                other => format!("{other:?}").chars().take(40).collect(),
            })
            .collect();
        format!("{names:?} closed={} after={}ms", self.closed, self.after_ms)
    }
}

/// Reads PDUs until `done` says so, the peer closes, or the deadline passes.
fn read_pdus(s: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant, done: &dyn Fn(&Pdu) -> bool) -> Answer {
    let t0 = Instant::now();
    let mut ans = Answer::default();
    loop {
        loop {
            let mut cur = std::io::Cursor::new(&buf[..]);
            match dicom_ul::read_pdu(&mut cur, MAX_PDU, false) {
                Ok(Some(p)) => {
                    let used = cur.position() as usize;
                    buf.drain(..used);
                    let stop = done(&p);
                    ans.pdus.push(p);
                    if stop {
                        ans.after_ms = t0.elapsed().as_millis() as u64;
                        return ans;
                    }
                }
                Ok(None) => break,
                Err(e) => panic!("daemon sent an unreadable PDU: {e}"),
            }
        }
        let now = Instant::now();
        if now >= deadline {
            ans.after_ms = t0.elapsed().as_millis() as u64;
            return ans;
        }
        s.set_read_timeout(Some(deadline - now)).unwrap();
        let mut chunk = [0u8; 65_536];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => {
                ans.closed = true;
                ans.after_ms = t0.elapsed().as_millis() as u64;
                return ans;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Runs one case; Err says what was wrong.
fn run_case(port: u16, case: &Case) -> Result<Answer, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true).unwrap();
    let mut buf = Vec::new();
    if let Setup::Associate(ctxs) = &case.setup {
        s.write_all(&corpus::assoc_rq_bytes("LUNGSENTRY", ctxs)).unwrap();
        let a = read_pdus(&mut s, &mut buf, Instant::now() + Duration::from_secs(10), &|_| true);
        match a.pdus.first() {
            Some(Pdu::AssociationAC(ac)) => {
                for pc in &ac.presentation_contexts {
                    if pc.reason != PresentationContextResultReason::Acceptance {
                        return Err(format!("context {} not accepted: {:?}", pc.id, pc.reason));
                    }
                }
            }
            _ => return Err(format!("association not accepted: {}", a.summary())),
        }
    }
    let mut closed_by_us = false;
    for step in &case.steps {
        match step {
            Step::Send(b) => {
                // The daemon may legitimately hang up before everything is written (an abort for an earlier PDU).
                if s.write_all(b).is_err() {
                    break;
                }
            }
            Step::Sleep(ms) => std::thread::sleep(Duration::from_millis(*ms)),
            Step::Close => {
                let _ = s.shutdown(std::net::Shutdown::Both);
                closed_by_us = true;
            }
        }
    }
    if closed_by_us {
        return Ok(Answer { closed: true, ..Default::default() });
    }
    let deadline = Instant::now() + Duration::from_secs(IDLE_S + 8);
    let expect = case.expect.clone();
    let ans = read_pdus(&mut s, &mut buf, deadline, &move |p| {
        matches!(
            (&expect, p),
            (_, Pdu::AbortRQ { .. } | Pdu::AssociationRJ(_) | Pdu::AssociationAC(_) | Pdu::ReleaseRP)
                | (Expect::Status(_), Pdu::PData { .. })
                | (Expect::PeerGone, _)
        )
    });
    let verdict = match &case.expect {
        Expect::Status(want) => match ans.first_status() {
            Some(got) if got == *want => Ok(()),
            got => Err(format!("expected status {want:04X}, got {got:04X?}")),
        },
        Expect::Abort => {
            if ans.has(|p| matches!(p, Pdu::AbortRQ { .. })) {
                Ok(())
            } else {
                Err("expected A-ABORT".into())
            }
        }
        Expect::Rejected => {
            if ans.has(|p| matches!(p, Pdu::AssociationRJ(_))) {
                Ok(())
            } else {
                Err("expected A-ASSOCIATE-RJ".into())
            }
        }
        Expect::ContextsRejected => match ans.pdus.first() {
            Some(Pdu::AssociationAC(ac))
                if ac
                    .presentation_contexts
                    .iter()
                    .all(|pc| pc.reason != PresentationContextResultReason::Acceptance) =>
            {
                Ok(())
            }
            _ => Err("expected an A-ASSOCIATE-AC with every context rejected".into()),
        },
        Expect::ReleaseRp => {
            if ans.has(|p| matches!(p, Pdu::ReleaseRP)) {
                Ok(())
            } else {
                Err("expected A-RELEASE-RP".into())
            }
        }
        Expect::Closed => {
            let established = ans.has(|p| matches!(p, Pdu::AssociationAC(_) | Pdu::PData { .. }));
            let ended = ans.closed || ans.has(|p| matches!(p, Pdu::AbortRQ { .. } | Pdu::AssociationRJ(_)));
            if !established && ended {
                Ok(())
            } else {
                Err("expected the connection to be refused (closed, A-ABORT or A-ASSOCIATE-RJ)".into())
            }
        }
        Expect::PeerGone => Ok(()),
    };
    verdict.map_err(|e| format!("{e}; got {}", ans.summary()))?;
    if case.min_ms > 0 && ans.after_ms < case.min_ms {
        return Err(format!("answered after {} ms, before the idle timeout ({} ms)", ans.after_ms, case.min_ms));
    }
    if matches!(case.expect, Expect::Status(_)) {
        let _ = s.write_all(&corpus::pdu_bytes(&Pdu::ReleaseRQ));
        let _ = read_pdus(&mut s, &mut buf, Instant::now() + Duration::from_secs(5), &|p| {
            matches!(p, Pdu::ReleaseRP | Pdu::AbortRQ { .. })
        });
    }
    Ok(ans)
}

/// A C-ECHO on a fresh association: the daemon is still serving.
fn echo_ok(port: u16) -> Result<(), String> {
    let ctx = vec![(corpus::VERIFICATION.to_string(), vec![corpus::IMPLICIT.to_string()])];
    let case = Case {
        name: "echo".into(),
        setup: Setup::Associate(ctx),
        steps: vec![Step::Send(corpus::pdata(vec![lungsentry::receive::dimse::command_pdv(
            1,
            CommandSet::echo_rq(1).encode().unwrap(),
        )]))],
        expect: Expect::Status(0),
        sop_instance: None,
        min_ms: 0,
    };
    run_case(port, &case).map(|_| ())
}

/// (VmHWM, VmPeak) of a process, KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmPeak:"))
}

fn stored_sops(d: &Daemon) -> std::collections::HashSet<String> {
    let db = rusqlite::Connection::open(d.dir.join("data/lungsentry.sqlite")).unwrap();
    let mut st = db.prepare("SELECT sop_instance_uid FROM instances").unwrap();
    let rows = st.query_map([], |r| r.get::<_, String>(0)).unwrap();
    rows.map(|r| r.unwrap()).collect()
}

fn build_cases(tmp: &Path) -> (corpus::Bases, Vec<Case>) {
    let slice = small_phantom(&tmp.join("phantom"));
    let work = tmp.join("dcmtk");
    std::fs::create_dir_all(&work).unwrap();
    let bases = corpus::Bases::new(&slice, &work);
    let cases = corpus::all(&bases, IDLE_S * 1000, MAX_PDU, MAX_MESSAGE_MB << 20);
    if let Ok(dir) = std::env::var("LUNGSENTRY_CORPUS_DUMP") {
        let dir = Path::new(&dir);
        for c in &cases {
            let p = dir.join(format!("{}.bin", c.name));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            let bytes: Vec<u8> = c
                .steps
                .iter()
                .flat_map(|s| match s {
                    Step::Send(b) => b.clone(),
                    _ => Vec::new(),
                })
                .collect();
            std::fs::write(p, bytes).unwrap();
        }
    }
    (bases, cases)
}

#[test]
fn corpus_has_50_named_cases_with_expectations() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, cases) = build_cases(tmp.path());
    let mut names = std::collections::HashSet::new();
    for c in &cases {
        assert!(names.insert(c.name.clone()), "duplicate case name {}", c.name);
    }
    for layer in ["dataset/", "dimse/", "pdu/"] {
        assert!(cases.iter().filter(|c| c.name.starts_with(layer)).count() >= 10, "too few {layer} cases");
    }
    assert!(cases.len() >= 50, "{} cases", cases.len());
}

#[test]
fn every_corpus_case_gets_its_status_and_the_daemon_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let (bases, cases) = build_cases(tmp.path());
    let d = Daemon::start_with(
        &tmp.path().join("d"),
        &format!("association_idle_timeout_s = {IDLE_S}\nmax_message_mb = {MAX_MESSAGE_MB}\n"),
        "[series]\nquiet_period_s = 0.5\n",
    );
    let pid = d.child.id();
    echo_ok(d.port).expect("daemon answers before the corpus");
    let (hwm0, peak0) = memory_kib(pid);
    let mut failures = Vec::new();
    let t_all = Instant::now();
    for case in &cases {
        let t = Instant::now();
        let r = run_case(d.port, case);
        let alive = echo_ok(d.port);
        let line = match (&r, &alive) {
            (Ok(a), Ok(())) => format!("ok   {:55} {}", case.name, a.summary()),
            (Err(e), _) => format!("FAIL {:55} {e}", case.name),
            (_, Err(e)) => format!("FAIL {:55} daemon stopped serving after it: {e}", case.name),
        };
        eprintln!("{line} ({} ms)", t.elapsed().as_millis());
        if r.is_err() || alive.is_err() {
            failures.push(line);
        }
    }
    eprintln!("{} cases in {:.1} s", cases.len(), t_all.elapsed().as_secs_f64());

    // Stored exactly when acknowledged.
    let stored = stored_sops(&d);
    for case in &cases {
        let Some(sop) = &case.sop_instance else { continue };
        let should = case.expect == Expect::Status(corpus::SUCCESS);
        if stored.contains(sop) != should {
            failures.push(format!(
                "{}: instance {} in the store after {:?}",
                case.name,
                if should { "missing" } else { "present" },
                case.expect
            ));
        }
    }

    // Accepted slices whose codec payload lies are reported per slice in the series result; the rest decode.
    let series_uid = bases
        .object
        .element(dicom_dictionary_std::tags::SERIES_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string();
    let undecodable = [
        "rle-header-offsets-out-of-range",
        "rle-segments-decode-short",
        "jpeg-sof-claims",
        "jpeg-codestream-cut",
        "jpeg-fragment-noise",
    ];
    let in_series = {
        let db = rusqlite::Connection::open(d.dir.join("data/lungsentry.sqlite")).unwrap();
        db.query_row("SELECT COUNT(*) FROM instances WHERE series_instance_uid = ?1", [&series_uid], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let r = loop {
        let r = d.wait_result(&series_uid, 1, Duration::from_secs(120));
        if r.result["n_slices"].as_i64() == Some(in_series) {
            break r;
        }
        assert!(Instant::now() < deadline, "no result covering all {in_series} stored instances: {}", r.result);
        std::thread::sleep(Duration::from_millis(300));
    };
    let errors: Vec<String> = r.result["slice_errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["sop_instance_uid"].as_str().unwrap().to_string())
        .collect();
    eprintln!("series result: status {}, slice_errors {}", r.result["status"], r.result["slice_errors"]);
    for case in cases.iter().filter(|c| c.expect == Expect::Status(corpus::SUCCESS)) {
        let Some(sop) = &case.sop_instance else { continue };
        let want_error = undecodable.iter().any(|u| case.name.contains(u));
        if errors.contains(sop) != want_error {
            failures.push(format!(
                "{}: slice error {} (slice_errors: {})",
                case.name,
                if want_error { "missing" } else { "unexpected" },
                r.result["slice_errors"]
            ));
        }
    }

    let (hwm1, peak1) = memory_kib(pid);
    eprintln!(
        "daemon memory: VmHWM {} → {} MiB, VmPeak {} → {} MiB",
        hwm0 / 1024,
        hwm1 / 1024,
        peak0 / 1024,
        peak1 / 1024
    );
    // Model + engine arenas + a few slices take ~300 MiB; any case that got its claimed gigabytes would show.
    if hwm1 > 768 * 1024 {
        failures.push(format!("resident peak {} MiB (from {} MiB)", hwm1 / 1024, hwm0 / 1024));
    }
    if peak1.saturating_sub(peak0) > 2 * 1024 * 1024 {
        failures.push(format!("virtual peak grew by {} MiB: something reserved gigabytes", (peak1 - peak0) / 1024));
    }
    assert!(failures.is_empty(), "{} of {} corpus cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

/// File-shaped cases through DCMTK `storescu` (a real sender): the failure status reaches it, deflated transfer
/// (`-xd`) is stored, and the daemon goes on serving.
#[test]
fn storescu_gets_the_failure_statuses_and_deflated_is_stored() {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let tmp = tempfile::tempdir().unwrap();
    let slice = small_phantom(&tmp.path().join("phantom"));
    let d = Daemon::start(&tmp.path().join("d"), "");
    let (ok, out) = storescu_args(d.port, &["-xd"], &[&tmp.path().join("phantom")]);
    assert!(ok, "{out}");
    assert_eq!(out.matches("Received Store Response (Success)").count(), 2, "{out}");
    assert!(out.contains("-> Deflated Explicit VR Little Endian"), "not sent deflated:\n{out}");

    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    type Breakage = Box<dyn Fn(&mut dicom_object::DefaultDicomObject)>;
    let variants: Vec<(&str, Breakage)> = vec![
        (
            "short-pixels",
            Box::new(|o| {
                o.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(vec![0u8; 1000])));
            }),
        ),
        (
            "rows-columns-65535",
            Box::new(|o| {
                o.put(DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(65_535u16)));
                o.put(DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(65_535u16)));
            }),
        ),
        (
            "no-pixels",
            Box::new(|o| {
                o.remove_element(tags::PIXEL_DATA);
            }),
        ),
    ];
    for (i, (name, f)) in variants.iter().enumerate() {
        let mut o = dicom_object::open_file(&slice).unwrap();
        let uid = format!("{}.77{i}", o.meta().media_storage_sop_instance_uid().trim_end_matches('\0'));
        o.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(uid.as_str())));
        o.update_meta(|m| m.media_storage_sop_instance_uid = uid.clone());
        f(&mut o);
        let p = bad.join(format!("{name}.dcm"));
        o.write_to_file(&p).unwrap();
        let (_, out) = storescu_args(d.port, &[], &[&p]);
        assert!(out.contains("Received Store Response (Error: CannotUnderstand)"), "{name}:\n{out}");
    }
    let (ok, out) = storescu_args(d.port, &[], &[&tmp.path().join("phantom")]);
    assert!(ok && out.matches("Received Store Response (Success)").count() == 2, "{out}");
}

/// DCMTK storescu (TCP_NODELAY=1) with extra arguments.
fn storescu_args(port: u16, extra: &[&str], paths: &[&Path]) -> (bool, String) {
    let mut cmd = std::process::Command::new("storescu");
    cmd.args(["-v", "-aet", "CT1", "-aec", "LUNGSENTRY", "+sd", "+r", "+sp", "*.dcm"]).args(extra);
    cmd.args(["127.0.0.1", &port.to_string()]).args(paths).env("TCP_NODELAY", "1");
    let out = cmd.output().expect("storescu");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}
