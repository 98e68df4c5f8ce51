//! store — the appliance's durable memory: one SQLite database (WAL, `synchronous=FULL`, foreign keys on).
//!
//! Owns: the schema and its migrations; which instances belong to which series and patient; series state; the
//! versioned analysis results (a re-analysis adds a version, never replaces one); the alert outbox that
//! `notify` drains; and the patient key (salted hash) that stands in for raw patient identifiers everywhere
//! outside the `patients` table.
//! Hands on: instance lists to `series`/`pipeline`, pending series for crash recovery, due outbox rows to
//! `notify`, results to the dashboard.
//! Never: reads DICOM files, decides eligibility or positivity, sends anything over the network, or logs raw
//! patient identifiers.
//!
//! # Schema (see [`MIGRATIONS`]; every timestamp is unix-epoch milliseconds, `INTEGER`)
//!
//! | table | key | what |
//! |---|---|---|
//! | `patients` | `patient_key` | the ONLY place raw Patient ID / Patient Name are kept |
//! | `series` | `series_instance_uid` | study, patient key, study date, state, instance count, `revision` |
//! | `instances` | `sop_instance_uid` | series, classes, routing attributes as JSON, spool path, size, association |
//! | `results` | (`series_instance_uid`, `version`) | every analysis of a series, with the `series_revision` it saw |
//! | `outbox` | `id`, `dedup_key` UNIQUE | alerts to deliver (kind `webhook`), attempts and back-off |
//! | `dicom_outbox` | `id`, (`destination`, `sop_instance_uid`) UNIQUE | DICOM outputs to C-STORE; delivered or parked |
//! | `follow_up_links` | `id` | a result version's newer comparison, when its prior study arrived after it |
//! | `study_alerts` | `study_instance_uid` | the series that raised the study's one alert (`store/study_alerts.rs`) |
//! | `series_labels` | `series_instance_uid` | accession, study time, series number/description for the dashboard |
//!
//! `results.outputs_due` is set in the transaction that records a result whose DICOM outputs some destination
//! wants, and cleared in the transaction that queues its `dicom_outbox` rows: a crash in between leaves it set,
//! and [`Store::results_awaiting_outputs`] hands such results to the daemon's start-up sweep. A backward link
//! whose amended SR a destination wants works the same way (`follow_up_links.outputs_due`,
//! [`Store::links_awaiting_outputs`]).
//!
//! Retention (the `retention` module, through [`Store::purge_candidates`]) deletes the spool files of finished
//! series and marks their rows `instances.purged_at` / `series.pixels_purged_at`; results, alerts and outputs rows
//! are never purged. A purged instance stored again clears its mark.
//!
//! `series.revision` grows by one with every instance recorded for the series (new, or a repeat with other bytes;
//! a sender's retry of the very bytes it had sent changes nothing, see [`Store::record_instance`]). A result
//! remembers the revision it was computed from; a series whose revision moved past its latest result's (or that
//! has no result, and is not `skipped`) is *pending analysis* — that is how the daemon resumes after a crash.
//!
//! Series states (text, written by the pipeline through [`Store::set_series_state`]): `receiving` (set by every
//! new instance), `complete`, `analysing`, `analysed` (set by [`Store::record_result`]), `skipped`
//! (ineligible, with a reason), `failed` (analysis error, with a reason; retried after a restart), `purged` (a
//! re-analysis was asked for but some of the series' pixel data had been purged by retention; the reason says
//! which, and re-sending the series analyses it again).
//!
//! # Parts
//!
//! | file | what |
//! |---|---|
//! | `schema.rs` | [`MIGRATIONS`] and applying them |
//! | `error.rs` | [`StoreError`] (with [`StoreError::DiskFull`]) and the [`Result`] every method returns |
//! | `identity.rs` | the patient-key salt, [`patient_key`], [`series_log_key`], the raw-identifier guard |
//! | `instances.rs` | recording instances ([`SpooledInstance`]), series rows and state |
//! | `results.rs` | result versions ([`NewResult`]) and backward follow-up links |
//! | `webhook_outbox.rs` | the alert outbox `notify` drains |
//! | `dicom_outbox.rs` | the DICOM outputs outbox `outputs` drains |
//! | `retention.rs` | what retention may purge, and marking it purged |
//! | `series_labels.rs`, `study_alerts.rs` | the dashboard's labels; one alert per study |
//! | `read.rs` | the pool of read-only connections ([`ReadPool`]) |

use std::fs::OpenOptions;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::Connection;

mod dicom_outbox;
mod error;
mod identity;
mod instances;
mod read;
mod results;
mod retention;
mod schema;
mod series_labels;
mod study_alerts;
mod webhook_outbox;

pub use dicom_outbox::{DicomOutboxCounts, DicomOutboxEntry, DicomOutboxRow, NewDicomOutput};
pub use error::{is_disk_full, Result, StoreError};
pub use identity::{load_or_create_salt, patient_key, series_log_key};
pub use instances::{InstanceRecorded, SeriesRow, SpooledInstance, StoredInstance};
pub use read::{ReadPool, Reader, DEFAULT_READERS};
pub use results::{FollowUpLink, LinkAwaitingOutputs, NewResult, StoredResult};
pub use retention::PurgeCandidate;
pub use schema::MIGRATIONS;
pub use series_labels::{PatientDisplay, SeriesLabels};
pub use webhook_outbox::{OutboxCounts, OutboxRow};

/// Current time as unix-epoch milliseconds (the store's one time unit), from the crate's one clock.
pub use crate::clock::now_ms;

/// The connection-level settings, read back from SQLite (for tests and the health endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pragmas {
    /// Expected "wal".
    pub journal_mode: String,
    /// Expected 2 (FULL).
    pub synchronous: i64,
    /// Expected true.
    pub foreign_keys: bool,
    /// Milliseconds SQLite waits on a locked database.
    pub busy_timeout_ms: i64,
    /// Number of migrations applied.
    pub user_version: i64,
}

/// The database. `Send + Sync`; share it as `Arc<Store>`. Every method is one short blocking transaction
/// (call from `spawn_blocking` on hot paths).
#[derive(Debug)]
pub struct Store {
    /// The connection: the writer's (SQLite serialises writers anyway and our transactions are short), or a
    /// read-only one ([`Store::open_read_only`], for [`ReadPool`]).
    conn: Mutex<Connection>,
    /// Database file path (for messages).
    path: PathBuf,
    /// Woken whenever an outbox row is queued, so `notify` delivers at once instead of at its next poll.
    outbox_wake: tokio::sync::Notify,
}

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

impl Store {
    /// Opens (creating, mode 0600) the database at `path`, sets WAL + `synchronous=FULL` + foreign keys +
    /// busy timeout, and applies pending [`MIGRATIONS`]. Refuses a database from a newer build.
    pub fn open(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| StoreError::io("creating", dir, e))?;
        }
        if !path.exists() {
            // Create the file ourselves so it is 0600 from the first byte; SQLite gives -wal/-shm the same mode.
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| StoreError::io("creating database", path, e))?;
        }
        let mut conn = Connection::open(path).map_err(|e| StoreError::database("opening database", path)(e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).ok();
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NotWal { path: path.to_path_buf(), mode });
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
        schema::migrate(&mut conn).map_err(StoreError::database("migrating database", path))?;
        Ok(Store { conn: Mutex::new(conn), path: path.to_path_buf(), outbox_wake: tokio::sync::Notify::new() })
    }

    /// A read-only connection to the database at `path`, which [`Store::open`] created (WAL: it reads the last
    /// committed state without waiting for the writer, and never blocks it). Every write method fails on it; see
    /// [`ReadPool`] for the pool the dashboard, metrics and API read through.
    pub fn open_read_only(path: &Path) -> Result<Store> {
        use rusqlite::OpenFlags;
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags)
            .map_err(|e| StoreError::database("opening database read-only", path)(e.into()))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(Store { conn: Mutex::new(conn), path: path.to_path_buf(), outbox_wake: tokio::sync::Notify::new() })
    }

    /// SQLite's `PRAGMA data_version`: changes whenever another connection commits a change to the database
    /// (a cheap "did anything change" for readers).
    pub fn data_version(&self) -> Result<i64> {
        Ok(self.lock().query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Signalled (`notify_one`, so a wake-up is never lost) each time an outbox row is queued through this
    /// `Store`; the webhook worker in `notify` waits on it.
    pub fn outbox_wake(&self) -> &tokio::sync::Notify {
        &self.outbox_wake
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back); keep going.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the connection settings back from SQLite.
    pub fn pragmas(&self) -> Result<Pragmas> {
        let c = self.lock();
        let q = |sql: &str| -> rusqlite::Result<rusqlite::types::Value> { c.query_row(sql, [], |r| r.get(0)) };
        let int = |v: rusqlite::types::Value| match v {
            rusqlite::types::Value::Integer(i) => i,
            _ => -1,
        };
        Ok(Pragmas {
            journal_mode: match q("PRAGMA journal_mode")? {
                rusqlite::types::Value::Text(s) => s,
                other => format!("{other:?}"),
            },
            synchronous: int(q("PRAGMA synchronous")?),
            foreign_keys: int(q("PRAGMA foreign_keys")?) == 1,
            busy_timeout_ms: int(q("PRAGMA busy_timeout")?),
            user_version: int(q("PRAGMA user_version")?),
        })
    }
}
