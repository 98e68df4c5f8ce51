//! datadir — the layout of `storage.data_dir`: every path under it is made here, and every delete under it
//! goes through here.
//!
//! Owns: the names of the store file, the patient-key salt, the dashboard token, the disk reserve, the spool,
//! the dashboard key images and the DICOM outputs; how a value a peer sent becomes a name (a validated
//! [`Uid`] as itself, anything else only as a hash, [`name_of`]); how full its disk is ([`disk_usage`]); and the
//! checked delete ([`DataDir::remove_inside`]): the path is resolved (symlinks in its directories followed) and must lie
//! strictly inside the data dir, never be the data dir itself nor one of the fixed entries of the layout below.
//! Hands on: paths to `spool`, `store`, `retention`, `outputs::outbox`, `dashboard` and `pipeline`; the disk's
//! usage to `retention` and `http`.
//! Never: reads or writes file contents, or decides *what* to delete (that is `retention`).
//!
//! ```text
//! <data_dir>/                                   mode 0700
//!   lungsentry.sqlite (-wal, -shm)             the store (never deleted through here)
//!   patient-key.salt                           patient-key salt (never deleted)
//!   http-token                                 dashboard/API token (never deleted)
//!   disk-reserve                               retention's disk reserve (deleted on a full disk)
//!   spool/tmp/                                 partially written instance files
//!   spool/<h[0..2]>/<h[0..16]>/<sop>.dcm       h = hex sha256(Series Instance UID); sop = name_of(SOP UID)
//!   keyimages/<series>.png                     series = name_of(Series Instance UID)
//!   outputs/<series>/v<version>/<sop>.dcm      DICOM outputs; series: a validated UID; sop: our own UID
//! ```
//!
//! The receive path refuses Study/Series/SOP Instance UIDs that are not UIDs (`instance`), so a name here is
//! normally the UID itself; [`name_of`] keeps a value that never passed that check (a store written by an older
//! version, a URL path segment) from naming anything but a hash.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::uid::Uid;

/// The store's SQLite file.
pub const STORE_FILE: &str = "lungsentry.sqlite";
/// The patient-key salt.
pub const SALT_FILE: &str = "patient-key.salt";
/// The dashboard/API token.
pub const TOKEN_FILE: &str = "http-token";
/// Retention's disk reserve.
pub const RESERVE_FILE: &str = "disk-reserve";
/// Spooled instance files.
pub const SPOOL_DIR: &str = "spool";
/// Dashboard key images.
pub const KEY_IMAGES_DIR: &str = "keyimages";
/// DICOM output files.
pub const OUTPUTS_DIR: &str = "outputs";

/// Entries of the layout that [`DataDir::remove_inside`] never deletes (relative to the data dir).
const PROTECTED: &[&str] = &[
    STORE_FILE,
    "lungsentry.sqlite-wal",
    "lungsentry.sqlite-shm",
    "lungsentry.sqlite-journal",
    SALT_FILE,
    TOKEN_FILE,
    SPOOL_DIR,
    "spool/tmp",
    KEY_IMAGES_DIR,
    OUTPUTS_DIR,
];

/// Why a data-dir operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// A delete that would reach outside the data dir, the data dir itself, or a fixed entry of its layout.
    #[error("refusing to delete {path}: {why}")]
    Refused {
        /// The path as asked.
        path: PathBuf,
        /// Why it is refused.
        why: &'static str,
    },
    /// The file system said no.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DataDirError {
    let path = path.to_path_buf();
    move |source| DataDirError::Io { what, path, source }
}

/// What a checked delete found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// Nothing was there.
    Absent,
    /// A file (or symlink, not followed) of this many bytes was deleted.
    File {
        /// Its size.
        bytes: u64,
    },
    /// A directory and everything in it was deleted.
    Dir,
}

/// The on-disk name of a value that should be a UID: the UID itself when it is one, else `x` + the hex
/// SHA-256 of the value — a peer-controlled string never names a file by itself.
pub fn name_of(value: &str) -> String {
    match crate::uid::check(value) {
        Ok(()) => value.to_string(),
        Err(_) => format!("x{}", hex::encode(Sha256::digest(value.as_bytes()))),
    }
}

/// The data dir (`storage.data_dir`) and its layout. Cheap to clone; making a path does no I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    /// The data dir as configured (made absolute by [`DataDir::open`]).
    root: PathBuf,
}

impl DataDir {
    /// The layout under `root`, without touching the file system (the tests and offline tools use this).
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }

    /// Creates the data dir when missing (mode 0700; an existing one is set to 0700 too, best effort: a
    /// directory we may use but not chmod — a mount point — is used as it is, with a warning) and returns its
    /// layout, rooted at its canonical path.
    pub fn open(root: &Path) -> Result<DataDir, DataDirError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(root).map_err(io_err("creating", root))?;
        if let Err(e) = std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)) {
            tracing::warn!(data_dir = %root.display(), error = %e, "cannot set mode 0700 on the data dir");
        }
        let root = std::fs::canonicalize(root).map_err(io_err("resolving", root))?;
        Ok(DataDir { root })
    }

    /// The data dir itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store's SQLite file.
    pub fn store_file(&self) -> PathBuf {
        self.root.join(STORE_FILE)
    }

    /// The patient-key salt.
    pub fn salt_file(&self) -> PathBuf {
        self.root.join(SALT_FILE)
    }

    /// The dashboard/API token file.
    pub fn token_file(&self) -> PathBuf {
        self.root.join(TOKEN_FILE)
    }

    /// Retention's disk reserve.
    pub fn reserve_file(&self) -> PathBuf {
        self.root.join(RESERVE_FILE)
    }

    /// Root of the spooled instance files.
    pub fn spool_root(&self) -> PathBuf {
        self.root.join(SPOOL_DIR)
    }

    /// Where instance files are written before their atomic rename (same file system as the spool).
    pub fn spool_tmp(&self) -> PathBuf {
        self.spool_root().join("tmp")
    }

    /// Where an instance of `series_uid` with `sop_uid` is spooled: the series only as a hash, the SOP Instance
    /// UID through [`name_of`].
    pub fn spool_instance(&self, series_uid: &str, sop_uid: &str) -> PathBuf {
        let h = hex::encode(Sha256::digest(series_uid.as_bytes()));
        self.spool_root().join(&h[..2]).join(&h[..16]).join(format!("{}.dcm", name_of(sop_uid)))
    }

    /// Directory of the dashboard key images.
    pub fn key_images(&self) -> PathBuf {
        self.root.join(KEY_IMAGES_DIR)
    }

    /// The dashboard key image of a series.
    pub fn key_image(&self, series: &Uid) -> PathBuf {
        self.key_image_of(series.as_str())
    }

    /// The dashboard key image of a series given as text (a stored value, a URL segment): named through
    /// [`name_of`].
    pub fn key_image_of(&self, series_uid: &str) -> PathBuf {
        self.key_images().join(format!("{}.png", name_of(series_uid)))
    }

    /// Directory of the DICOM output files.
    pub fn outputs(&self) -> PathBuf {
        self.root.join(OUTPUTS_DIR)
    }

    /// A series' DICOM output files (`v<version>/` below it); retention deletes it with the series' pixels.
    pub fn series_outputs(&self, series: &Uid) -> PathBuf {
        self.series_outputs_of(series.as_str())
    }

    /// [`DataDir::series_outputs`] for a series given as text, named through [`name_of`].
    pub fn series_outputs_of(&self, series_uid: &str) -> PathBuf {
        self.outputs().join(name_of(series_uid))
    }

    /// The output files of one result version of a series.
    pub fn output_version(&self, series: &Uid, version: i64) -> PathBuf {
        self.series_outputs(series).join(format!("v{version}"))
    }

    /// One output object's file.
    pub fn output_file(&self, series: &Uid, version: i64, sop: &Uid) -> PathBuf {
        self.output_version(series, version).join(format!("{sop}.dcm"))
    }

    /// Resolves `path` for a delete: `None` when its directory does not exist (nothing to delete), else the
    /// path with every symlink in its directories resolved (the last component is not followed). Refused when
    /// the path has a `.` or `..` segment, or resolves to the data dir, outside it, or to a fixed entry of the
    /// layout.
    pub fn check_inside(&self, path: &Path) -> Result<Option<PathBuf>, DataDirError> {
        let refused = |why| DataDirError::Refused { path: path.to_path_buf(), why };
        if path.as_os_str().as_bytes().split(|b| *b == b'/').any(|seg| seg == b"." || seg == b"..") {
            return Err(refused("the path has a . or .. segment"));
        }
        let Some(Component::Normal(name)) = path.components().next_back() else {
            return Err(refused("the path names no file"));
        };
        let root = std::fs::canonicalize(&self.root).map_err(io_err("resolving the data dir", &self.root))?;
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let parent = match std::fs::canonicalize(parent) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("resolving", parent)(e)),
        };
        let full = parent.join(name);
        if !full.starts_with(&root) || full == root {
            return Err(refused("it is not inside the data dir"));
        }
        if PROTECTED.iter().any(|p| full == root.join(p)) {
            return Err(refused("it is a fixed part of the data dir's layout"));
        }
        Ok(Some(full))
    }

    /// The checked delete: a file (a symlink itself, never its target), or a directory with everything in it,
    /// strictly inside the data dir ([`DataDir::check_inside`]). [`Removed::Absent`] when nothing is there.
    pub fn remove_inside(&self, path: &Path) -> Result<Removed, DataDirError> {
        let Some(full) = self.check_inside(path)? else { return Ok(Removed::Absent) };
        let md = match std::fs::symlink_metadata(&full) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removed::Absent),
            Err(e) => return Err(io_err("reading", &full)(e)),
        };
        let gone = if md.is_dir() {
            std::fs::remove_dir_all(&full).map(|()| Removed::Dir)
        } else {
            std::fs::remove_file(&full).map(|()| Removed::File { bytes: md.len() })
        };
        match gone {
            Ok(r) => Ok(r),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Removed::Absent),
            Err(e) => Err(io_err("deleting", &full)(e)),
        }
    }

    /// Deletes a directory strictly inside the data dir when it is empty; `Ok(false)` when it is not empty or
    /// not there.
    pub fn remove_dir_if_empty(&self, path: &Path) -> Result<bool, DataDirError> {
        let Some(full) = self.check_inside(path)? else { return Ok(false) };
        match std::fs::remove_dir(&full) {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty) => Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) || e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(io_err("deleting", &full)(e)),
        }
    }
}

/// Used fraction (0..=1) and free bytes of the file system holding `path` (`df`'s view: the data dir's disk for
/// `/readyz`, `/metrics` and retention's high-water marks).
pub fn disk_usage(path: &std::path::Path) -> Option<(f64, u64)> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is a plain C struct of integers, for which all-zero bytes are a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized, writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    let total = st.f_blocks as u64 * frsize;
    let free = st.f_bfree as u64 * frsize;
    let avail = st.f_bavail as u64 * frsize;
    // "Used" as df counts it: used / (used + available to unprivileged users).
    let used = total.saturating_sub(free);
    let denom = used + avail;
    Some((if denom == 0 { 0.0 } else { used as f64 / denom as f64 }, avail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> (tempfile::TempDir, DataDir) {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::open(&tmp.path().join("data")).unwrap();
        for d in [dd.spool_tmp(), dd.key_images(), dd.outputs()] {
            std::fs::create_dir_all(d).unwrap();
        }
        for f in [dd.store_file(), dd.salt_file(), dd.token_file()] {
            std::fs::write(f, b"keep").unwrap();
        }
        (tmp, dd)
    }

    #[test]
    fn peer_values_name_files_only_as_uids_or_hashes() {
        assert_eq!(name_of("1.2.3"), "1.2.3");
        for bad in ["", ".", "..", "../x", "a/b", "1..2", "1.2.abc"] {
            let n = name_of(bad);
            assert!(
                n.starts_with('x') && n.len() == 65 && n[1..].bytes().all(|b| b.is_ascii_hexdigit()),
                "{bad:?}: {n}"
            );
        }
        let dd = DataDir::new("/d");
        assert_eq!(dd.series_outputs_of(".."), dd.outputs().join(name_of("..")));
        assert_eq!(dd.key_image_of("../x"), PathBuf::from(format!("/d/keyimages/{}.png", name_of("../x"))));
        let uid = Uid::parse("1.2.3").unwrap();
        let sop = Uid::parse("2.25.7").unwrap();
        assert_eq!(dd.output_file(&uid, 2, &sop), PathBuf::from("/d/outputs/1.2.3/v2/2.25.7.dcm"));
        let p = dd.spool_instance("..", "../x");
        assert!(p.starts_with("/d/spool/") && !p.to_string_lossy().contains(".."), "{}", p.display());
    }

    #[test]
    fn deletes_stay_strictly_inside_and_spare_the_layout() {
        let (tmp, dd) = layout();
        let outside = tmp.path().join("outside.txt");
        std::fs::write(&outside, b"not ours").unwrap();
        let refused = |p: &Path| matches!(dd.remove_inside(p), Err(DataDirError::Refused { .. }));
        assert!(refused(dd.root()), "the data dir itself");
        assert!(refused(&outside), "a file next to it");
        assert!(refused(&dd.outputs().join("..")), "outputs/..");
        assert!(refused(&dd.outputs().join(".")), "outputs/.");
        assert!(refused(&dd.outputs().join("../lungsentry.sqlite")));
        assert!(refused(&dd.outputs().join("../../outside.txt")));
        assert!(refused(Path::new("/")));
        for fixed in [dd.store_file(), dd.salt_file(), dd.token_file(), dd.spool_root(), dd.spool_tmp(), dd.outputs()] {
            assert!(refused(&fixed), "{}", fixed.display());
        }
        // A symlinked directory inside the data dir that points out of it: what lies behind it is not inside.
        std::os::unix::fs::symlink(tmp.path(), dd.outputs().join("escape")).unwrap();
        assert!(refused(&dd.outputs().join("escape/outside.txt")));
        // The symlink itself is inside: deleting it removes the link, never its target.
        assert!(matches!(dd.remove_inside(&dd.outputs().join("escape")).unwrap(), Removed::File { .. }));
        assert!(!dd.outputs().join("escape").exists());
        assert!(outside.exists() && tmp.path().is_dir());
        for f in [dd.store_file(), dd.salt_file(), dd.token_file()] {
            assert_eq!(std::fs::read(f).unwrap(), b"keep");
        }

        // What is inside goes: a series' outputs, a key image, absent paths report Absent.
        let uid = Uid::parse("1.2.3").unwrap();
        let sop = Uid::parse("1.2.3.4").unwrap();
        let f = dd.output_file(&uid, 1, &sop);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"abc").unwrap();
        assert_eq!(dd.remove_inside(&dd.series_outputs(&uid)).unwrap(), Removed::Dir);
        assert!(!dd.series_outputs(&uid).exists() && dd.outputs().is_dir());
        std::fs::write(dd.key_image(&uid), b"png!").unwrap();
        assert_eq!(dd.remove_inside(&dd.key_image(&uid)).unwrap(), Removed::File { bytes: 4 });
        assert_eq!(dd.remove_inside(&dd.key_image(&uid)).unwrap(), Removed::Absent);
        assert_eq!(dd.remove_inside(&dd.outputs().join("gone/deeper")).unwrap(), Removed::Absent);
        // Empty directories only.
        let s = dd.spool_root().join("ab");
        std::fs::create_dir_all(s.join("cd")).unwrap();
        assert!(!dd.remove_dir_if_empty(&s).unwrap());
        assert!(dd.remove_dir_if_empty(&s.join("cd")).unwrap());
        assert!(dd.remove_dir_if_empty(&s).unwrap());
        assert!(matches!(dd.remove_dir_if_empty(&dd.spool_tmp()), Err(DataDirError::Refused { .. })));
    }
}
