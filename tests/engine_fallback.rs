//! `engine = "tensorrt"` where TensorRT cannot run (a build without the `tensorrt` feature, no GPU, no TensorRT
//! runtime, or no engine file for this model/GPU/TensorRT): the series is still analysed, on the CPU engine, the
//! result names the engine that ran, and a warning says why.

mod common;

use std::process::Command;

#[test]
fn tensorrt_unavailable_falls_back_to_the_cpu_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let series = tmp.path().join("series");
    common::phantom(&series, 6060, 8, "moderate");
    let config = tmp.path().join("lungsentry.toml");
    let engines = tmp.path().join("engines");
    std::fs::create_dir_all(&engines).unwrap();
    // An engine for another model/GPU must not be picked up.
    std::fs::write(engines.join("lungsentry-unet-0000000000000000-some-other-gpu-trt100300.engine"), b"not ours")
        .unwrap();
    std::fs::write(&config, format!("[engine]\nkind = \"tensorrt\"\ntensorrt_engines = \"{}\"\n", engines.display()))
        .unwrap();
    let o = Command::new(common::bin())
        .args(["analyze", "--json", "--engine", "tensorrt", "--config"])
        .arg(&config)
        .arg(&series)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "analyze failed: {stderr}");
    let line = String::from_utf8_lossy(&o.stdout).lines().next().expect("a result").to_string();
    let result: serde_json::Value = serde_json::from_str(&line).unwrap();
    let engine = result["engine"].as_str().unwrap();
    assert!(engine == "ort" || engine == "tract", "ran on {engine}");
    assert!(result["lung_volume_ml"].as_f64().unwrap_or(0.0) > 10.0, "a real analysis: {line}");
    assert!(stderr.contains("TensorRT engine unavailable; falling back to the CPU engine"), "warning: {stderr}");
}
