//! exam_flag — one flag per exam: a study with several eligible reconstructions (thin and thick, soft-tissue and
//! lung kernels) alerts once.
//!
//! Owns: applying the study's alert claim ([`crate::store::Store::claim_study_alert`]) to a result about to be
//! recorded: when another series of the study already holds the alert, this result's alert reasons are withheld
//! and the result links to the alerting series (`study_alert: {series_instance_uid, withheld_reasons}`), which
//! the dashboard shows. Every reconstruction is still analysed and recorded.
//! Hands on: the (possibly emptied) reasons to `finish_series`, which queues the webhook only when some remain.
//! Never: decides positivity or progression, or touches the outbox.

use anyhow::Result;
use serde_json::{json, Value};

use crate::store::Store;

/// Applies the one-flag-per-exam rule to `reasons` (the alert reasons this result would carry) and `result`.
///
/// With reasons, the study's alert is claimed for `series_uid`: if another series holds it, the reasons are
/// moved to `result.study_alert.withheld_reasons` and emptied. Without reasons, a result of a study that some
/// other series has alerted for still gets the link (`withheld_reasons` empty). A blank study UID (never grouped
/// by the daemon, see `series`) leaves everything as it is.
pub fn one_flag_per_exam(
    store: &Store,
    study_uid: &str,
    series_uid: &str,
    reasons: &mut Vec<&'static str>,
    result: &mut Value,
) -> Result<()> {
    if study_uid.is_empty() {
        return Ok(());
    }
    let holder = if reasons.is_empty() {
        store.study_alert_holder(study_uid)?.filter(|h| h != series_uid)
    } else {
        store.claim_study_alert(study_uid, series_uid)?
    };
    if let Some(holder) = holder {
        result["study_alert"] = json!({ "series_instance_uid": holder, "withheld_reasons": reasons.clone() });
        reasons.clear();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_second_reconstruction_links_to_the_first_and_withholds_its_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.sqlite")).unwrap();
        let (mut thin, mut thick, mut other) = (json!({}), json!({}), json!({}));
        let mut r = vec!["positive"];
        one_flag_per_exam(&store, "1.2", "1.2.thin", &mut r, &mut thin).unwrap();
        assert_eq!(r, vec!["positive"], "the first positive reconstruction alerts");
        assert!(thin.get("study_alert").is_none());
        let mut r = vec!["positive", "progression"];
        one_flag_per_exam(&store, "1.2", "1.2.thick", &mut r, &mut thick).unwrap();
        assert!(r.is_empty(), "the second does not");
        assert_eq!(thick["study_alert"]["series_instance_uid"], "1.2.thin");
        assert_eq!(thick["study_alert"]["withheld_reasons"], json!(["positive", "progression"]));
        let mut r = Vec::new();
        one_flag_per_exam(&store, "1.2", "1.2.neg", &mut r, &mut other).unwrap();
        assert_eq!(other["study_alert"]["series_instance_uid"], "1.2.thin", "a negative one is linked too");
        let (mut blank, mut r) = (json!({}), vec!["positive"]);
        one_flag_per_exam(&store, "", "x", &mut r, &mut blank).unwrap();
        assert_eq!(r, vec!["positive"]);
    }
}
