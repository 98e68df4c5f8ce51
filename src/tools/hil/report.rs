//! hil::report — judging each series against its truth, the run's latency figures and thresholds, and the two
//! report files (`report.json` for machines, `report.md` for people).
//!
//! Owns: the correctness rules (a phantom must be analysed with the flag its truth.json states — involvement
//! above 0.4 % — and, with a tolerance, an involvement within it; a real series must match its `expect`; in
//! both cases a webhook alert arrives exactly when the result is positive, correctly signed when a secret is
//! given, without the PatientID/PatientName that was sent; a series expected `refused` must have every instance
//! answered with a failure status, no result and no alert), nearest-rank percentiles, and the threshold checks.
//! Never: talks to the appliance.

use serde::Serialize;
use serde_json::{json, Value};

use super::manifest::{Expect, Thresholds};

/// What a row was expected to be.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Expected {
    /// From a phantom's truth.json.
    Phantom {
        /// Truth flag (involvement above 0.4 %).
        positive: bool,
        /// True involvement, percent.
        involvement_percent: f64,
        /// Accepted |error|, points (None: unchecked).
        tolerance: Option<f64>,
    },
    /// From the manifest.
    Real {
        /// The stated outcome.
        expect: Expect,
    },
}

/// One series of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Manifest entry name.
    pub entry: String,
    /// Series Instance UID as sent (re-identified; what the appliance's dashboard shows).
    pub series_instance_uid: String,
    /// Instances of this series sent.
    pub instances: usize,
    /// Instances the appliance did not store (count) and the first reason.
    pub send_failures: usize,
    /// Of those, instances the appliance answered with a failure status (the rest were never sent or never
    /// answered): what an `expect = "refused"` series is judged by.
    pub refused: usize,
    /// First send failure, in words.
    pub send_error: Option<String>,
    /// Seconds the entry took to send (all its series).
    pub send_s: f64,
    /// Images per second asked for (None = unpaced).
    pub rate: Option<f64>,
    /// What it should be.
    pub expected: Expected,
    /// The appliance's latest result (`/api/series/{uid}`), None when none came within the timeout.
    pub result: Option<Value>,
    /// Last acknowledged slice → result visible in the API, seconds (API polled every 100 ms).
    pub result_latency_s: Option<f64>,
    /// Webhook alerts received for this series.
    pub alerts: usize,
    /// Last acknowledged slice → first alert received, seconds.
    pub alert_latency_s: Option<f64>,
    /// Alerts whose signature did not verify.
    pub bad_signatures: usize,
    /// Alerts that carried a PatientID/PatientName that was sent.
    pub identifier_leaks: usize,
    /// Manifest note.
    pub note: Option<String>,
    /// Every reason the row is not correct (empty = correct).
    pub failures: Vec<String>,
}

impl Row {
    /// Whether nothing failed.
    pub fn correct(&self) -> bool {
        self.failures.is_empty()
    }

    /// Fills `failures` from what was observed.
    pub fn judge(&mut self) {
        if matches!(self.expected, Expected::Real { expect: Expect::Refused }) {
            self.failures = self.refusal_failures();
            return;
        }
        let mut f = Vec::new();
        if self.send_failures > 0 {
            f.push(format!(
                "{} of {} instances not stored: {}",
                self.send_failures,
                self.instances,
                self.send_error.as_deref().unwrap_or("?")
            ));
        }
        let Some(r) = &self.result else {
            f.push("no result within the timeout".into());
            if self.alerts > 0 && matches!(self.expected, Expected::Real { expect: Expect::Skipped | Expect::Negative })
            {
                f.push("alerted although no alert was expected".into());
            }
            self.failures = f;
            return;
        };
        let status = r["status"].as_str().unwrap_or("?");
        let positive = r["positive"].as_bool().unwrap_or(false);
        if let Some(n) = r["n_slices"].as_u64() {
            if (n as usize) < self.instances {
                f.push(format!("the result covers {n} of {} instances", self.instances));
            }
        }
        match &self.expected {
            Expected::Phantom { positive: want, involvement_percent: truth, tolerance } => {
                if status != "analysed" {
                    f.push(format!("status {status}, expected analysed ({})", reasons(r)));
                } else {
                    if positive != *want {
                        f.push(format!(
                            "flagged {} but truth is {} (measured {:.2} %, true {truth:.2} %)",
                            word(positive),
                            word(*want),
                            involvement(r)
                        ));
                    }
                    if let Some(tol) = tolerance {
                        let err = (involvement(r) - truth).abs();
                        if !(err <= *tol) {
                            f.push(format!(
                                "involvement {:.2} % vs true {truth:.2} %: error {err:.2} points > {tol}",
                                involvement(r)
                            ));
                        }
                    }
                }
            }
            Expected::Real { expect } => {
                let ok = match expect {
                    Expect::Skipped => status == "skipped",
                    Expect::Refused => unreachable!("judged by refusal_failures"),
                    Expect::Analysed => status == "analysed",
                    Expect::Positive => status == "analysed" && positive,
                    Expect::Negative => status == "analysed" && !positive,
                };
                if !ok {
                    let got = if status == "analysed" { word(positive).to_string() } else { status.to_string() };
                    f.push(format!("expected {}, got {got} ({})", expect_word(*expect), reasons(r)));
                }
            }
        }
        if positive && self.alerts == 0 {
            f.push("positive result but no webhook alert within the timeout".into());
        }
        if !positive && self.alerts > 0 {
            f.push(format!("{} webhook alert(s) for a result that is not positive", self.alerts));
        }
        if self.bad_signatures > 0 {
            f.push(format!("{} alert(s) with a wrong X-Lungsentry-Signature", self.bad_signatures));
        }
        if self.identifier_leaks > 0 {
            f.push(format!("{} alert(s) carry the PatientID/PatientName that was sent", self.identifier_leaks));
        }
        self.failures = f;
    }
}

impl Row {
    /// The failures of a series expected refused: an instance stored, or not refused by the appliance (never
    /// sent, never answered), a result, an alert.
    fn refusal_failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        let stored = self.instances.saturating_sub(self.send_failures);
        if stored > 0 {
            f.push(format!("{stored} of {} instances stored, expected every one refused", self.instances));
        }
        let unanswered = self.send_failures.saturating_sub(self.refused);
        if unanswered > 0 {
            f.push(format!(
                "{unanswered} of {} instances got no failure status from the appliance (not sent or not answered: {})",
                self.instances,
                self.send_error.as_deref().unwrap_or("?")
            ));
        }
        if let Some(r) = &self.result {
            f.push(format!("a result (status {}) although every instance was to be refused", r["status"]));
        }
        if self.alerts > 0 {
            f.push(format!("{} webhook alert(s) for a series whose instances were to be refused", self.alerts));
        }
        f
    }
}

fn involvement(r: &Value) -> f64 {
    r["involvement_percent"].as_f64().unwrap_or(f64::NAN)
}

fn reasons(r: &Value) -> String {
    match r["skip_reasons"].as_array() {
        Some(a) if !a.is_empty() => a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join("; "),
        _ => "no skip reason".into(),
    }
}

fn word(positive: bool) -> &'static str {
    if positive {
        "positive"
    } else {
        "negative"
    }
}

fn expect_word(e: Expect) -> &'static str {
    match e {
        Expect::Positive => "positive",
        Expect::Negative => "negative",
        Expect::Analysed => "analysed",
        Expect::Skipped => "skipped",
        Expect::Refused => "refused",
    }
}

/// n, p50, p95 and max of a sample (nearest rank); all None for an empty sample.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Stats {
    /// Sample size.
    pub n: usize,
    /// Median.
    pub p50: Option<f64>,
    /// 95th percentile.
    pub p95: Option<f64>,
    /// Largest.
    pub max: Option<f64>,
}

impl Stats {
    /// Nearest-rank percentiles of `values`.
    pub fn of(values: &[f64]) -> Stats {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| (!v.is_empty()).then(|| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]);
        Stats { n: v.len(), p50: rank(0.50), p95: rank(0.95), max: v.last().copied() }
    }
}

/// One threshold and whether it was met.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Manifest key.
    pub name: &'static str,
    /// The limit.
    pub limit: f64,
    /// The measured value (None: nothing to measure, which counts as missed).
    pub value: Option<f64>,
    /// Whether it holds.
    pub met: bool,
}

/// The run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Rows.
    pub series: usize,
    /// Correct rows.
    pub correct: usize,
    /// correct / series.
    pub correct_fraction: f64,
    /// Last slice → alert, over rows that alerted.
    pub alert_latency_s: Stats,
    /// Last slice → result in the API, over rows with a result.
    pub result_latency_s: Stats,
    /// POSTs that named no series of this run (other traffic, or not JSON).
    pub unmatched_alerts: usize,
}

/// Summary of `rows`.
pub fn summarise(rows: &[Row], unmatched_alerts: usize) -> Summary {
    let correct = rows.iter().filter(|r| r.correct()).count();
    let alert: Vec<f64> = rows.iter().filter_map(|r| r.alert_latency_s).collect();
    let result: Vec<f64> = rows.iter().filter_map(|r| r.result_latency_s).collect();
    Summary {
        series: rows.len(),
        correct,
        correct_fraction: if rows.is_empty() { 0.0 } else { correct as f64 / rows.len() as f64 },
        alert_latency_s: Stats::of(&alert),
        result_latency_s: Stats::of(&result),
        unmatched_alerts,
    }
}

/// The manifest's thresholds against `s` (min_correct_fraction defaults to 1.0).
pub fn check(t: &Thresholds, s: &Summary) -> Vec<Check> {
    let mut out = Vec::new();
    let min_correct = t.min_correct_fraction.unwrap_or(1.0);
    out.push(Check {
        name: "min_correct_fraction",
        limit: min_correct,
        value: Some(s.correct_fraction),
        met: s.series > 0 && s.correct_fraction >= min_correct,
    });
    let mut max = |name: &'static str, limit: Option<f64>, value: Option<f64>| {
        if let Some(limit) = limit {
            out.push(Check { name, limit, value, met: value.is_some_and(|v| v <= limit) });
        }
    };
    max("max_alert_latency_p95_s", t.max_alert_latency_p95_s, s.alert_latency_s.p95);
    max("max_alert_latency_max_s", t.max_alert_latency_max_s, s.alert_latency_s.max);
    max("max_result_latency_p95_s", t.max_result_latency_p95_s, s.result_latency_s.p95);
    out
}

/// report.json.
pub fn to_json(header: &Value, rows: &[Row], summary: &Summary, checks: &[Check]) -> Value {
    let mut v = header.clone();
    v["series"] = serde_json::to_value(rows).unwrap_or_default();
    for (row, out) in rows.iter().zip(v["series"].as_array_mut().into_iter().flatten()) {
        out["correct"] = json!(row.correct());
    }
    v["summary"] = serde_json::to_value(summary).unwrap_or_default();
    v["thresholds"] = serde_json::to_value(checks).unwrap_or_default();
    v["passed"] = json!(checks.iter().all(|c| c.met));
    v
}

fn secs(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "–".into())
}

/// report.md.
pub fn to_markdown(header: &Value, rows: &[Row], summary: &Summary, checks: &[Check]) -> String {
    use std::fmt::Write;
    let mut md = String::new();
    let passed = checks.iter().all(|c| c.met);
    let h =
        |k: &str| header["target"][k].as_str().map(str::to_string).unwrap_or_else(|| header["target"][k].to_string());
    let _ = writeln!(md, "# lungsentry HIL report — {}\n", if passed { "PASSED" } else { "FAILED" });
    let _ = writeln!(
        md,
        "- run `{}`, started {}, harness lungsentry {}",
        header["run_id"].as_str().unwrap_or("?"),
        header["started_at"].as_str().unwrap_or("?"),
        header["harness_version"].as_str().unwrap_or("?")
    );
    let _ = writeln!(md, "- target: DICOM {}:{} AE `{}`, API {}", h("host"), h("port"), h("called_ae"), h("api"));
    let ready = &header["target"]["readyz"];
    let _ = writeln!(
        md,
        "- appliance: model `{}`, engine `{}`",
        ready["model"].as_str().unwrap_or("?"),
        ready["engine"].as_str().unwrap_or("?")
    );
    let _ = writeln!(md, "- manifest: `{}`\n", header["manifest"].as_str().unwrap_or("?"));
    let _ = writeln!(md, "## Series\n");
    let _ = writeln!(md, "| entry | series UID | slices | rate img/s | expected | status | flag | involvement % (true) | alerts | last slice → alert s | → result s | correct |");
    let _ = writeln!(md, "|---|---|---:|---:|---|---|---|---:|---:|---:|---:|---|");
    for r in rows {
        let (expected, truth) = match &r.expected {
            Expected::Phantom { positive, involvement_percent, .. } => {
                (word(*positive).to_string(), Some(*involvement_percent))
            }
            Expected::Real { expect } => (expect_word(*expect).to_string(), None),
        };
        let res = r.result.as_ref();
        let status = match res.and_then(|v| v["status"].as_str()) {
            Some(s) => s.to_string(),
            None if r.refused > 0 => format!("refused {}/{}", r.refused, r.instances),
            None => "–".into(),
        };
        let flag =
            res.filter(|v| v["status"] == "analysed").and_then(|v| v["positive"].as_bool()).map(word).unwrap_or("–");
        let inv = res
            .and_then(|v| v["involvement_percent"].as_f64())
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "–".into());
        let inv = match truth {
            Some(t) => format!("{inv} ({t:.2})"),
            None => inv,
        };
        let uid = &r.series_instance_uid;
        let short = if uid.len() > 18 { format!("…{}", &uid[uid.len() - 12..]) } else { uid.clone() };
        let rate = r.rate.map(|x| format!("{x}")).unwrap_or_else(|| "unpaced".into());
        let _ = writeln!(
            md,
            "| {} | `{short}` | {} | {rate} | {expected} | {status} | {flag} | {inv} | {} | {} | {} | {} |",
            r.entry,
            r.instances,
            r.alerts,
            secs(r.alert_latency_s),
            secs(r.result_latency_s),
            if r.correct() { "yes" } else { "**no**" }
        );
    }
    let _ = writeln!(md, "\n## Latency (from the last acknowledged slice)\n");
    let _ = writeln!(md, "| measure | n | p50 s | p95 s | max s |\n|---|---:|---:|---:|---:|");
    for (name, s) in
        [("webhook alert", &summary.alert_latency_s), ("result in the API (100 ms polling)", &summary.result_latency_s)]
    {
        let _ = writeln!(md, "| {name} | {} | {} | {} | {} |", s.n, secs(s.p50), secs(s.p95), secs(s.max));
    }
    let _ = writeln!(md, "\n## Thresholds\n\n| threshold | limit | measured | met |\n|---|---:|---:|---|");
    for c in checks {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            c.name,
            c.limit,
            c.value.map(|v| format!("{v:.3}")).unwrap_or_else(|| "no sample".into()),
            if c.met { "yes" } else { "**no**" }
        );
    }
    let _ = writeln!(md, "\n## Failures\n");
    let failed: Vec<&Row> = rows.iter().filter(|r| !r.correct()).collect();
    if failed.is_empty() {
        let _ = writeln!(md, "None: {} of {} series correct.", summary.correct, summary.series);
    }
    for r in failed {
        let _ = writeln!(md, "- **{}** (`{}`): {}", r.entry, r.series_instance_uid, r.failures.join("; "));
    }
    if summary.unmatched_alerts > 0 {
        let _ = writeln!(md, "\n{} webhook POST(s) named no series of this run (ignored).", summary.unmatched_alerts);
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(expected: Expected, result: Option<Value>, alerts: usize) -> Row {
        Row {
            entry: "e".into(),
            series_instance_uid: "2.25.1".into(),
            instances: 40,
            send_failures: 0,
            refused: 0,
            send_error: None,
            send_s: 2.0,
            rate: Some(20.0),
            expected,
            result,
            result_latency_s: Some(3.0),
            alerts,
            alert_latency_s: (alerts > 0).then_some(3.1),
            bad_signatures: 0,
            identifier_leaks: 0,
            note: None,
            failures: Vec::new(),
        }
    }

    fn phantom(positive: bool, inv: f64) -> Expected {
        Expected::Phantom { positive, involvement_percent: inv, tolerance: Some(1.0) }
    }

    fn result(status: &str, positive: bool, inv: f64) -> Option<Value> {
        Some(
            json!({"status": status, "positive": positive, "involvement_percent": inv, "n_slices": 40, "skip_reasons": []}),
        )
    }

    #[test]
    fn judging() {
        let judged = |mut r: Row| {
            r.judge();
            r.failures
        };
        assert!(judged(row(phantom(true, 5.0), result("analysed", true, 5.5), 1)).is_empty());
        assert!(judged(row(phantom(false, 0.0), result("analysed", false, 0.1), 0)).is_empty());
        let f = judged(row(phantom(true, 5.0), result("analysed", true, 7.0), 1));
        assert!(f[0].contains("error 2.00 points"), "{f:?}");
        let f = judged(row(phantom(false, 0.0), result("analysed", true, 0.5), 1));
        assert!(f[0].contains("flagged positive but truth is negative"), "{f:?}");
        let f = judged(row(phantom(true, 5.0), result("analysed", true, 5.0), 0));
        assert!(f.iter().any(|x| x.contains("no webhook alert")), "{f:?}");
        let f = judged(row(phantom(true, 5.0), None, 0));
        assert!(f[0].contains("no result"), "{f:?}");
        let skipped = Expected::Real { expect: Expect::Skipped };
        assert!(judged(row(skipped.clone(), result("skipped", false, 0.0), 0)).is_empty());
        let f = judged(row(skipped, result("analysed", false, 0.0), 0));
        assert!(f[0].contains("expected skipped, got negative"), "{f:?}");
        let f = judged(row(Expected::Real { expect: Expect::Negative }, result("analysed", false, 0.0), 2));
        assert!(f[0].contains("2 webhook alert(s) for a result that is not positive"), "{f:?}");
        let mut partial = row(Expected::Real { expect: Expect::Analysed }, result("analysed", false, 0.0), 0);
        partial.instances = 50;
        assert!(judged(partial)[0].contains("covers 40 of 50"));
    }

    #[test]
    fn a_refused_series_needs_every_instance_refused_and_no_result_or_alert() {
        let judged = |mut r: Row| {
            r.judge();
            r.failures
        };
        let refused = |answered: usize, not_stored: usize, result: Option<Value>, alerts: usize| {
            let mut r = row(Expected::Real { expect: Expect::Refused }, result, alerts);
            (r.refused, r.send_failures) = (answered, not_stored);
            r.send_error = Some("peer answered status 0xC000".into());
            r.result_latency_s = None;
            r
        };
        assert!(judged(refused(40, 40, None, 0)).is_empty());
        let f = judged(refused(0, 0, result("skipped", false, 0.0), 0));
        assert!(f[0].contains("40 of 40 instances stored"), "{f:?}");
        assert!(f[1].contains("a result (status \"skipped\")"), "{f:?}");
        let f = judged(refused(30, 40, None, 0));
        assert!(f[0].contains("10 of 40 instances got no failure status"), "{f:?}");
        let f = judged(refused(40, 40, None, 1));
        assert!(f[0].contains("1 webhook alert(s)"), "{f:?}");
        let md = to_markdown(&json!({}), &[refused(40, 40, None, 0)], &summarise(&[], 0), &[]);
        assert!(md.contains("| refused | refused 40/40 |"), "{md}");
    }

    #[test]
    fn nearest_rank_percentiles() {
        let s = Stats::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((s.n, s.p50, s.p95, s.max), (5, Some(3.0), Some(5.0), Some(5.0)));
        let s = Stats::of(&(1..=100).map(f64::from).collect::<Vec<_>>());
        assert_eq!((s.p50, s.p95), (Some(50.0), Some(95.0)));
        assert_eq!(Stats::of(&[]).p95, None);
    }

    #[test]
    fn thresholds_missed_or_unmeasurable_fail() {
        let rows = vec![row(phantom(true, 5.0), result("analysed", true, 5.0), 1)];
        let s = summarise(&rows, 0);
        let t = Thresholds { max_alert_latency_p95_s: Some(10.0), ..Default::default() };
        assert!(check(&t, &s).iter().all(|c| c.met));
        let t = Thresholds { max_alert_latency_p95_s: Some(0.001), ..Default::default() };
        assert!(!check(&t, &s)[1].met);
        let none = summarise(&[row(phantom(false, 0.0), result("analysed", false, 0.0), 0)], 0);
        let t = Thresholds { max_alert_latency_max_s: Some(10.0), ..Default::default() };
        let c = check(&t, &none);
        assert!(c[0].met && !c[1].met && c[1].value.is_none());
    }
}
