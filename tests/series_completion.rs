//! Series completion without the blanket quiet period (issue 24), through a real sender (pynetdicom,
//! `tests/py/send_plan.py`) and the daemon as a separate process with a real webhook receiver.
//!
//! Each way a scanner really sends must give exactly one final result covering every instance it sent and exactly
//! one alert for the positive series: three associations, one image per association, a shuffled order, a trickle
//! pausing 5 s mid-association, a slice missing in the middle (no early completion: the quiet period applies). An
//! early completion followed by a late instance gives a second version and still one alert.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{dcm_files, phantom, webhook_receiver, Daemon};
use serde_json::json;

/// One sending plan: associations of (file, pause before it).
type Plan = Vec<Vec<(PathBuf, f64)>>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Sends `plan` with pynetdicom to `daemon`; panics (with the daemon's association log lines) unless every C-STORE
/// got success.
fn send(daemon: &Daemon, plan: &Plan, between_s: f64, dir: &Path) {
    let port = daemon.port;
    let plan_json = json!({
        "associations": plan.iter().map(|a| a.iter().map(|(f, p)| json!({"file": f, "pause_s": p})).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "between_s": between_s,
    });
    let plan_path = dir.join(format!("plan-{}.json", std::process::id() as u128 + Instant::now().elapsed().as_nanos()));
    std::fs::write(&plan_path, plan_json.to_string()).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // pynetdicom lives off PATH in target/pynetdicom (scripts/test installs it there: its console scripts would
    // shadow DCMTK's storescu/storescp/echoscu).
    let lib = root.join("target/pynetdicom");
    assert!(
        lib.join("pynetdicom").is_dir(),
        "pynetdicom missing: python3 -m pip install --no-deps --target target/pynetdicom pynetdicom==3.0.4"
    );
    let out = std::process::Command::new("python3")
        .arg(root.join("tests/py/send_plan.py"))
        .env("PYTHONPATH", &lib)
        .arg(port.to_string())
        .arg(&plan_path)
        .output()
        .expect("python3 tests/py/send_plan.py");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        let log: Vec<String> = daemon
            .log()
            .lines()
            .filter(|l| l.contains("association") || l.contains("WARN") || l.contains("ERROR"))
            .map(common::strip_ansi)
            .collect();
        let tail = log[log.len().saturating_sub(40)..].join("\n");
        panic!("sender failed:\n{text}\ndaemon log (associations, warnings):\n{tail}");
    }
}

/// A running scenario: a positive phantom, the daemon, the webhook receiver.
struct Scenario {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    files: Vec<PathBuf>,
    series: String,
    daemon: Daemon,
    alerts: common::Received,
    _rt: tokio::runtime::Runtime,
}

impl Scenario {
    fn new(seed: u64) -> Scenario {
        assert!(common::model_shipped(), "the shipped model is needed");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let truth = phantom(&dir.join("ph"), seed, 40, "severe");
        let files = dcm_files(&dir.join("ph"));
        assert_eq!(files.len(), 40);
        let rt = runtime();
        let (hook, alerts) = webhook_receiver(&rt);
        let daemon = Daemon::start(&dir.join("d"), &format!("[alerts]\nwebhook_url = \"http://{hook}/alert\"\n"));
        let series = truth["series_instance_uid"].as_str().unwrap().to_string();
        Scenario { _tmp: tmp, dir, files, series, daemon, alerts, _rt: rt }
    }

    /// Waits for a result covering `n` instances, then a further 4 s (past the 2 s quiet period) for any version
    /// that should not come; returns (latest result, alerts for the series).
    fn settle(&self, n: usize) -> (lungsentry::store::StoredResult, usize) {
        let store = self.daemon.store();
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            if let Some(r) = store.latest_result(&self.series).unwrap() {
                if r.result["n_slices"].as_u64() == Some(n as u64) {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "no result covering {n} instances; log:\n{}", self.daemon.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(4));
        let r = store.latest_result(&self.series).unwrap().unwrap();
        // The alert (if any) is delivered by the outbox worker right after the commit; give it its time.
        let deadline = Instant::now() + Duration::from_secs(30);
        while r.positive && self.alert_count() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        (r, self.alert_count())
    }

    fn alert_count(&self) -> usize {
        self.alerts.lock().unwrap().iter().filter(|(_, _, body)| body.contains(&self.series)).count()
    }

    /// How the series was completed, from the daemon's log (`rule=...` of each "series complete" line).
    fn rules(&self) -> Vec<String> {
        self.daemon
            .log()
            .lines()
            .filter(|l| l.contains("series complete"))
            .map(common::strip_ansi)
            .filter_map(|l| l.split(" rule=").nth(1).map(str::to_string))
            .map(|r| r.trim_start_matches('"').to_string())
            .map(|r| r.chars().take_while(|c| c.is_ascii_alphabetic()).collect())
            .collect()
    }

    /// Asserts one version covering all `n` sent instances, every one analysed, one alert when positive (and
    /// positive when the whole phantom was sent).
    fn assert_one_result_one_alert(&self, n: usize) {
        let (r, alerts) = self.settle(n);
        let rules = self.rules();
        assert_eq!(r.version, 1, "expected exactly one result version (completions by rule: {rules:?})");
        assert_eq!(r.result["analysed_slices"].as_u64(), Some(n as u64), "{}", r.result);
        if n == self.files.len() {
            assert!(r.positive, "the severe phantom is positive: {}", r.result);
        }
        assert_eq!(alerts, r.positive as usize, "exactly one alert for a positive series, none otherwise");
        eprintln!("completion rules: {rules:?}");
    }
}

/// The phantom every scenario sends (a severe 40-slice phantom the shipped model flags).
const SEED: u64 = 24_001;

fn one_association(files: &[PathBuf]) -> Plan {
    vec![files.iter().map(|f| (f.clone(), 0.0)).collect()]
}

#[test]
fn a_series_split_over_three_associations_gives_one_result_and_one_alert() {
    let s = Scenario::new(SEED);
    let plan: Plan = s.files.chunks(14).map(|c| c.iter().map(|f| (f.clone(), 0.0)).collect()).collect();
    assert_eq!(plan.len(), 3);
    send(&s.daemon, &plan, 0.0, &s.dir);
    s.assert_one_result_one_alert(40);
}

#[test]
fn one_image_per_association_gives_one_result_and_one_alert() {
    let s = Scenario::new(SEED);
    let plan: Plan = s.files.iter().map(|f| vec![(f.clone(), 0.0)]).collect();
    send(&s.daemon, &plan, 0.0, &s.dir);
    s.assert_one_result_one_alert(40);
}

#[test]
fn a_shuffled_order_completes_early_with_one_result_and_one_alert() {
    let s = Scenario::new(SEED);
    // A fixed shuffle (stride 17 over 40 is a permutation): the stack is judged on positions, not arrival order.
    let files: Vec<PathBuf> = (0..40).map(|i| s.files[(i * 17) % 40].clone()).collect();
    send(&s.daemon, &one_association(&files), 0.0, &s.dir);
    s.assert_one_result_one_alert(40);
    assert_eq!(s.rules(), vec!["stack"], "a whole, evenly spaced stack completes without the quiet period");
}

#[test]
fn a_trickle_pausing_5_s_mid_association_gives_one_result_and_one_alert() {
    let s = Scenario::new(SEED);
    let mut plan = one_association(&s.files);
    plan[0][20].1 = 5.0;
    send(&s.daemon, &plan, 0.0, &s.dir);
    s.assert_one_result_one_alert(40);
}

#[test]
fn a_missing_slice_in_the_middle_waits_for_the_quiet_period_and_gives_one_result() {
    let s = Scenario::new(SEED);
    let mut files = s.files.clone();
    files.remove(20);
    send(&s.daemon, &one_association(&files), 0.0, &s.dir);
    s.assert_one_result_one_alert(39);
    assert_eq!(s.rules(), vec!["quiet"], "a stack with a gap is not provably whole");
    let r = s.daemon.store().latest_result(&s.series).unwrap().unwrap();
    assert_eq!(r.result["gaps"].as_array().map(|g| g.len()), Some(1), "{}", r.result);
}

#[test]
fn early_completion_then_a_late_instance_gives_a_second_version_and_no_second_alert() {
    let s = Scenario::new(SEED);
    // All but the last slice: an even stack, complete at its release.
    send(&s.daemon, &one_association(&s.files[..39]), 0.0, &s.dir);
    let (first, alerts) = s.settle(39);
    assert_eq!((first.version, alerts), (1, first.positive as usize), "{}", first.result);
    assert_eq!(s.rules(), vec!["stack"]);
    // The late slice re-opens the series: a new version covering all 40, no second alert for the same flag.
    send(&s.daemon, &one_association(&s.files[39..]), 0.0, &s.dir);
    let (second, alerts) = s.settle(40);
    assert_eq!(second.version, 2, "{}", second.result);
    assert_eq!(second.result["analysed_slices"].as_u64(), Some(40));
    assert!(second.positive);
    assert_eq!(alerts, 1, "no duplicate alert for the same flag");
}
