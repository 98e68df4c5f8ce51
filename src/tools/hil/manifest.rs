//! hil::manifest — the HIL manifest (TOML): which series to replay, how fast, how long to wait for each, what
//! counts as correct, and the thresholds a run must meet.
//!
//! Owns: parsing and validating the manifest (unknown keys, duplicate names, an entry that is both or neither a
//! phantom and real DICOM, a real entry without an expected outcome, non-positive rates or timeouts are errors).
//! Never: reads series or talks to the appliance.

use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::tools::phantom::Severity;

/// The whole manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Images per second for every series (scanner pace); an entry may override it. Absent = unpaced.
    pub rate: Option<f64>,
    /// Seconds from a series' last acknowledged slice to wait for its result (and its alert when positive).
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    /// Seconds of pause after one series' outcome before the next series starts.
    #[serde(default)]
    pub gap_s: f64,
    /// What the run must meet; missing one makes `lungsentry hil` exit non-zero.
    #[serde(default)]
    pub thresholds: Thresholds,
    /// The series, replayed in this order.
    #[serde(default)]
    pub series: Vec<Entry>,
}

fn default_timeout_s() -> f64 {
    120.0
}

/// Run-level thresholds. Latencies are measured from the last acknowledged slice of a series.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Fraction of series judged correct (default 1.0: every series).
    pub min_correct_fraction: Option<f64>,
    /// 95th percentile of last-slice → webhook alert, seconds (over the series that alerted).
    pub max_alert_latency_p95_s: Option<f64>,
    /// Slowest last-slice → webhook alert, seconds.
    pub max_alert_latency_max_s: Option<f64>,
    /// 95th percentile of last-slice → result visible in the appliance API, seconds (every series).
    pub max_result_latency_p95_s: Option<f64>,
}

/// One manifest entry: a phantom (`phantom = {...}`) or a real DICOM folder (`real = "path"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Unique name (letters, digits, `.`, `_`, `-`): the row label and the folder name of its prepared copy.
    pub name: String,
    /// A synthetic series generated from its seed; its truth.json decides the expected outcome.
    pub phantom: Option<PhantomSpec>,
    /// A folder of real DICOM, relative to `$LUNGSENTRY_DATA` (or absolute); every series in it is one row.
    pub real: Option<String>,
    /// Expected outcome of every series of a real entry (phantoms take theirs from truth).
    pub expect: Option<Expect>,
    /// Phantoms: largest accepted |measured − true involvement|, percentage points (unchecked when absent).
    pub involvement_tolerance: Option<f64>,
    /// Images per second for this entry (overrides the manifest's `rate`).
    pub rate: Option<f64>,
    /// Seconds to wait for this entry's results (overrides the manifest's `timeout_s`).
    pub timeout_s: Option<f64>,
    /// Free text carried into the report (e.g. why this entry is here).
    pub note: Option<String>,
}

/// How to generate a phantom entry (the options of `lungsentry phantom`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PhantomSpec {
    /// Seed: the same seed gives the same series.
    pub seed: u64,
    /// none | mild | moderate | severe.
    pub severity: String,
    /// Number of slices.
    #[serde(default = "default_slices")]
    pub slices: usize,
    /// Rows = columns.
    #[serde(default = "default_size")]
    pub size: usize,
    /// Slice thickness (= spacing), mm; chosen from the seed when absent.
    pub thickness: Option<f64>,
}

fn default_slices() -> usize {
    48
}

fn default_size() -> usize {
    256
}

/// What a real series must come out as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// Analysed and flagged positive (with a webhook alert).
    Positive,
    /// Analysed and not flagged (no alert).
    Negative,
    /// Analysed, whatever the flag (an alert exactly when flagged).
    Analysed,
    /// Stored but skipped with a stated reason (no alert).
    Skipped,
    /// Every instance refused by the appliance with a failure status (e.g. blank Study/Series/SOP Instance UIDs,
    /// which are Type 1): nothing stored, no result, no alert.
    Refused,
}

impl Manifest {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading manifest {}", path.display()))?;
        Manifest::parse(&text).with_context(|| format!("manifest {}", path.display()))
    }

    /// Parses and validates manifest text.
    pub fn parse(text: &str) -> Result<Manifest> {
        let m: Manifest = toml::from_str(text)?;
        m.validate()?;
        Ok(m)
    }

    fn validate(&self) -> Result<()> {
        let positive = |v: Option<f64>, what: &str| -> Result<()> {
            match v {
                Some(x) if !(x > 0.0 && x.is_finite()) => bail!("{what} must be a positive number, got {x}"),
                _ => Ok(()),
            }
        };
        positive(self.rate, "rate")?;
        positive(Some(self.timeout_s), "timeout_s")?;
        if !(self.gap_s >= 0.0 && self.gap_s.is_finite()) {
            bail!("gap_s must be ≥ 0, got {}", self.gap_s);
        }
        let t = &self.thresholds;
        if let Some(f) = t.min_correct_fraction {
            if !(0.0..=1.0).contains(&f) {
                bail!("thresholds.min_correct_fraction must lie in 0..=1, got {f}");
            }
        }
        positive(t.max_alert_latency_p95_s, "thresholds.max_alert_latency_p95_s")?;
        positive(t.max_alert_latency_max_s, "thresholds.max_alert_latency_max_s")?;
        positive(t.max_result_latency_p95_s, "thresholds.max_result_latency_p95_s")?;
        if self.series.is_empty() {
            bail!("no [[series]] entries");
        }
        let mut names = std::collections::HashSet::new();
        for e in &self.series {
            let ok = !e.name.is_empty() && e.name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            if !ok || e.name.starts_with('.') {
                bail!("series name {:?}: use letters, digits, '.', '_' and '-' (not leading '.')", e.name);
            }
            if !names.insert(e.name.as_str()) {
                bail!("series name {:?} appears twice", e.name);
            }
            let at = |msg: &str| anyhow::anyhow!("series {:?}: {msg}", e.name);
            match (&e.phantom, &e.real) {
                (Some(p), None) => {
                    Severity::from_str(&p.severity).map_err(|err| at(&format!("{err:#}")))?;
                    if p.slices == 0 || p.size < 32 {
                        return Err(at("phantom needs slices ≥ 1 and size ≥ 32"));
                    }
                    if e.expect.is_some() {
                        return Err(at("`expect` is for real entries; a phantom's truth.json decides"));
                    }
                }
                (None, Some(_)) => {
                    if e.expect.is_none() {
                        return Err(at(
                            "a real entry needs `expect` (positive, negative, analysed, skipped or refused)",
                        ));
                    }
                    if e.involvement_tolerance.is_some() {
                        return Err(at("`involvement_tolerance` needs a truth: phantom entries only"));
                    }
                }
                _ => return Err(at("give exactly one of `phantom = {...}` and `real = \"folder\"`")),
            }
            positive(e.rate, &format!("series {:?}: rate", e.name))?;
            positive(e.timeout_s, &format!("series {:?}: timeout_s", e.name))?;
            if let Some(tol) = e.involvement_tolerance {
                if !(tol >= 0.0 && tol.is_finite()) {
                    return Err(at("involvement_tolerance must be ≥ 0"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_manifest_is_valid() {
        let m = Manifest::parse(include_str!("../../../tests/hil/manifest.toml")).unwrap();
        assert!(m.series.iter().any(|e| e.phantom.is_some()));
        assert!(m.series.iter().any(|e| e.real.is_some()));
    }

    #[test]
    fn mistakes_are_refused_with_a_reason() {
        let base = "[[series]]\nname = \"a\"\n";
        let cases = [
            ("", "no [[series]]"),
            (base, "exactly one"),
            (&format!("{base}real = \"x\"\n"), "needs `expect`"),
            (&format!("{base}real = \"x\"\nexpect = \"maybe\"\n"), "unknown variant"),
            (&format!("{base}phantom = {{ seed = 1, severity = \"huge\" }}\n"), "severity"),
            (&format!("{base}phantom = {{ seed = 1, severity = \"mild\" }}\nexpect = \"positive\"\n"), "truth"),
            (
                &format!(
                    "{base}phantom = {{ seed = 1, severity = \"mild\" }}\n{base}real = \"x\"\nexpect = \"skipped\"\n"
                ),
                "twice",
            ),
            (&format!("rate = 0\n{base}real = \"x\"\nexpect = \"skipped\"\n"), "rate"),
            (&format!("[thresholds]\nmin_correct_fraction = 2.0\n{base}real = \"x\"\nexpect = \"skipped\"\n"), "0..=1"),
            (&format!("{base}real = \"x\"\nexpect = \"skipped\"\ncolour = 1\n"), "unknown field"),
            ("[[series]]\nname = \"../x\"\nreal = \"x\"\nexpect = \"skipped\"\n", "letters"),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", Manifest::parse(text).unwrap_err());
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
