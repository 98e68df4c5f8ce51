// shim.cpp — the few TensorRT 10 calls lungsentry needs, as extern "C" functions for src/engine/tensorrt.rs.
//
// Built by build.rs with the `cc` crate when the `tensorrt` feature is on, against the TensorRT 10 headers of
// JetPack 6 (TENSORRT_INCLUDE_DIR) and the CUDA runtime headers (CUDA_INCLUDE_DIR; only for cudaStream_t).
// It does not link libnvinfer: ls_trt_open dlopens it and takes the two exported entry points
// (createInferRuntime_INTERNAL, getInferLibVersion); everything else is a virtual call through the interfaces.
// So the binary starts (and falls back to the CPU engine) on a machine without TensorRT.
// Engines are deserialized (never built here: scripts/build-engine does that with trtexec --fp16), I/O tensors
// queried by name, addresses bound with setTensorAddress and inference enqueued with enqueueV3 on the caller's
// CUDA stream. Errors: a NULL / non-zero return plus a message in the handle (or the caller's buffer).

#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>

namespace {

using CreateRuntimeFn = void* (*)(void*, int32_t);
using VersionFn = int32_t (*)();

class Logger : public nvinfer1::ILogger {
public:
    void log(Severity severity, char const* msg) noexcept override {
        if (severity > Severity::kWARNING || msg == nullptr) return;
        std::lock_guard<std::mutex> g(mu);
        last = msg;
    }
    std::string take() {
        std::lock_guard<std::mutex> g(mu);
        std::string s = last;
        last.clear();
        return s;
    }

private:
    std::mutex mu;
    std::string last;
};

void put(char* buf, size_t len, std::string const& s) {
    if (buf == nullptr || len == 0) return;
    std::snprintf(buf, len, "%s", s.c_str());
}

void* open_lib(char const* path, char* err, size_t errlen) {
    char const* name = (path != nullptr && path[0] != '\0') ? path : "libnvinfer.so.10";
    void* h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
        char const* e = dlerror();
        put(err, errlen, std::string("cannot load ") + name + ": " + (e ? e : "unknown error"));
    }
    return h;
}

}  // namespace

struct LsTrt {
    void* lib = nullptr;
    Logger logger;
    nvinfer1::IRuntime* runtime = nullptr;
    nvinfer1::ICudaEngine* engine = nullptr;
    nvinfer1::IExecutionContext* context = nullptr;
    std::string error;
};

extern "C" {

// TensorRT version of the library at `libnvinfer` (NULL: the default soname) as major·10000 + minor·100 + patch,
// or -1 with a message in err.
int32_t ls_trt_library_version(char const* libnvinfer, char* err, size_t errlen) {
    void* lib = open_lib(libnvinfer, err, errlen);
    if (lib == nullptr) return -1;
    auto version = reinterpret_cast<VersionFn>(dlsym(lib, "getInferLibVersion"));
    if (version == nullptr) {
        put(err, errlen, "libnvinfer has no getInferLibVersion");
        dlclose(lib);
        return -1;
    }
    int32_t v = version();
    dlclose(lib);
    return v;
}

// TensorRT version of the headers this shim was compiled against.
int32_t ls_trt_header_version() { return NV_TENSORRT_VERSION; }

// Loads libnvinfer and deserializes a serialized engine; NULL with a message in err on failure.
LsTrt* ls_trt_open(char const* libnvinfer, void const* blob, size_t len, char* err, size_t errlen) {
    LsTrt* t = new LsTrt();
    t->lib = open_lib(libnvinfer, err, errlen);
    if (t->lib == nullptr) {
        delete t;
        return nullptr;
    }
    auto create = reinterpret_cast<CreateRuntimeFn>(dlsym(t->lib, "createInferRuntime_INTERNAL"));
    if (create == nullptr) {
        put(err, errlen, "libnvinfer has no createInferRuntime_INTERNAL");
        dlclose(t->lib);
        delete t;
        return nullptr;
    }
    t->runtime = static_cast<nvinfer1::IRuntime*>(create(&t->logger, NV_TENSORRT_VERSION));
    if (t->runtime != nullptr) t->engine = t->runtime->deserializeCudaEngine(blob, len);
    if (t->engine != nullptr) t->context = t->engine->createExecutionContext();
    if (t->context == nullptr) {
        std::string why = t->logger.take();
        put(err, errlen, std::string(t->runtime == nullptr ? "createInferRuntime failed" :
                                     t->engine == nullptr ? "engine deserialization failed" :
                                                            "createExecutionContext failed") +
                             (why.empty() ? "" : ": " + why));
        delete t->engine;
        delete t->runtime;
        dlclose(t->lib);
        delete t;
        return nullptr;
    }
    return t;
}

void ls_trt_close(LsTrt* t) {
    if (t == nullptr) return;
    delete t->context;
    delete t->engine;
    delete t->runtime;
    if (t->lib != nullptr) dlclose(t->lib);
    delete t;
}

// The last error (empty when none); valid until the next call on this handle.
char const* ls_trt_last_error(LsTrt* t) { return t == nullptr ? "" : t->error.c_str(); }

int32_t ls_trt_io_count(LsTrt* t) { return t->engine->getNbIOTensors(); }

// I/O tensor i: name, whether it is an input, TensorRT DataType (0 float, 1 half, ...), and its shape (-1 for
// dynamic dimensions), plus the optimisation profile 0 maximum when `max_dims` is given (inputs only).
int32_t ls_trt_io_info(LsTrt* t, int32_t i, char* name, size_t namelen, int32_t* is_input, int32_t* dtype,
                       int64_t* dims, int32_t* nb_dims, int64_t* max_dims) {
    if (i < 0 || i >= t->engine->getNbIOTensors()) {
        t->error = "I/O tensor index out of range";
        return -1;
    }
    char const* n = t->engine->getIOTensorName(i);
    put(name, namelen, n);
    bool input = t->engine->getTensorIOMode(n) == nvinfer1::TensorIOMode::kINPUT;
    *is_input = input ? 1 : 0;
    *dtype = static_cast<int32_t>(t->engine->getTensorDataType(n));
    nvinfer1::Dims d = t->engine->getTensorShape(n);
    *nb_dims = d.nbDims;
    for (int32_t k = 0; k < d.nbDims && k < nvinfer1::Dims::MAX_DIMS; ++k) dims[k] = d.d[k];
    if (max_dims != nullptr && input) {
        nvinfer1::Dims m = t->engine->getProfileShape(n, 0, nvinfer1::OptProfileSelector::kMAX);
        for (int32_t k = 0; k < m.nbDims && k < nvinfer1::Dims::MAX_DIMS; ++k) max_dims[k] = m.d[k];
    }
    return 0;
}

int32_t ls_trt_set_input_shape(LsTrt* t, char const* name, int64_t const* dims, int32_t nb_dims) {
    nvinfer1::Dims d{};
    if (nb_dims < 0 || nb_dims > nvinfer1::Dims::MAX_DIMS) {
        t->error = "too many dimensions";
        return -1;
    }
    d.nbDims = nb_dims;
    for (int32_t k = 0; k < nb_dims; ++k) d.d[k] = dims[k];
    if (!t->context->setInputShape(name, d)) {
        t->error = "setInputShape refused: " + t->logger.take();
        return -1;
    }
    return 0;
}

int32_t ls_trt_set_tensor_address(LsTrt* t, char const* name, void* device_ptr) {
    if (!t->context->setTensorAddress(name, device_ptr)) {
        t->error = "setTensorAddress refused: " + t->logger.take();
        return -1;
    }
    return 0;
}

// Enqueues inference on `stream` (a CUstream / cudaStream_t); the caller synchronizes.
int32_t ls_trt_enqueue(LsTrt* t, void* stream) {
    if (!t->context->enqueueV3(static_cast<cudaStream_t>(stream))) {
        t->error = "enqueueV3 failed: " + t->logger.take();
        return -1;
    }
    return 0;
}

}  // extern "C"
