//! eval::metrics — the paper's numbers from counts: pixel overlap (Dice, IoU with the paper's convention for
//! normal images), the confusion matrix of a yes/no call (accuracy, sensitivity, specificity), AUC by ranks, and the
//! slice-level summary built from them.
//!
//! Owns: the arithmetic and its conventions. Hands on: plain numbers and serialisable structs to the reports.
//! Never: reads images, runs an engine, or decides what counts as positive (callers pass the booleans).

use serde::Serialize;
use serde_json::{json, Value};

/// Overlap counts of a binary prediction against a binary truth.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub struct Overlap {
    /// Pixels predicted and true.
    pub tp: u64,
    /// Pixels predicted, not true.
    pub fp: u64,
    /// Pixels true, not predicted.
    #[serde(rename = "fn")]
    pub fn_: u64,
}

impl Overlap {
    /// Counts over two equally long pixel lists.
    pub fn count(pred: impl Iterator<Item = bool>, truth: impl Iterator<Item = bool>) -> Overlap {
        let mut o = Overlap::default();
        for (p, t) in pred.zip(truth) {
            match (p, t) {
                (true, true) => o.tp += 1,
                (true, false) => o.fp += 1,
                (false, true) => o.fn_ += 1,
                _ => {}
            }
        }
        o
    }
    /// Adds another image's counts.
    pub fn add(&mut self, o: Overlap) {
        self.tp += o.tp;
        self.fp += o.fp;
        self.fn_ += o.fn_;
    }
    /// Dice; 1 when both prediction and truth are empty.
    pub fn dice(&self) -> f64 {
        let d = 2 * self.tp + self.fp + self.fn_;
        if d == 0 {
            1.0
        } else {
            2.0 * self.tp as f64 / d as f64
        }
    }
    /// IoU with the paper's convention: 1 when both are empty, 0 for a false positive on a normal image.
    pub fn iou(&self) -> f64 {
        let u = self.tp + self.fp + self.fn_;
        if u == 0 {
            1.0
        } else {
            self.tp as f64 / u as f64
        }
    }
}

/// Area under the ROC curve of `scores` for binary `labels` (Mann–Whitney, ties counted half); None when one
/// class is absent.
pub fn auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (np, nn) = (labels.iter().filter(|l| **l).count(), labels.iter().filter(|l| !**l).count());
    if np == 0 || nn == 0 {
        return None;
    }
    // Average ranks over ties.
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            if labels[k] {
                rank_sum_pos += avg_rank;
            }
        }
        i = j + 1;
    }
    Some((rank_sum_pos - (np * (np + 1)) as f64 / 2.0) / (np as f64 * nn as f64))
}

/// Slice- or series-level confusion counts.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Confusion {
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
}

impl Confusion {
    pub fn add(&mut self, predicted: bool, truth: bool) {
        match (predicted, truth) {
            (true, true) => self.tp += 1,
            (true, false) => self.fp += 1,
            (false, false) => self.tn += 1,
            (false, true) => self.fn_ += 1,
        }
    }
    pub fn accuracy(&self) -> Option<f64> {
        let n = self.tp + self.fp + self.tn + self.fn_;
        (n > 0).then(|| (self.tp + self.tn) as f64 / n as f64)
    }
    pub fn sensitivity(&self) -> Option<f64> {
        (self.tp + self.fn_ > 0).then(|| self.tp as f64 / (self.tp + self.fn_) as f64)
    }
    pub fn specificity(&self) -> Option<f64> {
        (self.tn + self.fp > 0).then(|| self.tn as f64 / (self.tn + self.fp) as f64)
    }
}

/// Per-slice accumulation of the paper's image-level metrics, shared by both modes.
#[derive(Debug, Default)]
pub struct SliceMetrics {
    /// Lesion overlap pooled over every slice (global Dice).
    pub lesion: Overlap,
    /// Sum of the per-slice lesion Dice (the mean divides it by the slice count).
    pub(super) dice_sum: f64,
    /// Sum of the per-slice IoU.
    pub(super) iou_sum: f64,
    n: usize,
    /// Slice flags: predicted lesion present vs truth lesion present.
    pub confusion: Confusion,
    /// Per slice: the maximum lesion probability (the AUC score).
    pub(super) max_prob: Vec<f64>,
    /// Per slice: whether the truth holds a lesion pixel.
    pub(super) truth_pos: Vec<bool>,
}

impl SliceMetrics {
    /// Adds one slice: its lesion overlap, whether any lesion pixel was predicted, and the slice's maximum lesion
    /// probability (the AUC score).
    pub fn add(&mut self, o: Overlap, predicted_positive: bool, max_lesion_probability: f64) {
        let truth_pos = o.tp + o.fn_ > 0;
        self.lesion.add(o);
        self.dice_sum += o.dice();
        self.iou_sum += o.iou();
        self.n += 1;
        self.confusion.add(predicted_positive, truth_pos);
        self.max_prob.push(max_lesion_probability);
        self.truth_pos.push(truth_pos);
    }
    /// Merges another accumulator (e.g. one series into the whole set).
    pub fn merge(&mut self, o: &SliceMetrics) {
        self.lesion.add(o.lesion);
        self.dice_sum += o.dice_sum;
        self.iou_sum += o.iou_sum;
        self.n += o.n;
        self.confusion.tp += o.confusion.tp;
        self.confusion.fp += o.confusion.fp;
        self.confusion.tn += o.confusion.tn;
        self.confusion.fn_ += o.confusion.fn_;
        self.max_prob.extend_from_slice(&o.max_prob);
        self.truth_pos.extend_from_slice(&o.truth_pos);
    }
    /// The report fields: lesion Dice global and mean per image, mean IoU (paper convention), slice-level
    /// accuracy / sensitivity / specificity / AUC.
    pub fn report(&self) -> Value {
        let n = self.n.max(1) as f64;
        json!({
            "n_slices": self.n,
            "lesion_dice_global": self.lesion.dice(),
            "lesion_dice_mean_per_image": self.dice_sum / n,
            "lesion_iou_mean": self.iou_sum / n,
            "slice_accuracy": self.confusion.accuracy(),
            "slice_sensitivity": self.confusion.sensitivity(),
            "slice_specificity": self.confusion.specificity(),
            "slice_auc": auc(&self.max_prob, &self.truth_pos),
            "slice_confusion": self.confusion,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_known_values() {
        assert_eq!(auc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]), Some(1.0));
        assert_eq!(auc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]), Some(0.0));
        assert_eq!(auc(&[0.5, 0.5], &[false, true]), Some(0.5));
        assert_eq!(auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]), Some(0.75));
        assert_eq!(auc(&[0.1], &[true]), None);
    }

    #[test]
    fn iou_convention() {
        assert_eq!(Overlap::default().iou(), 1.0, "normal image, no prediction");
        assert_eq!(Overlap { tp: 0, fp: 5, fn_: 0 }.iou(), 0.0, "false positive on a normal image");
        let o = Overlap::count([true, true, false, false].into_iter(), [true, false, true, false].into_iter());
        assert_eq!(o, Overlap { tp: 1, fp: 1, fn_: 1 });
        assert!((o.dice() - 0.5).abs() < 1e-12);
        assert!((o.iou() - 1.0 / 3.0).abs() < 1e-12);
    }
}
