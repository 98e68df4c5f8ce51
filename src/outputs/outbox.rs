//! The DICOM outputs outbox: from a recorded result to objects stored by each `[[outputs.dicom]]` destination.
//!
//! Owns: making a result's objects once (UIDs seeded by series UID + result version), writing them durably
//! under `data_dir/outputs/<series>/v<version>/` (temp file, fsync, rename, directory fsync), queueing one row per
//! object per destination in the store (`dicom_outbox`, unique per destination and SOP instance, so a rebuild or
//! a restart never queues a duplicate), and the worker that sends due rows with the C-STORE SCU.
//!
//! Delivery: a success or warning status marks the row delivered. A refusal that will not change — a failure
//! status other than A7xx (out of resources), or no accepted presentation context for the SOP class — parks the
//! row at once (kept, counted in `/metrics`, never retried). Anything else (connection refused, timeout, A7xx)
//! is retried with exponential back-off (1 s doubling to 5 min) until `outputs.max_attempts`, then parked: no
//! endless loop. The loop itself (due rows, back-off, parking, wake-ups, shutdown) is the one every outbox shares,
//! [`crate::delivery`]; this module supplies the C-STORE attempt and its store calls. A crash between a peer's success and our commit resends the same SOP instance, which a PACS
//! treats as the same object.
//!
//! Crash window between a result and its rows: the pipeline records the result with `outputs_due` set (same
//! transaction, [`wants_outputs`]); [`enqueue_result`] clears it in the transaction that queues the rows. At start
//! the daemon rebuilds the objects of every result still marked ([`crate::store::Store::results_awaiting_outputs`])
//! from the spooled instances, with the same derived UIDs, so nothing is lost and nothing is queued twice.
//! A backward follow-up link whose amended SR a destination wants is marked the same way
//! (`follow_up_links.outputs_due`, [`wants_sr`], [`enqueue_link_outputs`]).
//! `LUNGSENTRY_TEST_CRASH_AT` ([`crash_point`]) aborts the process at a named point of that window, in a test
//! build (`--features test-hooks`) only.
//! File names: the series directory is the validated Series Instance UID and each file our own SOP Instance
//! UID, both through [`crate::datadir::DataDir`]; a result whose series UID is not a UID gets no files.
//! Never: decides positivity, reads the model, or touches the webhook outbox.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{watch, Notify};

use super::{build, ObjectKind, OutputOptions, OutputsConfig, SourceSlice};
use crate::delivery::{Failure, Outcome};
use crate::result::SeriesResult;
use crate::scu::{FileFailure, Peer, SendOptions};
use crate::store::{DicomOutboxRow, NewDicomOutput, Store};

/// Bound on connecting, negotiating and each C-STORE response.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);
/// Rows fetched per round.
const BATCH: usize = 64;

/// The crash-injection points of this module ([`crate::test_hooks::crash_point`]; a no-op unless built with the
/// `test-hooks` feature).
pub use crate::test_hooks::crash_point;

/// The destinations that want this result's objects (none for a result that was not analysed).
fn destinations_for<'a>(cfg: &'a OutputsConfig, result: &SeriesResult) -> Vec<&'a super::DicomDestination> {
    if !result.is_analysed() {
        return Vec::new();
    }
    cfg.dicom.iter().filter(|d| result.positive || !d.only_positive).collect()
}

/// Whether some destination wants this result's objects (recorded with the result as `outputs_due`).
pub fn wants_outputs(cfg: &OutputsConfig, result: &SeriesResult) -> bool {
    !destinations_for(cfg, result).is_empty()
}

/// Whether some destination wants an SR of this result (an amended SR when its comparison changes).
pub fn wants_sr(cfg: &OutputsConfig, result: &SeriesResult) -> bool {
    destinations_for(cfg, result).iter().any(|d| d.objects.contains(&ObjectKind::Sr))
}

/// The SOP Instance UID of the amended SR that version `version` of `series_uid` gets when prior series `prior` is
/// linked to it after its analysis (what [`enqueue_link_outputs`] makes; the dashboard labels it with this).
pub fn amended_sr_uid(series_uid: &str, version: u32, prior: &str) -> String {
    super::derived_uid(&uid_seed(series_uid, version), &format!("sr|{}", amendment_tag(prior)))
}

/// The seed every UID of a result version's objects is derived from.
fn uid_seed(series_uid: &str, version: impl std::fmt::Display) -> String {
    format!("{series_uid}|v{version}")
}

fn amendment_tag(prior: &str) -> String {
    format!("prior|{prior}")
}

/// Makes, stores and queues the amended SR of backward follow-up link `link_id` (stored at `created_at`, unix
/// ms) for every destination that wants an SR of the later series' result, and clears the link's `outputs_due` in
/// the same transaction. The SR replaces the newest SR queued for that result version (Predecessor Documents
/// Sequence) and carries the result as it now reads (the new comparison); no segmentation is needed. A link no
/// longer shown (the series was re-analysed, or a newer link of the version exists) only has its mark cleared.
/// When retention purged the series' pixels before the link existed (it holds them only while the mark is set), no
/// SR can be made: a warning, and the mark is cleared. Fails, leaving the mark for the next start, when a write
/// fails. Returns the number of new outbox rows.
pub fn enqueue_link_outputs(
    store: &Store,
    cfg: &OutputsConfig,
    data_dir: &Path,
    link_id: i64,
    created_at: i64,
    link: &crate::store::FollowUpLink,
) -> Result<usize> {
    let series_uid = &link.series_instance_uid;
    let version = link.result_version as i64;
    let Some(latest) = store.latest_result(series_uid)? else { return Ok(store.enqueue_link_outputs(link_id, &[])?) };
    let shown = latest.version == link.result_version && latest.result["follow_up"] == link.follow_up;
    // The stored result read back typed (store boundary).
    let result = SeriesResult::from_json(latest.result)?;
    let wanting = destinations_for(cfg, &result);
    let with_seg = wanting.iter().any(|d| d.objects.contains(&ObjectKind::Seg));
    let destinations: Vec<_> = wanting.into_iter().filter(|d| d.objects.contains(&ObjectKind::Sr)).collect();
    if !shown || destinations.is_empty() {
        return Ok(store.enqueue_link_outputs(link_id, &[])?);
    }
    // The analysed slices, in the result's order (the SR's evidence); only their UIDs and one header are read.
    let order: Vec<&str> = result.slice_sop_instance_uids.iter().map(String::as_str).collect();
    let by_uid: std::collections::HashMap<String, (crate::instance::InstanceMeta, PathBuf)> = store
        .series_instances(series_uid)?
        .into_iter()
        .map(|i| (i.meta.sop_instance_uid.clone(), (i.meta, i.path)))
        .collect();
    if order.iter().any(|uid| !by_uid.contains_key(*uid)) {
        // Retention purged the series' pixels before its prior study arrived (it holds them only while a link's SR
        // is due): the SR cannot be made again, now or later. The result, dashboard and webhook carry the new
        // comparison; PACS keeps the first SR.
        tracing::warn!(series = %crate::store::series_log_key(series_uid), version,
            prior = %crate::store::series_log_key(&link.prior_series_instance_uid),
            "no amended SR: the series' pixel data was purged by retention before its prior study arrived; \
             the result and dashboard show the comparison, PACS keeps the first SR");
        return Ok(store.enqueue_link_outputs(link_id, &[])?);
    }
    // Frames of a multi-frame instance repeat its UID (with `slice_frame_numbers` beside).
    let frames: Option<&Vec<u32>> = result.slice_frame_numbers.as_ref();
    let mut slices = Vec::with_capacity(order.len());
    for (k, uid) in order.iter().enumerate() {
        let (meta, path) = by_uid.get(*uid).cloned().context("checked above")?;
        let empty = crate::analysis::BitMask::new(0, 0);
        let frame = frames.as_ref().and_then(|f| f.get(k).copied()).filter(|_| meta.is_multi_frame_ct_class());
        slices.push(SourceSlice { meta, frame, path, lung: empty.clone(), lesion: empty });
    }
    let amendment = super::Amendment {
        tag: amendment_tag(&link.prior_series_instance_uid),
        instance_number: 1 + store
            .follow_up_links(series_uid)?
            .iter()
            .filter(|l| l.result_version == link.result_version)
            .count() as u32,
        predecessor: store.latest_queued_sr(series_uid, version)?,
        with_seg,
        content_time: super::common::da_tm(&crate::clock::rfc3339(created_at)),
    };
    let opts = OutputOptions {
        kinds: vec![ObjectKind::Sr],
        key_images: 0,
        uid_seed: uid_seed(series_uid, version),
        amendment: Some(amendment),
    };
    let objects = build(&result, &slices, &opts)?;
    let rows = write_objects(data_dir, series_uid, version, &objects, &destinations)?;
    crash_point("after_amended_sr_file");
    Ok(store.enqueue_link_outputs(link_id, &rows)?)
}

/// Makes, stores and queues the objects of one recorded result (version `version`) for every destination that
/// wants it, and clears the result's `outputs_due` in the same transaction. Returns the number of new outbox rows
/// (0 for a skipped series, no destination, or a result already queued).
pub fn enqueue_result(
    store: &Store,
    cfg: &OutputsConfig,
    data_dir: &Path,
    result: &SeriesResult,
    slices: &[SourceSlice],
    version: i64,
) -> Result<usize> {
    let destinations = destinations_for(cfg, result);
    let series_uid = result.series_instance_uid.as_str();
    if destinations.is_empty() {
        store.enqueue_dicom_outputs(series_uid, version, &[])?;
        return Ok(0);
    }
    let mut kinds: Vec<ObjectKind> = Vec::new();
    for d in &destinations {
        for k in &d.objects {
            if !kinds.contains(k) {
                kinds.push(*k);
            }
        }
    }
    let opts =
        OutputOptions { kinds, key_images: cfg.key_images, uid_seed: uid_seed(series_uid, version), amendment: None };
    let objects = build(result, slices, &opts)?;
    let rows = write_objects(data_dir, series_uid, version, &objects, &destinations)?;
    crash_point("after_output_files");
    let n = store.enqueue_dicom_outputs(series_uid, version, &rows)?;
    tracing::info!(series = %crate::store::series_log_key(series_uid), version, objects = objects.len(), queued = n,
        "DICOM outputs queued");
    Ok(n)
}

/// Writes `objects` durably under `data_dir/outputs/<series>/v<version>/` (each file, then the directory) and
/// returns one outbox row per object per destination that takes its kind.
fn write_objects(
    data_dir: &Path,
    series_uid: &str,
    version: i64,
    objects: &[super::OutputObject],
    destinations: &[&super::DicomDestination],
) -> Result<Vec<NewDicomOutput>> {
    let layout = crate::datadir::DataDir::new(data_dir);
    let series = crate::uid::Uid::parse(series_uid)
        .map_err(|e| anyhow::anyhow!("no output files: the Series Instance UID {e}, not a valid UID"))?;
    let dir = layout.output_version(&series, version);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rows = Vec::new();
    for o in objects {
        let sop = crate::uid::Uid::parse(&o.sop_instance_uid)
            .map_err(|e| anyhow::anyhow!("output object's SOP Instance UID {e}"))?;
        let path = layout.output_file(&series, version, &sop);
        write_durably(&path, |f| o.file.write_all(f).map_err(|e| std::io::Error::other(e.to_string())))?;
        for d in destinations.iter().filter(|d| d.objects.contains(&o.kind)) {
            rows.push(NewDicomOutput {
                destination: d.key(),
                kind: o.kind.as_str().to_string(),
                sop_class_uid: o.sop_class_uid.clone(),
                sop_instance_uid: o.sop_instance_uid.clone(),
                path: path.clone(),
            });
        }
    }
    sync_dir(&dir)?;
    Ok(rows)
}

/// Where a series' DICOM output files are kept (`v{version}/` below it); retention deletes it with the series'
/// pixel data. The layout is [`crate::datadir::DataDir::series_outputs_of`]'s: a value that is not a UID only
/// ever names a hash.
pub fn series_dir(data_dir: &Path, series_uid: &str) -> PathBuf {
    crate::datadir::DataDir::new(data_dir).series_outputs_of(series_uid)
}

fn write_durably(path: &Path, write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    write(&mut f).with_context(|| format!("writing {}", tmp.display()))?;
    f.flush()?;
    f.sync_all().with_context(|| format!("fsync {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync {}", dir.display()))
}

/// What to do after a failed C-STORE of one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Try again later.
    Retry,
    /// The destination will never take it: park.
    Park,
}

/// Classifies a failure: refusals that a retry cannot change park, the rest retry.
pub fn classify(f: &FileFailure) -> Verdict {
    match f.status {
        // A7xx: out of resources — the peer may have room later.
        Some(code) if code & 0xFF00 == 0xA700 => Verdict::Retry,
        Some(_) => Verdict::Park,
        // No context for this object's SOP class — on an association that carried others (our SCU's wording), or
        // when the peer accepted none of the association's contexts at all (dicom-ul's).
        None if f.reason.contains("accepted no presentation context")
            || f.reason.contains("no presentation contexts accepted") =>
        {
            Verdict::Park
        }
        None => Verdict::Retry,
    }
}

/// The worker: sends due rows until `shutdown` turns true, through the shared outbox loop
/// ([`crate::delivery::run`]). Wakes on `wake`, when the earliest retry is due, or every 30 s.
pub async fn run_dicom_outbox(
    store: Arc<Store>,
    cfg: OutputsConfig,
    calling_ae: String,
    wake: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
) {
    tracing::info!(destinations = cfg.dicom.len(), "DICOM outputs outbox running");
    crate::delivery::run(Arc::new(DicomOutbox { store, cfg, calling_ae, wake }), shutdown).await
}

/// The DICOM outputs outbox as the shared loop sees it: the store's `dicom_outbox` rows, one association per
/// destination per round.
struct DicomOutbox {
    /// Holds the rows.
    store: Arc<Store>,
    /// The destinations (and `max_attempts`).
    cfg: OutputsConfig,
    /// Our AE title, as the calling AE.
    calling_ae: String,
    /// Signalled when the pipeline queued rows.
    wake: Arc<Notify>,
}

impl crate::delivery::Outbox for DicomOutbox {
    type Row = DicomOutboxRow;
    const NAME: &'static str = "DICOM outbox";
    const BATCH: usize = BATCH;

    fn id(row: &DicomOutboxRow) -> i64 {
        row.id
    }

    fn attempts(row: &DicomOutboxRow) -> u32 {
        row.attempts
    }

    fn max_attempts(&self) -> Option<u32> {
        Some(self.cfg.max_attempts)
    }

    fn wake(&self) -> &Notify {
        &self.wake
    }

    fn due(&self, now_ms: i64, limit: usize) -> crate::store::Result<Vec<DicomOutboxRow>> {
        self.store.due_dicom_outbox(now_ms, limit)
    }

    fn next_due(&self) -> crate::store::Result<Option<i64>> {
        self.store.next_dicom_outbox_due()
    }

    fn mark_delivered(&self, row: &DicomOutboxRow, status: u16) -> crate::store::Result<()> {
        self.store.mark_dicom_delivered(row.id, status).map(|_| ())
    }

    fn mark_failed(
        &self,
        row: &DicomOutboxRow,
        status: Option<u16>,
        error: &str,
        next_attempt_at: Option<i64>,
    ) -> crate::store::Result<()> {
        self.store.mark_dicom_failed(row.id, status, error, next_attempt_at)
    }

    /// One group per destination (in the order of their keys): its due rows go on one association.
    fn group(&self, rows: Vec<DicomOutboxRow>) -> Vec<Vec<DicomOutboxRow>> {
        let mut by_dest: BTreeMap<String, Vec<DicomOutboxRow>> = BTreeMap::new();
        for r in rows {
            by_dest.entry(r.destination.clone()).or_default().push(r);
        }
        by_dest.into_values().collect()
    }

    /// Sends one destination's due rows on one association.
    async fn attempt(&self, rows: Vec<DicomOutboxRow>) -> Vec<(DicomOutboxRow, Outcome)> {
        let dest = rows.first().map(|r| r.destination.clone()).unwrap_or_default();
        let Some(d) = self.cfg.dicom.iter().find(|d| d.key() == dest) else {
            // Queued for a destination that has since left the configuration: park, never loop.
            let gone = "destination no longer configured";
            return rows.into_iter().map(|r| (r, Outcome::Unsendable(gone.to_string()))).collect();
        };
        let peer = Peer {
            host: d.host.clone(),
            port: d.port,
            called_ae: d.ae_title.clone(),
            calling_ae: self.calling_ae.clone(),
            timeout: PEER_TIMEOUT,
        };
        let paths: Vec<PathBuf> = rows.iter().map(|r| r.path.clone()).collect();
        let report = match crate::scu::send_files(&SendOptions { peer, rate: None }, &paths).await {
            Ok(r) => r,
            Err(e) => {
                // Nothing could be attempted (e.g. a file vanished): count an attempt on every row.
                let error = format!("{e:#}");
                let failed = |r| (r, Outcome::Failed { status: None, error: error.clone(), retry: true });
                return rows.into_iter().map(failed).collect();
            }
        };
        let mut by_path: BTreeMap<PathBuf, DicomOutboxRow> = rows.into_iter().map(|r| (r.path.clone(), r)).collect();
        let mut out = Vec::with_capacity(by_path.len());
        for s in &report.sent {
            if let Some(r) = by_path.remove(&s.path) {
                out.push((r, Outcome::Delivered(s.status)));
            }
        }
        for f in &report.failed {
            if let Some(r) = by_path.remove(&f.path) {
                let retry = classify(f) == Verdict::Retry;
                out.push((r, Outcome::Failed { status: f.status, error: f.reason.clone(), retry }));
            }
        }
        out
    }

    fn delivered(&self, r: &DicomOutboxRow, status: u16) {
        crate::metrics::metrics().dicom_output(true);
        tracing::info!(destination = %r.destination, kind = %r.kind, status = format!("{:#06X}", status),
            attempts = r.attempts + 1, "DICOM output stored");
    }

    fn failed(&self, r: &DicomOutboxRow, f: &Failure<'_>) {
        crate::metrics::metrics().dicom_output(false);
        match f.retry_in {
            None => tracing::warn!(destination = %r.destination, kind = %r.kind, attempts = f.attempts,
                error = %f.error, "DICOM output parked (will not be retried)"),
            Some(delay) => tracing::warn!(destination = %r.destination, kind = %r.kind, attempts = f.attempts,
                retry_in_s = delay.as_secs(), error = %f.error, "DICOM output not stored; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(status: Option<u16>, reason: &str) -> FileFailure {
        FileFailure { path: "x".into(), status, reason: reason.into() }
    }

    #[test]
    fn refusals_park_and_transient_failures_retry() {
        assert_eq!(classify(&failure(Some(0xA700), "out of resources")), Verdict::Retry);
        assert_eq!(classify(&failure(Some(0xA702), "out of resources")), Verdict::Retry);
        assert_eq!(classify(&failure(Some(0xA900), "mismatch")), Verdict::Park);
        assert_eq!(classify(&failure(Some(0xC000), "cannot understand")), Verdict::Park);
        assert_eq!(classify(&failure(Some(0x0122), "SOP class not supported")), Verdict::Park);
        assert_eq!(
            classify(&failure(None, "peer accepted no presentation context for SOP class 1.2 in ...")),
            Verdict::Park
        );
        assert_eq!(
            classify(&failure(
                None,
                "associating with PACS at 127.0.0.1:1: no presentation contexts accepted by the server"
            )),
            Verdict::Park
        );
        assert_eq!(
            classify(&failure(None, "associating with PACS at 127.0.0.1:1: connection refused")),
            Verdict::Retry
        );
    }
}
