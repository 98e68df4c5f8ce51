//! DICOM over TLS (`[dicom.tls]`) against real peers: a CA, a server and client certificates made by the `openssl`
//! CLI for each test; `lungsentry serve` with TLS on; DCMTK `echoscu`/`storescu +tls` (C-ECHO and a phantom series
//! stored and analysed), plaintext DICOM and junk on the TLS port refused without disturbing other associations,
//! client-certificate verification against the CA, peers that never finish the handshake dropped after
//! `handshake_timeout_s` (freeing their association slot), and bad certificate/key files as start-up errors naming
//! the key.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Test PKI, all PEM: a CA, the server's certificate (localhost / 127.0.0.1) signed by it, a client certificate
/// signed by it, and a self-signed "rogue" client certificate the CA never saw.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    rogue_cert: PathBuf,
    rogue_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out =
        Command::new("openssl").current_dir(dir).args(args).output().expect("run openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    fn generate(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let days = ["-days", "2"];
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-subj",
                "/CN=lungsentry test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                days[0],
                days[1],
            ],
        );
        let leaf = |name: &str, cn: &str, ext: &str| {
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            let (key, csr, pem, extfile) =
                (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
            openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", cn]);
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &pem,
                    "-extfile",
                    &extfile,
                    days[0],
                    days[1],
                ],
            );
        };
        leaf(
            "server",
            "/CN=localhost",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        );
        leaf(
            "client",
            "/CN=CT1",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
        );
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "rogue.key",
                "-out",
                "rogue.pem",
                "-subj",
                "/CN=CT1",
                "-addext",
                "extendedKeyUsage=clientAuth",
                days[0],
                days[1],
            ],
        );
        let p = |f: &str| dir.join(f);
        Pki {
            ca: p("ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
            client_cert: p("client.pem"),
            client_key: p("client.key"),
            rogue_cert: p("rogue.pem"),
            rogue_key: p("rogue.key"),
        }
    }

    /// `[dicom.tls]` with our server certificate, plus `extra` keys.
    fn section(&self, extra: &str) -> String {
        format!(
            "[dicom.tls]\ncert = \"{}\"\nkey = \"{}\"\n{extra}\n",
            self.server_cert.display(),
            self.server_key.display()
        )
    }

    /// DCMTK arguments: TLS with the client certificate, trusting our CA.
    fn with_cert(&self) -> Vec<String> {
        vec!["+tls".into(), s(&self.client_key), s(&self.client_cert), "+cf".into(), s(&self.ca)]
    }

    /// DCMTK arguments: TLS without a client certificate, trusting our CA.
    fn anonymous(&self) -> Vec<String> {
        vec!["+tla".into(), "+cf".into(), s(&self.ca)]
    }

    /// DCMTK arguments: TLS with the self-signed rogue certificate.
    fn rogue(&self) -> Vec<String> {
        vec!["+tls".into(), s(&self.rogue_key), s(&self.rogue_cert), "+cf".into(), s(&self.ca)]
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

/// Runs a DCMTK tool (TCP_NODELAY=1, bounded network timeouts) against the daemon; (success, output).
fn dcmtk(program: &str, tls: &[String], port: u16, rest: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(tls)
        .args(["-to", "20", "-ta", "20", "-td", "20", "-aet", "CT1", "-aec", "LUNGSENTRY"])
        .args(["127.0.0.1", &port.to_string()])
        .args(rest)
        .env("TCP_NODELAY", "1")
        .output()
        .unwrap_or_else(|e| panic!("run {program} (apt-get install dcmtk): {e}"));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn echoscu(tls: &[String], port: u16) -> (bool, String) {
    dcmtk("echoscu", tls, port, &[])
}

fn storescu_tls(tls: &[String], port: u16, dir: &Path) -> (bool, String) {
    dcmtk("storescu", tls, port, &["-v", "+sd", "+r", "+sp", "*.dcm", &s(dir)])
}

fn alive(d: &mut Daemon) {
    assert!(d.child.try_wait().unwrap().is_none(), "daemon exited; log:\n{}", log(d));
}

/// The daemon log without ANSI colour codes (so `key=value` fields can be matched).
fn log(d: &Daemon) -> String {
    common::strip_ansi(&d.log())
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// Polls the daemon log until `needle` occurs `n` times (log lines are written asynchronously).
fn wait_log(d: &Daemon, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&log(d), needle) < n {
        assert!(Instant::now() < deadline, "log never had {n}× {needle:?}:\n{}", log(d));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn tls_echo_and_store_work_and_plaintext_is_refused() {
    if !model_shipped() {
        eprintln!("SKIP: models/manifest.toml is not shipped yet");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&tmp.path().join("pki"));
    let ph = tmp.path().join("ph");
    let truth = phantom(&ph, 60_001, 24, "severe");
    let series_uid = truth["series_instance_uid"].as_str().unwrap().to_string();
    let probe = pki.anonymous();
    let mut d = Daemon::start_probed(
        &tmp.path().join("d"),
        "",
        &format!("{}\n[series]\nquiet_period_s = 0.5\n", pki.section("")),
        &strs(&probe),
    );

    // TLS C-ECHO, with and without a client certificate (none is asked for without `ca`).
    let (ok, out) = echoscu(&pki.with_cert(), d.port);
    assert!(ok, "echoscu +tls must succeed:\n{out}\n{}", log(&d));
    let (ok, out) = echoscu(&pki.anonymous(), d.port);
    assert!(ok, "echoscu +tla must succeed:\n{out}");
    assert!(log(&d).contains("tls=true"), "TLS associations are logged as such:\n{}", log(&d));

    // Plaintext DICOM on the TLS port: refused, logged as a handshake failure, daemon unharmed.
    let failures = count(&log(&d), "TLS handshake failed");
    let (ok, out) = echoscu(&[], d.port);
    assert!(!ok, "plaintext echoscu must fail on a TLS port:\n{out}");
    wait_log(&d, "TLS handshake failed", failures + 1);
    alive(&mut d);

    // A series over TLS, while plaintext DICOM and junk hit the same port: all of it stored and analysed.
    let port = d.port;
    let tls_args = pki.with_cert();
    let ph2 = ph.clone();
    let sender = std::thread::spawn(move || storescu_tls(&tls_args, port, &ph2));
    for _ in 0..3 {
        let (ok, _) = echoscu(&[], port);
        assert!(!ok, "plaintext echoscu must fail");
        let mut junk = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = junk.write_all(b"GET / HTTP/1.0\r\n\r\n");
        junk.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 512];
        let _ = junk.read(&mut buf); // an alert or EOF; the connection must end, not hang
    }
    let (ok, out) = sender.join().unwrap();
    assert!(ok, "storescu +tls failed:\n{out}\n{}", log(&d));
    assert_eq!(count(&out, "Received Store Response (Success)"), 24, "every instance acknowledged:\n{out}");
    let r = d.wait_result(&series_uid, 1, Duration::from_secs(300));
    assert_eq!(d.store().series_instances(&series_uid).unwrap().len(), 24);
    assert!(r.positive, "the severe phantom sent over TLS is analysed and flagged: {}", r.result);
    assert!(count(&log(&d), "TLS handshake failed") >= failures + 7, "each refused connection is logged");
    alive(&mut d);
    // Still serving after all that.
    let (ok, out) = echoscu(&pki.with_cert(), d.port);
    assert!(ok, "{out}");
}

#[test]
fn client_certificate_must_be_signed_by_the_ca() {
    if !model_shipped() {
        eprintln!("SKIP: models/manifest.toml is not shipped yet");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&tmp.path().join("pki"));
    let probe = pki.with_cert();
    let section = pki.section(&format!("ca = \"{}\"\nrequire_client_cert = true", pki.ca.display()));
    let mut d = Daemon::start_probed(&tmp.path().join("d"), "", &section, &strs(&probe));
    assert!(log(&d).contains("client_cert=\"required\""), "{}", log(&d));

    let (ok, out) = echoscu(&pki.with_cert(), d.port);
    assert!(ok, "a client certificate signed by the CA must be accepted:\n{out}");

    let (ok, out) = echoscu(&pki.anonymous(), d.port);
    assert!(!ok, "a client without a certificate must be refused:\n{out}");
    wait_log(&d, "TLS handshake failed", 1);
    let (ok, out) = echoscu(&pki.rogue(), d.port);
    assert!(!ok, "a self-signed client certificate must be refused:\n{out}");
    wait_log(&d, "TLS handshake failed", 2);
    let (ok, out) = echoscu(&[], d.port);
    assert!(!ok, "plaintext must be refused:\n{out}");
    wait_log(&d, "TLS handshake failed", 3);
    let text = log(&d);
    assert!(text.contains("peer sent no certificates"), "the reason is logged:\n{text}");
    alive(&mut d);

    let (ok, out) = echoscu(&pki.with_cert(), d.port);
    assert!(ok, "the CA-signed client still gets in after the refusals:\n{out}");
}

#[test]
fn peers_that_never_finish_the_handshake_are_dropped() {
    if !model_shipped() {
        eprintln!("SKIP: models/manifest.toml is not shipped yet");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&tmp.path().join("pki"));
    let probe = pki.anonymous();
    // One association slot, a 2 s handshake timeout, the idle timeout left at 60 s.
    let mut d = Daemon::start_probed(
        &tmp.path().join("d"),
        "max_associations = 1",
        &pki.section("handshake_timeout_s = 2"),
        &strs(&probe),
    );

    // Connects and sends nothing.
    let started = Instant::now();
    let mut silent = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // accepted: it holds the only slot
                                                    // A TLS peer queued behind it gets in once the silent one is dropped, long before the idle timeout.
    let (ok, out) = echoscu(&pki.anonymous(), d.port);
    let echo_done = started.elapsed();
    assert!(ok, "echoscu behind a silent peer must succeed once the slot frees:\n{out}\n{}", log(&d));
    assert!(echo_done >= Duration::from_millis(1500), "the silent peer held the slot until its timeout: {echo_done:?}");
    assert!(echo_done < Duration::from_secs(15), "slot freed by the 2 s handshake timeout: {echo_done:?}");
    silent.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 64];
    assert!(matches!(silent.read(&mut buf), Ok(0) | Err(_)), "the silent peer's connection is closed");
    wait_log(&d, "TLS handshake not started within the handshake timeout", 1);

    // Starts a handshake (a TLS record header, no ClientHello body) and stalls.
    let started = Instant::now();
    let mut stalled = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x00, 0xc8]).unwrap();
    stalled.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let r = stalled.read(&mut buf);
    let dropped = started.elapsed();
    assert!(matches!(r, Ok(0) | Err(_)), "the stalled handshake is ended, not answered: {r:?}");
    assert!(
        dropped >= Duration::from_millis(1500) && dropped < Duration::from_secs(15),
        "dropped by the 2 s handshake timeout, not the 60 s idle timeout: {dropped:?}"
    );
    wait_log(&d, "TLS handshake and association request not completed within the handshake timeout", 1);
    alive(&mut d);
    let (ok, out) = echoscu(&pki.anonymous(), d.port);
    assert!(ok, "{out}");
}

/// Runs `serve` with `tls_section`; it must exit with an error within a minute. Returns its output.
fn serve_fails(dir: &Path, tls_section: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("lungsentry.toml");
    let port = free_port();
    std::fs::write(
        &config,
        format!(
            "[dicom]\nbind = \"127.0.0.1\"\nport = {port}\n\n{tls_section}\n[storage]\ndata_dir = \"{}\"\n\n[http]\nbind = \"\"\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let log = dir.join("out.log");
    let f = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve started despite a bad [dicom.tls]:\n{}", std::fs::read_to_string(&log).unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "serve must fail:\n{out}");
    out
}

#[test]
fn bad_certificate_or_key_files_are_startup_errors_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&tmp.path().join("pki"));
    let t = tmp.path();
    let section = |cert: &Path, key: &Path, extra: &str| {
        format!("[dicom.tls]\ncert = \"{}\"\nkey = \"{}\"\n{extra}\n", cert.display(), key.display())
    };
    let missing = t.join("no-such-cert.pem");
    let out = serve_fails(&t.join("a"), &section(&missing, &pki.server_key, ""));
    assert!(out.contains("dicom.tls.cert") && out.contains("no-such-cert.pem"), "{out}");

    let out = serve_fails(&t.join("b"), &section(&pki.server_key, &pki.server_key, ""));
    assert!(out.contains("dicom.tls.cert") && out.contains("no valid PEM certificate"), "{out}");

    let out = serve_fails(&t.join("c"), &section(&pki.server_cert, &pki.server_cert, ""));
    assert!(out.contains("dicom.tls.key") && out.contains("no valid PEM private key"), "{out}");

    let out = serve_fails(&t.join("d"), &section(&pki.server_cert, &pki.client_key, ""));
    assert!(out.contains("dicom.tls.key") && out.contains("not a usable pair"), "{out}");

    let ca = format!("ca = \"{}\"", t.join("no-such-ca.pem").display());
    let out = serve_fails(&t.join("e"), &section(&pki.server_cert, &pki.server_key, &ca));
    assert!(out.contains("dicom.tls.ca") && out.contains("no-such-ca.pem"), "{out}");

    let out = serve_fails(&t.join("f"), &section(&pki.server_cert, &pki.server_key, "require_client_cert = true"));
    assert!(out.contains("dicom.tls.require_client_cert"), "{out}");
}
