//! The store against real SQLite: pragmas and migrations, instances, versioned results and the webhook outbox,
//! results with DICOM outputs due, follow-up links recorded late, and what a link awaiting its amended SR does to
//! retention. (The spool, and a spooled instance recorded in the store, are `tests/spool_store.rs`.)

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use lungsentry::instance::InstanceMeta;
use lungsentry::spool::SpooledInstance;
use lungsentry::store::{load_or_create_salt, patient_key, NewResult, Store, MIGRATIONS};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn fake_instance(series: &str, sop: &str, patient: (&str, &str), n: i64) -> SpooledInstance {
    SpooledInstance {
        meta: InstanceMeta {
            patient_id: patient.0.into(),
            patient_name: patient.1.into(),
            ..common::ct_meta(sop.into(), format!("{series}.0"), series, n)
        },
        path: PathBuf::from(format!("/spool/{sop}.dcm")),
        transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
        bytes: 1234,
        unchanged_since_ms: None,
    }
}

#[test]
fn store_pragmas_and_idempotent_migrations() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("lungsentry.sqlite");
    let key = patient_key(b"salt", "PID1", "DOE^JANE");
    {
        let store = Store::open(&db).unwrap();
        let p = store.pragmas().unwrap();
        assert_eq!(p.journal_mode, "wal");
        assert_eq!(p.synchronous, 2, "synchronous must be FULL");
        assert!(p.foreign_keys);
        assert!(p.busy_timeout_ms >= 1000);
        assert_eq!(p.user_version, MIGRATIONS.len() as i64);
        store.record_instance(&fake_instance("1.2.3", "1.2.3.1", ("PID1", "DOE^JANE"), 1), 1, &key).unwrap();
    }
    assert_eq!(mode(&db), 0o600);
    let store = Store::open(&db).unwrap(); // reopen: migrations must not run twice
    assert_eq!(store.pragmas().unwrap().user_version, MIGRATIONS.len() as i64);
    assert_eq!(store.series_instances("1.2.3").unwrap().len(), 1);
    drop(store);
    // A database from a newer build is refused, not modified.
    let c = rusqlite::Connection::open(&db).unwrap();
    c.pragma_update(None, "user_version", MIGRATIONS.len() as i64 + 1).unwrap();
    drop(c);
    let e = Store::open(&db).unwrap_err();
    assert!(format!("{e:#}").contains("newer"), "{e:#}");
}

#[test]
fn instances_results_pending_and_outbox() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("db.sqlite")).unwrap();
    let salt = load_or_create_salt(tmp.path()).unwrap();
    assert_eq!(salt.len(), 32);
    assert_eq!(mode(&tmp.path().join("patient-key.salt")), 0o600);
    assert_eq!(load_or_create_salt(tmp.path()).unwrap(), salt, "salt must be read back, not regenerated");
    let pk = patient_key(&salt, "PID1", "DOE^JANE");
    assert_eq!(pk.len(), 32);
    assert_ne!(pk, patient_key(&salt, "PID1", "DOE^JOHN"));
    assert_ne!(pk, patient_key(b"other salt", "PID1", "DOE^JANE"));

    let s = "1.2.826.0.1.1";
    let r1 = store.record_instance(&fake_instance(s, "1.2.826.0.1.1.2", ("PID1", "DOE^JANE"), 2), 1, &pk).unwrap();
    assert!(r1.new_instance && r1.new_series && !r1.series_had_result);
    let r2 = store.record_instance(&fake_instance(s, "1.2.826.0.1.1.1", ("PID1", "DOE^JANE"), 1), 1, &pk).unwrap();
    assert!(r2.new_instance && !r2.new_series);
    assert_eq!(r2.n_instances, 2);
    let rep = store.record_instance(&fake_instance(s, "1.2.826.0.1.1.1", ("PID1", "DOE^JANE"), 1), 2, &pk).unwrap();
    assert!(!rep.new_instance, "a repeated SOP Instance UID is not new");
    assert_eq!(rep.n_instances, 2);

    let list = store.series_instances(s).unwrap();
    assert_eq!(list.iter().map(|i| i.meta.instance_number.unwrap()).collect::<Vec<_>>(), vec![1, 2]);
    assert!(
        list.iter().all(|i| i.meta.patient_id.is_empty() && i.meta.patient_name.is_empty()),
        "raw IDs outside patients"
    );
    assert_eq!(store.series_pending_analysis().unwrap(), vec![s.to_string()]);

    // Raw identifiers are refused in results.
    assert!(store.record_result(s, true, 1.0, &serde_json::json!({"patient_name": "DOE^JANE"}), false).is_err());

    let result =
        serde_json::json!({"series_instance_uid": s, "patient_key": pk, "positive": true, "involvement_percent": 12.5});
    let v1 = store.record_result(s, true, 12.5, &result, true).unwrap();
    assert_eq!(v1, 1);
    assert!(store.series_pending_analysis().unwrap().is_empty());
    assert_eq!(store.series(s).unwrap().unwrap().state, "analysed");

    let due = store.due_outbox(lungsentry::store::now_ms(), 10).unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].dedup_key, format!("{s}/v1"));
    let payload: serde_json::Value = serde_json::from_str(&due[0].payload_json).unwrap();
    assert_eq!(payload["version"], 1);
    assert_eq!(payload["dedup_key"], format!("{s}/v1"));
    assert_eq!(payload["involvement_percent"], 12.5);
    // The dedup key is unique: the same alert cannot be queued twice.
    assert_eq!(store.enqueue_webhook(&format!("{s}/v1"), "{}").unwrap(), None);
    assert!(store.enqueue_webhook("other/v1", "{}").unwrap().is_some());

    // A late instance after completion: reported, and the series is pending again.
    let late = store.record_instance(&fake_instance(s, "1.2.826.0.1.1.3", ("PID1", "DOE^JANE"), 3), 3, &pk).unwrap();
    assert!(late.new_instance && late.series_had_result);
    assert_eq!(store.series_pending_analysis().unwrap(), vec![s.to_string()]);

    // Analysis started at this revision; an instance arriving mid-analysis keeps the series pending.
    let rev = store.series_revision(s).unwrap().unwrap();
    store.record_instance(&fake_instance(s, "1.2.826.0.1.1.4", ("PID1", "DOE^JANE"), 4), 3, &pk).unwrap();
    let v2 = store.record_result_for_revision(s, Some(rev), false, 0.1, &result, false).unwrap();
    assert_eq!(v2, 2, "a re-analysis is a new version, never a replacement");
    assert_eq!(store.series_pending_analysis().unwrap(), vec![s.to_string()]);
    let v3 = store.record_result(s, false, 0.2, &result, false).unwrap();
    assert_eq!(v3, 3);
    assert!(store.series_pending_analysis().unwrap().is_empty());
    let hist = store.result_history(s).unwrap();
    assert_eq!(hist.iter().map(|r| r.version).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(hist[0].positive && !hist[1].positive);
    let latest = store.latest_result(s).unwrap().unwrap();
    assert_eq!((latest.version, latest.involvement_percent), (3, 0.2));

    // Skipped series are not pending.
    let s2 = "1.2.826.0.1.2";
    store.record_instance(&fake_instance(s2, "1.2.826.0.1.2.1", ("PID1", "DOE^JANE"), 1), 4, &pk).unwrap();
    assert!(store.series_pending_analysis().unwrap().contains(&s2.to_string()));
    assert!(store.set_series_state(s2, "skipped", Some("too few slices")).unwrap());
    assert!(!store.series_pending_analysis().unwrap().contains(&s2.to_string()));

    // Follow-up view: latest result per series of the patient.
    let per_patient = store.results_for_patient(&pk).unwrap();
    assert_eq!(per_patient.len(), 1);
    assert_eq!(per_patient[0].version, 3);
    assert!(store.results_for_patient("0000").unwrap().is_empty());

    // Outbox bookkeeping.
    let c = store.outbox_counts().unwrap();
    assert_eq!((c.pending, c.failing, c.delivered), (2, 0, 0));
    store.mark_attempt_failed(due[0].id, "HTTP 500", lungsentry::store::now_ms() + 60_000).unwrap();
    assert_eq!(store.outbox_counts().unwrap().failing, 1);
    assert!(store.due_outbox(lungsentry::store::now_ms(), 10).unwrap().iter().all(|r| r.id != due[0].id));
    assert!(store.mark_delivered(due[0].id).unwrap());
    assert!(!store.mark_delivered(due[0].id).unwrap(), "delivered once");
    let c = store.outbox_counts().unwrap();
    assert_eq!((c.pending, c.failing, c.delivered), (1, 0, 1));

    // Raw identifiers live only in `patients`.
    drop(store);
    let c = rusqlite::Connection::open(tmp.path().join("db.sqlite")).unwrap();
    for (table, expr) in [
        ("series", "series_instance_uid || patient_key || study_date || state"),
        ("instances", "meta_json || path"),
        ("results", "result_json"),
        ("outbox", "payload_json"),
    ] {
        let sql = format!("SELECT COUNT(*) FROM {table} WHERE ({expr}) LIKE '%DOE^JANE%' OR ({expr}) LIKE '%PID1%'");
        let n: i64 = c.query_row(&sql, [], |r| r.get(0)).unwrap();
        assert_eq!(n, 0, "raw patient identifier found in {table}");
    }
    let n: i64 =
        c.query_row("SELECT COUNT(*) FROM patients WHERE patient_name = 'DOE^JANE'", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 1);
}

#[test]
fn results_with_outputs_due_are_listed_until_their_rows_are_queued() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("db.sqlite")).unwrap();
    let pk = patient_key(b"salt", "PID9", "DOE^JOHN");
    let (a, b) = ("1.2.826.0.9.1", "1.2.826.0.9.2");
    for (s, sop) in [(a, "1.2.826.0.9.1.1"), (b, "1.2.826.0.9.2.1")] {
        store.record_instance(&fake_instance(s, sop, ("PID9", "DOE^JOHN"), 1), 1, &pk).unwrap();
    }
    let result = |s: &str| serde_json::json!({"series_instance_uid": s, "patient_key": pk, "status": "analysed"});
    // a: outputs due; b: none wanted (e.g. a negative series and only_positive destinations).
    let va = store
        .record_result_with_outputs(NewResult {
            series_uid: a,
            revision: None,
            positive: true,
            involvement_percent: 5.0,
            result_json: &result(a),
            alert: false,
            outputs_due: true,
            links: &[],
        })
        .unwrap();
    store
        .record_result_with_outputs(NewResult {
            series_uid: b,
            revision: None,
            positive: false,
            involvement_percent: 0.0,
            result_json: &result(b),
            alert: false,
            outputs_due: false,
            links: &[],
        })
        .unwrap();
    let awaiting = |store: &Store| -> Vec<(String, u32)> {
        store.results_awaiting_outputs().unwrap().into_iter().map(|r| (r.series_instance_uid, r.version)).collect()
    };
    assert_eq!(awaiting(&store), vec![(a.to_string(), va)]);
    // A series changed since its result is re-analysed (its new version makes the outputs): not listed.
    store.record_instance(&fake_instance(a, "1.2.826.0.9.1.2", ("PID9", "DOE^JOHN"), 2), 2, &pk).unwrap();
    assert!(awaiting(&store).is_empty());
    let va2 = store
        .record_result_with_outputs(NewResult {
            series_uid: a,
            revision: None,
            positive: true,
            involvement_percent: 6.0,
            result_json: &result(a),
            alert: false,
            outputs_due: true,
            links: &[],
        })
        .unwrap();
    assert_eq!(awaiting(&store), vec![(a.to_string(), va2)]);
    // Queueing the rows clears the mark in the same transaction (an empty set of rows only clears it).
    let row = lungsentry::store::NewDicomOutput {
        destination: "PACS@h:104".into(),
        kind: "sr".into(),
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.34".into(),
        sop_instance_uid: "2.25.1".into(),
        path: tmp.path().join("sr.dcm"),
    };
    assert_eq!(store.enqueue_dicom_outputs(a, va2 as i64, std::slice::from_ref(&row)).unwrap(), 1);
    assert!(awaiting(&store).is_empty());
    // Again (a restart that rebuilt the same objects): no duplicate row.
    assert_eq!(store.enqueue_dicom_outputs(a, va2 as i64, &[row]).unwrap(), 0);
    assert_eq!(store.dicom_outbox_of_series(a).unwrap().len(), 1);
}

/// Issue 8, backward linking: a later study analysed first, its prior study recorded afterwards. The later
/// series keeps one result (its version is not re-recorded); the new comparison is stored beside it, in the
/// transaction of the prior's result, shown by every read of that version, queued once as a progression alert,
/// and not stored again when nothing changed.
#[test]
fn a_prior_study_recorded_late_relinks_the_later_result_without_a_new_version() {
    use lungsentry::analysis::followup::ProgressionRule;
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("db.sqlite")).unwrap();
    let pk = patient_key(b"salt", "PID7", "ROE^ANN");
    let (early, late) = ("1.2.826.0.7.1", "1.2.826.0.7.2");
    for (s, date) in [(late, "20200420"), (early, "20200401")] {
        let mut inst = fake_instance(s, &format!("{s}.1"), ("PID7", "ROE^ANN"), 1);
        inst.meta.study_date = date.into();
        store.record_instance(&inst, 1, &pk).unwrap();
    }
    use lungsentry::analysis::regions::{RegionInvolvement, Regional};
    use lungsentry::result::{Figures, SeriesResult, SeriesStatus};
    let lung = |side: &str, x: f64| RegionInvolvement {
        lung: side.into(),
        zone: "whole".into(),
        centroid_mm: Some([x, 0.0, 0.0]),
        ..Default::default()
    };
    let result = |s: &str, date: &str, inv: f64, vol: f64| SeriesResult {
        series_instance_uid: s.into(),
        study_instance_uid: format!("{s}.0"),
        study_date: date.into(),
        patient_key: pk.clone(),
        status: SeriesStatus::Analysed,
        figures: Some(Figures {
            involvement_percent: inv,
            regional: Regional { lungs: vec![lung("right", -80.0), lung("left", 80.0)], ..Default::default() },
            lesions: vec![lungsentry::analysis::Lesion {
                id: 1,
                volume_ml: vol,
                mean_hu: -500.0,
                first_slice: 0,
                last_slice: 0,
                centroid_mm: [-80.0, 10.0, 0.0],
                side: "right".into(),
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let rule = ProgressionRule { relative_percent: 50.0, absolute_points: 1.0 };
    // The 20 April study first: nothing to compare with.
    let mut r_late = result(late, "20200420", 9.0, 30.0);
    assert!(lungsentry::pipeline::link_follow_ups(&store, &pk, late, &mut r_late, rule, true, None)
        .unwrap()
        .is_empty());
    let v_late = store.record_result(late, true, 9.0, &r_late.to_json(), false).unwrap();
    // The 1 April study arrives: 20 April now compares with it (9 vs 3 %: progression, alert queued).
    let mut r_early = result(early, "20200401", 3.0, 10.0);
    let links = lungsentry::pipeline::link_follow_ups(&store, &pk, early, &mut r_early, rule, true, None).unwrap();
    assert_eq!(links.len(), 1);
    assert_eq!((links[0].series_instance_uid.as_str(), links[0].result_version), (late, v_late));
    assert!(links[0].alert_payload.is_some());
    store
        .record_result_with_outputs(NewResult {
            series_uid: early,
            revision: None,
            positive: false,
            involvement_percent: 3.0,
            result_json: &r_early.to_json(),
            alert: false,
            outputs_due: false,
            links: &links,
        })
        .unwrap();
    let shown = store.latest_result(late).unwrap().unwrap();
    assert_eq!(shown.version, v_late, "no new version of the later series");
    assert_eq!(store.result_history(late).unwrap().len(), 1);
    let f = &shown.result["follow_up"];
    assert_eq!(f["prior_series_instance_uid"], early);
    assert_eq!(f["relinked"], true);
    assert_eq!(f["progression"], true);
    assert_eq!(f["lesions"][0]["change"], "grown");
    assert_eq!(store.results_for_patient(&pk).unwrap()[1].result["follow_up"], *f);
    let due = store.due_outbox(i64::MAX, 10).unwrap();
    let key = format!("{late}/v{v_late}/prior/{early}");
    assert_eq!(due.iter().map(|o| o.dedup_key.as_str()).collect::<Vec<_>>(), [key.as_str()]);
    let body: serde_json::Value = serde_json::from_str(&due[0].payload_json).unwrap();
    assert_eq!(body["alert_reasons"], serde_json::json!(["progression"]));
    assert_eq!(body["follow_up"]["prior_series_instance_uid"], early);
    assert_eq!(body["series_instance_uid"], late);
    assert!(!due[0].payload_json.contains("ROE") && !due[0].payload_json.contains("PID7"));
    // The same prior seen again (re-sent unchanged): nothing new to store, no second alert.
    let again = lungsentry::pipeline::link_follow_ups(&store, &pk, early, &mut r_early, rule, true, None).unwrap();
    assert!(again.is_empty(), "{again:?}");
    // A stale link (the later series was re-analysed meanwhile) is not stored.
    let mut stale = links[0].clone();
    stale.follow_up["involvement_change_points"] = serde_json::json!(1.0);
    store.record_result(late, true, 9.0, &r_late.to_json(), false).unwrap();
    store
        .record_result_with_outputs(NewResult {
            series_uid: early,
            revision: None,
            positive: false,
            involvement_percent: 3.0,
            result_json: &r_early.to_json(),
            alert: false,
            outputs_due: false,
            links: &[stale],
        })
        .unwrap();
    assert_eq!(store.follow_up_links(late).unwrap().len(), 1);
    assert!(store.latest_result(late).unwrap().unwrap().result.get("follow_up").is_none(), "v2 shows its own");
    assert_eq!(store.due_outbox(i64::MAX, 10).unwrap().len(), 1);
}

/// A backward link whose amended SR a destination wants keeps the later series' pixels from retention until the
/// SR is queued (it is built from the spooled instances' headers); queueing clears the mark in the same
/// transaction, and the queued SR is the one a further amendment replaces.
/// Records the prior series `early`'s result with a backward link to version `v` of `late` whose amended SR is due.
fn record_prior_linking(store: &Store, early: &str, late: &str, v: u32, follow_up: serde_json::Value) {
    let link = lungsentry::store::FollowUpLink {
        series_instance_uid: late.into(),
        result_version: v,
        prior_series_instance_uid: early.into(),
        follow_up,
        alert_payload: None,
        outputs_due: true,
    };
    let result = serde_json::json!({"status": "analysed"});
    store
        .record_result_with_outputs(NewResult {
            series_uid: early,
            revision: None,
            positive: false,
            involvement_percent: 3.0,
            result_json: &result,
            alert: false,
            outputs_due: false,
            links: &[link],
        })
        .unwrap();
}

#[test]
fn a_link_awaiting_its_amended_sr_holds_retention_until_queued() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("db.sqlite")).unwrap();
    let pk = patient_key(b"salt", "PID8", "POE^ANN");
    let (early, late) = ("1.2.826.0.8.1", "1.2.826.0.8.2");
    for s in [late, early] {
        store.record_instance(&fake_instance(s, &format!("{s}.1"), ("PID8", "POE^ANN"), 1), 1, &pk).unwrap();
    }
    let v = store.record_result(late, true, 9.0, &serde_json::json!({"status": "analysed"}), false).unwrap();
    let candidates = |s: &Store| -> Vec<String> {
        s.purge_candidates(None, 10).unwrap().into_iter().map(|c| c.series_instance_uid).collect()
    };
    assert_eq!(candidates(&store), vec![late.to_string()]);
    record_prior_linking(
        &store,
        early,
        late,
        v,
        serde_json::json!({"prior_series_instance_uid": early, "relinked": true}),
    );
    assert_eq!(candidates(&store), vec![early.to_string()], "the later series' pixels are held for its SR");
    let awaiting = store.links_awaiting_outputs().unwrap();
    assert_eq!(awaiting.len(), 1);
    let lungsentry::store::LinkAwaitingOutputs { id, link: l, .. } = &awaiting[0];
    assert!(l.outputs_due && l.series_instance_uid == late);
    assert_eq!(store.latest_queued_sr(late, v as i64).unwrap(), None);
    let row = lungsentry::store::NewDicomOutput {
        destination: "PACS@127.0.0.1:104".into(),
        kind: "sr".into(),
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.34".into(),
        sop_instance_uid: "2.25.42".into(),
        path: tmp.path().join("sr.dcm"),
    };
    assert_eq!(store.enqueue_link_outputs(*id, std::slice::from_ref(&row)).unwrap(), 1);
    assert!(store.links_awaiting_outputs().unwrap().is_empty(), "cleared with its outbox row");
    assert_eq!(store.enqueue_link_outputs(*id, &[row]).unwrap(), 0, "never queued twice");
    assert_eq!(store.latest_queued_sr(late, v as i64).unwrap().as_deref(), Some("2.25.42"));
    // Still held while the SR is undelivered; free once it is delivered.
    assert_eq!(candidates(&store), vec![early.to_string()]);
    let out = store.dicom_outbox_of_series(late).unwrap();
    store.mark_dicom_delivered(out[0].row.id, 0).unwrap();
    let mut c = candidates(&store);
    c.sort();
    assert_eq!(c, vec![early.to_string(), late.to_string()]);
}

#[test]
fn an_amended_sr_whose_series_pixels_were_purged_first_is_given_up_with_the_mark_cleared() {
    // The prior study arrives after retention purged the later series' pixels: its amended SR can never be made
    // (the SR needs one spooled header), so the mark is cleared instead of failing at every start.
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("db.sqlite")).unwrap();
    let pk = patient_key(b"salt", "PID9", "ROE^BEA");
    let (early, late) = ("1.2.826.0.9.1", "1.2.826.0.9.2");
    for s in [late, early] {
        store.record_instance(&fake_instance(s, &format!("{s}.1"), ("PID9", "ROE^BEA"), 1), 1, &pk).unwrap();
    }
    let result = serde_json::json!({"status": "analysed", "positive": true, "series_instance_uid": late,
                                    "slice_sop_instance_uids": [format!("{late}.1")]});
    let v = store.record_result(late, true, 9.0, &result, false).unwrap();
    assert!(!store.mark_series_purged(late).unwrap().is_empty(), "the later series' pixels are purged");
    record_prior_linking(&store, early, late, v, serde_json::Value::Null);
    let awaiting = store.links_awaiting_outputs().unwrap();
    assert_eq!(awaiting.len(), 1);
    let lungsentry::store::LinkAwaitingOutputs { id, created_at, link } = &awaiting[0];
    let cfg = lungsentry::outputs::OutputsConfig {
        dicom: vec![lungsentry::outputs::DicomDestination {
            ae_title: "PACS".into(),
            host: "127.0.0.1".into(),
            port: 104,
            objects: vec![lungsentry::outputs::ObjectKind::Sr],
            only_positive: false,
        }],
        ..Default::default()
    };
    let typed = lungsentry::result::SeriesResult::from_json(result.clone()).unwrap();
    assert!(lungsentry::outputs::outbox::wants_sr(&cfg, &typed));
    let n = lungsentry::outputs::outbox::enqueue_link_outputs(&store, &cfg, tmp.path(), *id, *created_at, link)
        .expect("a purged series is not an error");
    assert_eq!(n, 0, "nothing queued");
    assert!(store.links_awaiting_outputs().unwrap().is_empty(), "the mark is cleared: not retried at every start");
    assert!(store.dicom_outbox_of_series(late).unwrap().is_empty());
}
