//! dashboard — the technologists' live view, served by `http`: one embedded HTML/CSS/JS page (no build step), a
//! JSON list of recent series, a server-sent-events stream that pushes that list whenever it changes, the latest
//! result of a series (lesion table, timings) and its key image as PNG; plus the token check every route except
//! `/healthz` goes through.
//!
//! Owns: the list rows (state, slices so far, flag, involvement, lesion count, last slice → result seconds, DICOM
//! outputs parked), the series detail (latest result — regional involvement, severity score, follow-up — and the
//! series' DICOM outputs with their delivery state), the DICOM outputs summary (`/api/outputs`: outbox counts and
//! every parked object, with the refusal), the
//! SSE live view (`live`: one snapshot per database change shared by every client, a cap on clients), the
//! key-image PNG
//! files (`data_dir/keyimages/`, written by the pipeline through [`write_key_png`]), and the token
//! (`[http] token`, else a random one kept in `data_dir/http-token`, mode 0600).
//! Every route reads through the read-only connections of [`ReadPool`] on the blocking pool, never the writer's.
//! Rows and the detail name the patient (`patient`: name, ID, accession number, study date and time, series number
//! and description, from the local store; the page is behind the token) and link a reconstruction whose study
//! alerted through another series to it (`study_alert_series_instance_uid`).
//! Never: accepts writes, or logs the patient's identifiers.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use serde_json::{json, Value};

use crate::outputs::SourceSlice;
use crate::result::SeriesResult;
use crate::store::ReadPool;
use crate::store::{DicomOutboxEntry, Store};

pub mod live;

/// The page.
const INDEX_HTML: &str = include_str!("index.html");
/// Rows in the list.
const LIST_LIMIT: usize = 50;

/// What the dashboard routes read.
pub struct DashboardState {
    /// Read-only connections to the results and series (never the writer's, see `store::read`).
    pub readers: Arc<ReadPool>,
    /// The shared live view behind `/api/events`.
    pub live: Arc<live::LiveView>,
    /// Where key-image PNGs live.
    pub data_dir: PathBuf,
    /// The access token.
    pub token: String,
    /// Seconds of segmentation queued (None outside the daemon; the pipeline's backlog answers it): what the next
    /// alert waits behind.
    pub backlog_seconds: Option<Arc<dyn Fn() -> f64 + Send + Sync>>,
}

/// The token: `configured`, else the one in `data_dir/http-token`, created (random, 0600) on first use.
pub fn load_or_create_token(configured: Option<&str>, data_dir: &Path) -> anyhow::Result<String> {
    if let Some(t) = configured {
        return Ok(t.to_string());
    }
    let path = crate::datadir::DataDir::new(data_dir).token_file();
    if let Ok(t) = std::fs::read_to_string(&path) {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))?;
    let token = hex::encode(bytes);
    let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&path)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    Ok(token)
}

/// Constant-time comparison.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware: every path except `/healthz` needs the token, as `Authorization: Bearer <token>`, a
/// `lungsentry_token` cookie (set by the page), or `?token=` (for the first page load, `EventSource` and images).
pub async fn require_token(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let cookie = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.split(';').find_map(|kv| kv.trim().strip_prefix("lungsentry_token=").map(str::to_string)));
    let query =
        req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=").map(str::to_string)));
    if [bearer, cookie, query].iter().flatten().any(|t| same(t, &token)) {
        next.run(req).await
    } else {
        (StatusCode::UNAUTHORIZED, "token required: Authorization: Bearer <token> or ?token=<token>\n").into_response()
    }
}

/// `GET /[?series=UID]`: the page, with the list, the outputs summary and (with `series`) that series' detail as of
/// now embedded as JSON (`</` escaped), so the first view needs no further request.
pub async fn index(
    State(st): State<Arc<DashboardState>>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let readers = st.readers.clone();
    let series = q.get("series").cloned();
    let initial = tokio::task::spawn_blocking(move || -> anyhow::Result<Value> {
        let store = readers.get();
        let detail = match &series {
            Some(uid) => detail(&store, uid)?,
            None => None,
        };
        Ok(json!({ "series": rows(&store)?, "outputs": outputs_summary(&store)?, "detail": detail }))
    })
    .await;
    match initial {
        Ok(Ok(v)) => {
            let embedded = v.to_string().replace("</", "<\\/");
            Html(INDEX_HTML.replacen("null /*INITIAL*/", &embedded, 1)).into_response()
        }
        Ok(Err(e)) => internal(format!("{e:#}")),
        Err(e) => internal(e),
    }
}

/// The list rows, newest first.
fn rows(store: &Store) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    let parked = store.parked_dicom_outputs_by_series()?;
    for s in store.recent_series(LIST_LIMIT)? {
        // The stored result read back typed (store boundary); a row shows without one it cannot read.
        let r = store.latest_result(&s.series_instance_uid)?.and_then(|r| SeriesResult::from_json(r.result).ok());
        let lesions = r.as_ref().and_then(|r| r.figures.as_ref()).map(|f| f.lesions.len());
        let flag_s = r
            .as_ref()
            .and_then(|r| crate::clock::parse_rfc3339_ms(&r.completed_at))
            .map(|done| ((done - s.last_instance_at) as f64 / 1000.0).max(0.0));
        let study_alert = r.as_ref().and_then(|r| r.study_alert.as_ref()).map(|a| a.series_instance_uid.as_str());
        out.push(json!({
            "series_instance_uid": s.series_instance_uid,
            "study_instance_uid": s.study_instance_uid,
            "patient_key": s.patient_key,
            "state": s.state,
            "reason": s.state_reason,
            "n_slices": s.n_instances,
            "version": s.latest_version,
            "positive": s.latest_positive,
            "involvement_percent": s.latest_involvement_percent,
            "lesion_count": lesions,
            "last_slice_to_flag_s": flag_s,
            "parked_outputs": parked.get(&s.series_instance_uid).copied().unwrap_or(0),
            "updated_at": s.updated_at,
            "patient": store.patient_display(&s.series_instance_uid)?,
            "study_alert_series_instance_uid": study_alert,
        }));
    }
    Ok(out)
}

fn internal(e: impl std::fmt::Display) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
}

/// `GET /api/series`: the list.
pub async fn list(State(st): State<Arc<DashboardState>>) -> Response {
    let readers = st.readers.clone();
    match tokio::task::spawn_blocking(move || rows(&readers.get())).await {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(e)) => internal(format!("{e:#}")),
        Err(e) => internal(e),
    }
}

/// `GET /api/events`: SSE, event `series` with the whole list, sent at once and whenever it changes (the shared
/// snapshot of [`live`]). Past `http.max_sse_clients` streams at once: 503 with the reason.
pub async fn events(State(st): State<Arc<DashboardState>>) -> Response {
    let (slot, snapshot) = match st.live.join() {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(stage = "dashboard", max_sse_clients = e.max, "live-view client refused: limit reached");
            return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "30")], format!("{e}\n")).into_response();
        }
    };
    // The slot lives as long as the stream: dropped (and freed) when the client goes.
    let stream = futures_util::stream::unfold((slot, snapshot, true), |(slot, mut snapshot, first)| async move {
        let ready =
            if first { snapshot.wait_for(|t| !t.is_empty()).await.is_ok() } else { snapshot.changed().await.is_ok() };
        if !ready {
            return None; // the daemon is stopping
        }
        let text = snapshot.borrow_and_update().clone();
        Some((Ok::<_, Infallible>(Event::default().event("series").data(&*text)), (slot, snapshot, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// One DICOM outbox row as the dashboard shows it.
fn output_json(entry: &DicomOutboxEntry) -> Value {
    let DicomOutboxEntry { row: r, delivered, parked, last_status: status, last_error: error } = entry;
    let state = match (delivered, parked) {
        (true, _) => "delivered",
        (_, true) => "parked",
        _ if r.attempts > 0 => "failing",
        _ => "pending",
    };
    json!({
        "series_instance_uid": r.series_instance_uid,
        "result_version": r.result_version,
        "destination": r.destination,
        "kind": r.kind,
        "sop_instance_uid": r.sop_instance_uid,
        "state": state,
        "attempts": r.attempts,
        "last_status": status.map(|s| format!("{s:#06X}")),
        "last_error": error,
    })
}

/// The latest result JSON of a series with its `version` and `dicom_outputs` (None: no result yet).
fn detail(store: &Store, uid: &str) -> anyhow::Result<Option<Value>> {
    let Some(r) = store.latest_result(uid)? else { return Ok(None) };
    // The stored result read back typed (store boundary), served as its JSON.
    let mut v = SeriesResult::from_json(r.result)?.to_json();
    v["version"] = json!(r.version);
    v["patient"] = json!(store.patient_display(uid)?);
    // Amended SRs (a prior study linked after this series was analysed) by their derived SOP Instance UID.
    let amended: std::collections::HashMap<String, String> = store
        .follow_up_links(uid)?
        .into_iter()
        .map(|l| {
            (
                crate::outputs::outbox::amended_sr_uid(uid, l.result_version, &l.prior_series_instance_uid),
                l.prior_series_instance_uid,
            )
        })
        .collect();
    let outputs = store.dicom_outbox_of_series(uid)?;
    v["dicom_outputs"] = Value::Array(
        outputs
            .iter()
            .map(|row| {
                let mut o = output_json(row);
                if let Some(prior) = amended.get(&row.row.sop_instance_uid) {
                    o["amends_for_prior_series_instance_uid"] = json!(prior);
                }
                o
            })
            .collect(),
    );
    Ok(Some(v))
}

/// DICOM outbox counts and the most recently parked objects.
fn outputs_summary(store: &Store) -> anyhow::Result<Value> {
    let counts = store.dicom_outbox_counts()?;
    let parked = store.parked_dicom_outputs(200)?;
    Ok(json!({ "counts": counts, "parked": parked.iter().map(output_json).collect::<Vec<_>>() }))
}

/// `GET /api/series/{uid}`: the latest result JSON (it holds `patient_key`, never raw identifiers), plus `patient`
/// (the patient's name, ID, accession number and the series' labels, from the local store) and
/// `dicom_outputs`: the series' outbox rows with their state (delivered, pending, failing, parked).
pub async fn series(State(st): State<Arc<DashboardState>>, UrlPath(uid): UrlPath<String>) -> Response {
    let readers = st.readers.clone();
    match tokio::task::spawn_blocking(move || detail(&readers.get(), &uid)).await {
        Ok(Ok(Some(v))) => axum::Json(v).into_response(),
        Ok(Ok(None)) => (StatusCode::NOT_FOUND, "no result for this series\n").into_response(),
        Ok(Err(e)) => internal(format!("{e:#}")),
        Err(e) => internal(e),
    }
}

/// `GET /api/outputs`: DICOM outbox counts by state and every parked object (newest first, at most 200), each
/// with its destination, kind, series and the refusal that parked it.
pub async fn outputs(State(st): State<Arc<DashboardState>>) -> Response {
    let readers = st.readers.clone();
    match tokio::task::spawn_blocking(move || outputs_summary(&readers.get())).await {
        Ok(Ok(mut v)) => {
            // Issue 24: the latency a slow engine adds to the next alert (responses are never held past
            // engine.max_response_hold_s, so the backlog grows instead).
            v["backlog_seconds"] = json!(st.backlog_seconds.as_ref().map(|seconds| seconds()));
            axum::Json(v).into_response()
        }
        Ok(Err(e)) => internal(format!("{e:#}")),
        Err(e) => internal(e),
    }
}

/// `GET /api/series/{uid}/key.png`: the key image of the latest result.
pub async fn key_png(State(st): State<Arc<DashboardState>>, UrlPath(uid): UrlPath<String>) -> Response {
    match tokio::fs::read(key_png_path(&st.data_dir, &uid)).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, "image/png")], bytes).into_response(),
        Err(_) => (StatusCode::NOT_FOUND, "no key image for this series\n").into_response(),
    }
}

/// Where the key PNG of a series lives ([`crate::datadir::DataDir::key_image_of`]: a value that is not a UID,
/// such as a URL segment, only ever names a hash).
pub fn key_png_path(data_dir: &Path, series_uid: &str) -> PathBuf {
    crate::datadir::DataDir::new(data_dir).key_image_of(series_uid)
}

/// Renders the key image of a result (its most involved slice; the slice with the most lung when there is no
/// lesion) and writes it for the dashboard (temp file + rename). Nothing for an unanalysed series.
pub fn write_key_png(data_dir: &Path, result: &SeriesResult, slices: &[SourceSlice]) -> anyhow::Result<()> {
    use anyhow::Context;
    let series = result.series_instance_uid.as_str();
    if series.is_empty() || !result.is_analysed() || slices.is_empty() {
        return Ok(());
    }
    let i = crate::outputs::keyimage::most_involved(slices, 1)
        .first()
        .copied()
        .unwrap_or_else(|| (0..slices.len()).max_by_key(|&i| slices[i].lung.count()).unwrap_or(0));
    let s = &slices[i];
    let obj = crate::spool::read_instance(&s.path)?;
    let frame = s.frame.map(|f| f as usize - 1).unwrap_or(0);
    let hu = crate::decode::decode_hu_frames(&obj)?.into_iter().nth(frame).context("no such frame")?;
    let ps = s.meta.pixel_spacing.unwrap_or([1.0, 1.0]);
    let caption =
        crate::outputs::keyimage::caption(result, i, slices.len(), s.lesion.count() as f64 * ps[0] * ps[1] / 100.0);
    let img = crate::outputs::keyimage::render(&hu, &s.lesion, &crate::outputs::keyimage::banner(), &caption);
    let png = img.to_png()?;
    let path = key_png_path(data_dir, series);
    std::fs::create_dir_all(path.parent().unwrap())?;
    let tmp = path.with_extension("png.tmp");
    std::fs::write(&tmp, png)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}
