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
//! Retention (`crate::retention`) deletes the spool files of finished series and marks their rows
//! `instances.purged_at` / `series.pixels_purged_at`; results, alerts and outputs rows are never purged. A purged
//! instance stored again clears its mark.
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

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::instance::InstanceMeta;
use crate::spool::SpooledInstance;

mod series_labels;
mod study_alerts;

pub use series_labels::{PatientDisplay, SeriesLabels};

/// Schema migrations, applied in order; `PRAGMA user_version` = how many have been applied. Append only: never
/// edit a shipped entry.
pub const MIGRATIONS: &[&str] = &[
    // v1
    r#"
    CREATE TABLE patients (
        patient_key   TEXT PRIMARY KEY,        -- hex of sha256(salt || id || 0 || name), first 16 bytes
        patient_id    TEXT NOT NULL,           -- raw; never leaves this table
        patient_name  TEXT NOT NULL,           -- raw; never leaves this table
        first_seen_at INTEGER NOT NULL,
        last_seen_at  INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE series (
        series_instance_uid TEXT PRIMARY KEY,
        study_instance_uid  TEXT NOT NULL,
        patient_key         TEXT NOT NULL REFERENCES patients(patient_key),
        study_date          TEXT NOT NULL,     -- DA (YYYYMMDD) or ''
        modality            TEXT NOT NULL,
        state               TEXT NOT NULL,     -- receiving|complete|analysing|analysed|skipped|failed
        state_reason        TEXT,              -- why skipped/failed
        n_instances         INTEGER NOT NULL,
        revision            INTEGER NOT NULL,  -- +1 per recorded instance (new or repeat)
        first_instance_at   INTEGER NOT NULL,
        last_instance_at    INTEGER NOT NULL,
        updated_at          INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX series_by_patient ON series(patient_key, study_date);
    CREATE INDEX series_by_update ON series(updated_at);

    CREATE TABLE instances (
        sop_instance_uid    TEXT PRIMARY KEY,
        series_instance_uid TEXT NOT NULL REFERENCES series(series_instance_uid),
        study_instance_uid  TEXT NOT NULL,
        sop_class_uid       TEXT NOT NULL,
        transfer_syntax_uid TEXT NOT NULL,
        meta_json           TEXT NOT NULL,     -- InstanceMeta without patient_id/patient_name
        path                TEXT NOT NULL,     -- Part-10 file in the spool
        bytes               INTEGER NOT NULL,
        association         INTEGER NOT NULL,  -- receive::AssociationId that carried it (last copy)
        received_at         INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX instances_by_series ON instances(series_instance_uid);

    CREATE TABLE results (
        series_instance_uid TEXT NOT NULL REFERENCES series(series_instance_uid),
        version             INTEGER NOT NULL,  -- 1, 2, ... per series
        series_revision     INTEGER NOT NULL,  -- series.revision the analysis saw
        positive            INTEGER NOT NULL,  -- 0/1
        involvement_percent REAL NOT NULL,
        result_json         TEXT NOT NULL,
        created_at          INTEGER NOT NULL,
        PRIMARY KEY (series_instance_uid, version)
    ) STRICT;

    CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        kind            TEXT NOT NULL CHECK (kind IN ('webhook')),
        dedup_key       TEXT NOT NULL UNIQUE,  -- "{series_uid}/v{version}"; also sent as a header
        payload_json    TEXT NOT NULL,         -- sent verbatim (the signature covers these bytes)
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        delivered_at    INTEGER,
        last_error      TEXT,
        created_at      INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX outbox_due ON outbox(next_attempt_at) WHERE delivered_at IS NULL;
    "#,
    // 2: DICOM outputs outbox (one row per object per destination; a SOP instance goes to a destination once).
    r#"
    CREATE TABLE dicom_outbox (
        id                  INTEGER PRIMARY KEY AUTOINCREMENT,
        destination         TEXT NOT NULL,     -- "AE@host:port"
        series_instance_uid TEXT NOT NULL,     -- source series
        result_version      INTEGER NOT NULL,
        kind                TEXT NOT NULL CHECK (kind IN ('seg', 'sr', 'key_images')),
        sop_class_uid       TEXT NOT NULL,
        sop_instance_uid    TEXT NOT NULL,
        path                TEXT NOT NULL,     -- the Part-10 file under data_dir/outputs/
        attempts            INTEGER NOT NULL DEFAULT 0,
        next_attempt_at     INTEGER NOT NULL,
        delivered_at        INTEGER,
        parked_at           INTEGER,           -- refused for good (or out of attempts): kept, never retried
        last_status         INTEGER,           -- last C-STORE status from the peer, if it answered
        last_error          TEXT,
        created_at          INTEGER NOT NULL,
        UNIQUE (destination, sop_instance_uid)
    ) STRICT;
    CREATE INDEX dicom_outbox_due ON dicom_outbox(next_attempt_at) WHERE delivered_at IS NULL AND parked_at IS NULL;
    "#,
    // 3: a result whose DICOM outputs are due but not yet queued (set with the result, cleared with its outbox rows
    // in one transaction each), so a crash in between is repaired at the next start.
    r#"
    ALTER TABLE results ADD COLUMN outputs_due INTEGER NOT NULL DEFAULT 0;
    "#,
    // 4: retention. An instance whose spool file was purged keeps its row (routing attributes) with `purged_at`;
    // a series remembers when pixels were last purged from it.
    r#"
    ALTER TABLE instances ADD COLUMN purged_at INTEGER;      -- spool file deleted by retention (row kept)
    ALTER TABLE series ADD COLUMN pixels_purged_at INTEGER;  -- last retention purge of this series' pixel data
    CREATE INDEX series_by_last_instance ON series(last_instance_at);
    "#,
    // 5: backward follow-up links. A result keeps the comparison it was recorded with; when the patient's prior
    // study arrives (or is re-analysed) later, the new comparison of that result version is stored here, and
    // the newest row of a (series, version) is the comparison that version shows.
    r#"
    CREATE TABLE follow_up_links (
        id                        INTEGER PRIMARY KEY AUTOINCREMENT,
        series_instance_uid       TEXT NOT NULL REFERENCES series(series_instance_uid),
        result_version            INTEGER NOT NULL,  -- the result version this comparison belongs to
        prior_series_instance_uid TEXT NOT NULL,     -- the series it compares with
        follow_up_json            TEXT NOT NULL,
        progression               INTEGER NOT NULL,  -- 0/1
        created_at                INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX follow_up_links_by_result ON follow_up_links(series_instance_uid, result_version);
    "#,
    // 6: a backward link whose amended SR some DICOM destination wants but that is not yet queued (set with the
    // link, cleared with its outbox rows in one transaction each), so a crash in between is repaired at the next
    // start.
    r#"
    ALTER TABLE follow_up_links ADD COLUMN outputs_due INTEGER NOT NULL DEFAULT 0;
    "#,
    // 7: one flag per exam: the series that holds its study's alert (`store/study_alerts.rs`).
    r#"
    CREATE TABLE study_alerts (
        study_instance_uid  TEXT PRIMARY KEY,
        series_instance_uid TEXT NOT NULL,     -- the series whose result raised the study's alert
        created_at          INTEGER NOT NULL
    ) STRICT;
    "#,
    // 8: what the dashboard shows to name a series (`store/series_labels.rs`); the accession number is an
    // identifier, kept locally like `patients`.
    r#"
    CREATE TABLE series_labels (
        series_instance_uid TEXT PRIMARY KEY REFERENCES series(series_instance_uid),
        accession_number    TEXT NOT NULL,
        study_time          TEXT NOT NULL,
        series_number       TEXT NOT NULL,
        series_description  TEXT NOT NULL
    ) STRICT;
    "#,
];

/// Current time as unix-epoch milliseconds (the store's one time unit).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Pseudonymous patient key: hex of the first 16 bytes of sha256(salt ‖ patient_id ‖ 0x00 ‖ patient_name).
/// Used in logs, webhooks and every table but `patients`.
pub fn patient_key(salt: &[u8], patient_id: &str, patient_name: &str) -> String {
    // No identity at all (anonymised data): no key, so such series are never linked to each other.
    if patient_id.trim().is_empty() && patient_name.trim().is_empty() {
        return String::new();
    }
    let mut h = Sha256::new();
    h.update(salt);
    h.update(patient_id.as_bytes());
    h.update([0u8]);
    h.update(patient_name.as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// Short pseudonymous key for a series in logs: hex of the first 8 bytes of sha256(series uid).
pub fn series_log_key(series_uid: &str) -> String {
    hex::encode(&Sha256::digest(series_uid.as_bytes())[..8])
}

/// The patient-key salt: 32 random bytes (from `/dev/urandom`) in `<data_dir>/patient-key.salt` (mode 0600),
/// created on first use and read back afterwards. (`alerts.patient_key_salt` in the config overrides it; the
/// caller decides.)
pub fn load_or_create_salt(data_dir: &Path) -> Result<Vec<u8>> {
    let path = crate::datadir::DataDir::new(data_dir).salt_file();
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() >= 16 => return Ok(bytes),
        Ok(bytes) => bail!("{} holds {} bytes, expected 32; refusing to guess a salt", path.display(), bytes.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let mut salt = vec![0u8; 32];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut salt)).context("reading /dev/urandom")?;
    let tmp = data_dir.join(format!("patient-key.salt.{}.tmp", std::process::id()));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&salt).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    // hard_link fails if another process won the race; then use its salt.
    match std::fs::hard_link(&tmp, &path) {
        Ok(()) => {
            let _ = std::fs::remove_file(&tmp);
            std::fs::File::open(data_dir).and_then(|d| d.sync_all()).ok();
            Ok(salt)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_file(&tmp);
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
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

/// A backward follow-up link: result `result_version` of `series_instance_uid` now compares with
/// `prior_series_instance_uid` (a study of the same patient that arrived, or was re-analysed, after it).
#[derive(Debug, Clone, PartialEq)]
pub struct FollowUpLink {
    pub series_instance_uid: String,
    pub result_version: u32,
    pub prior_series_instance_uid: String,
    /// The `follow_up` object that result now shows.
    pub follow_up: serde_json::Value,
    /// When set, a webhook alert with this body (the result as it now reads) is queued with the link.
    pub alert_payload: Option<serde_json::Value>,
    /// Some DICOM destination wants the amended SR of this comparison (queued by
    /// [`crate::outputs::outbox::enqueue_link_outputs`], which clears the mark).
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

/// One alert waiting in (or delivered from) the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    /// Row id (for `mark_delivered` / `mark_attempt_failed`).
    pub id: i64,
    /// Delivery channel; only `webhook` exists.
    pub kind: String,
    /// Unique per alert: `"{series_uid}/v{version}"`; receivers deduplicate on it.
    pub dedup_key: String,
    /// JSON body, to be sent byte for byte.
    pub payload_json: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// Not before this time (unix ms).
    pub next_attempt_at: i64,
    /// When it was queued (unix ms).
    pub created_at: i64,
}

/// Outbox totals, for metrics and the dashboard.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct OutboxCounts {
    /// Not yet delivered.
    pub pending: u64,
    /// Not yet delivered and failed at least once.
    pub failing: u64,
    /// Delivered.
    pub delivered: u64,
}

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
    /// read-only one ([`Store::open_read_only`], for `crate::store_read`).
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
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        if !path.exists() {
            // Create the file ourselves so it is 0600 from the first byte; SQLite gives -wal/-shm the same mode.
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating database {}", path.display()))?;
        }
        let mut conn = Connection::open(path).with_context(|| format!("opening database {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).ok();
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            bail!("database {} refused WAL journal mode (got {mode})", path.display());
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
        migrate(&mut conn).with_context(|| format!("migrating database {}", path.display()))?;
        Ok(Store { conn: Mutex::new(conn), path: path.to_path_buf(), outbox_wake: tokio::sync::Notify::new() })
    }

    /// A read-only connection to the database at `path`, which [`Store::open`] created (WAL: it reads the last
    /// committed state without waiting for the writer, and never blocks it). Every write method fails on it; see
    /// `crate::store_read` for the pool the dashboard, metrics and API read through.
    pub fn open_read_only(path: &Path) -> Result<Store> {
        use rusqlite::OpenFlags;
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags)
            .with_context(|| format!("opening database {} read-only", path.display()))?;
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
    /// `Store`; [`crate::notify::run_webhook_outbox`] waits on it.
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
        let meta_json = serde_json::to_string(&meta_no_ids)?;
        let path = inst.path.to_str().ok_or_else(|| anyhow!("spool path is not UTF-8: {}", inst.path.display()))?;
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
    pub fn series_instances(&self, series_uid: &str) -> Result<Vec<(InstanceMeta, PathBuf)>> {
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT meta_json, path FROM instances WHERE series_instance_uid = ?1 AND purged_at IS NULL
             ORDER BY json_extract(meta_json, '$.instance_number'), received_at, sop_instance_uid",
        )?;
        let rows = st.query_map([series_uid], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (json, path) = row?;
            let meta: InstanceMeta = serde_json::from_str(&json).context("corrupt meta_json in instances")?;
            out.push((meta, PathBuf::from(path)));
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
        self.record_result_with_outputs(
            series_uid,
            revision,
            positive,
            involvement_percent,
            result_json,
            alert,
            false,
            &[],
        )
    }

    /// [`Store::record_result_for_revision`] that also, in the same transaction, marks whether the result's DICOM
    /// outputs are due (`outputs_due`: some `[[outputs.dicom]]` destination wants them; the mark is cleared by
    /// [`Store::enqueue_dicom_outputs`] for that version) and stores the backward follow-up `links` this result
    /// causes (other series of the patient whose prior study it now is). A link is stored only while its result
    /// version is still that series' latest, and only when it changes what that version shows; a link with
    /// `alert_payload` queues a webhook row with dedup key `"{series}/v{version}/prior/{prior series}"`.
    /// Returns the new result's version.
    #[allow(clippy::too_many_arguments)]
    pub fn record_result_with_outputs(
        &self,
        series_uid: &str,
        revision: Option<i64>,
        positive: bool,
        involvement_percent: f64,
        result_json: &serde_json::Value,
        alert: bool,
        outputs_due: bool,
        links: &[FollowUpLink],
    ) -> Result<u32> {
        let obj = result_json.as_object().ok_or_else(|| anyhow!("result_json must be a JSON object"))?;
        refuse_raw_identifiers(obj, "result_json")?;
        let now = now_ms();
        let mut c = self.lock();
        let tx = c.transaction()?;
        let current: i64 = tx
            .query_row("SELECT revision FROM series WHERE series_instance_uid = ?1", [series_uid], |r| r.get(0))
            .optional()?
            .ok_or_else(|| anyhow!("record_result: unknown series {}", series_log_key(series_uid)))?;
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

    /// Backward links whose amended SR is due but not yet queued, oldest first, each with its row id and the
    /// time it was stored (unix ms).
    pub fn links_awaiting_outputs(&self) -> Result<Vec<(i64, i64, FollowUpLink)>> {
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT series_instance_uid, result_version, prior_series_instance_uid, follow_up_json, outputs_due, id,
                    created_at FROM follow_up_links WHERE outputs_due = 1 ORDER BY id",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(5)?, r.get(6)?, follow_up_link(r)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

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

    /// Queues an alert directly (for alerts not tied to a result version). Returns None when the dedup key
    /// already exists (the alert is already queued or delivered).
    pub fn enqueue_webhook(&self, dedup_key: &str, payload_json: &str) -> Result<Option<i64>> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let id = insert_outbox(&tx, dedup_key, payload_json, now_ms())?;
        tx.commit()?;
        drop(c);
        if id.is_some() {
            self.outbox_wake.notify_one();
        }
        Ok(id)
    }

    /// Undelivered rows whose `next_attempt_at <= now_ms`, oldest due first, at most `limit`.
    pub fn due_outbox(&self, now_ms: i64, limit: usize) -> Result<Vec<OutboxRow>> {
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT id, kind, dedup_key, payload_json, attempts, next_attempt_at, created_at FROM outbox
             WHERE delivered_at IS NULL AND next_attempt_at <= ?1 ORDER BY next_attempt_at, id LIMIT ?2",
        )?;
        let rows = st.query_map(params![now_ms, limit as i64], |r| {
            Ok(OutboxRow {
                id: r.get(0)?,
                kind: r.get(1)?,
                dedup_key: r.get(2)?,
                payload_json: r.get(3)?,
                attempts: r.get::<_, i64>(4)? as u32,
                next_attempt_at: r.get(5)?,
                created_at: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// When the next undelivered row falls due (None: nothing pending).
    pub fn next_outbox_due(&self) -> Result<Option<i64>> {
        let c = self.lock();
        Ok(c.query_row("SELECT MIN(next_attempt_at) FROM outbox WHERE delivered_at IS NULL", [], |r| r.get(0))?)
    }

    /// Marks a row delivered (counts the attempt). Returns false when it was unknown or already delivered.
    pub fn mark_delivered(&self, id: i64) -> Result<bool> {
        let c = self.lock();
        let n = c.execute(
            "UPDATE outbox SET delivered_at = ?2, attempts = attempts + 1, last_error = NULL
             WHERE id = ?1 AND delivered_at IS NULL",
            params![id, now_ms()],
        )?;
        Ok(n == 1)
    }

    /// Records a failed attempt and when to try again.
    pub fn mark_attempt_failed(&self, id: i64, error: &str, next_attempt_at: i64) -> Result<()> {
        let c = self.lock();
        c.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, next_attempt_at = ?3
             WHERE id = ?1 AND delivered_at IS NULL",
            params![id, error, next_attempt_at],
        )?;
        Ok(())
    }

    /// Pending / failing / delivered totals.
    pub fn outbox_counts(&self) -> Result<OutboxCounts> {
        let c = self.lock();
        Ok(c.query_row(
            "SELECT COALESCE(SUM(delivered_at IS NULL), 0), COALESCE(SUM(delivered_at IS NULL AND attempts > 0), 0),
                    COALESCE(SUM(delivered_at IS NOT NULL), 0) FROM outbox",
            [],
            |r| {
                Ok(OutboxCounts {
                    pending: r.get::<_, i64>(0)? as u64,
                    failing: r.get::<_, i64>(1)? as u64,
                    delivered: r.get::<_, i64>(2)? as u64,
                })
            },
        )?)
    }
}

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

/// Applies the migrations not yet applied, each in its own transaction with its `user_version` bump.
fn migrate(conn: &mut Connection) -> Result<()> {
    let applied: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if applied < 0 || applied as usize > MIGRATIONS.len() {
        bail!("schema version {applied} is newer than this build knows ({}); refusing to touch it", MIGRATIONS.len());
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql).with_context(|| format!("applying migration {}", i + 1))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "store: applied schema migration");
    }
    Ok(())
}

fn recount(tx: &Transaction<'_>, series_uid: &str, now: i64) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE series SET n_instances = (SELECT COUNT(*) FROM instances WHERE series_instance_uid = ?1),
                           updated_at = ?2
         WHERE series_instance_uid = ?1",
        params![series_uid, now],
    )?;
    Ok(())
}

/// Refuses a JSON object (a result, an alert body) that carries raw patient identifiers as keys.
fn refuse_raw_identifiers(obj: &serde_json::Map<String, serde_json::Value>, what: &str) -> Result<()> {
    for k in ["patient_id", "patient_name", "PatientID", "PatientName"] {
        if obj.contains_key(k) {
            bail!("{what} carries raw identifier key {k:?}; use patient_key");
        }
    }
    Ok(())
}

/// Stores one backward follow-up link (see [`Store::record_result_with_outputs`]); returns whether it queued an
/// alert.
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
    let mut payload = payload.as_object().cloned().ok_or_else(|| anyhow!("alert payload must be a JSON object"))?;
    refuse_raw_identifiers(&payload, "alert payload")?;
    let dedup_key = format!("{}/v{}/prior/{}", l.series_instance_uid, l.result_version, l.prior_series_instance_uid);
    payload.insert("version".into(), serde_json::json!(l.result_version));
    payload.insert("dedup_key".into(), serde_json::json!(dedup_key));
    Ok(insert_outbox(tx, &dedup_key, &serde_json::Value::Object(payload).to_string(), now)?.is_some())
}

fn insert_outbox(tx: &Transaction<'_>, dedup_key: &str, payload_json: &str, now: i64) -> Result<Option<i64>> {
    let n = tx.execute(
        "INSERT INTO outbox (kind, dedup_key, payload_json, next_attempt_at, created_at)
         VALUES ('webhook', ?1, ?2, ?3, ?3) ON CONFLICT(dedup_key) DO NOTHING",
        params![dedup_key, payload_json, now],
    )?;
    Ok((n == 1).then(|| tx.last_insert_rowid()))
}

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

/// A result row, with the newest backward follow-up link of that version (column 8; NULL when none).
const RESULT_SELECT: &str = "SELECT r.series_instance_uid, r.version, r.series_revision, r.positive,
        r.involvement_percent, r.result_json, r.created_at, s.study_date,
        (SELECT l.follow_up_json FROM follow_up_links l
          WHERE l.series_instance_uid = r.series_instance_uid AND l.result_version = r.version
          ORDER BY l.id DESC LIMIT 1)
    FROM results r JOIN series s ON s.series_instance_uid = r.series_instance_uid";

fn stored_result(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredResult> {
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
        let rows = st.query_map(params![now_ms, limit as i64], |r| {
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
        })?;
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

    /// Every DICOM outbox row of a series (any state), for tests and the dashboard:
    /// (row, delivered, parked, last status, last error).
    pub fn dicom_outbox_of_series(
        &self,
        series_uid: &str,
    ) -> Result<Vec<(DicomOutboxRow, bool, bool, Option<u16>, Option<String>)>> {
        self.dicom_outbox_where("series_instance_uid = ?1 ORDER BY id", series_uid)
    }

    /// The most recently parked DICOM outputs (any series), newest first, at most `limit`; same tuple as
    /// [`Store::dicom_outbox_of_series`].
    pub fn parked_dicom_outputs(
        &self,
        limit: usize,
    ) -> Result<Vec<(DicomOutboxRow, bool, bool, Option<u16>, Option<String>)>> {
        self.dicom_outbox_where("parked_at IS NOT NULL ORDER BY parked_at DESC, id DESC LIMIT ?1", limit as i64)
    }

    #[allow(clippy::type_complexity)]
    fn dicom_outbox_where(
        &self,
        condition: &str,
        arg: impl rusqlite::ToSql,
    ) -> Result<Vec<(DicomOutboxRow, bool, bool, Option<u16>, Option<String>)>> {
        let c = self.lock();
        let mut st = c.prepare(&format!(
            "SELECT id, destination, series_instance_uid, result_version, kind, sop_class_uid, sop_instance_uid,
                    path, attempts, delivered_at IS NOT NULL, parked_at IS NOT NULL, last_status, last_error
             FROM dicom_outbox WHERE {condition}"
        ))?;
        let rows = st.query_map([arg], |r| {
            Ok((
                DicomOutboxRow {
                    id: r.get(0)?,
                    destination: r.get(1)?,
                    series_instance_uid: r.get(2)?,
                    result_version: r.get(3)?,
                    kind: r.get(4)?,
                    sop_class_uid: r.get(5)?,
                    sop_instance_uid: r.get(6)?,
                    path: PathBuf::from(r.get::<_, String>(7)?),
                    attempts: r.get::<_, i64>(8)? as u32,
                },
                r.get::<_, bool>(9)?,
                r.get::<_, bool>(10)?,
                r.get::<_, Option<i64>>(11)?.map(|s| s as u16),
                r.get::<_, Option<String>>(12)?,
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
