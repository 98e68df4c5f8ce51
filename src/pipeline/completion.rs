//! completion — the ticker that asks the completion rule (`series::CompletionTracker`) every 20 ms which series
//! are whole, and hands each to its worker; it also beats the liveness heart (a ticker that stops is a runtime
//! that stopped scheduling).
//!
//! Owns: the tick, and the test hook that panics with the tracker's lock held (`recovery` rebuilds it).
//! Hands on: `WorkerMsg::Complete` to the series `worker`.
//! Never: decides completion itself, or runs after a panic on its own (`recovery::supervise_ticker` restarts it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::daemon::Shared;
use super::recovery;
use super::worker::{self, WorkerMsg};

/// Asks the tracker for complete series every 20 ms until `shutdown` changes.
pub(super) async fn completion_ticker(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    // Every 20 ms: a series proven whole (series::CompletionTracker) is analysed within a tick, not a quiet period.
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            _ = shutdown.changed() => return,
        }
        shared.live.beat();
        let done = {
            let mut tracker = recovery::tracker(&shared);
            let done = tracker.take_complete(Instant::now(), &shared.config.series);
            if !done.is_empty() {
                // Test builds only: a panic here, lock held, the completed series taken out (recovery.rs).
                crate::test_hooks::panic_point("completion");
            }
            done
        };
        for (series_uid, rule) in done {
            tracing::info!(series = %crate::store::series_log_key(&series_uid), stage = "completion", rule = rule.name(),
                at_ms = crate::store::now_ms(), "series complete");
            worker::enqueue(&shared, &series_uid, WorkerMsg::Complete).await;
        }
    }
}
