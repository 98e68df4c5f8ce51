//! `lungsentry eval --images` reads PNG and JPEG, 8- and 16-bit: slices of the covid19-ct-seg-256 set written
//! again by Pillow as 16-bit PNG (value × 257) and as 8-bit JPEG (quality 100, no chroma subsampling) give the
//! PNG's figures (exactly for 16-bit PNG, within JPEG's rounding for JPEG).

mod common;

use std::path::Path;
use std::process::Command;

/// Slices of validation patient P03 (models/validation.json), a few with lesions.
const FIRST: u32 = 330;
const N: u32 = 8;

fn eval(images: &Path, masks: &Path) -> serde_json::Value {
    let out = Command::new(common::bin())
        .args(["eval", "--json", "--engine", "tract", "--manifest"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/manifest.toml"))
        .arg("--images")
        .arg(images)
        .arg("--masks")
        .arg(masks)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    r["engines"][0].clone()
}

#[test]
fn png_16_bit_png_and_jpeg_folders_give_the_same_figures() {
    let data = common::data_dir().join("covid19-ct-seg-256");
    let tmp = tempfile::tempdir().unwrap();
    let (png8, png16, jpeg, masks) =
        (tmp.path().join("png8"), tmp.path().join("png16"), tmp.path().join("jpeg"), tmp.path().join("masks"));
    for d in [&png8, &png16, &jpeg, &masks] {
        std::fs::create_dir_all(d).unwrap();
    }
    for i in FIRST..FIRST + N {
        let name = format!("{i:04}.png");
        std::fs::copy(data.join("ct").join(&name), png8.join(&name)).unwrap();
        std::fs::copy(data.join("covid").join(&name), masks.join(&name)).unwrap();
    }
    let script = r#"
import sys, pathlib
import numpy as np
from PIL import Image
src, p16, jp = map(pathlib.Path, sys.argv[1:4])
for f in sorted(src.glob("*.png")):
    a = np.asarray(Image.open(f).convert("L"), dtype=np.uint16)
    Image.fromarray(a * 257).save(p16 / f.name)
    Image.fromarray(a.astype(np.uint8)).save(jp / (f.stem + ".jpg"), quality=100, subsampling=0)
    # 16-bit really written: mode I;16 or I when read back.
    assert Image.open(p16 / f.name).mode.startswith("I"), Image.open(p16 / f.name).mode
"#;
    let out = Command::new("python3").arg("-c").arg(script).args([&png8, &png16, &jpeg]).output().unwrap();
    assert!(out.status.success(), "Pillow: {}", String::from_utf8_lossy(&out.stderr));

    // The readers: 16-bit PNG back to the 8-bit values exactly, JPEG within its rounding.
    for i in FIRST..FIRST + N {
        let a = lungsentry::tools::eval::read_gray_image(&png8.join(format!("{i:04}.png"))).unwrap();
        let b = lungsentry::tools::eval::read_gray_image(&png16.join(format!("{i:04}.png"))).unwrap();
        let c = lungsentry::tools::eval::read_gray_image(&jpeg.join(format!("{i:04}.jpg"))).unwrap();
        assert_eq!((b.rows, b.cols, c.rows, c.cols), (a.rows, a.cols, a.rows, a.cols));
        assert_eq!(a.px, b.px, "16-bit PNG {i}");
        let worst = a.px.iter().zip(&c.px).map(|(x, y)| (*x as i32 - *y as i32).abs()).max().unwrap();
        assert!(worst <= 4, "JPEG {i} off by {worst}");
    }

    let (e8, e16, ej) = (eval(&png8, &masks), eval(&png16, &masks), eval(&jpeg, &masks));
    for e in [&e8, &e16, &ej] {
        assert_eq!(e["n_images"], N, "{e}");
    }
    for k in ["lesion_dice_global", "slice_accuracy"] {
        assert_eq!(e8[k], e16[k], "{k}: 8-bit {} vs 16-bit PNG {}", e8[k], e16[k]);
        let (x, y) = (e8[k].as_f64().unwrap(), ej[k].as_f64().unwrap());
        assert!((x - y).abs() <= 0.03, "{k}: PNG {x} vs JPEG {y}");
    }
}
