//! followup — links a series' result to the same patient's prior study: aligns the two by their lungs, matches
//! lesions, classifies each change, and decides whether the disease progressed.
//!
//! Owns: the comparison of two result JSONs (the daemon's stored results, or `analyze`'s in-memory ones — the
//! same function for both). Alignment is rigid and computed from the lung masks: the translation that brings
//! the prior's mid-point of the two lung centroids onto the current one, and the rotation about the patient's
//! cranio-caudal axis that turns the prior's right→left lung axis onto the current one. Lesions are matched
//! one-to-one, nearest first, when their aligned centroids are closer than max(10 mm, 0.75 × the sum of their
//! equivalent-sphere radii); a match is grown (volume ≥ ×1.2), shrunk (≤ ×0.8) or stable; an unmatched current
//! lesion is new, an unmatched prior one resolved. Mean HU change shows the GGO → consolidation shift.
//! Progression: involvement rose by more than `relative_percent` of the prior and by more than
//! `absolute_points`. Change tables without noise: an unmatched lesion smaller than [`MIN_CHANGE_VOLUME_ML`] is not
//! listed as new or resolved (nor counted in `new`/`resolved`, nor given an SR group); it is counted apart in
//! `small_new` / `small_resolved`, and a matched pair smaller than it in both studies in `small_matched`.
//! Never: reads the store or pixels itself.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Smallest volume, mL, of an unmatched lesion listed as new or resolved in a comparison (0.2 mL: a sphere of
/// 7 mm diameter, about three voxels across at 5 mm slices). Smaller unmatched components are at the edge of what
/// the segmentation resolves: one study finds them and the other not by chance ("new 0.0 → 0.0 mL"). They are
/// counted apart (`small_new`, `small_resolved`); so is a matched pair below it in both studies (`small_matched`:
/// "grown 0.0 → 0.0 mL" is noise too). A match with either side at or above the minimum is listed.
pub const MIN_CHANGE_VOLUME_ML: f64 = 0.2;

fn min_change_volume_ml() -> f64 {
    MIN_CHANGE_VOLUME_ML
}

/// Progression rule (from `[analysis]` in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProgressionRule {
    /// Relative rise of involvement, % of the prior (the paper: > 50 % marks severe progression).
    pub relative_percent: f64,
    /// Absolute rise, percentage points.
    pub absolute_points: f64,
}

impl From<&crate::config::AnalysisConfig> for ProgressionRule {
    fn from(c: &crate::config::AnalysisConfig) -> Self {
        ProgressionRule {
            relative_percent: c.progression_relative_percent,
            absolute_points: c.progression_absolute_points,
        }
    }
}

/// One lesion's change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LesionChange {
    /// new, grown, shrunk, stable, resolved.
    pub change: String,
    /// Lesion id in the prior result (None for new lesions).
    pub prior_id: Option<u32>,
    /// Lesion id in this result (None for resolved lesions).
    pub id: Option<u32>,
    pub volume_before_ml: f64,
    pub volume_after_ml: f64,
    /// (after − before) / before × 100; None for new lesions.
    pub volume_change_percent: Option<f64>,
    pub mean_hu_before: Option<f64>,
    pub mean_hu_after: Option<f64>,
    /// after − before (rising = denser: GGO → consolidation).
    pub mean_hu_change: Option<f64>,
    /// Distance of the aligned centroids, mm (matched lesions only).
    pub distance_mm: Option<f64>,
}

/// The rigid alignment prior → current.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alignment {
    /// Rotation about the patient z axis, degrees.
    pub rotation_z_deg: f64,
    /// Translation applied after the rotation, mm (LPS).
    pub translation_mm: [f64; 3],
    /// "lung centroids" or "none (one study has no two lungs)".
    pub basis: String,
}

/// The comparison with the prior study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FollowUp {
    pub prior_series_instance_uid: String,
    pub prior_study_instance_uid: String,
    pub prior_study_date: String,
    pub prior_involvement_percent: f64,
    pub involvement_percent: f64,
    /// Current − prior, percentage points.
    pub involvement_change_points: f64,
    /// (current − prior) / prior × 100; None when the prior had no involvement.
    pub involvement_change_relative_percent: Option<f64>,
    /// Involvement rose beyond the progression rule.
    pub progression: bool,
    pub alignment: Alignment,
    pub lesions: Vec<LesionChange>,
    /// Count per class.
    pub new: usize,
    pub grown: usize,
    pub shrunk: usize,
    pub stable: usize,
    pub resolved: usize,
    /// Unmatched current lesions smaller than `min_change_volume_ml`: not listed as new, counted here.
    #[serde(default)]
    pub small_new: usize,
    /// Unmatched prior lesions smaller than `min_change_volume_ml`: not listed as resolved, counted here.
    #[serde(default)]
    pub small_resolved: usize,
    /// Matched pairs smaller than `min_change_volume_ml` in both studies: not listed, counted here.
    #[serde(default)]
    pub small_matched: usize,
    /// The minimum volume of a listed new or resolved lesion, mL ([`MIN_CHANGE_VOLUME_ML`]).
    #[serde(default = "min_change_volume_ml")]
    pub min_change_volume_ml: f64,
    /// Set when this comparison was made after the series' own analysis, because its prior study arrived (or
    /// was re-analysed) later ([`relinks`]); stored beside the result version, which stays as recorded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relinked: bool,
}

/// The part of a result JSON the comparison reads.
#[derive(Debug, Deserialize)]
struct View {
    #[serde(default)]
    series_instance_uid: String,
    #[serde(default)]
    study_instance_uid: String,
    #[serde(default)]
    study_date: String,
    #[serde(default)]
    involvement_percent: f64,
    #[serde(default)]
    lesions: Vec<LesionView>,
    #[serde(default)]
    regional: Option<RegionalView>,
}

#[derive(Debug, Deserialize)]
struct LesionView {
    id: u32,
    volume_ml: f64,
    mean_hu: f64,
    centroid_mm: [f64; 3],
}

#[derive(Debug, Deserialize)]
struct RegionalView {
    lungs: Vec<LungView>,
}

#[derive(Debug, Deserialize)]
struct LungView {
    lung: String,
    centroid_mm: Option<[f64; 3]>,
}

impl View {
    fn lung_centroids(&self) -> Option<([f64; 3], [f64; 3])> {
        let r = self.regional.as_ref()?;
        let get = |side: &str| r.lungs.iter().find(|l| l.lung == side).and_then(|l| l.centroid_mm);
        Some((get("right")?, get("left")?))
    }
}

/// Whether `r` is an analysed result that can be compared (has a status of "analysed").
pub fn comparable(r: &Value) -> bool {
    r["status"] == "analysed"
}

/// Picks the prior study to compare `current` with from the same patient's `history` (any order): the latest
/// analysed result of another study dated on or before the current one (undated studies compare by position in
/// `history`, which the callers give in arrival order).
pub fn pick_prior<'a>(current: &Value, history: impl IntoIterator<Item = &'a Value>) -> Option<&'a Value> {
    let study = current["study_instance_uid"].as_str().unwrap_or("");
    let date = current["study_date"].as_str().unwrap_or("");
    history
        .into_iter()
        .filter(|h| comparable(h) && h["study_instance_uid"].as_str().unwrap_or("") != study)
        .filter(|h| date.is_empty() || h["study_date"].as_str().unwrap_or("") <= date)
        .max_by(|a, b| a["study_date"].as_str().unwrap_or("").cmp(b["study_date"].as_str().unwrap_or("")))
}

/// Adds `follow_up` to `result` when the patient's `history` (their other series' results) holds a prior study
/// ([`pick_prior`]); the rule the daemon and `analyze` share. Returns whether it linked.
pub fn link(result: &mut Value, history: &[Value], rule: ProgressionRule) -> bool {
    let Some(f) = prior_comparison(result, history, rule) else { return false };
    result["follow_up"] = serde_json::to_value(&f).unwrap_or(Value::Null);
    true
}

/// The comparison [`link`] adds to `result` (None: not comparable, no patient key, or no prior study).
pub fn prior_comparison(result: &Value, history: &[Value], rule: ProgressionRule) -> Option<FollowUp> {
    if !comparable(result) || result["patient_key"].as_str().unwrap_or("").is_empty() {
        return None;
    }
    let prior = pick_prior(result, history)?;
    Some(compare(result, prior, rule))
}

/// A later study whose comparison changes because `new` arrived after it was analysed (a prior study sent late,
/// or a prior study re-analysed): the index into `later` given to [`relinks`] and its new comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Relink {
    pub index: usize,
    pub follow_up: FollowUp,
    /// The later result's current comparison did not show progression and the new one does.
    pub newly_progressed: bool,
}

/// Backward linking: `new` (a result about to be recorded) and `others` (the latest result of each of the
/// patient's *other* series, each with its current `follow_up`, if any) → the results in `others` whose prior
/// study ([`pick_prior`] over `others` plus `new`) is now `new`, with the comparison they get, when it differs
/// from the one they show. The rule is [`link`]'s, so a study analysed late ends where it would have been had
/// the studies arrived in date order.
pub fn relinks(new: &Value, others: &[Value], rule: ProgressionRule) -> Vec<Relink> {
    if !comparable(new) || new["patient_key"].as_str().unwrap_or("").is_empty() {
        return Vec::new();
    }
    let new_series = new["series_instance_uid"].as_str().unwrap_or("");
    let mut out = Vec::new();
    for (index, later) in others.iter().enumerate() {
        if !comparable(later) || later["series_instance_uid"].as_str().unwrap_or("") == new_series {
            continue;
        }
        // The later series' history as `link` would have seen it: every other series, `new` last (the newest
        // arrival, which wins a tie of study dates as the newest arrival does in the daemon).
        let history = others.iter().enumerate().filter(|(i, _)| *i != index).map(|(_, h)| h).chain([new]);
        let Some(prior) = pick_prior(later, history) else { continue };
        if prior["series_instance_uid"].as_str().unwrap_or("") != new_series {
            continue;
        }
        let mut f = compare(later, prior, rule);
        f.relinked = true;
        let current: Option<FollowUp> = later.get("follow_up").and_then(|v| serde_json::from_value(v.clone()).ok());
        let unchanged = current.as_ref().is_some_and(|c| FollowUp { relinked: true, ..c.clone() } == f);
        if unchanged {
            continue;
        }
        let newly_progressed = f.progression && !current.as_ref().is_some_and(|c| c.progression);
        out.push(Relink { index, follow_up: f, newly_progressed });
    }
    out
}

fn radius_mm(volume_ml: f64) -> f64 {
    (3.0 * volume_ml * 1000.0 / (4.0 * std::f64::consts::PI)).cbrt()
}

/// Compares `current` with `prior` (both result JSONs).
pub fn compare(current: &Value, prior: &Value, rule: ProgressionRule) -> FollowUp {
    let cur: View = serde_json::from_value(current.clone()).unwrap_or_else(|_| empty_view());
    let pri: View = serde_json::from_value(prior.clone()).unwrap_or_else(|_| empty_view());
    // Rigid alignment from the lungs.
    let (rot, trans, basis) = match (pri.lung_centroids(), cur.lung_centroids()) {
        (Some((pr, pl)), Some((cr, cl))) => {
            let ang = (cl[1] - cr[1]).atan2(cl[0] - cr[0]) - (pl[1] - pr[1]).atan2(pl[0] - pr[0]);
            let pm = mid(pr, pl);
            let cm = mid(cr, cl);
            let rpm = rotate_z(pm, ang);
            (ang, [cm[0] - rpm[0], cm[1] - rpm[1], cm[2] - rpm[2]], "lung centroids")
        }
        _ => (0.0, [0.0; 3], "none (one study has no two lungs)"),
    };
    let aligned: Vec<[f64; 3]> = pri
        .lesions
        .iter()
        .map(|l| {
            let p = rotate_z(l.centroid_mm, rot);
            [p[0] + trans[0], p[1] + trans[1], p[2] + trans[2]]
        })
        .collect();
    // Candidate pairs, nearest first.
    let mut pairs = Vec::new();
    for (i, p) in pri.lesions.iter().enumerate() {
        for (j, c) in cur.lesions.iter().enumerate() {
            let d = dist(aligned[i], c.centroid_mm);
            let limit = (0.75 * (radius_mm(p.volume_ml) + radius_mm(c.volume_ml))).max(10.0);
            if d <= limit {
                pairs.push((d, i, j));
            }
        }
    }
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut prior_used = vec![false; pri.lesions.len()];
    let mut cur_used = vec![false; cur.lesions.len()];
    let mut lesions = Vec::new();
    let mut small_matched = 0;
    for (d, i, j) in pairs {
        if prior_used[i] || cur_used[j] {
            continue;
        }
        prior_used[i] = true;
        cur_used[j] = true;
        let (p, c) = (&pri.lesions[i], &cur.lesions[j]);
        if p.volume_ml < MIN_CHANGE_VOLUME_ML && c.volume_ml < MIN_CHANGE_VOLUME_ML {
            small_matched += 1;
            continue;
        }
        let ratio = if p.volume_ml > 0.0 { c.volume_ml / p.volume_ml } else { f64::INFINITY };
        let change = if ratio >= 1.2 {
            "grown"
        } else if ratio <= 0.8 {
            "shrunk"
        } else {
            "stable"
        };
        lesions.push(LesionChange {
            change: change.into(),
            prior_id: Some(p.id),
            id: Some(c.id),
            volume_before_ml: p.volume_ml,
            volume_after_ml: c.volume_ml,
            volume_change_percent: Some((ratio - 1.0) * 100.0),
            mean_hu_before: Some(p.mean_hu),
            mean_hu_after: Some(c.mean_hu),
            mean_hu_change: Some(c.mean_hu - p.mean_hu),
            distance_mm: Some(d),
        });
    }
    let (mut small_new, mut small_resolved) = (0, 0);
    for (_, c) in cur.lesions.iter().enumerate().filter(|(j, _)| !cur_used[*j]) {
        if c.volume_ml < MIN_CHANGE_VOLUME_ML {
            small_new += 1;
            continue;
        }
        lesions.push(LesionChange {
            change: "new".into(),
            prior_id: None,
            id: Some(c.id),
            volume_before_ml: 0.0,
            volume_after_ml: c.volume_ml,
            volume_change_percent: None,
            mean_hu_before: None,
            mean_hu_after: Some(c.mean_hu),
            mean_hu_change: None,
            distance_mm: None,
        });
    }
    for (_, p) in pri.lesions.iter().enumerate().filter(|(i, _)| !prior_used[*i]) {
        if p.volume_ml < MIN_CHANGE_VOLUME_ML {
            small_resolved += 1;
            continue;
        }
        lesions.push(LesionChange {
            change: "resolved".into(),
            prior_id: Some(p.id),
            id: None,
            volume_before_ml: p.volume_ml,
            volume_after_ml: 0.0,
            volume_change_percent: Some(-100.0),
            mean_hu_before: Some(p.mean_hu),
            mean_hu_after: None,
            mean_hu_change: None,
            distance_mm: None,
        });
    }
    let delta = cur.involvement_percent - pri.involvement_percent;
    let relative = (pri.involvement_percent > 0.0).then(|| delta / pri.involvement_percent * 100.0);
    let progression = delta > rule.absolute_points && relative.is_none_or(|r| r > rule.relative_percent);
    let count = |k: &str| lesions.iter().filter(|l| l.change == k).count();
    FollowUp {
        prior_series_instance_uid: pri.series_instance_uid.clone(),
        prior_study_instance_uid: pri.study_instance_uid.clone(),
        prior_study_date: pri.study_date.clone(),
        prior_involvement_percent: pri.involvement_percent,
        involvement_percent: cur.involvement_percent,
        involvement_change_points: delta,
        involvement_change_relative_percent: relative,
        progression,
        alignment: Alignment { rotation_z_deg: rot.to_degrees(), translation_mm: trans, basis: basis.into() },
        new: count("new"),
        grown: count("grown"),
        shrunk: count("shrunk"),
        stable: count("stable"),
        resolved: count("resolved"),
        small_new,
        small_resolved,
        small_matched,
        min_change_volume_ml: MIN_CHANGE_VOLUME_ML,
        lesions,
        relinked: false,
    }
}

fn empty_view() -> View {
    View {
        series_instance_uid: String::new(),
        study_instance_uid: String::new(),
        study_date: String::new(),
        involvement_percent: 0.0,
        lesions: Vec::new(),
        regional: None,
    }
}

fn mid(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [(a[0] + b[0]) / 2.0, (a[1] + b[1]) / 2.0, (a[2] + b[2]) / 2.0]
}

fn rotate_z(p: [f64; 3], ang: f64) -> [f64; 3] {
    let (s, c) = ang.sin_cos();
    [c * p[0] - s * p[1], s * p[0] + c * p[1], p[2]]
}

fn dist(a: [f64; 3], b: [f64; 3]) -> f64 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn result(
        study: &str,
        date: &str,
        inv: f64,
        lungs: ([f64; 3], [f64; 3]),
        lesions: &[(u32, f64, f64, [f64; 3])],
    ) -> Value {
        json!({
            "status": "analysed", "series_instance_uid": format!("{study}.1"), "study_instance_uid": study,
            "study_date": date, "involvement_percent": inv,
            "lesions": lesions.iter().map(|(id, v, hu, c)| json!({"id": id, "volume_ml": v, "mean_hu": hu, "centroid_mm": c})).collect::<Vec<_>>(),
            "regional": {"lungs": [{"lung": "right", "centroid_mm": lungs.0}, {"lung": "left", "centroid_mm": lungs.1}]},
        })
    }

    const RULE: ProgressionRule = ProgressionRule { relative_percent: 50.0, absolute_points: 1.0 };

    #[test]
    fn shifted_and_rotated_patient_lesions_are_matched_and_classified() {
        let prior = result(
            "1.2.3",
            "20200101",
            4.0,
            ([-80.0, 0.0, 0.0], [80.0, 0.0, 0.0]),
            &[
                (1, 10.0, -600.0, [-90.0, 40.0, 10.0]),
                (2, 5.0, -500.0, [70.0, -30.0, -40.0]),
                (3, 2.0, -650.0, [60.0, 50.0, 30.0]),
            ],
        );
        // The patient moved 20 mm in x and y and turned 5° about z: apply that to every coordinate.
        let a = 5f64.to_radians();
        let mv = |p: [f64; 3]| {
            let r = rotate_z(p, a);
            [r[0] + 20.0, r[1] + 20.0, r[2] - 5.0]
        };
        let current = result(
            "1.2.4",
            "20200110",
            9.0,
            (mv([-80.0, 0.0, 0.0]), mv([80.0, 0.0, 0.0])),
            &[
                (1, 14.0, -300.0, mv([-90.0, 40.0, 10.0])),
                (2, 5.2, -480.0, mv([70.0, -30.0, -40.0])),
                (3, 3.0, -600.0, mv([-60.0, -60.0, -60.0])),
            ],
        );
        let f = compare(&current, &prior, RULE);
        assert!((f.alignment.rotation_z_deg - 5.0).abs() < 1e-9, "{:?}", f.alignment);
        let by_prior = |id: u32| f.lesions.iter().find(|l| l.prior_id == Some(id)).unwrap();
        assert_eq!(by_prior(1).change, "grown");
        assert_eq!(by_prior(1).id, Some(1));
        assert!(by_prior(1).distance_mm.unwrap() < 1e-6);
        assert!((by_prior(1).mean_hu_change.unwrap() - 300.0).abs() < 1e-9);
        assert_eq!(by_prior(2).change, "stable");
        assert_eq!(by_prior(3).change, "resolved");
        assert_eq!(f.lesions.iter().find(|l| l.id == Some(3)).unwrap().change, "new");
        assert_eq!((f.new, f.grown, f.shrunk, f.stable, f.resolved), (1, 1, 0, 1, 1));
        // 4 → 9 %: +5 points, +125 %: progression.
        assert!(f.progression);
        assert!((f.involvement_change_relative_percent.unwrap() - 125.0).abs() < 1e-9);
    }

    #[test]
    fn progression_needs_both_the_relative_and_the_absolute_rise() {
        let lungs = ([-80.0, 0.0, 0.0], [80.0, 0.0, 0.0]);
        let p = result("a", "20200101", 1.0, lungs, &[]);
        // +0.9 points (+90 %): not enough absolute rise.
        assert!(!compare(&result("b", "20200102", 1.9, lungs, &[]), &p, RULE).progression);
        let p = result("a", "20200101", 10.0, lungs, &[]);
        // +4 points (+40 %): not enough relative rise.
        assert!(!compare(&result("b", "20200102", 14.0, lungs, &[]), &p, RULE).progression);
        // +6 points (+60 %).
        assert!(compare(&result("b", "20200102", 16.0, lungs, &[]), &p, RULE).progression);
        // From zero involvement, the absolute rise decides.
        let p = result("a", "20200101", 0.0, lungs, &[]);
        assert!(compare(&result("b", "20200102", 1.5, lungs, &[]), &p, RULE).progression);
    }

    #[test]
    fn prior_is_the_latest_earlier_other_study() {
        let lungs = ([-80.0, 0.0, 0.0], [80.0, 0.0, 0.0]);
        let h = vec![
            result("s1", "20200101", 1.0, lungs, &[]),
            result("s2", "20200105", 2.0, lungs, &[]),
            result("s4", "20200120", 3.0, lungs, &[]),
        ];
        let cur = result("s3", "20200110", 2.0, lungs, &[]);
        assert_eq!(pick_prior(&cur, &h).unwrap()["study_instance_uid"], "s2");
        // The same study (another series of it) is not a prior.
        let cur = result("s2", "20200105", 2.0, lungs, &[]);
        assert_eq!(pick_prior(&cur, &h).unwrap()["study_instance_uid"], "s1");
        let first = result("s0", "20191201", 2.0, lungs, &[]);
        assert!(pick_prior(&first, &h).is_none());
    }

    fn keyed(mut v: Value) -> Value {
        v["patient_key"] = json!("k");
        v
    }

    #[test]
    fn a_prior_study_analysed_late_relinks_the_later_ones_as_date_order_would() {
        let lungs = ([-80.0, 0.0, 0.0], [80.0, 0.0, 0.0]);
        let jan20 = keyed(result("s3", "20200120", 8.0, lungs, &[(1, 9.0, -400.0, [-80.0, 10.0, 0.0])]));
        // Only 20 Jan was analysed: nothing to compare with.
        let mut later = jan20.clone();
        assert!(!link(&mut later, &[], RULE));
        // 1 Jan arrives late: 20 Jan now compares with it, exactly as `link` would have in date order.
        let jan1 = keyed(result("s1", "20200101", 2.0, lungs, &[(1, 3.0, -650.0, [-80.0, 10.0, 0.0])]));
        let r = relinks(&jan1, std::slice::from_ref(&later), RULE);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].index, 0);
        let mut expect = jan20.clone();
        assert!(link(&mut expect, std::slice::from_ref(&jan1), RULE));
        let expect: FollowUp = serde_json::from_value(expect["follow_up"].clone()).unwrap();
        assert_eq!(r[0].follow_up, FollowUp { relinked: true, ..expect });
        assert_eq!(r[0].follow_up.prior_series_instance_uid, "s1.1");
        assert_eq!(r[0].follow_up.grown, 1);
        // 2 → 8 %: progression, shown for the first time.
        assert!(r[0].follow_up.progression && r[0].newly_progressed);
        // Stored and read back with that comparison: nothing changes when the same study is seen again.
        later["follow_up"] = serde_json::to_value(&r[0].follow_up).unwrap();
        assert!(relinks(&jan1, std::slice::from_ref(&later), RULE).is_empty());
        // 10 Jan arrives next: it becomes 20 Jan's prior (progression no longer new: 8 vs 5 is +60 % but shown
        // before), and it does not change anything for 1 Jan (earlier than it).
        let jan10 = keyed(result("s2", "20200110", 5.0, lungs, &[(1, 6.0, -500.0, [-80.0, 10.0, 0.0])]));
        let others = vec![jan1.clone(), later.clone()];
        let r = relinks(&jan10, &others, RULE);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].index, 1);
        assert_eq!(r[0].follow_up.prior_series_instance_uid, "s2.1");
        assert!(r[0].follow_up.progression && !r[0].newly_progressed);
        // 1 Jan seen again (say re-sent unchanged): 10 Jan, which has no comparison, gets one; 20 Jan, already
        // comparing with the later 10 Jan, is left alone.
        let mut jan20_vs_jan10 = jan20.clone();
        jan20_vs_jan10["follow_up"] = serde_json::to_value(&r[0].follow_up).unwrap();
        let r = relinks(&jan1, &[jan10.clone(), jan20_vs_jan10], RULE);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].index, r[0].follow_up.prior_series_instance_uid.as_str()), (0, "s1.1"));
        // Skipped results, unkeyed (anonymised) results and the same study are never linked.
        let mut skipped = jan20.clone();
        skipped["status"] = json!("skipped");
        assert!(relinks(&jan1, &[skipped], RULE).is_empty());
        let mut anon = jan1.clone();
        anon["patient_key"] = json!("");
        assert!(relinks(&anon, std::slice::from_ref(&jan20), RULE).is_empty());
        let same_study = keyed(result("s3", "20200120", 1.0, lungs, &[]));
        let mut same_study = same_study;
        same_study["series_instance_uid"] = json!("s3.2");
        assert!(relinks(&same_study, std::slice::from_ref(&jan20), RULE).is_empty());
    }

    #[test]
    fn a_reanalysed_prior_updates_the_comparison_of_the_later_study() {
        let lungs = ([-80.0, 0.0, 0.0], [80.0, 0.0, 0.0]);
        let jan1 = keyed(result("s1", "20200101", 2.0, lungs, &[]));
        let mut jan20 = keyed(result("s3", "20200120", 2.5, lungs, &[]));
        assert!(link(&mut jan20, std::slice::from_ref(&jan1), RULE));
        assert!(relinks(&jan1, std::slice::from_ref(&jan20), RULE).is_empty());
        // 1 Jan re-analysed (more slices arrived): 20 Jan's comparison now reads the new figures.
        let jan1_v2 = keyed(result("s1", "20200101", 1.0, lungs, &[]));
        let r = relinks(&jan1_v2, std::slice::from_ref(&jan20), RULE);
        assert_eq!(r.len(), 1);
        assert!((r[0].follow_up.prior_involvement_percent - 1.0).abs() < 1e-12);
        assert!(r[0].follow_up.progression && r[0].newly_progressed); // 1 → 2.5 %: +1.5 points, +150 %
    }

    #[test]
    fn noise_sized_unmatched_lesions_are_counted_apart_not_listed() {
        let lungs = ([-80.0, 0.0, 0.0], [80.0, 0.0, 0.0]);
        let prior = result(
            "1.2.3",
            "20200101",
            4.0,
            lungs,
            &[
                (1, 10.0, -600.0, [-90.0, 40.0, 10.0]),
                (2, 0.12, -650.0, [60.0, 50.0, 30.0]),
                (3, 0.5, -600.0, [60.0, -50.0, -60.0]),
                (4, 0.05, -650.0, [0.0, -90.0, 50.0]),
                (5, 0.1, -650.0, [-20.0, 90.0, -20.0]),
            ],
        );
        let current = result(
            "1.2.4",
            "20200110",
            4.1,
            lungs,
            &[
                (1, 10.5, -590.0, [-90.0, 40.0, 10.0]),
                (2, 0.04, -700.0, [-40.0, -70.0, 70.0]),
                (3, 0.3, -600.0, [30.0, 80.0, -90.0]),
                (4, 0.08, -640.0, [0.0, -90.0, 51.0]),
                (5, 0.6, -600.0, [-20.0, 90.0, -21.0]),
            ],
        );
        let f = compare(&current, &prior, RULE);
        let classes: Vec<(&str, Option<u32>, Option<u32>)> =
            f.lesions.iter().map(|l| (l.change.as_str(), l.prior_id, l.id)).collect();
        assert_eq!(
            classes,
            vec![
                ("stable", Some(1), Some(1)),
                ("grown", Some(5), Some(5)),
                ("new", None, Some(3)),
                ("resolved", Some(3), None)
            ],
            "0.04 mL new, 0.12 mL resolved and a 0.05 → 0.08 mL match are noise; 0.1 → 0.6 mL is listed"
        );
        assert_eq!((f.new, f.resolved, f.grown, f.small_new, f.small_resolved, f.small_matched), (1, 1, 1, 1, 1, 1));
        assert_eq!(f.min_change_volume_ml, MIN_CHANGE_VOLUME_ML);
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v["small_new"], 1);
        // A comparison stored before these fields existed reads back with the documented minimum.
        let mut old = v.clone();
        for k in ["small_new", "small_resolved", "small_matched", "min_change_volume_ml"] {
            old.as_object_mut().unwrap().remove(k);
        }
        let back: FollowUp = serde_json::from_value(old).unwrap();
        assert_eq!((back.small_new, back.min_change_volume_ml), (0, MIN_CHANGE_VOLUME_ML));
    }
}
