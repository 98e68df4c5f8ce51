//! eval::real::luna — the `luna-png` kind: 8-bit lung-window PNG slices `z_NNN.png` turned into HU slices, their
//! spacing found (manifest, the source's summary or inventory, else the documented assumption), and the series run
//! through the daemon's input contract, the engine and the 3D analysis.
//!
//! Owns: the lung-window inverse (HU = v × 1500 / 255 − 1350), the slice order and the spacing lookup. Hands on: a
//! [`RealSeriesEval`] to the report. Never: guesses geometry silently (the report names where spacing came from).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{
    series_eval, Geometry, RealEntry, RealSeriesEval, SliceSource, LUNA_PIXEL_SPACING_MM, LUNA_SLICE_SPACING_MM,
};
use crate::analysis::{self, AnalysisParams, PlacedSlice};
use crate::decode::HuSlice;
use crate::pipeline::InferenceContext;
use crate::tools::eval::read_png_gray;

/// HU of a lung-window PNG slice: v × 1500 / 255 − 1350 (L −600, W 1500).
pub fn luna_hu_of(v: u8) -> f32 {
    (v as f64 * 1500.0 / 255.0 - 1350.0) as f32
}

pub(super) fn luna_hu(path: &Path) -> Result<HuSlice> {
    let g = read_png_gray(path)?;
    Ok(HuSlice::from_hu(g.rows, g.cols, g.px.iter().map(|&v| luna_hu_of(v)).collect()))
}

/// The `z_NNN.png` files of a folder with their slice numbers, in slice order.
pub fn luna_slices(dir: &Path) -> Result<Vec<(u32, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let z = name.strip_prefix("z_").and_then(|s| s.strip_suffix(".png")).and_then(|s| s.parse::<u32>().ok());
        if let Some(z) = z {
            out.push((z, p));
        }
    }
    out.sort();
    if out.is_empty() {
        bail!("no z_NNN.png slices in {}", dir.display());
    }
    Ok(out)
}

/// Spacing a LUNA16 source file states for the patient folder `alias` (keys `pixel_spacing_mm`, `slice_spacing_mm`
/// in `generation_summary.json`'s `per_patient` entry, or columns of that name in the inventory CSV), if any.
fn luna_source_spacing(dir: &Path, alias: &str) -> Option<(f64, f64, String)> {
    let parent = dir.parent()?;
    let from_summary = || -> Option<(f64, f64, String)> {
        let v: Value = serde_json::from_slice(&std::fs::read(parent.join("generation_summary.json")).ok()?).ok()?;
        let p = v["per_patient"].as_array()?.iter().find(|p| p["patient_alias"].as_str() == Some(alias))?;
        Some((p["pixel_spacing_mm"].as_f64()?, p["slice_spacing_mm"].as_f64()?, "generation_summary.json".into()))
    };
    let from_csv = |path: &Path| -> Option<(f64, f64, String)> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut lines = text.lines();
        let head: Vec<&str> = lines.next()?.split(',').map(str::trim).collect();
        let col = |k: &str| head.iter().position(|h| *h == k);
        let (ia, ip, is) = (col("patient_alias")?, col("pixel_spacing_mm")?, col("slice_spacing_mm")?);
        let f: Vec<&str> =
            lines.map(|l| l.split(',').map(str::trim).collect::<Vec<_>>()).find(|f| f.get(ia) == Some(&alias))?;
        let file = path.file_name()?.to_string_lossy().into_owned();
        Some((f.get(ip)?.parse().ok()?, f.get(is)?.parse().ok()?, file))
    };
    from_summary().or_else(|| {
        let mut csvs: Vec<PathBuf> = std::fs::read_dir(parent)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "csv"))
            .collect();
        csvs.sort();
        csvs.iter().find_map(|p| from_csv(p))
    })
}

/// Evaluates a `luna-png` entry: PNG → HU → the daemon's input contract → engine → masks → 3D analysis.
pub(super) fn eval_luna(
    ctx: &InferenceContext,
    entry: &RealEntry,
    dir: &Path,
    params: &AnalysisParams,
    batch: usize,
) -> Result<RealSeriesEval> {
    let t = Instant::now();
    let files = luna_slices(dir)?;
    let alias = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (px, dz, source) = match (entry.pixel_spacing_mm, entry.slice_spacing_mm) {
        (Some(px), Some(dz)) => (px, dz, "manifest".to_string()),
        (px, dz) => match luna_source_spacing(dir, &alias) {
            Some((spx, sdz, file)) => (px.unwrap_or(spx), dz.unwrap_or(sdz), file),
            None => (
                px.unwrap_or(LUNA_PIXEL_SPACING_MM),
                dz.unwrap_or(LUNA_SLICE_SPACING_MM),
                if px.is_some() || dz.is_some() { "manifest + assumed" } else { "assumed" }.to_string(),
            ),
        },
    };
    let inp = &ctx.model.manifest.input;
    if inp.channels != 1 {
        bail!("luna-png evaluation needs a single-channel model (manifest input.channels = {})", inp.channels);
    }
    let mut placed = Vec::with_capacity(files.len());
    for chunk in files.chunks(batch.max(1)) {
        let mut hus = Vec::with_capacity(chunk.len());
        for (_, p) in chunk {
            let mut hu = luna_hu(p)?;
            hu.pixel_spacing = [px, px];
            hu.pixel_spacing_known = true;
            hus.push(hu);
        }
        let (segs, _) = crate::tools::eval::segment_batch(ctx.engine.as_ref(), &ctx.model, &hus)
            .with_context(|| format!("segmenting {} … {}", chunk[0].1.display(), chunk[chunk.len() - 1].1.display()))?;
        for (((z, _), hu), seg) in chunk.iter().zip(&hus).zip(segs) {
            // Patient LPS: z_NNN rises towards the head; the image centred on the table axis.
            let zmm = *z as f64 * dz;
            placed.push(PlacedSlice {
                segmentation: seg,
                position_mm: zmm,
                image_position: [-(hu.cols as f64) * px / 2.0, -(hu.rows as f64) * px / 2.0, zmm],
                image_orientation: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
                pixel_spacing: [px, px],
                slice_thickness: Some(dz),
            });
        }
    }
    let res = analysis::analyse_series(&placed, params);
    let mut result = serde_json::to_value(&res).context("serialising the analysis")?;
    result["status"] = json!("analysed");
    let slices = res
        .slice_order
        .iter()
        .zip(res.lung_masks.iter().zip(&res.lesion_masks))
        .map(|(&i, (lung, lesion))| (SliceSource::LunaPng(files[i].1.clone()), lung.clone(), lesion.clone()))
        .collect();
    let geometry = Geometry { pixel_spacing_mm: [px, px], slice_spacing_mm: res.slice_spacing_mm, source };
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    Ok(series_eval(entry, entry.name.clone(), dir, &result, slices, files.len(), geometry, ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luna_hu_matches_the_lung_window() {
        assert_eq!(luna_hu_of(0), -1350.0);
        assert_eq!(luna_hu_of(255), 150.0);
        // L -600: the window centre is v = 127.5.
        assert!(luna_hu_of(127) < -600.0 && luna_hu_of(128) > -600.0, "{} {}", luna_hu_of(127), luna_hu_of(128));
        assert!((luna_hu_of(17) - (-1250.0)).abs() < 1e-3, "{}", luna_hu_of(17));
    }

    #[test]
    fn luna_slices_are_ordered_by_number_and_other_files_ignored() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["z_010.png", "z_002.png", "z_100.png", "notes.txt", "y_001.png"] {
            std::fs::write(dir.path().join(n), b"").unwrap();
        }
        let z: Vec<u32> = luna_slices(dir.path()).unwrap().into_iter().map(|(z, _)| z).collect();
        assert_eq!(z, [2, 10, 100]);
        let empty = tempfile::tempdir().unwrap();
        assert!(luna_slices(empty.path()).is_err());
    }

    #[test]
    fn luna_spacing_is_read_from_the_inventory_when_it_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let pat = dir.path().join("normal_patient_9");
        std::fs::create_dir(&pat).unwrap();
        assert!(luna_source_spacing(&pat, "normal_patient_9").is_none());
        std::fs::write(
            dir.path().join("inventory.csv"),
            "patient_alias,pixel_spacing_mm,slice_spacing_mm\nnormal_patient_8,1,1\nnormal_patient_9,1.5,2.5\n",
        )
        .unwrap();
        assert_eq!(luna_source_spacing(&pat, "normal_patient_9"), Some((1.5, 2.5, "inventory.csv".into())));
    }
}
