//! The lung guard (`analysis::lung_guard`) on the product path, with the shipped model:
//! - a severe phantom (consolidations against the heart and chest wall): the guard removes no truth-lesion voxel
//!   the model predicted (guarded vs the same slices with the guard off), and the series worker's result is the
//!   guarded one;
//! - real CT: the abdomen slices of the pancreas series (below the lungs, found by HU) get no lung and no lesion,
//!   its chest slices keep their lungs; the NY-SBU single slices without air-density lung get no lesion, the chest
//!   ones keep their lungs.
//! - the real RICORD series: the guard as the product runs it at completion (seeding on bit rows, pre-seeds made as
//!   the slices arrived) gives the masks of the pixel-by-pixel seeding of every slice, bit for bit (with timings);
//!   so does each slice's air mask on bit rows against the pixel one.
//!
//! What counts as "lung by HU" here is computed independently of the guard's code (see [`air_regions`]).

mod common;

use std::path::{Path, PathBuf};

use common::dcm_files;

use lungsentry::analysis::lung_guard::{self, AirMasking, Seeding};
use lungsentry::analysis::{analyse_series, segment_slice, AnalysisParams, PlacedSlice};
use lungsentry::config::{Config, EngineKind};
use lungsentry::decode::{self, HuSlice};
use lungsentry::instance::InstanceMeta;
use lungsentry::model::Model;
use lungsentry::outputs::SourceSlice;
use lungsentry::pipeline::{InferenceContext, SeriesWork};
use lungsentry::preprocess;

fn context() -> InferenceContext {
    assert!(common::model_shipped(), "the shipped model is needed");
    let config = Config::default();
    let model = Model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/manifest.toml")).unwrap();
    let engine = lungsentry::engine::load_engine(EngineKind::Auto, &model).unwrap();
    InferenceContext { model, engine, config }
}

fn hu_of(path: &Path) -> HuSlice {
    let obj = lungsentry::spool::read_instance(path).unwrap();
    decode::decode_hu_frames(&obj).unwrap().into_iter().next().unwrap()
}

/// The daemon's series worker over `files` (as one series): the result JSON and each slice's final masks.
fn product(ctx: &InferenceContext, files: &[PathBuf]) -> (serde_json::Value, Vec<SourceSlice>) {
    let mut work = SeriesWork::default();
    for f in files {
        let meta = InstanceMeta::from_file(&lungsentry::spool::read_instance(f).unwrap()).unwrap();
        work.add(ctx, meta, f);
    }
    let (result, slices) = work.finish_with_slices(ctx, "patient", "t0", "t1", false);
    (result.to_json(), slices)
}

/// Regions of air density (HU < −400, 4-connected) that do not touch the image border and whose centre lies above
/// the patient's table (above the centre of the tissue + 20 % of the image height: a table cradle's enclosed air
/// lies under the patient): (area cm², fraction of pure gas, HU < −950). An independent, plainer reading of
/// "air-density lung" than the guard's: a region with under 10 % of pure gas is lung (bowel gas has 25 % and more).
fn air_regions(hu: &HuSlice) -> Vec<(f64, f64)> {
    let (rows, cols) = (hu.rows, hu.cols);
    let air: Vec<bool> = hu.hu.iter().map(|&v| v < -400.0).collect();
    let tissue_rows: Vec<f64> = (0..rows * cols).filter(|&i| !air[i]).map(|i| (i / cols) as f64).collect();
    let tissue_centre = tissue_rows.iter().sum::<f64>() / tissue_rows.len().max(1) as f64;
    let mut seen = vec![false; rows * cols];
    let mut out = Vec::new();
    for start in 0..rows * cols {
        if !air[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        let (mut stack, mut n, mut row_sum, mut border, mut gas) = (vec![start], 0usize, 0.0, false, 0usize);
        while let Some(i) = stack.pop() {
            let (r, c) = (i / cols, i % cols);
            n += 1;
            gas += (hu.hu[i] < -950.0) as usize;
            row_sum += r as f64;
            border |= r == 0 || c == 0 || r == rows - 1 || c == cols - 1;
            let mut push = |j: usize| {
                if air[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if r > 0 {
                push(i - cols);
            }
            if r + 1 < rows {
                push(i + cols);
            }
            if c > 0 {
                push(i - 1);
            }
            if c + 1 < cols {
                push(i + 1);
            }
        }
        let centre = row_sum / n as f64;
        if !border && centre < tissue_centre + 0.2 * rows as f64 {
            out.push((n as f64 * hu.pixel_spacing[0] * hu.pixel_spacing[1] / 100.0, gas as f64 / n as f64));
        }
    }
    out
}

/// The largest air-density lung region on the slice, cm² (0 when none).
fn largest_lung_region_cm2(hu: &HuSlice) -> f64 {
    air_regions(hu).iter().filter(|r| r.1 < 0.1).map(|r| r.0).fold(0.0, f64::max)
}

fn position_mm(hu: &HuSlice) -> f64 {
    let o = hu.image_orientation.unwrap_or([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    let p = hu.image_position.unwrap_or([0.0; 3]);
    let n = [o[1] * o[5] - o[2] * o[4], o[2] * o[3] - o[0] * o[5], o[0] * o[4] - o[1] * o[3]];
    p[0] * n[0] + p[1] * n[1] + p[2] * n[2]
}

#[test]
fn the_guard_removes_no_phantom_lesion_voxel_the_model_found() {
    let ctx = context();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("severe");
    // A whole chest (60 slices of 5 mm), severe: consolidations with the rest.
    let st = std::process::Command::new(common::bin())
        .args(["phantom", "--out"])
        .arg(&dir)
        .args(["--seed", "7", "--slices", "60", "--thickness", "5", "--size", "512", "--severity", "severe"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let truth: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("truth/truth.json")).unwrap()).unwrap();
    let files = dcm_files(&dir);
    let lesions = truth["lesions"].as_array().unwrap();
    assert!(lesions.iter().any(|l| l["class"] == "consolidation"), "a severe phantom has a consolidation");
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().to_string()).collect();
    assert_eq!(serde_json::json!(names), truth["files"], "labels.raw is in file-name order");
    let labels = std::fs::read(dir.join("truth/labels.raw")).unwrap();

    // The product's per-slice segmentation (what `SeriesWork` does for each arriving instance) ...
    let input = &ctx.model.manifest.input;
    let classes = ctx.model.manifest.output.classes.len();
    let mut placed = Vec::new();
    let mut hus = Vec::new();
    for f in &files {
        let hu = hu_of(f);
        let mut x = vec![0f32; input.channels * input.height * input.width];
        preprocess::prepare(&hu, input, &mut x).unwrap();
        let scores = ctx.engine.infer(&x, 1).unwrap();
        let seg = segment_slice(&scores, classes, input.height, input.width, &hu);
        assert!(seg.air.is_some(), "segment_slice gives the guard its air mask");
        placed.push(PlacedSlice {
            segmentation: seg,
            position_mm: position_mm(&hu),
            image_position: hu.image_position.unwrap(),
            image_orientation: hu.image_orientation.unwrap(),
            pixel_spacing: hu.pixel_spacing,
            slice_thickness: hu.slice_thickness,
        });
        hus.push(hu);
    }
    // ... analysed with the guard and without it (no air masks: the guard does not apply).
    let size = hus[0].rows;
    assert_eq!(labels.len(), files.len() * size * size);
    let params = AnalysisParams::from(&ctx.config.analysis);
    let t = std::time::Instant::now();
    let guarded = analyse_series(&placed, &params);
    let guarded_s = t.elapsed().as_secs_f64();
    let mut off = placed.clone();
    for p in &mut off {
        p.segmentation.air = None;
    }
    let t = std::time::Instant::now();
    let unguarded = analyse_series(&off, &params);
    let unguarded_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    for hu in &hus {
        std::hint::black_box(lungsentry::analysis::lung_guard::air_mask(hu));
    }
    eprintln!(
        "timings: air masks {:.1} ms/slice; series analysis {:.0} ms with the guard, {:.0} ms without ({} slices)",
        t.elapsed().as_secs_f64() * 1000.0 / hus.len() as f64,
        guarded_s * 1000.0,
        unguarded_s * 1000.0,
        hus.len()
    );
    assert!(guarded.lung_guard.applied && !unguarded.lung_guard.applied);

    // The guard's own output (before `plausible_lungs` and the lesion minimum volume), to tell where a loss comes from.
    let mut sorted: Vec<&PlacedSlice> = placed.iter().collect();
    sorted.sort_by(|a, b| a.position_mm.total_cmp(&b.position_mm));
    let spacing = guarded.slice_spacing_mm;
    let guard_out = lungsentry::analysis::lung_guard::guard(
        &sorted,
        |s| s.pixel_spacing[0] * s.pixel_spacing[1] * spacing / 1000.0,
        spacing,
    )
    .unwrap();
    let (mut lost_in_guard_lung, mut lost_dense) = (0usize, 0usize);
    let (mut found, mut found_dense, mut lost, mut lung_found, mut lung_lost) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    for k in 0..files.len() {
        let (g, u) = (guarded.slice_order[k], unguarded.slice_order[k]);
        assert_eq!(g, u);
        let (lost_before, lung_lost_before) = (lost, lung_lost);
        let plane = &labels[g * size * size..(g + 1) * size * size];
        for (i, &t) in plane.iter().enumerate() {
            if t == 2 && unguarded.lesion_masks[k].get_index(i) {
                found += 1;
                let dense = hus[g].hu[i] > -100.0;
                found_dense += dense as usize;
                lost_dense += (dense && !guarded.lesion_masks[k].get_index(i)) as usize;
                let l = !guarded.lesion_masks[k].get_index(i);
                lost += l as usize;
                lost_in_guard_lung += (l && guard_out.lung[k].get_index(i)) as usize;
            }
            if t >= 1 && unguarded.lung_masks[k].get_index(i) {
                lung_found += 1;
                lung_lost += !guarded.lung_masks[k].get_index(i) as usize;
            }
        }
        if lost > lost_before || lung_lost > lung_lost_before {
            eprintln!(
                "slice {k} ({}): lesion voxels lost {}, lung voxels lost {}; model lung {} kept {}",
                names[g],
                lost - lost_before,
                lung_lost - lung_lost_before,
                unguarded.lung_masks[k].count(),
                guarded.lung_masks[k].count()
            );
        }
    }
    eprintln!(
        "phantom: truth-lesion voxels the model found {found} (dense {found_dense}), lost to the guard {lost}; \
         truth-lung voxels found {lung_found}, lost {lung_lost}; involvement {:.2} % guarded, {:.2} % unguarded",
        guarded.involvement_percent, unguarded.involvement_percent
    );
    assert!(found > 10_000, "the model must find lesion for this test to mean anything ({found})");
    assert!(found_dense > 500, "… dense consolidation among it ({found_dense})");
    eprintln!(
        "of the lost lesion voxels, {lost_dense} dense (> −100 HU), {lost_in_guard_lung} in the guard's lung (lost \
         downstream)"
    );
    // Measured with seed 7: v0.5.0 63 of 337 390 (0.02 %), v0.6.0 339 of 309 435 (0.11 %), nearly all dense and all
    // removed by the guard itself: lesion the model labels apart from the lung it lies in, more than 15 mm from
    // aerated lung and not enclosed by the kept lung (mid-chest islands inside large consolidations), and at the
    // left lung base beside the stomach bubble, whose 5 mm gas rim takes the nearby lung air. Allowed: at most
    // 1 in 500. Not zero: a known gap of the rule (models/MODEL_CARD.md, "Lung guard").
    assert!(lost * 500 <= found, "the guard removed {lost} of {found} truth-lesion voxels the model had found");
    assert!(lung_lost * 200 <= lung_found, "the guard removed {lung_lost} of {lung_found} truth-lung voxels");

    // The series worker (the daemon's and `analyze`'s path) gives the guarded result.
    let (r, _) = product(&ctx, &files);
    assert_eq!(r["lung_guard"]["applied"], true, "{}", r["lung_guard"]);
    assert!((r["lesion_volume_ml"].as_f64().unwrap() - guarded.lesion_volume_ml).abs() < 1e-9);
    assert!((r["lung_volume_ml"].as_f64().unwrap() - guarded.lung_volume_ml).abs() < 1e-9);
    assert!(
        (r["lung_guard"]["unguarded_lesion_volume_ml"].as_f64().unwrap() - unguarded.lesion_volume_ml).abs() < 1e-9
    );
}

#[test]
fn pancreas_series_abdomen_slices_get_no_lung_or_lesion_and_chest_slices_keep_their_lungs() {
    let ctx = context();
    let dir = common::data_dir().join("real-ct-series/normal-pancreas-ct-cb-001");
    let (r, slices) = product(&ctx, &dcm_files(&dir));
    assert_eq!(r["lung_guard"]["applied"], true, "{}", r["lung_guard"]);
    let by_hu: Vec<(f64, f64, &SourceSlice)> = slices
        .iter()
        .map(|s| {
            let hu = hu_of(&s.path);
            (position_mm(&hu), largest_lung_region_cm2(&hu), s)
        })
        .collect();
    // The lung base by HU: the lowest slice with an air-density region of 20 cm² or more. The posterior
    // costophrenic recesses reach some 25-30 mm below it; slices more than 40 mm below are abdomen.
    let base = by_hu.iter().filter(|x| x.1 >= 20.0).map(|x| x.0).fold(f64::INFINITY, f64::min);
    assert!(base.is_finite());
    let mut abdomen = 0;
    let mut chest = 0;
    for (z, area, s) in &by_hu {
        let name = s.path.file_name().unwrap().to_string_lossy();
        if *z < base - 40.0 {
            abdomen += 1;
            assert_eq!(s.lesion.count(), 0, "{name} (z {z}, {base} at the lung base): lesion on an abdomen slice");
            assert_eq!(s.lung.count(), 0, "{name} (z {z}): lung on an abdomen slice");
        } else if *area >= 50.0 {
            // A chest slice keeps its lungs: at least half the air-density lung area is lung.
            chest += 1;
            let kept_cm2 = s.lung.count() as f64 * s.meta.pixel_spacing.map_or(1.0, |p| p[0] * p[1]) / 100.0;
            assert!(
                kept_cm2 >= 0.5 * area,
                "{name}: {kept_cm2:.1} cm² of lung kept, {area:.1} cm² of air-density lung"
            );
        }
    }
    eprintln!(
        "pancreas: {abdomen} abdomen slices, {chest} chest slices; involvement {} % (unguarded {} %)",
        r["involvement_percent"], r["lung_guard"]["unguarded_involvement_percent"]
    );
    assert!(abdomen >= 12 && chest >= 20, "{abdomen} abdomen and {chest} chest slices: the series is not what it was");
}

#[test]
fn ny_sbu_single_slices_without_lung_get_no_lesion_and_chest_slices_keep_their_lungs() {
    let ctx = context();
    let dir = common::data_dir().join("real-dicom/covid19-ny-sbu-axial");
    let (mut abdomen, mut chest) = (Vec::new(), 0);
    for f in dcm_files(&dir) {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let area = largest_lung_region_cm2(&hu_of(&f));
        let (r, slices) = product(&ctx, std::slice::from_ref(&f));
        if r["analysed_slices"] == 0 {
            eprintln!("{name}: not analysable ({})", r["slice_errors"]);
            continue;
        }
        assert_eq!(r["lung_guard"]["applied"], true, "{name}: {}", r["lung_guard"]);
        let s = &slices[0];
        if area < 10.0 {
            abdomen.push(name.clone());
            assert_eq!(s.lesion.count(), 0, "{name}: lesion on a slice without air-density lung ({area:.1} cm²)");
            assert_eq!(r["positive"], false, "{name}");
        } else if area >= 30.0 {
            chest += 1;
            let kept_cm2 = s.lung.count() as f64 * s.meta.pixel_spacing.map_or(1.0, |p| p[0] * p[1]) / 100.0;
            assert!(kept_cm2 >= 0.5 * area, "{name}: {kept_cm2:.1} cm² of lung kept, largest air region {area:.1} cm²");
        }
    }
    eprintln!("NY-SBU: slices without lung {abdomen:?}; chest slices {chest}");
    // The kidney-level slice with bowel gas, and the upper-abdomen slices of two patients.
    assert!(abdomen.iter().any(|n| n.starts_with("A058062_19010108")), "{abdomen:?}");
    assert!(abdomen.len() >= 3 && chest >= 10, "{abdomen:?}, {chest}");
}

/// The RICORD series (248 slices 512², JPEG Lossless: on 212 of them the 3D rule drops air specks, so their
/// pre-seeds do not hold and completion seeds them again): every slice's air mask on bit rows (the product's) equals
/// the pixel-by-pixel one; the guard's output with the product's seeding (bit rows, the pre-seeds `SeriesWork` makes
/// as slices arrive) equals, bit for bit, the output of the pixel seeding of every slice, the seeding the product used
/// before; prints the timings of both (best of three).
#[test]
fn ricord_the_guard_seeding_on_rows_equals_the_pixel_seeding_bit_for_bit() {
    let ctx = context();
    let dir = common::data_dir().join("real-ct-series/covid-ricord-1a-001012/axial_248");
    let input = &ctx.model.manifest.input;
    let classes = ctx.model.manifest.output.classes.len();
    let mut placed = Vec::new();
    for f in dcm_files(&dir) {
        let hu = hu_of(&f);
        let mut x = vec![0f32; input.channels * input.height * input.width];
        preprocess::prepare(&hu, input, &mut x).unwrap();
        let scores = ctx.engine.infer(&x, 1).unwrap();
        let mut p = PlacedSlice {
            segmentation: segment_slice(&scores, classes, input.height, input.width, &hu),
            position_mm: position_mm(&hu),
            image_position: hu.image_position.unwrap(),
            image_orientation: hu.image_orientation.unwrap(),
            pixel_spacing: hu.pixel_spacing,
            slice_thickness: hu.slice_thickness,
        };
        p.segmentation.pre_seed = lung_guard::pre_seed(&p);
        // The slice's air as the product made it (bit rows) is the pixel-by-pixel reference's.
        let reference = lung_guard::air_mask_with(&hu, AirMasking::Pixels);
        assert_eq!(lung_guard::air_mask(&hu), reference, "{}: air mask", f.display());
        assert_eq!(p.segmentation.air.as_ref(), Some(&reference.candidate), "{}: air candidate", f.display());
        placed.push(p);
    }
    assert_eq!(placed.len(), 248);
    let spacing = analyse_series(&placed, &AnalysisParams::from(&ctx.config.analysis)).slice_spacing_mm;
    let mut sorted: Vec<&PlacedSlice> = placed.iter().collect();
    sorted.sort_by(|a, b| a.position_mm.total_cmp(&b.position_mm));
    let voxel_ml = |s: &PlacedSlice| s.pixel_spacing[0] * s.pixel_spacing[1] * spacing / 1000.0;
    let timed = |seeding: Seeding| {
        let mut best = f64::INFINITY;
        let mut out = None;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            out = lung_guard::guard_with(&sorted, voxel_ml, spacing, seeding);
            best = best.min(t.elapsed().as_secs_f64() * 1000.0);
        }
        (out.expect("every slice has an air mask"), best)
    };
    let (rows, rows_ms) = timed(Seeding::Rows);
    let (pixels, pixels_ms) = timed(Seeding::Pixels);
    eprintln!(
        "RICORD guard (3D air components and seeding of 248 slices), best of 3: {rows_ms:.1} ms on bit rows with \
         pre-seeds, {pixels_ms:.1} ms pixel by pixel"
    );
    assert_eq!(rows.report, pixels.report);
    for k in 0..sorted.len() {
        assert_eq!(rows.lung[k], pixels.lung[k], "slice {k}: kept model lung");
        assert_eq!(rows.field[k], pixels.field[k], "slice {k}: lung field");
    }
    // The series is what it was: lungs kept, and the guard at work (model lung dropped, some slices without field).
    assert!(rows.report.lung_components >= 1 && rows.report.lung_air_ml > 1000.0, "{:?}", rows.report);
    assert!(rows.report.slices_with_lung_field > 100, "{:?}", rows.report);
    assert!(rows.lung.iter().zip(&sorted).any(|(m, s)| m.count() < s.segmentation.lung.count()), "nothing dropped");
}
