//! results — what each analysis of a series concluded, and how a later prior study re-links it.
//!
//! Owns: the `results` rows (version = previous + 1, never replaced; each remembers the series revision it saw,
//! and whether its DICOM outputs are still to be queued), the `follow_up_links` rows (the newer comparison of a
//! result version whose prior study arrived after it), and queueing the webhook alert of a result or a link in
//! the same transaction.
//! Hands on: [`StoredResult`]s to the dashboard, `notify`, `outputs` and crash recovery; [`LinkAwaitingOutputs`]
//! to the start-up sweep.
//! Never: decides positivity, whether a result alerts, or what a follow-up comparison says (the caller does), or
//! stores a result or alert body that carries raw patient identifiers.

use rusqlite::{params, OptionalExtension, Transaction};
use serde::Serialize;

use super::identity::refuse_raw_identifiers;
use super::webhook_outbox::insert_outbox;
use super::{now_ms, series_log_key, Result, Store, StoreError};

/// A backward follow-up link: result `result_version` of `series_instance_uid` now compares with
/// `prior_series_instance_uid` (a study of the same patient that arrived, or was re-analysed, after it).
#[derive(Debug, Clone, PartialEq)]
pub struct FollowUpLink {
    /// The later series whose result now compares with a prior study.
    pub series_instance_uid: String,
    /// Its result version that comparison belongs to.
    pub result_version: u32,
    /// The prior study's series it compares with.
    pub prior_series_instance_uid: String,
    /// The `follow_up` object that result now shows.
    pub follow_up: serde_json::Value,
    /// When set, a webhook alert with this body (the result as it now reads) is queued with the link.
    pub alert_payload: Option<serde_json::Value>,
    /// Some DICOM destination wants the amended SR of this comparison (queued by `outputs` through
    /// [`Store::enqueue_link_outputs`], which clears the mark).
    pub outputs_due: bool,
}

/// One stored analysis result (its `result.follow_up` is the newest backward link of that version, if any).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StoredResult {
    /// Series it belongs to.
    pub series_instance_uid: String,
    /// 1 for the first analysis, +1 for each re-analysis.
    pub version: u32,
    /// Series revision the analysis was computed from.
    pub series_revision: i64,
    /// Whether the series was flagged positive.
    pub positive: bool,
    /// Lesion volume / lung volume × 100.
    pub involvement_percent: f64,
    /// The full result as the analysis produced it.
    pub result: serde_json::Value,
    /// When it was recorded (unix ms).
    pub created_at: i64,
    /// Study Date of the series (for follow-up ordering).
    pub study_date: String,
}

/// A new analysis result for [`Store::record_result_with_outputs`].
#[derive(Debug, Clone, Copy)]
pub struct NewResult<'a> {
    /// The series analysed.
    pub series_uid: &'a str,
    /// The series revision the analysis was computed from ([`Store::series_revision`] read before loading the
    /// instances); None = the current one.
    pub revision: Option<i64>,
    /// Whether the series is flagged positive.
    pub positive: bool,
    /// Lesion volume / lung volume × 100.
    pub involvement_percent: f64,
    /// The full result: a JSON object without raw patient identifiers as keys.
    pub result_json: &'a serde_json::Value,
    /// Queue a webhook alert with it (the caller's decision, see [`Store::record_result_for_revision`]).
    pub alert: bool,
    /// Some `[[outputs.dicom]]` destination wants its DICOM outputs (cleared by [`Store::enqueue_dicom_outputs`]).
    pub outputs_due: bool,
    /// Backward follow-up links this result causes (other series of the patient whose prior study it now is).
    pub links: &'a [FollowUpLink],
}

/// A backward link whose amended SR is due but not yet queued (see [`Store::links_awaiting_outputs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LinkAwaitingOutputs {
    /// Its `follow_up_links` row id (for [`Store::enqueue_link_outputs`]).
    pub id: i64,
    /// When it was stored (unix ms).
    pub created_at: i64,
    /// The link.
    pub link: FollowUpLink,
}

impl Store {
    /// Records an analysis result as the next version, computed from the series' *current* revision.
    /// See [`Store::record_result_for_revision`].
    pub fn record_result(
        &self,
        series_uid: &str,
        positive: bool,
        involvement_percent: f64,
        result_json: &serde_json::Value,
        alert: bool,
    ) -> Result<u32> {
        self.record_result_for_revision(series_uid, None, positive, involvement_percent, result_json, alert)
    }

    /// Records an analysis result in one transaction: inserts version = previous + 1 (never replaces), sets the
    /// series state to `analysed`, and when `alert` queues a `webhook` outbox row with dedup key
    /// `"{series_uid}/v{version}"` and payload = `result_json` plus `"version"` and `"dedup_key"`.
    ///
    /// `alert` is the caller's decision (typically: positive, or a changed verdict, *and* a webhook URL is
    /// configured — without a URL no row should be queued, as nothing would ever deliver it).
    /// `revision`: the series revision the analysis was computed from ([`Store::series_revision`] read before
    /// loading instances); None = current. `result_json` must be an object and must not carry raw patient
    /// identifiers (`patient_id`, `patient_name`, `PatientID`, `PatientName` keys are refused).
    pub fn record_result_for_revision(
        &self,
        series_uid: &str,
        revision: Option<i64>,
        positive: bool,
        involvement_percent: f64,
        result_json: &serde_json::Value,
        alert: bool,
    ) -> Result<u32> {
        self.record_result_with_outputs(NewResult {
            series_uid,
            revision,
            positive,
            involvement_percent,
            result_json,
            alert,
            outputs_due: false,
            links: &[],
        })
    }

    /// [`Store::record_result_for_revision`] that also, in the same transaction, marks whether the result's DICOM
    /// outputs are due ([`NewResult::outputs_due`]: some `[[outputs.dicom]]` destination wants them; the mark is
    /// cleared by [`Store::enqueue_dicom_outputs`] for that version) and stores the backward follow-up `links` this
    /// result causes (other series of the patient whose prior study it now is). A link is stored only while its result
    /// version is still that series' latest, and only when it changes what that version shows; a link with
    /// `alert_payload` queues a webhook row with dedup key `"{series}/v{version}/prior/{prior series}"`.
    /// Returns the new result's version.
    pub fn record_result_with_outputs(&self, new: NewResult<'_>) -> Result<u32> {
        let NewResult { series_uid, revision, positive, involvement_percent, result_json, alert, outputs_due, links } =
            new;
        let obj = result_json.as_object().ok_or(StoreError::NotAnObject { what: "result_json" })?;
        refuse_raw_identifiers(obj, "result_json")?;
        let now = now_ms();
        let mut c = self.lock();
        let tx = c.transaction()?;
        let current: i64 = tx
            .query_row("SELECT revision FROM series WHERE series_instance_uid = ?1", [series_uid], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StoreError::UnknownSeries { series_log_key: series_log_key(series_uid) })?;
        let revision = revision.unwrap_or(current).min(current);
        let version: i64 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM results WHERE series_instance_uid = ?1",
            [series_uid],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO results (series_instance_uid, version, series_revision, positive, involvement_percent,
                                  result_json, created_at, outputs_due)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                series_uid,
                version,
                revision,
                positive,
                involvement_percent,
                result_json.to_string(),
                now,
                outputs_due
            ],
        )?;
        tx.execute(
            "UPDATE series SET state = 'analysed', state_reason = NULL, updated_at = ?2 WHERE series_instance_uid = ?1",
            params![series_uid, now],
        )?;
        if alert {
            let dedup_key = format!("{series_uid}/v{version}");
            let mut payload = obj.clone();
            payload.insert("version".into(), serde_json::json!(version));
            payload.insert("dedup_key".into(), serde_json::json!(dedup_key));
            insert_outbox(&tx, &dedup_key, &serde_json::Value::Object(payload).to_string(), now)?;
        }
        let mut link_alert = false;
        for l in links {
            link_alert |= insert_follow_up_link(&tx, l, now)?;
        }
        tx.commit()?;
        drop(c);
        if alert || link_alert {
            self.outbox_wake.notify_one();
        }
        Ok(version as u32)
    }

    /// Every backward follow-up link stored for a series, oldest first (the newest of a version is the one
    /// its result shows).
    pub fn follow_up_links(&self, series_uid: &str) -> Result<Vec<FollowUpLink>> {
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT series_instance_uid, result_version, prior_series_instance_uid, follow_up_json, outputs_due
             FROM follow_up_links WHERE series_instance_uid = ?1 ORDER BY id",
        )?;
        let rows = st.query_map([series_uid], follow_up_link)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Backward links whose amended SR is due but not yet queued, oldest first.
    pub fn links_awaiting_outputs(&self) -> Result<Vec<LinkAwaitingOutputs>> {
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT series_instance_uid, result_version, prior_series_instance_uid, follow_up_json, outputs_due, id,
                    created_at FROM follow_up_links WHERE outputs_due = 1 ORDER BY id",
        )?;
        let rows = st.query_map([], |r| {
            Ok(LinkAwaitingOutputs { id: r.get(5)?, created_at: r.get(6)?, link: follow_up_link(r)? })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The newest result of a series.
    pub fn latest_result(&self, series_uid: &str) -> Result<Option<StoredResult>> {
        let c = self.lock();
        let sql = format!("{RESULT_SELECT} WHERE r.series_instance_uid = ?1 ORDER BY r.version DESC LIMIT 1");
        Ok(c.query_row(&sql, [series_uid], stored_result).optional()?)
    }

    /// Every version of a series' results, oldest first.
    pub fn result_history(&self, series_uid: &str) -> Result<Vec<StoredResult>> {
        let c = self.lock();
        let sql = format!("{RESULT_SELECT} WHERE r.series_instance_uid = ?1 ORDER BY r.version");
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map([series_uid], stored_result)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The latest result of each of a patient's series, ordered by study date then time (follow-up view).
    pub fn results_for_patient(&self, patient_key: &str) -> Result<Vec<StoredResult>> {
        let c = self.lock();
        let sql = format!(
            "{RESULT_SELECT} WHERE s.patient_key = ?1 AND r.version =
                (SELECT MAX(version) FROM results r2 WHERE r2.series_instance_uid = r.series_instance_uid)
             ORDER BY s.study_date, r.created_at"
        );
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map([patient_key], stored_result)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// A `follow_up_links` row (columns: series, version, prior, follow_up_json, outputs_due).
fn follow_up_link(r: &rusqlite::Row<'_>) -> rusqlite::Result<FollowUpLink> {
    let json: String = r.get(3)?;
    Ok(FollowUpLink {
        series_instance_uid: r.get(0)?,
        result_version: r.get::<_, i64>(1)? as u32,
        prior_series_instance_uid: r.get(2)?,
        follow_up: serde_json::from_str(&json)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, Box::new(e)))?,
        alert_payload: None,
        outputs_due: r.get(4)?,
    })
}

/// Stores one backward follow-up link (see [`Store::record_result_with_outputs`]); returns whether it queued an
/// alert.
fn insert_follow_up_link(tx: &Transaction<'_>, l: &FollowUpLink, now: i64) -> Result<bool> {
    let latest: Option<i64> = tx.query_row(
        "SELECT MAX(version) FROM results WHERE series_instance_uid = ?1",
        [&l.series_instance_uid],
        |r| r.get(0),
    )?;
    if latest != Some(l.result_version as i64) {
        return Ok(false); // re-analysed meanwhile: that analysis made its own comparison
    }
    let json = l.follow_up.to_string();
    let newest: Option<String> = tx
        .query_row(
            "SELECT follow_up_json FROM follow_up_links WHERE series_instance_uid = ?1 AND result_version = ?2
             ORDER BY id DESC LIMIT 1",
            params![l.series_instance_uid, l.result_version],
            |r| r.get(0),
        )
        .optional()?;
    if newest.as_deref() == Some(json.as_str()) {
        return Ok(false);
    }
    let progression = l.follow_up["progression"].as_bool().unwrap_or(false);
    tx.execute(
        "INSERT INTO follow_up_links (series_instance_uid, result_version, prior_series_instance_uid, follow_up_json,
                                      progression, created_at, outputs_due)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            l.series_instance_uid,
            l.result_version,
            l.prior_series_instance_uid,
            json,
            progression,
            now,
            l.outputs_due
        ],
    )?;
    // The series' shown result changed: lists ordered by activity (the dashboard) see it.
    tx.execute(
        "UPDATE series SET updated_at = ?2 WHERE series_instance_uid = ?1",
        params![l.series_instance_uid, now],
    )?;
    let Some(payload) = &l.alert_payload else { return Ok(false) };
    let mut payload = payload.as_object().cloned().ok_or(StoreError::NotAnObject { what: "alert payload" })?;
    refuse_raw_identifiers(&payload, "alert payload")?;
    let dedup_key = format!("{}/v{}/prior/{}", l.series_instance_uid, l.result_version, l.prior_series_instance_uid);
    payload.insert("version".into(), serde_json::json!(l.result_version));
    payload.insert("dedup_key".into(), serde_json::json!(dedup_key));
    Ok(insert_outbox(tx, &dedup_key, &serde_json::Value::Object(payload).to_string(), now)?.is_some())
}

/// A result row, with the newest backward follow-up link of that version (column 8; NULL when none).
pub(super) const RESULT_SELECT: &str = "SELECT r.series_instance_uid, r.version, r.series_revision, r.positive,
        r.involvement_percent, r.result_json, r.created_at, s.study_date,
        (SELECT l.follow_up_json FROM follow_up_links l
          WHERE l.series_instance_uid = r.series_instance_uid AND l.result_version = r.version
          ORDER BY l.id DESC LIMIT 1)
    FROM results r JOIN series s ON s.series_instance_uid = r.series_instance_uid";

pub(super) fn stored_result(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredResult> {
    let json: String = r.get(5)?;
    let mut result: serde_json::Value = serde_json::from_str(&json)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(5, rusqlite::types::Type::Text, Box::new(e)))?;
    if let Some(link) = r.get::<_, Option<String>>(8)? {
        let link: serde_json::Value = serde_json::from_str(&link)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(8, rusqlite::types::Type::Text, Box::new(e)))?;
        if let Some(obj) = result.as_object_mut() {
            obj.insert("follow_up".into(), link);
        }
    }
    Ok(StoredResult {
        series_instance_uid: r.get(0)?,
        version: r.get::<_, i64>(1)? as u32,
        series_revision: r.get(2)?,
        positive: r.get(3)?,
        involvement_percent: r.get(4)?,
        result,
        created_at: r.get(6)?,
        study_date: r.get(7)?,
    })
}
