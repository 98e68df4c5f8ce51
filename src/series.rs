//! series — which instances form a series, whether the series is analysable, the order of its slices, and
//! when it is complete.
//!
//! Owns: eligibility rules (axial CT, not a localizer, secondary or reformatted/projection image, slice
//! thickness ≤ `max_slice_thickness_mm`, at least `min_slices` slices), slice ordering along the slice normal
//! with gap and duplicate detection, and the completion rules (see [`CompletionTracker`]): the count a sender
//! stated reached; or the senders released and the slices form one gap-free, evenly spaced stack; or, the
//! fallbacks, released and `quiet_period_s` without a new instance, or `stable_timeout_s` without one at all.
//! Hands to the next stage: an ordered slice list and a "complete" decision per series.
//! Never: touches pixel data, the disk or the network — everything here is a pure function of instance
//! attributes and clock readings, so it is tested without a daemon.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::SeriesConfig;
use crate::instance::InstanceMeta;
use crate::receive::AssociationId;

/// Image Type values (any position) that mark a reformat or a projection, never an axial reconstruction.
const REFORMAT_VALUES: &[&str] = &["REFORMATTED", "MPR", "MIP", "MINIP", "PROJECTION IMAGE", "CURVED"];

/// Reasons an instance can never be analysed, whatever the rest of its series looks like.
///
/// Image Type: value 2 `SECONDARY`, `LOCALIZER`, or a reformat/projection value (see `REFORMAT_VALUES`) skip the
/// instance; value 1 `DERIVED` alone does not (`DERIVED\PRIMARY\AXIAL` reconstructions are analysed).
pub fn instance_skip_reasons(meta: &InstanceMeta) -> Vec<String> {
    let mut reasons = Vec::new();
    if !meta.is_ct_image_class() {
        reasons.push(format!("SOP class {} is not a CT image (stored, not analysed)", meta.sop_class_uid));
        return reasons;
    }
    // Only local files (`analyze`, `eval`) or a store written by a version that accepted blank UIDs can get
    // here: the receive path refuses them (Type 1, issue 21).
    if meta.derived_uids.iter().any(|u| u != "SOPInstanceUID") {
        reasons.push(format!(
            "{} missing in the dataset: grouped under a derived UID (not analysed; the daemon refuses it at receive)",
            meta.derived_uids.iter().filter(|u| *u != "SOPInstanceUID").cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    if !meta.modality.is_empty() && meta.modality != "CT" {
        reasons.push(format!("modality {} is not CT", meta.modality));
    }
    if !meta.has_pixel_data {
        reasons.push("no Pixel Data".into());
    }
    let it = &meta.image_type;
    if it.iter().any(|v| v == "LOCALIZER") {
        reasons.push("localizer (scout) image".into());
    }
    // Value 2 SECONDARY: reformats, MIPs, screen captures. `DERIVED\PRIMARY\AXIAL` (an axial reconstruction
    // some scanners, e.g. PET/CT, type as derived) is a primary image and is analysed.
    if it.get(1).map(|v| v == "SECONDARY").unwrap_or(false) {
        reasons.push(format!("derived/secondary image (ImageType {})", it.join("\\")));
    }
    if it.iter().any(|v| REFORMAT_VALUES.contains(&v.as_str())) {
        reasons.push(format!("reformatted or projection image (ImageType {})", it.join("\\")));
    }
    match meta.normal() {
        Some(n) if n[2].abs() < 0.9 => {
            reasons.push(format!("not axial: slice normal ({:.2}, {:.2}, {:.2})", n[0], n[1], n[2]))
        }
        Some(_) => {}
        None => reasons.push("no Image Orientation (Patient)".into()),
    }
    if meta.image_position.is_none() {
        reasons.push("no Image Position (Patient)".into());
    }
    if meta.pixel_spacing.is_none() {
        reasons.push("no Pixel Spacing".into());
    }
    reasons
}

/// Reasons the daemon would skip this series (empty = eligible). `metas` are the instances of one series.
pub fn series_skip_reasons(metas: &[&InstanceMeta], cfg: &SeriesConfig) -> Vec<String> {
    let mut reasons: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    for m in metas {
        for r in instance_skip_reasons(m) {
            if seen.insert(r.clone()) {
                reasons.push(r);
            }
        }
    }
    let analysable = metas.iter().filter(|m| instance_skip_reasons(m).is_empty()).count();
    if analysable < cfg.min_slices {
        reasons.push(format!("{analysable} analysable slice(s), fewer than series.min_slices = {}", cfg.min_slices));
    }
    let thickest = metas.iter().filter_map(|m| m.slice_thickness).fold(f64::NAN, f64::max);
    if thickest > cfg.max_slice_thickness_mm {
        reasons.push(format!(
            "slice thickness {thickest} mm exceeds series.max_slice_thickness_mm = {}",
            cfg.max_slice_thickness_mm
        ));
    }
    reasons
}

/// The slices of a series in anatomical order, with what is wrong with the spacing.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SliceOrder {
    /// Indices into the input slice, sorted by position along the slice normal (then instance number).
    pub order: Vec<usize>,
    /// Position of each sorted slice along the normal, mm.
    pub positions_mm: Vec<f64>,
    /// Median distance between consecutive distinct positions, mm (None for a single position).
    pub spacing_mm: Option<f64>,
    /// Pairs of sorted indices (i, i+1) whose distance exceeds 1.5 × the median spacing: missing slices.
    pub gaps: Vec<(usize, usize)>,
    /// Sorted indices whose position repeats the previous slice's (within 0.01 mm): duplicates.
    pub duplicates: Vec<usize>,
}

/// Orders slices along their normal (the first slice's orientation), falling back to Instance Number.
pub fn order_slices(metas: &[&InstanceMeta]) -> SliceOrder {
    let normal = metas.iter().find_map(|m| m.normal()).unwrap_or([0.0, 0.0, 1.0]);
    let pos = |m: &InstanceMeta| -> f64 {
        match m.image_position {
            Some(p) => p[0] * normal[0] + p[1] * normal[1] + p[2] * normal[2],
            None => m.instance_number.unwrap_or(0) as f64,
        }
    };
    let mut order: Vec<usize> = (0..metas.len()).collect();
    order.sort_by(|&a, &b| {
        pos(metas[a])
            .partial_cmp(&pos(metas[b]))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(metas[a].instance_number.cmp(&metas[b].instance_number))
            .then(metas[a].sop_instance_uid.cmp(&metas[b].sop_instance_uid))
    });
    let positions_mm: Vec<f64> = order.iter().map(|&i| pos(metas[i])).collect();
    let mut duplicates = Vec::new();
    let mut steps = Vec::new();
    for i in 1..positions_mm.len() {
        let d = positions_mm[i] - positions_mm[i - 1];
        if d.abs() < 0.01 {
            duplicates.push(i);
        } else {
            steps.push(d);
        }
    }
    let spacing_mm = median(&steps);
    let mut gaps = Vec::new();
    if let Some(s) = spacing_mm {
        for i in 1..positions_mm.len() {
            let d = positions_mm[i] - positions_mm[i - 1];
            if d > 1.5 * s {
                gaps.push((i - 1, i));
            }
        }
    }
    SliceOrder { order, positions_mm, spacing_mm, gaps, duplicates }
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    Some(s[s.len() / 2])
}

/// What the completion rules need to know of one arrived instance (see [`CompletionTracker::instance`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Arrived {
    /// SOP Instance UID: a repeat replaces the earlier arrival, it does not count twice.
    pub sop_instance_uid: String,
    /// Position along the slice normal, mm (None: no Image Position/Orientation, so the stack rule cannot apply).
    pub position_mm: Option<f64>,
    /// Images in Acquisition (0020,1002) as the sender wrote it: how many images the series will hold.
    pub expected: Option<u32>,
}

impl Arrived {
    /// What the completion rules read of an instance's attributes.
    pub fn of(meta: &InstanceMeta) -> Arrived {
        let position_mm = match (meta.normal(), meta.image_position) {
            (Some(n), Some(p)) => Some(p[0] * n[0] + p[1] * n[1] + p[2] * n[2]),
            _ => None,
        };
        Arrived {
            sop_instance_uid: meta.sop_instance_uid.clone(),
            position_mm,
            expected: meta.images_in_acquisition.filter(|&n| n > 0),
        }
    }
}

/// Which rule completed a series (logged, and counted in `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CompletionRule {
    /// The instance count reached Images in Acquisition (0020,1002).
    Count,
    /// The senders released and the slices form one gap-free, evenly spaced stack.
    Stack,
    /// The senders released and `quiet_period_s` passed without a new instance (the fallback).
    Quiet,
    /// `stable_timeout_s` passed without a new instance, released or not (the last resort).
    Stable,
}

impl CompletionRule {
    /// Every rule, in the order they are tried.
    pub const ALL: [CompletionRule; 4] =
        [CompletionRule::Count, CompletionRule::Stack, CompletionRule::Quiet, CompletionRule::Stable];

    /// The rule's name in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            CompletionRule::Count => "count",
            CompletionRule::Stack => "stack",
            CompletionRule::Quiet => "quiet",
            CompletionRule::Stable => "stable",
        }
    }
}

/// Per-series arrival state the completion rules need.
#[derive(Debug, Clone)]
struct Arrival {
    /// When the latest instance of the series arrived.
    last_instance_at: Instant,
    /// Associations that delivered instances of this series and have not ended yet.
    open_associations: HashSet<AssociationId>,
    /// At least one delivering association ended (released or aborted).
    released: bool,
    /// When the latest delivering association ended.
    released_at: Option<Instant>,
    /// The senders (calling AE title and address, as [`CompletionTracker::association_opened`] was told) that
    /// delivered instances of this series: while one of them holds any association open, the stack rule waits.
    senders: HashSet<String>,
    /// Each arrived instance's position along the normal, by SOP Instance UID (None: no geometry).
    positions: HashMap<String, Option<f64>>,
    /// The largest Images in Acquisition any instance stated.
    expected: Option<u32>,
}

/// Decides when series are complete, from instance arrivals and association starts and ends.
///
/// A series is complete by the first of these rules that holds (each checked by the completion ticker):
/// 1. **count** — the distinct instances that arrived reach the Images in Acquisition (0020,1002) a sender stated.
///    Needs no release: it is what makes a scanner that sends one image per association, or splits a series over
///    several associations, complete at its last image. A count that counts more than this series (an acquisition
///    reconstructed into two series) is never reached, and the rules below apply.
/// 2. **stack** — every delivering association has ended, none of those senders holds another association open,
///    `release_settle_s` passed since the last release and the last instance, and the slices (at least
///    `min_slices`, each with a position) form one stack: no two at one position, every step within
///    [`STACK_STEP_TOLERANCE`] of the median step. The settle and the open-association check are what protect a
///    series split over several associations, or sent one image per association: the sender's next association
///    opens within milliseconds of the last release, so the series waits for it. A gap (a missing slice) is not a
///    stack: the quiet period applies.
/// 3. **quiet** (today's rule, the fallback) — released and `quiet_period_s` without a new instance: a stack with a
///    gap or uneven steps, slices without geometry, a sender that pauses between associations longer than the settle.
/// 4. **stable** — `stable_timeout_s` without a new instance, released or not: a sender that never releases, and
///    series recovered after a restart (no association).
///
/// A trickle (a sender pausing mid-series on an open association) never completes early: rules 2 and 3 need the
/// release and rule 1 the count. What an early completion gets wrong (a split series whose next association came
/// after the settle) costs a second result version, not an alert: a late instance re-opens the series as it always
/// did, its analysis is a new version, and the webhook alerts once per series when it first becomes positive.
#[derive(Debug, Default)]
pub struct CompletionTracker {
    /// Series still receiving, keyed by Series Instance UID.
    open: HashMap<String, Arrival>,
    /// Which open series each live association has fed, to mark them on release.
    by_association: HashMap<AssociationId, HashSet<String>>,
    /// The sender of every live association (whether or not it sent an instance yet).
    live_senders: HashMap<AssociationId, String>,
    /// Series completed so far by each rule (`/metrics`), in [`CompletionRule::ALL`] order.
    completed: [u64; 4],
}

/// Steps of a stack may differ from its median step by this fraction (scanner positions are rounded; a missing
/// slice doubles a step).
pub const STACK_STEP_TOLERANCE: f64 = 0.1;

impl CompletionTracker {
    /// `association` from `sender` (calling AE title and peer address) was established.
    pub fn association_opened(&mut self, association: AssociationId, sender: &str) {
        self.live_senders.insert(association, sender.to_string());
    }

    /// A new instance of `series` arrived on `association` (None: recovered from the spool after a restart,
    /// no association is open for it, so only the stable timeout can complete it). `arrived`: what the count and
    /// stack rules read of it (None: nothing, only release and time complete the series).
    pub fn instance(
        &mut self,
        series: &str,
        association: Option<AssociationId>,
        arrived: Option<&Arrived>,
        now: Instant,
    ) {
        let a = self.open.entry(series.to_string()).or_insert_with(|| Arrival {
            last_instance_at: now,
            open_associations: HashSet::new(),
            released: false,
            released_at: None,
            senders: HashSet::new(),
            positions: HashMap::new(),
            expected: None,
        });
        a.last_instance_at = now;
        if let Some(id) = association {
            a.open_associations.insert(id);
            if let Some(sender) = self.live_senders.get(&id) {
                a.senders.insert(sender.clone());
            }
            self.by_association.entry(id).or_default().insert(series.to_string());
        }
        match arrived {
            Some(x) => {
                a.positions.insert(x.sop_instance_uid.clone(), x.position_mm);
                a.expected = a.expected.max(x.expected);
            }
            // An instance the rules know nothing of: the stack rule can no longer prove the series whole.
            None => {
                a.positions.insert(String::new(), None);
            }
        }
    }

    /// `association` ended; the series it fed may complete once no other sender is open.
    pub fn association_ended(&mut self, association: AssociationId, now: Instant) {
        self.live_senders.remove(&association);
        if let Some(series) = self.by_association.remove(&association) {
            for s in series {
                if let Some(a) = self.open.get_mut(&s) {
                    a.open_associations.remove(&association);
                    a.released = true;
                    a.released_at = Some(now);
                }
            }
        }
    }

    /// Series complete at `now`, with the rule that completed each; they are removed from the tracker (a later
    /// instance re-opens them).
    pub fn take_complete(&mut self, now: Instant, cfg: &SeriesConfig) -> Vec<(String, CompletionRule)> {
        let live: HashSet<&String> = self.live_senders.values().collect();
        let done: Vec<(String, CompletionRule)> =
            self.open.iter().filter_map(|(k, a)| a.complete(now, cfg, &live).map(|r| (k.clone(), r))).collect();
        for (s, rule) in &done {
            self.completed[*rule as usize] += 1;
            self.open.remove(s);
            for set in self.by_association.values_mut() {
                set.remove(s);
            }
        }
        done
    }

    /// Number of series still receiving.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// Series completed so far by each rule.
    pub fn completed_by_rule(&self) -> Vec<(CompletionRule, u64)> {
        CompletionRule::ALL.iter().map(|&r| (r, self.completed[r as usize])).collect()
    }
}

impl Arrival {
    fn complete(&self, now: Instant, cfg: &SeriesConfig, live_senders: &HashSet<&String>) -> Option<CompletionRule> {
        if let Some(n) = self.expected {
            if self.positions.len() >= n as usize {
                return Some(CompletionRule::Count);
            }
        }
        let idle = now.saturating_duration_since(self.last_instance_at);
        let released = self.released && self.open_associations.is_empty();
        if released {
            let since_release = self.released_at.map(|t| now.saturating_duration_since(t)).unwrap_or_default();
            let settle = Duration::from_secs_f64(cfg.release_settle_s);
            if idle >= settle
                && since_release >= settle
                && !self.senders.iter().any(|s| live_senders.contains(s))
                && self.is_stack(cfg.min_slices.max(2))
            {
                return Some(CompletionRule::Stack);
            }
            if idle >= Duration::from_secs_f64(cfg.quiet_period_s) {
                return Some(CompletionRule::Quiet);
            }
        }
        (idle >= Duration::from_secs_f64(cfg.stable_timeout_s)).then_some(CompletionRule::Stable)
    }

    /// Whether the arrived slices form one gap-free, evenly spaced stack of at least `min` slices.
    fn is_stack(&self, min: usize) -> bool {
        if self.positions.len() < min {
            return false;
        }
        let Some(mut z) = self.positions.values().copied().collect::<Option<Vec<f64>>>() else {
            return false;
        };
        z.sort_by(f64::total_cmp);
        let steps: Vec<f64> = z.windows(2).map(|w| w[1] - w[0]).collect();
        let Some(m) = median(&steps) else { return false };
        m >= 0.01 && steps.iter().all(|d| (d - m).abs() <= STACK_STEP_TOLERANCE * m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(uid: &str, z: f64) -> InstanceMeta {
        InstanceMeta {
            sop_instance_uid: uid.into(),
            sop_class_uid: crate::instance::CT_IMAGE_STORAGE.into(),
            study_instance_uid: "1.2".into(),
            series_instance_uid: "1.2.3".into(),
            patient_id: "P".into(),
            patient_name: "N".into(),
            study_date: "20200101".into(),
            modality: "CT".into(),
            image_type: vec!["ORIGINAL".into(), "PRIMARY".into(), "AXIAL".into()],
            image_position: Some([-100.0, -100.0, z]),
            image_orientation: Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
            slice_thickness: Some(1.0),
            pixel_spacing: Some([0.7, 0.7]),
            instance_number: Some(z as i64),
            rows: Some(512),
            columns: Some(512),
            number_of_frames: 1,
            has_pixel_data: true,
            images_in_acquisition: None,
            derived_uids: Vec::new(),
        }
    }

    #[test]
    fn orders_by_position_and_finds_gaps_and_duplicates() {
        let ms = [meta("a", 3.0), meta("b", 1.0), meta("c", 2.0), meta("d", 2.0), meta("e", 6.0)];
        let refs: Vec<&InstanceMeta> = ms.iter().collect();
        let o = order_slices(&refs);
        assert_eq!(o.positions_mm, vec![1.0, 2.0, 2.0, 3.0, 6.0]);
        assert_eq!(o.spacing_mm, Some(1.0));
        assert_eq!(o.duplicates, vec![2]);
        assert_eq!(o.gaps, vec![(3, 4)]);
        assert_eq!(ms[o.order[0]].sop_instance_uid, "b");
    }

    #[test]
    fn eligibility_reasons() {
        let cfg = SeriesConfig { min_slices: 2, ..Default::default() };
        let ok = [meta("a", 1.0), meta("b", 2.0)];
        assert!(series_skip_reasons(&ok.iter().collect::<Vec<_>>(), &cfg).is_empty());
        let mut loc = meta("c", 1.0);
        loc.image_type = vec!["ORIGINAL".into(), "PRIMARY".into(), "LOCALIZER".into()];
        loc.image_orientation = Some([0.0, 1.0, 0.0, 0.0, 0.0, -1.0]);
        let r = series_skip_reasons(&[&loc], &cfg);
        assert!(r.iter().any(|s| s.contains("localizer")), "{r:?}");
        assert!(r.iter().any(|s| s.contains("not axial")), "{r:?}");
        assert!(r.iter().any(|s| s.contains("min_slices")), "{r:?}");
        let mut thick = meta("d", 1.0);
        thick.slice_thickness = Some(7.5);
        let r = series_skip_reasons(&[&thick, &ok[0]], &cfg);
        assert!(r.iter().any(|s| s.contains("max_slice_thickness_mm")), "{r:?}");
        let mut derived = meta("e", 1.0);
        derived.image_type = vec!["DERIVED".into(), "SECONDARY".into(), "REFORMATTED".into()];
        assert!(!instance_skip_reasons(&derived).is_empty());
        let mut secondary_axial = meta("f", 1.0);
        secondary_axial.image_type = vec!["DERIVED".into(), "SECONDARY".into(), "AXIAL".into()];
        let r = instance_skip_reasons(&secondary_axial);
        assert!(r.iter().any(|s| s.contains("derived/secondary")), "{r:?}");
        let mut mip = meta("g", 1.0);
        mip.image_type = vec!["DERIVED".into(), "PRIMARY".into(), "MIP".into()];
        let r = instance_skip_reasons(&mip);
        assert!(r.iter().any(|s| s.contains("projection")), "{r:?}");
        // A derived primary axial reconstruction (e.g. the CT of a PET/CT) is analysed.
        let mut derived_primary = meta("h", 1.0);
        derived_primary.image_type = vec!["DERIVED".into(), "PRIMARY".into(), "AXIAL".into()];
        assert!(instance_skip_reasons(&derived_primary).is_empty());
    }

    fn cfg() -> SeriesConfig {
        SeriesConfig {
            quiet_period_s: 2.0,
            stable_timeout_s: 30.0,
            release_settle_s: 0.15,
            min_slices: 3,
            ..Default::default()
        }
    }

    fn at(uid: &str, z: f64) -> Arrived {
        Arrived { sop_instance_uid: uid.into(), position_mm: Some(z), expected: None }
    }

    fn names(v: Vec<(String, CompletionRule)>) -> Vec<(String, CompletionRule)> {
        let mut v = v;
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn completion_needs_release_and_quiet_or_stable_timeout() {
        let cfg = cfg();
        let t0 = Instant::now();
        let mut t = CompletionTracker::default();
        t.instance("s1", Some(1), None, t0);
        t.instance("s2", Some(2), None, t0);
        // Not released: nothing completes after the quiet period.
        assert!(t.take_complete(t0 + Duration::from_secs(3), &cfg).is_empty());
        t.association_ended(1, t0 + Duration::from_secs(3));
        // Released, but no geometry known: the quiet period (from the last instance) is the rule.
        assert_eq!(t.take_complete(t0 + Duration::from_secs(3), &cfg), vec![("s1".to_string(), CompletionRule::Quiet)]);
        // s2 never released: the stable timeout completes it.
        assert!(t.take_complete(t0 + Duration::from_secs(29), &cfg).is_empty());
        assert_eq!(
            t.take_complete(t0 + Duration::from_secs(30), &cfg),
            vec![("s2".to_string(), CompletionRule::Stable)]
        );
        assert_eq!(t.open_count(), 0);
        // A late instance re-opens.
        t.instance("s1", Some(3), None, t0 + Duration::from_secs(40));
        t.association_ended(3, t0 + Duration::from_secs(40));
        assert!(t.take_complete(t0 + Duration::from_secs(41), &cfg).is_empty());
        assert_eq!(t.take_complete(t0 + Duration::from_secs(42), &cfg).len(), 1);
    }

    #[test]
    fn a_second_open_sender_delays_completion() {
        let cfg = SeriesConfig { quiet_period_s: 1.0, ..cfg() };
        let t0 = Instant::now();
        let mut t = CompletionTracker::default();
        t.instance("s", Some(1), None, t0);
        t.instance("s", Some(2), None, t0);
        t.association_ended(1, t0);
        assert!(t.take_complete(t0 + Duration::from_secs(5), &cfg).is_empty());
        t.association_ended(2, t0);
        assert_eq!(t.take_complete(t0 + Duration::from_secs(5), &cfg).len(), 1);
    }

    #[test]
    fn a_released_even_stack_completes_after_the_settle_not_the_quiet_period() {
        let cfg = cfg();
        let t0 = Instant::now();
        let mut t = CompletionTracker::default();
        t.association_opened(1, "CT1@10.0.0.1");
        // Shuffled order: the stack is judged on positions, not arrival order.
        for (i, z) in [3.0, 1.0, 4.0, 2.0].into_iter().enumerate() {
            t.instance("s", Some(1), Some(&at(&format!("i{i}"), z)), t0);
        }
        // The sender still holds the association (a trickle pausing mid-series): nothing, even after 20 s.
        assert!(t.take_complete(t0 + Duration::from_secs(20), &cfg).is_empty());
        let t1 = t0 + Duration::from_secs(20);
        t.instance("s", Some(1), Some(&at("i4", 5.0)), t1);
        t.association_ended(1, t1);
        assert!(t.take_complete(t1 + 100 * MS, &cfg).is_empty(), "completed before the settle");
        assert_eq!(names(t.take_complete(t1 + 150 * MS, &cfg)), vec![("s".to_string(), CompletionRule::Stack)]);
    }

    #[test]
    fn a_gap_or_a_duplicate_position_falls_back_to_the_quiet_period() {
        let cfg = cfg();
        let t0 = Instant::now();
        let mut t = CompletionTracker::default();
        for (i, z) in [1.0, 2.0, 4.0, 5.0].into_iter().enumerate() {
            t.instance("gap", Some(1), Some(&at(&format!("g{i}"), z)), t0);
        }
        for (i, z) in [1.0, 2.0, 2.0, 3.0].into_iter().enumerate() {
            t.instance("dup", Some(1), Some(&at(&format!("d{i}"), z)), t0);
        }
        let mut no_geometry = at("n0", 1.0);
        no_geometry.position_mm = None;
        t.instance("nogeo", Some(1), Some(&no_geometry), t0);
        for (i, z) in [2.0, 3.0, 4.0].into_iter().enumerate() {
            t.instance("nogeo", Some(1), Some(&at(&format!("n{}", i + 1), z)), t0);
        }
        t.association_ended(1, t0);
        assert!(t.take_complete(t0 + Duration::from_secs(1), &cfg).is_empty());
        let done = names(t.take_complete(t0 + Duration::from_secs(2), &cfg));
        assert_eq!(done.iter().map(|d| d.1).collect::<Vec<_>>(), vec![CompletionRule::Quiet; 3]);
    }

    #[test]
    fn a_split_sender_holds_the_stack_rule_while_its_next_association_is_open() {
        let cfg = cfg();
        let t0 = Instant::now();
        let mut t = CompletionTracker::default();
        // First third on association 1, released; association 2 of the same sender opens before the settle.
        t.association_opened(1, "CT1@10.0.0.1");
        for z in 1..=4 {
            t.instance("s", Some(1), Some(&at(&format!("a{z}"), z as f64)), t0);
        }
        t.association_ended(1, t0);
        t.association_opened(2, "CT1@10.0.0.1");
        // Another scanner's association does not hold it; this sender's does.
        t.association_opened(9, "CT2@10.0.0.2");
        assert!(
            t.take_complete(t0 + Duration::from_secs(1), &cfg).is_empty(),
            "completed with the sender's next association open"
        );
        for z in 5..=8 {
            t.instance("s", Some(2), Some(&at(&format!("a{z}"), z as f64)), t0 + Duration::from_secs(1));
        }
        t.association_ended(2, t0 + Duration::from_secs(1));
        let t2 = t0 + Duration::from_secs(1) + 150 * MS;
        assert_eq!(names(t.take_complete(t2, &cfg)), vec![("s".to_string(), CompletionRule::Stack)]);
        assert_eq!(t.open_count(), 0);
    }

    #[test]
    fn the_stated_count_completes_without_a_release() {
        let cfg = cfg();
        let t0 = Instant::now();
        let mut t = CompletionTracker::default();
        // One image per association: each released at once; the count completes at the last image.
        for i in 0..4u64 {
            t.association_opened(i, "CT1@10.0.0.1");
            let a = Arrived { sop_instance_uid: format!("c{i}"), position_mm: Some(i as f64), expected: Some(5) };
            t.instance("s", Some(i), Some(&a), t0);
            t.association_ended(i, t0);
            assert!(t.take_complete(t0, &cfg).is_empty());
        }
        // A repeat of an instance does not count twice.
        let again = Arrived { sop_instance_uid: "c3".into(), position_mm: Some(3.0), expected: Some(5) };
        t.instance("s", Some(7), Some(&again), t0);
        assert!(t.take_complete(t0, &cfg).is_empty());
        let last = Arrived { sop_instance_uid: "c4".into(), position_mm: Some(4.0), expected: Some(5) };
        t.instance("s", Some(8), Some(&last), t0);
        assert_eq!(t.take_complete(t0, &cfg), vec![("s".to_string(), CompletionRule::Count)]);
    }
}
