//! ingest — one received instance from the SCP's event to its C-STORE answer: spool (fsync) → store row →
//! queued to its series worker → answer, paced by the backlog; and the association events the completion rule
//! reads.
//!
//! Owns: the order of those steps and the answer (never success for something not durably stored), making room on
//! the disk through `retention` (above the purge high-water mark, and when an instance did not fit), telling a
//! sender's harmless retry (same bytes) from a change, and feeding the completion tracker.
//! Hands on: the instance (metadata and spool path) to its series `worker`, counted in the `backlog`.
//! Never: parses PDUs (that is `receive`), segments, or decides completion (that is `series`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::{mpsc, oneshot};

use super::daemon::Shared;
use super::recovery;
use super::worker::{self, WorkerMsg};
use crate::receive::{status, AssociationId, IncomingInstance, ReceiveEvent, StoreAnswer};

pub(super) async fn dispatch_events(shared: Arc<Shared>, mut events: mpsc::Receiver<ReceiveEvent>) {
    while let Some(ev) = events.recv().await {
        match ev {
            ReceiveEvent::Instance(inc, reply) => {
                let shared = shared.clone();
                tokio::spawn(async move { handle_instance(shared, inc, reply).await });
            }
            ReceiveEvent::Opened { association, sender } => {
                recovery::tracker(&shared).association_opened(association, &sender);
            }
            ReceiveEvent::Released { association, .. } => {
                recovery::tracker(&shared).association_ended(association, Instant::now());
            }
        }
    }
}

/// spool → store → worker queue, then the status. Never success for something not durably stored.
async fn handle_instance(shared: Arc<Shared>, inc: IncomingInstance, reply: oneshot::Sender<StoreAnswer>) {
    let association: AssociationId = inc.association;
    let s = shared.clone();
    let stored = tokio::task::spawn_blocking(move || -> Result<_, StoreAnswer> {
        // Above the purge high-water mark: make room (oldest finished series first) before writing.
        if s.retention.above_high_water() {
            if let Err(e) = s.retention.relieve_pressure() {
                tracing::error!(stage = "retention", error = %format!("{e:#}"), "purge under disk pressure failed");
            }
        }
        let mut purges = 0;
        loop {
            let attempt = {
                let _spooling = s.spool_guard.read().unwrap_or_else(|p| p.into_inner());
                spool_and_record(&s, &inc, association)
            };
            match attempt {
                Ok(v) => return Ok(v),
                // Refused with A700 only when purging cannot free space.
                Err((answer, true)) if purges < MAX_PURGES_PER_INSTANCE => {
                    match s.retention.purge_oldest_on_full_disk("a new instance did not fit on the disk") {
                        Ok(r) if r.series > 0 => purges += 1,
                        Ok(_) => return Err(answer),
                        Err(e) => {
                            tracing::error!(stage = "retention", error = %format!("{e:#}"), "purge for a new instance failed");
                            return Err(answer);
                        }
                    }
                }
                Err((answer, _)) => return Err(answer),
            }
        }
    })
    .await;
    let (spooled, rec) = match stored {
        Ok(Ok(v)) => v,
        Ok(Err(answer)) => {
            crate::metrics::metrics().instance(false);
            let _ = reply.send(answer);
            return;
        }
        Err(_) => {
            crate::metrics::metrics().instance(false);
            let _ = reply.send(StoreAnswer::refused(status::PROCESSING_FAILURE, "receiver failed while storing it"));
            return;
        }
    };
    let series_uid = spooled.meta.series_instance_uid.clone();
    // A sender's retry of bytes already stored and recorded changes nothing (no new result version, no outputs sent
    // again). Anything else goes to the series: a new instance, a repeat with other content (a late one re-opens an
    // analysed series, which is analysed again and gets a new result version), a re-send of purged pixels.
    if rec.unchanged {
        tracing::debug!(association, series = %crate::store::series_log_key(&series_uid), stage = "store",
            "instance already stored with these bytes: acknowledged, nothing changed");
    } else {
        let arrived = crate::series::Arrived::of(&spooled.meta);
        recovery::tracker(&shared).instance(&series_uid, Some(association), Some(&arrived), Instant::now());
        match shared.backlog.enqueue() {
            Some(queued) => {
                worker::enqueue(
                    &shared,
                    &series_uid,
                    WorkerMsg::Instance { meta: spooled.meta, path: spooled.path, queued },
                )
                .await
            }
            // The queue is at its memory cap: the instance stays on disk only; the worker segments it from the
            // spool when the series completes (`finish_series`' top-up), as it does any instance it never got.
            None => tracing::debug!(association, series = %crate::store::series_log_key(&series_uid),
                stage = "backlog", "queue at its cap: instance left to the spool until completion"),
        }
        // Stored and queued: the answer only waits while more segmentation is queued than the budget allows, and
        // never longer than engine.max_response_hold_s (backlog.rs).
        shared.backlog.admit(Duration::from_secs_f64(shared.config.engine.max_response_hold_s)).await;
    }
    crate::metrics::metrics().instance(true);
    let _ = reply.send(StoreAnswer::success());
}

/// Series whose pixel data one instance may purge to make room for itself before it is refused with A700.
const MAX_PURGES_PER_INSTANCE: usize = 16;

/// Spools and records one instance (caller holds the spool guard's read side). `Err((answer, disk_full))`.
fn spool_and_record(
    s: &Shared,
    inc: &IncomingInstance,
    association: AssociationId,
) -> Result<(crate::spool::SpooledInstance, crate::store::InstanceRecorded), (StoreAnswer, bool)> {
    let spooled = s.spool.store(inc).map_err(|e| {
        let full = matches!(&e, crate::spool::SpoolError::OutOfResources(_, io) if crate::store::is_disk_full(io));
        tracing::warn!(association, stage = "spool", error = %e, disk_full = full, "instance refused");
        (StoreAnswer::refused(e.status(), &e.reason_for_peer()), full)
    })?;
    let key = crate::store::patient_key(&s.salt, &spooled.meta.patient_id, &spooled.meta.patient_name);
    let rec = s.store.record_instance(&spooled, association, &key).map_err(|e| {
        let full = e.is_disk_full();
        tracing::error!(association, stage = "store", error = %format!("{e:#}"), disk_full = full, "could not record instance");
        (StoreAnswer::refused(status::OUT_OF_RESOURCES, "receiver could not record it now; retry later"), full)
    })?;
    Ok((spooled, rec))
}
