//! hil — the hardware-in-the-loop harness (`lungsentry hil`): replays a manifest of series (phantoms with truth,
//! real DICOM) to an appliance at scanner pace, captures its webhook alerts and results, and writes
//! `report.json` + `report.md` (per-series correctness, last-slice → alert and → result latency p50/p95/max,
//! failures, thresholds). Exits non-zero when a manifest threshold is missed.
//!
//! Owns: the run — C-ECHO the target, read `/readyz` through the appliance API, prepare every entry
//! ([`prepare`]), then per entry: send it with [`crate::scu::send_files`] at the entry's rate, wait (up to its
//! timeout from the last acknowledged slice) for each of its series' complete result in the API
//! (`GET /api/series/{uid}` with the token) and, when positive, its alert at the harness's own webhook listener
//! ([`listener`]); judge ([`report`]) and write the reports. A series whose every instance the appliance refused
//! (failure status per instance, e.g. blank Type 1 UIDs) has nothing to wait for: the API is asked once, so a
//! result that exists anyway is reported.
//! The appliance's webhook only carries positives, so the API is how the harness knows a negative or skipped
//! series was analysed; both work the same against a local `serve` and a remote appliance.
//! Never: configures the appliance (its `alerts.webhook_url` must point at `--listen`) or sends the source files
//! themselves (always re-identified copies, see [`prepare`]).

pub mod listener;
pub mod manifest;
pub mod prepare;
pub mod report;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::scu::{Peer, SendOptions};
use manifest::{Entry, Manifest};
use report::{Expected, Row};

/// `lungsentry hil` options.
#[derive(clap::Args, Debug, Clone)]
pub struct HilArgs {
    /// The manifest (TOML): series, rates, timeouts, thresholds (see tests/hil/README.md).
    #[arg(long)]
    pub manifest: PathBuf,
    /// Appliance DICOM host.
    #[arg(long)]
    pub host: String,
    /// Appliance DICOM port.
    #[arg(long)]
    pub port: u16,
    /// Called AE title.
    #[arg(long, default_value = "LUNGSENTRY")]
    pub called_ae: String,
    /// Calling AE title (must be allowed by the appliance's `dicom.allowed_peers`, if it has any).
    #[arg(long, default_value = "LUNGSENTRY-HIL")]
    pub calling_ae: String,
    /// Where the harness's webhook listener binds; the appliance's `alerts.webhook_url` must reach it.
    #[arg(long, default_value = "0.0.0.0:9099")]
    pub listen: String,
    /// The appliance's `alerts.webhook_secret`, to verify each alert's signature (else `LUNGSENTRY_WEBHOOK_SECRET`;
    /// unchecked when neither is set).
    #[arg(long)]
    pub webhook_secret: Option<String>,
    /// Base URL of the appliance's HTTP API (its `http.bind`), e.g. http://10.0.0.5:8080.
    #[arg(long)]
    pub api: String,
    /// API token (`http.token`, or the appliance's `data_dir/http-token`); else `LUNGSENTRY_API_TOKEN`.
    #[arg(long, conflicts_with = "api_token_file")]
    pub api_token: Option<String>,
    /// File holding the API token.
    #[arg(long)]
    pub api_token_file: Option<PathBuf>,
    /// Root of real DICOM entries (else `LUNGSENTRY_DATA`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output folder (created): report.json, report.md, and the prepared series while the run lasts.
    #[arg(long)]
    pub out: PathBuf,
    /// Keep the prepared (re-identified) series under OUT/series after the run.
    #[arg(long)]
    pub keep_series: bool,
    /// Seconds to wait for the peer on each DICOM step (connect, association, each response).
    #[arg(long, default_value_t = 30.0)]
    pub dimse_timeout: f64,
}

/// How often the API is asked for a result while waiting.
const POLL: Duration = Duration::from_millis(100);
/// Pause after the last series before the final look at the alerts (late duplicates, alerts for negatives).
const SETTLE: Duration = Duration::from_secs(1);

/// The appliance's HTTP API, read-only.
struct Api {
    base: String,
    token: String,
    client: reqwest::Client,
}

impl Api {
    async fn get(&self, path: &str) -> Result<(u16, String)> {
        let url = format!("{}{path}", self.base);
        let resp = self.client.get(&url).bearer_auth(&self.token).send().await.with_context(|| format!("GET {url}"))?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await.unwrap_or_default()))
    }

    /// `/readyz` (model, engine, readiness).
    async fn readyz(&self) -> Result<Value> {
        let (status, text) = self.get("/readyz").await?;
        if status == 401 {
            bail!("the appliance API refused the token (401)");
        }
        serde_json::from_str(&text).with_context(|| format!("/readyz answered {status}: {text}"))
    }

    /// The latest result of a series; None while there is none (404).
    async fn result(&self, series_uid: &str) -> Result<Option<Value>> {
        let (status, text) = self.get(&format!("/api/series/{series_uid}")).await?;
        match status {
            200 => Ok(Some(serde_json::from_str(&text).context("result JSON")?)),
            404 => Ok(None),
            s => bail!("/api/series answered {s}: {}", text.trim()),
        }
    }
}

/// `lungsentry hil`: runs the manifest, writes the reports, errors when a threshold is missed.
pub async fn run(args: HilArgs) -> Result<()> {
    let manifest = Manifest::load(&args.manifest)?;
    let token = match (&args.api_token, &args.api_token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?.trim().into()
        }
        (None, None) => std::env::var("LUNGSENTRY_API_TOKEN")
            .context("give --api-token, --api-token-file or LUNGSENTRY_API_TOKEN (the appliance's http token)")?,
    };
    let secret = args.webhook_secret.clone().or_else(|| std::env::var("LUNGSENTRY_WEBHOOK_SECRET").ok());
    let data = args.data.clone().or_else(|| std::env::var_os("LUNGSENTRY_DATA").map(PathBuf::from));
    let api = Api {
        base: args.api.trim_end_matches('/').to_string(),
        token,
        client: reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?,
    };
    let peer = Peer {
        host: args.host.clone(),
        port: args.port,
        called_ae: args.called_ae.clone(),
        calling_ae: args.calling_ae.clone(),
        timeout: Duration::from_secs_f64(args.dimse_timeout.max(0.1)),
    };

    let readyz = api.readyz().await.context("asking the appliance API for /readyz")?;
    crate::scu::echo_peer(&peer)
        .await
        .with_context(|| format!("C-ECHO to {}:{} ({})", peer.host, peer.port, peer.called_ae))?;
    let (bound, alerts, listener_task) = listener::start(&args.listen, secret.map(String::into_bytes)).await?;
    println!(
        "hil: target {}:{} AE {}, API {}, webhook listener on {bound}",
        peer.host, peer.port, peer.called_ae, api.base
    );

    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let run_id = run_id();
    let work = args.out.join("series");
    let _ = std::fs::remove_dir_all(&work);
    let reid = prepare::Reidentify::new(&run_id);
    let mut prepared = Vec::new();
    for e in &manifest.series {
        let p = prepare::prepare(e, data.as_deref(), &work.join(&e.name), &reid)?;
        println!("hil: prepared {} ({} files, {} series)", e.name, p.files.len(), p.series.len());
        prepared.push(p);
    }

    let started_at = crate::clock::now_rfc3339();
    let mut rows = Vec::new();
    for (i, (entry, p)) in manifest.series.iter().zip(&prepared).enumerate() {
        if i > 0 && manifest.gap_s > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(manifest.gap_s)).await;
        }
        let mut entry_rows = replay(entry, p, &manifest, &peer, &api, &alerts).await;
        for r in entry_rows.iter_mut() {
            r.judge(); // provisional: judged again after the last look at the alerts
            println!(
                "hil: {} {}: {}",
                r.entry,
                r.series_instance_uid,
                if r.correct() { "correct".to_string() } else { r.failures.join("; ") }
            );
        }
        rows.extend(entry_rows);
    }
    tokio::time::sleep(SETTLE).await;
    // A last look at the alerts: late duplicates and alerts for results judged negative count too.
    for (r, p) in rows.iter_mut().zip(prepared.iter().flat_map(|p| p.series.iter().map(move |_| p))) {
        tally_alerts(r, &alerts, &p.patient_identifiers, None);
        r.judge();
    }
    listener_task.abort();
    let ours: Vec<&str> = rows.iter().map(|r| r.series_instance_uid.as_str()).collect();
    let unmatched = alerts.all().iter().filter(|a| !a.series_uid().is_some_and(|u| ours.contains(&u))).count();

    let summary = report::summarise(&rows, unmatched);
    let checks = report::check(&manifest.thresholds, &summary);
    let header = json!({
        "run_id": run_id,
        "started_at": started_at,
        "harness_version": env!("CARGO_PKG_VERSION"),
        "manifest": args.manifest.display().to_string(),
        "target": {"host": peer.host, "port": peer.port, "called_ae": peer.called_ae, "calling_ae": peer.calling_ae,
                   "api": api.base, "webhook_listener": bound.to_string(), "readyz": readyz},
        "rate": manifest.rate,
        "timeout_s": manifest.timeout_s,
    });
    let json_path = args.out.join("report.json");
    let md_path = args.out.join("report.md");
    let json_text = serde_json::to_string_pretty(&report::to_json(&header, &rows, &summary, &checks))?;
    std::fs::write(&json_path, json_text + "\n").with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&md_path, report::to_markdown(&header, &rows, &summary, &checks))
        .with_context(|| format!("writing {}", md_path.display()))?;
    if !args.keep_series {
        let _ = std::fs::remove_dir_all(&work);
    }
    let s = &summary;
    println!(
        "hil: {} of {} series correct; last slice → alert p50 {} p95 {} max {} s (n={}); → result p50 {} p95 {} max {} s",
        s.correct,
        s.series,
        fmt(s.alert_latency_s.p50),
        fmt(s.alert_latency_s.p95),
        fmt(s.alert_latency_s.max),
        s.alert_latency_s.n,
        fmt(s.result_latency_s.p50),
        fmt(s.result_latency_s.p95),
        fmt(s.result_latency_s.max),
    );
    println!("hil: reports {} and {}", json_path.display(), md_path.display());
    let missed: Vec<String> = checks
        .iter()
        .filter(|c| !c.met)
        .map(|c| format!("{} (limit {}, measured {})", c.name, c.limit, fmt(c.value)))
        .collect();
    if !missed.is_empty() {
        bail!("thresholds missed: {}", missed.join(", "));
    }
    Ok(())
}

fn fmt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "–".into())
}

/// A fresh id per run: time and 8 random bytes.
fn run_id() -> String {
    use std::io::Read;
    let mut b = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    format!("{}-{}", crate::store::now_ms(), hex::encode(b))
}

/// Sends one entry and waits for the outcome of each of its series; one row per series (not yet judged).
async fn replay(
    entry: &Entry,
    p: &prepare::Prepared,
    manifest: &Manifest,
    peer: &Peer,
    api: &Api,
    alerts: &listener::Alerts,
) -> Vec<Row> {
    let rate = entry.rate.or(manifest.rate);
    let timeout = Duration::from_secs_f64(entry.timeout_s.unwrap_or(manifest.timeout_s));
    let t0 = Instant::now();
    let sent = crate::scu::send_files(&SendOptions { peer: peer.clone(), rate }, &p.files).await;
    // The last acknowledged slice: send_files returns after the last C-STORE response (and the release).
    let last_ack = Instant::now();
    // Each file not stored, and whether the appliance answered it (with a failure status).
    let (failed, first_error): (Vec<(PathBuf, bool)>, _) = match &sent {
        Ok(r) => (
            r.failed.iter().map(|f| (f.path.clone(), f.status.is_some())).collect(),
            r.failed.first().map(|f| f.reason.clone()),
        ),
        Err(e) => (p.files.iter().map(|f| (f.clone(), false)).collect(), Some(format!("{e:#}"))),
    };
    let expected = match (&p.truth, entry.expect) {
        (Some(t), _) => Expected::Phantom {
            positive: t.positive,
            involvement_percent: t.involvement_percent,
            tolerance: entry.involvement_tolerance,
        },
        (None, Some(expect)) => Expected::Real { expect },
        (None, None) => unreachable!("the manifest validation requires expect for real entries"),
    };
    let mut rows: Vec<Row> = p
        .series
        .iter()
        .map(|(uid, n)| Row {
            entry: entry.name.clone(),
            series_instance_uid: uid.clone(),
            instances: *n,
            send_failures: 0,
            refused: 0,
            send_error: first_error.clone(),
            send_s: (last_ack - t0).as_secs_f64(),
            rate,
            expected: expected.clone(),
            result: None,
            result_latency_s: None,
            alerts: 0,
            alert_latency_s: None,
            bad_signatures: 0,
            identifier_leaks: 0,
            note: entry.note.clone(),
            failures: Vec::new(),
        })
        .collect();
    // Which series the failed files belonged to (a file that never got stored cannot be attributed by reading
    // the appliance, so by reading the copy).
    if !failed.is_empty() {
        let paths: Vec<PathBuf> = failed.iter().map(|(p, _)| p.clone()).collect();
        let answered: std::collections::HashSet<&PathBuf> = failed.iter().filter(|f| f.1).map(|(p, _)| p).collect();
        let groups = crate::tools::analyze::group_by_series(&paths);
        for r in rows.iter_mut() {
            let group = groups.get(&r.series_instance_uid);
            r.send_failures = group.map(Vec::len).unwrap_or(0);
            r.refused = group.map(|g| g.iter().filter(|(_, p)| answered.contains(p)).count()).unwrap_or(0);
        }
        if groups.is_empty() {
            for r in rows.iter_mut() {
                r.send_failures = r.instances;
            }
        }
    }

    // Nothing stored: nothing to wait for; one look each, so that a result there is anyway is reported.
    if rows.iter().all(|r| r.send_failures >= r.instances) {
        for r in rows.iter_mut() {
            match api.result(&r.series_instance_uid).await {
                Ok(v) => r.result = v,
                Err(e) => {
                    tracing::warn!(series = %r.series_instance_uid, error = %format!("{e:#}"), "hil: API poll failed")
                }
            }
        }
        return rows;
    }
    let deadline = last_ack + timeout;
    let mut complete = vec![false; rows.len()];
    loop {
        for (r, done) in rows.iter_mut().zip(complete.iter_mut()) {
            if *done {
                continue;
            }
            match api.result(&r.series_instance_uid).await {
                Ok(Some(v)) => {
                    let n = v["n_slices"].as_u64().map(|n| n as usize).unwrap_or(r.instances);
                    let covers_all = n + r.send_failures >= r.instances;
                    if covers_all || r.result.is_none() {
                        r.result_latency_s = Some(last_ack.elapsed().as_secs_f64());
                    }
                    r.result = Some(v);
                    *done = covers_all;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(series = %r.series_instance_uid, error = %format!("{e:#}"), "hil: API poll failed")
                }
            }
            tally_alerts(r, alerts, &p.patient_identifiers, Some(last_ack));
        }
        let waiting_for_alert =
            rows.iter().any(|r| r.result.as_ref().is_some_and(|v| v["positive"] == json!(true)) && r.alerts == 0);
        if complete.iter().all(|d| *d) && !waiting_for_alert {
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    for r in rows.iter_mut() {
        tally_alerts(r, alerts, &p.patient_identifiers, Some(last_ack));
    }
    rows
}

/// Counts the alerts about `r`'s series (and their signature and identifier problems); with `last_ack`, sets the
/// alert latency from the first one.
fn tally_alerts(r: &mut Row, alerts: &listener::Alerts, identifiers: &[String], last_ack: Option<Instant>) {
    let mine = alerts.for_series(&r.series_instance_uid);
    r.alerts = mine.len();
    r.bad_signatures = mine.iter().filter(|a| a.signature_ok == Some(false)).count();
    r.identifier_leaks = mine.iter().filter(|a| identifiers.iter().any(|id| a.raw.contains(id.as_str()))).count();
    if let (Some(first), Some(t)) = (mine.first(), last_ack) {
        if r.alert_latency_s.is_none() {
            r.alert_latency_s = Some(first.at.saturating_duration_since(t).as_secs_f64());
        }
    }
}
