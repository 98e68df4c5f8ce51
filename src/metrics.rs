//! metrics — the daemon's counters and latency histograms, rendered as Prometheus text for `/metrics`.
//!
//! Owns: one process-wide registry (stages record into it with one call, no plumbing): instances received,
//! series by outcome, alerts and DICOM outputs sent/failed, per-stage latency histograms, engine time. Gauges
//! that are a state rather than an event (outbox depths, live series workers, queue depth, disk) are read at
//! scrape time by `http` and appended with [`gauge`].
//! Never: holds patient or series identifiers (labels are fixed, low-cardinality words).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Upper bounds (seconds) of the latency histogram buckets.
pub const BUCKETS: [f64; 12] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Series outcomes, always exported (0 until seen).
pub const SERIES_OUTCOMES: [&str; 4] = ["positive", "negative", "skipped", "failed"];
/// Stages with a latency histogram: decode, infer, analysis (sums per series), and last slice → result.
pub const STAGES: [&str; 4] = ["decode", "infer", "analysis", "last_slice_to_result"];

/// A cumulative histogram.
#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Count per bucket (not cumulative; summed when rendered).
    buckets: [u64; BUCKETS.len()],
    /// Observations.
    count: u64,
    /// Sum of observations, seconds.
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if let Some(i) = BUCKETS.iter().position(|b| v <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }
}

/// The registry.
#[derive(Debug, Default)]
pub struct Metrics {
    instances_stored: AtomicU64,
    instances_refused: AtomicU64,
    alerts_sent: AtomicU64,
    alerts_failed: AtomicU64,
    dicom_sent: AtomicU64,
    dicom_failed: AtomicU64,
    engine_slices: AtomicU64,
    /// Series by outcome.
    series: Mutex<BTreeMap<&'static str, u64>>,
    /// Latency per stage.
    stages: Mutex<BTreeMap<&'static str, Histogram>>,
    /// Seconds spent in the engine.
    engine_seconds: Mutex<f64>,
}

static GLOBAL: OnceLock<Metrics> = OnceLock::new();

/// The process-wide registry.
pub fn metrics() -> &'static Metrics {
    GLOBAL.get_or_init(Metrics::default)
}

impl Metrics {
    /// An instance was answered: stored (success) or refused (failure status).
    pub fn instance(&self, stored: bool) {
        if stored { &self.instances_stored } else { &self.instances_refused }.fetch_add(1, Ordering::Relaxed);
    }

    /// A series finished with `outcome` (one of [`SERIES_OUTCOMES`]).
    pub fn series(&self, outcome: &'static str) {
        *self.series.lock().unwrap().entry(outcome).or_default() += 1;
    }

    /// One observation of `stage` (one of [`STAGES`]), seconds.
    pub fn stage(&self, stage: &'static str, seconds: f64) {
        if seconds.is_finite() && seconds >= 0.0 {
            self.stages.lock().unwrap().entry(stage).or_default().observe(seconds);
        }
    }

    /// Engine time spent on `slices` slices.
    pub fn engine(&self, seconds: f64, slices: u64) {
        *self.engine_seconds.lock().unwrap() += seconds;
        self.engine_slices.fetch_add(slices, Ordering::Relaxed);
    }

    /// A webhook delivery attempt: delivered or failed.
    pub fn alert(&self, sent: bool) {
        if sent { &self.alerts_sent } else { &self.alerts_failed }.fetch_add(1, Ordering::Relaxed);
    }

    /// A DICOM output C-STORE attempt: stored or failed.
    pub fn dicom_output(&self, sent: bool) {
        if sent { &self.dicom_sent } else { &self.dicom_failed }.fetch_add(1, Ordering::Relaxed);
    }

    /// Records what a series' result says: outcome, stage timings, engine time.
    pub fn result(&self, result: &crate::result::SeriesResult) {
        let outcome = if !result.is_analysed() {
            "skipped"
        } else if result.positive {
            "positive"
        } else {
            "negative"
        };
        self.series(outcome);
        let t = &result.timings_ms;
        for (stage, ms) in [("decode", t.decode), ("infer", t.infer), ("analysis", t.analysis)] {
            self.stage(stage, ms / 1000.0);
        }
        self.engine(t.infer / 1000.0, result.analysed_slices as u64);
    }

    /// The Prometheus text of the registry.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let counter = |s: &mut String, name: &str, help: &str, rows: &[(&str, f64)]| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, v) in rows {
                let _ = writeln!(s, "{name}{labels} {v}");
            }
        };
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        counter(
            &mut s,
            "lungsentry_instances_received_total",
            "C-STORE requests answered, by outcome (stored = success after fsync and commit).",
            &[
                ("{outcome=\"stored\"}", ld(&self.instances_stored)),
                ("{outcome=\"refused\"}", ld(&self.instances_refused)),
            ],
        );
        let series = self.series.lock().unwrap().clone();
        let rows: Vec<(String, f64)> = SERIES_OUTCOMES
            .iter()
            .map(|o| (format!("{{outcome=\"{o}\"}}"), *series.get(o).unwrap_or(&0) as f64))
            .collect();
        let rows: Vec<(&str, f64)> = rows.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        counter(&mut s, "lungsentry_series_total", "Series results recorded, by outcome.", &rows);
        counter(
            &mut s,
            "lungsentry_alerts_total",
            "Webhook alert delivery attempts, by outcome.",
            &[("{outcome=\"sent\"}", ld(&self.alerts_sent)), ("{outcome=\"failed\"}", ld(&self.alerts_failed))],
        );
        counter(
            &mut s,
            "lungsentry_dicom_outputs_total",
            "DICOM output C-STORE attempts, by outcome.",
            &[("{outcome=\"sent\"}", ld(&self.dicom_sent)), ("{outcome=\"failed\"}", ld(&self.dicom_failed))],
        );
        counter(
            &mut s,
            "lungsentry_engine_seconds_total",
            "Seconds spent in the inference engine.",
            &[("", *self.engine_seconds.lock().unwrap())],
        );
        counter(&mut s, "lungsentry_engine_slices_total", "Slices inferred.", &[("", ld(&self.engine_slices))]);

        let name = "lungsentry_stage_seconds";
        let _ = writeln!(
            s,
            "# HELP {name} Latency per series of each stage (decode, infer, analysis: totals per series; \
             last_slice_to_result: last instance stored to result recorded).\n# TYPE {name} histogram"
        );
        let stages = self.stages.lock().unwrap().clone();
        for stage in STAGES {
            let h = stages.get(stage).cloned().unwrap_or_default();
            let mut cum = 0;
            for (b, n) in BUCKETS.iter().zip(h.buckets.iter()) {
                cum += n;
                let _ = writeln!(s, "{name}_bucket{{stage=\"{stage}\",le=\"{b}\"}} {cum}");
            }
            let _ = writeln!(s, "{name}_bucket{{stage=\"{stage}\",le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(s, "{name}_sum{{stage=\"{stage}\"}} {}", h.sum);
            let _ = writeln!(s, "{name}_count{{stage=\"{stage}\"}} {}", h.count);
        }
        s
    }
}

/// Appends one gauge family (`rows`: label set without braces, value) to `out`.
pub fn gauge(out: &mut String, name: &str, help: &str, rows: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (labels, v) in rows {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_text_is_well_formed() {
        let m = Metrics::default();
        m.stage("infer", 0.07);
        m.stage("infer", 3.0);
        m.stage("infer", 1000.0);
        m.instance(true);
        m.series("positive");
        let text = m.render();
        assert!(text.contains("lungsentry_stage_seconds_bucket{stage=\"infer\",le=\"0.05\"} 0"), "{text}");
        assert!(text.contains("lungsentry_stage_seconds_bucket{stage=\"infer\",le=\"0.1\"} 1"));
        assert!(text.contains("lungsentry_stage_seconds_bucket{stage=\"infer\",le=\"5\"} 2"));
        assert!(text.contains("lungsentry_stage_seconds_bucket{stage=\"infer\",le=\"+Inf\"} 3"));
        assert!(text.contains("lungsentry_stage_seconds_count{stage=\"infer\"} 3"));
        assert!(text.contains("lungsentry_instances_received_total{outcome=\"stored\"} 1"));
        assert!(text.contains("lungsentry_series_total{outcome=\"positive\"} 1"));
        assert!(text.contains("lungsentry_series_total{outcome=\"skipped\"} 0"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("name and value");
            assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
        }
    }
}
