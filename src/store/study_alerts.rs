//! study_alerts — one flag per exam: which series of a study raised the study's alert.
//!
//! Owns: the `study_alerts` table (one row per study, the series that holds its alert) and the atomic claim the
//! pipeline makes before it records a result that would alert. A study whose thin and thick reconstructions are
//! both positive alerts once: the first series to claim holds the flag, the others record their results linked
//! to it (`study_alert` in their result JSON) and queue no webhook. The row lives in SQLite, so a reconstruction
//! that arrives after a restart does not alert again either.
//! Hands on: the holder's Series Instance UID to `pipeline` (which writes the link into the result).
//! Never: decides positivity or whether a series would alert (the pipeline does), or queues webhooks.

use rusqlite::{params, OptionalExtension};

use super::{now_ms, Result, Store};

impl Store {
    /// Claims the alert of study `study_uid` for `series_uid`, in one statement pair under the store's lock:
    /// returns None when `series_uid` holds it (claimed now, or earlier), or the Series Instance UID of the other
    /// series of the study that holds it. The claim is never released: a study alerts once, whatever later
    /// results say.
    pub fn claim_study_alert(&self, study_uid: &str, series_uid: &str) -> Result<Option<String>> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        tx.execute(
            "INSERT INTO study_alerts (study_instance_uid, series_instance_uid, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(study_instance_uid) DO NOTHING",
            params![study_uid, series_uid, now_ms()],
        )?;
        let holder: String = tx.query_row(
            "SELECT series_instance_uid FROM study_alerts WHERE study_instance_uid = ?1",
            [study_uid],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok((holder != series_uid).then_some(holder))
    }

    /// The series holding the alert of `study_uid`, if any series of it has alerted.
    pub fn study_alert_holder(&self, study_uid: &str) -> Result<Option<String>> {
        let c = self.lock();
        Ok(c.query_row(
            "SELECT series_instance_uid FROM study_alerts WHERE study_instance_uid = ?1",
            [study_uid],
            |r| r.get(0),
        )
        .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_claim_holds_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let store = Store::open(&path).unwrap();
        assert_eq!(store.study_alert_holder("1.2").unwrap(), None);
        assert_eq!(store.claim_study_alert("1.2", "1.2.1").unwrap(), None, "the first series holds the flag");
        assert_eq!(store.claim_study_alert("1.2", "1.2.1").unwrap(), None, "and keeps it on a re-analysis");
        assert_eq!(store.claim_study_alert("1.2", "1.2.2").unwrap().as_deref(), Some("1.2.1"));
        assert_eq!(store.claim_study_alert("1.3", "1.3.1").unwrap(), None, "another study has its own flag");
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.claim_study_alert("1.2", "1.2.3").unwrap().as_deref(), Some("1.2.1"), "after a restart");
        assert_eq!(store.study_alert_holder("1.2").unwrap().as_deref(), Some("1.2.1"));
    }
}
