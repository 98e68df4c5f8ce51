//! pipeline — wires the stages into the daemon (`serve`).
//!
//! ```text
//! receive ──ReceiveEvent──▶ instance task: spool (fsync) → store row → enqueue to series worker ─▶ C-STORE-RSP
//!                                                                  │ (response waits while the queued work
//!                                                                  │  exceeds engine.max_backlog_s: backlog.rs)
//!                               completion ticker ──Complete──▶ series worker: segment each slice as it
//!                                                                  arrives; on Complete: 3D analysis →
//!                                                                  store result (+ outbox row) → notify
//! ```
//! DICOM outputs are queued after the result commit; a result whose outputs were due but not queued when the
//! daemon stopped is rebuilt at the next start (`queue_missing_outputs`).
//! Owns: start-up order (store, model, engine warm-up, bind, recovery of series interrupted by a crash),
//! one worker task per active series, the completion ticker, graceful shutdown. After a panic in the shared
//! state, `recovery` rebuilds it (or exits for systemd); no `lock().unwrap()` here.
//! Never: parses PDUs, writes spool files or SQL itself — each stage module does its own part.

mod backlog;
pub mod exam_flag;
mod labels;
mod liveness;
mod recovery;
mod segpool;
mod slices;

pub use backlog::Backlog;
pub use liveness::Liveness;

pub use slices::{InferenceContext, SeriesWork};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Config;
use crate::instance::InstanceMeta;
use crate::model::Model;
use crate::receive::{self, status, AssociationId, IncomingInstance, ReceiveEvent, StoreAnswer};
use crate::result::{SeriesResult, SeriesStatus};
use crate::series::CompletionTracker;
use crate::spool::Spool;
use crate::store::Store;

/// `lungsentry serve` options.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// TOML config; embedded defaults when absent.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Runs the daemon until SIGINT/SIGTERM.
pub async fn serve(args: ServeArgs) -> Result<()> {
    let cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let daemon = Daemon::start(cfg).await?;
    // READY only now: the SCP is bound, the model verified and the engine warmed (Daemon::start).
    let status = format!("ready: DICOM on {}", daemon.dicom_addr);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    daemon.shutdown().await;
    Ok(())
}

/// Message to a series worker.
enum WorkerMsg {
    /// A durably stored instance to segment, counted in the backlog until it is segmented (or dropped).
    Instance { meta: InstanceMeta, path: PathBuf, queued: backlog::Queued },
    /// The series is complete: analyse what has arrived.
    Complete,
}

/// How long a worker keeps its segmentations after a completed analysis, for cheap re-analysis of late instances.
const WORKER_LINGER: Duration = Duration::from_secs(300);

/// State shared by the instance tasks, the ticker and the workers.
struct Shared {
    /// Validated configuration.
    config: Config,
    /// Durable instance files.
    spool: Spool,
    /// SQLite results store.
    store: Arc<Store>,
    /// Model, engine and thresholds.
    ctx: Arc<InferenceContext>,
    /// Salt of `patient_key`.
    salt: Vec<u8>,
    /// Completion rule state.
    tracker: Mutex<CompletionTracker>,
    /// Live series workers by Series Instance UID.
    workers: Mutex<HashMap<String, mpsc::UnboundedSender<WorkerMsg>>>,
    /// Segmentation work queued to the workers; C-STORE responses wait while it exceeds `engine.max_backlog_s`.
    backlog: Arc<Backlog>,
    /// The slice segmentation threads: one per core (more only thrash the engine's threads and multiply its
    /// working memory when several scanners send at once), below the receive path's priority (see `segpool`).
    segment_pool: segpool::SegmentPool,
    /// 3D analyses running at once: one. Each holds whole-volume label arrays (hundreds of MB for 300 × 512²), so
    /// eight series completing together must not hold eight (the 8-scanner load test peaked at 621 MB without it).
    analysis_slots: Arc<tokio::sync::Semaphore>,
    /// Number of results recorded (for tests/demo to wait on).
    results_tx: watch::Sender<u64>,
    /// Progress evidence the systemd watchdog trusts.
    live: Arc<Liveness>,
    /// Wakes the DICOM outputs outbox worker when rows are queued.
    dicom_outbox_wake: Arc<tokio::sync::Notify>,
    /// Read side: an instance being spooled and recorded; write side: a retention purge (see `retention`).
    spool_guard: Arc<RwLock<()>>,
    /// Purges pixel data of finished series (age, disk pressure, an instance that does not fit).
    retention: Arc<crate::retention::Retention>,
}

/// A running daemon (also used in-process by `demo` and the tests).
pub struct Daemon {
    /// Where the DICOM listener is bound.
    pub dicom_addr: SocketAddr,
    /// Where the HTTP endpoints are bound (None when `http.bind` is empty).
    pub http_addr: Option<SocketAddr>,
    /// The results store (for tests and demo to read results).
    pub store: Arc<Store>,
    /// Count of recorded results; changes after each analysis.
    pub results: watch::Receiver<u64>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Daemon {
    /// Opens the store and spool, verifies and warms the model, binds the SCP, resumes interrupted series.
    pub async fn start(config: Config) -> Result<Daemon> {
        config.validate()?;
        // `[dicom.tls]` files are read now, so a missing or bad certificate/key stops the start with its key named
        // (the listener builds its own copy below).
        if let Some(tls) = &config.dicom.tls {
            receive::tls::server_config(tls)?;
        }
        // Everything the daemon creates (spool, store, outputs, dashboard images) is private to its user, also when
        // it runs outside systemd (whose unit sets UMask=0077 too).
        // SAFETY: umask only changes this process's file-creation mask.
        unsafe { libc::umask(0o077) };
        receive::budget::return_freed_buffers_to_the_system();
        let data_dir = config.storage.data_dir.clone();
        let layout = crate::datadir::DataDir::open(&data_dir).context("opening storage.data_dir")?;
        let store = Arc::new(Store::open(&layout.store_file())?);
        let spool = Spool::open(&data_dir)?.with_max_dataset_bytes(config.dicom.max_message_mb << 20);
        let salt = match &config.alerts.patient_key_salt {
            Some(s) => s.as_bytes().to_vec(),
            None => crate::store::load_or_create_salt(&data_dir)?,
        };
        let model = Model::load(&config.engine.manifest)?;
        // Built (and warmed) at the segmentation threads' priority: the engine's own worker threads inherit it.
        let (model, engine) = segpool::at_nice(config.engine.segment_nice, {
            let (kind, dir) = (config.engine.kind, config.engine.tensorrt_engines.clone());
            move || -> Result<_> {
                let engine = crate::engine::load_engine_in(kind, &model, &dir)?;
                // Warm-up: one inference so the first real slice does not pay for lazy initialisation.
                let i = &model.manifest.input;
                engine.infer(&vec![0f32; i.channels * i.height * i.width], 1).context("engine warm-up")?;
                Ok((model, engine))
            }
        })?;
        tracing::info!(engine = engine.name(), model = %model.manifest.model.name, version = %model.manifest.model.version, "model verified and engine warmed");
        if config.storage.purge_high_water_percent > config.storage.disk_high_water_percent {
            tracing::warn!(
                purge_high_water_percent = config.storage.purge_high_water_percent,
                disk_high_water_percent = config.storage.disk_high_water_percent,
                "storage.purge_high_water_percent is above storage.disk_high_water_percent: /readyz fails before \
                 retention purges anything for space"
            );
        }
        if config.dicom.allowed_peers.is_empty() {
            tracing::warn!("dicom.allowed_peers is empty: any peer that calls our AE title may store instances");
        }

        let ctx = Arc::new(InferenceContext { model, engine, config: config.clone() });
        let spool_guard = Arc::new(RwLock::new(()));
        let retention =
            Arc::new(crate::retention::Retention::new(store.clone(), config.storage.clone(), spool_guard.clone()));
        {
            // At start: what expired while we were down, and room for the scanner before the SCP listens.
            let r = retention.clone();
            let report = tokio::task::spawn_blocking(move || r.pass()).await?.context("retention pass at start")?;
            tracing::info!(
                stage = "retention",
                series = report.series,
                files = report.files,
                bytes = report.bytes,
                "retention pass at start"
            );
        }
        let (results_tx, results_rx) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            config: config.clone(),
            spool,
            store: store.clone(),
            ctx,
            salt,
            tracker: Mutex::new(CompletionTracker::default()),
            workers: Mutex::new(HashMap::new()),
            backlog: Backlog::new(config.engine.max_backlog_s),
            segment_pool: segpool::SegmentPool::new(
                std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
                config.engine.segment_nice,
            )
            .context("starting the segmentation threads")?,
            analysis_slots: Arc::new(tokio::sync::Semaphore::new(1)),
            results_tx,
            live: Arc::new(Liveness::default()),
            dicom_outbox_wake: Arc::new(tokio::sync::Notify::new()),
            spool_guard,
            retention: retention.clone(),
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        // Resume series that had instances without a result when we last stopped (or crashed).
        for series_uid in store.series_pending_analysis()? {
            tracing::info!(series = %crate::store::series_log_key(&series_uid), stage = "recovery", "resuming series interrupted before analysis");
            ensure_worker(&shared, &series_uid);
            recovery::tracker(&shared).instance(&series_uid, None, None, Instant::now());
        }

        let addr: SocketAddr = format!("{}:{}", config.dicom.bind, config.dicom.port).parse()?;
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding DICOM listener on {addr}"))?;
        let dicom_addr = listener.local_addr()?;
        tracing::info!(%dicom_addr, ae_title = %config.dicom.ae_title, tls = config.dicom.tls.is_some(), "DICOM SCP listening");

        let (events_tx, events_rx) = mpsc::channel::<ReceiveEvent>(64);
        {
            let cfg = config.dicom.clone();
            let sd = shutdown_rx.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = receive::run(cfg, listener, events_tx, sd).await {
                    tracing::error!(error = %format!("{e:#}"), "DICOM listener stopped");
                }
            }));
        }
        tasks.push(tokio::spawn(dispatch_events(shared.clone(), events_rx)));
        let mut http_addr = None;
        if !config.http.bind.is_empty() {
            // The dashboard, metrics and API read through their own read-only connections (WAL), never the
            // writer's that answers C-STOREs; the live view computes one snapshot per change for all its clients.
            let db = data_dir.join("lungsentry.sqlite");
            let readers = Arc::new(crate::store::ReadPool::open(&db, crate::store::DEFAULT_READERS)?);
            let (live, live_task) = crate::dashboard::live::LiveView::start(
                &db,
                config.http.max_sse_clients,
                Some(results_rx.clone()),
                shutdown_rx.clone(),
            )?;
            tasks.push(live_task);
            let readiness = crate::http::Readiness {
                model: format!("{} {}", shared.ctx.model.manifest.model.name, shared.ctx.model.manifest.model.version),
                engine: shared.ctx.engine.name(),
                dicom_addr,
                readers: readers.clone(),
                disk: Some((data_dir.clone(), config.storage.disk_high_water_percent)),
                gauges: Some(scrape_gauges(shared.clone(), readers.clone())),
                dashboard: Some(Arc::new(crate::dashboard::DashboardState {
                    readers,
                    live,
                    data_dir: data_dir.clone(),
                    token: crate::dashboard::load_or_create_token(config.http.token.as_deref(), &data_dir)?,
                    backlog: Some(shared.backlog.clone()),
                })),
            };
            let (addr, task) = crate::http::start(&config.http.bind, readiness, shutdown_rx.clone()).await?;
            tracing::info!(%addr, "HTTP health endpoints listening");
            http_addr = Some(addr);
            tasks.push(task);
        }
        tasks.push(tokio::spawn(recovery::supervise_ticker(shared.clone(), shutdown_rx.clone())));
        tasks.push(tokio::spawn(crate::retention::run(retention, shutdown_rx.clone())));
        {
            let s = shared.clone();
            let workers = move || recovery::lock(&s.workers).len();
            tasks.push(tokio::spawn(liveness::run(shared.live.clone(), store.clone(), workers, shutdown_rx.clone())));
        }
        if config.alerts.webhook_url.is_some() {
            let store = store.clone();
            let alerts = config.alerts.clone();
            let sd = shutdown_rx.clone();
            tasks.push(tokio::spawn(async move { crate::notify::run_webhook_outbox(store, alerts, sd).await }));
        }
        if !config.outputs.dicom.is_empty() {
            let awaiting = store.results_awaiting_outputs()?;
            if !awaiting.is_empty() {
                tracing::info!(results = awaiting.len(), "results without their DICOM outputs queued: rebuilding them");
                tasks.push(tokio::spawn(queue_missing_outputs(shared.clone(), awaiting)));
            }
            // Re-linked follow-ups whose amended SR a stop left unqueued (none: one empty read).
            tasks.push(tokio::spawn(queue_amended_srs(shared.clone())));
            let (store, cfg, ae) = (store.clone(), config.outputs.clone(), config.dicom.ae_title.clone());
            let (wake, sd) = (shared.dicom_outbox_wake.clone(), shutdown_rx.clone());
            tasks.push(tokio::spawn(crate::outputs::outbox::run_dicom_outbox(store, cfg, ae, wake, sd)));
        }
        Ok(Daemon { dicom_addr, http_addr, store, results: results_rx, shutdown_tx, tasks })
    }

    /// Stops accepting, lets in-flight instances finish, and waits for the tasks.
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

/// The gauges `/metrics` reads at scrape time: live series workers, slices queued to them, outbox depths.
fn scrape_gauges(shared: Arc<Shared>, readers: Arc<crate::store::ReadPool>) -> Arc<dyn Fn() -> String + Send + Sync> {
    Arc::new(move || {
        use crate::metrics::gauge;
        let mut out = String::new();
        let workers = recovery::lock(&shared.workers).values().filter(|tx| !tx.is_closed()).count();
        let queued = shared.backlog.queued();
        gauge(
            &mut out,
            "lungsentry_series_workers",
            "Series with a live worker (receiving, analysing or lingering).",
            &[(String::new(), workers as f64)],
        );
        gauge(
            &mut out,
            "lungsentry_worker_queue_depth",
            "Slices queued to series workers, not yet segmented.",
            &[(String::new(), queued as f64)],
        );
        gauge(
            &mut out,
            "lungsentry_backlog_seconds",
            "Estimated seconds of segmentation queued (C-STORE responses wait above engine.max_backlog_s).",
            &[(String::new(), shared.backlog.seconds())],
        );
        backlog_and_completion_gauges(&shared, &mut out);
        if let Ok(c) = readers.get().outbox_counts() {
            gauge(
                &mut out,
                "lungsentry_webhook_outbox",
                "Webhook alert outbox rows by state.",
                &[
                    ("state=\"pending\"".into(), c.pending as f64),
                    ("state=\"failing\"".into(), c.failing as f64),
                    ("state=\"delivered\"".into(), c.delivered as f64),
                ],
            );
        }
        if let Ok(c) = readers.get().dicom_outbox_counts() {
            gauge(
                &mut out,
                "lungsentry_dicom_outbox",
                "DICOM output outbox rows by state (parked: refused for good).",
                &[
                    ("state=\"pending\"".into(), c.pending as f64),
                    ("state=\"failing\"".into(), c.failing as f64),
                    ("state=\"delivered\"".into(), c.delivered as f64),
                    ("state=\"parked\"".into(), c.parked as f64),
                ],
            );
        }
        out
    })
}

/// The response-hold and completion-rule gauges (issue 24): what pacing cost the senders, how series completed.
fn backlog_and_completion_gauges(shared: &Shared, out: &mut String) {
    use crate::metrics::gauge;
    let b = &shared.backlog;
    gauge(
        out,
        "lungsentry_response_hold_longest_seconds",
        "Longest a C-STORE response was held by the backlog pacing (at most engine.max_response_hold_s).",
        &[(String::new(), b.longest_hold_s())],
    );
    gauge(
        out,
        "lungsentry_response_holds_capped",
        "C-STORE responses answered at the hold cap with the backlog still over engine.max_backlog_s.",
        &[(String::new(), b.holds_capped() as f64)],
    );
    gauge(
        out,
        "lungsentry_instances_left_to_spool",
        "Instances not queued to their worker (queue at its cap), segmented from the spool at completion.",
        &[(String::new(), b.left_to_spool() as f64)],
    );
    let by_rule = recovery::tracker(shared).completed_by_rule();
    gauge(
        out,
        "lungsentry_series_completed",
        "Series completions by rule (count, stack, quiet, stable: see series::CompletionTracker).",
        &by_rule.iter().map(|(r, n)| (format!("rule=\"{}\"", r.name()), *n as f64)).collect::<Vec<_>>(),
    );
}

async fn dispatch_events(shared: Arc<Shared>, mut events: mpsc::Receiver<ReceiveEvent>) {
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
                enqueue(&shared, &series_uid, WorkerMsg::Instance { meta: spooled.meta, path: spooled.path, queued })
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
        let full = matches!(&e, crate::spool::SpoolError::OutOfResources(_, io) if crate::retention::is_disk_full(io));
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

/// Sends to the series worker, starting one (which reloads the series from the store) when none is live.
async fn enqueue(shared: &Arc<Shared>, series_uid: &str, msg: WorkerMsg) {
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

fn ensure_worker(shared: &Arc<Shared>, series_uid: &str) -> mpsc::UnboundedSender<WorkerMsg> {
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
    let mut received_at = chrono_now();
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
                    received_at = chrono_now();
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
                    let r = finish_series(&s, &uid, &mut w, &ra);
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

/// 3D analysis, versioned result, outbox row for a first positive, log line.
fn finish_series(shared: &Arc<Shared>, series_uid: &str, work: &mut SeriesWork, received_at: &str) -> Result<()> {
    let t_start = Instant::now();
    if work.instance_count() == 0 {
        return Ok(());
    }
    // The revision read before the analysis: instances arriving meanwhile leave the series pending.
    let revision = shared.store.series_revision(series_uid)?;
    // Exactly one result per revision: a second completion with nothing recorded in between (a restart's
    // recovery and the re-sending scanner's own completion, a retry after a failed write that did land) would
    // analyse the same instances again and record a duplicate version.
    let previous = shared.store.latest_result(series_uid)?;
    if let (Some(rev), Some(latest)) = (revision, &previous) {
        if latest.series_revision == rev {
            tracing::info!(series = %crate::store::series_log_key(series_uid), stage = "analysis", version = latest.version,
                "already analysed at this revision; no new version");
            return Ok(());
        }
    }
    // Instances recorded by then whose message has not reached this worker yet (behind this completion in its
    // queue, or still being handed over) are segmented now from the spool, so the result covers the revision it is
    // recorded with; so are repeats whose new file replaced the one this worker read (changed content under the same
    // SOP Instance UID). Without this, a result tagged with that revision could miss them or analyse the older
    // content, and every later completion would find the revision "already analysed": acknowledged data never analysed.
    let mut topped_up = 0;
    for crate::store::StoredInstance { meta, path } in shared.store.series_instances(series_uid)? {
        if work.changed_since_added(&meta.sop_instance_uid, &path) {
            let _busy = shared.live.busy("slice segmentation");
            // At completion already: seeding ahead would only move the same work.
            work.add_seeding_ahead(&shared.ctx, meta, &path, false);
            topped_up += 1;
        }
    }
    if topped_up > 0 {
        tracing::info!(series = %crate::store::series_log_key(series_uid), stage = "analysis", topped_up,
            "instances recorded before the analysis but not yet at the series worker, or replaced since it read \
             them, segmented from the spool");
    }
    // Retention purged pixel data this worker does not hold: a partial re-analysis would be wrong. Say so.
    let purged = shared.store.purged_instance_count(series_uid)?;
    let recorded = shared.store.series(series_uid)?.map(|r| r.n_instances as usize).unwrap_or(0);
    if purged > 0 && work.instance_count() < recorded {
        let reason = format!(
            "re-analysis not possible: pixel data of {purged} of {recorded} instances was purged by retention \
             (storage.retention_hours / disk pressure); re-send the whole series to analyse it again"
        );
        tracing::warn!(series = %crate::store::series_log_key(series_uid), stage = "analysis", purged, recorded, "{reason}");
        shared.store.set_series_state(series_uid, "purged", Some(&reason))?;
        return Ok(());
    }
    // The key was computed from the raw identifiers when the instances were recorded (the store hands
    // instance metadata back without them).
    let row = shared.store.series(series_uid)?;
    let patient_key = row.as_ref().map(|s| s.patient_key.clone()).unwrap_or_default();
    let t_analysis = Instant::now();
    let (mut result, slices) = work.finish_with_slices(&shared.ctx, &patient_key, received_at, &chrono_now(), true);
    // Follow-up: compare with the same patient's latest earlier study (other series of this patient only), and
    // the later studies analysed before this one arrived that now compare with it (stored with this result, in
    // its transaction).
    let links = link_follow_ups(
        &shared.store,
        &patient_key,
        series_uid,
        &mut result,
        (&shared.config.analysis).into(),
        shared.config.alerts.webhook_url.is_some(),
        Some(&shared.config.outputs),
    )?;
    let positive = result.positive;
    let progression = result.progression();
    let involvement = result.involvement_percent();
    let previously_positive = previous.as_ref().map(|r| r.positive).unwrap_or(false);
    // The stored result read back typed (store boundary); one that cannot be read shows no progression.
    let previously_progression =
        previous.as_ref().and_then(|r| SeriesResult::from_json(r.result.clone()).ok()).is_some_and(|r| r.progression());
    // Alerts: once when the series first becomes positive, once when it first shows progression.
    let mut reasons = Vec::new();
    if positive && !previously_positive {
        reasons.push("positive");
    }
    if progression && !previously_progression {
        reasons.push("progression");
    }
    // One flag per exam: another reconstruction of the study that already alerted keeps this one quiet.
    let study_uid = row.as_ref().map(|r| r.study_instance_uid.as_str()).unwrap_or("");
    result.study_alert = exam_flag::one_flag_per_exam(&shared.store, study_uid, series_uid, &mut reasons)?;
    let alert = !reasons.is_empty() && shared.config.alerts.webhook_url.is_some();
    result.alert = Some(!reasons.is_empty());
    result.alert_reasons = Some(reasons.iter().map(|r| r.to_string()).collect());
    let outputs_due = crate::outputs::outbox::wants_outputs(&shared.config.outputs, &result);
    let t_record = Instant::now();
    let version = shared.store.record_result_with_outputs(crate::store::NewResult {
        series_uid,
        revision,
        positive,
        involvement_percent: involvement,
        result_json: &result.to_json(),
        alert,
        outputs_due,
        links: &links,
    })?;
    for l in &links {
        tracing::info!(series = %crate::store::series_log_key(&l.series_instance_uid), version = l.result_version,
            prior = %crate::store::series_log_key(series_uid), alert = l.alert_payload.is_some(),
            amended_sr = l.outputs_due, "follow-up re-linked: a prior study arrived after this series was analysed");
    }
    if links.iter().any(|l| l.outputs_due) {
        tokio::runtime::Handle::current().spawn(queue_amended_srs(shared.clone()));
    }
    crate::outputs::outbox::crash_point("after_result");
    // The path to the alert, by stage (the webhook outbox was woken by the commit; what follows is after it).
    // `scripts/bench-e2e` reads this line for its per-stage breakdown.
    tracing::info!(series = %crate::store::series_log_key(series_uid), stage = "analysis", version,
        top_up_ms = (t_analysis - t_start).as_secs_f64() * 1e3,
        analysis_ms = (t_record - t_analysis).as_secs_f64() * 1e3,
        commit_ms = t_record.elapsed().as_secs_f64() * 1e3,
        committed_at_ms = crate::store::now_ms(),
        "result timings");
    result.version = Some(version);
    if result.status == SeriesStatus::Skipped {
        shared.store.set_series_state(series_uid, "skipped", Some(&result.skip_reasons.join("; ")))?;
    }
    if let Some(row) = &row {
        crate::metrics::metrics()
            .stage("last_slice_to_result", (crate::store::now_ms() - row.last_instance_at) as f64 / 1000.0);
    }
    // After the stage above: a test that sees the series counted sees every metric of it.
    crate::metrics::metrics().result(&result);
    if let Err(e) = crate::dashboard::write_key_png(&shared.config.storage.data_dir, &result, &slices) {
        tracing::warn!(series = %crate::store::series_log_key(series_uid), stage = "dashboard", error = %format!("{e:#}"), "no dashboard key image");
    }
    if !shared.config.outputs.dicom.is_empty() {
        let data_dir = &shared.config.storage.data_dir;
        match crate::outputs::outbox::enqueue_result(
            &shared.store,
            &shared.config.outputs,
            data_dir,
            &result,
            &slices,
            version as i64,
        ) {
            Ok(n) if n > 0 => shared.dicom_outbox_wake.notify_one(),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(series = %crate::store::series_log_key(series_uid), stage = "outputs", error = %format!("{e:#}"),
                "DICOM outputs could not be made")
            }
        }
    }
    crate::notify::log_result(&result);
    shared.results_tx.send_modify(|n| *n += 1);
    Ok(())
}

/// Follow-up linking of `result` (about to be recorded for `series_uid`), as the daemon and `analyze --store` do
/// it, from one read of the patient's other series: forward, `follow_up` with the latest earlier study
/// ([`crate::analysis::followup::link`]); backward, the links to store for later studies whose prior study it
/// now is ([`crate::analysis::followup::relinks`]). With `webhook`, a link that newly shows progression carries
/// an alert (the later series' result as it now reads, `alert_reasons: ["progression"]`). With `outputs`, a link
/// whose later series' result some destination wants an SR of is marked `outputs_due` (its amended SR).
pub fn link_follow_ups(
    store: &Store,
    patient_key: &str,
    series_uid: &str,
    result: &mut SeriesResult,
    rule: crate::analysis::followup::ProgressionRule,
    webhook: bool,
    outputs: Option<&crate::outputs::OutputsConfig>,
) -> Result<Vec<crate::store::FollowUpLink>> {
    if patient_key.is_empty() || !result.is_analysed() {
        return Ok(Vec::new());
    }
    let others: Vec<crate::store::StoredResult> =
        store.results_for_patient(patient_key)?.into_iter().filter(|r| r.series_instance_uid != series_uid).collect();
    // The comparison reads results as JSON (the stored ones are JSON): this one joins them as its JSON.
    let values: Vec<serde_json::Value> = others.iter().map(|r| r.result.clone()).collect();
    let current = result.to_json();
    if let Some(f) = crate::analysis::followup::prior_comparison(&current, &values, rule) {
        result.follow_up = Some(f);
    }
    let mut links = Vec::new();
    for rl in crate::analysis::followup::relinks(&current, &values, rule) {
        let later = &others[rl.index];
        // The later series' stored result read back typed (store boundary), as it now reads.
        let mut now_reads = SeriesResult::from_json(later.result.clone())?;
        now_reads.follow_up = Some(rl.follow_up.clone());
        let outputs_due = outputs.is_some_and(|cfg| crate::outputs::outbox::wants_sr(cfg, &now_reads));
        let alert_payload = (webhook && rl.newly_progressed).then(|| {
            now_reads.alert = Some(true);
            now_reads.alert_reasons = Some(vec!["progression".to_string()]);
            now_reads.to_json()
        });
        links.push(crate::store::FollowUpLink {
            series_instance_uid: later.series_instance_uid.clone(),
            result_version: later.version,
            prior_series_instance_uid: series_uid.to_string(),
            follow_up: serde_json::to_value(&rl.follow_up)?,
            alert_payload,
            outputs_due,
        });
    }
    Ok(links)
}

/// Queues the amended SRs of backward links that are due ([`crate::outputs::outbox::enqueue_link_outputs`]):
/// right after a link is stored, and at start-up for links a stop left unqueued. Needs no segmentation (an SR
/// carries the stored numbers and references the original SEG), so it is cheap.
async fn queue_amended_srs(shared: Arc<Shared>) {
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
async fn queue_missing_outputs(shared: Arc<Shared>, awaiting: Vec<crate::store::StoredResult>) {
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

async fn completion_ticker(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    // Every 20 ms: a series proven whole (series::CompletionTracker) is analysed within a tick, not a quiet period.
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            _ = shutdown.changed() => return,
        }
        shared.live.beat();
        let done = {
            let mut tracker = recovery::tracker(&shared);
            let done = tracker.take_complete(Instant::now(), &shared.config.series);
            if !done.is_empty() {
                // Test builds only: a panic here, lock held, the completed series taken out (recovery.rs).
                crate::test_hooks::panic_point("completion");
            }
            done
        };
        for (series_uid, rule) in done {
            tracing::info!(series = %crate::store::series_log_key(&series_uid), stage = "completion", rule = rule.name(),
                at_ms = crate::store::now_ms(), "series complete");
            enqueue(&shared, &series_uid, WorkerMsg::Complete).await;
        }
    }
}

/// Current UTC time as RFC 3339 with milliseconds ([`crate::clock::now_rfc3339`]).
pub use crate::clock::now_rfc3339 as chrono_now;
/// Unix milliseconds → RFC 3339 UTC ([`crate::clock::rfc3339`]).
pub use crate::clock::rfc3339;
