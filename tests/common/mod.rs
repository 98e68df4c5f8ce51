//! Helpers shared by the end-to-end tests: data paths, phantoms, a real `lungsentry serve` process, a real
//! HTTP webhook receiver, DCMTK invocations.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_lungsentry")
}

pub fn data_dir() -> PathBuf {
    let p = std::env::var("LUNGSENTRY_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    assert!(p.is_dir(), "LUNGSENTRY_DATA {} is missing", p.display());
    p
}

/// Whether the shipped model exists (tests needing it say so when it does not).
pub fn model_shipped() -> bool {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/manifest.toml").exists()
}

/// The `.dcm` files directly in `dir`, sorted by name.
pub fn dcm_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    v.sort();
    v
}

/// Runs `lungsentry phantom` into `out` and returns its truth.json.
pub fn phantom(out: &Path, seed: u64, slices: usize, severity: &str) -> serde_json::Value {
    let st = Command::new(bin())
        .args(["phantom", "--out"])
        .arg(out)
        .args(["--seed", &seed.to_string(), "--slices", &slices.to_string(), "--size", "512"])
        .args(["--severity", severity])
        .stdout(Stdio::null())
        .status()
        .expect("run lungsentry phantom");
    assert!(st.success(), "phantom generation failed");
    serde_json::from_slice(&std::fs::read(out.join("truth/truth.json")).unwrap()).unwrap()
}

/// Runs `lungsentry phantom --follow-up-of prior` into `out` and returns its truth.json.
pub fn phantom_follow_up(out: &Path, seed: u64, prior: &Path) -> serde_json::Value {
    let st = Command::new(bin())
        .args(["phantom", "--out"])
        .arg(out)
        .args(["--seed", &seed.to_string(), "--follow-up-of"])
        .arg(prior)
        .stdout(Stdio::null())
        .status()
        .expect("run lungsentry phantom --follow-up-of");
    assert!(st.success(), "follow-up phantom generation failed");
    serde_json::from_slice(&std::fs::read(out.join("truth/truth.json")).unwrap()).unwrap()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What the webhook receiver got: (dedup key header, signature header, body).
pub type Received = Arc<Mutex<Vec<(String, String, String)>>>;

/// A real HTTP server on loopback that records every POST and answers 200.
pub fn webhook_receiver(rt: &tokio::runtime::Runtime) -> (SocketAddr, Received) {
    use axum::{http::HeaderMap, routing::post, Router};
    let got: Received = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let app = Router::new().route(
        "/alert",
        post(move |headers: HeaderMap, body: String| {
            let g = g.clone();
            async move {
                let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                g.lock().unwrap().push((h("x-lungsentry-dedup-key"), h("x-lungsentry-signature"), body));
                "ok"
            }
        }),
    );
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, got)
}

/// A `lungsentry serve` child process with its own data dir and config.
pub struct Daemon {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// Extra `echoscu` arguments of the readiness probe (e.g. `+tls KEY CERT +cf CA` for a TLS listener).
    pub probe: Vec<String>,
}

impl Daemon {
    /// Writes `config_extra` (TOML, appended to the test defaults) and starts the daemon; waits until it answers.
    pub fn start(dir: &Path, config_extra: &str) -> Daemon {
        Self::start_with(dir, "", config_extra)
    }

    /// Like [`Daemon::start`], with environment variables for the daemon process (this start only, not restarts).
    pub fn start_env(dir: &Path, config_extra: &str, env: &[(&str, &str)]) -> Daemon {
        let (port, config) = Self::write_config(dir, "", "", config_extra);
        Self::spawn_env(dir, port, config, Vec::new(), env)
    }

    /// Like [`Daemon::start`], with `dicom_extra` (TOML keys) added to the `[dicom]` table.
    pub fn start_with(dir: &Path, dicom_extra: &str, config_extra: &str) -> Daemon {
        Self::start_full(dir, dicom_extra, "", config_extra)
    }

    /// Like [`Daemon::start_with`], with `storage_extra` (TOML keys) added to the `[storage]` table.
    pub fn start_full(dir: &Path, dicom_extra: &str, storage_extra: &str, config_extra: &str) -> Daemon {
        let (port, config) = Self::write_config(dir, dicom_extra, storage_extra, config_extra);
        Self::spawn(dir, port, config, Vec::new())
    }

    /// Like [`Daemon::start_with`]; the readiness C-ECHO is sent with the extra `echoscu` arguments `probe`.
    pub fn start_probed(dir: &Path, dicom_extra: &str, config_extra: &str, probe: &[&str]) -> Daemon {
        let (port, config) = Self::write_config(dir, dicom_extra, "", config_extra);
        Self::spawn(dir, port, config, probe.iter().map(|s| s.to_string()).collect())
    }

    /// The test config (a free port, the data dir under `dir`, HTTP off) plus the extra TOML; returns its port and path.
    /// Disk-pressure purging is off unless a test turns it on (`storage_extra`): a CI disk fuller than the default
    /// threshold must not purge spool files other tests look at.
    fn write_config(dir: &Path, dicom_extra: &str, storage_extra: &str, config_extra: &str) -> (u16, PathBuf) {
        let pressure_off = "purge_high_water_percent = 100.0";
        let storage_extra = if storage_extra.contains("purge_high_water_percent") {
            storage_extra.to_string()
        } else {
            format!("{pressure_off}\n{storage_extra}")
        };
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let config = dir.join("lungsentry.toml");
        let text = format!(
            "[dicom]\nbind = \"127.0.0.1\"\nport = {port}\n{dicom_extra}\n\n[storage]\ndata_dir = \"{}\"\n{storage_extra}\n\n[http]\nbind = \"\"\n\n{config_extra}\n",
            dir.join("data").display()
        );
        std::fs::write(&config, text).unwrap();
        (port, config)
    }

    fn spawn(dir: &Path, port: u16, config: PathBuf, probe: Vec<String>) -> Daemon {
        Self::spawn_env(dir, port, config, probe, &[])
    }

    fn spawn_env(dir: &Path, port: u16, config: PathBuf, probe: Vec<String>, env: &[(&str, &str)]) -> Daemon {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("daemon.log")).unwrap();
        let child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start lungsentry serve");
        let d = Daemon { child, port, dir: dir.to_path_buf(), config, probe };
        d.wait_ready();
        d
    }

    /// Same data dir and config, new process (after a kill).
    pub fn restart(self) -> Daemon {
        self.restart_env(&[])
    }

    /// [`Daemon::restart`] with environment variables for the new process.
    pub fn restart_env(mut self, env: &[(&str, &str)]) -> Daemon {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (dir, port, config, probe) = (self.dir.clone(), self.port, self.config.clone(), self.probe.clone());
        std::mem::forget(self);
        Self::spawn_env(&dir, port, config, probe, env)
    }

    /// Waits until the process ends by itself (e.g. at a `LUNGSENTRY_TEST_CRASH_AT` point); panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "daemon did not exit; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ok = Command::new("echoscu")
                .args(&self.probe)
                .args(["-aet", "CT1", "-aec", "LUNGSENTRY", "127.0.0.1", &self.port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "daemon did not answer C-ECHO; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn store(&self) -> lungsentry::store::Store {
        lungsentry::store::Store::open(&self.dir.join("data/lungsentry.sqlite")).unwrap()
    }

    /// Waits for a result of `series_uid` with at least `version`.
    pub fn wait_result(&self, series_uid: &str, version: u32, timeout: Duration) -> lungsentry::store::StoredResult {
        let store = self.store();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = store.latest_result(series_uid).unwrap() {
                if r.version >= version {
                    return r;
                }
            }
            assert!(Instant::now() < deadline, "no result v{version} for {series_uid}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// DCMTK storescu of every `*.dcm` under `dir` (recursively); returns (success, combined output).
pub fn storescu(port: u16, calling_ae: &str, paths: &[&Path], nodelay: bool) -> (bool, String) {
    let mut cmd = Command::new("storescu");
    cmd.args(["-v", "-aet", calling_ae, "-aec", "LUNGSENTRY", "+sd", "+r", "+sp", "*.dcm"]);
    cmd.args(["127.0.0.1", &port.to_string()]);
    for p in paths {
        cmd.arg(p);
    }
    if nodelay {
        cmd.env("TCP_NODELAY", "1");
    }
    let out = cmd.output().expect("run storescu (apt-get install dcmtk)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Every `*.dcm` under $LUNGSENTRY_DATA/real-dicom, sorted.
pub fn real_dicom_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![data_dir().join("real-dicom")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "dcm") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// DCMTK's storescu/storescp read SOP Class/Instance UIDs from the dataset; the real Siemens JPEG 2000 files
/// keep them only in the file meta. For such a file this writes a copy into `tmp` with the UIDs put into the
/// dataset by `dcmodify` and returns it; files that already carry them give None (use them in place).
pub fn dcmtk_sendable_copy(f: &Path, tmp: &Path) -> Option<PathBuf> {
    let obj =
        dicom_object::OpenFileOptions::new().read_until(dicom_dictionary_std::tags::PIXEL_DATA).open_file(f).unwrap();
    let has_uid = obj
        .get(dicom_dictionary_std::tags::SOP_INSTANCE_UID)
        .and_then(|e| e.to_str().ok())
        .is_some_and(|s| !s.trim_end_matches(['\0', ' ']).is_empty());
    if has_uid {
        return None;
    }
    let copy = tmp.join(f.file_name().unwrap());
    std::fs::copy(f, &copy).unwrap();
    let class = format!("(0008,0016)={}", obj.meta().media_storage_sop_class_uid());
    let inst = format!("(0008,0018)={}", obj.meta().media_storage_sop_instance_uid());
    let st = Command::new("/usr/bin/dcmodify").args(["-nb", "-i", &class, "-i", &inst]).arg(&copy).status().unwrap();
    assert!(st.success(), "dcmodify failed on {}", copy.display());
    Some(copy)
}

/// A `lungsentry serve` child with its HTTP endpoints on (`[http] bind` on a free loopback port).
pub struct HttpDaemon {
    pub child: Child,
    pub dicom_port: u16,
    pub http_port: u16,
    pub dir: PathBuf,
}

impl Drop for HttpDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HttpDaemon {
    /// Starts with `storage_extra` appended to `[storage]` and `http_extra` to `[http]`; waits for `/healthz`.
    pub fn start(dir: &Path, storage_extra: &str, http_extra: &str) -> HttpDaemon {
        Self::start_full(dir, storage_extra, http_extra, "")
    }

    /// Like [`HttpDaemon::start`], with `config_extra` (whole TOML tables, e.g. `[alerts]`) appended to the config.
    pub fn start_full(dir: &Path, storage_extra: &str, http_extra: &str, config_extra: &str) -> HttpDaemon {
        use std::io::{Read, Write};
        std::fs::create_dir_all(dir).unwrap();
        let (dicom_port, http_port) = (free_port(), free_port());
        let config = dir.join("lungsentry.toml");
        std::fs::write(
            &config,
            format!(
                "[dicom]\nbind = \"127.0.0.1\"\nport = {dicom_port}\n\n[series]\nquiet_period_s = 0.5\n\n\
                 [storage]\ndata_dir = \"{}\"\n{storage_extra}\n\n[http]\nbind = \"127.0.0.1:{http_port}\"\n{http_extra}\n\n{config_extra}\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
        let child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = HttpDaemon { child, dicom_port, http_port, dir: dir.to_path_buf() };
        let healthy = || -> Option<()> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", http_port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            write!(s, "GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            text.starts_with("HTTP/1.0 200").then_some(()).or(text.starts_with("HTTP/1.1 200").then_some(()))
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while healthy().is_none() {
            assert!(
                Instant::now() < deadline,
                "no /healthz; log:\n{}",
                std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        d
    }
}

/// A DCMTK `storescp` child, killed on drop.
pub struct Storescp {
    pub child: Child,
}

impl Drop for Storescp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// DCMTK storescp as AE `PACS` on a free port, writing into `dir`; waits until it answers C-ECHO. `ct_only`: it
/// negotiates only Verification and CT Image Storage (an association profile written into `dir`), so every other
/// SOP class is refused for good (no accepted presentation context) — a real peer that refuses our outputs.
pub fn storescp(dir: &Path, ct_only: bool) -> (Storescp, u16) {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let mut cmd = Command::new("storescp");
    cmd.args(["-aet", "PACS", "-od"]).arg(dir);
    if ct_only {
        let cfg = dir.with_extension("ct-only.cfg");
        std::fs::write(
            &cfg,
            "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n\
             TransferSyntax2 = LittleEndianImplicit\n\n[[PresentationContexts]]\n[CTOnly]\n\
             PresentationContext1 = VerificationSOPClass\\Uncompressed\n\
             PresentationContext2 = CTImageStorage\\Uncompressed\n\n[[Profiles]]\n[Default]\n\
             PresentationContexts = CTOnly\n",
        )
        .unwrap();
        cmd.arg("-xf").arg(&cfg).arg("Default");
    }
    let child = cmd
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("storescp (apt-get install dcmtk)");
    let s = Storescp { child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !Command::new("echoscu")
        .args(["-aec", "PACS", "127.0.0.1", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|st| st.success())
        .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "storescp did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    (s, port)
}

/// A tmpfs mounted at `path` for the life of the guard (the small file systems of the disk-full and retention tests).
pub struct Mount(PathBuf);

impl Mount {
    /// Mounts a `size_mb` tmpfs at `path`; None (and a SKIP line) where mounting is not allowed.
    pub fn tmpfs(path: &Path, size_mb: u32) -> Option<Mount> {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m,mode=0700"), "lungsentry-test"])
            .arg(path)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("SKIP: cannot mount a tmpfs here: {}", String::from_utf8_lossy(&out.stderr).trim());
            return None;
        }
        Some(Mount(path.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Free bytes on the file system of `path` (df).
pub fn free_bytes(path: &Path) -> u64 {
    let out = Command::new("df").args(["--output=avail", "-B1"]).arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
}

/// Fills the file system of `dir` until about `leave` bytes are free, with real (non-sparse) data written in
/// `chunk` byte pieces; returns the filler file.
pub fn fill(dir: &Path, leave: u64, chunk: usize) -> PathBuf {
    use std::io::Write;
    let filler = dir.join("filler.bin");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0xA5u8; chunk];
    while free_bytes(dir) > leave + chunk.len() as u64 {
        f.write_all(&chunk).unwrap();
        f.sync_all().unwrap();
    }
    filler
}

/// A log line or text without ANSI colour codes (so tracing's `key=value` fields can be matched).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Study/Series/SOP Instance UIDs that break the UI value representation, each with a label: the values a
/// hostile peer would use to steer a path (`..`, `.`, `../x`, `a/b`), an empty component, 65 characters,
/// non-digits (issue 21). Each must be refused with a failure status.
pub fn bad_uids() -> Vec<(&'static str, String)> {
    vec![
        ("dotdot", "..".into()),
        ("dot", ".".into()),
        ("parent-x", "../x".into()),
        ("slash", "a/b".into()),
        ("empty-component", "1.2..3".into()),
        ("65-chars", format!("1.{}", "2".repeat(63))),
        ("non-digits", "1.2.abc".into()),
    ]
}

/// An axial 512² CT slice's attributes as the receive path records them (ORIGINAL\PRIMARY\AXIAL, 0.7 mm pixels,
/// 1 mm slices, position z = `n` mm, instance number `n`), for tests that build store rows without DICOM files.
pub fn ct_meta(sop: String, study: String, series: &str, n: i64) -> lungsentry::instance::InstanceMeta {
    lungsentry::instance::InstanceMeta {
        sop_instance_uid: sop,
        sop_class_uid: lungsentry::instance::CT_IMAGE_STORAGE.into(),
        study_instance_uid: study,
        series_instance_uid: series.into(),
        patient_id: "PID".into(),
        patient_name: "DOE^J".into(),
        study_date: "20200401".into(),
        modality: "CT".into(),
        image_type: vec!["ORIGINAL".into(), "PRIMARY".into(), "AXIAL".into()],
        image_position: Some([0.0, 0.0, n as f64]),
        image_orientation: Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
        slice_thickness: Some(1.0),
        pixel_spacing: Some([0.7, 0.7]),
        instance_number: Some(n),
        rows: Some(512),
        columns: Some(512),
        number_of_frames: 1,
        has_pixel_data: true,
        images_in_acquisition: None,
        derived_uids: Vec::new(),
    }
}

/// Every file under `dir`, at any depth (directories themselves left out), in no particular order.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
