//! The scanner is never made to wait long (issue 24): with an engine slowed on purpose (the `test-hooks` feature's
//! `LUNGSENTRY_TEST_SLOW_ENGINE_MS`, 300 ms more per slice: a slow box such as tract on a Jetson's CPU cores),
//! DCMTK `storescu` with its default timeouts sends a 300-slice series and sees no timeout and no failure; every
//! slice is analysed; the longest C-STORE response hold (from `/metrics`) stays within `engine.max_response_hold_s`
//! and is reported.
//!
//! Run by `scripts/test` as its own step: `cargo test --release --features test-hooks --test slow_engine`.
#![cfg(feature = "test-hooks")]

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// The daemon's `/metrics` text (with the token it keeps in its data dir).
fn metrics(d: &common::HttpDaemon) -> String {
    let token = std::fs::read_to_string(d.dir.join("data/http-token")).unwrap_or_default();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", d.http_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\r\n", token.trim()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// The value of the unlabelled gauge `name`.
fn gauge(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

#[test]
fn storescu_sending_300_slices_to_a_slow_engine_never_times_out_and_every_slice_is_analysed() {
    assert!(common::model_shipped(), "the shipped model is needed");
    let tmp = tempfile::tempdir().unwrap();
    let ph = tmp.path().join("ph");
    let truth = common::phantom(&ph, 24_100, 300, "moderate");
    let series = truth["series_instance_uid"].as_str().unwrap().to_string();
    // Inherited by the daemon process only (this file holds one test).
    std::env::set_var("LUNGSENTRY_TEST_SLOW_ENGINE_MS", "300");
    let d = common::HttpDaemon::start(&tmp.path().join("d"), "", "");
    let t0 = Instant::now();
    // storescu's defaults: no DIMSE timeout of its own, so a hold shows as a long send, never as a failure; the
    // longest hold below is what a scanner with a 30-60 s DIMSE timeout would have waited.
    let (ok, out) = common::storescu(d.dicom_port, "CT1", &[&ph], true);
    let send_s = t0.elapsed().as_secs_f64();
    assert!(ok, "storescu failed:\n{out}");
    let lower = out.to_lowercase();
    assert!(!lower.contains("timeout") && !lower.contains("failed"), "storescu reported a problem:\n{out}");
    assert_eq!(out.matches("Received Store Response (Success)").count(), 300, "not 300 successes:\n{out}");

    let text = metrics(&d);
    let longest = gauge(&text, "lungsentry_response_hold_longest_seconds");
    let capped = gauge(&text, "lungsentry_response_holds_capped");
    let backlog_s = gauge(&text, "lungsentry_backlog_seconds");
    eprintln!(
        "slow engine (+300 ms/slice): 300 slices sent in {send_s:.1} s; longest response hold {longest:.2} s \
         (cap 1.5 s), holds capped {capped}, backlog at the end of the send {backlog_s:.1} s"
    );
    // The pacing held responses (the engine was the slower side) but never past the cap (plus scheduling slack).
    assert!(longest > 0.05, "no response was held: the slow engine did not slow anything? longest {longest}");
    assert!(longest <= 1.5 + 0.5, "a response was held {longest} s, past engine.max_response_hold_s = 1.5");

    // Every slice analysed, in one result.
    let store = lungsentry::store::Store::open(&d.dir.join("data/lungsentry.sqlite")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    let r = loop {
        if let Some(r) = store.latest_result(&series).unwrap() {
            if r.result["n_slices"].as_u64() == Some(300) {
                break r;
            }
        }
        assert!(Instant::now() < deadline, "no result covering 300 slices");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(r.result["analysed_slices"].as_u64(), Some(300), "{}", r.result);
    assert_eq!(r.result["slice_errors"].as_array().map(|e| e.len()), Some(0), "{}", r.result);
    eprintln!("result v{} after {:.1} s from the first slice", r.version, t0.elapsed().as_secs_f64());
}
