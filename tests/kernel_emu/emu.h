// emu.h — just enough of CUDA to run kernels/*.cu on the CPU, one thread block at a time, so tests/gpu_kernels.rs
// can check the kernels' logic (indexing, reductions, histograms, LUTs, bit packing) against the Rust CPU path on a
// machine without a GPU. Every CUDA thread of a block is a real std::thread; __syncthreads is a block barrier; warp
// intrinsics exchange values through per-warp slots between two warp barriers (the kernels call them with full
// masks from warp-uniform control flow, as real warps require); __shared__ variables are statics, which is the
// block's shared memory because blocks run one after another. Built with -ffp-contract=off, float and double
// arithmetic rounds as the GPU's does with NVRTC's --fmad=false. What this cannot show: real concurrency between
// blocks, the memory model, launch limits (shared memory size, registers) and speed — that needs a GPU
// (scripts/gpu-check).
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define LS_EMULATE 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static

struct emu_dim3 {
    unsigned x = 0, y = 0, z = 0;
};
struct int2 {
    int x, y;
};
struct int4 {
    int x, y, z, w;
};
struct float2 {
    float x, y;
};

inline thread_local emu_dim3 threadIdx;
inline emu_dim3 blockIdx;  // one block runs at a time: shared by its threads
inline emu_dim3 blockDim;
inline emu_dim3 gridDim;

struct EmuBlockSync {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint64_t> slots;  // 32 per warp
    std::vector<unsigned char> dynamic_smem;
};
inline EmuBlockSync emu_sync;

inline void* ls_emu_dynamic_smem() { return emu_sync.dynamic_smem.data(); }

inline void __syncthreads() { emu_sync.block->arrive_and_wait(); }

inline unsigned emu_lane() { return threadIdx.x & 31; }
inline unsigned emu_warp() { return threadIdx.x >> 5; }

inline void __syncwarp(unsigned = 0xffffffffu) { emu_sync.warps[emu_warp()]->arrive_and_wait(); }

template <typename T>
inline T emu_exchange(T v, unsigned src_lane) {
    static_assert(sizeof(T) <= 8, "slot is 8 bytes");
    unsigned w = emu_warp();
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    emu_sync.slots[w * 32 + emu_lane()] = bits;
    emu_sync.warps[w]->arrive_and_wait();
    uint64_t got = emu_sync.slots[w * 32 + src_lane];
    emu_sync.warps[w]->arrive_and_wait();
    T r;
    std::memcpy(&r, &got, sizeof(T));
    return r;
}

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
    return emu_exchange(v, emu_lane() ^ (unsigned)mask);
}

template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta) {
    unsigned lane = emu_lane();
    return emu_exchange(v, lane >= delta ? lane - delta : lane);
}

// Every lane's value, gathered through the slots.
template <typename T>
inline void emu_gather(T v, T* all) {
    unsigned w = emu_warp();
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    emu_sync.slots[w * 32 + emu_lane()] = bits;
    emu_sync.warps[w]->arrive_and_wait();
    for (int i = 0; i < 32; ++i) std::memcpy(&all[i], &emu_sync.slots[w * 32 + i], sizeof(T));
    emu_sync.warps[w]->arrive_and_wait();
}

inline unsigned __ballot_sync(unsigned, int pred) {
    int all[32];
    emu_gather(pred ? 1 : 0, all);
    unsigned word = 0;
    for (int i = 0; i < 32; ++i) word |= (unsigned)(all[i] != 0) << i;
    return word;
}

inline unsigned __match_any_sync(unsigned, int key) {
    int all[32];
    emu_gather(key, all);
    unsigned m = 0;
    for (int i = 0; i < 32; ++i) m |= (unsigned)(all[i] == key) << i;
    return m;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int atomicMax(int* p, int v) {
    int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
using std::max;
using std::min;
using std::rint;
inline float rintf(float v) { return std::rint(v); }

inline unsigned short ls_emu_f32_to_f16(float f) {
    _Float16 h = (_Float16)f;
    unsigned short bits;
    std::memcpy(&bits, &h, 2);
    return bits;
}
inline float ls_emu_f16_to_f32(unsigned short bits) {
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return (float)h;
}

// Runs `kernel` over grid × block: blocks one after another, each with blockDim.x persistent threads.
inline void emu_launch(emu_dim3 grid, unsigned threads, size_t dynamic_smem, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = {threads, 1, 1};
    emu_sync.block = std::make_unique<std::barrier<>>(threads);
    emu_sync.warps.clear();
    for (unsigned w = 0; w < threads / 32; ++w) emu_sync.warps.push_back(std::make_unique<std::barrier<>>(32));
    emu_sync.slots.assign(threads, 0);
    emu_sync.dynamic_smem.assign(dynamic_smem, 0);
    // Start/finish barriers around each block, shared with this (the launching) thread.
    std::barrier<> start(threads + 1), finish(threads + 1);
    bool done = false;
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            for (;;) {
                start.arrive_and_wait();
                if (done) return;
                kernel();
                finish.arrive_and_wait();
            }
        });
    }
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = {x, y, z};
                start.arrive_and_wait();
                finish.arrive_and_wait();
            }
    done = true;
    start.arrive_and_wait();
    for (auto& th : pool) th.join();
}
