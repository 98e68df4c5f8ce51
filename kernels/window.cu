// window.cu — stored CT pixels → the model's input, one thread block per slice, in one launch.
//
// The GPU twin of `preprocess::normalise_u8` + `u8_to_input` (contract "minmax_clahe"):
//   stored 16-bit sample → BitsStored mask/sign → padding → MONOCHROME1 → HU = v·slope + intercept (f64 → f32)
//   → clip → per-slice min-max to u8 (f64, round half up) → CLAHE (OpenCV: per-tile clipped histograms, LUTs,
//   bilinear between tile LUTs) → bilinear resize (OpenCV INTER_LINEAR fixed point) → /255 → fp16 or fp32,
//   written straight into the engine's N×C×H×W input (C > 1: neighbour slices stacked, edges clamped).
// Phases inside the block: A the range of the rescaled integers (block reduction; HU and its clip are monotonic in
// them, so the clipped HU's min/max follow from the two ends), then a shared table stored value → u8 for that range
// (the f64 min-max arithmetic once per value, not per pixel; a wider range than the table computes per pixel),
// B tile histograms in shared memory (a warp per row, warp-aggregated atomics), C clip + redistribute + prefix sum
// → tile LUTs written over their own histograms (one warp per tile), D output pixels. 72 KiB of shared memory and
// 40 registers: three blocks per H100 SM, so a 300-slice series runs in one wave. The slice is read three times
// (A, B, D); in one block the re-reads come from L2.
//
// Compiled at start-up by NVRTC with --fmad=false: every float/double operation then rounds exactly as the Rust
// CPU path does, so the two agree bit for bit. Geometry tables (CLAHE tile weights, resize taps) are computed on
// the host by the same Rust functions the CPU path uses and passed in. No headers: fp16 conversion is inline PTX.
// LS_EMULATE: compiled as C++ by tests/kernel_emu (a CPU emulation of the block) to test this logic without a GPU.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

// Must match `WindowParams` (#[repr(C)]) in src/gpu/window.rs.
struct WindowParams {
    int rows, cols;          // native slice size
    int out_h, out_w;        // model input size
    int channels;            // slices stacked per input (1 = 2D)
    int n_slices;            // slices in this launch (grid size)
    int shift, bits_stored;  // stored value = (raw >> shift) & mask(bits_stored), sign-extended when is_signed
    int is_signed;
    int monochrome1;         // inverted: v = smin_plus_smax - v
    int smin_plus_smax;
    int has_padding;         // stored values in [pad_lo, pad_hi] become -1024 HU
    int pad_lo, pad_hi;
    double clip_lo, clip_hi; // HU clip
    int tiles_x, tiles_y;
    int ext_rows, ext_cols;  // reflect-101 padded size the histograms are taken from
    int tile_w, tile_h;
    int clip_count;          // histogram clip per bin (0: none)
    float lut_scale;         // 255 / tile area
};

#define WINDOW_THREADS 512
#define WARPS (WINDOW_THREADS / 32)

__device__ __forceinline__ u16 f32_to_f16_bits(float f) {
#ifdef LS_EMULATE  // tests/kernel_emu: the same source run on the CPU
    return ls_emu_f32_to_f16(f);
#else
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

__device__ __forceinline__ int stored_value(const WindowParams& p, u16 raw) {
    u32 mask = p.bits_stored >= 32 ? 0xffffffffu : ((1u << p.bits_stored) - 1u);
    u32 v = ((u32)raw >> p.shift) & mask;
    if (p.is_signed && ((v >> (p.bits_stored - 1)) & 1u)) return (int)v - (1 << p.bits_stored);
    return (int)v;
}

// The integer a stored sample is rescaled from (after MONOCHROME1), and whether it is padding.
__device__ __forceinline__ int value_of(const WindowParams& p, u16 raw, bool& pad) {
    int v = stored_value(p, raw);
    pad = p.has_padding && v >= p.pad_lo && v <= p.pad_hi;
    if (p.monochrome1) v = p.smin_plus_smax - v;
    return v;
}

// HU exactly as StoredFrame::into_hu: (v as f64 * slope + intercept) as f32 (padding is -1024, decided by the caller).
__device__ __forceinline__ float hu_of_value(int v, double slope, double intercept) {
    double x = (double)v * slope;
    x = x + intercept;
    return (float)x;
}

__device__ __forceinline__ double clip_hu(const WindowParams& p, float hu) {
    return fmin(fmax((double)hu, p.clip_lo), p.clip_hi);
}

// minmax_u8: floor((clip(v) - lo) / (hi - lo) * 255 + 0.5), 0 for a constant slice.
__device__ __forceinline__ int to_u8(const WindowParams& p, float hu, double lo, double range) {
    if (!(range > 0.0)) return 0;
    double x = (clip_hu(p, hu) - lo) / range;
    x = x * 255.0;
    x = floor(x + 0.5);
    return (int)fmin(fmax(x, 0.0), 255.0);
}

// OpenCV saturate_cast<uchar>(float): round half to even, clamp.
__device__ __forceinline__ int sat_u8(float v) {
    float r = rintf(v);
    if (r <= 0.0f) return 0;
    if (r >= 255.0f) return 255;
    return (int)r;
}

__device__ __forceinline__ int reflect101(int q, int len) {
    if (len == 1) return 0;
    while (q < 0 || q >= len) q = q < 0 ? -q : 2 * len - 2 - q;
    return q;
}

template <typename Out>
__device__ __forceinline__ void store_out(Out* out, size_t i, float v);
template <>
__device__ __forceinline__ void store_out<float>(float* out, size_t i, float v) { out[i] = v; }
template <>
__device__ __forceinline__ void store_out<u16>(u16* out, size_t i, float v) { out[i] = f32_to_f16_bits(v); }

// The u8 (min-max) value of a stored sample: from the block's value table when the slice's value range fits it,
// else computed (the same function either way).
struct U8Map {
    const u8* table;  // null: compute
    int vmin;
    int pad_u8;
    double slope, intercept, lo, range;
};

__device__ __forceinline__ int u8_of(const WindowParams& p, const U8Map& m, u16 raw) {
    bool pad;
    int v = value_of(p, raw, pad);
    if (pad) return m.pad_u8;
    if (m.table) return m.table[v - m.vmin];
    return to_u8(p, hu_of_value(v, m.slope, m.intercept), m.lo, m.range);
}

// Dynamic shared memory: tiles·256 u32 histograms (each tile's LUT later overwrites the first 256 bytes of its own
// histogram), then VALUE_TABLE_CAP u8: stored value → u8 for the slice's value range.
#define VALUE_TABLE_CAP 8192
template <typename Out>
__device__ void window_slice(const u16* __restrict__ raw_all, const double* __restrict__ rescale,
                             const WindowParams p,
                             const int4* __restrict__ resize_x,    // out_w: (s0, s1, a0, a1)
                             const int4* __restrict__ resize_y,    // out_h: (s0, s1, b0, b1)
                             const int2* __restrict__ clahe_xi,    // cols: (LUT offset left, right) = tile × 256
                             const float2* __restrict__ clahe_xw,  // cols: (xa, 1 - xa)
                             const int2* __restrict__ clahe_yi,    // rows: (tile row up, down)
                             const float2* __restrict__ clahe_yw,  // rows: (ya, 1 - ya)
                             Out* __restrict__ out) {
#ifdef LS_EMULATE
    u32* smem = (u32*)ls_emu_dynamic_smem();
#else
    extern __shared__ u32 smem[];
#endif
    const int tiles = p.tiles_x * p.tiles_y;
    u32* hist = smem;
    u8* luts = (u8*)smem;  // tile t's LUT: bytes [t·1024, t·1024 + 256)
    u8* values = (u8*)(smem + tiles * 256);
    __shared__ int red_min[WARPS], red_max[WARPS], red_pad[WARPS];
    __shared__ double s_lo, s_range;
    __shared__ int s_vmin, s_span;

    const int s = blockIdx.x;
    const int npx = p.rows * p.cols;
    const u16* raw = raw_all + (size_t)s * npx;
    const double slope = rescale[2 * s], intercept = rescale[2 * s + 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    // A: range of the rescaled integers (padding apart). HU and the clip are monotonic in them, so the clipped HU's
    // min and max are those of the two ends (and of padding's -1024): integer min/max, no float math per pixel.
    int vmin = 0x7fffffff, vmax = -0x7fffffff - 1, anypad = 0;
    for (int i = threadIdx.x; i < npx; i += WINDOW_THREADS) {
        bool pad;
        int v = value_of(p, __ldg(raw + i), pad);
        if (pad) {
            anypad = 1;
        } else {
            vmin = min(vmin, v);
            vmax = max(vmax, v);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        vmin = min(vmin, __shfl_xor_sync(0xffffffffu, vmin, o));
        vmax = max(vmax, __shfl_xor_sync(0xffffffffu, vmax, o));
        anypad |= __shfl_xor_sync(0xffffffffu, anypad, o);
    }
    if (lane == 0) { red_min[warp] = vmin; red_max[warp] = vmax; red_pad[warp] = anypad; }
    for (int i = threadIdx.x; i < tiles * 256; i += WINDOW_THREADS) hist[i] = 0;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < WARPS; ++w) {
            vmin = min(vmin, red_min[w]);
            vmax = max(vmax, red_max[w]);
            anypad |= red_pad[w];
        }
        double l = 1.0 / 0.0, h = -1.0 / 0.0;
        if (vmin <= vmax) {
            double a = clip_hu(p, hu_of_value(vmin, slope, intercept));
            double b = clip_hu(p, hu_of_value(vmax, slope, intercept));
            l = fmin(a, b);
            h = fmax(a, b);
        }
        if (anypad) {
            double c = clip_hu(p, -1024.0f);
            l = fmin(l, c);
            h = fmax(h, c);
        }
        s_lo = l;
        s_range = h > l ? h - l : 0.0;
        s_vmin = vmin;
        s_span = vmin <= vmax ? vmax - vmin + 1 : 0;
    }
    __syncthreads();
    U8Map m;
    m.slope = slope;
    m.intercept = intercept;
    m.lo = s_lo;
    m.range = s_range;
    m.vmin = s_vmin;
    m.pad_u8 = to_u8(p, -1024.0f, m.lo, m.range);
    const int span = s_span;
    m.table = span > 0 && span <= VALUE_TABLE_CAP ? values : nullptr;
    if (m.table) {
        for (int j = threadIdx.x; j < span; j += WINDOW_THREADS)
            values[j] = (u8)to_u8(p, hu_of_value(m.vmin + j, slope, intercept), m.lo, m.range);
        __syncthreads();
    }

    // B: tile histograms over the padded image, a warp per row, warp-aggregated shared atomics (CT has long runs
    // of one value).
    const int ext_cols32 = (p.ext_cols + 31) & ~31;
    for (int y = warp; y < p.ext_rows; y += WARPS) {
        const u16* row = raw + (size_t)reflect101(y, p.rows) * p.cols;
        const int tile_row = (y / p.tile_h) * p.tiles_x;
        int tx = lane / p.tile_w;
        for (int x = lane; x < ext_cols32; x += 32) {
            int key = -1;
            if (x < p.ext_cols) {
                while (x >= (tx + 1) * p.tile_w) ++tx;
                key = (tile_row + tx) * 256 + u8_of(p, m, __ldg(row + reflect101(x, p.cols)));
            }
            u32 peers = __match_any_sync(0xffffffffu, key);
            if (key >= 0 && lane == __ffs(peers) - 1) atomicAdd(&hist[key], (u32)__popc(peers));
        }
    }
    __syncthreads();

    // C: one warp per tile: clip, redistribute (OpenCV order), inclusive prefix sum, LUT (over the tile's own
    // histogram once the whole warp has read it).
    for (int t = warp; t < tiles; t += WARPS) {
        u32* h = hist + t * 256;
        int b[8];
        int clipped = 0;
        for (int k = 0; k < 8; ++k) {
            int v = (int)h[lane * 8 + k];
            if (p.clip_count > 0 && v > p.clip_count) { clipped += v - p.clip_count; v = p.clip_count; }
            b[k] = v;
        }
        for (int o = 16; o > 0; o >>= 1) clipped += __shfl_xor_sync(0xffffffffu, clipped, o);
        if (p.clip_count > 0) {
            int batch = clipped / 256;
            int residual = clipped - batch * 256;
            int step = residual > 0 ? max(256 / residual, 1) : 1;
            for (int k = 0; k < 8; ++k) {
                int bin = lane * 8 + k;
                b[k] += batch;
                if (residual > 0 && bin % step == 0 && bin / step < residual) b[k] += 1;
            }
        }
        int local = 0;
        for (int k = 0; k < 8; ++k) { local += b[k]; b[k] = local; }
        int incl = local;
        for (int o = 1; o < 32; o <<= 1) {
            int n = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += n;
        }
        int before = incl - local;
        __syncwarp();
        for (int k = 0; k < 8; ++k) luts[t * 1024 + lane * 8 + k] = (u8)sat_u8((float)(before + b[k]) * p.lut_scale);
    }
    __syncthreads();

    // D: output pixels. Each tap: u8 → CLAHE (bilinear between the four tile LUTs) → fixed-point resize.
    const int out_px = p.out_h * p.out_w;
    const int half = p.channels / 2;
    const int lut_row = p.tiles_x * 1024;
    for (int o = threadIdx.x; o < out_px; o += WINDOW_THREADS) {
        int dy = o / p.out_w, dx = o - dy * p.out_w;
        int4 rx = resize_x[dx], ry = resize_y[dy];
        int c4[4];
        int sy2[2] = {ry.x, ry.y}, sx2[2] = {rx.x, rx.y};
        for (int j = 0; j < 4; ++j) {
            int sy = sy2[j >> 1], sx = sx2[j & 1];
            int v = u8_of(p, m, __ldg(raw + sy * p.cols + sx));
            int2 xi = clahe_xi[sx];
            float2 xw = clahe_xw[sx];
            int2 yi = clahe_yi[sy];
            float2 yw = clahe_yw[sy];
            const u8* l1 = luts + yi.x * lut_row;
            const u8* l2 = luts + yi.y * lut_row;
            float top = (float)l1[xi.x * 4 + v] * xw.y;
            top = top + (float)l1[xi.y * 4 + v] * xw.x;
            float bottom = (float)l2[xi.x * 4 + v] * xw.y;
            bottom = bottom + (float)l2[xi.y * 4 + v] * xw.x;
            float res = top * yw.y;
            res = res + bottom * yw.x;
            c4[j] = sat_u8(res);
        }
        int r0 = c4[0] * rx.z + c4[1] * rx.w;
        int r1 = c4[2] * rx.z + c4[3] * rx.w;
        int t0 = (ry.z * (r0 >> 4)) >> 16;
        int t1 = (ry.w * (r1 >> 4)) >> 16;
        int u = min(max((t0 + t1 + 2) >> 2, 0), 255);
        float val = (float)u / 255.0f;
        // Slice s feeds every (n, c) whose clamped neighbour index is s.
        for (int c = 0; c < p.channels; ++c) {
            for (int n = max(0, s - p.channels); n <= min(p.n_slices - 1, s + p.channels); ++n) {
                int src = min(max(n + c - half, 0), p.n_slices - 1);
                if (src == s) store_out<Out>(out, ((size_t)n * p.channels + c) * out_px + o, val);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(WINDOW_THREADS, 3)
ls_window_f16(const u16* raw, const double* rescale, const WindowParams p, const int4* rx, const int4* ry,
              const int2* xi, const float2* xw, const int2* yi, const float2* yw, u16* out) {
    window_slice<u16>(raw, rescale, p, rx, ry, xi, xw, yi, yw, out);
}

extern "C" __global__ void __launch_bounds__(WINDOW_THREADS, 3)
ls_window_f32(const u16* raw, const double* rescale, const WindowParams p, const int4* rx, const int4* ry,
              const int2* xi, const float2* xw, const int2* yi, const float2* yw, float* out) {
    window_slice<float>(raw, rescale, p, rx, ry, xi, xw, yi, yw, out);
}
