//! hil::prepare — turns manifest entries into the files to send: phantoms generated from their seed (with their
//! truth), real DICOM read from `$LUNGSENTRY_DATA`; every file written as a copy re-identified for this run.
//!
//! Owns: the per-run re-identification (Study/Series/SOP Instance and Frame of Reference UIDs that the dataset
//! carries are replaced by `2.25` UIDs hashed from the run id and the original, the file meta's SOP Instance UID
//! likewise; PatientID/PatientName become a run-local `HIL-…` pseudonym), so that a run never collides with an
//! earlier one on the same appliance (which would re-open old series, link them as follow-ups and send no new
//! alert), and the series keys the appliance will file the copies under (computed with the appliance's own
//! grouping, [`crate::tools::analyze::group_by_series`], so a series whose UID the appliance derives matches too).
//! Never: touches pixel data (compressed data is written back byte for byte) or the source files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileDicomObject, InMemDicomObject};
use sha2::{Digest, Sha256};

use super::manifest::Entry;
use crate::tools::phantom::{PhantomOptions, PhantomTruth, Severity};

/// A prepared entry: the files to send and the series they form.
#[derive(Debug)]
pub struct Prepared {
    /// Files in sending order.
    pub files: Vec<PathBuf>,
    /// Each series the appliance will see: (series key, instances).
    pub series: Vec<(String, usize)>,
    /// The phantom's truth (re-identified copy: UIDs as sent).
    pub truth: Option<PhantomTruth>,
    /// PatientIDs and PatientNames written into the copies (a webhook must carry none of them).
    pub patient_identifiers: Vec<String>,
}

/// Per-run re-identification.
#[derive(Debug, Clone)]
pub struct Reidentify {
    run_id: String,
}

/// UID attributes replaced when the dataset carries them.
const UID_TAGS: [Tag; 4] =
    [tags::STUDY_INSTANCE_UID, tags::SERIES_INSTANCE_UID, tags::SOP_INSTANCE_UID, tags::FRAME_OF_REFERENCE_UID];

impl Reidentify {
    /// Re-identification for run `run_id` (any string; the same id maps a UID to the same new UID).
    pub fn new(run_id: &str) -> Reidentify {
        Reidentify { run_id: run_id.to_string() }
    }

    /// The run's UID for `original`: `2.25.` and 127 bits of SHA-256(run id, original) (at most 44 characters).
    pub fn uid(&self, original: &str) -> String {
        let h = Sha256::digest(format!("lungsentry-hil-uid|{}|{original}", self.run_id).as_bytes());
        let mut b = [0u8; 16];
        b.copy_from_slice(&h[..16]);
        format!("2.25.{}", u128::from_be_bytes(b) >> 1)
    }

    /// The run's pseudonym for a patient identifier.
    pub fn patient(&self, original: &str) -> String {
        let h = Sha256::digest(format!("lungsentry-hil-patient|{}|{original}", self.run_id).as_bytes());
        format!("HIL-{}", hex::encode(&h[..6]))
    }

    /// Writes a re-identified copy of `src` to `dst`; returns the PatientID and PatientName written (if any).
    pub fn rewrite(&self, src: &Path, dst: &Path) -> Result<Vec<String>> {
        let mut obj = crate::spool::read_instance(src)?;
        self.apply(&mut obj);
        let mut written = Vec::new();
        for tag in [tags::PATIENT_ID, tags::PATIENT_NAME] {
            if let Some(v) = text(&obj, tag) {
                written.push(v);
            }
        }
        obj.write_to_file(dst).with_context(|| format!("writing {}", dst.display()))?;
        Ok(written)
    }

    fn apply(&self, obj: &mut FileDicomObject<InMemDicomObject>) {
        for tag in UID_TAGS {
            if let Some(old) = text(obj, tag) {
                obj.put(DataElement::new(tag, VR::UI, PrimitiveValue::from(self.uid(&old))));
            }
        }
        let sop = obj.meta().media_storage_sop_instance_uid().trim_end_matches(['\0', ' ']).to_string();
        let new_sop = self.uid(&sop);
        obj.update_meta(|m| m.media_storage_sop_instance_uid = new_sop);
        let patient = text(obj, tags::PATIENT_ID).or_else(|| text(obj, tags::PATIENT_NAME));
        if let Some(p) = patient {
            let pseudonym = self.patient(&p);
            if obj.element_opt(tags::PATIENT_ID).ok().flatten().is_some() {
                obj.put(DataElement::new(tags::PATIENT_ID, VR::LO, PrimitiveValue::from(pseudonym.clone())));
            }
            if obj.element_opt(tags::PATIENT_NAME).ok().flatten().is_some() {
                obj.put(DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from(format!("HIL^{pseudonym}"))));
            }
        }
    }
}

/// The trimmed, non-empty string value of `tag`.
fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let v = obj.element_opt(tag).ok().flatten()?.to_str().ok()?;
    let v = v.trim_end_matches(['\0', ' ']).trim().to_string();
    (!v.is_empty()).then_some(v)
}

/// Prepares `entry` under `dir` (created): a phantom is generated into `dir/source` and re-identified into
/// `dir/send`; a real folder (relative to `data`) is re-identified into `dir/send`.
pub fn prepare(entry: &Entry, data: Option<&Path>, dir: &Path, reid: &Reidentify) -> Result<Prepared> {
    let send_dir = dir.join("send");
    std::fs::create_dir_all(&send_dir).with_context(|| format!("creating {}", send_dir.display()))?;
    let (sources, mut truth) = if let Some(p) = &entry.phantom {
        let source = dir.join("source");
        let mut opts = PhantomOptions::new(&source, p.seed);
        opts.slices = p.slices;
        opts.size = p.size;
        opts.thickness = p.thickness;
        opts.severity = p.severity.parse::<Severity>()?;
        let truth =
            crate::tools::phantom::generate(&opts).with_context(|| format!("generating phantom {}", entry.name))?;
        (truth.files.iter().map(|f| source.join(f)).collect::<Vec<_>>(), Some(truth))
    } else if let Some(rel) = &entry.real {
        let folder = match Path::new(rel) {
            p if p.is_absolute() => p.to_path_buf(),
            p => data.context("a real entry needs --data or $LUNGSENTRY_DATA")?.join(p),
        };
        if !folder.is_dir() {
            bail!("series {:?}: {} is not a folder", entry.name, folder.display());
        }
        (crate::tools::analyze::collect_files(&[folder])?, None)
    } else {
        bail!("series {:?}: neither phantom nor real", entry.name);
    };

    let mut files = Vec::new();
    let mut patient_identifiers = Vec::new();
    for (i, src) in sources.iter().enumerate() {
        // Real folders may hold non-DICOM files (READMEs): those are left out, as `send` would skip them.
        if entry.real.is_some() && !is_part10(src) {
            continue;
        }
        let dst = send_dir.join(format!("{:05}.dcm", i + 1));
        for id in reid.rewrite(src, &dst)? {
            if !patient_identifiers.contains(&id) {
                patient_identifiers.push(id);
            }
        }
        files.push(dst);
    }
    if files.is_empty() {
        bail!("series {:?}: no DICOM files", entry.name);
    }
    if let Some(t) = truth.as_mut() {
        t.study_instance_uid = reid.uid(&t.study_instance_uid);
        t.series_instance_uid = reid.uid(&t.series_instance_uid);
        t.frame_of_reference_uid = reid.uid(&t.frame_of_reference_uid);
        t.patient_id = reid.patient(&t.patient_id);
        t.patient_name = format!("HIL^{}", t.patient_id);
    }
    let series: Vec<(String, usize)> =
        crate::tools::analyze::group_by_series(&files).into_iter().map(|(k, v)| (k, v.len())).collect();
    if let Some(t) = &truth {
        if series.len() != 1 || series[0].0 != t.series_instance_uid {
            bail!("phantom {:?}: re-identified copy does not form the one series its truth names", entry.name);
        }
    }
    Ok(Prepared { files, series, truth, patient_identifiers })
}

/// Whether `path` starts like a DICOM Part-10 file ("DICM" at offset 128).
fn is_part10(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 132];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head)).is_ok() && &head[128..] == b"DICM"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_valid_stable_per_run_and_differ_between_runs() {
        let (a, b) = (Reidentify::new("run-a"), Reidentify::new("run-b"));
        let u = a.uid("1.2.3.4");
        assert_eq!(u, a.uid("1.2.3.4"));
        assert_ne!(u, b.uid("1.2.3.4"));
        assert_ne!(u, a.uid("1.2.3.5"));
        assert!(u.len() <= 64 && u.starts_with("2.25.") && u[5..].chars().all(|c| c.is_ascii_digit()), "{u}");
        assert!(!u[5..].starts_with('0') || u.len() == 6, "no leading zero: {u}");
        assert_ne!(a.patient("P1"), b.patient("P1"));
        assert!(a.patient("P1").starts_with("HIL-"));
    }

    #[test]
    fn a_phantom_copy_keeps_pixels_and_changes_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("ph");
        let mut opts = PhantomOptions::new(&src, 7);
        (opts.slices, opts.size, opts.severity) = (2, 64, Severity::None);
        let truth = crate::tools::phantom::generate(&opts).unwrap();
        let reid = Reidentify::new("t");
        let dst = tmp.path().join("copy.dcm");
        let written = reid.rewrite(&src.join(&truth.files[0]), &dst).unwrap();
        let (a, b) =
            (dicom_object::open_file(src.join(&truth.files[0])).unwrap(), dicom_object::open_file(&dst).unwrap());
        assert_eq!(text(&b, tags::SERIES_INSTANCE_UID).unwrap(), reid.uid(&truth.series_instance_uid));
        assert_eq!(
            text(&b, tags::SOP_INSTANCE_UID).unwrap(),
            b.meta().media_storage_sop_instance_uid().trim_end_matches('\0')
        );
        assert_eq!(text(&b, tags::PATIENT_ID).unwrap(), reid.patient(&truth.patient_id));
        assert!(written.contains(&reid.patient(&truth.patient_id)));
        assert!(!written.contains(&truth.patient_id));
        let px =
            |o: &FileDicomObject<InMemDicomObject>| o.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap().to_vec();
        assert_eq!(px(&a), px(&b));
        assert_eq!(text(&a, tags::ROWS), text(&b, tags::ROWS));
    }
}
