//! instances — which instances the appliance holds, in which series, and where each series stands.
//!
//! Owns: the `patients`, `series` and `instances` rows: recording a spooled instance (patient upsert, series
//! revision step, instance upsert, in one transaction), the instance list of a series, series state, and the
//! series pending analysis after a crash. See the `store` module docs for revisions and states.
//! Hands on: [`StoredInstance`] lists to `pipeline` and `outputs`, [`SeriesRow`]s to the dashboard.
//! Never: reads the DICOM files it lists, decides a series is complete or eligible, or keeps raw patient
//! identifiers anywhere but `patients` (the stored routing attributes have them cleared).

use std::path::PathBuf;

use rusqlite::{params, OptionalExtension, Transaction};
use serde::Serialize;

use super::{now_ms, Result, Store, StoreError};
use crate::instance::InstanceMeta;

/// One instance made durable by the spool: what [`Store::record_instance`] records (`spool` hands it on; it lives
/// here so the store needs nothing from the spool).
#[derive(Debug, Clone)]
pub struct SpooledInstance {
    /// Routing/grouping/ordering attributes extracted once from the dataset.
    pub meta: InstanceMeta,
    /// Absolute path of the Part-10 file in the spool.
    pub path: PathBuf,
    /// Transfer syntax of the dataset as received (also in the file meta group).
    pub transfer_syntax_uid: String,
    /// Size of the whole file on disk (meta group + dataset), bytes.
    pub bytes: u64,
    /// `Some(ms)`: the spool already held exactly these bytes at this path (a sender's retry of an instance it had
    /// sent before), written at this time (file mtime, ms since the Unix epoch); nothing was written, the file
    /// and its directory were synced again. `None`: the file was written now (new, or new content).
    pub unchanged_since_ms: Option<i64>,
}

/// One recorded instance whose spool file is present (see [`Store::series_instances`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredInstance {
    /// Routing/grouping/ordering attributes, without patient identifiers.
    pub meta: InstanceMeta,
    /// Its Part-10 file in the spool.
    pub path: PathBuf,
}

/// What [`Store::record_instance`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceRecorded {
    /// The SOP Instance UID was not known before (false: a repeat that replaced the earlier copy).
    pub new_instance: bool,
    /// This instance created the series row.
    pub new_series: bool,
    /// The series already had an analysis result: this is a late instance after completion, and the series
    /// will need a new result version.
    pub series_had_result: bool,
    /// Distinct instances now in the series.
    pub n_instances: u32,
    /// The series' revision after this instance (see the module docs).
    pub revision: i64,
    /// A repeat of an instance whose spool file retention had purged (its pixels are back now).
    pub was_purged: bool,
    /// A sender's retry: the same bytes as the recorded, unpurged instance (the spool wrote nothing, see
    /// [`SpooledInstance::unchanged_since_ms`]). Nothing was changed: no revision step, the series keeps its state.
    pub unchanged: bool,
}

/// Whether the series has at least one analysis result.
fn has_result(c: &rusqlite::Connection, series_uid: &str) -> Result<bool> {
    Ok(c.query_row("SELECT 1 FROM results WHERE series_instance_uid = ?1 LIMIT 1", [series_uid], |_| Ok(()))
        .optional()?
        .is_some())
}

/// One series as the store knows it (no raw identifiers).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SeriesRow {
    /// Series Instance UID.
    pub series_instance_uid: String,
    /// Study Instance UID.
    pub study_instance_uid: String,
    /// Pseudonymous patient key.
    pub patient_key: String,
    /// Study Date (YYYYMMDD or '').
    pub study_date: String,
    /// Modality of the first instance.
    pub modality: String,
    /// receiving|complete|analysing|analysed|skipped|failed.
    pub state: String,
    /// Why skipped/failed.
    pub state_reason: Option<String>,
    /// Distinct instances.
    pub n_instances: u32,
    /// See the module docs.
    pub revision: i64,
    /// Last instance received (unix ms).
    pub last_instance_at: i64,
    /// Last change of any kind (unix ms).
    pub updated_at: i64,
    /// Latest result version, if any.
    pub latest_version: Option<u32>,
    /// Latest result's positive flag, if any.
    pub latest_positive: Option<bool>,
    /// Latest result's involvement, if any.
    pub latest_involvement_percent: Option<f64>,
}

impl Store {
    /// Records a spooled instance in one transaction: upserts the patient (raw identifiers from `inst.meta`
    /// under `patient_key`), the series (state back to `receiving`, revision + 1) and the instance (a repeat
    /// SOP Instance UID replaces the earlier row).
    ///
    /// A retry of the same bytes ([`SpooledInstance::unchanged_since_ms`]) of an instance recorded at that spool
    /// path, not purged, and recorded *after* the file was written (so the recorded instance is this file's content:
    /// a file replaced by a store whose recording then failed is not) changes nothing and says `unchanged` — unless
    /// the series' analysis `failed`: a re-send then records as before, so it is tried again.
    pub fn record_instance(
        &self,
        inst: &SpooledInstance,
        association: u64,
        patient_key: &str,
    ) -> Result<InstanceRecorded> {
        let m = &inst.meta;
        let now = now_ms();
        let mut meta_no_ids = m.clone();
        meta_no_ids.patient_id.clear();
        meta_no_ids.patient_name.clear();
        // JSON has no NaN/inf (serde_json writes null, which would not read back): drop such geometry.
        let finite = |v: &[f64]| v.iter().all(|x| x.is_finite());
        if !meta_no_ids.image_position.is_some_and(|v| finite(&v)) {
            meta_no_ids.image_position = None;
        }
        if !meta_no_ids.image_orientation.is_some_and(|v| finite(&v)) {
            meta_no_ids.image_orientation = None;
        }
        if !meta_no_ids.pixel_spacing.is_some_and(|v| finite(&v)) {
            meta_no_ids.pixel_spacing = None;
        }
        meta_no_ids.slice_thickness = meta_no_ids.slice_thickness.filter(|x| x.is_finite());
        let meta_json = serde_json::to_string(&meta_no_ids)
            .map_err(|error| StoreError::Json { what: "instance routing attributes", error })?;
        let path = inst.path.to_str().ok_or_else(|| StoreError::NonUtf8Path(inst.path.clone()))?;
        let mut c = self.lock();
        let tx = c.transaction()?;
        if let Some(written_ms) = inst.unchanged_since_ms {
            let same: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT s.n_instances, s.revision FROM instances i
                     JOIN series s ON s.series_instance_uid = i.series_instance_uid
                     WHERE i.sop_instance_uid = ?1 AND i.series_instance_uid = ?2 AND i.path = ?3
                       AND i.purged_at IS NULL AND i.received_at >= ?4 AND s.state <> 'failed'",
                    params![m.sop_instance_uid, m.series_instance_uid, path, written_ms],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((n_instances, revision)) = same {
                return Ok(InstanceRecorded {
                    was_purged: false,
                    new_instance: false,
                    new_series: false,
                    series_had_result: has_result(&tx, &m.series_instance_uid)?,
                    n_instances: n_instances as u32,
                    revision,
                    unchanged: true,
                });
            }
        }
        tx.execute(
            "INSERT INTO patients (patient_key, patient_id, patient_name, first_seen_at, last_seen_at)
             VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT(patient_key) DO UPDATE SET last_seen_at = excluded.last_seen_at",
            params![patient_key, m.patient_id, m.patient_name, now],
        )?;
        let new_series = tx
            .query_row("SELECT 1 FROM series WHERE series_instance_uid = ?1", [&m.series_instance_uid], |_| Ok(()))
            .optional()?
            .is_none();
        tx.execute(
            "INSERT INTO series (series_instance_uid, study_instance_uid, patient_key, study_date, modality, state,
                                 n_instances, revision, first_instance_at, last_instance_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'receiving', 0, 1, ?6, ?6, ?6)
             ON CONFLICT(series_instance_uid) DO UPDATE SET
                state = 'receiving', state_reason = NULL, revision = revision + 1,
                last_instance_at = excluded.last_instance_at, updated_at = excluded.updated_at",
            params![m.series_instance_uid, m.study_instance_uid, patient_key, m.study_date, m.modality, now],
        )?;
        let previous: Option<(String, Option<i64>)> = tx
            .query_row(
                "SELECT series_instance_uid, purged_at FROM instances WHERE sop_instance_uid = ?1",
                [&m.sop_instance_uid],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let was_purged = previous.as_ref().is_some_and(|(_, at)| at.is_some());
        let previous_series = previous.map(|(s, _)| s);
        tx.execute(
            "INSERT INTO instances (sop_instance_uid, series_instance_uid, study_instance_uid, sop_class_uid,
                                    transfer_syntax_uid, meta_json, path, bytes, association, received_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT(sop_instance_uid) DO UPDATE SET
                series_instance_uid = excluded.series_instance_uid, study_instance_uid = excluded.study_instance_uid,
                sop_class_uid = excluded.sop_class_uid, transfer_syntax_uid = excluded.transfer_syntax_uid,
                meta_json = excluded.meta_json, path = excluded.path, bytes = excluded.bytes,
                association = excluded.association, received_at = excluded.received_at, purged_at = NULL",
            params![
                m.sop_instance_uid,
                m.series_instance_uid,
                m.study_instance_uid,
                m.sop_class_uid,
                inst.transfer_syntax_uid,
                meta_json,
                path,
                i64::try_from(inst.bytes).unwrap_or(i64::MAX),
                i64::try_from(association).unwrap_or(i64::MAX),
                now
            ],
        )?;
        recount(&tx, &m.series_instance_uid, now)?;
        if let Some(prev) = previous_series.as_deref().filter(|p| *p != m.series_instance_uid) {
            recount(&tx, prev, now)?;
        }
        let (n_instances, revision): (i64, i64) = tx.query_row(
            "SELECT n_instances, revision FROM series WHERE series_instance_uid = ?1",
            [&m.series_instance_uid],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let series_had_result = has_result(&tx, &m.series_instance_uid)?;
        tx.commit()?;
        Ok(InstanceRecorded {
            was_purged,
            new_instance: previous_series.is_none(),
            new_series,
            series_had_result,
            n_instances: n_instances as u32,
            revision,
            unchanged: false,
        })
    }

    /// Every instance of a series whose spool file is present (not purged by retention; see
    /// [`Store::purged_instance_count`]) with its spool path (order: Instance Number, then arrival; `series` sorts
    /// geometrically). The returned metas carry no patient identifiers.
    pub fn series_instances(&self, series_uid: &str) -> Result<Vec<StoredInstance>> {
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT meta_json, path FROM instances WHERE series_instance_uid = ?1 AND purged_at IS NULL
             ORDER BY json_extract(meta_json, '$.instance_number'), received_at, sop_instance_uid",
        )?;
        let rows = st.query_map([series_uid], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (json, path) = row?;
            let meta: InstanceMeta = serde_json::from_str(&json)
                .map_err(|error| StoreError::Json { what: "corrupt meta_json in instances", error })?;
            out.push(StoredInstance { meta, path: PathBuf::from(path) });
        }
        Ok(out)
    }

    /// The series' current revision (None: unknown series). Read it *before* loading the instances of an
    /// analysis and pass it to [`Store::record_result_for_revision`] so an instance arriving mid-analysis
    /// leaves the series pending.
    pub fn series_revision(&self, series_uid: &str) -> Result<Option<i64>> {
        let c = self.lock();
        Ok(c.query_row("SELECT revision FROM series WHERE series_instance_uid = ?1", [series_uid], |r| r.get(0))
            .optional()?)
    }

    /// Series needing (re-)analysis, oldest activity first: not `skipped`, and either without a result or with
    /// a latest result computed from an older revision. Called at start-up to resume after a crash.
    pub fn series_pending_analysis(&self) -> Result<Vec<String>> {
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT s.series_instance_uid FROM series s
             WHERE s.state NOT IN ('skipped', 'purged')
               AND s.revision > COALESCE(
                   (SELECT r.series_revision FROM results r WHERE r.series_instance_uid = s.series_instance_uid
                    ORDER BY r.version DESC LIMIT 1), 0)
             ORDER BY s.last_instance_at, s.series_instance_uid",
        )?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Sets a series' state (`complete`, `analysing`, `skipped`, `failed`, ...) with an optional reason.
    /// Returns false when the series is unknown.
    pub fn set_series_state(&self, series_uid: &str, state: &str, reason: Option<&str>) -> Result<bool> {
        let c = self.lock();
        let n = c.execute(
            "UPDATE series SET state = ?2, state_reason = ?3, updated_at = ?4 WHERE series_instance_uid = ?1",
            params![series_uid, state, reason, now_ms()],
        )?;
        Ok(n == 1)
    }

    /// One series (None: unknown).
    pub fn series(&self, series_uid: &str) -> Result<Option<SeriesRow>> {
        let c = self.lock();
        let sql = format!("{SERIES_SELECT} WHERE s.series_instance_uid = ?1");
        Ok(c.query_row(&sql, [series_uid], series_row).optional()?)
    }

    /// The most recently updated series, newest first (dashboard).
    pub fn recent_series(&self, limit: usize) -> Result<Vec<SeriesRow>> {
        let c = self.lock();
        let sql = format!("{SERIES_SELECT} ORDER BY s.updated_at DESC, s.series_instance_uid LIMIT ?1");
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map([limit as i64], series_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// Sets a series' instance count from its `instances` rows (and its `updated_at`).
fn recount(tx: &Transaction<'_>, series_uid: &str, now: i64) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE series SET n_instances = (SELECT COUNT(*) FROM instances WHERE series_instance_uid = ?1),
                           updated_at = ?2
         WHERE series_instance_uid = ?1",
        params![series_uid, now],
    )?;
    Ok(())
}

/// A series row with its latest result's version, verdict and involvement (NULL when it has none).
const SERIES_SELECT: &str =
    "SELECT s.series_instance_uid, s.study_instance_uid, s.patient_key, s.study_date, s.modality,
        s.state, s.state_reason, s.n_instances, s.revision, s.last_instance_at, s.updated_at,
        r.version, r.positive, r.involvement_percent
    FROM series s LEFT JOIN results r ON r.series_instance_uid = s.series_instance_uid
        AND r.version = (SELECT MAX(version) FROM results r2 WHERE r2.series_instance_uid = s.series_instance_uid)";

fn series_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SeriesRow> {
    Ok(SeriesRow {
        series_instance_uid: r.get(0)?,
        study_instance_uid: r.get(1)?,
        patient_key: r.get(2)?,
        study_date: r.get(3)?,
        modality: r.get(4)?,
        state: r.get(5)?,
        state_reason: r.get(6)?,
        n_instances: r.get::<_, i64>(7)? as u32,
        revision: r.get(8)?,
        last_instance_at: r.get(9)?,
        updated_at: r.get(10)?,
        latest_version: r.get::<_, Option<i64>>(11)?.map(|v| v as u32),
        latest_positive: r.get(12)?,
        latest_involvement_percent: r.get(13)?,
    })
}
