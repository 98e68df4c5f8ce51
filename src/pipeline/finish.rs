//! finish — a completed series from its segmentations to a recorded result: the 3D analysis, follow-up links,
//! the alert policy, the store commit, and what follows the commit.
//!
//! Owns: one result per series revision (a second completion with nothing new records nothing), the top-up of
//! instances the worker never got, refusing a partial re-analysis of purged pixels, follow-up linking both ways
//! ([`link_follow_ups`], also `analyze --store`'s), the alert policy (once when a series first becomes positive,
//! once when it first shows progression, one flag per exam: `exam_flag`), and after the commit: the metrics, the
//! dashboard key image, queueing the DICOM outputs and amended SRs, the result log line, the results counter.
//! Hands on: the result, its webhook outbox row and links to the store in one transaction; DICOM objects to the
//! outputs outbox; the log line to `notify`.
//! Never: segments a slice the worker already holds, or sends anything itself (the outboxes do).

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;

use super::daemon::Shared;
use super::slices::SeriesWork;
use super::{exam_flag, outputs_sweep};
use crate::result::{SeriesResult, SeriesStatus};
use crate::store::Store;

/// 3D analysis, versioned result, outbox row for a first positive, log line.
pub(super) fn finish_series(
    shared: &Arc<Shared>,
    series_uid: &str,
    work: &mut SeriesWork,
    received_at: &str,
) -> Result<()> {
    let t_start = Instant::now();
    if work.instance_count() == 0 {
        return Ok(());
    }
    // The revision read before the analysis: instances arriving meanwhile leave the series pending.
    let revision = shared.store.series_revision(series_uid)?;
    // Exactly one result per revision: a second completion with nothing recorded in between (a restart's
    // recovery and the re-sending scanner's own completion, a retry after a failed write that did land) would
    // analyse the same instances again and record a duplicate version.
    let previous = shared.store.latest_result(series_uid)?;
    if let (Some(rev), Some(latest)) = (revision, &previous) {
        if latest.series_revision == rev {
            tracing::info!(series = %crate::store::series_log_key(series_uid), stage = "analysis", version = latest.version,
                "already analysed at this revision; no new version");
            return Ok(());
        }
    }
    // Instances recorded by then whose message has not reached this worker yet (behind this completion in its
    // queue, or still being handed over) are segmented now from the spool, so the result covers the revision it is
    // recorded with; so are repeats whose new file replaced the one this worker read (changed content under the same
    // SOP Instance UID). Without this, a result tagged with that revision could miss them or analyse the older
    // content, and every later completion would find the revision "already analysed": acknowledged data never analysed.
    let mut topped_up = 0;
    for crate::store::StoredInstance { meta, path } in shared.store.series_instances(series_uid)? {
        if work.changed_since_added(&meta.sop_instance_uid, &path) {
            let _busy = shared.live.busy("slice segmentation");
            // At completion already: seeding ahead would only move the same work.
            work.add_seeding_ahead(&shared.ctx, meta, &path, false);
            topped_up += 1;
        }
    }
    if topped_up > 0 {
        tracing::info!(series = %crate::store::series_log_key(series_uid), stage = "analysis", topped_up,
            "instances recorded before the analysis but not yet at the series worker, or replaced since it read \
             them, segmented from the spool");
    }
    // Retention purged pixel data this worker does not hold: a partial re-analysis would be wrong. Say so.
    let purged = shared.store.purged_instance_count(series_uid)?;
    let recorded = shared.store.series(series_uid)?.map(|r| r.n_instances as usize).unwrap_or(0);
    if purged > 0 && work.instance_count() < recorded {
        let reason = format!(
            "re-analysis not possible: pixel data of {purged} of {recorded} instances was purged by retention \
             (storage.retention_hours / disk pressure); re-send the whole series to analyse it again"
        );
        tracing::warn!(series = %crate::store::series_log_key(series_uid), stage = "analysis", purged, recorded, "{reason}");
        shared.store.set_series_state(series_uid, "purged", Some(&reason))?;
        return Ok(());
    }
    // The key was computed from the raw identifiers when the instances were recorded (the store hands
    // instance metadata back without them).
    let row = shared.store.series(series_uid)?;
    let patient_key = row.as_ref().map(|s| s.patient_key.clone()).unwrap_or_default();
    let t_analysis = Instant::now();
    let (mut result, slices) =
        work.finish_with_slices(&shared.ctx, &patient_key, received_at, &crate::clock::now_rfc3339(), true);
    // Follow-up: compare with the same patient's latest earlier study (other series of this patient only), and
    // the later studies analysed before this one arrived that now compare with it (stored with this result, in
    // its transaction).
    let links = link_follow_ups(
        &shared.store,
        &patient_key,
        series_uid,
        &mut result,
        (&shared.config.analysis).into(),
        shared.config.alerts.webhook_url.is_some(),
        Some(&shared.config.outputs),
    )?;
    let positive = result.positive;
    let progression = result.progression();
    let involvement = result.involvement_percent();
    let previously_positive = previous.as_ref().map(|r| r.positive).unwrap_or(false);
    // The stored result read back typed (store boundary); one that cannot be read shows no progression.
    let previously_progression =
        previous.as_ref().and_then(|r| SeriesResult::from_json(r.result.clone()).ok()).is_some_and(|r| r.progression());
    // Alerts: once when the series first becomes positive, once when it first shows progression.
    let mut reasons = Vec::new();
    if positive && !previously_positive {
        reasons.push("positive");
    }
    if progression && !previously_progression {
        reasons.push("progression");
    }
    // One flag per exam: another reconstruction of the study that already alerted keeps this one quiet.
    let study_uid = row.as_ref().map(|r| r.study_instance_uid.as_str()).unwrap_or("");
    result.study_alert = exam_flag::one_flag_per_exam(&shared.store, study_uid, series_uid, &mut reasons)?;
    let alert = !reasons.is_empty() && shared.config.alerts.webhook_url.is_some();
    result.alert = Some(!reasons.is_empty());
    result.alert_reasons = Some(reasons.iter().map(|r| r.to_string()).collect());
    let outputs_due = crate::outputs::outbox::wants_outputs(&shared.config.outputs, &result);
    let t_record = Instant::now();
    let version = shared.store.record_result_with_outputs(crate::store::NewResult {
        series_uid,
        revision,
        positive,
        involvement_percent: involvement,
        result_json: &result.to_json(),
        alert,
        outputs_due,
        links: &links,
    })?;
    for l in &links {
        tracing::info!(series = %crate::store::series_log_key(&l.series_instance_uid), version = l.result_version,
            prior = %crate::store::series_log_key(series_uid), alert = l.alert_payload.is_some(),
            amended_sr = l.outputs_due, "follow-up re-linked: a prior study arrived after this series was analysed");
    }
    if links.iter().any(|l| l.outputs_due) {
        tokio::runtime::Handle::current().spawn(outputs_sweep::queue_amended_srs(shared.clone()));
    }
    crate::outputs::outbox::crash_point("after_result");
    // The path to the alert, by stage (the webhook outbox was woken by the commit; what follows is after it).
    // `scripts/bench-e2e` reads this line for its per-stage breakdown.
    tracing::info!(series = %crate::store::series_log_key(series_uid), stage = "analysis", version,
        top_up_ms = (t_analysis - t_start).as_secs_f64() * 1e3,
        analysis_ms = (t_record - t_analysis).as_secs_f64() * 1e3,
        commit_ms = t_record.elapsed().as_secs_f64() * 1e3,
        committed_at_ms = crate::store::now_ms(),
        "result timings");
    result.version = Some(version);
    if result.status == SeriesStatus::Skipped {
        shared.store.set_series_state(series_uid, "skipped", Some(&result.skip_reasons.join("; ")))?;
    }
    if let Some(row) = &row {
        crate::metrics::metrics()
            .stage("last_slice_to_result", (crate::store::now_ms() - row.last_instance_at) as f64 / 1000.0);
    }
    // After the stage above: a test that sees the series counted sees every metric of it.
    crate::metrics::metrics().result(&result);
    if let Err(e) = crate::dashboard::write_key_png(&shared.config.storage.data_dir, &result, &slices) {
        tracing::warn!(series = %crate::store::series_log_key(series_uid), stage = "dashboard", error = %format!("{e:#}"), "no dashboard key image");
    }
    if !shared.config.outputs.dicom.is_empty() {
        let data_dir = &shared.config.storage.data_dir;
        match crate::outputs::outbox::enqueue_result(
            &shared.store,
            &shared.config.outputs,
            data_dir,
            &result,
            &slices,
            version as i64,
        ) {
            Ok(n) if n > 0 => shared.dicom_outbox_wake.notify_one(),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(series = %crate::store::series_log_key(series_uid), stage = "outputs", error = %format!("{e:#}"),
                "DICOM outputs could not be made")
            }
        }
    }
    crate::notify::log_result(&result);
    shared.results_tx.send_modify(|n| *n += 1);
    Ok(())
}

/// Follow-up linking of `result` (about to be recorded for `series_uid`), as the daemon and `analyze --store` do
/// it, from one read of the patient's other series: forward, `follow_up` with the latest earlier study
/// ([`crate::analysis::followup::link`]); backward, the links to store for later studies whose prior study it
/// now is ([`crate::analysis::followup::relinks`]). With `webhook`, a link that newly shows progression carries
/// an alert (the later series' result as it now reads, `alert_reasons: ["progression"]`). With `outputs`, a link
/// whose later series' result some destination wants an SR of is marked `outputs_due` (its amended SR).
pub fn link_follow_ups(
    store: &Store,
    patient_key: &str,
    series_uid: &str,
    result: &mut SeriesResult,
    rule: crate::analysis::followup::ProgressionRule,
    webhook: bool,
    outputs: Option<&crate::outputs::OutputsConfig>,
) -> Result<Vec<crate::store::FollowUpLink>> {
    if patient_key.is_empty() || !result.is_analysed() {
        return Ok(Vec::new());
    }
    let others: Vec<crate::store::StoredResult> =
        store.results_for_patient(patient_key)?.into_iter().filter(|r| r.series_instance_uid != series_uid).collect();
    // The comparison reads results as JSON (the stored ones are JSON): this one joins them as its JSON.
    let values: Vec<serde_json::Value> = others.iter().map(|r| r.result.clone()).collect();
    let current = result.to_json();
    if let Some(f) = crate::analysis::followup::prior_comparison(&current, &values, rule) {
        result.follow_up = Some(f);
    }
    let mut links = Vec::new();
    for rl in crate::analysis::followup::relinks(&current, &values, rule) {
        let later = &others[rl.index];
        // The later series' stored result read back typed (store boundary), as it now reads.
        let mut now_reads = SeriesResult::from_json(later.result.clone())?;
        now_reads.follow_up = Some(rl.follow_up.clone());
        let outputs_due = outputs.is_some_and(|cfg| crate::outputs::outbox::wants_sr(cfg, &now_reads));
        let alert_payload = (webhook && rl.newly_progressed).then(|| {
            now_reads.alert = Some(true);
            now_reads.alert_reasons = Some(vec!["progression".to_string()]);
            now_reads.to_json()
        });
        links.push(crate::store::FollowUpLink {
            series_instance_uid: later.series_instance_uid.clone(),
            result_version: later.version,
            prior_series_instance_uid: series_uid.to_string(),
            follow_up: serde_json::to_value(&rl.follow_up)?,
            alert_payload,
            outputs_due,
        });
    }
    Ok(links)
}
