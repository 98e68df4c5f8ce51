//! live — the dashboard's live view: one snapshot of the series list per change of the database, shared by every
//! SSE client, and the cap on those clients.
//!
//! Owns: the snapshot task (its own read-only connection; it looks at SQLite's `PRAGMA data_version` — one integer,
//! no table read — every [`CHECK`] or at once when the pipeline records a result, and recomputes the list only
//! when another connection committed something since; the text goes out on a `watch` only when it differs), and
//! the SSE client slots (`http.max_sse_clients`; one more is refused with HTTP 503 and a message naming the key).
//! Hands on: the snapshot text to `/api/events` streams (each client waits on the `watch`; no client queries the
//! store).
//! Never: computes a snapshot per client, or reads the store on an async worker.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::store::Store;

/// How often the snapshot task looks at `data_version` when nothing woke it.
pub const CHECK: Duration = Duration::from_millis(500);

/// The shared live view.
#[derive(Debug)]
pub struct LiveView {
    /// The latest series list as JSON text ("" until the first snapshot).
    snapshot: watch::Receiver<Arc<str>>,
    /// One permit per SSE client served now.
    clients: Arc<Semaphore>,
    /// `http.max_sse_clients`, for the refusal's message.
    max_clients: usize,
}

/// Why an SSE client was not taken.
#[derive(Debug, thiserror::Error)]
#[error(
    "too many live-view clients: {max} already connected (http.max_sse_clients); close another dashboard or raise \
     the limit"
)]
pub struct TooManyClients {
    /// The configured limit.
    pub max: usize,
}

impl LiveView {
    /// Starts the snapshot task on its own read-only connection to `db`; it ends when `shutdown` turns true (the
    /// streams then end too). `wake` (the pipeline's count of recorded results) makes a new result show at once.
    pub fn start(
        db: &Path,
        max_clients: usize,
        wake: Option<watch::Receiver<u64>>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<(Arc<LiveView>, tokio::task::JoinHandle<()>)> {
        let conn = Arc::new(Store::open_read_only(db)?);
        let (tx, rx) = watch::channel::<Arc<str>>(Arc::from(""));
        let task = tokio::spawn(snapshots(conn, tx, wake, shutdown));
        let view = LiveView { snapshot: rx, clients: Arc::new(Semaphore::new(max_clients.max(1))), max_clients };
        Ok((Arc::new(view), task))
    }

    /// A slot for one SSE client (held until the stream is dropped), or the refusal when all are taken.
    pub fn join(&self) -> Result<(OwnedSemaphorePermit, watch::Receiver<Arc<str>>), TooManyClients> {
        let permit = self.clients.clone().try_acquire_owned().map_err(|_| TooManyClients { max: self.max_clients })?;
        Ok((permit, self.snapshot.clone()))
    }

    /// SSE clients connected now.
    pub fn clients(&self) -> usize {
        self.max_clients.saturating_sub(self.clients.available_permits())
    }
}

/// The snapshot task: recompute on change, publish when the text differs.
async fn snapshots(
    conn: Arc<Store>,
    tx: watch::Sender<Arc<str>>,
    mut wake: Option<watch::Receiver<u64>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut seen: Option<i64> = None;
    loop {
        let (c, last) = (conn.clone(), seen);
        // Blocking SQLite work (and the result JSON it parses) on the blocking pool, never on a runtime worker.
        let next = tokio::task::spawn_blocking(move || -> anyhow::Result<(i64, Option<String>)> {
            let v = c.data_version()?;
            if last == Some(v) {
                return Ok((v, None));
            }
            Ok((v, Some(serde_json::to_string(&super::rows(&c)?)?)))
        })
        .await;
        match next {
            Ok(Ok((v, text))) => {
                seen = Some(v);
                if let Some(text) = text {
                    tx.send_if_modified(|cur| {
                        let changed = **cur != *text;
                        if changed {
                            *cur = Arc::from(text);
                        }
                        changed
                    });
                }
            }
            // Keep the last snapshot; try again at the next check (a busy database, say).
            Ok(Err(e)) => tracing::warn!(stage = "dashboard", error = %format!("{e:#}"), "live view snapshot failed"),
            Err(e) => tracing::warn!(stage = "dashboard", error = %e, "live view snapshot task failed"),
        }
        let woken = async {
            match wake.as_mut() {
                Some(w) => {
                    if w.changed().await.is_err() {
                        // The pipeline is gone: fall back to the periodic check only.
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(CHECK) => {}
            _ = woken => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
