//! labels — reads the dashboard labels of a series (accession number, study time, series number and
//! description) from one of its spooled instances, once per series worker, into the store's `series_labels`.
//!
//! Owns: which attributes name a series for the technologist, and reading them from a spool file's header (the
//! pixel data is not read).
//! Hands on: [`crate::store::SeriesLabels`] to the store.
//! Never: logs the values (only that reading failed), or fails the series: a series without labels is analysed
//! and shown by its UID.

use std::path::Path;

use anyhow::{Context, Result};
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::store::{SeriesLabels, Store};

fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    crate::instance::text(obj, tag).unwrap_or_default()
}

/// The labels of the instance in `path` (a Part-10 spool file), read up to its pixel data.
pub fn read(path: &Path) -> Result<SeriesLabels> {
    let obj = dicom_object::OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(SeriesLabels {
        accession_number: text(&obj, tags::ACCESSION_NUMBER),
        study_time: text(&obj, tags::STUDY_TIME),
        series_number: text(&obj, tags::SERIES_NUMBER),
        series_description: text(&obj, tags::SERIES_DESCRIPTION),
    })
}

/// Reads the labels from `path` and stores them for `series_uid`; false (with a warning that names no value) when
/// either step fails.
pub fn remember(store: &Store, series_uid: &str, path: &Path) -> bool {
    match read(path).and_then(|l| Ok(store.remember_series_labels(series_uid, &l)?)) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(series = %crate::store::series_log_key(series_uid), stage = "labels",
                error = %format!("{e:#}"), "series labels not stored; the dashboard shows the series by its UID");
            false
        }
    }
}
