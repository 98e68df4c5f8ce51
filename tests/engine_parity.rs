//! tract and ONNX Runtime agree on the shipped model: per-pixel argmax labels on real slices (LIDC-IDRI,
//! COVID-19-NY-SBU through the full HU → contract path, and covid19-ct-seg-256 PNGs that are already the normalised
//! 8-bit image) match on ≥ 99.9 % of pixels. Skips (saying why) while `models/manifest.toml` does not exist.

use std::path::{Path, PathBuf};

use lungsentry::config::EngineKind;
use lungsentry::decode::decode_hu_frames;
use lungsentry::engine::load_engine;
use lungsentry::model::Model;
use lungsentry::preprocess::{prepare, resize_bilinear_u8, u8_to_input};
use lungsentry::tools::eval::read_png_gray;

fn data_dir() -> PathBuf {
    let p = std::env::var("LUNGSENTRY_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    assert!(p.is_dir(), "LUNGSENTRY_DATA {} is missing", p.display());
    p
}

fn shipped_model() -> Option<Model> {
    let m = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/manifest.toml");
    if !m.exists() {
        println!("SKIP: models/manifest.toml does not exist yet (the model is not shipped)");
        return None;
    }
    Some(Model::load(&m).expect("shipped model loads and matches its sha256"))
}

fn argmax(scores: &[f32], n: usize, classes: usize, plane: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * plane);
    for i in 0..n {
        let s = &scores[i * classes * plane..(i + 1) * classes * plane];
        for p in 0..plane {
            let mut best = 0;
            for k in 1..classes {
                if s[k * plane + p] > s[best * plane + p] {
                    best = k;
                }
            }
            out.push(best as u8);
        }
    }
    out
}

#[test]
fn tract_and_ort_labels_agree_on_real_slices() {
    let Some(model) = shipped_model() else { return };
    let inp = model.manifest.input.clone();
    let plane = inp.height * inp.width;
    let classes = model.manifest.output.classes.len();
    let data = data_dir();

    let mut x: Vec<f32> = Vec::new();
    let mut names = Vec::new();
    let mut dicoms =
        vec![data.join("real-dicom/lidc-idri-2-slices/0.dcm"), data.join("real-dicom/lidc-idri-2-slices/1.dcm")];
    for f in ["A002304_19001231-076.dcm", "A046441_19001111-045.dcm", "A072894_19010103-40.dcm"] {
        dicoms.push(data.join("real-dicom/covid19-ny-sbu-axial").join(f));
    }
    for p in &dicoms {
        let obj = dicom_object::open_file(p).unwrap();
        let hu = decode_hu_frames(&obj).unwrap().remove(0);
        let mut buf = vec![0f32; plane];
        prepare(&hu, &inp, &mut buf).unwrap();
        x.extend_from_slice(&buf);
        names.push(p.file_name().unwrap().to_string_lossy().to_string());
    }
    for i in [10, 400, 800, 1200] {
        let p = data.join(format!("covid19-ct-seg-256/ct/{i:04}.png"));
        let g = read_png_gray(&p).unwrap();
        let r = resize_bilinear_u8(&g.px, g.rows, g.cols, inp.height, inp.width);
        let mut buf = vec![0f32; plane];
        u8_to_input(&r, &mut buf);
        x.extend_from_slice(&buf);
        names.push(format!("covid19-ct-seg-256/{i:04}.png"));
    }
    let n = names.len();

    let tract = load_engine(EngineKind::Tract, &model).expect("tract loads the shipped model");
    let ort = load_engine(EngineKind::Ort, &model)
        .expect("ONNX Runtime must load for this test (set ORT_DYLIB_PATH or install the onnxruntime wheel)");
    assert_eq!((tract.name(), ort.name()), ("tract", "ort"));
    let st = tract.infer(&x, n).unwrap();
    let so = ort.infer(&x, n).unwrap();
    assert_eq!(st.len(), n * classes * plane);
    assert_eq!(so.len(), st.len());
    // Batch of one gives the same as the batch (tract runs slices independently; ort batches).
    let single = ort.infer(&x[..plane], 1).unwrap();
    let diff = single.iter().zip(&so[..classes * plane]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-3, "ort batch-of-1 vs batch differ by {diff}");

    let lt = argmax(&st, n, classes, plane);
    let lo = argmax(&so, n, classes, plane);
    for (i, name) in names.iter().enumerate() {
        let a = &lt[i * plane..(i + 1) * plane];
        let b = &lo[i * plane..(i + 1) * plane];
        let same = a.iter().zip(b).filter(|(p, q)| p == q).count() as f64 / plane as f64;
        let max_score_diff = st[i * classes * plane..(i + 1) * classes * plane]
            .iter()
            .zip(&so[i * classes * plane..(i + 1) * classes * plane])
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        let lung = a.iter().filter(|&&v| v >= 1).count();
        println!("{name}: labels agree on {:.4} %, max score diff {max_score_diff:.2e}, lung px {lung}", same * 100.0);
        assert!(same >= 0.999, "{name}: tract and ort agree on only {:.4} % of pixels", same * 100.0);
    }
}
