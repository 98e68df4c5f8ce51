//! hil::listener — the harness's webhook receiver: a real HTTP server the appliance's `alerts.webhook_url` points
//! at. Every POST (any path) is recorded with its arrival time, dedup key, signature check and JSON body, and
//! answered 200 (a 4xx would only make the appliance retry the same bytes).
//! Never: judges alerts (the run does) or forwards them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use axum::http::HeaderMap;
use axum::Router;

use crate::notify::{signature, DEDUP_HEADER, SIGNATURE_HEADER};

/// One POST the listener got.
#[derive(Debug, Clone)]
pub struct Alert {
    /// When it arrived.
    pub at: Instant,
    /// `X-Lungsentry-Dedup-Key`.
    pub dedup_key: String,
    /// With a secret configured: whether `X-Lungsentry-Signature` matched the body.
    pub signature_ok: Option<bool>,
    /// The body as JSON (None when it was not JSON).
    pub body: Option<serde_json::Value>,
    /// The raw body.
    pub raw: String,
}

impl Alert {
    /// The series the alert is about (`series_instance_uid` of the body).
    pub fn series_uid(&self) -> Option<&str> {
        self.body.as_ref()?.get("series_instance_uid")?.as_str()
    }
}

/// Everything received so far (shared with the server task).
#[derive(Clone, Default)]
pub struct Alerts(Arc<Mutex<Vec<Alert>>>);

impl Alerts {
    /// The alerts about `series_uid`, in arrival order.
    pub fn for_series(&self, series_uid: &str) -> Vec<Alert> {
        self.0.lock().unwrap().iter().filter(|a| a.series_uid() == Some(series_uid)).cloned().collect()
    }

    /// Every alert, in arrival order.
    pub fn all(&self) -> Vec<Alert> {
        self.0.lock().unwrap().clone()
    }
}

/// Binds `addr` and serves until the returned task is aborted.
pub async fn start(addr: &str, secret: Option<Vec<u8>>) -> Result<(SocketAddr, Alerts, tokio::task::JoinHandle<()>)> {
    let alerts = Alerts::default();
    let store = alerts.clone();
    let secret = Arc::new(secret);
    let app = Router::new().fallback(move |headers: HeaderMap, body: String| {
        let (store, secret) = (store.clone(), secret.clone());
        async move {
            let at = Instant::now();
            let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let signature_ok =
                secret.as_ref().as_ref().map(|s| header(SIGNATURE_HEADER) == signature(s, body.as_bytes()));
            let alert = Alert {
                at,
                dedup_key: header(DEDUP_HEADER),
                signature_ok,
                body: serde_json::from_str(&body).ok(),
                raw: body,
            };
            store.0.lock().unwrap().push(alert);
            "ok\n"
        }
    });
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the webhook listener {addr}"))?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "hil: webhook listener stopped");
        }
    });
    Ok((bound, alerts, task))
}
