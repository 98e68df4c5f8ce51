// decode.cu — the engine's class scores → lung and lesion masks at native resolution, plus per-slice counts.
//
// The GPU twin of `analysis::segment_slice`: each class map (K×h×w logits or probabilities, fp16 or fp32) is
// upsampled bilinearly with half-pixel centres (host-computed taps, the CPU path's own table), argmax per pixel
// (ties to the lower class), then written as two packed bit planes — lung (lung or lesion) and lesion — one
// 32-bit word per 32 pixels from a warp ballot (bit i%32 of word i/32: read as little-endian u64 words this is the
// CPU `BitMask` layout). Per-slice pixel counts come from the ballots (popc), a block reduction and one atomic per
// block, never a host loop. `ls_lesion_maxprob` gives each slice's highest lesion softmax at model resolution.
// Compiled by NVRTC with --fmad=false so the interpolation rounds as the Rust code does.

typedef unsigned short u16;
typedef unsigned int u32;

#define DECODE_THREADS 256
#define LUNG_CLASS 1
#define LESION_CLASS 2
#define MAX_CLASSES 8

__device__ __forceinline__ float f16_bits_to_f32(u16 h) {
#ifdef LS_EMULATE  // tests/kernel_emu: the same source run on the CPU
    return ls_emu_f16_to_f32(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ float load_score(const float* s, size_t i) { return __ldg(s + i); }
__device__ __forceinline__ float load_score(const u16* s, size_t i) { return f16_bits_to_f32(__ldg(s + i)); }

// Must match `DecodeParams` (#[repr(C)]) in src/gpu/decode.rs.
struct DecodeParams {
    int classes;     // K (≥ 3: background, lung, lesion, ...)
    int h, w;        // score map size
    int rows, cols;  // native size
    int words;       // u32 words per slice plane = ceil(rows·cols / 32)
};

// grid (ceil(rows·cols / DECODE_THREADS), N). counts: N × 2 u32 (lung incl. lesion, lesion), zeroed by the host.
template <typename S>
__device__ void decode_slices(const S* __restrict__ scores, const DecodeParams p,
                              const int2* __restrict__ up_x_idx, const float* __restrict__ up_x_w,
                              const int2* __restrict__ up_y_idx, const float* __restrict__ up_y_w,
                              u32* __restrict__ lung_bits, u32* __restrict__ lesion_bits, u32* __restrict__ counts) {
    __shared__ u32 s_lung, s_lesion;
    const int n = blockIdx.y;
    const int npx = p.rows * p.cols;
    const int plane = p.h * p.w;
    const S* sc = scores + (size_t)n * p.classes * plane;
    if (threadIdx.x == 0) { s_lung = 0; s_lesion = 0; }
    __syncthreads();

    const int i = blockIdx.x * DECODE_THREADS + threadIdx.x;
    int best = 0;
    if (i < npx) {
        int r = i / p.cols, c = i - r * p.cols;
        int2 xi = up_x_idx[c], yi = up_y_idx[r];
        float fx = up_x_w[c], fy = up_y_w[r];
        float gx = 1.0f - fx, gy = 1.0f - fy;
        float bestv = 0.0f;
        for (int k = 0; k < p.classes && k < MAX_CLASSES; ++k) {
            const size_t o = (size_t)k * plane;
            float top = load_score(sc, o + (size_t)yi.x * p.w + xi.x) * gx;
            top = top + load_score(sc, o + (size_t)yi.x * p.w + xi.y) * fx;
            float bottom = load_score(sc, o + (size_t)yi.y * p.w + xi.x) * gx;
            bottom = bottom + load_score(sc, o + (size_t)yi.y * p.w + xi.y) * fx;
            float v = top * gy;
            v = v + bottom * fy;
            if (k == 0 || v > bestv) { best = k; bestv = v; }
        }
    }
    const bool is_lesion = i < npx && best == LESION_CLASS;
    const bool is_lung = i < npx && (best == LUNG_CLASS || best == LESION_CLASS);
    const u32 lung_word = __ballot_sync(0xffffffffu, is_lung);
    const u32 lesion_word = __ballot_sync(0xffffffffu, is_lesion);
    const int lane = threadIdx.x & 31;
    const int word = i >> 5;
    if (lane == 0 && word < p.words) {
        lung_bits[(size_t)n * p.words + word] = lung_word;
        lesion_bits[(size_t)n * p.words + word] = lesion_word;
        if (lung_word) atomicAdd(&s_lung, (u32)__popc(lung_word));
        if (lesion_word) atomicAdd(&s_lesion, (u32)__popc(lesion_word));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        if (s_lung) atomicAdd(&counts[2 * n], s_lung);
        if (s_lesion) atomicAdd(&counts[2 * n + 1], s_lesion);
    }
}

extern "C" __global__ void __launch_bounds__(DECODE_THREADS)
ls_decode_f32(const float* scores, const DecodeParams p, const int2* xi, const float* xw, const int2* yi,
              const float* yw, u32* lung_bits, u32* lesion_bits, u32* counts) {
    decode_slices<float>(scores, p, xi, xw, yi, yw, lung_bits, lesion_bits, counts);
}

extern "C" __global__ void __launch_bounds__(DECODE_THREADS)
ls_decode_f16(const u16* scores, const DecodeParams p, const int2* xi, const float* xw, const int2* yi,
              const float* yw, u32* lung_bits, u32* lesion_bits, u32* counts) {
    decode_slices<u16>(scores, p, xi, xw, yi, yw, lung_bits, lesion_bits, counts);
}

// grid (ceil(h·w / DECODE_THREADS), N). maxprob: N floats (bit patterns compared as ints; all ≥ 0), zeroed.
template <typename S>
__device__ void lesion_maxprob(const S* __restrict__ scores, const DecodeParams p, float* __restrict__ maxprob) {
    __shared__ float s_max[DECODE_THREADS / 32];
    const int n = blockIdx.y;
    const int plane = p.h * p.w;
    const S* sc = scores + (size_t)n * p.classes * plane;
    const int i = blockIdx.x * DECODE_THREADS + threadIdx.x;
    float prob = 0.0f;
    if (i < plane) {
        float m = -1.0f / 0.0f;
        for (int k = 0; k < p.classes && k < MAX_CLASSES; ++k) m = fmaxf(m, load_score(sc, (size_t)k * plane + i));
        float denom = 0.0f;
        for (int k = 0; k < p.classes && k < MAX_CLASSES; ++k) denom += expf(load_score(sc, (size_t)k * plane + i) - m);
        prob = expf(load_score(sc, (size_t)LESION_CLASS * plane + i) - m) / denom;
    }
    for (int o = 16; o > 0; o >>= 1) prob = fmaxf(prob, __shfl_xor_sync(0xffffffffu, prob, o));
    if ((threadIdx.x & 31) == 0) s_max[threadIdx.x >> 5] = prob;
    __syncthreads();
    if (threadIdx.x == 0) {
        float b = s_max[0];
        for (int w = 1; w < DECODE_THREADS / 32; ++w) b = fmaxf(b, s_max[w]);
        atomicMax((int*)&maxprob[n], __float_as_int(b));
    }
}

extern "C" __global__ void __launch_bounds__(DECODE_THREADS)
ls_lesion_maxprob_f32(const float* scores, const DecodeParams p, float* maxprob) {
    lesion_maxprob<float>(scores, p, maxprob);
}

extern "C" __global__ void __launch_bounds__(DECODE_THREADS)
ls_lesion_maxprob_f16(const u16* scores, const DecodeParams p, float* maxprob) {
    lesion_maxprob<u16>(scores, p, maxprob);
}
