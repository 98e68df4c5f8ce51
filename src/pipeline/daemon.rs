//! daemon — `lungsentry serve`: start-up in order, the tasks it wires together, and graceful shutdown.
//!
//! Owns: the start-up order (config check, TLS files, umask, data dir, store, spool, salt, model verified and
//! engine warmed at the segmentation threads' priority, a retention pass, recovery of series interrupted before
//! analysis, DICOM bind), the state every stage shares ([`Shared`]), the tasks it spawns (receive listener, event
//! dispatch to `ingest`, HTTP endpoints with the dashboard, the supervised completion ticker, retention, liveness,
//! the webhook and DICOM outboxes, the start-up output sweeps), READY/STOPPING for systemd, and shutdown (stop
//! accepting, let in-flight work end, wait for the tasks).
//! Hands on: received instances to `ingest`, completions to `worker` through the ticker (`completion`).
//! Never: handles an instance, segments or analyses itself, or locks the shared state with `lock().unwrap()`
//! (after a panic, `recovery` takes it back or rebuilds it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};

use super::backlog::Backlog;
use super::liveness::{self, Liveness};
use super::slices::InferenceContext;
use super::worker::WorkerMsg;
use super::{gauges, ingest, outputs_sweep, recovery, segpool, worker};
use crate::config::Config;
use crate::model::Model;
use crate::receive::{self, ReceiveEvent};
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

/// State shared by the instance tasks, the ticker and the workers.
pub(super) struct Shared {
    /// Validated configuration.
    pub(super) config: Config,
    /// Durable instance files.
    pub(super) spool: Spool,
    /// SQLite results store.
    pub(super) store: Arc<Store>,
    /// Model, engine and thresholds.
    pub(super) ctx: Arc<InferenceContext>,
    /// Salt of `patient_key`.
    pub(super) salt: Vec<u8>,
    /// Completion rule state.
    pub(super) tracker: Mutex<CompletionTracker>,
    /// Live series workers by Series Instance UID.
    pub(super) workers: Mutex<HashMap<String, mpsc::UnboundedSender<WorkerMsg>>>,
    /// Segmentation work queued to the workers; C-STORE responses wait while it exceeds `engine.max_backlog_s`.
    pub(super) backlog: Arc<Backlog>,
    /// The slice segmentation threads: one per core (more only thrash the engine's threads and multiply its
    /// working memory when several scanners send at once), below the receive path's priority (see `segpool`).
    pub(super) segment_pool: segpool::SegmentPool,
    /// 3D analyses running at once: one. Each holds whole-volume label arrays (hundreds of MB for 300 × 512²), so
    /// eight series completing together must not hold eight (the 8-scanner load test peaked at 621 MB without it).
    pub(super) analysis_slots: Arc<tokio::sync::Semaphore>,
    /// Number of results recorded (for tests/demo to wait on).
    pub(super) results_tx: watch::Sender<u64>,
    /// Progress evidence the systemd watchdog trusts.
    pub(super) live: Arc<Liveness>,
    /// Wakes the DICOM outputs outbox worker when rows are queued.
    pub(super) dicom_outbox_wake: Arc<tokio::sync::Notify>,
    /// Read side: an instance being spooled and recorded; write side: a retention purge (see `retention`).
    pub(super) spool_guard: Arc<RwLock<()>>,
    /// Purges pixel data of finished series (age, disk pressure, an instance that does not fit).
    pub(super) retention: Arc<crate::retention::Retention>,
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
            worker::ensure_worker(&shared, &series_uid);
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
        tasks.push(tokio::spawn(ingest::dispatch_events(shared.clone(), events_rx)));
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
                gauges: Some(gauges::scrape(shared.clone(), readers.clone())),
                dashboard: Some(Arc::new(crate::dashboard::DashboardState {
                    readers,
                    live,
                    data_dir: data_dir.clone(),
                    token: crate::dashboard::load_or_create_token(config.http.token.as_deref(), &data_dir)?,
                    backlog_seconds: Some({
                        let backlog = shared.backlog.clone();
                        Arc::new(move || backlog.seconds())
                    }),
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
                tasks.push(tokio::spawn(outputs_sweep::queue_missing_outputs(shared.clone(), awaiting)));
            }
            // Re-linked follow-ups whose amended SR a stop left unqueued (none: one empty read).
            tasks.push(tokio::spawn(outputs_sweep::queue_amended_srs(shared.clone())));
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
