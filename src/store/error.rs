//! error — what can go wrong in the store, as one typed [`StoreError`].
//!
//! Owns: the error type every store method returns, and the one place that decides what "the disk is full" means
//! for the store (SQLite's `SQLITE_FULL`, or `ENOSPC` / `EDQUOT` from a file the store writes).
//! Hands on: [`StoreError::DiskFull`] to `retention` (which frees room and tries again) and to the C-STORE path
//! (which answers A700); everything else callers report as it is.
//! Never: logs, retries, or decides what a caller does about an error.

use std::path::PathBuf;

/// What every store method returns.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A store operation that failed. Its message is whole (what was done, then what went wrong beneath, as
/// `anyhow`'s context chains print it); it exposes no `source()`, so a chain printed with `{:#}` names each cause
/// once.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file system (or the user's quota) is full: SQLite answered `SQLITE_FULL`, or a file the store writes
    /// failed with `ENOSPC` / `EDQUOT`. Nothing was committed.
    #[error("disk full: {0}")]
    DiskFull(Box<dyn std::error::Error + Send + Sync>),
    /// Any other SQLite error (locked past the busy timeout, a constraint, a read-only connection, ...).
    #[error(transparent)]
    Sqlite(rusqlite::Error),
    /// The database could not be opened or migrated at all (the path says which).
    #[error("{what} {}: {error}", path.display())]
    Database {
        /// "opening database", "migrating database", ...
        what: &'static str,
        /// The database file.
        path: PathBuf,
        /// What SQLite said (or the migration error).
        error: Box<StoreError>,
    },
    /// A file or directory next to the database (its directory, the patient-key salt) could not be used.
    #[error("{what} {}: {error}", path.display())]
    Io {
        /// "creating", "reading", ...
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The database refused WAL journal mode.
    #[error("database {} refused WAL journal mode (got {mode})", path.display())]
    NotWal {
        /// The database file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        mode: String,
    },
    /// The database was written by a newer build (more migrations applied than this build knows).
    #[error("schema version {found} is newer than this build knows ({known}); refusing to touch it")]
    NewerSchema {
        /// `PRAGMA user_version` of the database.
        found: i64,
        /// Migrations this build knows.
        known: usize,
    },
    /// One migration failed (its transaction rolled back).
    #[error("applying migration {version}: {error}")]
    Migration {
        /// 1-based migration number.
        version: usize,
        /// What SQLite said.
        error: rusqlite::Error,
    },
    /// The salt file exists with too few bytes; a new salt would silently re-key every patient.
    #[error("{} holds {len} bytes, expected 32; refusing to guess a salt", path.display())]
    BadSalt {
        /// The salt file.
        path: PathBuf,
        /// Bytes it holds.
        len: usize,
    },
    /// A result or alert body carries a raw patient identifier as a key.
    #[error("{what} carries raw identifier key {key:?}; use patient_key")]
    RawIdentifier {
        /// "result_json" or "alert payload".
        what: &'static str,
        /// The refused key.
        key: &'static str,
    },
    /// A result or alert body that is not a JSON object.
    #[error("{what} must be a JSON object")]
    NotAnObject {
        /// "result_json" or "alert payload".
        what: &'static str,
    },
    /// A result for a series the store does not know (the series' log key, never its UID).
    #[error("record_result: unknown series {series_log_key}")]
    UnknownSeries {
        /// [`super::series_log_key`] of the series.
        series_log_key: String,
    },
    /// A spool path that is not UTF-8 (the store keeps paths as text).
    #[error("spool path is not UTF-8: {}", .0.display())]
    NonUtf8Path(PathBuf),
    /// JSON that could not be written, or a stored JSON column that does not read back.
    #[error("{what}: {error}")]
    Json {
        /// Which value.
        what: &'static str,
        /// What serde_json said.
        error: serde_json::Error,
    },
}

impl StoreError {
    /// Whether the disk (or quota) was full: [`StoreError::DiskFull`], also behind an open/migrate context.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::DiskFull(_) => true,
            StoreError::Database { error, .. } => error.is_disk_full(),
            StoreError::Migration { error, .. } => sqlite_disk_full(error),
            _ => false,
        }
    }

    /// An I/O error with what was being done and to which path; `ENOSPC` / `EDQUOT` becomes
    /// [`StoreError::DiskFull`].
    pub(super) fn io(what: &'static str, path: impl Into<PathBuf>, error: std::io::Error) -> StoreError {
        let path = path.into();
        if is_disk_full(&error) {
            return StoreError::DiskFull(Box::new(StoreError::Io { what, path, error }));
        }
        StoreError::Io { what, path, error }
    }

    /// The error in the context of the database file (`what`: "opening database", ...).
    pub(super) fn database(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(StoreError) -> StoreError {
        let path = path.into();
        move |error| StoreError::Database { what, path, error: Box::new(error) }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        if sqlite_disk_full(&e) {
            StoreError::DiskFull(Box::new(e))
        } else {
            StoreError::Sqlite(e)
        }
    }
}

/// Whether SQLite said `SQLITE_FULL`.
fn sqlite_disk_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// Whether an I/O error means the file system (or quota) is full.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) || e.kind() == std::io::ErrorKind::StorageFull
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_is_told_apart_from_other_errors() {
        let full = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None);
        assert!(matches!(StoreError::from(full), StoreError::DiskFull(_)));
        let busy = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY), None);
        assert!(matches!(StoreError::from(busy), StoreError::Sqlite(_)));
        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(StoreError::io("writing", "/x", enospc).is_disk_full());
        let denied = std::io::Error::from_raw_os_error(libc::EACCES);
        assert!(matches!(StoreError::io("writing", "/x", denied), StoreError::Io { .. }));
        let wrapped = StoreError::database("migrating database", "/db")(StoreError::DiskFull("full".into()));
        assert!(wrapped.is_disk_full(), "behind the database context too");
        let chain = format!("{:#}", anyhow::Error::from(wrapped));
        assert_eq!(chain, "migrating database /db: disk full: full", "each cause once");
    }
}
