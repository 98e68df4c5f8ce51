//! exam_flag — one flag per exam: a study with several eligible reconstructions (thin and thick, soft-tissue and
//! lung kernels) alerts once.
//!
//! Owns: applying the study's alert claim ([`crate::store::Store::claim_study_alert`]) to a result about to be
//! recorded: when another series of the study already holds the alert, this result's alert reasons are withheld
//! and the result links to the alerting series (`study_alert: {series_instance_uid, withheld_reasons}`), which
//! the dashboard shows. Every reconstruction is still analysed and recorded.
//! Hands on: the (possibly emptied) reasons and the result's `study_alert` to `finish_series`, which queues the
//! webhook only when some reasons remain.
//! Never: decides positivity or progression, or touches the outbox.

use anyhow::Result;

use crate::result::StudyAlert;
use crate::store::Store;

/// Applies the one-flag-per-exam rule to `reasons` (the alert reasons this result would carry); returns the
/// result's `study_alert`.
///
/// With reasons, the study's alert is claimed for `series_uid`: if another series holds it, the reasons are
/// moved to the returned `withheld_reasons` and emptied. Without reasons, a result of a study that some other
/// series has alerted for still gets the link (`withheld_reasons` empty). A blank study UID (never grouped by the
/// daemon, see `series`) leaves everything as it is.
pub fn one_flag_per_exam(
    store: &Store,
    study_uid: &str,
    series_uid: &str,
    reasons: &mut Vec<&'static str>,
) -> Result<Option<StudyAlert>> {
    if study_uid.is_empty() {
        return Ok(None);
    }
    let holder = if reasons.is_empty() {
        store.study_alert_holder(study_uid)?.filter(|h| h != series_uid)
    } else {
        store.claim_study_alert(study_uid, series_uid)?
    };
    Ok(holder.map(|holder| StudyAlert {
        series_instance_uid: holder,
        withheld_reasons: std::mem::take(reasons).into_iter().map(str::to_string).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_second_reconstruction_links_to_the_first_and_withholds_its_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.sqlite")).unwrap();
        let mut r = vec!["positive"];
        let thin = one_flag_per_exam(&store, "1.2", "1.2.thin", &mut r).unwrap();
        assert_eq!(r, vec!["positive"], "the first positive reconstruction alerts");
        assert!(thin.is_none());
        let mut r = vec!["positive", "progression"];
        let thick = one_flag_per_exam(&store, "1.2", "1.2.thick", &mut r).unwrap().expect("linked");
        assert!(r.is_empty(), "the second does not");
        assert_eq!(thick.series_instance_uid, "1.2.thin");
        assert_eq!(thick.withheld_reasons, vec!["positive", "progression"]);
        let mut r = Vec::new();
        let other = one_flag_per_exam(&store, "1.2", "1.2.neg", &mut r).unwrap().expect("linked");
        assert_eq!(other.series_instance_uid, "1.2.thin", "a negative one is linked too");
        assert!(other.withheld_reasons.is_empty());
        let mut r = vec!["positive"];
        assert!(one_flag_per_exam(&store, "", "x", &mut r).unwrap().is_none());
        assert_eq!(r, vec!["positive"]);
    }
}
