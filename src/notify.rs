//! notify — tells people about results: the webhook outbox worker and the one-line-per-series log record.
//!
//! Owns: the webhook side of the store's `outbox` (POST each payload to `alerts.webhook_url`, HMAC-signed when a
//! secret is set; the shared outbox loop, [`crate::delivery`], retries it with exponential back-off until a 2xx —
//! across restarts, because the row lives in SQLite until delivered) and the structured log line for every
//! analysed series (positives at WARN → journald PRIORITY=4, negatives at INFO).
//! Hands on: nothing; it is the end of the pipeline.
//! Never: decides what deserves an alert (the caller of [`crate::store::Store::record_result`] does, through its
//! `alert` flag), rewrites payloads (except, where a site sets `alerts.include_patient_identifiers`, adding the
//! patient's name, ID and accession number to the body as it is sent), or logs PatientName/PatientID/accession
//! (only the pseudonymous `patient_key` and a hash of the Series Instance UID).
//!
//! Receivers see at-least-once delivery: a crash between the receiver's 2xx and our `mark_delivered` repeats the
//! POST. Every request carries `X-Lungsentry-Dedup-Key` (also `dedup_key` in the body) to deduplicate on.

use std::sync::Arc;
use std::time::Duration;

use hmac::{KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::watch;

use crate::config::AlertsConfig;
use crate::delivery::{Failure, Outcome};
use crate::result::SeriesResult;
use crate::store::{series_log_key, OutboxRow, Store};

/// Header carrying the row's dedup key.
pub const DEDUP_HEADER: &str = "X-Lungsentry-Dedup-Key";
/// Header carrying `sha256=<hex HMAC-SHA256(webhook_secret, body)>` when a secret is configured.
pub const SIGNATURE_HEADER: &str = "X-Lungsentry-Signature";
/// Per-request timeout (connect + send + response).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Rows fetched per round.
const BATCH: usize = 32;

/// `sha256=<hex HMAC-SHA256(secret, body)>`, the value of [`SIGNATURE_HEADER`].
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The webhook outbox worker: delivers due rows until `shutdown` turns true (or its sender is dropped), through
/// the shared outbox loop ([`crate::delivery::run`]: exponential back-off, retried until a 2xx; never parked).
///
/// Wakes when [`Store::outbox_wake`] is signalled (every `record_result` with `alert`), when the earliest
/// retry falls due, or every 30 s. Without `webhook_url` it delivers nothing and waits for shutdown (rows queued
/// anyway stay pending and go out once a URL is configured). A shutdown during a request abandons it; the row
/// stays undelivered and is sent again after the restart.
pub async fn run_webhook_outbox(store: Arc<Store>, cfg: AlertsConfig, mut shutdown: watch::Receiver<bool>) {
    let Some(url) = cfg.webhook_url.clone() else {
        tracing::info!("notify: no alerts.webhook_url configured; webhook outbox idle");
        let _ = shutdown.wait_for(|stop| *stop).await;
        return;
    };
    let client = match reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "notify: cannot build the HTTP client; webhook outbox stopped");
            let _ = shutdown.wait_for(|stop| *stop).await;
            return;
        }
    };
    let secret = cfg.webhook_secret.clone().map(String::into_bytes);
    tracing::info!(signed = secret.is_some(), "notify: webhook outbox running");
    let outbox = Webhook { store, client, url, secret, include_patient_identifiers: cfg.include_patient_identifiers };
    crate::delivery::run(Arc::new(outbox), shutdown).await
}

/// The webhook outbox as the shared loop sees it: the store's `outbox` rows, one POST per row.
struct Webhook {
    /// Holds the rows (and the patient identifiers a site may add to the body).
    store: Arc<Store>,
    /// Built once, with [`REQUEST_TIMEOUT`].
    client: reqwest::Client,
    /// `alerts.webhook_url`.
    url: String,
    /// `alerts.webhook_secret`: each body is signed with it when set.
    secret: Option<Vec<u8>>,
    /// `alerts.include_patient_identifiers`.
    include_patient_identifiers: bool,
}

impl crate::delivery::Outbox for Webhook {
    type Row = OutboxRow;
    const NAME: &'static str = "notify: webhook outbox";
    const BATCH: usize = BATCH;

    fn id(row: &OutboxRow) -> i64 {
        row.id
    }

    fn attempts(row: &OutboxRow) -> u32 {
        row.attempts
    }

    /// None: a webhook row is retried until a 2xx.
    fn max_attempts(&self) -> Option<u32> {
        None
    }

    fn wake(&self) -> &tokio::sync::Notify {
        self.store.outbox_wake()
    }

    fn due(&self, now_ms: i64, limit: usize) -> crate::store::Result<Vec<OutboxRow>> {
        self.store.due_outbox(now_ms, limit)
    }

    fn next_due(&self) -> crate::store::Result<Option<i64>> {
        self.store.next_outbox_due()
    }

    fn mark_delivered(&self, row: &OutboxRow, _status: u16) -> crate::store::Result<()> {
        self.store.mark_delivered(row.id).map(|_| ())
    }

    /// `next_attempt_at` is never None here (no `max_attempts`, and every failure may be retried); the table has no
    /// parked state, so a None would leave the row waiting for good.
    fn mark_failed(
        &self,
        row: &OutboxRow,
        _status: Option<u16>,
        error: &str,
        next_attempt_at: Option<i64>,
    ) -> crate::store::Result<()> {
        self.store.mark_attempt_failed(row.id, error, next_attempt_at.unwrap_or(i64::MAX))
    }

    async fn attempt(&self, rows: Vec<OutboxRow>) -> Vec<(OutboxRow, Outcome)> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let body = if self.include_patient_identifiers {
                let (store, payload) = (self.store.clone(), row.payload_json.clone());
                blocking(move || Ok(with_patient_identifiers(&store, &payload)))
                    .await
                    .unwrap_or(row.payload_json.clone())
            } else {
                row.payload_json.clone()
            };
            let outcome = match deliver(&self.client, &self.url, self.secret.as_deref(), &row, body).await {
                Ok(status) => Outcome::Delivered(status),
                Err(error) => Outcome::Failed { status: None, error, retry: true },
            };
            out.push((row, outcome));
        }
        out
    }

    fn delivered(&self, row: &OutboxRow, status: u16) {
        crate::metrics::metrics().alert(true);
        tracing::info!(outbox_id = row.id, series = %series_key_of(&row.dedup_key), status, attempts = row.attempts + 1,
            "notify: webhook delivered");
    }

    fn failed(&self, row: &OutboxRow, f: &Failure<'_>) {
        crate::metrics::metrics().alert(false);
        tracing::warn!(outbox_id = row.id, series = %series_key_of(&row.dedup_key), attempts = f.attempts,
            retry_in_s = f.retry_in.map_or(0, |d| d.as_secs()), error = %f.error, "notify: webhook delivery failed");
    }
}

/// Runs a store call on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::store::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    Ok(tokio::task::spawn_blocking(f).await.map_err(|e| anyhow::anyhow!("store task failed: {e}"))??)
}

/// The webhook body with the patient's identifiers added (`alerts.include_patient_identifiers`):
/// `patient_name`, `patient_id` and `accession_number` of the body's `series_instance_uid`, from the local store.
/// The outbox row itself never holds them. A body that does not parse, or names an unknown series, is sent as it
/// is (with a warning that names no identifier).
pub fn with_patient_identifiers(store: &Store, payload_json: &str) -> String {
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(payload_json) else { return payload_json.to_string() };
    let series = v["series_instance_uid"].as_str().unwrap_or("").to_string();
    match store.patient_display(&series) {
        Ok(Some(p)) if v.is_object() => {
            v["patient_name"] = serde_json::json!(p.patient_name);
            v["patient_id"] = serde_json::json!(p.patient_id);
            v["accession_number"] = serde_json::json!(p.accession_number);
            v.to_string()
        }
        other => {
            let error = match other {
                Err(e) => format!("{e:#}"),
                _ => "unknown series".to_string(),
            };
            tracing::warn!(series = %series_log_key(&series), error = %error,
                "notify: patient identifiers not added to the webhook body");
            payload_json.to_string()
        }
    }
}

/// One POST of `body` (the row's payload, or it with identifiers added). Ok(status) on 2xx; Err(description)
/// otherwise (kept in `outbox.last_error`).
async fn deliver(
    client: &reqwest::Client,
    url: &str,
    secret: Option<&[u8]>,
    row: &OutboxRow,
    body: String,
) -> Result<u16, String> {
    let mut req = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(DEDUP_HEADER, row.dedup_key.as_str());
    if let Some(secret) = secret {
        req = req.header(SIGNATURE_HEADER, signature(secret, body.as_bytes()));
    }
    let mut resp = req.body(body).send().await.map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status();
    if status.is_success() {
        Ok(status.as_u16())
    } else {
        // At most MAX_ERROR_BODY bytes of the refusal are read; the rest is dropped with the connection.
        let mut body = Vec::new();
        while body.len() < MAX_ERROR_BODY {
            match resp.chunk().await {
                Ok(Some(c)) => body.extend_from_slice(&c[..c.len().min(MAX_ERROR_BODY - body.len())]),
                _ => break,
            }
        }
        let snippet: String = String::from_utf8_lossy(&body).chars().take(200).collect();
        Err(format!("HTTP {status}: {snippet}"))
    }
}

/// Most bytes of a webhook's error response body that are read (its first 200 characters go into
/// `outbox.last_error`); a receiver answering an endless or huge body costs no more memory than this.
pub const MAX_ERROR_BODY: usize = 4 << 10;

/// A dedup key as it may be logged: the series UIDs in it (`"{series_uid}/v{n}"`, or a backward follow-up link's
/// `"{series_uid}/v{n}/prior/{prior_series_uid}"`) as hashes.
fn series_key_of(dedup_key: &str) -> String {
    let (key, prior) = match dedup_key.split_once("/prior/") {
        Some((k, p)) => (k, Some(p)),
        None => (dedup_key, None),
    };
    let mut out = match key.rsplit_once("/v") {
        Some((series, v)) => format!("{}/v{v}", series_log_key(series)),
        None => series_log_key(key),
    };
    if let Some(p) = prior {
        out.push_str("/prior/");
        out.push_str(&series_log_key(p));
    }
    out
}

/// One log line per analysed series, with structured fields picked from the result: hashed series key
/// (`series`), `patient_key`, `stage = "result"`, `positive`, `involvement_percent` (NaN when not analysed),
/// `lesions`, `version`, and the timings in milliseconds (`decode_ms`, `infer_ms`, `analysis_ms`, `total_ms`) —
/// each a journald field (`SERIES=`, `DECODE_MS=`, …). Positives at WARN (journald PRIORITY=4), negatives and
/// skipped series at INFO. A result has no field for raw identifiers, so none can reach the log.
pub fn log_result(result: &SeriesResult) {
    let series = Some(result.series_instance_uid.as_str())
        .filter(|s| !s.is_empty())
        .map(series_log_key)
        .unwrap_or_else(|| "-".into());
    let patient = Some(result.patient_key.as_str()).filter(|p| !p.is_empty()).unwrap_or("-").to_string();
    let positive = result.positive;
    let involvement = result.figures.as_ref().map_or(f64::NAN, |f| f.involvement_percent);
    let version = result.version.unwrap_or(0);
    let status = if result.is_analysed() { "analysed" } else { "skipped" };
    let lesions = result.lesions().len() as u64;
    let t = &result.timings_ms;
    let (decode_ms, infer_ms, analysis_ms, total_ms) = (t.decode, t.infer, t.analysis, t.total);
    if positive {
        tracing::warn!(series = %series, patient_key = %patient, stage = "result", status = %status, positive,
            involvement_percent = involvement, lesions, version, decode_ms, infer_ms, analysis_ms, total_ms,
            "series analysed: POSITIVE (involvement {involvement:.2} %)");
    } else {
        tracing::info!(series = %series, patient_key = %patient, stage = "result", status = %status, positive,
            involvement_percent = involvement, lesions, version, decode_ms, infer_ms, analysis_ms, total_ms,
            "series analysed: {} (involvement {involvement:.2} %)", if status == "skipped" { "skipped" } else { "negative" });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_keys_are_logged_with_series_uids_hashed() {
        let (a, b) = ("1.2.826.0.1.3680043.2.1", "1.2.826.0.1.3680043.2.2");
        assert_eq!(series_key_of(&format!("{a}/v3")), format!("{}/v3", series_log_key(a)));
        let link = series_key_of(&format!("{a}/v1/prior/{b}"));
        assert_eq!(link, format!("{}/v1/prior/{}", series_log_key(a), series_log_key(b)));
        assert!(!link.contains(a) && !link.contains(b));
    }
}
