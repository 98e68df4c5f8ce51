//! The shipped model: integrity check at load, and `lungsentry eval` reproducing the model card's validation
//! figures (models/validation.json) on one validation patient of covid19-ct-seg-256.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn manifest() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/manifest.toml")
}

#[test]
fn shipped_model_matches_its_manifest_and_a_tampered_copy_is_refused() {
    let m = lungsentry::model::Model::load(&manifest()).expect("shipped model must verify");
    assert_eq!(m.manifest.output.classes, ["background", "lung", "lesion"]);
    let size = std::fs::metadata(&m.onnx_path).unwrap().len();
    assert!(size < 10_000_000, "model is {size} bytes; must stay under 10 MB");

    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(manifest()).unwrap();
    std::fs::write(tmp.path().join("manifest.toml"), &text).unwrap();
    let mut bytes = std::fs::read(&m.onnx_path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(tmp.path().join(&m.manifest.model.file), bytes).unwrap();
    let e = lungsentry::model::Model::load(&tmp.path().join("manifest.toml")).unwrap_err();
    assert!(format!("{e:#}").contains("sha256"), "{e:#}");
}

/// `lungsentry eval --images` on validation patient P03 gives the per-patient Dice the model card reports.
#[test]
fn eval_reproduces_the_model_card_on_a_validation_patient() {
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/validation.json")).unwrap(),
    )
    .unwrap();
    let p = &v["covid19_ct_seg_256_val"]["per_patient"]["P03"];
    let files = p["files"].as_str().unwrap(); // "0279.png-0396.png"
    let (a, b) = files.split_once('-').unwrap();
    let num = |s: &str| s.trim_end_matches(".png").parse::<u32>().unwrap();
    let data = data_dir().join("covid19-ct-seg-256");
    let tmp = tempfile::tempdir().unwrap();
    for sub in ["ct", "covid", "lungs"] {
        std::fs::create_dir_all(tmp.path().join(sub)).unwrap();
        for i in num(a)..=num(b) {
            let name = format!("{i:04}.png");
            std::os::unix::fs::symlink(data.join(sub).join(&name), tmp.path().join(sub).join(&name)).unwrap();
        }
    }
    let out = Command::new(bin())
        .args(["eval", "--json", "--manifest"])
        .arg(manifest())
        .arg("--images")
        .arg(tmp.path().join("ct"))
        .arg("--masks")
        .arg(tmp.path().join("covid"))
        .arg("--lungs")
        .arg(tmp.path().join("lungs"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &r["engines"][0];
    assert_eq!(e["n_images"].as_u64().unwrap(), p["slices"].as_u64().unwrap());
    for (ours, card) in [("lesion_dice_global", "lesion_dice"), ("lung_dice_global", "lung_dice")] {
        let (x, y) = (e[ours].as_f64().unwrap(), p[card].as_f64().unwrap());
        eprintln!("{ours}: eval {x:.4}, model card {y:.4}");
        assert!((x - y).abs() <= 0.005, "{ours}: eval {x} vs model card {y}");
    }
}
