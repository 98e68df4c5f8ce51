//! retention (store side) — which series' pixel data may go, and marking it gone.
//!
//! Owns: the one condition for a purgeable series (finished with a result of its current revision, or `purged`;
//! no DICOM output pending nor still to be queued; spool files left), the candidates oldest first, and marking a
//! series' instances purged in a transaction that checks that condition again.
//! Hands on: [`PurgeCandidate`]s and the spool paths to delete to the `retention` module, which deletes the files.
//! Never: deletes a file, or any row (results, alerts, outputs and instance rows are kept; a purged instance
//! stored again clears its mark in `instances.rs`).

use std::path::PathBuf;

use rusqlite::{params, OptionalExtension};

use super::{now_ms, Result, Store};

/// A finished series whose pixel data retention may purge (see [`Store::purge_candidates`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PurgeCandidate {
    /// Series Instance UID.
    pub series_instance_uid: String,
    /// Last instance received (unix ms): the age retention counts from, and the purge order.
    pub last_instance_at: i64,
    /// Bytes of its spool files not yet purged.
    pub bytes: u64,
}

/// The condition (on `series s`) for a series whose pixels may be purged: finished (analysed or skipped) with a
/// result computed from its current revision — or `purged` (a late instance that can no longer be analysed) —,
/// no DICOM output still to deliver, spool files left to purge.
const PURGEABLE: &str = "((s.state IN ('analysed', 'skipped')
      AND s.revision <= COALESCE((SELECT r.series_revision FROM results r
        WHERE r.series_instance_uid = s.series_instance_uid ORDER BY r.version DESC LIMIT 1), 0))
     OR s.state = 'purged')
    AND NOT EXISTS (SELECT 1 FROM dicom_outbox d WHERE d.series_instance_uid = s.series_instance_uid
        AND d.delivered_at IS NULL AND d.parked_at IS NULL)
    AND NOT EXISTS (SELECT 1 FROM results r WHERE r.series_instance_uid = s.series_instance_uid
        AND r.outputs_due = 1)
    AND NOT EXISTS (SELECT 1 FROM follow_up_links f WHERE f.series_instance_uid = s.series_instance_uid
        AND f.outputs_due = 1)
    AND EXISTS (SELECT 1 FROM instances i WHERE i.series_instance_uid = s.series_instance_uid
        AND i.purged_at IS NULL)";

impl Store {
    /// Series whose pixel data may be purged, oldest last instance first: finished (`analysed` or `skipped`,
    /// with a result of their current revision), no DICOM output pending in the outbox nor still to be queued
    /// (`results.outputs_due`: the start-up sweep rebuilds those from the spool), and spool files left.
    /// `received_before`: only series whose last instance is older than this (unix ms).
    pub fn purge_candidates(&self, received_before: Option<i64>, limit: usize) -> Result<Vec<PurgeCandidate>> {
        let c = self.lock();
        let sql = format!(
            "SELECT s.series_instance_uid, s.last_instance_at,
                (SELECT COALESCE(SUM(i.bytes), 0) FROM instances i
                 WHERE i.series_instance_uid = s.series_instance_uid AND i.purged_at IS NULL)
             FROM series s WHERE {PURGEABLE} AND s.last_instance_at < ?1
             ORDER BY s.last_instance_at, s.series_instance_uid LIMIT ?2"
        );
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map(params![received_before.unwrap_or(i64::MAX), limit as i64], |r| {
            Ok(PurgeCandidate {
                series_instance_uid: r.get(0)?,
                last_instance_at: r.get(1)?,
                bytes: r.get::<_, i64>(2)?.max(0) as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Marks the spool files of a series purged, in one transaction that re-checks the series is still purgeable
    /// (an instance may have arrived since [`Store::purge_candidates`]). Returns the paths the caller must now
    /// delete (empty: not purgeable any more). The caller holds off new instances of the series meanwhile.
    pub fn mark_series_purged(&self, series_uid: &str) -> Result<Vec<PathBuf>> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let sql = format!("SELECT 1 FROM series s WHERE s.series_instance_uid = ?1 AND {PURGEABLE}");
        if tx.query_row(&sql, [series_uid], |_| Ok(())).optional()?.is_none() {
            return Ok(Vec::new());
        }
        let paths: Vec<String> = {
            let mut st =
                tx.prepare("SELECT path FROM instances WHERE series_instance_uid = ?1 AND purged_at IS NULL")?;
            let rows = st.query_map([series_uid], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let now = now_ms();
        tx.execute(
            "UPDATE instances SET purged_at = ?2 WHERE series_instance_uid = ?1 AND purged_at IS NULL",
            params![series_uid, now],
        )?;
        tx.execute("UPDATE series SET pixels_purged_at = ?2 WHERE series_instance_uid = ?1", params![series_uid, now])?;
        tx.commit()?;
        Ok(paths.into_iter().map(PathBuf::from).collect())
    }

    /// Instances of a series whose spool file was purged by retention (and not stored again since).
    pub fn purged_instance_count(&self, series_uid: &str) -> Result<u32> {
        let c = self.lock();
        let n: i64 = c.query_row(
            "SELECT COUNT(*) FROM instances WHERE series_instance_uid = ?1 AND purged_at IS NOT NULL",
            [series_uid],
            |r| r.get(0),
        )?;
        Ok(n as u32)
    }

    /// When retention last purged pixel data of the series (None: never, or unknown series).
    pub fn pixels_purged_at(&self, series_uid: &str) -> Result<Option<i64>> {
        let c = self.lock();
        Ok(c.query_row("SELECT pixels_purged_at FROM series WHERE series_instance_uid = ?1", [series_uid], |r| {
            r.get(0)
        })
        .optional()?
        .flatten())
    }
}
