//! outputs_sweep — DICOM outputs queued outside a result's own path: the amended SRs of backward follow-up links
//! (right after a link is stored, and at start for links a stop left unqueued), and at start the outputs of
//! results recorded with `outputs_due` but never queued (rebuilt from the spool under the same derived UIDs).
//!
//! Owns: running those sweeps on the blocking pool (one amended-SR sweep at a time), their log lines, and waking
//! the DICOM outbox when they queued something.
//! Hands on: objects and outbox rows to `crate::outputs::outbox`.
//! Never: changes a recorded result, or sends anything itself.

use std::sync::Arc;

use anyhow::Result;

use super::daemon::Shared;
use super::slices::SeriesWork;
use crate::result::SeriesResult;

/// Queues the amended SRs of backward links that are due ([`crate::outputs::outbox::enqueue_link_outputs`]):
/// right after a link is stored, and at start-up for links a stop left unqueued. Needs no segmentation (an SR
/// carries the stored numbers and references the original SEG), so it is cheap.
pub(super) async fn queue_amended_srs(shared: Arc<Shared>) {
    // One sweep at a time: two (start-up and a new link) must not both make the SR of one link, the second
    // naming the first's copy as its predecessor.
    static SWEEP: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let s = shared.clone();
    let done = tokio::task::spawn_blocking(move || -> Result<usize> {
        let _one = SWEEP.lock().unwrap_or_else(|p| p.into_inner());
        let mut queued = 0;
        for crate::store::LinkAwaitingOutputs { id, created_at, link } in s.store.links_awaiting_outputs()? {
            let key = crate::store::series_log_key(&link.series_instance_uid);
            match crate::outputs::outbox::enqueue_link_outputs(
                &s.store,
                &s.config.outputs,
                &s.config.storage.data_dir,
                id,
                created_at,
                &link,
            ) {
                Ok(n) => {
                    queued += n;
                    tracing::info!(series = %key, version = link.result_version, queued = n,
                        "amended SR of a re-linked follow-up queued");
                }
                Err(e) => tracing::error!(series = %key, version = link.result_version, error = %format!("{e:#}"),
                    "amended SR could not be made; retried at the next start"),
            }
        }
        Ok(queued)
    })
    .await;
    match done {
        Ok(Ok(n)) if n > 0 => shared.dicom_outbox_wake.notify_one(),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "reading the links awaiting amended SRs failed"),
        Err(e) => tracing::error!(error = %e, "queueing amended SRs panicked"),
    }
}

/// Start-up sweep: results recorded with DICOM outputs due but never queued (the daemon stopped in between) get
/// their objects rebuilt from the spooled instances (segmented again for the masks; every number still comes from
/// the stored result) and queued under the same derived UIDs.
pub(super) async fn queue_missing_outputs(shared: Arc<Shared>, awaiting: Vec<crate::store::StoredResult>) {
    for r in awaiting {
        let s = shared.clone();
        let uid = r.series_instance_uid.clone();
        let done = tokio::task::spawn_blocking(move || -> Result<usize> {
            // One busy mark per slice, as the series workers do, so a long series never looks stuck to the watchdog.
            let mut work = SeriesWork::default();
            for crate::store::StoredInstance { meta, path } in s.store.series_instances(&r.series_instance_uid)? {
                let _busy = s.live.busy("slice segmentation");
                work.add_seeding_ahead(&s.ctx, meta, &path, false);
            }
            let _busy = s.live.busy("rebuilding DICOM outputs");
            // The stored result read back typed (store boundary): every number in the outputs comes from it.
            let stored = SeriesResult::from_json(r.result)?;
            let (_, slices) = work.finish_with_slices(&s.ctx, &stored.patient_key, "", "", true);
            crate::outputs::outbox::enqueue_result(
                &s.store,
                &s.config.outputs,
                &s.config.storage.data_dir,
                &stored,
                &slices,
                r.version as i64,
            )
        })
        .await;
        match done {
            Ok(Ok(n)) => {
                tracing::info!(series = %crate::store::series_log_key(&uid), queued = n,
                    "DICOM outputs of a result recorded before the restart queued");
                shared.dicom_outbox_wake.notify_one();
            }
            Ok(Err(e)) => tracing::error!(series = %crate::store::series_log_key(&uid), error = %format!("{e:#}"),
                "DICOM outputs could not be made; retried at the next start"),
            Err(e) => {
                tracing::error!(series = %crate::store::series_log_key(&uid), error = %e, "rebuilding outputs panicked")
            }
        }
    }
}
