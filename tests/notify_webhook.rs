//! The webhook outbox against a real local HTTP server (axum): retry with back-off, HMAC signature, exactly one
//! successful delivery, and survival of a restart (the alert lives in SQLite until delivered).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use hmac::{KeyInit, Mac};
use lungsentry::config::AlertsConfig;
use lungsentry::instance::InstanceMeta;
use lungsentry::notify::{run_webhook_outbox, DEDUP_HEADER, SIGNATURE_HEADER};
use lungsentry::spool::SpooledInstance;
use lungsentry::store::Store;

const SECRET: &str = "s3cret-for-tests";

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

/// Test receiver: answers 500 to the first `fail_first` requests, then 200; records everything.
#[derive(Default)]
struct Receiver {
    fail_first: usize,
    seen: Mutex<Vec<Seen>>,
}

async fn hook(State(rx): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mut seen = rx.seen.lock().unwrap();
    let status = if seen.len() < rx.fail_first { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK };
    seen.push(Seen { at: Instant::now(), status: status.as_u16(), headers, body });
    status
}

async fn start_receiver(fail_first: usize) -> (String, Arc<Receiver>) {
    let rx = Arc::new(Receiver { fail_first, ..Default::default() });
    let app = Router::new().route("/hook", post(hook)).with_state(rx.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), rx)
}

fn instance(series: &str) -> SpooledInstance {
    SpooledInstance {
        meta: InstanceMeta {
            sop_instance_uid: format!("{series}.1"),
            sop_class_uid: lungsentry::instance::CT_IMAGE_STORAGE.into(),
            study_instance_uid: format!("{series}.0"),
            series_instance_uid: series.into(),
            patient_id: "PID9".into(),
            patient_name: "ROE^RICHARD".into(),
            study_date: "20200402".into(),
            modality: "CT".into(),
            image_type: vec!["ORIGINAL".into(), "PRIMARY".into()],
            image_position: None,
            image_orientation: None,
            slice_thickness: Some(1.0),
            pixel_spacing: None,
            instance_number: Some(1),
            rows: Some(512),
            columns: Some(512),
            number_of_frames: 1,
            has_pixel_data: true,
            images_in_acquisition: None,
            derived_uids: Vec::new(),
        },
        path: PathBuf::from("/nonexistent.dcm"),
        transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
        bytes: 1,
        unchanged_since_ms: None,
    }
}

fn alerts(url: &str) -> AlertsConfig {
    AlertsConfig { webhook_url: Some(url.into()), webhook_secret: Some(SECRET.into()), ..Default::default() }
}

fn expected_signature(body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_is_retried_signed_and_delivered_once() {
    let (url, rx) = start_receiver(1).await;
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&tmp.path().join("db.sqlite")).unwrap());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(run_webhook_outbox(store.clone(), alerts(&url), stop_rx));

    let series = "1.2.826.0.9.1";
    store.record_instance(&instance(series), 1, "0123456789abcdef0123456789abcdef").unwrap();
    let result = serde_json::json!({
        "series_instance_uid": series, "patient_key": "0123456789abcdef0123456789abcdef",
        "positive": true, "involvement_percent": 7.25
    });
    // The worker is idle (long poll); recording the result must wake it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queued_at = Instant::now();
    store.record_result(series, true, 7.25, &result, true).unwrap();

    wait_for("a successful delivery", Duration::from_secs(15), || {
        rx.seen.lock().unwrap().iter().any(|s| s.status == 200)
    })
    .await;
    // Give a duplicate every chance to show up.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let seen = rx.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "expected exactly one failed and one successful request, got {}", seen.len());
    assert_eq!((seen[0].status, seen[1].status), (500, 200));
    assert!(seen[0].at - queued_at < Duration::from_secs(1), "the first try must follow the wake-up at once");
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_millis(900), "retry came after {gap:?}, before the 1 s back-off");

    let ok = &seen[1];
    assert_eq!(ok.headers["content-type"], "application/json");
    assert_eq!(ok.headers[DEDUP_HEADER], format!("{series}/v1").as_str());
    let sig = ok.headers[SIGNATURE_HEADER].to_str().unwrap();
    assert_eq!(sig, expected_signature(&ok.body), "HMAC signature must cover the exact body");
    assert_ne!(sig, expected_signature(b"{}"));
    assert_eq!(seen[0].body, ok.body, "a retry sends the same bytes");
    let body: serde_json::Value = serde_json::from_slice(&ok.body).unwrap();
    assert_eq!(body["dedup_key"], format!("{series}/v1"));
    assert_eq!(body["version"], 1);
    assert_eq!(body["involvement_percent"], 7.25);
    let text = String::from_utf8_lossy(&ok.body);
    assert!(!text.contains("ROE^RICHARD") && !text.contains("PID9"), "raw identifiers in the webhook: {text}");

    let c = store.outbox_counts().unwrap();
    assert_eq!((c.pending, c.delivered), (0, 1));

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), worker).await.expect("worker stops on shutdown").unwrap();
}

/// `alerts.include_patient_identifiers`: off (the default), the body carries none of the patient's name, ID or
/// accession number; on, it carries all three (read from the local store as the body is sent, signed as sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_identifiers_only_with_the_switch() {
    for include in [false, true] {
        let (url, rx) = start_receiver(0).await;
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&tmp.path().join("db.sqlite")).unwrap());
        let series = "1.2.826.0.9.3";
        store.record_instance(&instance(series), 1, "0123456789abcdef0123456789abcdef").unwrap();
        let labels = lungsentry::store::SeriesLabels {
            accession_number: "ACC4711".into(),
            study_time: "091400".into(),
            series_number: "3".into(),
            series_description: "Lung 1.25".into(),
        };
        store.remember_series_labels(series, &labels).unwrap();
        let result = serde_json::json!({
            "series_instance_uid": series, "patient_key": "0123456789abcdef0123456789abcdef",
            "positive": true, "involvement_percent": 3.5
        });
        store.record_result(series, true, 3.5, &result, true).unwrap();
        let cfg = AlertsConfig { include_patient_identifiers: include, ..alerts(&url) };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let worker = tokio::spawn(run_webhook_outbox(store.clone(), cfg, stop_rx));
        wait_for("a delivery", Duration::from_secs(15), || !rx.seen.lock().unwrap().is_empty()).await;
        let seen = rx.seen.lock().unwrap()[0].clone();
        let text = String::from_utf8_lossy(&seen.body).to_string();
        assert_eq!(seen.headers[SIGNATURE_HEADER].to_str().unwrap(), expected_signature(&seen.body));
        let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
        assert_eq!(body["involvement_percent"], 3.5);
        if include {
            assert_eq!(body["patient_name"], "ROE^RICHARD", "{text}");
            assert_eq!(body["patient_id"], "PID9", "{text}");
            assert_eq!(body["accession_number"], "ACC4711", "{text}");
        } else {
            for id in ["ROE^RICHARD", "PID9", "ACC4711"] {
                assert!(!text.contains(id), "{id} in a default webhook body: {text}");
            }
        }
        // The outbox row never holds them either way.
        let row: String = rusqlite::Connection::open(tmp.path().join("db.sqlite"))
            .unwrap()
            .query_row("SELECT payload_json FROM outbox", [], |r| r.get(0))
            .unwrap();
        assert!(!row.contains("PID9") && !row.contains("ACC4711"), "{row}");
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), worker).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undelivered_alert_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db.sqlite");
    let series = "1.2.826.0.9.2";

    // First life: the receiver is down (a port nobody listens on); the attempt fails and is recorded.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hook", l.local_addr().unwrap())
    };
    {
        let store = Arc::new(Store::open(&db).unwrap());
        store.record_instance(&instance(series), 1, "fedcba9876543210fedcba9876543210").unwrap();
        let result = serde_json::json!({"series_instance_uid": series, "positive": true, "involvement_percent": 3.0});
        store.record_result(series, true, 3.0, &result, true).unwrap();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let worker = tokio::spawn(run_webhook_outbox(store.clone(), alerts(&dead), stop_rx));
        let s = store.clone();
        wait_for("a failed attempt", Duration::from_secs(15), move || s.outbox_counts().unwrap().failing == 1).await;
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), worker).await.unwrap().unwrap();
        assert_eq!(store.outbox_counts().unwrap().pending, 1);
    } // "crash": everything in memory is gone

    // Second life: reopen the database; the receiver is up; the alert goes out.
    let (url, rx) = start_receiver(0).await;
    let store = Arc::new(Store::open(&db).unwrap());
    assert_eq!(store.outbox_counts().unwrap().pending, 1, "the alert must survive the restart");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(run_webhook_outbox(store.clone(), alerts(&url), stop_rx));
    wait_for("delivery after restart", Duration::from_secs(15), || !rx.seen.lock().unwrap().is_empty()).await;
    let s = store.clone();
    wait_for("delivered mark", Duration::from_secs(5), move || s.outbox_counts().unwrap().delivered == 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = rx.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers[DEDUP_HEADER], format!("{series}/v1").as_str());
    assert_eq!(seen[0].headers[SIGNATURE_HEADER].to_str().unwrap(), expected_signature(&seen[0].body));
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), worker).await.unwrap().unwrap();
}

#[test]
fn backoff_doubles_from_one_second_and_caps_at_five_minutes() {
    use lungsentry::delivery::backoff;
    assert_eq!(backoff(0), Duration::from_secs(1));
    assert_eq!(backoff(1), Duration::from_secs(2));
    assert_eq!(backoff(5), Duration::from_secs(32));
    assert_eq!(backoff(9), Duration::from_secs(300));
    assert_eq!(backoff(1000), Duration::from_secs(300));
}

/// Captures what `tracing` writes, for the log-line test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn result_log_line_levels_and_no_raw_identifiers() {
    let cap = Captured::default();
    let writer = cap.clone();
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
    let series = "1.2.826.0.9.3";
    use lungsentry::result::{Figures, SeriesResult, SeriesStatus, Timings};
    let analysed = |positive: bool, involvement_percent: f64| SeriesResult {
        series_instance_uid: series.into(),
        patient_key: "00aa".into(),
        status: SeriesStatus::Analysed,
        positive,
        figures: Some(Figures { involvement_percent, ..Default::default() }),
        ..Default::default()
    };
    tracing::subscriber::with_default(subscriber, || {
        lungsentry::notify::log_result(&SeriesResult {
            version: Some(2),
            timings_ms: Timings { decode: 20.5, infer: 812.0, analysis: 31.0, total: 863.5 },
            ..analysed(true, 9.5)
        });
        lungsentry::notify::log_result(&analysed(false, 0.1));
    });
    let text = String::from_utf8(cap.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("POSITIVE") && lines[0].contains("involvement_percent=9.5"),
        "{}",
        lines[0]
    );
    // Structured fields (journald fields under systemd): stage, the timings in ms, version.
    for want in ["stage=\"result\"", "decode_ms=20.5", "infer_ms=812", "analysis_ms=31", "total_ms=863.5", "version=2"]
    {
        assert!(lines[0].contains(want), "{want} missing: {}", lines[0]);
    }
    assert!(lines[1].contains("INFO") && lines[1].contains("negative"), "{}", lines[1]);
    assert!(lines[0].contains(&lungsentry::store::series_log_key(series)));
    {
        let bad = series;
        assert!(!text.contains(bad), "{bad:?} leaked into the log: {text}");
    }
}

/// A receiver that refuses (500) with a body that never ends: the worker reads at most
/// `notify::MAX_ERROR_BODY` bytes of it, records the failure with the start of the body, and moves on — it does
/// not wait for the end of the body (which never comes; reading it all would also mean holding all of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_with_an_endless_body_is_read_only_up_to_the_cap() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                let _ = s.read(&mut buf).await;
                let head = "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = format!("1000\r\n{}\r\n", "E".repeat(0x1000));
                while s.write_all(chunk.as_bytes()).await.is_ok() {}
            });
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&tmp.path().join("db.sqlite")).unwrap());
    let series = "1.2.826.0.9.3";
    store.record_instance(&instance(series), 1, "0123456789abcdef0123456789abcdef").unwrap();
    let result = serde_json::json!({"series_instance_uid": series, "positive": true, "involvement_percent": 5.0});
    store.record_result(series, true, 5.0, &result, true).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(run_webhook_outbox(store.clone(), alerts(&url), stop_rx));
    let s = store.clone();
    wait_for("a failed attempt", Duration::from_secs(30), move || s.outbox_counts().unwrap().failing == 1).await;
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), worker).await.unwrap().unwrap();
    let last_error: String = rusqlite::Connection::open(tmp.path().join("db.sqlite"))
        .unwrap()
        .query_row("SELECT last_error FROM outbox", [], |r| r.get(0))
        .unwrap();
    assert!(last_error.starts_with("HTTP 500"), "{last_error}");
    assert!(
        last_error.ends_with(&"E".repeat(200)),
        "the first 200 characters of the body must be kept (a reader waiting for the end would have none): {last_error}"
    );
    const { assert!(lungsentry::notify::MAX_ERROR_BODY <= 16 << 10) };
}
