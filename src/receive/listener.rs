//! listener — the accept loop: one task per association, at most `max_associations` at once.
//!
//! Owns: accepting (a semaphore permit is taken *before* accept, so excess peers wait in the kernel's
//! backlog), TCP_NODELAY on every socket, exponential backoff on accept errors (the loop never dies of them),
//! association ids, and graceful shutdown (stop accepting, then wait until every association has ended —
//! each finishes the message it is receiving, answers it, and aborts at the next message boundary).
//! Hands on: each connection to an [`AssociationHandler`].
//! Never: reads PDUs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use super::association::{AssociationHandler, Settings, TlsSettings};
use super::ReceiveEvent;
use crate::config::DicomConfig;

/// Source of process-unique association ids (unique across listeners in one process, e.g. tests).
static NEXT_ASSOCIATION_ID: AtomicU64 = AtomicU64::new(1);

/// Transport knobs that are not configuration keys (defaults are what the daemon uses).
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Re-arm TCP_QUICKACK after every socket read (Linux). A sender with Nagle's algorithm on (DCMTK
    /// without `TCP_NODELAY=1`) otherwise holds the last short segment of each message until our delayed
    /// ACK fires, up to 40 ms per instance.
    pub tcp_quickack: bool,
    /// Largest PDU we announce and accept (bytes after the 6-byte header).
    pub max_pdu_length: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        // 128 KiB - 6 is DCMTK's largest PDU; larger buys nothing with it and costs buffer space.
        Tuning { tcp_quickack: true, max_pdu_length: 131_072 - 6 }
    }
}

/// Serves DICOM associations on `listener` until `shutdown` turns true (or its sender is dropped).
///
/// Every C-STORE's dataset goes to `events` as [`ReceiveEvent::Instance`]; the C-STORE-RSP is sent with the
/// status that comes back on its oneshot (a dropped oneshot or a closed channel answers `0xA700`, never
/// success). Each established association ends with [`ReceiveEvent::Released`].
///
/// `cfg` supplies the AE title (the called AE title must match it), `max_associations`, `max_message_mb`
/// (bigger messages are read, dropped and answered `0xA700`), `association_idle_timeout_s` and
/// `allowed_peers`; `cfg.bind`/`cfg.port` are not used — the caller binds `listener`. With `cfg.tls` set every
/// connection is served over TLS only (its files are read here, before the first accept: a bad file is an error).
///
/// Returns once no association is left after shutdown. Accept errors are retried with backoff, not returned.
pub async fn run(
    cfg: DicomConfig,
    listener: TcpListener,
    events: mpsc::Sender<ReceiveEvent>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    run_with(cfg, listener, events, shutdown, Tuning::default()).await
}

/// [`run`] with explicit transport [`Tuning`] (benchmarks compare with and without TCP_QUICKACK).
pub async fn run_with(
    cfg: DicomConfig,
    listener: TcpListener,
    events: mpsc::Sender<ReceiveEvent>,
    mut shutdown: watch::Receiver<bool>,
    tuning: Tuning,
) -> anyhow::Result<()> {
    let tls = match &cfg.tls {
        Some(t) => Some(TlsSettings {
            config: super::tls::server_config(t)?,
            handshake_timeout: Duration::from_secs(t.handshake_timeout_s.max(1)),
        }),
        None => None,
    };
    let settings = Arc::new(Settings {
        ae_title: cfg.ae_title.clone(),
        max_message_bytes: (cfg.max_message_mb as u64).saturating_mul(1024 * 1024),
        budget: super::budget::BufferBudget::new((cfg.max_buffered_mb as u64).saturating_mul(1024 * 1024)),
        idle_timeout: Duration::from_secs(cfg.association_idle_timeout_s.max(1)),
        allowed: Arc::new(cfg.allowed_peers.clone()),
        tuning,
        tls,
    });
    let local = listener.local_addr()?;
    if cfg.allowed_peers.is_empty() {
        warn!("dicom.allowed_peers is empty: any calling AE title from any address may send");
    }
    info!(
        ae_title = %cfg.ae_title,
        %local,
        max_associations = cfg.max_associations,
        max_buffered_mb = cfg.max_buffered_mb,
        tls = settings.tls.is_some(),
        client_cert = cfg.tls.as_ref().map_or("off", |t| match (&t.ca, t.require_client_cert) {
            (None, _) => "off",
            (Some(_), false) => "verified if presented",
            (Some(_), true) => "required",
        }),
        "DICOM listener ready"
    );

    let limit = Arc::new(Semaphore::new(cfg.max_associations.max(1)));
    let mut handlers = JoinSet::new();
    loop {
        while let Some(done) = handlers.try_join_next() {
            report_join(done);
        }
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p?,
            _ = shutdown.wait_for(|v| *v) => break,
        };
        let (socket, peer) = tokio::select! {
            r = accept(&listener) => r,
            _ = shutdown.wait_for(|v| *v) => break,
        };
        if let Err(e) = socket.set_nodelay(true) {
            warn!(%peer, error = %e, "could not set TCP_NODELAY");
        }
        let handler = AssociationHandler {
            id: NEXT_ASSOCIATION_ID.fetch_add(1, Ordering::Relaxed),
            peer,
            settings: settings.clone(),
            events: events.clone(),
            shutdown: shutdown.clone(),
        };
        handlers.spawn(async move {
            handler.run(socket).await;
            drop(permit);
        });
    }
    info!(in_flight = handlers.len(), "DICOM listener stopped accepting; waiting for associations to end");
    drop(listener);
    while let Some(done) = handlers.join_next().await {
        report_join(done);
    }
    info!("DICOM listener stopped");
    Ok(())
}

/// Accepts one connection, retrying errors (EMFILE, ECONNABORTED, ...) with exponential backoff up to 5 s.
async fn accept(listener: &TcpListener) -> (TcpStream, std::net::SocketAddr) {
    let mut backoff = Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok(pair) => return pair,
            Err(e) => {
                error!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn report_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            error!("an association task panicked; the listener goes on");
        }
    }
}
