// CPU emulation of the CUDA features the project's kernels use, for tests on machines
// without a GPU. Each CUDA thread of a block is a std::thread; blocks run one after another.
// __syncthreads is a std::barrier over the block, and the warp intrinsics (ballot,
// shuffles, __syncwarp) exchange values through a per-warp barrier, so a kernel whose
// lanes do not all reach a warp intrinsic, or whose threads do not all reach a block
// barrier, hangs here as it would misbehave on a GPU. Dynamic shared memory starts
// filled with 0xff bytes (NaN floats, -1 ints) so that reads of unset memory show up.
// Only full-warp masks are supported (the kernels use no others).
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <memory>
#include <thread>
#include <vector>

struct emu_dim3 {
    unsigned x, y, z;
};

namespace emu {
inline thread_local emu_dim3 thread_idx{0, 0, 0};
inline thread_local emu_dim3 block_idx{0, 0, 0};
inline emu_dim3 block_dim{1, 1, 1};
inline emu_dim3 grid_dim{1, 1, 1};
inline constexpr std::size_t kSharedMax = 1u << 20;

struct Warp {
    std::barrier<> bar{32};
    unsigned char slot[32][8];
};
inline std::barrier<>* block_barrier = nullptr;
inline Warp* warps = nullptr;

inline Warp& my_warp() { return warps[thread_idx.x / 32]; }
inline int lane() { return static_cast<int>(thread_idx.x & 31u); }
inline void full_mask(unsigned mask) {
    if (mask != 0xffffffffu) {
        std::fprintf(stderr, "cuda_emu: only full-warp masks are emulated\n");
        std::abort();
    }
}
template <class T, class Pick>
T exchange(T value, Pick pick) {
    static_assert(sizeof(T) <= 8, "exchange of values up to 8 bytes");
    Warp& w = my_warp();
    std::memcpy(w.slot[lane()], &value, sizeof(T));
    w.bar.arrive_and_wait();
    T out;
    std::memcpy(&out, w.slot[pick(lane()) & 31], sizeof(T));
    w.bar.arrive_and_wait();
    return out;
}
}  // namespace emu

extern "C" {
alignas(16) unsigned char smem[emu::kSharedMax];
}

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    emu::full_mask(mask);
    emu::my_warp().bar.arrive_and_wait();
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    emu::full_mask(mask);
    emu::Warp& w = emu::my_warp();
    const int p = pred != 0;
    std::memcpy(w.slot[emu::lane()], &p, sizeof(int));
    w.bar.arrive_and_wait();
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l) {
        int q;
        std::memcpy(&q, w.slot[l], sizeof(int));
        if (q) bits |= 1u << l;
    }
    w.bar.arrive_and_wait();
    return bits;
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int = 32) {
    emu::full_mask(mask);
    return emu::exchange(v, [src](int) { return src; });
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned d, int = 32) {
    emu::full_mask(mask);
    return emu::exchange(v, [d](int l) { return l >= static_cast<int>(d) ? l - static_cast<int>(d) : l; });
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned d, int = 32) {
    emu::full_mask(mask);
    return emu::exchange(v, [d](int l) { return l + static_cast<int>(d) < 32 ? l + static_cast<int>(d) : l; });
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int m, int = 32) {
    emu::full_mask(mask);
    return emu::exchange(v, [m](int l) { return l ^ m; });
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
template <class T>
T __ldg(const T* p) { return *p; }

namespace emu {
// Run ``body`` as the kernel on a (gx, gy) grid of blocks of bx threads. The bx host
// threads are made once and run the blocks one after another; a control barrier that
// every thread always reaches separates the blocks, while each block gets fresh block and
// warp barriers, so that threads leaving the kernel early drop out of them as on a GPU.
template <class F>
int launch(unsigned gx, unsigned gy, unsigned bx, std::size_t shared, F body) {
    if (shared > kSharedMax || bx == 0 || bx > 1024 || bx % 32) return 1;
    block_dim = {bx, 1, 1};
    grid_dim = {gx, gy, 1};
    std::barrier<> control(bx);
    std::unique_ptr<std::barrier<>> bar;
    std::unique_ptr<Warp[]> ws;
    auto setup = [&](unsigned) {
        std::memset(smem, 0xff, shared);   // shared memory starts as garbage
        bar.reset(new std::barrier<>(bx));
        ws.reset(new Warp[bx / 32]);
        block_barrier = bar.get();
        warps = ws.get();
    };
    std::vector<std::thread> threads;
    threads.reserve(bx);
    for (unsigned t = 0; t < bx; ++t) {
        threads.emplace_back([&, t] {
            thread_idx = {t, 0, 0};
            for (unsigned by = 0; by < gy; ++by) {
                for (unsigned b = 0; b < gx; ++b) {
                    if (t == 0) setup(b);
                    control.arrive_and_wait();
                    block_idx = {b, by, 0};
                    body();
                    // An exited thread no longer counts at the block's barriers.
                    warps[t / 32].bar.arrive_and_drop();
                    block_barrier->arrive_and_drop();
                    control.arrive_and_wait();
                }
            }
        });
    }
    for (auto& th : threads) th.join();
    return 0;
}
}  // namespace emu
