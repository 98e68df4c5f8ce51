//! recovery — what the daemon does after a panic in the state its instance path and completion ticker share,
//! so that one panic never leaves it up but refusing every C-STORE.
//!
//! Owns: locking the shared mutexes without `unwrap()`: the series-worker map is taken back as it is after a
//! panic ([`lock`]: a map of channel senders is whole after any panic); the completion tracker, whose state a
//! panic may have left half-updated (a series taken out but never handed on), is rebuilt from the store as at
//! start-up ([`tracker`]: every series with instances and no result of its revision is registered again, so
//! the stable timeout completes it). And the supervisor that restarts the completion ticker when it panicked
//! ([`supervise_ticker`]).
//! Escalation: the [`MAX_PANICS`]th ticker panic within [`PANIC_WINDOW`] means the fault is not a one-off; the daemon
//! then exits with status [`EXIT_WEDGED`] so systemd (`Restart=on-failure`) starts it afresh, and if it keeps
//! failing, its start limit makes the failure visible instead of a daemon that looks up.
//! Hands on: nothing new; the same tracker and workers, usable again.
//! Never: hides a panic: each one is logged at ERROR with what was rebuilt.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::daemon::Shared;
use crate::series::CompletionTracker;

/// Ticker panics within [`PANIC_WINDOW`] at which the daemon exits (the ones before are recovered).
pub const MAX_PANICS: usize = 3;
/// The window [`MAX_PANICS`] counts in.
pub const PANIC_WINDOW: Duration = Duration::from_secs(600);
/// Exit status when the completion path keeps panicking (EX_SOFTWARE) or its state cannot be rebuilt.
pub const EXIT_WEDGED: i32 = 70;

/// Locks `m`; after a panic poisoned it, takes the data as the panic left it (for state that is whole after
/// any panic, such as the series-worker map).
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Locks the completion tracker. After a panic poisoned it, it is rebuilt from the store first (see the module
/// docs) and the poison cleared; when the store cannot be read the daemon exits with [`EXIT_WEDGED`].
pub(super) fn tracker(shared: &Shared) -> MutexGuard<'_, CompletionTracker> {
    match shared.tracker.lock() {
        Ok(g) => g,
        Err(poisoned) => {
            let mut g = poisoned.into_inner();
            shared.tracker.clear_poison();
            match shared.store.series_pending_analysis() {
                Ok(pending) => {
                    let now = Instant::now();
                    *g = CompletionTracker::default();
                    for uid in &pending {
                        g.instance(uid, None, None, now);
                    }
                    tracing::error!(
                        stage = "completion",
                        pending = pending.len(),
                        "a panic left the completion tracker poisoned: rebuilt from the store (series without a \
                         result complete after series.stable_timeout_s)"
                    );
                }
                Err(e) => {
                    tracing::error!(stage = "completion", error = %format!("{e:#}"),
                        "a panic left the completion tracker poisoned and the store cannot be read to rebuild it: \
                         exiting for a restart");
                    std::process::exit(EXIT_WEDGED);
                }
            }
            g
        }
    }
}

/// Runs the completion ticker, starting it again after a panic; exits the process with [`EXIT_WEDGED`] when it
/// panicked [`MAX_PANICS`] times within [`PANIC_WINDOW`]. Returns when the ticker returns (shutdown).
pub(super) async fn supervise_ticker(shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    let mut panics: VecDeque<Instant> = VecDeque::new();
    loop {
        let run = tokio::spawn(super::completion::completion_ticker(shared.clone(), shutdown.clone()));
        match run.await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                let now = Instant::now();
                panics.retain(|t| now.duration_since(*t) < PANIC_WINDOW);
                panics.push_back(now);
                if panics.len() >= MAX_PANICS {
                    tracing::error!(
                        stage = "completion",
                        panics = panics.len(),
                        window_s = PANIC_WINDOW.as_secs(),
                        exit_status = EXIT_WEDGED,
                        "the completion ticker keeps panicking: exiting so systemd restarts the daemon"
                    );
                    std::process::exit(EXIT_WEDGED);
                }
                tracing::error!(
                    stage = "completion",
                    panics = panics.len(),
                    "the completion ticker panicked; restarting it"
                );
            }
            Err(_) => return, // cancelled: the runtime is shutting down
        }
    }
}
