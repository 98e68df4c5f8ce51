//! series_labels — what a technologist needs to recognise the patient and the series on the local dashboard.
//!
//! Owns: the `series_labels` table (accession number, study time, series number and description of each series,
//! written once per series by the pipeline) and [`Store::patient_display`], which joins them with the raw
//! patient name and ID of the `patients` table and the series' study date. Only the dashboard (behind its token)
//! and, where a site sets `alerts.include_patient_identifiers`, the webhook worker read them.
//! Hands on: [`PatientDisplay`] to `dashboard` and `notify`.
//! Never: logs any of these values, or puts them into results, the alert outbox or follow-up links.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{Result, Store};

/// The labels of a series as its instances carry them (all text as received, trimmed; empty when absent).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SeriesLabels {
    /// Accession Number (0008,0050): the RIS order; an identifier.
    pub accession_number: String,
    /// Study Time (0008,0030), TM.
    pub study_time: String,
    /// Series Number (0020,0011).
    pub series_number: String,
    /// Series Description (0008,103E), e.g. "Lung 1.25 mm".
    pub series_description: String,
}

/// Who and what a series is, for the dashboard (raw identifiers: never logged).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PatientDisplay {
    /// Patient's Name as received (DICOM PN, `^`-separated).
    pub patient_name: String,
    /// Patient ID as received.
    pub patient_id: String,
    /// Accession Number.
    pub accession_number: String,
    /// Study Date, DA (YYYYMMDD).
    pub study_date: String,
    /// Study Time, TM.
    pub study_time: String,
    /// Series Number.
    pub series_number: String,
    /// Series Description.
    pub series_description: String,
}

impl Store {
    /// Stores the labels of `series_uid` (a known series), replacing earlier ones (a corrected series
    /// description shows once the series is received again).
    pub fn remember_series_labels(&self, series_uid: &str, labels: &SeriesLabels) -> Result<()> {
        let c = self.lock();
        c.execute(
            "INSERT INTO series_labels (series_instance_uid, accession_number, study_time, series_number,
                                        series_description)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(series_instance_uid) DO UPDATE SET accession_number = excluded.accession_number,
                study_time = excluded.study_time, series_number = excluded.series_number,
                series_description = excluded.series_description",
            params![
                series_uid,
                labels.accession_number,
                labels.study_time,
                labels.series_number,
                labels.series_description
            ],
        )?;
        Ok(())
    }

    /// The patient's name and ID and the series' labels (None: unknown series). Labels not yet stored read as
    /// empty text.
    pub fn patient_display(&self, series_uid: &str) -> Result<Option<PatientDisplay>> {
        let c = self.lock();
        Ok(c.query_row(
            "SELECT COALESCE(p.patient_name, ''), COALESCE(p.patient_id, ''), COALESCE(l.accession_number, ''),
                    s.study_date, COALESCE(l.study_time, ''), COALESCE(l.series_number, ''),
                    COALESCE(l.series_description, '')
             FROM series s
             LEFT JOIN patients p ON p.patient_key = s.patient_key
             LEFT JOIN series_labels l ON l.series_instance_uid = s.series_instance_uid
             WHERE s.series_instance_uid = ?1",
            [series_uid],
            |r| {
                Ok(PatientDisplay {
                    patient_name: r.get(0)?,
                    patient_id: r.get(1)?,
                    accession_number: r.get(2)?,
                    study_date: r.get(3)?,
                    study_time: r.get(4)?,
                    series_number: r.get(5)?,
                    series_description: r.get(6)?,
                })
            },
        )
        .optional()?)
    }
}
