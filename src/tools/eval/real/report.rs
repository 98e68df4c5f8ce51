//! eval::real::report — what `lungsentry eval --real` shows a human: PNG key images of the negative series' slices
//! with the most surviving lesion pixels (`--overlays DIR`), and the table printed from the report JSON.
//!
//! Owns: choosing and naming the overlays, and the table's layout. Hands on: the overlay rows for the report and
//! the table text. Never: computes a figure (the report JSON holds them all).

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::RealSeriesEval;
use crate::tools::eval::overlay;

/// One written overlay.
#[derive(Debug, Serialize)]
pub(super) struct OverlayRow {
    file: String,
    series: String,
    slice_index: usize,
    slice_file: String,
    lesion_px: usize,
    lung_px: usize,
}

/// Writes the `n` slices of negative series with the most surviving lesion pixels as PNG key images into `dir`.
pub(super) fn write_overlays(series: &[RealSeriesEval], dir: &Path, n: usize) -> Result<Vec<OverlayRow>> {
    let mut cands: Vec<(usize, usize, usize)> = Vec::new(); // (lesion_px, series, slice)
    for (si, s) in series.iter().enumerate() {
        for (k, kept) in s.kept.iter().enumerate() {
            let c = kept.lesion.count();
            if c > 0 {
                cands.push((c, si, k));
            }
        }
    }
    cands.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = Vec::new();
    for (rank, &(c, si, k)) in cands.iter().take(n).enumerate() {
        let s = &series[si];
        let kept = &s.kept[k];
        let hu = kept.source.load_hu()?;
        let img = overlay::render(&hu, &kept.lung, &kept.lesion);
        let safe: String =
            s.name.chars().map(|ch| if ch.is_ascii_alphanumeric() || "-_.".contains(ch) { ch } else { '_' }).collect();
        let file = format!("{:02}-{safe}-slice{k:03}-{c}px.png", rank + 1);
        std::fs::write(dir.join(&file), img.to_png()?).with_context(|| format!("writing {file}"))?;
        out.push(OverlayRow {
            file,
            series: s.name.clone(),
            slice_index: k,
            slice_file: kept.source.file_name(),
            lesion_px: c,
            lung_px: kept.lung.count(),
        });
    }
    Ok(out)
}

fn opt(v: &Value, digits: usize) -> String {
    v.as_f64().map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "-".into())
}

/// The human table of a `--real` report.
pub fn table(report: &Value) -> String {
    let mut s = String::new();
    let m = &report["model"];
    for (i, e) in report["engines"].as_array().into_iter().flatten().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        s.push_str(&format!(
            "engine {} — model {} {} — series positive above {} % involvement\n",
            e["engine"].as_str().unwrap_or("?"),
            m["name"].as_str().unwrap_or("?"),
            m["version"].as_str().unwrap_or("?"),
            report["threshold_percent"]
        ));
        s.push_str(&format!(
            "{:<44} {:<12} {:<8} {:<8} {:>8} {:>8} {:>7} {:>11} {:>10}  {}\n",
            "series",
            "kind",
            "expected",
            "flag",
            "invol %",
            "lung mL",
            "lesions",
            "pos slices",
            "slice spec",
            "verdict"
        ));
        for r in e["series"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "{:<44} {:<12} {:<8} {:<8} {:>8} {:>8} {:>7} {:>11} {:>10}  {}\n",
                r["name"].as_str().unwrap_or("?"),
                r["kind"].as_str().unwrap_or("?"),
                r["expected"].as_str().unwrap_or("?"),
                match (r["status"].as_str(), r["positive"].as_bool()) {
                    (Some("skipped"), _) => "skipped",
                    (_, Some(true)) => "POSITIVE",
                    _ => "negative",
                },
                opt(&r["involvement_percent"], 2),
                opt(&r["lung_volume_ml"], 0),
                r["lesion_count"].to_string(),
                format!("{}/{}", r["positive_slices"], r["analysed_slices"]),
                opt(&r["slice_specificity"], 3),
                match r["flag_correct"].as_bool() {
                    Some(true) => "ok".to_string(),
                    Some(false) => "WRONG".to_string(),
                    None => format!("not analysed: {}", r["skip_reasons"][0].as_str().unwrap_or("?")),
                },
            ));
        }
        let c = &e["series_confusion"];
        s.push_str(&format!(
            "series sensitivity {} ({}/{} positive series flagged), specificity {} ({}/{} negative series clear); \
             negative slices without a lesion voxel {} ({}/{})\n",
            opt(&e["series_sensitivity"], 3),
            c["tp"],
            c["tp"].as_u64().unwrap_or(0) + c["fn"].as_u64().unwrap_or(0),
            opt(&e["series_specificity"], 3),
            c["tn"],
            c["tn"].as_u64().unwrap_or(0) + c["fp"].as_u64().unwrap_or(0),
            opt(&e["negative_slice_specificity"], 3),
            e["negative_slices_without_lesion"],
            e["negative_slices"],
        ));
        if e["n_skipped"].as_u64().unwrap_or(0) > 0 {
            s.push_str(&format!(
                "{} series not analysed (no slice the daemon analyses), left out of both\n",
                e["n_skipped"]
            ));
        }
        for o in e["overlays"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "overlay {}: {} slice {} ({}), {} lesion px\n",
                o["file"].as_str().unwrap_or("?"),
                o["series"].as_str().unwrap_or("?"),
                o["slice_index"],
                o["slice_file"].as_str().unwrap_or("?"),
                o["lesion_px"]
            ));
        }
    }
    s
}
