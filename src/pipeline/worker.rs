//! worker — one task per active series: segments each slice as it arrives (on the segmentation threads), runs
//! the 3D analysis when the series completes (one analysis at a time), then lingers for late instances and ends.
//!
//! Owns: the map of live workers (starting one on demand, which first segments what the store already holds of
//! the series), the messages they take ([`WorkerMsg`]), the busy markers the watchdog trusts, and what a failed or
//! panicked analysis leaves (the series is completed again later, never left unanalysed).
//! Hands on: the segmented series to `finish` (result, links, alert), on the blocking pool.
//! Never: answers a C-STORE, or records anything but the series' labels.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::daemon::Shared;
use super::segpool;
use super::slices::SeriesWork;
use super::{backlog, finish, labels, recovery};
use crate::instance::InstanceMeta;

/// Message to a series worker (one per instance, short-lived: the size of `InstanceMeta` is not worth a box).
#[allow(clippy::large_enum_variant)]
pub(super) enum WorkerMsg {
    /// A durably stored instance to segment, counted in the backlog until it is segmented (or dropped).
    Instance { meta: InstanceMeta, path: PathBuf, queued: backlog::Queued },
    /// The series is complete: analyse what has arrived.
    Complete,
}

/// How long a worker keeps its segmentations after a completed analysis, for cheap re-analysis of late instances.
const WORKER_LINGER: Duration = Duration::from_secs(300);

/// Sends to the series worker, starting one (which reloads the series from the store) when none is live.
pub(super) async fn enqueue(shared: &Arc<Shared>, series_uid: &str, msg: WorkerMsg) {
    let mut msg = Some(msg);
    for _ in 0..3 {
        let tx = ensure_worker(shared, series_uid);
        match tx.send(msg.take().unwrap()) {
            Ok(()) => return,
            Err(mpsc::error::SendError(m)) => {
                // The worker ended (linger expired) between lookup and send: drop it and start a new one.
                recovery::lock(&shared.workers).remove(series_uid);
                msg = Some(m);
            }
        }
    }
    tracing::error!(series = %crate::store::series_log_key(series_uid), stage = "dispatch", "could not reach a series worker");
}

pub(super) fn ensure_worker(shared: &Arc<Shared>, series_uid: &str) -> mpsc::UnboundedSender<WorkerMsg> {
    let mut workers = recovery::lock(&shared.workers);
    if let Some(tx) = workers.get(series_uid) {
        if !tx.is_closed() {
            return tx.clone();
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    workers.insert(series_uid.to_string(), tx.clone());
    tokio::spawn(series_worker(shared.clone(), series_uid.to_string(), rx));
    tx
}

/// One series: segments slices as they arrive, analyses on Complete, lingers, then ends.
async fn series_worker(shared: Arc<Shared>, series_uid: String, mut rx: mpsc::UnboundedReceiver<WorkerMsg>) {
    let mut work = Some(SeriesWork::default());
    // Instances already stored (restart, or a worker that lingered out) are segmented first.
    let prior = {
        let store = shared.store.clone();
        let uid = series_uid.clone();
        tokio::task::spawn_blocking(move || store.series_instances(&uid)).await
    };
    // The dashboard's labels of the series (name, accession, series number…), once per worker.
    let mut labelled = false;
    if let Ok(Ok(prior)) = prior {
        if let Some(first) = prior.first() {
            labelled = remember_labels(&shared, &series_uid, &first.path).await;
        }
        for crate::store::StoredInstance { meta, path } in prior {
            work = Some(segment_one(&shared, work.take().unwrap(), meta, path).await);
        }
    }
    let mut received_at = crate::clock::now_rfc3339();
    let mut completed = false;
    loop {
        let msg = if completed {
            match tokio::time::timeout(WORKER_LINGER, rx.recv()).await {
                Ok(m) => m,
                Err(_) => break,
            }
        } else {
            rx.recv().await
        };
        let Some(msg) = msg else { break };
        match msg {
            WorkerMsg::Instance { meta, path, queued } => {
                if completed {
                    received_at = crate::clock::now_rfc3339();
                    completed = false;
                }
                if !labelled {
                    labelled = remember_labels(&shared, &series_uid, &path).await;
                }
                work = Some(segment_one(&shared, work.take().unwrap(), meta, path).await);
                shared.backlog.segmented();
                drop(queued);
            }
            WorkerMsg::Complete => {
                let mut w = work.take().unwrap();
                let s = shared.clone();
                let uid = series_uid.clone();
                let ra = received_at.clone();
                let slot = shared.analysis_slots.clone().acquire_owned().await;
                let done = tokio::task::spawn_blocking(move || {
                    let _slot = slot;
                    let _busy = s.live.busy("3D analysis");
                    let r = finish::finish_series(&s, &uid, &mut w, &ra);
                    s.live.analysed();
                    (w, r)
                })
                .await;
                match done {
                    Ok((w, r)) => {
                        work = Some(w);
                        if let Err(e) = r {
                            crate::metrics::metrics().series("failed");
                            tracing::error!(series = %crate::store::series_log_key(&series_uid), stage = "analysis", error = %format!("{e:#}"), "analysis failed; retried after series.stable_timeout_s");
                            // A failed write (disk full, I/O error) must not leave the series unanalysed until
                            // the next instance or restart: the ticker completes it again later.
                            recovery::tracker(&shared).instance(&series_uid, None, None, Instant::now());
                        }
                    }
                    Err(e) => {
                        crate::metrics::metrics().series("failed");
                        tracing::error!(series = %crate::store::series_log_key(&series_uid), stage = "analysis", error = %e, "analysis panicked");
                        work = Some(SeriesWork::default());
                    }
                }
                completed = true;
            }
        }
    }
    // Drop our receiver first: the map's sender then reports closed, unless a newer worker replaced it.
    drop(rx);
    let mut workers = recovery::lock(&shared.workers);
    if workers.get(&series_uid).map(|tx| tx.is_closed()).unwrap_or(false) {
        workers.remove(&series_uid);
    }
}

/// [`labels::remember`] on the blocking pool.
async fn remember_labels(shared: &Arc<Shared>, series_uid: &str, path: &std::path::Path) -> bool {
    let (store, uid, path) = (shared.store.clone(), series_uid.to_string(), path.to_path_buf());
    tokio::task::spawn_blocking(move || labels::remember(&store, &uid, &path)).await.unwrap_or(false)
}

async fn segment_one(shared: &Arc<Shared>, mut work: SeriesWork, meta: InstanceMeta, path: PathBuf) -> SeriesWork {
    let ctx = shared.ctx.clone();
    let live = shared.live.clone();
    // Seeding ahead only while nothing waits behind this slice (it counts itself until `segmented`).
    let seed_ahead = shared.backlog.queued() <= 1;
    match shared
        .segment_pool
        .run(move || {
            let _busy = live.busy("slice segmentation");
            work.add_seeding_ahead(&ctx, meta, &path, seed_ahead);
            work
        })
        .await
    {
        Ok(w) => w,
        Err(segpool::Panicked) => {
            tracing::error!("slice segmentation panicked");
            SeriesWork::default()
        }
    }
}
