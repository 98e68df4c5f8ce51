//! gauges — what `/metrics` reads from the running pipeline at scrape time: live series workers, slices queued
//! to them and the seconds of segmentation that makes, how long the backlog held C-STORE responses, how series
//! completed (by rule), and the depth of both outboxes by state.
//!
//! Hands on: a closure that renders them as Prometheus text, to `http` (through `daemon`).
//! Never: counts events itself (that is `crate::metrics`) or writes anything.

use std::sync::Arc;

use super::daemon::Shared;
use super::recovery;

/// The gauges `/metrics` reads at scrape time: live series workers, slices queued to them, outbox depths.
pub(super) fn scrape(
    shared: Arc<Shared>,
    readers: Arc<crate::store::ReadPool>,
) -> Arc<dyn Fn() -> String + Send + Sync> {
    Arc::new(move || {
        use crate::metrics::gauge;
        let mut out = String::new();
        let workers = recovery::lock(&shared.workers).values().filter(|tx| !tx.is_closed()).count();
        let queued = shared.backlog.queued();
        gauge(
            &mut out,
            "lungsentry_series_workers",
            "Series with a live worker (receiving, analysing or lingering).",
            &[(String::new(), workers as f64)],
        );
        gauge(
            &mut out,
            "lungsentry_worker_queue_depth",
            "Slices queued to series workers, not yet segmented.",
            &[(String::new(), queued as f64)],
        );
        gauge(
            &mut out,
            "lungsentry_backlog_seconds",
            "Estimated seconds of segmentation queued (C-STORE responses wait above engine.max_backlog_s).",
            &[(String::new(), shared.backlog.seconds())],
        );
        backlog_and_completion_gauges(&shared, &mut out);
        if let Ok(c) = readers.get().outbox_counts() {
            gauge(
                &mut out,
                "lungsentry_webhook_outbox",
                "Webhook alert outbox rows by state.",
                &[
                    ("state=\"pending\"".into(), c.pending as f64),
                    ("state=\"failing\"".into(), c.failing as f64),
                    ("state=\"delivered\"".into(), c.delivered as f64),
                ],
            );
        }
        if let Ok(c) = readers.get().dicom_outbox_counts() {
            gauge(
                &mut out,
                "lungsentry_dicom_outbox",
                "DICOM output outbox rows by state (parked: refused for good).",
                &[
                    ("state=\"pending\"".into(), c.pending as f64),
                    ("state=\"failing\"".into(), c.failing as f64),
                    ("state=\"delivered\"".into(), c.delivered as f64),
                    ("state=\"parked\"".into(), c.parked as f64),
                ],
            );
        }
        out
    })
}

/// The response-hold and completion-rule gauges (issue 24): what pacing cost the senders, how series completed.
fn backlog_and_completion_gauges(shared: &Shared, out: &mut String) {
    use crate::metrics::gauge;
    let b = &shared.backlog;
    gauge(
        out,
        "lungsentry_response_hold_longest_seconds",
        "Longest a C-STORE response was held by the backlog pacing (at most engine.max_response_hold_s).",
        &[(String::new(), b.longest_hold_s())],
    );
    gauge(
        out,
        "lungsentry_response_holds_capped",
        "C-STORE responses answered at the hold cap with the backlog still over engine.max_backlog_s.",
        &[(String::new(), b.holds_capped() as f64)],
    );
    gauge(
        out,
        "lungsentry_instances_left_to_spool",
        "Instances not queued to their worker (queue at its cap), segmented from the spool at completion.",
        &[(String::new(), b.left_to_spool() as f64)],
    );
    let by_rule = recovery::tracker(shared).completed_by_rule();
    gauge(
        out,
        "lungsentry_series_completed",
        "Series completions by rule (count, stack, quiet, stable: see series::CompletionTracker).",
        &by_rule.iter().map(|(r, n)| (format!("rule=\"{}\"", r.name()), *n as f64)).collect::<Vec<_>>(),
    );
}
