//! backlog — the slices received but not yet segmented, counted in seconds of work, and the pacing of C-STORE
//! responses by it.
//!
//! An instance is acknowledged once it is spooled (fsync) and recorded; its segmentation is queued to the series
//! worker. The queue itself is cheap (metadata and a path per slice: the worker reads the pixels from the spool),
//! so it is not bounded in slices but in **time**: while the queued work would take longer than
//! `[engine] max_backlog_s` to drain, responses wait (the sender is paced at the engine's speed). Below that, the
//! scanner is answered at disk speed. The budget is what bounds last-slice-to-alert latency after an unpaced send:
//! about `max_backlog_s` of segmentation plus the 3D analysis.
//!
//! Drain time = queued slices × the measured time between segmentations finishing while work was queued (an
//! exponentially weighted mean over the whole daemon, so several series segmenting at once share one rate).
//! A hard cap on queued slices bounds memory when the estimate has no history yet.
//!
//! Owns: the count, the rate estimate, the wait. Never: decides statuses or touches the spool.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Queued slices beyond which responses wait whatever the time estimate says.
pub const MAX_QUEUED_SLICES: usize = 4096;
/// Rate assumed before the first measurement (a 2-core x86-64 machine runs the shipped model at ~25–50 ms/slice).
const INITIAL_SLICE_S: f64 = 0.05;
/// Weight of the newest interval in the mean.
const EWMA_ALPHA: f64 = 0.1;

/// Segmentation work queued across all series workers.
pub struct Backlog {
    queued: AtomicUsize,
    /// Mean seconds between segmentations finishing while work was queued, as f64 bits.
    slice_s: AtomicU64,
    /// When the last segmentation finished (None before the first, and after the queue ran empty).
    last_done: Mutex<Option<Instant>>,
    budget_s: f64,
    changed: Notify,
}

/// One queued slice; dropping it (segmented, or its worker gone) takes it off the count.
pub struct Queued(Arc<Backlog>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

impl Backlog {
    /// A backlog whose responses wait above `budget_s` seconds of queued work.
    pub fn new(budget_s: f64) -> Arc<Backlog> {
        Arc::new(Backlog {
            queued: AtomicUsize::new(0),
            slice_s: AtomicU64::new(INITIAL_SLICE_S.to_bits()),
            last_done: Mutex::new(None),
            budget_s,
            changed: Notify::new(),
        })
    }

    /// Counts one slice in; the returned token travels with it to the worker.
    pub fn enqueue(self: &Arc<Self>) -> Queued {
        self.queued.fetch_add(1, Ordering::AcqRel);
        Queued(self.clone())
    }

    /// A segmentation finished (call before dropping its token).
    pub fn segmented(&self) {
        let now = Instant::now();
        let mut last = self.last_done.lock().unwrap();
        if let Some(prev) = *last {
            let dt = now.duration_since(prev).as_secs_f64();
            let old = f64::from_bits(self.slice_s.load(Ordering::Acquire));
            self.slice_s.store((old + EWMA_ALPHA * (dt - old)).to_bits(), Ordering::Release);
        }
        // Only intervals with work waiting measure the rate; an idle gap would not.
        *last = if self.queued.load(Ordering::Acquire) > 1 { Some(now) } else { None };
    }

    /// Slices queued and not yet segmented.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Estimated seconds to segment what is queued.
    pub fn seconds(&self) -> f64 {
        self.queued() as f64 * f64::from_bits(self.slice_s.load(Ordering::Acquire))
    }

    fn over(&self) -> bool {
        self.queued() > MAX_QUEUED_SLICES || self.seconds() > self.budget_s
    }

    /// Waits until the queued work is within budget (returns at once when it is).
    pub async fn admit(&self) {
        while self.over() {
            let changed = self.changed.notified();
            if !self.over() {
                break;
            }
            // The timeout only guards against a missed wake-up; every drop of a token notifies.
            let _ = tokio::time::timeout(Duration::from_millis(100), changed).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admits_within_budget_and_waits_above_it() {
        let b = Backlog::new(0.2);
        // No history: 50 ms a slice, so 4 slices (0.2 s) are within budget and the fifth is over.
        let tokens: Vec<_> = (0..5).map(|_| b.enqueue()).collect();
        assert_eq!(b.queued(), 5);
        assert!(b.over());
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.admit().await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiter.is_finished(), "admitted while over budget");
        let mut tokens = tokens.into_iter();
        b.segmented();
        drop(tokens.next());
        tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("not admitted after a slice drained")
            .unwrap();
        assert_eq!(b.queued(), 4);
    }

    #[test]
    fn rate_follows_the_intervals_between_segmentations() {
        let b = Backlog::new(10.0);
        let _t: Vec<_> = (0..20).map(|_| b.enqueue()).collect();
        b.segmented();
        for _ in 0..60 {
            std::thread::sleep(Duration::from_millis(2));
            b.segmented();
        }
        let s = f64::from_bits(b.slice_s.load(Ordering::Acquire));
        assert!(s < 0.02, "mean slice time {s} did not move from 50 ms towards ~2 ms");
        assert!((b.seconds() - 20.0 * s).abs() < 1e-9);
    }
}
