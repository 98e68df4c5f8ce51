//! series — which instances form a series, whether the series is analysable, the order of its slices, and
//! when it is complete.
//!
//! Owns: eligibility rules (axial CT, not a localizer, secondary or reformatted/projection image, slice
//! thickness ≤ `max_slice_thickness_mm`, at least `min_slices` slices), slice ordering along the slice normal
//! with gap and duplicate detection, and the completion rule: the sending association released *and*
//! `quiet_period_s` without a new instance, or `stable_timeout_s` without a new instance at all.
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
    if meta.derived_uids.iter().any(|u| u != "SOPInstanceUID") {
        reasons.push(format!(
            "{} missing in the dataset: grouped under a derived UID (stored, not analysed by the daemon)",
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

/// Per-series arrival state the completion rule needs.
#[derive(Debug, Clone)]
struct Arrival {
    /// When the latest instance of the series arrived.
    last_instance_at: Instant,
    /// Associations that delivered instances of this series and have not ended yet.
    open_associations: HashSet<AssociationId>,
    /// At least one delivering association ended (released or aborted).
    released: bool,
}

/// Decides when series are complete, from instance arrivals and association ends.
#[derive(Debug, Default)]
pub struct CompletionTracker {
    /// Series still receiving, keyed by Series Instance UID.
    open: HashMap<String, Arrival>,
    /// Which open series each live association has fed, to mark them on release.
    by_association: HashMap<AssociationId, HashSet<String>>,
}

impl CompletionTracker {
    /// A new instance of `series` arrived on `association` (None: recovered from the spool after a restart,
    /// no association is open for it, so only the stable timeout can complete it).
    pub fn instance(&mut self, series: &str, association: Option<AssociationId>, now: Instant) {
        let a = self.open.entry(series.to_string()).or_insert_with(|| Arrival {
            last_instance_at: now,
            open_associations: HashSet::new(),
            released: false,
        });
        a.last_instance_at = now;
        if let Some(id) = association {
            a.open_associations.insert(id);
            self.by_association.entry(id).or_default().insert(series.to_string());
        }
    }

    /// `association` ended; the series it fed start their quiet period once no other sender is open.
    pub fn association_ended(&mut self, association: AssociationId) {
        if let Some(series) = self.by_association.remove(&association) {
            for s in series {
                if let Some(a) = self.open.get_mut(&s) {
                    a.open_associations.remove(&association);
                    a.released = true;
                }
            }
        }
    }

    /// Series complete at `now`; they are removed from the tracker (a later instance re-opens them).
    pub fn take_complete(&mut self, now: Instant, cfg: &SeriesConfig) -> Vec<String> {
        let quiet = Duration::from_secs_f64(cfg.quiet_period_s);
        let stable = Duration::from_secs_f64(cfg.stable_timeout_s);
        let done: Vec<String> = self
            .open
            .iter()
            .filter(|(_, a)| {
                let idle = now.saturating_duration_since(a.last_instance_at);
                (a.released && a.open_associations.is_empty() && idle >= quiet) || idle >= stable
            })
            .map(|(k, _)| k.clone())
            .collect();
        for s in &done {
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

    #[test]
    fn completion_needs_release_and_quiet_or_stable_timeout() {
        let cfg = SeriesConfig { quiet_period_s: 2.0, stable_timeout_s: 30.0, ..Default::default() };
        let t0 = Instant::now();
        let mut t = CompletionTracker::default();
        t.instance("s1", Some(1), t0);
        t.instance("s2", Some(2), t0);
        // Not released: nothing completes after the quiet period.
        assert!(t.take_complete(t0 + Duration::from_secs(3), &cfg).is_empty());
        t.association_ended(1);
        assert_eq!(t.take_complete(t0 + Duration::from_secs(3), &cfg), vec!["s1".to_string()]);
        // s2 never released: the stable timeout completes it.
        assert!(t.take_complete(t0 + Duration::from_secs(29), &cfg).is_empty());
        assert_eq!(t.take_complete(t0 + Duration::from_secs(30), &cfg), vec!["s2".to_string()]);
        assert_eq!(t.open_count(), 0);
        // A late instance re-opens.
        t.instance("s1", Some(3), t0 + Duration::from_secs(40));
        t.association_ended(3);
        assert!(t.take_complete(t0 + Duration::from_secs(41), &cfg).is_empty());
        assert_eq!(t.take_complete(t0 + Duration::from_secs(42), &cfg), vec!["s1".to_string()]);
    }

    #[test]
    fn a_second_open_sender_delays_completion() {
        let cfg = SeriesConfig { quiet_period_s: 1.0, stable_timeout_s: 30.0, ..Default::default() };
        let t0 = Instant::now();
        let mut t = CompletionTracker::default();
        t.instance("s", Some(1), t0);
        t.instance("s", Some(2), t0);
        t.association_ended(1);
        assert!(t.take_complete(t0 + Duration::from_secs(5), &cfg).is_empty());
        t.association_ended(2);
        assert_eq!(t.take_complete(t0 + Duration::from_secs(5), &cfg), vec!["s".to_string()]);
    }
}
