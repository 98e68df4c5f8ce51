//! `lungsentry eval --real` (issue 26) on a small manifest built here from real data: six slices of the normal
//! pancreas series (`dicom`), two COVID-19-NY-SBU single slices (`dicom-slices`), five LUNA16 PNG slices
//! (`luna-png`), and a folder mixing two series (one row each). Checks the report's structure and that its figures
//! agree with each other and with the folders — never the model's figures, which change with every model.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

/// The one COVID-19-NY-SBU file that is a reformatted (derived) image.
const DERIVED_SLICE: &str = "A072894_19001203-066.dcm";

fn copy_files(from: &Path, names: &[String], to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for n in names {
        std::fs::copy(from.join(n), to.join(n)).unwrap_or_else(|e| panic!("copying {n}: {e}"));
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// The test set: (manifest path, tempdir kept alive).
fn build_set() -> (PathBuf, tempfile::TempDir) {
    let data = data_dir();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let pancreas = data.join("real-ct-series/normal-pancreas-ct-cb-001");
    let pan_names = names(&pancreas);
    copy_files(&pancreas, &pan_names[30..36], &t.join("pancreas"));
    let sbu = data.join("real-dicom/covid19-ny-sbu-axial");
    let mut sbu_names = names(&sbu)[..2].to_vec();
    // A DERIVED/SECONDARY/REFORMATTED image: the daemon analyses no slice of it, so it gets no flag.
    sbu_names.push(DERIVED_SLICE.to_string());
    copy_files(&sbu, &sbu_names, &t.join("sbu"));
    let luna = data.join("real-ct-series/luna16-normal-3/normal_patient_3");
    let luna_names: Vec<String> = (120..125).map(|z| format!("z_{z:03}.png")).collect();
    copy_files(&luna, &luna_names, &t.join("luna"));
    // Two series in one folder: two pancreas slices and two slices of the second ACRIN series.
    copy_files(&pancreas, &pan_names[40..42], &t.join("mixed"));
    let acrin = data.join("real-ct-series/normal-acrin-flt-breast-001/series-2");
    copy_files(&acrin, &names(&acrin)[10..12], &t.join("mixed"));
    std::fs::write(t.join("mixed/readme.txt"), "not DICOM\n").unwrap();
    let manifest = t.join("real.toml");
    std::fs::write(
        &manifest,
        format!(
            r#"description = "test set"
[[series]]
name = "pancreas"
kind = "dicom"
path = "pancreas"
expected = "negative"

[[series]]
name = "sbu"
kind = "dicom-slices"
path = "{sbu}"
expected = "positive"

[[series]]
name = "luna"
kind = "luna-png"
path = "luna"
expected = "negative"
pixel_spacing_mm = 1.5
slice_spacing_mm = 2.0

[[series]]
name = "mixed"
kind = "dicom"
path = "mixed"
expected = "negative"
"#,
            sbu = t.join("sbu").display()
        ),
    )
    .unwrap();
    (manifest, tmp)
}

fn run_eval(manifest: &Path, data: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(bin())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["eval", "--real"])
        .arg(manifest)
        .arg("--data")
        .arg(data)
        .args(extra)
        .output()
        .expect("run lungsentry eval --real")
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn u(v: &Value) -> usize {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}")) as usize
}

#[test]
fn real_eval_reports_consistent_figures_per_series_and_over_the_manifest() {
    let (manifest, tmp) = build_set();
    let overlays = tmp.path().join("overlays");
    let out_json = tmp.path().join("report.json");
    let out = run_eval(
        &manifest,
        tmp.path(),
        &[
            "--json",
            "--out",
            out_json.to_str().unwrap(),
            "--overlays",
            overlays.to_str().unwrap(),
            "--overlay-count",
            "3",
        ],
    );
    assert!(out.status.success(), "eval --real failed: {}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    let written: Value = serde_json::from_slice(&std::fs::read(&out_json).unwrap()).unwrap();
    assert_eq!(r, written, "--out holds the same report");
    assert_eq!(r["mode"], "real");
    assert_eq!(r["description"], "test set");
    assert!(r["model"]["sha256"].is_string());
    let threshold = f(&r["threshold_percent"]);
    assert_eq!(threshold, 0.4, "the daemon's default threshold");
    let e = &r["engines"][0];
    let series = e["series"].as_array().unwrap();
    let by_name = |n: &str| series.iter().find(|s| s["name"] == n).unwrap_or_else(|| panic!("no row {n}"));

    // One row per DICOM series, per single slice, per PNG folder; a folder with two series gives two rows.
    let row_names: Vec<&str> = series.iter().map(|s| s["name"].as_str().unwrap()).collect();
    let sbu_stems: Vec<String> =
        names(&tmp.path().join("sbu")).iter().map(|n| format!("sbu/{}", n.trim_end_matches(".dcm"))).collect();
    let mut expected_names = vec!["pancreas".to_string()];
    expected_names.extend(sbu_stems);
    expected_names.extend(["luna".into(), "mixed/#1".into(), "mixed/#2".into()]);
    assert_eq!(row_names, expected_names);
    assert_eq!(u(&e["n_series"]), series.len());

    let expected_slices = [("pancreas", 6), ("luna", 5), ("mixed/#1", 2), ("mixed/#2", 2)];
    for (name, n) in expected_slices {
        let s = by_name(name);
        assert_eq!(u(&s["n_slices"]), n, "{name}: slices in the folder");
        assert_eq!(u(&s["analysed_slices"]), n, "{name}: every slice analysed");
    }
    assert_ne!(by_name("mixed/#1")["series_instance_uid"], by_name("mixed/#2")["series_instance_uid"]);
    for n in expected_names.iter().filter(|n| n.starts_with("sbu/")) {
        assert_eq!(u(&by_name(n)["n_slices"]), 1, "{n}: a single slice is its own series");
    }
    assert_eq!(by_name("luna")["geometry"]["source"], "manifest");
    assert_eq!(f(&by_name("luna")["geometry"]["slice_spacing_mm"]), 2.0);
    assert_eq!(by_name("pancreas")["geometry"]["source"], "dicom");
    let luna_files: Vec<&str> =
        by_name("luna")["slices"].as_array().unwrap().iter().map(|s| s["file"].as_str().unwrap()).collect();
    assert_eq!(luna_files, ["z_120.png", "z_121.png", "z_122.png", "z_123.png", "z_124.png"], "feet to head");

    let mut conf = [0usize; 4]; // tp fp tn fn
    for s in series {
        let name = s["name"].as_str().unwrap();
        let involvement = f(&s["involvement_percent"]);
        let positive = s["positive"].as_bool().unwrap();
        let expected_positive = s["expected"] == "positive";
        assert_eq!(positive, involvement > threshold, "{name}: flag is involvement > threshold");
        if s["status"] == "skipped" {
            assert!(s["flag_correct"].is_null() && !positive && u(&s["analysed_slices"]) == 0, "{name}");
            assert!(!s["skip_reasons"].as_array().unwrap().is_empty(), "{name}: a skipped series says why");
            continue;
        }
        assert_eq!(s["status"], "analysed", "{name}");
        assert_eq!(s["flag_correct"].as_bool().unwrap(), positive == expected_positive, "{name}");
        let lung = f(&s["lung_volume_ml"]);
        let lesion = f(&s["lesion_volume_ml"]);
        if lung > 0.0 {
            assert!((lesion / lung * 100.0 - involvement).abs() < 1e-6, "{name}: involvement = lesion / lung");
        } else {
            assert_eq!(involvement, 0.0, "{name}");
        }
        assert!(lesion <= lung + 1e-9, "{name}: lesion inside lung");
        // Per-slice rows: counts, and volumes from pixels × voxel size.
        let rows = s["slices"].as_array().unwrap();
        assert_eq!(rows.len(), u(&s["analysed_slices"]), "{name}");
        let with_lesion = rows.iter().filter(|r| u(&r["lesion_px"]) > 0).count();
        assert_eq!(u(&s["positive_slices"]), with_lesion, "{name}: positive slices");
        let g = &s["geometry"];
        let voxel_ml = f(&g["pixel_spacing_mm"][0]) * f(&g["pixel_spacing_mm"][1]) * f(&g["slice_spacing_mm"]) / 1000.0;
        let lung_px: usize = rows.iter().map(|r| u(&r["lung_px"])).sum();
        let lesion_px: usize = rows.iter().map(|r| u(&r["lesion_px"])).sum();
        assert!((lung_px as f64 * voxel_ml - lung).abs() <= 1e-6 * lung.max(1.0), "{name}: lung volume from pixels");
        assert!((lesion_px as f64 * voxel_ml - lesion).abs() <= 1e-6 * lung.max(1.0), "{name}: lesion volume");
        assert_eq!(u(&s["lesion_count"]) == 0, lesion_px == 0, "{name}: lesions iff lesion pixels");
        for r in rows {
            assert!(u(&r["lesion_px"]) <= u(&r["lung_px"]), "{name}: lesion implies lung");
        }
        if expected_positive {
            assert!(s["slice_specificity"].is_null(), "{name}: slice specificity is for negative series");
        } else {
            let spec = f(&s["slice_specificity"]);
            assert!((spec - (rows.len() - with_lesion) as f64 / rows.len() as f64).abs() < 1e-12, "{name}");
        }
        let k = match (positive, expected_positive) {
            (true, true) => 0,
            (true, false) => 1,
            (false, false) => 2,
            (false, true) => 3,
        };
        conf[k] += 1;
    }
    let c = &e["series_confusion"];
    assert_eq!([u(&c["tp"]), u(&c["fp"]), u(&c["tn"]), u(&c["fn"])], conf);
    assert_eq!(conf.iter().sum::<usize>() + u(&e["n_skipped"]), series.len());
    assert_eq!(f(&e["series_sensitivity"]), conf[0] as f64 / (conf[0] + conf[3]) as f64);
    assert_eq!(f(&e["series_specificity"]), conf[2] as f64 / (conf[2] + conf[1]) as f64);
    let negatives: Vec<&Value> = series.iter().filter(|s| s["expected"] == "negative").collect();
    assert_eq!(u(&e["negative_slices"]), 6 + 5 + 2 + 2);
    let clear: usize = negatives.iter().map(|s| u(&s["analysed_slices"]) - u(&s["positive_slices"])).sum();
    assert_eq!(u(&e["negative_slices_without_lesion"]), clear);
    let sbu_entry = e["by_entry"].as_array().unwrap().iter().find(|b| b["entry"] == "sbu").unwrap();
    assert_eq!(u(&sbu_entry["n_series"]), 3);
    assert_eq!(u(&sbu_entry["skipped"]), 1);
    let derived = by_name(&format!("sbu/{}", DERIVED_SLICE.trim_end_matches(".dcm")));
    assert_eq!(derived["status"], "skipped");
    assert!(derived["skip_reasons"].to_string().contains("derived"), "{}", derived["skip_reasons"]);
    assert_eq!(u(&e["n_skipped"]), 1);

    // Overlays: the negative-series slices with the most lesion pixels, worst first, each a two-panel PNG.
    let mut fp_slices: Vec<(usize, String, usize)> = Vec::new();
    for s in &negatives {
        for r in s["slices"].as_array().unwrap() {
            if u(&r["lesion_px"]) > 0 {
                fp_slices.push((u(&r["lesion_px"]), s["name"].as_str().unwrap().to_string(), u(&r["index"])));
            }
        }
    }
    fp_slices.sort_by_key(|a| std::cmp::Reverse(a.0));
    let listed = e["overlays"].as_array().unwrap();
    assert_eq!(listed.len(), fp_slices.len().min(3));
    let on_disk = if overlays.exists() { names(&overlays) } else { Vec::new() };
    assert_eq!(on_disk.len(), listed.len(), "{on_disk:?}");
    for (o, want) in listed.iter().zip(&fp_slices) {
        assert_eq!(u(&o["lesion_px"]), want.0, "worst first");
        let s = by_name(o["series"].as_str().unwrap());
        assert_eq!(s["expected"], "negative");
        let row = &s["slices"][u(&o["slice_index"])];
        assert_eq!(u(&row["lesion_px"]), u(&o["lesion_px"]));
        let img = lungsentry::tools::eval::read_png_gray(&overlays.join(o["file"].as_str().unwrap())).unwrap();
        assert!(img.cols > 2 * img.rows, "two panels side by side: {}×{}", img.cols, img.rows);
    }

    // The human table names every series and the summary.
    let table = run_eval(&manifest, tmp.path(), &[]);
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    for n in &expected_names {
        assert!(text.contains(n.as_str()), "table lacks {n}:\n{text}");
    }
    assert!(text.contains("series sensitivity"), "{text}");
}

#[test]
fn real_eval_refuses_missing_folders_and_folders_without_dicom() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("empty")).unwrap();
    std::fs::write(tmp.path().join("empty/notes.txt"), "x").unwrap();
    let m = tmp.path().join("m.toml");
    let entry = |path: &str, kind: &str| {
        format!("[[series]]\nname = \"x\"\nkind = \"{kind}\"\npath = \"{path}\"\nexpected = \"negative\"\n")
    };
    for (text, needle) in [
        (entry("nowhere", "dicom"), "does not exist"),
        (entry("empty", "dicom"), "no DICOM instances"),
        (entry("empty", "dicom-slices"), "no DICOM instances"),
        (entry("empty", "luna-png"), "no z_NNN.png"),
        (entry("empty", "nifti"), "nifti"),
    ] {
        std::fs::write(&m, &text).unwrap();
        let out = run_eval(&m, tmp.path(), &["--json"]);
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{text}: {err}");
    }
}
