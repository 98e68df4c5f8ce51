//! identity — who a series belongs to, without saying who that is.
//!
//! Owns: the patient-key salt (`<data_dir>/patient-key.salt`, created once), the pseudonymous [`patient_key`]
//! that stands in for raw Patient ID / Patient Name everywhere outside the `patients` table, the
//! [`series_log_key`] logs name a series by, and the guard that refuses result and alert bodies carrying raw
//! identifiers as keys.
//! Hands on: keys to `pipeline` (which records instances under them), `notify` and the logs.
//! Never: logs or returns a raw identifier, or picks a salt when the salt file is unreadable or short.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{Result, StoreError};

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
        Ok(bytes) => return Err(StoreError::BadSalt { path, len: bytes.len() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::io("reading", path, e)),
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|e| StoreError::io("creating", data_dir, e))?;
    let mut salt = vec![0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut salt))
        .map_err(|e| StoreError::io("reading", "/dev/urandom", e))?;
    let tmp = data_dir.join(format!("patient-key.salt.{}.tmp", std::process::id()));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| StoreError::io("creating", &tmp, e))?;
    f.write_all(&salt).and_then(|_| f.sync_all()).map_err(|e| StoreError::io("writing", &tmp, e))?;
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
            std::fs::read(&path).map_err(|e| StoreError::io("reading", path, e))
        }
        Err(e) => Err(StoreError::io("creating", path, e)),
    }
}

/// Refuses a JSON object (a result, an alert body) that carries raw patient identifiers as keys.
pub(super) fn refuse_raw_identifiers(
    obj: &serde_json::Map<String, serde_json::Value>,
    what: &'static str,
) -> Result<()> {
    for k in ["patient_id", "patient_name", "PatientID", "PatientName"] {
        if obj.contains_key(k) {
            return Err(StoreError::RawIdentifier { what, key: k });
        }
    }
    Ok(())
}
