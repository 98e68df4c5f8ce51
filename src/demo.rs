//! demo — the whole product in one command: a positive and a negative synthetic series are generated,
//! the daemon runs in-process on embedded defaults (loopback, ephemeral ports, a temporary data dir), both
//! series are sent over real DICOM, and the two results and the webhook alert are printed.
//!
//! Never: touches the network beyond 127.0.0.1 or leaves files behind (the temporary folder is removed).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::phantom::PhantomArgs;
use crate::pipeline::Daemon;
use crate::scu::SendArgs;

/// `lungsentry demo` options.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Slices per synthetic series.
    #[arg(long, default_value_t = 80)]
    pub slices: usize,
    /// Keep the temporary folder (series, store) and print its path.
    #[arg(long)]
    pub keep: bool,
}

/// Starts a loopback HTTP listener that forwards every POSTed body to the returned channel.
async fn webhook_listener() -> Result<(SocketAddr, mpsc::UnboundedReceiver<(String, String)>)> {
    use axum::{http::HeaderMap, routing::post, Router};
    let (tx, rx) = mpsc::unbounded_channel();
    let app = Router::new().route(
        "/alert",
        post(move |headers: HeaderMap, body: String| {
            let tx = tx.clone();
            async move {
                let key = headers.get("x-lungsentry-dedup-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                let _ = tx.send((key, body));
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
        &std::fs::read(dir.join("truth.json")).with_context(|| format!("reading {}/truth.json", dir.display()))?,
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
        tokio::task::spawn_blocking(move || crate::phantom::run(a)).await??;
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
        crate::scu::send(a).await?;
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
    for (label, r, dir) in [("positive phantom", &results[0], &positive), ("negative phantom", &results[1], &negative)]
    {
        let truth: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("truth.json"))?)?;
        println!(
            "\n== {label}: {} (truth: involvement {:.2} %)",
            crate::analyze::summary_line(&r.result),
            truth["involvement_percent"].as_f64().unwrap_or(f64::NAN)
        );
        println!("{}", serde_json::to_string_pretty(&compact(&r.result))?);
    }
    match tokio::time::timeout(Duration::from_secs(30), alerts.recv()).await {
        Ok(Some((key, body))) => {
            println!(
                "\n== webhook alert received {:.1} s after sending began (dedup key {key}):",
                sent_at.elapsed().as_secs_f64()
            );
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
            println!("{}", serde_json::to_string_pretty(&compact(&v))?);
        }
        _ => println!("\n== no webhook alert (the positive series was not flagged)"),
    }
    daemon.shutdown().await;
    Ok(())
}
