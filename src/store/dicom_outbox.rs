//! dicom_outbox — DICOM output objects (SEG, SR, key images) waiting to be sent to each destination.
//!
//! Owns: the `dicom_outbox` table: queueing the objects of a result version or of a backward link's amended SR
//! (in the transaction that clears that result's or link's `outputs_due`), at most once per (destination, SOP
//! instance); the results whose outputs a crash left unqueued; handing out due rows; recording each attempt
//! (delivered, retried, or parked for good); the totals.
//! Hands on: [`DicomOutboxRow`]s to the sender in `outputs`, [`DicomOutboxEntry`]s and totals to the dashboard
//! and metrics.
//! Never: builds or reads the DICOM files, sends anything, or decides the back-off or when to park.

use std::path::PathBuf;

use rusqlite::{params, OptionalExtension, Transaction};
use serde::Serialize;

use super::results::{stored_result, RESULT_SELECT};
use super::{now_ms, Result, Store, StoredResult};

/// One DICOM output object queued for one destination.
#[derive(Debug, Clone, PartialEq)]
pub struct DicomOutboxRow {
    /// Row id.
    pub id: i64,
    /// `AE@host:port` of the destination.
    pub destination: String,
    /// Source series.
    pub series_instance_uid: String,
    /// Result version the object was made from.
    pub result_version: i64,
    /// `seg`, `sr` or `key_images`.
    pub kind: String,
    /// SOP Class UID of the object.
    pub sop_class_uid: String,
    /// SOP Instance UID of the object.
    pub sop_instance_uid: String,
    /// Its Part-10 file.
    pub path: PathBuf,
    /// Attempts so far.
    pub attempts: u32,
}

/// A DICOM outbox row with what became of it (see [`Store::dicom_outbox_of_series`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DicomOutboxEntry {
    /// The row.
    pub row: DicomOutboxRow,
    /// Stored by its destination.
    pub delivered: bool,
    /// Refused for good or out of attempts: never retried.
    pub parked: bool,
    /// The peer's last C-STORE status, if it answered.
    pub last_status: Option<u16>,
    /// The last failure, if the last attempt failed.
    pub last_error: Option<String>,
}

/// A new row for [`Store::enqueue_dicom_outputs`].
#[derive(Debug, Clone)]
pub struct NewDicomOutput {
    /// `AE@host:port`.
    pub destination: String,
    /// `seg`, `sr` or `key_images`.
    pub kind: String,
    /// SOP Class UID.
    pub sop_class_uid: String,
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// The durable Part-10 file.
    pub path: PathBuf,
}

/// DICOM outbox totals, for metrics.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct DicomOutboxCounts {
    /// Neither delivered nor parked.
    pub pending: u64,
    /// Pending and failed at least once.
    pub failing: u64,
    /// Stored by the destination.
    pub delivered: u64,
    /// Refused for good or out of attempts.
    pub parked: u64,
}

impl Store {
    /// Queues the amended SR of backward link `link_id` in one transaction, which also clears the link's
    /// `outputs_due` (an empty `rows` only clears it). Returns how many rows were new.
    pub fn enqueue_link_outputs(&self, link_id: i64, rows: &[NewDicomOutput]) -> Result<usize> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let (series_uid, version): (String, i64) = tx.query_row(
            "SELECT series_instance_uid, result_version FROM follow_up_links WHERE id = ?1",
            [link_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let n = insert_dicom_outputs(&tx, &series_uid, version, rows, now_ms())?;
        tx.execute("UPDATE follow_up_links SET outputs_due = 0 WHERE id = ?1", [link_id])?;
        tx.commit()?;
        Ok(n)
    }

    /// The newest SR queued for a result version (the document an amended SR of that version replaces).
    pub fn latest_queued_sr(&self, series_uid: &str, result_version: i64) -> Result<Option<String>> {
        let c = self.lock();
        Ok(c.query_row(
            "SELECT sop_instance_uid FROM dicom_outbox WHERE series_instance_uid = ?1 AND result_version = ?2
             AND kind = 'sr' ORDER BY id DESC LIMIT 1",
            params![series_uid, result_version],
            |r| r.get(0),
        )
        .optional()?)
    }

    /// Queues objects of one result version in one transaction, which also clears that result's `outputs_due`
    /// (an empty `rows` only clears it); a (destination, SOP instance) already queued is left as it is (no
    /// duplicate after a restart or a rebuild). Returns how many rows were new.
    pub fn enqueue_dicom_outputs(
        &self,
        series_uid: &str,
        result_version: i64,
        rows: &[NewDicomOutput],
    ) -> Result<usize> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let n = insert_dicom_outputs(&tx, series_uid, result_version, rows, now_ms())?;
        tx.execute(
            "UPDATE results SET outputs_due = 0 WHERE series_instance_uid = ?1 AND version = ?2",
            params![series_uid, result_version],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Results whose DICOM outputs are due but were never queued (a crash came between the result and its outbox
    /// rows): the latest version of each series, only when the series has not changed since (a series with newer
    /// instances is re-analysed and its new version makes its own outputs).
    pub fn results_awaiting_outputs(&self) -> Result<Vec<StoredResult>> {
        let c = self.lock();
        let sql = format!(
            "{RESULT_SELECT} WHERE r.outputs_due = 1 AND r.series_revision = s.revision AND r.version =
                (SELECT MAX(version) FROM results r2 WHERE r2.series_instance_uid = r.series_instance_uid)
             ORDER BY r.created_at"
        );
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map([], stored_result)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Parked DICOM outputs per series (series with none are absent), for the dashboard list.
    pub fn parked_dicom_outputs_by_series(&self) -> Result<std::collections::HashMap<String, u64>> {
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT series_instance_uid, COUNT(*) FROM dicom_outbox WHERE parked_at IS NOT NULL
             GROUP BY series_instance_uid",
        )?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Rows neither delivered nor parked whose `next_attempt_at <= now_ms`, oldest due first, at most `limit`.
    pub fn due_dicom_outbox(&self, now_ms: i64, limit: usize) -> Result<Vec<DicomOutboxRow>> {
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT id, destination, series_instance_uid, result_version, kind, sop_class_uid, sop_instance_uid,
                    path, attempts FROM dicom_outbox
             WHERE delivered_at IS NULL AND parked_at IS NULL AND next_attempt_at <= ?1
             ORDER BY next_attempt_at, id LIMIT ?2",
        )?;
        let rows = st.query_map(params![now_ms, limit as i64], outbox_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// When the next pending DICOM output falls due (None: nothing pending).
    pub fn next_dicom_outbox_due(&self) -> Result<Option<i64>> {
        let c = self.lock();
        Ok(c.query_row(
            "SELECT MIN(next_attempt_at) FROM dicom_outbox WHERE delivered_at IS NULL AND parked_at IS NULL",
            [],
            |r| r.get(0),
        )?)
    }

    /// Marks an object stored by its destination (with the peer's status).
    pub fn mark_dicom_delivered(&self, id: i64, status: u16) -> Result<bool> {
        let c = self.lock();
        let n = c.execute(
            "UPDATE dicom_outbox SET delivered_at = ?2, attempts = attempts + 1, last_status = ?3, last_error = NULL
             WHERE id = ?1 AND delivered_at IS NULL AND parked_at IS NULL",
            params![id, now_ms(), status as i64],
        )?;
        Ok(n == 1)
    }

    /// Records a failed attempt: retried at `next_attempt_at`, or parked when `next_attempt_at` is None.
    pub fn mark_dicom_failed(
        &self,
        id: i64,
        status: Option<u16>,
        error: &str,
        next_attempt_at: Option<i64>,
    ) -> Result<()> {
        let c = self.lock();
        let now = now_ms();
        c.execute(
            "UPDATE dicom_outbox SET attempts = attempts + 1, last_status = ?2, last_error = ?3,
                next_attempt_at = COALESCE(?4, next_attempt_at), parked_at = CASE WHEN ?4 IS NULL THEN ?5 END
             WHERE id = ?1 AND delivered_at IS NULL AND parked_at IS NULL",
            params![id, status.map(|s| s as i64), error, next_attempt_at, now],
        )?;
        Ok(())
    }

    /// Pending / failing / delivered / parked totals.
    pub fn dicom_outbox_counts(&self) -> Result<DicomOutboxCounts> {
        let c = self.lock();
        Ok(c.query_row(
            "SELECT COALESCE(SUM(delivered_at IS NULL AND parked_at IS NULL), 0),
                    COALESCE(SUM(delivered_at IS NULL AND parked_at IS NULL AND attempts > 0), 0),
                    COALESCE(SUM(delivered_at IS NOT NULL), 0), COALESCE(SUM(parked_at IS NOT NULL), 0)
             FROM dicom_outbox",
            [],
            |r| {
                Ok(DicomOutboxCounts {
                    pending: r.get::<_, i64>(0)? as u64,
                    failing: r.get::<_, i64>(1)? as u64,
                    delivered: r.get::<_, i64>(2)? as u64,
                    parked: r.get::<_, i64>(3)? as u64,
                })
            },
        )?)
    }

    /// Every DICOM outbox row of a series (any state) with its state, for tests and the dashboard.
    pub fn dicom_outbox_of_series(&self, series_uid: &str) -> Result<Vec<DicomOutboxEntry>> {
        self.dicom_outbox_where("series_instance_uid = ?1 ORDER BY id", series_uid)
    }

    /// The most recently parked DICOM outputs (any series), newest first, at most `limit`.
    pub fn parked_dicom_outputs(&self, limit: usize) -> Result<Vec<DicomOutboxEntry>> {
        self.dicom_outbox_where("parked_at IS NOT NULL ORDER BY parked_at DESC, id DESC LIMIT ?1", limit as i64)
    }

    fn dicom_outbox_where(&self, condition: &str, arg: impl rusqlite::ToSql) -> Result<Vec<DicomOutboxEntry>> {
        let c = self.lock();
        let mut st = c.prepare(&format!(
            "SELECT id, destination, series_instance_uid, result_version, kind, sop_class_uid, sop_instance_uid,
                    path, attempts, delivered_at IS NOT NULL, parked_at IS NOT NULL, last_status, last_error
             FROM dicom_outbox WHERE {condition}"
        ))?;
        let rows = st.query_map([arg], |r| {
            Ok(DicomOutboxEntry {
                row: outbox_row(r)?,
                delivered: r.get::<_, bool>(9)?,
                parked: r.get::<_, bool>(10)?,
                last_status: r.get::<_, Option<i64>>(11)?.map(|s| s as u16),
                last_error: r.get::<_, Option<String>>(12)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// A `DicomOutboxRow` from a SELECT whose first nine columns are id, destination, series_instance_uid,
/// result_version, kind, sop_class_uid, sop_instance_uid, path, attempts.
fn outbox_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DicomOutboxRow> {
    Ok(DicomOutboxRow {
        id: r.get(0)?,
        destination: r.get(1)?,
        series_instance_uid: r.get(2)?,
        result_version: r.get(3)?,
        kind: r.get(4)?,
        sop_class_uid: r.get(5)?,
        sop_instance_uid: r.get(6)?,
        path: PathBuf::from(r.get::<_, String>(7)?),
        attempts: r.get::<_, i64>(8)? as u32,
    })
}

/// Inserts DICOM outbox rows of one result version; a (destination, SOP instance) already queued is left alone.
fn insert_dicom_outputs(
    tx: &Transaction<'_>,
    series_uid: &str,
    result_version: i64,
    rows: &[NewDicomOutput],
    now: i64,
) -> Result<usize> {
    let mut n = 0;
    for r in rows {
        n += tx.execute(
            "INSERT INTO dicom_outbox (destination, series_instance_uid, result_version, kind, sop_class_uid,
                sop_instance_uid, path, next_attempt_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8) ON CONFLICT(destination, sop_instance_uid) DO NOTHING",
            params![
                r.destination,
                series_uid,
                result_version,
                r.kind,
                r.sop_class_uid,
                r.sop_instance_uid,
                r.path.to_string_lossy(),
                now
            ],
        )?;
    }
    Ok(n)
}
