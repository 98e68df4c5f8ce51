//! Disk full, for real: the daemon's data dir is a small tmpfs mounted for this test, filled to within a few MiB,
//! and DCMTK `storescu` sends a series into it. Instances that no longer fit get A700 (Refused: out of
//! resources) — never a success — the daemon does not crash and keeps answering, SQLite passes its integrity
//! check with exactly the acknowledged instances recorded, and once space is freed the re-sent series is
//! stored and analysed.
//!
//! Needs CAP_SYS_ADMIN (root in CI's container) to mount the tmpfs; without it the test says SKIP.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn statuses(out: &str) -> (usize, usize, usize) {
    let ok = out.matches("Received Store Response (Success)").count();
    let refused = out.matches("Received Store Response (Refused: OutOfResources)").count();
    let all = out.matches("Received Store Response (").count();
    (ok, refused, all)
}

#[test]
fn disk_full_gives_a700_keeps_sqlite_intact_and_recovers() {
    if !model_shipped() {
        eprintln!("SKIP: models/manifest.toml is not shipped yet");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let series_dir = tmp.path().join("series");
    let truth = phantom(&series_dir, 30_601, 40, "severe");
    let series_uid = truth["series_instance_uid"].as_str().unwrap().to_string();
    let dir = tmp.path().join("d");
    let Some(_mount) = Mount::tmpfs(&dir.join("data"), 48) else { return };
    let mut d = Daemon::start(&dir, "[series]\nquiet_period_s = 1.0\nstable_timeout_s = 5.0\n");

    // Leave room for a few 512² slices (~0.5 MiB each) and the SQLite/WAL growth, not for 40.
    let filler = fill(&dir.join("data"), 5 << 20, 1 << 20);
    eprintln!("free after filling: {} KiB", free_bytes(&dir.join("data")) / 1024);
    let out = storescu_no_halt(d.port, &series_dir);
    let (ok, refused, all) = statuses(&out);
    eprintln!("disk full: {ok} success, {refused} refused (A700) of {all} responses");
    assert_eq!(all, 40, "every instance must get a response:\n{out}");
    assert!(ok >= 1 && refused >= 1, "expected successes then A700s:\n{out}");
    assert_eq!(ok + refused, 40, "only Success or A700 expected:\n{out}");
    assert!(d.child.try_wait().unwrap().is_none(), "daemon died; log:\n{}", d.log());
    let (echo_ok, _) = storescu_echo(d.port);
    assert!(echo_ok, "daemon stopped answering while the disk is full");

    // SQLite intact, and it holds exactly the acknowledged instances, each with its file.
    {
        let db = rusqlite::Connection::open(dir.join("data/lungsentry.sqlite")).unwrap();
        let check: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
        let paths: Vec<String> = db
            .prepare("SELECT path FROM instances WHERE series_instance_uid = ?1")
            .unwrap()
            .query_map([&series_uid], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(paths.len(), ok, "acknowledged {ok} but {} recorded", paths.len());
        for p in &paths {
            assert!(Path::new(p).exists(), "{p} recorded but missing");
        }
        let leftovers = std::fs::read_dir(dir.join("data/spool/tmp")).unwrap().count();
        assert_eq!(leftovers, 0, "temporary files left behind in spool/tmp");
    }

    // Space comes back: the scanner's retry stores everything and the series is analysed.
    std::fs::remove_file(&filler).unwrap();
    let out = storescu_no_halt(d.port, &series_dir);
    let (ok2, _, all2) = statuses(&out);
    assert_eq!((ok2, all2), (40, 40), "after freeing space:\n{out}");
    let r = d.wait_result(&series_uid, 1, Duration::from_secs(300));
    let r = if r.result["n_slices"] == 40 {
        r
    } else {
        d.wait_result(&series_uid, r.version + 1, Duration::from_secs(300))
    };
    assert_eq!(r.result["n_slices"], 40, "{}", r.result);
    assert_eq!(r.result["status"], "analysed", "{}", r.result);

    // The disk fills after a whole series was acknowledged but before its analysis is recorded: once space is
    // back, the analysis is retried without any new instance or restart.
    let second = tmp.path().join("second");
    let truth2 = phantom(&second, 30_602, 24, "severe");
    let uid2 = truth2["series_instance_uid"].as_str().unwrap().to_string();
    let out = storescu_no_halt(d.port, &second);
    assert_eq!(statuses(&out).0, 24, "{out}");
    let filler = fill(&dir.join("data"), 0, 1 << 20);
    let mut more = std::fs::OpenOptions::new().append(true).open(&filler).unwrap();
    while std::io::Write::write_all(&mut more, &[0u8; 4096]).is_ok() {}
    drop(more);
    std::thread::sleep(Duration::from_secs(6));
    let recorded_while_full = d.store().latest_result(&uid2).ok().flatten().is_some();
    std::fs::remove_file(&filler).unwrap();
    let r2 = d.wait_result(&uid2, 1, Duration::from_secs(120));
    eprintln!("second series: result recorded while full: {recorded_while_full}; after freeing: v{}", r2.version);
    assert_eq!(r2.result["n_slices"], 24, "{}", r2.result);

    let db = rusqlite::Connection::open(dir.join("data/lungsentry.sqlite")).unwrap();
    let check: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    assert!(d.child.try_wait().unwrap().is_none(), "daemon died; log:\n{}", d.log());
    d.kill9();
}

fn storescu_echo(port: u16) -> (bool, String) {
    let out = Command::new("echoscu")
        .args(["-aet", "CT1", "-aec", "LUNGSENTRY", "127.0.0.1", &port.to_string()])
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

/// DCMTK storescu that goes on after a failed store (`-nh`), as a scanner's queue would retry each image.
fn storescu_no_halt(port: u16, dir: &Path) -> String {
    let out = Command::new("storescu")
        .args(["-v", "-nh", "-aet", "CT1", "-aec", "LUNGSENTRY", "+sd", "+r", "+sp", "*.dcm", "127.0.0.1"])
        .arg(port.to_string())
        .arg(dir)
        .env("TCP_NODELAY", "1")
        .output()
        .unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}
