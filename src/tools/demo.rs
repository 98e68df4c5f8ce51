//! demo — the whole product in one command: a positive and a negative synthetic series are generated,
//! the daemon runs in-process on embedded defaults (loopback, ephemeral ports, a temporary data dir), both
//! series are sent over real DICOM, and a short summary per series (flag, involvement, lesions, last slice →
//! alert) is printed; `--json` prints the results and the webhook body as JSON as well.
//!
//! Never: touches the network beyond 127.0.0.1 or leaves files behind (the temporary folder is removed).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::pipeline::Daemon;
use crate::tools::phantom::PhantomArgs;
use crate::tools::scu_cli::SendArgs;

/// `lungsentry demo` options.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Slices per synthetic series.
    #[arg(long, default_value_t = 80)]
    pub slices: usize,
    /// Keep the temporary folder (series, store) and print its path.
    #[arg(long)]
    pub keep: bool,
    /// Also print both results and the webhook body as JSON (long lists shortened).
    #[arg(long)]
    pub json: bool,
}

/// A webhook POST as the demo's receiver saw it.
struct Alert {
    /// `X-Lungsentry-Dedup-Key`.
    dedup_key: String,
    /// The body.
    body: String,
    /// When it arrived (unix ms), for "last slice → alert".
    at_ms: i64,
}

/// Starts a loopback HTTP listener that forwards every POSTed body to the returned channel.
async fn webhook_listener() -> Result<(SocketAddr, mpsc::UnboundedReceiver<Alert>)> {
    use axum::{http::HeaderMap, routing::post, Router};
    let (tx, rx) = mpsc::unbounded_channel();
    let app = Router::new().route(
        "/alert",
        post(move |headers: HeaderMap, body: String| {
            let tx = tx.clone();
            async move {
                let key = headers.get("x-lungsentry-dedup-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                let _ = tx.send(Alert { dedup_key: key, body, at_ms: crate::store::now_ms() });
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, rx))
}

/// The result without its long per-slice lists, and only the five largest lesions, for reading on a terminal.
fn compact(r: &serde_json::Value) -> serde_json::Value {
    let mut v = r.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("slice_sop_instance_uids");
        if let Some(p) = o.get("positive_slices").and_then(|p| p.as_array()).map(|a| a.len()) {
            o.insert("positive_slices".into(), serde_json::json!(format!("{p} slice(s)")));
        }
        if let Some(mut l) = o.get("lesions").and_then(|l| l.as_array()).cloned() {
            let n = l.len();
            l.sort_by(|a, b| b["volume_ml"].as_f64().partial_cmp(&a["volume_ml"].as_f64()).unwrap());
            l.truncate(5);
            o.insert("lesions".into(), serde_json::json!({"count": n, "largest": l}));
        }
    }
    v
}

/// One series in a few lines: flag, involvement (with the phantom's truth), lesions (count and the largest three),
/// and last slice → result / alert seconds.
fn summary(
    label: &str,
    r: &serde_json::Value,
    truth_percent: Option<f64>,
    last_slice_ms: Option<i64>,
    alert_ms: Option<i64>,
) -> String {
    let mut out = format!("== {label}: ");
    if r["status"] == "skipped" {
        out.push_str(&format!("skipped — {}\n", r["skip_reasons"]));
        return out;
    }
    let positive = r["positive"].as_bool().unwrap_or(false);
    out.push_str(&format!(
        "{} — involvement {:.2} %{}, lung {:.0} mL, {} of {} slices analysed\n",
        if positive { "POSITIVE" } else { "negative" },
        r["involvement_percent"].as_f64().unwrap_or(0.0),
        truth_percent.map(|t| format!(" (truth {t:.2} %)")).unwrap_or_default(),
        r["lung_volume_ml"].as_f64().unwrap_or(0.0),
        r["analysed_slices"],
        r["n_slices"],
    ));
    let mut lesions = r["lesions"].as_array().cloned().unwrap_or_default();
    lesions.sort_by(|a, b| {
        b["volume_ml"]
            .as_f64()
            .unwrap_or(0.0)
            .partial_cmp(&a["volume_ml"].as_f64().unwrap_or(0.0))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let largest: Vec<String> = lesions
        .iter()
        .take(3)
        .map(|l| format!("{:.1} mL {}", l["volume_ml"].as_f64().unwrap_or(0.0), l["side"].as_str().unwrap_or("?")))
        .collect();
    out.push_str(&format!(
        "   lesions: {}{}\n",
        lesions.len(),
        if largest.is_empty() { String::new() } else { format!(" (largest: {})", largest.join(", ")) }
    ));
    let done_ms = r["completed_at"].as_str().and_then(crate::clock::parse_rfc3339_ms);
    let secs = |to: Option<i64>| match (last_slice_ms, to) {
        (Some(a), Some(b)) => format!("{:.1} s", (b - a).max(0) as f64 / 1000.0),
        _ => "-".to_string(),
    };
    out.push_str(&format!("   last slice → result {}", secs(done_ms)));
    if positive {
        out.push_str(&format!(", → webhook alert {}", if alert_ms.is_some() { secs(alert_ms) } else { "none".into() }));
    }
    out.push('\n');
    out
}

/// Builds a subcommand's arguments exactly as the command line would (defaults included).
fn parse_args<A: clap::Args>(argv: &[&str]) -> Result<A> {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrap<T: clap::Args> {
        #[command(flatten)]
        inner: T,
    }
    let w = Wrap::<A>::try_parse_from(std::iter::once("demo").chain(argv.iter().copied()))?;
    Ok(w.inner)
}

fn series_uid_of(dir: &Path) -> Result<String> {
    let truth: serde_json::Value = serde_json::from_slice(
        &std::fs::read(crate::tools::phantom::truth_file(dir, "truth.json"))
            .with_context(|| format!("reading the truth of {}", dir.display()))?,
    )?;
    truth["series_instance_uid"].as_str().map(str::to_string).context("truth.json has no series_instance_uid")
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let root = std::env::temp_dir().join(format!("lungsentry-demo-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let outcome = run_in(&root, &args).await;
    if args.keep {
        println!("kept {}", root.display());
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
    outcome
}

async fn run_in(root: &Path, args: &DemoArgs) -> Result<()> {
    let positive = root.join("positive");
    let negative = root.join("negative");
    println!("1/4 generating synthetic series ({} slices each)…", args.slices);
    for (dir, seed, severity) in [(&positive, 4242u64, "moderate"), (&negative, 4343u64, "none")] {
        let a = parse_args::<PhantomArgs>(&[
            "--out",
            &dir.display().to_string(),
            "--seed",
            &seed.to_string(),
            "--slices",
            &args.slices.to_string(),
            "--thickness",
            "2.5",
            "--severity",
            severity,
        ])?;
        tokio::task::spawn_blocking(move || crate::tools::phantom::run(a)).await??;
    }

    let (hook_addr, mut alerts) = webhook_listener().await?;
    let mut config = Config::default();
    config.dicom.bind = "127.0.0.1".into();
    config.dicom.port = 0;
    config.storage.data_dir = root.join("data");
    config.series.quiet_period_s = 0.5;
    config.alerts.webhook_url = Some(format!("http://{hook_addr}/alert"));
    config.http.bind = String::new();
    println!("2/4 starting the daemon (model check, engine warm-up)…");
    let daemon = Daemon::start(config).await?;
    println!("    DICOM SCP on {} (AE LUNGSENTRY), webhook receiver on {hook_addr}", daemon.dicom_addr);

    println!("3/4 sending both series over DICOM (C-STORE)…");
    let sent_at = Instant::now();
    for dir in [&positive, &negative] {
        let a = parse_args::<SendArgs>(&[
            "--host",
            "127.0.0.1",
            "--port",
            &daemon.dicom_addr.port().to_string(),
            "--calling-ae",
            "LUNGSENTRY-DEMO",
            &dir.display().to_string(),
        ])?;
        crate::tools::scu_cli::send(a).await?;
    }

    println!("4/4 waiting for both analyses…");
    let uids = [series_uid_of(&positive)?, series_uid_of(&negative)?];
    let mut results = Vec::new();
    for uid in &uids {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Some(r) = daemon.store.latest_result(uid)? {
                results.push(r);
                break;
            }
            if Instant::now() > deadline {
                bail!("no result for series {} after 10 minutes", crate::store::series_log_key(uid));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let alert = tokio::time::timeout(Duration::from_secs(30), alerts.recv()).await.ok().flatten();
    println!();
    for (label, r, dir) in [("positive phantom", &results[0], &positive), ("negative phantom", &results[1], &negative)]
    {
        let truth: serde_json::Value =
            serde_json::from_slice(&std::fs::read(crate::tools::phantom::truth_file(dir, "truth.json"))?)?;
        let last_slice_ms = daemon.store.series(&r.series_instance_uid)?.map(|s| s.last_instance_at);
        let alerted = alert.as_ref().filter(|a| a.dedup_key.starts_with(&format!("{}/", r.series_instance_uid)));
        println!(
            "{}",
            summary(label, &r.result, truth["involvement_percent"].as_f64(), last_slice_ms, alerted.map(|a| a.at_ms))
        );
        if args.json {
            println!("{}", serde_json::to_string_pretty(&compact(&r.result))?);
        }
    }
    match &alert {
        Some(a) => {
            println!(
                "webhook alert received {:.1} s after sending began (dedup key {})",
                sent_at.elapsed().as_secs_f64(),
                a.dedup_key
            );
            if args.json {
                let v: serde_json::Value =
                    serde_json::from_str(&a.body).unwrap_or(serde_json::Value::String(a.body.clone()));
                println!("{}", serde_json::to_string_pretty(&compact(&v))?);
            }
        }
        None => println!("no webhook alert (the positive series was not flagged)"),
    }
    if !args.json {
        println!("(--json prints both results and the alert body)");
    }
    daemon.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_summary_is_three_short_lines() {
        let lesions: Vec<serde_json::Value> = (0..40)
            .map(|i| serde_json::json!({"id": i, "volume_ml": i as f64 * 0.5, "side": if i % 2 == 0 { "right" } else { "left" }}))
            .collect();
        let r = serde_json::json!({
            "status": "analysed", "positive": true, "involvement_percent": 11.78, "lung_volume_ml": 4321.0,
            "analysed_slices": 80, "n_slices": 80, "lesions": lesions,
            "positive_slices": (0..80).collect::<Vec<_>>(), "completed_at": "2026-01-01T00:00:03.500Z",
        });
        let last = crate::clock::parse_rfc3339_ms("2026-01-01T00:00:01.000Z");
        let s = summary("positive phantom", &r, Some(11.5), last, last.map(|t| t + 2700));
        assert_eq!(s.lines().count(), 3, "{s}");
        assert!(s.lines().all(|l| l.chars().count() <= 120), "{s}");
        assert!(s.contains("POSITIVE — involvement 11.78 % (truth 11.50 %)"), "{s}");
        assert!(s.contains("lesions: 40 (largest: 19.5 mL left, 19.0 mL right, 18.5 mL left)"), "{s}");
        assert!(s.contains("last slice → result 2.5 s, → webhook alert 2.7 s"), "{s}");
        let neg = serde_json::json!({"status": "analysed", "positive": false, "lesions": [], "completed_at": "x"});
        let s = summary("negative phantom", &neg, None, last, None);
        assert!(s.contains("negative") && s.contains("lesions: 0\n") && !s.contains("webhook"), "{s}");
    }
}
