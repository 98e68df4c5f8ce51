//! The .deb, for real: `cargo deb --no-build` packages the release binary this test run built (cargo-deb is
//! installed by scripts/test), and `dpkg-deb` checks what is in it: files, conffiles, maintainer scripts.
//!
//! Then the package is installed, removed and purged with dpkg, for real:
//! - with `LUNGSENTRY_DEB_INSTALL=1` (`.ci/run` sets it for CI's fresh, single-use Debian container) into the real
//!   system, when that is safe — root, a dpkg database, no lungsentry installed and none of its paths present, no
//!   running systemd;
//! - otherwise, as root, in a private mount namespace whose root is an overlay over `/` (the test runs itself
//!   again there): on a shared development machine an installed /usr/share/lungsentry model would be picked up
//!   by other daemons started meanwhile, and their apt runs would meet our dpkg lock; in the overlay nothing
//!   leaves it.
//!
//! Either way: the system user, directories and config (mode, group) are checked, and the installed binary
//! analyses a phantom with the installed model (which it prefers over the source tree's); `dpkg -r` must keep
//! the data and the config; `dpkg -P` removes the config and still keeps the data. What the test created outside
//! dpkg (the data it wrote, the user) it removes at the end. Not root, or no overlay possible: SKIP for that part.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Builds the .deb from the already built release binary (stripped; the dbgsym package is left out to save CI
/// time); returns its path.
fn build_deb(out_dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let has = Command::new("cargo").args(["deb", "--version"]).output().map(|o| o.status.success()).unwrap_or(false);
    assert!(has, "cargo-deb is missing: `cargo install cargo-deb --locked` (scripts/test does this)");
    let deb = out_dir.join("lungsentry.deb");
    run(Command::new("cargo")
        .current_dir(root)
        .args(["deb", "--no-build", "--fast", "--no-dbgsym", "--strip", "--output"])
        .arg(&deb));
    assert!(deb.is_file());
    deb
}

const FILES: &[&str] = &[
    "./usr/bin/lungsentry",
    "./usr/share/lungsentry/models/manifest.toml",
    "./usr/share/lungsentry/models/lungsentry-unet.onnx",
    "./usr/share/lungsentry/scripts/build-engine",
    "./usr/share/lungsentry/systemd/jetson.conf",
    "./usr/lib/systemd/system/lungsentry.service",
    "./usr/lib/systemd/system/lungsentry-engine.service",
    "./usr/lib/sysusers.d/lungsentry.conf",
    "./usr/lib/tmpfiles.d/lungsentry.conf",
    "./etc/lungsentry/lungsentry.toml",
    "./usr/share/doc/lungsentry/README.md",
    "./usr/share/doc/lungsentry/MODEL_CARD.md",
];

#[test]
fn deb_package_contents_scripts_and_install_remove_purge() {
    let tmp = tempfile::tempdir().unwrap();
    // Inside the overlay run (see install_in_overlay) the package built outside is reused.
    let deb = match std::env::var_os("LUNGSENTRY_DEB_FILE") {
        Some(p) => PathBuf::from(p),
        None => build_deb(tmp.path()),
    };
    let info = stdout(&run(Command::new("dpkg-deb").arg("--info").arg(&deb)));
    eprintln!("{info}");
    for want in ["Package: lungsentry", "Architecture:", "Depends:", "postinst", "prerm", "postrm", "conffiles"] {
        assert!(info.contains(want), "dpkg-deb --info lacks {want:?}:\n{info}");
    }
    assert!(info.contains("libc6"), "Depends must come from the binary's libraries ($auto):\n{info}");

    let contents = stdout(&run(Command::new("dpkg-deb").arg("--contents").arg(&deb)));
    for f in FILES {
        assert!(contents.lines().any(|l| l.ends_with(f)), "{f} missing from the package:\n{contents}");
    }
    let mode_of = |f: &str| contents.lines().find(|l| l.ends_with(f)).map(|l| l[..10].to_string()).unwrap();
    assert_eq!(mode_of("./usr/bin/lungsentry"), "-rwxr-xr-x");
    assert_eq!(mode_of("./usr/share/lungsentry/scripts/build-engine"), "-rwxr-xr-x");
    assert_eq!(mode_of("./etc/lungsentry/lungsentry.toml"), "-rw-r-----", "the config may hold secrets");
    assert!(!contents.contains("var/lib/lungsentry"), "data dir must not be shipped (tmpfiles creates it)");
    // The packaged files are the repository's (the engine unit's script path matches what is shipped).
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("systemd/lungsentry-engine.service")).unwrap();
    assert!(unit.contains("/usr/share/lungsentry/scripts/build-engine"));

    // Control area: conffiles and maintainer scripts.
    let control = tmp.path().join("control");
    run(Command::new("dpkg-deb").arg("--control").arg(&deb).arg(&control));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/lungsentry/lungsentry.toml");
    let script = |n: &str| std::fs::read_to_string(control.join(n)).unwrap();
    let postinst = script("postinst");
    for want in ["systemd-sysusers", "systemd-tmpfiles --create", "daemon-reload"] {
        assert!(postinst.contains(want), "postinst lacks {want}");
    }
    for name in ["postinst", "prerm", "postrm"] {
        let text = script(name);
        let code: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
        for l in &code {
            assert!(
                !(l.contains("rm ") && l.contains("/var/lib/lungsentry")),
                "{name} must never delete the data dir: {l}"
            );
            assert!(!l.contains("userdel") && !l.contains("deluser"), "{name} must keep the user: {l}");
        }
        let sh = Command::new("sh").arg("-n").arg(control.join(name)).status().unwrap();
        assert!(sh.success(), "{name} is not valid sh");
    }
    assert!(script("postrm").contains("purge"));

    let scratch = tmp.path().join("overlay");
    std::fs::create_dir_all(&scratch).unwrap();
    install_remove_purge(&deb, &scratch);
}

/// Whether installing into this system is safe: root, a dpkg database, nothing of ours present.
fn safe_to_install() -> Result<(), String> {
    let uid = stdout(&Command::new("id").arg("-u").output().unwrap());
    if uid.trim() != "0" {
        return Err("not root".into());
    }
    if !Path::new("/var/lib/dpkg/status").exists() {
        return Err("no dpkg database".into());
    }
    if Command::new("dpkg").args(["-s", "lungsentry"]).output().unwrap().status.success() {
        return Err("a lungsentry package is already installed here".into());
    }
    for p in ["/var/lib/lungsentry", "/etc/lungsentry", "/usr/bin/lungsentry", "/usr/share/lungsentry"] {
        if Path::new(p).exists() {
            return Err(format!("{p} exists already"));
        }
    }
    if Command::new("getent").args(["passwd", "lungsentry"]).output().unwrap().status.success() {
        return Err("a lungsentry user exists already".into());
    }
    if Path::new("/run/systemd/system").exists() {
        return Err("systemd is running here: the package would start a real service".into());
    }
    Ok(())
}

fn stat(path: &str) -> String {
    stdout(&run(Command::new("stat").args(["-c", "%a %U %G"]).arg(path))).trim().to_string()
}

/// Runs this test again inside a private mount namespace whose root is an overlay over `/` (upper layer on a
/// tmpfs), with `LUNGSENTRY_DEB_INSTALL=1` and the .deb already built: dpkg, the user, /etc and /var/lib changes
/// all land in the overlay and vanish with it. Err: overlays cannot be made here.
fn install_in_overlay(deb: &Path, scratch: &Path) -> Result<(), String> {
    const SCRIPT: &str = r#"set -eu
ov="$3"
mount -t tmpfs -o size=3g lungsentry-deb "$ov"
mkdir -p "$ov/upper" "$ov/work" "$ov/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$ov/upper,workdir=$ov/work" "$ov/root"
for m in proc sys dev; do mount --rbind "/$m" "$ov/root/$m"; done
cd /
exec chroot "$ov/root" /usr/bin/env LUNGSENTRY_DEB_INSTALL=1 LUNGSENTRY_DEB_FILE="$2" "$1" --exact --nocapture \
    deb_package_contents_scripts_and_install_remove_purge"#;
    let exe = std::env::current_exe().unwrap();
    let probe = Command::new("unshare").args(["--mount", "--propagation", "private", "true"]).output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        return Err("cannot make a private mount namespace (unshare --mount)".into());
    }
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--fork", "sh", "-c", SCRIPT, "sh"])
        .arg(&exe)
        .arg(deb)
        .arg(scratch)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("--- install/remove/purge in an overlay root ---\n{text}");
    if !out.status.success()
        && (text.contains("mount:") || text.contains("chroot:"))
        && !text.contains("running 1 test")
    {
        return Err(format!("overlay root not possible here: {}", text.lines().last().unwrap_or("")));
    }
    assert!(out.status.success(), "install/remove/purge failed in the overlay root");
    assert!(text.contains("installed, removed and purged"), "the overlay run did not install:\n{text}");
    Ok(())
}

fn install_remove_purge(deb: &Path, scratch: &Path) {
    if std::env::var("LUNGSENTRY_DEB_INSTALL").as_deref() != Ok("1") {
        let root = stdout(&Command::new("id").arg("-u").output().unwrap()).trim() == "0";
        if !root {
            eprintln!("SKIP: dpkg -i / -r / -P (not root)");
        } else if let Err(why) = install_in_overlay(deb, scratch) {
            eprintln!("SKIP: dpkg -i / -r / -P ({why}; LUNGSENTRY_DEB_INSTALL=1 installs into the real system)");
        }
        return;
    }
    if let Err(why) = safe_to_install() {
        eprintln!("SKIP: dpkg -i / -r / -P into the real system ({why})");
        return;
    }
    // From here on the system is ours to clean up, whatever happens.
    struct Cleanup;
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("dpkg").args(["-P", "lungsentry"]).output();
            let _ = std::fs::remove_dir_all("/var/lib/lungsentry");
            let _ = std::fs::remove_dir_all("/etc/lungsentry");
            let _ = Command::new("userdel").arg("lungsentry").output();
            let _ = Command::new("groupdel").arg("lungsentry").output();
        }
    }
    let _cleanup = Cleanup;
    run(Command::new("dpkg").arg("-i").arg(deb));
    assert!(Command::new("getent").args(["passwd", "lungsentry"]).output().unwrap().status.success());
    assert_eq!(stat("/var/lib/lungsentry"), "700 lungsentry lungsentry");
    assert_eq!(stat("/etc/lungsentry"), "750 root lungsentry");
    assert_eq!(stat("/etc/lungsentry/lungsentry.toml"), "640 root lungsentry");
    let installed = std::fs::read_to_string("/etc/lungsentry/lungsentry.toml").unwrap();
    let repo = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/lungsentry.toml")).unwrap();
    assert_eq!(installed, repo);
    // The installed binary finds the installed model and reads the installed config (as the service would).
    let work = tempfile::tempdir().unwrap();
    run(Command::new("/usr/bin/lungsentry")
        .args(["phantom", "--slices", "4", "--seed", "7", "--out"])
        .arg(work.path()));
    let json = stdout(&run(Command::new("/usr/bin/lungsentry").args(["analyze", "--json"]).arg(work.path())));
    let r: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    let manifest = std::fs::read_to_string("/usr/share/lungsentry/models/manifest.toml").unwrap();
    assert!(manifest.contains(r["model"]["sha256"].as_str().unwrap()), "{r}");
    let verify = Command::new("systemd-analyze")
        .args(["verify", "/usr/lib/systemd/system/lungsentry.service"])
        .output()
        .unwrap();
    eprintln!("systemd-analyze verify (installed unit): {}", String::from_utf8_lossy(&verify.stderr));

    // The site edits the config and the daemon writes data.
    let edited = format!("{installed}\n# site edit\n");
    std::fs::write("/etc/lungsentry/lungsentry.toml", &edited).unwrap();
    std::fs::write("/var/lib/lungsentry/marker", b"results").unwrap();

    run(Command::new("dpkg").args(["-r", "lungsentry"]));
    assert!(!Path::new("/usr/bin/lungsentry").exists(), "binary must go on remove");
    assert_eq!(std::fs::read_to_string("/etc/lungsentry/lungsentry.toml").unwrap(), edited, "remove keeps config");
    assert!(Path::new("/var/lib/lungsentry/marker").exists(), "remove keeps data");

    run(Command::new("dpkg").args(["-P", "lungsentry"]));
    assert!(!Path::new("/etc/lungsentry/lungsentry.toml").exists(), "purge removes the config");
    assert!(Path::new("/var/lib/lungsentry/marker").exists(), "purge keeps data");
    assert!(
        !Command::new("dpkg").args(["-s", "lungsentry"]).output().unwrap().status.success(),
        "package still known to dpkg after purge"
    );
    eprintln!("deb: installed, removed and purged; data and config kept as promised");
}
