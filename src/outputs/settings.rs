//! `[outputs]` configuration: which DICOM objects go to which C-STORE destinations, and the outbox's limits.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::ObjectKind;

/// `[outputs]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutputsConfig {
    /// Most key images per series (the slices with the largest lesion area).
    pub key_images: usize,
    /// Failed attempts after which an object is parked (kept, visible in metrics, not retried).
    pub max_attempts: u32,
    /// C-STORE destinations (`[[outputs.dicom]]`); none = no DICOM outputs are made by the daemon.
    pub dicom: Vec<DicomDestination>,
}

impl Default for OutputsConfig {
    fn default() -> Self {
        OutputsConfig { key_images: 3, max_attempts: 20, dicom: Vec::new() }
    }
}

/// One `[[outputs.dicom]]` destination.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DicomDestination {
    /// Called AE title of the receiver (PACS).
    pub ae_title: String,
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Which objects it gets: any of "seg", "sr", "key_images" (default all three).
    #[serde(default = "all_objects")]
    pub objects: Vec<ObjectKind>,
    /// Only results flagged positive are sent (default false: every analysed series).
    #[serde(default)]
    pub only_positive: bool,
}

fn all_objects() -> Vec<ObjectKind> {
    ObjectKind::ALL.to_vec()
}

impl DicomDestination {
    /// The name rows and logs use: `AE@host:port`.
    pub fn key(&self) -> String {
        format!("{}@{}:{}", self.ae_title, self.host, self.port)
    }
}

impl OutputsConfig {
    /// Range checks, each naming its key.
    pub fn validate(&self) -> Result<()> {
        if self.max_attempts == 0 {
            bail!("outputs.max_attempts must be at least 1");
        }
        for (i, d) in self.dicom.iter().enumerate() {
            if d.ae_title.is_empty() || d.ae_title.len() > 16 || !d.ae_title.is_ascii() {
                bail!("outputs.dicom[{i}].ae_title must be 1-16 ASCII characters, got {:?}", d.ae_title);
            }
            if d.host.is_empty() {
                bail!("outputs.dicom[{i}].host must not be empty");
            }
            if d.port == 0 {
                bail!("outputs.dicom[{i}].port must be 1-65535");
            }
            if d.objects.is_empty() {
                bail!("outputs.dicom[{i}].objects must name at least one of seg, sr, key_images");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn destinations_parse_and_bad_values_name_the_key() {
        let c = Config::parse(
            "[[outputs.dicom]]\nae_title = \"PACS\"\nhost = \"10.0.0.5\"\nport = 104\nobjects = [\"sr\", \"seg\"]\n",
        )
        .unwrap();
        assert_eq!(c.outputs.dicom[0].objects, vec![super::ObjectKind::Sr, super::ObjectKind::Seg]);
        assert_eq!(c.outputs.dicom[0].key(), "PACS@10.0.0.5:104");
        let c = Config::parse("[[outputs.dicom]]\nae_title = \"P\"\nhost = \"h\"\nport = 1\n").unwrap();
        assert_eq!(c.outputs.dicom[0].objects.len(), 3);
        let e = Config::parse("[[outputs.dicom]]\nae_title = \"P\"\nhost = \"h\"\nport = 1\nobjects = [\"rt\"]\n")
            .unwrap_err();
        assert!(format!("{e:#}").contains("rt"), "{e:#}");
        let e = Config::parse("[[outputs.dicom]]\nae_title = \"\"\nhost = \"h\"\nport = 1\n").unwrap_err();
        assert!(format!("{e:#}").contains("outputs.dicom[0].ae_title"), "{e:#}");
        let e = Config::parse("[outputs]\nmax_attempts = 0\n").unwrap_err();
        assert!(format!("{e:#}").contains("outputs.max_attempts"), "{e:#}");
    }
}
