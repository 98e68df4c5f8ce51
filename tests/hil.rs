//! The HIL harness (`lungsentry hil`, issue 5) run like a tester runs it — the binary, a manifest, a target —
//! against a local `lungsentry serve` (a separate process, HTTP API on, webhook pointed at the harness):
//! the shipped manifest (tests/hil/manifest.toml: phantoms with truth and the real DICOM, the Siemens series
//! expected refused for its blank UIDs) must produce both reports with every series correct and exit 0; a manifest with an impossible latency threshold must exit
//! non-zero with the missed threshold in its report.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// The manifest every tester starts from.
fn shipped_manifest() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hil/manifest.toml")
}

/// A local appliance whose webhook goes to `hook_port` (signed with `secret`); HTTP API on loopback with the token
/// it creates itself in `data/http-token`, as an installed appliance does.
fn appliance(dir: &Path, hook_port: u16, secret: &str) -> HttpDaemon {
    HttpDaemon::start_full(
        dir,
        "purge_high_water_percent = 100.0",
        "",
        &format!("[alerts]\nwebhook_url = \"http://127.0.0.1:{hook_port}/alert\"\nwebhook_secret = \"{secret}\"\n"),
    )
}

/// `lungsentry hil` against `d`, listening on `hook_port`, reports into `out`.
fn run_harness(d: &HttpDaemon, hook_port: u16, secret: &str, manifest: &Path, out: &Path) -> Output {
    Command::new(bin())
        .args(["hil", "--manifest"])
        .arg(manifest)
        .args(["--host", "127.0.0.1", "--port", &d.dicom_port.to_string(), "--called-ae", "LUNGSENTRY"])
        .args(["--listen", &format!("127.0.0.1:{hook_port}"), "--webhook-secret", secret])
        .args(["--api", &format!("http://127.0.0.1:{}", d.http_port), "--api-token-file"])
        .arg(d.dir.join("data/http-token"))
        .arg("--data")
        .arg(data_dir())
        .arg("--out")
        .arg(out)
        .output()
        .expect("run lungsentry hil")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn report(out: &Path) -> serde_json::Value {
    let path = out.join("report.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[test]
fn shipped_manifest_against_a_local_daemon_all_series_correct() {
    if !model_shipped() {
        eprintln!("SKIP: models/manifest.toml is not shipped yet");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let hook_port = free_port();
    let d = appliance(&tmp.path().join("d"), hook_port, "hil-secret");
    let out = tmp.path().join("report");
    let o = run_harness(&d, hook_port, "hil-secret", &shipped_manifest(), &out);
    let log = std::fs::read_to_string(d.dir.join("daemon.log")).unwrap_or_default();
    assert!(o.status.success(), "harness failed:\n{}\ndaemon log:\n{log}", text(&o));
    eprintln!("{}", text(&o).lines().rfind(|l| l.starts_with("hil: ")).unwrap_or(""));

    let r = report(&out);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.starts_with("# lungsentry HIL report — PASSED"), "{md}");
    assert_eq!(r["passed"], true);
    let series = r["series"].as_array().unwrap();
    let manifest: toml::Table = toml::from_str(&std::fs::read_to_string(shipped_manifest()).unwrap()).unwrap();
    let entries = manifest["series"].as_array().unwrap();
    for e in entries {
        let name = e["name"].as_str().unwrap();
        assert!(series.iter().any(|s| s["entry"] == name), "no row for entry {name}");
        assert!(md.contains(name), "report.md lacks {name}");
    }
    let mut positives = 0;
    let mut refused = 0;
    for s in series {
        assert_eq!(s["correct"], true, "{s}");
        assert!(s["failures"].as_array().unwrap().is_empty(), "{s}");
        if s["expected"]["expect"] == "refused" {
            // Every instance answered with a failure status; nothing to show in the API.
            refused += 1;
            assert!(s["result"].is_null(), "{s}");
            assert_eq!(s["refused"], s["instances"], "{s}");
            assert_eq!(s["alerts"], 0, "{s}");
            continue;
        }
        assert!(s["result"].is_object(), "{s}");
        if s["result"]["positive"] == true {
            positives += 1;
            assert_eq!(s["alerts"], 1, "one alert per positive series: {s}");
            assert!(s["alert_latency_s"].as_f64().is_some(), "{s}");
        }
    }
    let phantom_positives =
        entries.iter().filter(|e| e.get("phantom").is_some_and(|p| p["severity"].as_str() != Some("none"))).count();
    assert!(positives >= phantom_positives && phantom_positives > 0, "{positives} positives");
    let summary = &r["summary"];
    assert_eq!(summary["correct"], summary["series"]);
    assert_eq!(summary["alert_latency_s"]["n"], positives);
    assert!(summary["alert_latency_s"]["p95"].as_f64().is_some());
    let refused_entries = entries.iter().filter(|e| e.get("expect").is_some_and(|x| x.as_str() == Some("refused")));
    assert!(refused >= refused_entries.count() && refused > 0, "{refused} refused series");
    assert_eq!(summary["result_latency_s"]["n"].as_u64().unwrap() as usize, series.len() - refused);
    assert!(r["thresholds"].as_array().unwrap().iter().all(|c| c["met"] == true), "{}", r["thresholds"]);
    // The report names the appliance's model and engine, and the prepared copies are gone.
    assert!(r["target"]["readyz"]["model"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(!out.join("series").exists());
}

#[test]
fn a_missed_threshold_exits_non_zero_and_says_which() {
    if !model_shipped() {
        eprintln!("SKIP: models/manifest.toml is not shipped yet");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The shipped manifest's first positive phantom alone, with a p95 alert latency no appliance can meet.
    let mut manifest: toml::Table = toml::from_str(&std::fs::read_to_string(shipped_manifest()).unwrap()).unwrap();
    let first_positive = manifest["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e.get("phantom").is_some_and(|p| p["severity"].as_str() != Some("none")))
        .unwrap()
        .clone();
    manifest.insert("series".into(), toml::Value::Array(vec![first_positive]));
    let thresholds = manifest.get_mut("thresholds").unwrap().as_table_mut().unwrap();
    thresholds.insert("max_alert_latency_p95_s".into(), toml::Value::Float(0.001));
    let path = tmp.path().join("impossible.toml");
    std::fs::write(&path, toml::to_string(&manifest).unwrap()).unwrap();

    let hook_port = free_port();
    let d = appliance(&tmp.path().join("d"), hook_port, "s2");
    let out = tmp.path().join("report");
    let o = run_harness(&d, hook_port, "s2", &path, &out);
    assert!(!o.status.success(), "an impossible threshold must fail the run:\n{}", text(&o));
    assert!(text(&o).contains("thresholds missed: max_alert_latency_p95_s"), "{}", text(&o));
    let r = report(&out);
    assert_eq!(r["passed"], false);
    let checks = r["thresholds"].as_array().unwrap();
    let p95 = checks.iter().find(|c| c["name"] == "max_alert_latency_p95_s").unwrap();
    assert_eq!(p95["met"], false, "{p95}");
    assert!(p95["value"].as_f64().unwrap() > 0.001);
    // Everything else held: the run failed on the threshold alone.
    assert!(r["series"].as_array().unwrap().iter().all(|s| s["correct"] == true), "{}", r["series"]);
    assert!(checks.iter().filter(|c| c["name"] != "max_alert_latency_p95_s").all(|c| c["met"] == true));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.starts_with("# lungsentry HIL report — FAILED") && md.contains("| max_alert_latency_p95_s | 0.001 |"));
}
