//! schema — the tables of the store and how an older database is brought up to date.
//!
//! Owns: [`MIGRATIONS`] (append only: a shipped entry is never edited) and applying the pending ones at open, each
//! in its own transaction with its `PRAGMA user_version` bump. The tables are listed in the `store` module docs.
//! Hands on: a database at the schema this build knows to [`super::Store::open`].
//! Never: touches a database written by a newer build, or reads or writes rows.

use rusqlite::Connection;

use super::{Result, StoreError};

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

/// Applies the migrations not yet applied, each in its own transaction with its `user_version` bump.
pub(super) fn migrate(conn: &mut Connection) -> Result<()> {
    let applied: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if applied < 0 || applied as usize > MIGRATIONS.len() {
        return Err(StoreError::NewerSchema { found: applied, known: MIGRATIONS.len() });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql).map_err(|error| StoreError::Migration { version: i + 1, error })?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "store: applied schema migration");
    }
    Ok(())
}
