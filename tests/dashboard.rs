//! The technologists' dashboard on a real `lungsentry serve` fed by DCMTK storescu: token auth, the JSON list, the
//! SSE stream, the key-image PNG, and the page itself in headless Chromium (Debian `chromium`), which must show
//! the positive phantom flagged within the latency goal. A follow-up study of the same patient is then sent and
//! its detail opened (`?series=`): regional involvement, severity score, the follow-up comparison, and its DICOM
//! outputs, which a real destination (DCMTK storescp negotiating CT only) refuses for good — shown parked in the
//! detail, the list row and the header. The screenshot is kept as a test artefact:
//! `target/test-artefacts/dashboard.png`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Last-slice-to-flag goal of an unpaced series on a 2-core machine (issue 2), seconds.
const LATENCY_GOAL_S: f64 = 10.0;

/// (status, headers+body bytes split) of an HTTP/1.0 GET.
fn get(port: u16, path: &str, token: Option<&str>) -> Option<(u16, Vec<u8>)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n{auth}\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, raw[head_end + 4..].to_vec()))
}

fn artefact_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artefacts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn positive_series_is_flagged_on_the_dashboard() {
    if !common::model_shipped() {
        panic!("models/manifest.toml missing: the shipped model is needed");
    }
    let token = "test-token-0123456789";
    let tmp = tempfile::tempdir().unwrap();
    let (_pacs, pacs_port) = common::storescp(&tmp.path().join("ct-only-pacs"), true);
    let d = common::HttpDaemon::start(
        &tmp.path().join("d"),
        "",
        &format!(
            "token = \"{token}\"\n\n[outputs]\nkey_images = 1\n\n\
             [[outputs.dicom]]\nae_title = \"PACS\"\nhost = \"127.0.0.1\"\nport = {pacs_port}\n"
        ),
    );

    // Token: required everywhere but /healthz.
    assert_eq!(get(d.http_port, "/", None).unwrap().0, 401);
    assert_eq!(get(d.http_port, "/api/series", Some("nope")).unwrap().0, 401);
    assert_eq!(get(d.http_port, &format!("/?token={token}"), None).unwrap().0, 200);

    let src = tmp.path().join("severe");
    let truth = common::phantom(&src, 61, 40, "severe");
    let (ok, out) = common::storescu(d.dicom_port, "CT1", &[&src], true);
    assert!(ok, "{out}");
    let series = truth["series_instance_uid"].as_str().unwrap().to_string();

    // The SSE stream pushes the list until the series shows up analysed.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", d.http_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "GET /api/events HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n").unwrap();
    let mut lines = BufReader::new(s).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    let row = loop {
        assert!(Instant::now() < deadline, "the SSE stream never showed the series analysed");
        let line = lines.next().expect("SSE stream ended").unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        let list: Vec<serde_json::Value> = serde_json::from_str(data).unwrap();
        if let Some(r) = list.iter().find(|r| r["series_instance_uid"] == series.as_str() && r["state"] == "analysed") {
            break r.clone();
        }
    };
    assert_eq!(row["positive"], true, "the severe phantom must be flagged: {row}");
    assert!(row["lesion_count"].as_u64().unwrap() >= 1);
    assert_eq!(row["n_slices"], 40);
    let latency = row["last_slice_to_flag_s"].as_f64().unwrap();
    assert!(latency <= LATENCY_GOAL_S, "last slice → flag {latency} s exceeds {LATENCY_GOAL_S} s");
    // The row names the patient (the page is local and behind the token): name, ID, accession, series labels.
    let first = dicom_object::open_file(&common::dcm_files(&src)[0]).unwrap();
    let attr = |t| first.element(t).unwrap().to_str().unwrap().trim_end_matches(['\0', ' ']).to_string();
    let accession = attr(dicom_dictionary_std::tags::ACCESSION_NUMBER);
    assert!(!accession.is_empty());
    let p = &row["patient"];
    assert_eq!(p["patient_name"], truth["patient_name"], "{row}");
    assert_eq!(p["patient_id"], truth["patient_id"], "{row}");
    assert_eq!(p["accession_number"], accession.as_str(), "{row}");
    assert_eq!(p["study_date"], truth["study_date"], "{row}");
    assert_eq!(p["series_number"], attr(dicom_dictionary_std::tags::SERIES_NUMBER).as_str(), "{row}");
    assert_eq!(p["study_time"], attr(dicom_dictionary_std::tags::STUDY_TIME).as_str(), "{row}");
    // DICOM PN FAMILY^GIVEN as the page writes it.
    let name = truth["patient_name"].as_str().unwrap().replacen('^', ", ", 1);

    // Key image PNG and the result detail.
    // The PNG is rendered just after the result is recorded: allow it a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    let png = loop {
        let (code, png) = get(d.http_port, &format!("/api/series/{series}/key.png"), Some(token)).unwrap();
        if code == 200 {
            break png;
        }
        assert!(code == 404 && Instant::now() < deadline, "key.png answered {code}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let decoder = png::Decoder::new(std::io::Cursor::new(png.clone()));
    let reader = decoder.read_info().expect("a valid PNG");
    assert_eq!(reader.info().width, 512);
    let (code, body) = get(d.http_port, &format!("/api/series/{series}"), Some(token)).unwrap();
    assert_eq!(code, 200);
    let detail: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(detail["positive"], true);

    // A follow-up study of the same patient: linked to the first, its outputs refused for good by the CT-only PACS.
    let fu = tmp.path().join("follow-up");
    common::phantom_follow_up(&fu, 62, &src);
    let (ok, out) = common::storescu(d.dicom_port, "CT1", &[&fu], true);
    assert!(ok, "{out}");
    let fu_truth: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fu.join("truth/truth.json")).unwrap()).unwrap();
    let fu_series = fu_truth["series_instance_uid"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(180);
    let fu_detail = loop {
        if let Some((200, body)) = get(d.http_port, &format!("/api/series/{fu_series}"), Some(token)) {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let outs = v["dicom_outputs"].as_array().cloned().unwrap_or_default();
            if !outs.is_empty() && outs.iter().all(|o| o["state"] == "parked") {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "the follow-up series' outputs were never parked");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(fu_detail["follow_up"]["prior_series_instance_uid"], series.as_str(), "linked to the first study");
    assert_eq!(fu_detail["regional"]["lobes"].as_array().unwrap().len(), 5);

    // The page in headless Chromium: the row is flagged POSITIVE, the follow-up's detail (opened by ?series=) shows
    // the regional figures, the comparison and its parked outputs; screenshot kept.
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok())
        .expect("chromium (apt-get install chromium)");
    let url = format!("http://127.0.0.1:{}/?token={token}&series={fu_series}", d.http_port);
    let profile = tmp.path().join("chromium-profile");
    let base = |extra: &[&str]| {
        let mut c = Command::new(chromium);
        c.args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"])
            .arg(format!("--user-data-dir={}", profile.display()))
            // --timeout stops loading after 4 s and then dumps/shoots: the page holds an SSE stream open, so
            // neither the load event nor --virtual-time-budget would ever finish.
            .args(["--window-size=1400,1800", "--timeout=4000"])
            .args(extra)
            .arg(&url)
            .stdin(Stdio::null());
        c
    };
    let short = &series[series.len() - 12..];
    // The list is filled by the page's script after load; on a loaded machine the 4 s budget can end first, so a
    // page without the row is fetched again (up to 3 times) before the test concludes it is missing.
    let f = &fu_detail["follow_up"];
    let severity = format!("Severity score {}/25", fu_detail["regional"]["severity_score"]);
    let counts = format!(
        "lesions: new {} · grown {} · shrunk {} · stable {} · resolved {}",
        f["new"], f["grown"], f["shrunk"], f["stable"], f["resolved"]
    );
    let n_parked = fu_detail["dicom_outputs"].as_array().unwrap().len();
    let needles = [
        short.to_string(),
        "Regional involvement".to_string(),
        severity,
        format!("Follow-up vs {}", f["prior_study_date"].as_str().unwrap()),
        counts,
        "DICOM outputs".to_string(),
        format!("{n_parked} parked"),
        "DICOM outputs parked".to_string(),
        // The positive series' row names its patient and accession.
        name.clone(),
        format!("Acc {accession}"),
    ];
    let mut dom = String::new();
    for _ in 0..3 {
        dom = String::from_utf8_lossy(&run_with_timeout(base(&["--dump-dom"]), Duration::from_secs(90))).to_string();
        if needles.iter().all(|n| dom.contains(n.as_str())) {
            break;
        }
    }
    assert!(dom.contains(short), "the series is listed in the page:\n{dom}");
    assert!(dom.contains("badge positive") && dom.contains("POSITIVE"), "the series is flagged POSITIVE:\n{dom}");
    for n in &needles {
        assert!(dom.contains(n.as_str()), "the page shows {n:?}:\n{dom}");
    }
    let progression = if f["progression"] == true { "PROGRESSION" } else { "no progression" };
    assert!(dom.contains(progression), "the page shows {progression:?}:\n{dom}");
    let shot = artefact_dir().join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    run_with_timeout(base(&[&format!("--screenshot={}", shot.display())]), Duration::from_secs(90));
    assert!(shot.exists(), "chromium wrote no screenshot");
    let _ = std::fs::write(artefact_dir().join("dashboard-key.png"), &png);
}

/// Runs a command, killing it after `limit`; returns its stdout.
fn run_with_timeout(mut cmd: Command, limit: Duration) -> Vec<u8> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("start chromium");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().unwrap()
}
