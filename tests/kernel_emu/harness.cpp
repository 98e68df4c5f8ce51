// harness.cpp — runs kernels/window.cu or kernels/decode.cu under emu.h on files a test wrote.
//
//   harness window DIR   reads params.bin (WindowParams bytes), raw.bin (u16), rescale.bin (f64 pairs),
//                        resize_x.bin, resize_y.bin (i32 ×4), clahe_xi.bin, clahe_yi.bin (i32 ×2),
//                        clahe_xw.bin, clahe_yw.bin (f32 ×2); writes out_f32.bin and out_f16.bin.
//   harness decode DIR   reads params.bin (DecodeParams bytes), n.bin (i32), scores_f32.bin, scores_f16.bin,
//                        x_idx.bin, y_idx.bin (i32 ×2), x_w.bin, y_w.bin (f32); writes, per score type T,
//                        lung_T.bin, lesion_T.bin (u32 words), counts_T.bin (u32 pairs), maxprob_T.bin (f32).
#include "emu.h"

#include "../../kernels/window.cu"
#include "../../kernels/decode.cu"

#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>

template <typename T>
static std::vector<T> load(const std::string& dir, const char* name) {
    std::ifstream f(dir + "/" + name, std::ios::binary | std::ios::ate);
    if (!f) throw std::runtime_error(std::string("missing ") + name);
    auto size = (size_t)f.tellg();
    if (size % sizeof(T) != 0) throw std::runtime_error(std::string("odd size: ") + name);
    std::vector<T> v(size / sizeof(T));
    f.seekg(0);
    f.read(reinterpret_cast<char*>(v.data()), (std::streamsize)size);
    return v;
}

template <typename T>
static void save(const std::string& dir, const std::string& name, const std::vector<T>& v) {
    std::ofstream f(dir + "/" + name, std::ios::binary);
    f.write(reinterpret_cast<const char*>(v.data()), (std::streamsize)(v.size() * sizeof(T)));
}

template <typename P>
static P load_params(const std::string& dir) {
    auto bytes = load<unsigned char>(dir, "params.bin");
    if (bytes.size() != sizeof(P)) throw std::runtime_error("params.bin has the wrong size for the struct");
    P p;
    std::memcpy(&p, bytes.data(), sizeof(P));
    return p;
}

static int run_window(const std::string& dir) {
    auto p = load_params<WindowParams>(dir);
    auto raw = load<u16>(dir, "raw.bin");
    auto rescale = load<double>(dir, "rescale.bin");
    auto rx = load<int4>(dir, "resize_x.bin");
    auto ry = load<int4>(dir, "resize_y.bin");
    auto xi = load<int2>(dir, "clahe_xi.bin");
    auto yi = load<int2>(dir, "clahe_yi.bin");
    auto xw = load<float2>(dir, "clahe_xw.bin");
    auto yw = load<float2>(dir, "clahe_yw.bin");
    size_t out_len = (size_t)p.n_slices * p.channels * p.out_h * p.out_w;
    size_t smem = (size_t)p.tiles_x * p.tiles_y * 256 * 4 + VALUE_TABLE_CAP;
    std::vector<float> o32(out_len, -1.0f);
    std::vector<u16> o16(out_len, 0xffff);
    emu_dim3 grid{(unsigned)p.n_slices, 1, 1};
    emu_launch(grid, WINDOW_THREADS, smem, [&] {
        ls_window_f32(raw.data(), rescale.data(), p, rx.data(), ry.data(), xi.data(), xw.data(), yi.data(),
                      yw.data(), o32.data());
    });
    emu_launch(grid, WINDOW_THREADS, smem, [&] {
        ls_window_f16(raw.data(), rescale.data(), p, rx.data(), ry.data(), xi.data(), xw.data(), yi.data(),
                      yw.data(), o16.data());
    });
    save(dir, "out_f32.bin", o32);
    save(dir, "out_f16.bin", o16);
    return 0;
}

template <typename S>
static void run_decode_type(const std::string& dir, const DecodeParams& p, int n, const char* suffix,
                            const std::vector<S>& scores) {
    auto xi = load<int2>(dir, "x_idx.bin");
    auto yi = load<int2>(dir, "y_idx.bin");
    auto xw = load<float>(dir, "x_w.bin");
    auto yw = load<float>(dir, "y_w.bin");
    std::vector<u32> lung((size_t)n * p.words, 0xdeadbeef), lesion((size_t)n * p.words, 0xdeadbeef);
    std::vector<u32> counts((size_t)n * 2, 0);
    std::vector<float> maxprob(n, 0.0f);
    unsigned npx = (unsigned)(p.rows * p.cols), plane = (unsigned)(p.h * p.w);
    emu_launch({(npx + DECODE_THREADS - 1) / DECODE_THREADS, (unsigned)n, 1}, DECODE_THREADS, 0, [&] {
        if constexpr (sizeof(S) == 4)
            ls_decode_f32((const float*)scores.data(), p, xi.data(), xw.data(), yi.data(), yw.data(), lung.data(),
                          lesion.data(), counts.data());
        else
            ls_decode_f16((const u16*)scores.data(), p, xi.data(), xw.data(), yi.data(), yw.data(), lung.data(),
                          lesion.data(), counts.data());
    });
    emu_launch({(plane + DECODE_THREADS - 1) / DECODE_THREADS, (unsigned)n, 1}, DECODE_THREADS, 0, [&] {
        if constexpr (sizeof(S) == 4)
            ls_lesion_maxprob_f32((const float*)scores.data(), p, maxprob.data());
        else
            ls_lesion_maxprob_f16((const u16*)scores.data(), p, maxprob.data());
    });
    std::string s(suffix);
    save(dir, "lung_" + s + ".bin", lung);
    save(dir, "lesion_" + s + ".bin", lesion);
    save(dir, "counts_" + s + ".bin", counts);
    save(dir, "maxprob_" + s + ".bin", maxprob);
}

static int run_decode(const std::string& dir) {
    auto p = load_params<DecodeParams>(dir);
    int n = load<int>(dir, "n.bin").at(0);
    run_decode_type(dir, p, n, "f32", load<float>(dir, "scores_f32.bin"));
    run_decode_type(dir, p, n, "f16", load<u16>(dir, "scores_f16.bin"));
    return 0;
}

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: harness window|decode DIR\n");
        return 2;
    }
    try {
        std::string what = argv[1];
        if (what == "window") return run_window(argv[2]);
        if (what == "decode") return run_decode(argv[2]);
        std::fprintf(stderr, "unknown kernel %s\n", argv[1]);
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "harness: %s\n", e.what());
        return 1;
    }
}
