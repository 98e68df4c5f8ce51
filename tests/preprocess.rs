//! Decoding and preprocessing against real peers: HU decoding (`decode`) against DCMTK (`dcmdump +W` raw pixel
//! dumps, `dcmcjpeg` and `dcmcrle` re-encodings) and the "minmax_clahe" contract (`preprocess`) against real
//! OpenCV (`python3` with cv2), on real LIDC-IDRI / COVID-19-NY-SBU / Siemens JPEG 2000 slices.

use std::path::{Path, PathBuf};
use std::process::Command;

use lungsentry::decode::{decode_hu_frames, HuSlice, PADDING_HU};
use lungsentry::model::InputContract;
use lungsentry::preprocess::{clahe_u8, minmax_u8, normalise_u8, prepare, resize_bilinear_u8};

fn data_dir() -> PathBuf {
    let p = std::env::var("LUNGSENTRY_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    assert!(p.is_dir(), "LUNGSENTRY_DATA {} is missing", p.display());
    p
}

fn lidc(i: usize) -> PathBuf {
    data_dir().join(format!("real-dicom/lidc-idri-2-slices/{i}.dcm"))
}

fn decode(path: &Path) -> Vec<HuSlice> {
    let obj = dicom_object::open_file(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    decode_hu_frames(&obj).unwrap_or_else(|e| panic!("decode {}: {e}", path.display()))
}

fn contract() -> InputContract {
    InputContract {
        name: "input".into(),
        channels: 1,
        height: 256,
        width: 256,
        dtype: "float32".into(),
        normalisation: "minmax_clahe".into(),
        hu_clip: [-1024.0, 3071.0],
        clahe_clip_limit: 7.0,
        clahe_tiles: 8,
    }
}

/// Raw stored values of an uncompressed file as DCMTK sees them (`dcmdump +W`).
fn dcmtk_raw_i16(path: &Path) -> Vec<i16> {
    let dir = tempfile::tempdir().unwrap();
    let st = Command::new("dcmdump").arg("+W").arg(dir.path()).arg(path).output().expect("run dcmdump");
    assert!(st.status.success(), "dcmdump failed: {}", String::from_utf8_lossy(&st.stderr));
    let name = format!("{}.0.raw", path.file_name().unwrap().to_string_lossy());
    let bytes = std::fs::read(dir.path().join(&name)).expect("dcmdump raw pixel file");
    bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect()
}

#[test]
fn lidc_hu_matches_dcmtk_raw_values() {
    for i in 0..2 {
        let path = lidc(i);
        let s = decode(&path);
        assert_eq!(s.len(), 1);
        let s = &s[0];
        assert_eq!((s.rows, s.cols), (512, 512));
        assert!(s.pixel_spacing_known);
        assert!((s.pixel_spacing[0] - 0.625).abs() < 1e-9 && (s.pixel_spacing[1] - 0.625).abs() < 1e-9);
        assert!(s.image_position.is_some() && s.image_orientation.is_some());
        // Slope 1, intercept 0: HU are the signed stored values.
        let raw = dcmtk_raw_i16(&path);
        assert_eq!(raw.len(), s.hu.len());
        let mismatches = raw.iter().zip(&s.hu).filter(|(r, h)| **r as f32 != **h).count();
        assert_eq!(mismatches, 0, "slice {i}: HU differ from DCMTK's stored values");
        // A chest slice: air and soft tissue present.
        assert!(s.hu.iter().any(|&v| v < -900.0) && s.hu.iter().any(|&v| (0.0..100.0).contains(&v)));
    }
}

#[test]
fn ge_padding_value_becomes_air_and_rescale_applies() {
    let path = data_dir().join("real-dicom/covid19-ny-sbu-axial/A002304_19001231-076.dcm");
    let s = &decode(&path)[0];
    let raw = dcmtk_raw_i16(&path);
    let mut padded = 0;
    for (r, h) in raw.iter().zip(&s.hu) {
        if *r == -2000 {
            padded += 1;
            assert_eq!(*h, PADDING_HU);
        } else {
            assert_eq!(*h, *r as f32 - 1024.0);
        }
    }
    assert!(padded > 10_000, "the GE slice has a padded border outside the FOV ({padded} pixels)");
    assert!((s.pixel_spacing[0] - 0.826172).abs() < 1e-6);
    assert_eq!(s.slice_thickness, Some(2.5));
}

#[test]
fn compressed_transfer_syntaxes_decode_identically() {
    // Re-encode a real slice with DCMTK (JPEG lossless SV1, RLE) and decode those: values must be identical.
    let path = lidc(0);
    let native = decode(&path)[0].hu.clone();
    let dir = tempfile::tempdir().unwrap();
    for (tool, args, name) in [("dcmcjpeg", vec!["+e1"], "jpegls.dcm"), ("dcmcrle", vec![], "rle.dcm")] {
        let out = dir.path().join(name);
        let st = Command::new(tool).args(&args).arg(&path).arg(&out).output().expect("run DCMTK encoder");
        assert!(st.status.success(), "{tool} failed: {}", String::from_utf8_lossy(&st.stderr));
        let s = decode(&out);
        assert_eq!(s[0].hu, native, "{tool} round trip changed HU values");
    }
}

#[test]
fn jpeg2000_series_decodes_to_plausible_hu() {
    let dir = data_dir().join("real-dicom/siemens-abdomen-j2k-series");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert_eq!(files.len(), 20);
    for f in files.iter().take(3) {
        let s = &decode(f)[0];
        assert_eq!((s.rows, s.cols), (512, 512));
        // 12-bit unsigned stored, intercept -1024: HU within [-1024, 3071].
        let (lo, hi) = s.hu.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        assert!(lo >= -1024.0 && hi <= 3071.0, "HU range {lo}..{hi}");
        let air = s.hu.iter().filter(|&&v| v < -900.0).count();
        let soft = s.hu.iter().filter(|&&v| (-100.0..200.0).contains(&v)).count();
        assert!(air > 10_000 && soft > 10_000, "air {air}, soft tissue {soft}");
    }
}

/// Runs the Python/OpenCV reference of the contract on a HU image; returns (minmax, clahe, resized) u8 images.
fn opencv_reference(hu: &[f32], rows: usize, cols: usize, out_h: usize, out_w: usize) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("hu.f32");
    std::fs::write(&inp, hu.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    // The trainer's own normalisation code (models/train/normalise.py) for steps 1-3, OpenCV for the resize.
    let script = r#"
import sys, numpy as np, cv2
sys.path.insert(0, sys.argv[7])
import normalise
inp, rows, cols, oh, ow, outdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
v = np.fromfile(inp, dtype='<f4').reshape(rows, cols)
u8 = normalise.minmax_u8(v)
eq = normalise.clahe_u8(u8)
rs = cv2.resize(eq, (ow, oh), interpolation=cv2.INTER_LINEAR)
u8.tofile(outdir + '/minmax.u8'); eq.tofile(outdir + '/clahe.u8'); rs.tofile(outdir + '/resized.u8')
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&inp)
        .args([rows, cols, out_h, out_w].map(|v| v.to_string()))
        .arg(dir.path())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/train"))
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python3 with numpy and cv2 (opencv-python-headless) is required: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rd = |n: &str| std::fs::read(dir.path().join(n)).unwrap();
    (rd("minmax.u8"), rd("clahe.u8"), rd("resized.u8"))
}

fn compare(ours: &[u8], theirs: &[u8]) -> (f64, u8) {
    assert_eq!(ours.len(), theirs.len());
    let same = ours.iter().zip(theirs).filter(|(a, b)| a == b).count();
    let maxd = ours.iter().zip(theirs).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
    (same as f64 / ours.len() as f64, maxd)
}

fn check_against_opencv(label: &str, s: &HuSlice, out_h: usize, out_w: usize) {
    let (ref_mm, ref_clahe, ref_rs) = opencv_reference(&s.hu, s.rows, s.cols, out_h, out_w);
    let mm = minmax_u8(&s.hu, [-1024.0, 3071.0]);
    let (same, maxd) = compare(&mm, &ref_mm);
    assert_eq!(maxd, 0, "{label}: min-max differs from numpy ({same})");
    // CLAHE on the *reference* 8-bit image, so each stage is judged on its own.
    let eq = clahe_u8(&ref_mm, s.rows, s.cols, 7.0, 8, 8);
    let (same, maxd) = compare(&eq, &ref_clahe);
    println!("{label}: CLAHE identical on {:.4} % of pixels, max diff {maxd}", same * 100.0);
    assert!(same >= 0.999 && maxd <= 1, "{label}: CLAHE identical {same}, max diff {maxd}");
    let rs = resize_bilinear_u8(&ref_clahe, s.rows, s.cols, out_h, out_w);
    let (same, maxd) = compare(&rs, &ref_rs);
    println!("{label}: resize identical on {:.4} % of pixels, max diff {maxd}", same * 100.0);
    assert!(maxd <= 1, "{label}: resize max diff {maxd}");
}

fn crop(s: &HuSlice, r0: usize, c0: usize, rows: usize, cols: usize) -> HuSlice {
    let mut hu = Vec::with_capacity(rows * cols);
    for r in r0..r0 + rows {
        hu.extend_from_slice(&s.hu[r * s.cols + c0..r * s.cols + c0 + cols]);
    }
    HuSlice::from_hu(rows, cols, hu)
}

#[test]
fn contract_matches_opencv_on_real_slices() {
    let lidc0 = decode(&lidc(0)).remove(0);
    check_against_opencv("LIDC 512²→256²", &lidc0, 256, 256);
    let ge = decode(&data_dir().join("real-dicom/covid19-ny-sbu-axial/A046441_19001111-045.dcm")).remove(0);
    check_against_opencv("NY-SBU 512²→256²", &ge, 256, 256);
    // Sizes not divisible by the tile grid (reflect-101 padding) and non-integer scale factors, both ways.
    check_against_opencv("LIDC crop 509×383→256²", &crop(&lidc0, 1, 60, 509, 383), 256, 256);
    check_against_opencv("LIDC crop 200×168→256²", &crop(&lidc0, 150, 170, 200, 168), 256, 256);
    check_against_opencv("LIDC crop 256×250→300×190", &crop(&lidc0, 100, 100, 256, 250), 300, 190);
}

#[test]
fn prepare_is_the_pipeline_over_255() {
    let s = decode(&lidc(1)).remove(0);
    let c = contract();
    let img = normalise_u8(&s, &c).unwrap();
    let mut out = vec![0f32; 256 * 256];
    prepare(&s, &c, &mut out).unwrap();
    assert!(out.iter().zip(&img).all(|(f, u)| *f == *u as f32 / 255.0));
    assert!(out.iter().all(|v| (0.0..=1.0).contains(v)));
    let mut short = vec![0f32; 10];
    assert!(prepare(&s, &c, &mut short).is_err());
    let (_, _, ref_rs) = opencv_reference(&s.hu, s.rows, s.cols, 256, 256);
    let (same, maxd) = compare(&img, &ref_rs);
    assert!(same >= 0.99 && maxd <= 1, "end to end vs OpenCV: identical {same}, max diff {maxd}");
}

#[test]
fn rows_columns_bounds_are_checked_before_decoding() {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let mut obj = dicom_object::open_file(lidc(0)).unwrap();
    obj.put(DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(5000u16)));
    let err = decode_hu_frames(&obj).unwrap_err().to_string();
    assert!(err.contains("5000"), "{err}");
    obj.put(DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(512u16)));
    obj.put(DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(12u16)));
    let err = decode_hu_frames(&obj).unwrap_err().to_string();
    assert!(err.contains("BitsAllocated"), "{err}");
}
