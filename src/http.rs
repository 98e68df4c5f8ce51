//! http — the daemon's HTTP surface: `/healthz` (the process is alive), `/readyz` (model verified,
//! engine warmed, SCP bound, store answering, data disk below its high-water mark) and `/metrics` (Prometheus
//! text: the [`crate::metrics`] registry plus the gauges the daemon reads at scrape time).
//! The technologists' dashboard builds on this.
//!
//! Never: exposes patient identifiers or accepts writes.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::{extract::State, http::StatusCode, routing::get, Json, Router};
use serde_json::json;
use tokio::sync::watch;

use crate::store::ReadPool;

/// What `/readyz` reports.
pub struct Readiness {
    /// Model name and version in use.
    pub model: String,
    /// Engine in use.
    pub engine: &'static str,
    /// Where the DICOM SCP is bound.
    pub dicom_addr: SocketAddr,
    /// Read-only connections to the results store (a cheap query proves it answers; never the writer's).
    pub readers: Arc<ReadPool>,
    /// Data dir and its high-water mark (percent used); not ready above it.
    pub disk: Option<(std::path::PathBuf, f64)>,
    /// Gauges read at scrape time (queue depths, outbox depths), as Prometheus text.
    pub gauges: Option<Arc<dyn Fn() -> String + Send + Sync>>,
    /// The dashboard and its token; with it, every route but `/healthz` needs the token.
    pub dashboard: Option<Arc<crate::dashboard::DashboardState>>,
}

async fn metrics(State(r): State<Arc<Readiness>>) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    let gauges = r.gauges.clone();
    let disk = r.disk.clone();
    let text = tokio::task::spawn_blocking(move || {
        let mut text = crate::metrics::metrics().render();
        if let Some(g) = gauges {
            text.push_str(&g());
        }
        if let Some((u, free)) = disk.and_then(|(p, _)| crate::datadir::disk_usage(&p)) {
            crate::metrics::gauge(
                &mut text,
                "lungsentry_disk_used_ratio",
                "Used fraction of the data dir's file system.",
                &[(String::new(), u)],
            );
            crate::metrics::gauge(
                &mut text,
                "lungsentry_disk_available_bytes",
                "Bytes available in the data dir's file system.",
                &[(String::new(), free as f64)],
            );
        }
        text
    })
    .await
    .unwrap_or_default();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(r): State<Arc<Readiness>>) -> (StatusCode, Json<serde_json::Value>) {
    let readers = r.readers.clone();
    let store_ok = tokio::task::spawn_blocking(move || readers.get().outbox_counts().is_ok()).await.unwrap_or(false);
    let disk = r.disk.as_ref().map(|(p, hw)| (crate::datadir::disk_usage(p), *hw));
    let disk_ok = match disk {
        Some((Some((used, _)), hw)) => used * 100.0 <= hw,
        Some((None, _)) => false,
        None => true,
    };
    let ready = store_ok && disk_ok;
    let mut body = json!({
        "ready": ready,
        "model": r.model,
        "engine": r.engine,
        "dicom": r.dicom_addr.to_string(),
        "store": if store_ok { "ok" } else { "error" },
    });
    if let Some((usage, hw)) = disk {
        body["disk"] = json!({
            "ok": disk_ok,
            "used_percent": usage.map(|(u, _)| (u * 1000.0).round() / 10.0),
            "high_water_percent": hw,
        });
    }
    (if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}

/// Binds `bind` and serves until `shutdown` turns true; returns the bound address.
pub async fn start(
    bind: &str,
    readiness: Readiness,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let dashboard = readiness.dashboard.clone();
    let mut app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Arc::new(readiness));
    if let Some(d) = dashboard {
        use crate::dashboard as dash;
        let token = Arc::new(d.token.clone());
        let routes = Router::new()
            .route("/", get(dash::index))
            .route("/api/series", get(dash::list))
            .route("/api/events", get(dash::events))
            .route("/api/series/{uid}", get(dash::series))
            .route("/api/series/{uid}/key.png", get(dash::key_png))
            .route("/api/outputs", get(dash::outputs))
            .with_state(d);
        app = app.merge(routes).layer(axum::middleware::from_fn_with_state(token, dash::require_token));
    }
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
