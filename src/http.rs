//! http — the daemon's HTTP surface: `/healthz` (the process is alive) and `/readyz` (model verified,
//! engine warmed, SCP bound, store writable). The technologists' dashboard and `/metrics` build on this.
//!
//! Never: exposes patient identifiers or accepts writes.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::{extract::State, http::StatusCode, routing::get, Json, Router};
use serde_json::json;
use tokio::sync::watch;

use crate::store::Store;

/// What `/readyz` reports.
pub struct Readiness {
    /// Model name and version in use.
    pub model: String,
    /// Engine in use.
    pub engine: &'static str,
    /// Where the DICOM SCP is bound.
    pub dicom_addr: SocketAddr,
    /// The results store (a cheap query proves it answers).
    pub store: Arc<Store>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(r): State<Arc<Readiness>>) -> (StatusCode, Json<serde_json::Value>) {
    let store = r.store.clone();
    let store_ok = tokio::task::spawn_blocking(move || store.outbox_counts().is_ok()).await.unwrap_or(false);
    let body = json!({
        "ready": store_ok,
        "model": r.model,
        "engine": r.engine,
        "dicom": r.dicom_addr.to_string(),
        "store": if store_ok { "ok" } else { "error" },
    });
    (if store_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}

/// Binds `bind` and serves until `shutdown` turns true; returns the bound address.
pub async fn start(
    bind: &str,
    readiness: Readiness,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let app =
        Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).with_state(Arc::new(readiness));
    let listener = tokio::net::TcpListener::bind(bind).await.with_context(|| format!("binding http.bind {bind}"))?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
            .await;
    });
    Ok((addr, task))
}
