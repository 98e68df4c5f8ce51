//! tls — DICOM over TLS for the listener (`[dicom.tls]`): the rustls server configuration.
//!
//! Owns: reading the PEM certificate chain, private key and optional client CA from disk, building the
//! rustls `ServerConfig` (client certificates verified against `ca` when it is set: required with
//! `require_client_cert`, otherwise optional but still verified when presented), and errors that name the
//! configuration key at fault. The daemon calls [`server_config`] before it binds, so a bad file is a start-up
//! error, never a listener that silently serves nothing.
//! Hands on: an `Arc<ServerConfig>` for the accept loop; the handshake itself (with its timeout) runs per
//! association in `association`.
//! Never: falls back to plaintext, or reads anything but the three configured files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::TlsConfig;

/// Why the TLS configuration cannot be used; each names the `[dicom.tls]` key at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A configured file cannot be read.
    #[error("dicom.tls.{key}: cannot read {}: {source}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A configured file holds no usable PEM object of the expected kind.
    #[error("dicom.tls.{key}: {} holds no valid PEM {what}: {detail}", path.display())]
    Pem { key: &'static str, path: PathBuf, what: &'static str, detail: String },
    /// rustls refused the combination (e.g. the key does not belong to the certificate).
    #[error("dicom.tls.{key}: {detail}")]
    Rejected { key: &'static str, detail: String },
}

/// Builds the listener's TLS configuration from `[dicom.tls]`, reading its files now.
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let certs = read_certs("cert", &cfg.cert)?;
    let key_pem = read("key", &cfg.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsConfigError::Pem {
        key: "key",
        path: cfg.key.clone(),
        what: "private key (PKCS#8, PKCS#1 or SEC1, unencrypted)",
        detail: e.to_string(),
    })?;
    let builder = ServerConfig::builder();
    let builder = match &cfg.ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs("ca", ca)? {
                roots.add(c).map_err(|e| TlsConfigError::Rejected {
                    key: "ca",
                    detail: format!("{}: unusable CA certificate: {e}", ca.display()),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots));
            let verifier = if cfg.require_client_cert { verifier } else { verifier.allow_unauthenticated() };
            let verifier = verifier.build().map_err(|e| TlsConfigError::Rejected {
                key: "ca",
                detail: format!("{}: cannot verify client certificates with it: {e}", ca.display()),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| TlsConfigError::Rejected {
        key: "key",
        detail: format!("{} and dicom.tls.cert {} are not a usable pair: {e}", cfg.key.display(), cfg.cert.display()),
    })?;
    Ok(Arc::new(config))
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|source| TlsConfigError::Read { key, path: path.to_path_buf(), source })
}

/// Every certificate in a PEM file; none, or a damaged one, is an error.
fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem = read(key, path)?;
    let pem_err = |detail: String| TlsConfigError::Pem { key, path: path.to_path_buf(), what: "certificate", detail };
    let certs =
        CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no CERTIFICATE section".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path, cert: &str, key: &str) -> TlsConfig {
        TlsConfig {
            cert: dir.join(cert),
            key: dir.join(key),
            ca: None,
            require_client_cert: false,
            handshake_timeout_s: 10,
        }
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let e = server_config(&cfg(dir.path(), "missing.pem", "k.pem")).unwrap_err().to_string();
        assert!(e.starts_with("dicom.tls.cert: cannot read") && e.contains("missing.pem"), "{e}");
        std::fs::write(dir.path().join("junk.pem"), "not pem at all\n").unwrap();
        let e = server_config(&cfg(dir.path(), "junk.pem", "k.pem")).unwrap_err().to_string();
        assert!(e.starts_with("dicom.tls.cert:") && e.contains("no valid PEM certificate"), "{e}");
        let damaged = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        std::fs::write(dir.path().join("damaged.pem"), damaged).unwrap();
        let e = server_config(&cfg(dir.path(), "damaged.pem", "k.pem")).unwrap_err().to_string();
        assert!(e.starts_with("dicom.tls.cert:") && e.contains("damaged.pem"), "{e}");
    }
}
