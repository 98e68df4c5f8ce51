//! Build script: compiles the TensorRT shim (src/engine/tensorrt/shim.cpp) when the `tensorrt` feature is on.
//!
//! Include folders: `TENSORRT_INCLUDE_DIR` (NvInferRuntime.h; JetPack 6 puts it in /usr/include/aarch64-linux-gnu)
//! and `CUDA_INCLUDE_DIR` (cuda_runtime_api.h and crt/; default /usr/local/cuda/include), each a `:`-separated
//! list. The shim dlopens libnvinfer at run time, so nothing TensorRT is linked.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "tensorrt")]
    tensorrt_shim();
}

#[cfg(feature = "tensorrt")]
fn tensorrt_shim() {
    use std::path::PathBuf;
    println!("cargo:rerun-if-changed=src/engine/tensorrt/shim.cpp");
    println!("cargo:rerun-if-env-changed=TENSORRT_INCLUDE_DIR");
    println!("cargo:rerun-if-env-changed=CUDA_INCLUDE_DIR");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let dirs = |var: &str, default: &str| -> Vec<PathBuf> {
        std::env::var(var)
            .unwrap_or_else(|_| default.to_string())
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect()
    };
    let trt = dirs("TENSORRT_INCLUDE_DIR", &format!("/usr/include/{arch}-linux-gnu:/usr/include"));
    let cuda = dirs("CUDA_INCLUDE_DIR", "/usr/local/cuda/include");
    if !trt.iter().any(|d| d.join("NvInferRuntime.h").exists()) {
        panic!("feature `tensorrt`: NvInferRuntime.h not found in TENSORRT_INCLUDE_DIR={trt:?} (TensorRT 10 headers)");
    }
    let mut b = cc::Build::new();
    b.cpp(true).std("c++17").file("src/engine/tensorrt/shim.cpp").warnings(true);
    for d in trt.iter().chain(&cuda) {
        // -isystem: the vendor headers' own warnings are not ours.
        b.flag(format!("-isystem{}", d.display()));
    }
    b.compile("lungsentry_trt_shim");
    println!("cargo:rustc-link-lib=dylib=dl");
    println!("cargo:rustc-link-lib=dylib=stdc++");
}
