//! The appliance's systemd integration: the shipped unit passes `systemd-analyze verify`, its security exposure
//! is ≤ 2.0, and a real `lungsentry serve` sends READY=1 (only once the SCP answers), STATUS= and WATCHDOG=1
//! to a notify socket when systemd asks for a watchdog.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, free_port};

/// The shipped unit with ExecStart pointing at the binary under test (verify checks that it is executable).
fn unit_under_test(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/lungsentry.service")).unwrap();
    assert!(text.contains("ExecStart=/usr/bin/lungsentry serve"), "unit runs the packaged binary");
    let p = dir.join("lungsentry.service");
    std::fs::write(&p, text.replace("/usr/bin/lungsentry", bin())).unwrap();
    p
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().expect("systemd-analyze");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify: {text}");
}

#[test]
fn engine_unit_passes_systemd_analyze_verify() {
    // The first-boot TensorRT engine builder, with its script path pointed at the repository's.
    let dir = tempfile::tempdir().unwrap();
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/lungsentry-engine.service")).unwrap();
    assert!(text.contains("Before=lungsentry.service"), "the daemon starts after the engine build");
    let text = text
        .replace(
            "/usr/share/lungsentry/scripts/build-engine",
            concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-engine"),
        )
        .replace("/usr/bin/lungsentry", bin());
    let unit = dir.path().join("lungsentry-engine.service");
    std::fs::write(&unit, text).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().expect("systemd-analyze");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify: {text}");
}

#[test]
fn unit_security_exposure_is_at_most_2() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("Overall exposure level")).expect("exposure line");
    let level: f64 = line.split(':').nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    eprintln!("systemd-analyze security: exposure {level}");
    assert!(level <= 2.0, "{line}");
}

#[test]
fn ready_status_and_watchdog_reach_the_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let port = free_port();
    let config = dir.path().join("lungsentry.toml");
    std::fs::write(
        &config,
        format!(
            "[dicom]\nbind = \"127.0.0.1\"\nport = {port}\n\n[storage]\ndata_dir = \"{}\"\n\n[http]\nbind = \"\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "2000000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let echo_ok = || {
        Command::new("echoscu")
            .args(["-aet", "CT1", "-aec", "LUNGSENTRY", "127.0.0.1", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let mut ready_at = None;
    let mut watchdogs = Vec::new();
    let mut statuses = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            for field in msg.lines() {
                if field == "READY=1" {
                    // READY comes only after the SCP is bound: a C-ECHO right now must succeed.
                    assert!(echo_ok(), "READY=1 sent before the DICOM listener answered");
                    ready_at = Some(Instant::now());
                } else if field == "WATCHDOG=1" {
                    assert!(ready_at.is_some(), "WATCHDOG=1 before READY=1");
                    watchdogs.push(Instant::now());
                } else if let Some(s) = field.strip_prefix("STATUS=") {
                    statuses.push(s.to_string());
                }
            }
        }
        if watchdogs.len() >= 4 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(ready_at.is_some(), "no READY=1");
    assert!(watchdogs.len() >= 4, "only {} WATCHDOG=1 in time", watchdogs.len());
    // Petted every half period (1 s) — well within the 2 s watchdog.
    for w in watchdogs.windows(2) {
        assert!(w[1] - w[0] < Duration::from_millis(1800), "gap {:?} between pets", w[1] - w[0]);
    }
    assert!(statuses.iter().any(|s| s.starts_with("ready: DICOM on")), "{statuses:?}");
    assert!(statuses.iter().any(|s| s.starts_with("serving;")), "{statuses:?}");
}
