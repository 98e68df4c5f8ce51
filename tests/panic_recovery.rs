//! No wedge on panic (issue 21): a panic inside the completion path — the completion ticker, holding the
//! completion tracker's lock, right after it took the series it completes — used to poison that lock, end the
//! ticker, and make every later C-STORE answer A700 until a watchdog restart. Injected with the test build's
//! `LUNGSENTRY_TEST_PANIC_AT` hook (`--features test-hooks`; `scripts/test` runs this file that way):
//!
//! - a one-off panic: the daemon rebuilds the tracker from the store, the series it was completing is still
//!   analysed, and the next series is stored (every C-STORE Success) and analysed;
//! - a panic that keeps coming back: the daemon exits with status 70 for systemd to restart it (it never stays up
//!   refusing), and after the restart without the fault the acknowledged series is analysed.

mod common;

use std::time::Duration;

use common::*;

const NEEDS_HOOKS: &str = "needs the fault-injection hooks: run with --features test-hooks (scripts/test does)";

const CONFIG: &str = "[series]\nquiet_period_s = 0.5\nstable_timeout_s = 3.0\n";

#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "needs --features test-hooks (the fault-injection hook; scripts/test runs it)"
)]
fn a_one_off_panic_in_the_completion_path_is_recovered() {
    #[allow(clippy::assertions_on_constants)] // false in a build without the feature: the message says so
    {
        assert!(lungsentry::test_hooks::ENABLED, "{NEEDS_HOOKS}");
    }
    if !model_shipped() {
        eprintln!("SKIP: models/manifest.toml is not shipped yet");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    let a = phantom(&a_dir, 21_501, 12, "severe")["series_instance_uid"].as_str().unwrap().to_string();
    let b = phantom(&b_dir, 21_502, 12, "none")["series_instance_uid"].as_str().unwrap().to_string();
    let d = Daemon::start_env(&tmp.path().join("d"), CONFIG, &[("LUNGSENTRY_TEST_PANIC_AT", "completion")]);
    let (ok, out) = storescu(d.port, "CT1", &[&a_dir], true);
    assert!(ok && out.matches("(Success)").count() == 12, "{out}");
    // Its completion panics; the rebuilt tracker completes it again after the stable timeout.
    let ra = d.wait_result(&a, 1, Duration::from_secs(300));
    assert_eq!(ra.result["n_slices"], 12, "{}", ra.result);
    let log = d.log();
    assert!(log.contains("LUNGSENTRY_TEST_PANIC_AT: panicking"), "the fault was not injected:\n{log}");
    assert!(log.contains("completion tracker poisoned: rebuilt from the store"), "{log}");
    assert!(log.contains("the completion ticker panicked; restarting it"), "{log}");
    // Not wedged: the next series is stored in full and analysed.
    let (ok, out) = storescu(d.port, "CT1", &[&b_dir], true);
    assert!(ok, "{out}");
    assert_eq!(out.matches("(Success)").count(), 12, "every C-STORE after the panic must succeed:\n{out}");
    assert!(!out.contains("Refused"), "{out}");
    let rb = d.wait_result(&b, 1, Duration::from_secs(300));
    assert_eq!(rb.result["n_slices"], 12, "{}", rb.result);
    assert_eq!(d.store().latest_result(&a).unwrap().unwrap().version, 1, "A analysed once");
    let mut d = d;
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon must stay up after a one-off panic");
    d.kill9();
}

#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "needs --features test-hooks (the fault-injection hook; scripts/test runs it)"
)]
fn a_completion_path_that_keeps_panicking_exits_non_zero_for_systemd() {
    #[allow(clippy::assertions_on_constants)] // false in a build without the feature: the message says so
    {
        assert!(lungsentry::test_hooks::ENABLED, "{NEEDS_HOOKS}");
    }
    if !model_shipped() {
        eprintln!("SKIP: models/manifest.toml is not shipped yet");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let a_dir = tmp.path().join("a");
    let a = phantom(&a_dir, 21_503, 12, "severe")["series_instance_uid"].as_str().unwrap().to_string();
    let mut d = Daemon::start_env(&tmp.path().join("d"), CONFIG, &[("LUNGSENTRY_TEST_PANIC_AT", "completion:always")]);
    let (ok, out) = storescu(d.port, "CT1", &[&a_dir], true);
    assert!(ok && out.matches("(Success)").count() == 12, "{out}");
    // Three panics (one per completion attempt: quiet period, then the stable timeout after each rebuild).
    let st = d.wait_exit(Duration::from_secs(120));
    assert_eq!(st.code(), Some(70), "exit status for systemd's Restart=on-failure; log:\n{}", d.log());
    assert!(d.log().contains("keeps panicking: exiting so systemd restarts the daemon"), "{}", d.log());
    assert!(d.store().latest_result(&a).unwrap().is_none(), "nothing analysed while it panicked");
    // systemd's restart, without the fault: nothing acknowledged was lost, the series is analysed.
    let d = d.restart();
    let r = d.wait_result(&a, 1, Duration::from_secs(300));
    assert_eq!(r.result["n_slices"], 12, "{}", r.result);
    let mut d = d;
    d.kill9();
}
