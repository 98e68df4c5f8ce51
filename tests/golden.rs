//! Golden test of everything a series result becomes: the result JSON (as the analysis builds it, as the store keeps
//! it — what the dashboard's series API serves — and as `analyze --json` prints it), the webhook bodies the store
//! queues, the DICOM outputs (SEG, SR, key images) and the dashboard's key PNG, on a phantom baseline + follow-up
//! pair and on the real RICORD series. Each must equal the fixture in `tests/golden/` made by the code before the
//! result was typed (issue 23): a renamed, reordered, dropped or reformatted field fails here with a diff.
//!
//! Time-dependent parts are fixed or blanked: the received and completion times are given (so the derived UIDs and
//! the content date/time of the DICOM objects are fixed), the stage timings are blanked in the JSON, and the
//! Device Serial Number (the host name, and the SR's observer UID made from it) is blanked before the DICOM bytes
//! are hashed. The engine is tract (pure
//! Rust, the same on every box that runs the tests).
//!
//! `LUNGSENTRY_GOLDEN_UPDATE=1` rewrites the fixtures instead of comparing (only for a deliberate change of the
//! outputs; say why in the commit).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use lungsentry::config::{Config, EngineKind};
use lungsentry::model::Model;
use lungsentry::pipeline::{InferenceContext, SeriesWork};
use lungsentry::store::Store;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const SALT: &[u8] = b"golden-salt";
const RECEIVED_AT: &str = "2026-01-02T03:04:05.678Z";
const COMPLETED_AT: &str = "2026-01-02T03:05:06.789Z";

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn context() -> InferenceContext {
    let config = Config::default();
    let model = Model::load(&config.engine.manifest).expect("the shipped model");
    let engine = lungsentry::engine::load_engine(EngineKind::Tract, &model).expect("tract engine");
    InferenceContext { model, engine, config }
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The stage timings (milliseconds, different on every run) replaced by a marker, wherever they are.
fn blank_timings(v: &mut Value) {
    if let Some(t) = v.get_mut("timings_ms") {
        *t = json!("<timings>");
    }
}

/// A DICOM output's bytes as SHA-256, with what depends on the host blanked: the Device Serial Number (the host
/// name) and the SR's Device Observer UID made from it (its sequences have undefined lengths, so nothing else moves).
fn dicom_digest(path: &Path) -> String {
    use dicom_dictionary_std::tags;
    let mut obj = dicom_object::open_file(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let serial = obj.element(tags::DEVICE_SERIAL_NUMBER).expect("names the device").to_str().unwrap().to_string();
    let observer = lungsentry::outputs::derived_uid(serial.trim_end_matches([' ', '\0']), "device-observer");
    assert!(blank_host(&mut obj, &observer));
    let mut bytes = Vec::new();
    obj.write_all(&mut bytes).expect("re-encode the output");
    sha256(&bytes)
}

/// Replaces the Device Serial Number and the UI values equal to `observer_uid`, at any depth; returns whether it
/// changed anything (only the elements holding them are touched).
fn blank_host(obj: &mut dicom_object::InMemDicomObject, observer_uid: &str) -> bool {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    let mut changed = false;
    let tag_list: Vec<dicom_core::Tag> = obj.tags().collect();
    for tag in tag_list {
        let e = obj.element(tag).unwrap();
        if e.items().is_some() {
            let mut seq = obj.take_element(tag).unwrap();
            let mut inner = false;
            for item in seq.items_mut().unwrap().iter_mut() {
                inner |= blank_host(item, observer_uid);
            }
            changed |= inner;
            obj.put(seq);
        } else if tag == dicom_dictionary_std::tags::DEVICE_SERIAL_NUMBER {
            obj.put(DataElement::new(tag, VR::LO, PrimitiveValue::from("HOST")));
            changed = true;
        } else if e.vr() == VR::UI && e.to_str().is_ok_and(|v| v.trim_end_matches('\0') == observer_uid) {
            obj.put(DataElement::new(tag, VR::UI, PrimitiveValue::from("1.2.3.4")));
            changed = true;
        }
    }
    changed
}

/// One webhook body as queued: its text must be what serde_json writes for it (sorted keys, exact floats), so it
/// is compared as JSON with the timings blanked.
fn webhook_body(payload: &str) -> Value {
    let mut v: Value = serde_json::from_str(payload).expect("webhook body is JSON");
    assert_eq!(v.to_string(), payload, "the webhook body is not serde_json's own writing of it");
    blank_timings(&mut v);
    v
}

/// Analyses every series under `paths` as the daemon records and links them (study-date order, one store), and
/// returns what each became, keyed by series. `enforce_eligibility` as the daemon (a series it would skip gets a
/// `skipped` result) or as `analyze` (every series analysed). `latest_first`: the newest study first, so the
/// earlier one, analysed after it, relinks it (backward follow-up links, stored beside its result).
fn golden_of(paths: &[PathBuf], work_dir: &Path, enforce_eligibility: bool, latest_first: bool) -> Value {
    let ctx = context();
    let store = Store::open(&work_dir.join("lungsentry.sqlite")).unwrap();
    let files = lungsentry::tools::analyze::collect_files(paths).unwrap();
    let mut groups: Vec<_> = lungsentry::tools::analyze::group_by_series(&files).into_values().collect();
    groups.sort_by_key(|v| (v[0].0.study_date.clone(), v[0].0.series_instance_uid.clone()));
    if latest_first {
        groups.reverse();
    }
    let rule = (&ctx.config.analysis).into();
    let mut out = serde_json::Map::new();
    let mut webhooks_seen = 0;
    for instances in groups {
        let m0 = &instances[0].0;
        let patient_key = lungsentry::store::patient_key(SALT, &m0.patient_id, &m0.patient_name);
        let mut work = SeriesWork::default();
        for (meta, path) in &instances {
            let spooled = lungsentry::spool::SpooledInstance {
                meta: meta.clone(),
                path: path.clone(),
                transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
                bytes: 0,
                unchanged_since_ms: None,
            };
            store.record_instance(&spooled, 0, &patient_key).unwrap();
            work.add(&ctx, meta.clone(), path);
        }
        let (mut result, slices) =
            work.finish_with_slices(&ctx, &patient_key, RECEIVED_AT, COMPLETED_AT, enforce_eligibility);
        let series_uid = m0.series_instance_uid.clone();
        let links =
            lungsentry::pipeline::link_follow_ups(&store, &patient_key, &series_uid, &mut result, rule, true, None)
                .unwrap();
        let value = serde_json::to_value(&result).unwrap();
        let positive = value["positive"].as_bool().unwrap();
        let involvement = value["involvement_percent"].as_f64().unwrap_or(0.0);
        store
            .record_result_with_outputs(lungsentry::store::NewResult {
                series_uid: &series_uid,
                revision: None,
                positive,
                involvement_percent: involvement,
                result_json: &value,
                alert: true,
                outputs_due: false,
                links: &links,
            })
            .unwrap();

        let mut analysed = value.clone();
        blank_timings(&mut analysed);
        let mut stored = store.latest_result(&series_uid).unwrap().expect("recorded").result;
        // Read back typed (the dashboard, the relinks and the outputs sweep do), it writes the same JSON.
        let typed = lungsentry::result::SeriesResult::from_json(stored.clone()).expect("stored result reads back");
        assert_eq!(typed.to_json(), stored, "the stored result read back typed writes other JSON");
        blank_timings(&mut stored);
        let rows = store.due_outbox(i64::MAX, 100).unwrap();
        let webhooks: Vec<Value> = rows[webhooks_seen..]
            .iter()
            .map(|r| json!({"dedup_key": r.dedup_key, "body": webhook_body(&r.payload_json)}))
            .collect();
        webhooks_seen = rows.len();

        let (dicom, sop_uids) =
            match lungsentry::outputs::build(&result, &slices, &lungsentry::outputs::OutputOptions::default()) {
                Ok(objects) => {
                    let dir = work_dir.join("outputs").join(&series_uid);
                    let paths = lungsentry::outputs::write_dir(&objects, &dir).unwrap();
                    let dicom: BTreeMap<String, String> = paths
                        .iter()
                        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), dicom_digest(p)))
                        .collect();
                    let uids: Vec<&str> = objects.iter().map(|o| o.sop_instance_uid.as_str()).collect();
                    (json!(dicom), json!(uids))
                }
                Err(e) => (json!({ "error": e.to_string() }), json!([])),
            };

        lungsentry::dashboard::write_key_png(work_dir, &result, &slices).unwrap();
        let png = lungsentry::dashboard::key_png_path(work_dir, &series_uid);
        let key_png = std::fs::read(&png).map(|b| sha256(&b)).ok();

        out.insert(
            series_uid.clone(),
            json!({
                "result": analysed,
                "stored_result": stored,
                "webhooks": webhooks,
                "dicom_sha256": dicom,
                "dicom_sop_instance_uids": sop_uids,
                "key_png_sha256": key_png,
            }),
        );
    }
    // The backward links each series got (a prior study analysed after it).
    for (uid, entry) in out.iter_mut() {
        let links: Vec<Value> = store
            .follow_up_links(uid)
            .unwrap()
            .into_iter()
            .map(|l| json!({"prior": l.prior_series_instance_uid, "version": l.result_version, "follow_up": l.follow_up}))
            .collect();
        entry["follow_up_links"] = json!(links);
    }
    Value::Object(out)
}

/// `analyze --json` over `paths`, each line with its volatile fields blanked (times, timings, output folder).
fn analyze_lines(paths: &[PathBuf]) -> Vec<Value> {
    let o = Command::new(common::bin())
        .arg("analyze")
        .args(paths)
        .args(["--json", "--engine", "tract"])
        .output()
        .expect("run lungsentry analyze");
    assert!(o.status.success(), "analyze failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let mut v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v.to_string(), line, "the printed result is not serde_json's own writing of it");
            blank_timings(&mut v);
            v["received_at"] = json!("<time>");
            v["completed_at"] = json!("<time>");
            v
        })
        .collect()
}

/// Compares `got` with the fixture `name` (or writes it under LUNGSENTRY_GOLDEN_UPDATE=1), failing with the lines
/// that differ.
fn check(name: &str, got: &Value) {
    let path = golden_dir().join(name);
    let text = serde_json::to_string_pretty(got).unwrap() + "\n";
    if std::env::var_os("LUNGSENTRY_GOLDEN_UPDATE").is_some() {
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::write(&path, &text).unwrap();
        eprintln!("wrote {}", path.display());
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (LUNGSENTRY_GOLDEN_UPDATE=1 makes it)", path.display()));
    if want == text {
        return;
    }
    let (w, g): (Vec<&str>, Vec<&str>) = (want.lines().collect(), text.lines().collect());
    let mut diff = String::new();
    let mut shown = 0;
    for i in 0..w.len().max(g.len()) {
        let (a, b) = (w.get(i).copied().unwrap_or("<end>"), g.get(i).copied().unwrap_or("<end>"));
        if a != b && shown < 40 {
            diff += &format!("line {}:\n  golden: {a}\n  now:    {b}\n", i + 1);
            shown += 1;
        }
    }
    let now = std::env::temp_dir().join(format!("lungsentry-golden-now-{name}"));
    std::fs::write(&now, &text).unwrap();
    panic!(
        "{name} differs from the golden fixture {} (now written to {}; diff them):\n{diff}",
        path.display(),
        now.display()
    );
}

#[test]
fn phantom_pair_outputs_are_unchanged() {
    assert!(common::model_shipped(), "models/manifest.toml missing: the shipped model is needed");
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("baseline"), tmp.path().join("follow-up"));
    common::phantom(&a, 2301, 24, "moderate");
    common::phantom_follow_up(&b, 2302, &a);
    let paths = vec![a, b];
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let got = golden_of(&paths, &work, false, false);
    // The follow-up is linked to its baseline.
    assert!(got.as_object().unwrap().values().any(|s| s["result"].get("follow_up").is_some()));
    check("phantom-pair.json", &got);
    // The other order: the baseline, analysed second, relinks the follow-up.
    let relinked = tmp.path().join("relinked");
    std::fs::create_dir_all(&relinked).unwrap();
    let got = golden_of(&paths, &relinked, false, true);
    assert!(got.as_object().unwrap().values().any(|s| !s["follow_up_links"].as_array().unwrap().is_empty()));
    check("phantom-pair-relinked.json", &got);
    check("phantom-pair-analyze.json", &Value::Array(analyze_lines(&paths)));
}

#[test]
fn skipped_series_result_is_unchanged() {
    assert!(common::model_shipped(), "models/manifest.toml missing: the shipped model is needed");
    let tmp = tempfile::tempdir().unwrap();
    let short = tmp.path().join("short");
    common::phantom(&short, 2303, 12, "severe");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    // 12 slices, fewer than series.min_slices: the daemon records a `skipped` result, without figures or outputs.
    let got = golden_of(&[short], &work, true, false);
    assert!(got.as_object().unwrap().values().all(|s| s["result"]["status"] == "skipped"));
    check("phantom-skipped.json", &got);
}

#[test]
fn ricord_outputs_are_unchanged() {
    let Ok(data) = std::env::var("LUNGSENTRY_DATA") else {
        eprintln!("SKIPPED ricord_outputs_are_unchanged: LUNGSENTRY_DATA is not set (CI sets it)");
        return;
    };
    assert!(common::model_shipped(), "models/manifest.toml missing: the shipped model is needed");
    let series = Path::new(&data).join("real-ct-series/covid-ricord-1a-001012/axial_248");
    assert!(series.is_dir(), "{} is missing", series.display());
    let tmp = tempfile::tempdir().unwrap();
    let got = golden_of(&[series], tmp.path(), false, false);
    check("ricord-1a-001012.json", &got);
}
