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
//! **The scanner is never made to wait long:** a response is held at most `[engine] max_response_hold_s`
//! (default 1.5 s, well under any scanner's DIMSE timeout: often 30–60 s). A slow engine (a Jetson fallen back to
//! tract on its CPU cores, an emulated build) would otherwise hold every response for as long as a slice takes, and
//! the scanner aborts the association. Past the hold the instance is answered at disk speed: it is already spooled
//! and recorded, so the backlog simply grows (in seconds of work; the latency it adds to the alert is
//! `lungsentry_backlog_seconds` in `/metrics` and on the dashboard), and the longest hold and the count of holds
//! cut short are exported. Memory stays bounded: past [`MAX_QUEUED_SLICES`] an instance is not queued to its worker
//! at all ([`Backlog::enqueue`] returns None); it stays on disk and the worker segments it from the spool when the
//! series completes (its top-up of instances it never got).
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

/// Queued slices beyond which responses wait (up to the hold cap) whatever the time estimate says, and beyond
/// which new instances are left to the spool instead of being queued (bounds the queue's memory).
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
    /// Longest a response was held so far, µs.
    longest_hold_us: AtomicU64,
    /// Responses whose hold reached the cap (answered with the backlog still over budget).
    holds_capped: AtomicU64,
    /// Instances left to the spool because the queue was at [`MAX_QUEUED_SLICES`].
    left_to_spool: AtomicU64,
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
            longest_hold_us: AtomicU64::new(0),
            holds_capped: AtomicU64::new(0),
            left_to_spool: AtomicU64::new(0),
        })
    }

    /// Counts one slice in; the returned token travels with it to the worker. None when the queue is at
    /// [`MAX_QUEUED_SLICES`]: the slice is not queued (it stays on disk until its series completes).
    pub fn enqueue(self: &Arc<Self>) -> Option<Queued> {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= MAX_QUEUED_SLICES {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.left_to_spool.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(Queued(self.clone()))
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
        self.queued() >= MAX_QUEUED_SLICES || self.seconds() > self.budget_s
    }

    /// Waits until the queued work is within budget, or `max_hold` has passed (returns at once when it is within
    /// budget). Returns how long it held.
    pub async fn admit(&self, max_hold: Duration) -> Duration {
        let t0 = Instant::now();
        let deadline = tokio::time::Instant::now() + max_hold;
        let mut capped = false;
        while self.over() {
            let changed = self.changed.notified();
            if !self.over() {
                break;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                capped = true;
                break;
            }
            // The 100 ms only guards against a missed wake-up; every drop of a token notifies.
            let wait = (deadline - now).min(Duration::from_millis(100));
            let _ = tokio::time::timeout(wait, changed).await;
        }
        let held = t0.elapsed();
        if capped {
            self.holds_capped.fetch_add(1, Ordering::Relaxed);
        }
        self.longest_hold_us.fetch_max(held.as_micros() as u64, Ordering::Relaxed);
        held
    }

    /// Longest a response was held so far, seconds.
    pub fn longest_hold_s(&self) -> f64 {
        self.longest_hold_us.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Responses answered when their hold reached the cap, the backlog still over budget.
    pub fn holds_capped(&self) -> u64 {
        self.holds_capped.load(Ordering::Relaxed)
    }

    /// Instances left to the spool (not queued) because the queue was at its cap.
    pub fn left_to_spool(&self) -> u64 {
        self.left_to_spool.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admits_within_budget_and_waits_above_it() {
        let b = Backlog::new(0.2);
        // No history: 50 ms a slice, so 4 slices (0.2 s) are within budget and the fifth is over.
        let tokens: Vec<_> = (0..5).map(|_| b.enqueue().unwrap()).collect();
        assert_eq!(b.queued(), 5);
        assert!(b.over());
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.admit(Duration::from_secs(60)).await })
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

    #[tokio::test]
    async fn a_response_is_held_at_most_the_cap_and_the_queue_stops_at_its_memory_cap() {
        let b = Backlog::new(0.2);
        let tokens: Vec<_> = (0..MAX_QUEUED_SLICES).map(|_| b.enqueue().expect("below the cap")).collect();
        // At the cap: the next instance is left to the spool, counted, and the queue does not grow.
        assert!(b.enqueue().is_none());
        assert_eq!((b.queued(), b.left_to_spool()), (MAX_QUEUED_SLICES, 1));
        // Nothing drains (a stalled engine): the hold ends at the cap, not when the work is done.
        let held = tokio::time::timeout(Duration::from_secs(30), b.admit(Duration::from_millis(300)))
            .await
            .expect("the hold did not end at its cap");
        assert!(held >= Duration::from_millis(300), "held {held:?}");
        assert_eq!(b.holds_capped(), 1);
        assert!(b.longest_hold_s() >= 0.3);
        drop(tokens);
        assert_eq!(b.queued(), 0);
        // Within budget: no hold at all, nothing capped.
        assert!(b.admit(Duration::from_secs(30)).await < Duration::from_secs(30));
        assert_eq!(b.holds_capped(), 1);
    }

    #[test]
    fn rate_follows_the_intervals_between_segmentations() {
        let b = Backlog::new(10.0);
        let _t: Vec<_> = (0..20).map(|_| b.enqueue().unwrap()).collect();
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
