//! test_hooks — fault injection for the tests, compiled in only with the `test-hooks` cargo feature.
//!
//! Owns: the points where a test build aborts the process ([`crash_point`], `LUNGSENTRY_TEST_CRASH_AT`) or
//! panics ([`panic_point`], `LUNGSENTRY_TEST_PANIC_AT`) when the environment names them.
//! Hands on: nothing; callers place the points.
//! Never: does anything in a release build without the feature — both functions are then empty and the
//! environment variables are not even read, so a variable left set on an appliance changes nothing.
//!
//! `scripts/test` runs the test files that need these hooks a second time with `--features test-hooks`; in the
//! default run those tests are ignored with that reason.

/// Whether the hooks are compiled in (`--features test-hooks`).
pub const ENABLED: bool = cfg!(feature = "test-hooks");

/// Aborts the process (as a crash or SIGKILL would end it) when `LUNGSENTRY_TEST_CRASH_AT` names this point.
/// Points: `after_result` (result committed, nothing built), `after_output_files` (objects written, outbox rows
/// not committed), `after_amended_sr_file` (a link's amended SR written, not queued).
#[cfg(feature = "test-hooks")]
pub fn crash_point(name: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT.get_or_init(|| std::env::var("LUNGSENTRY_TEST_CRASH_AT").ok()).as_deref() == Some(name) {
        tracing::error!(point = name, "LUNGSENTRY_TEST_CRASH_AT: aborting");
        std::process::abort();
    }
}

/// Without the `test-hooks` feature: nothing.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn crash_point(_name: &str) {}

/// Panics when `LUNGSENTRY_TEST_PANIC_AT` names this point: `NAME` panics the first time the point is reached
/// (a one-off fault), `NAME:always` every time (a fault that does not go away). Point: `completion` (the
/// completion ticker, holding the completion tracker's lock, right after it took the series it completes).
#[cfg(feature = "test-hooks")]
pub fn panic_point(name: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    static FIRED: AtomicBool = AtomicBool::new(false);
    let Some(at) = AT.get_or_init(|| std::env::var("LUNGSENTRY_TEST_PANIC_AT").ok()).as_deref() else { return };
    let always = at.strip_suffix(":always") == Some(name);
    if always || (at == name && !FIRED.swap(true, Ordering::SeqCst)) {
        tracing::error!(point = name, "LUNGSENTRY_TEST_PANIC_AT: panicking");
        panic!("LUNGSENTRY_TEST_PANIC_AT={at}: injected panic");
    }
}

/// Without the `test-hooks` feature: nothing.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn panic_point(_name: &str) {}
