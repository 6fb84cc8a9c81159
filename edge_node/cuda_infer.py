r"""Batched inference on the GPU: frozen weights, one thread block per image.

The step of :mod:`edge_node.network` without learning (no STDP, ``theta`` frozen)::

    I        = S[t-1] @ W                         0 at t = 0
    inh_j    = -inh_strength * (sum(s[t-2]) - s_j[t-2])
    v        = d (v - v_rest) + v_rest
    v       += (refrac <= 0) * (I + inh);  refrac -= 1
    above    = v >= v_thresh + theta
    v[above] = v_reset;  refrac[above] = refrac_steps
    s        = one-hot(above_sorted[floor(choice[t] * count)])   (one_spike), else above

and the output is each image's spike count per neuron. An image that draws fewer than
``min_spikes`` spikes is presented again (with the next of its pre-drawn presentations),
as in training. Each block runs the phases of :mod:`edge_node.cuda_train` (membrane
update and input list; winner choice by warp 0; drive of the next step), two barriers a
step; ``W`` is only read, through the read-only cache. All images of a launch run
concurrently, a few blocks per multiprocessor.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from edge_node import cuda_common, cuda_encode
from edge_node.cuda_train import _check_images, _seed, check_inputs
from edge_node.network import decays
from estdp.errors import ConfigError
from estdp.params import NetworkParams

INFER_SOURCE = r"""
#ifndef REAL
#define REAL float
#endif
typedef REAL real;
#define FULL_MASK 0xffffffffu
#define MAX_WORD_CHUNKS 4   // n_words <= 128, i.e. up to 4096 inputs
#define MAX_THREADS 256     // more registers per thread; many blocks share a multiprocessor

extern "C" __global__ void __launch_bounds__(MAX_THREADS) lif_infer(
    const real* __restrict__ w,                 // (n_in, n) weights
    const real* __restrict__ theta,             // (n,) adaptive thresholds
    const unsigned int* __restrict__ spikes,    // (n_images, n_pres, steps, n_words) input bits
    const double* __restrict__ choices,         // (n_images, n_pres, steps) one-spike uniforms
    int* __restrict__ counts,                   // (n_images, n) spikes of the last presentation
    int* __restrict__ shown,                    // (n_images,) presentations used
    const int n_images, const int n_pres, const int n_in, const int n, const int n_words,
    const int steps, const int min_spikes, const int refrac_steps, const int one_spike,
    const int smem_bytes,
    const real decay, const real v_rest, const real v_reset, const real v_thresh,
    const real inh)
{
    extern __shared__ __align__(16) unsigned char smem[];
    const int tid = threadIdx.x;
    const int nthr = blockDim.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int b = blockIdx.x;

    // [0] neurons above threshold, [1] spikes of the step, [2 + parity] input-list length
    int* misc = (int*)smem;
    unsigned long long off = 64;
    real* v = (real*)(smem + off);     off += sizeof(real) * n;
    real* thr = (real*)(smem + off);   off += sizeof(real) * n;   // v_thresh + theta
    real* ff = (real*)(smem + off);    off += sizeof(real) * n;   // drive I of the next step
    int* refr = (int*)(smem + off);    off += sizeof(int) * n;
    int* cnt = (int*)(smem + off);     off += sizeof(int) * n;
    int* spk = (int*)(smem + off);     off += sizeof(int) * n;
    int* list = (int*)(smem + off);    off += sizeof(int) * 2 * n_in;
    unsigned char* above = smem + off; off += n;
    unsigned char* hist = smem + off;  off += n;   // bit 1: fired at t-1, bit 2: at t-2
    if (off > (unsigned long long)smem_bytes) {
        if (tid == 0) shown[b] = -1;
        return;
    }
    if (b >= n_images) return;

    for (int j = tid; j < n; j += nthr) thr[j] = v_thresh + theta[j];
    const unsigned int last_mask =
        (n_in & 31) ? ((1u << (n_in & 31)) - 1u) : FULL_MASK;

    for (int p = 0; p < n_pres; ++p) {
        const unsigned long long pres = (unsigned long long)b * n_pres + p;
        const unsigned int* sp = spikes + pres * steps * n_words;
        const double* cp = choices + pres * steps;
        for (int j = tid; j < n; j += nthr) {
            v[j] = v_rest; refr[j] = 0; ff[j] = (real)0; cnt[j] = 0; hist[j] = 0;
        }
        if (tid == 0) misc[0] = 0;
        int n1 = 0, n2 = 0, total = 0;
        unsigned int pre[MAX_WORD_CHUNKS];
        double choice_next = 0.0, choice = 0.0;
        if (warp == 0) {
#pragma unroll
            for (int c = 0; c < MAX_WORD_CHUNKS; ++c) {
                const int k = c * 32 + lane;
                pre[c] = (k < n_words && steps > 0) ? sp[k] : 0u;
            }
            if (steps > 0) choice_next = cp[0];
        }
        __syncthreads();

        for (int t = 0; t < steps; ++t) {
            const int buf = t & 1;
            int* lst = list + buf * n_in;

            // Phase 1: leak, integrate, threshold, reset; warp 0 lists the spiking inputs.
            int local = 0;
            for (int j = tid; j < n; j += nthr) {
                const unsigned int h = ((unsigned int)hist[j] << 1) & 7u;
                hist[j] = (unsigned char)h;
                real vj = decay * (v[j] - v_rest) + v_rest;
                if (refr[j] <= 0) {
                    const real inh_j = -inh * (real)(n2 - (int)((h >> 2) & 1u));
                    vj = vj + (ff[j] + inh_j);
                }
                int r = refr[j] - 1;
                unsigned char a = 0;
                if (vj >= thr[j]) { r = refrac_steps; vj = v_reset; a = 1; ++local; }
                v[j] = vj; refr[j] = r; above[j] = a;
            }
            if (local) atomicAdd(&misc[0], local);
            if (warp == 0) {
                int base = 0;
#pragma unroll
                for (int c = 0; c < MAX_WORD_CHUNKS; ++c) {
                    if (c * 32 < n_words) {
                        const int k = c * 32 + lane;
                        unsigned int word = k < n_words ? pre[c] : 0u;
                        if (k == n_words - 1) word &= last_mask;
                        const int here = __popc(word);
                        int incl = here;
                        for (int d = 1; d < 32; d <<= 1) {
                            const int y = __shfl_up_sync(FULL_MASK, incl, d);
                            if (lane >= d) incl += y;
                        }
                        int pos = base + incl - here;
                        while (word) {
                            lst[pos++] = k * 32 + (__ffs(word) - 1);
                            word &= word - 1u;
                        }
                        base += __shfl_sync(FULL_MASK, incl, 31);
                    }
                }
                if (lane == 0) misc[2 + buf] = base;
                const bool more = t + 1 < steps;
#pragma unroll
                for (int c = 0; c < MAX_WORD_CHUNKS; ++c) {
                    const int k = c * 32 + lane;
                    pre[c] = (more && k < n_words) ? sp[(unsigned long long)(t + 1) * n_words + k] : 0u;
                }
                choice = choice_next;
                if (more) choice_next = cp[t + 1];
            }
            __syncthreads();

            // Phase 2: warp 0 picks who fires.
            if (warp == 0) {
                const int n_above = misc[0];
                __syncwarp(FULL_MASK);
                if (lane == 0) misc[0] = 0;
                if (n_above > 0 && one_spike) {
                    int k = (int)floor(choice * (double)n_above);
                    if (k > n_above - 1) k = n_above - 1;
                    if (k < 0) k = 0;
                    for (int base = 0; base < n; base += 32) {
                        const int j = base + lane;
                        const bool a = j < n && above[j];
                        const unsigned int bal = __ballot_sync(FULL_MASK, a);
                        const int here = __popc(bal);
                        if (k < here) {
                            if (a && __popc(bal & ((1u << lane) - 1u)) == k) spk[0] = j;
                            break;
                        }
                        k -= here;
                    }
                }
                if (lane == 0) misc[1] = one_spike ? (n_above > 0 ? 1 : 0) : n_above;
            }
            __syncthreads();

            // Phase 3: spike counts and the next step's drive.
            const int ns = misc[1];
            const int nl = misc[2 + buf];
            total += ns;
            n2 = n1;
            n1 = ns;
            const int first = ns > 0 ? spk[0] : -1;
            for (int j = tid; j < n; j += nthr) {
                const bool fired = one_spike ? (j == first) : (ns > 0 && above[j]);
                if (fired) {
                    hist[j] = (unsigned char)(hist[j] | 1u);
                    cnt[j] += 1;
                }
                real acc = (real)0;
                for (int q = 0; q < nl; ++q) acc = acc + __ldg(&w[(unsigned long long)lst[q] * n + j]);
                ff[j] = acc;
            }
        }
        __syncthreads();
        if (total >= min_spikes || p == n_pres - 1) {
            for (int j = tid; j < n; j += nthr) counts[(unsigned long long)b * n + j] = cnt[j];
            if (tid == 0) shown[b] = p + 1;
            break;
        }
    }
}
"""

DEFAULT_THREADS = 128
MAX_THREADS = 256  # the kernel's __launch_bounds__
DEFAULT_BATCH = 256


class CudaCounts(NamedTuple):
    """Spike counts of a batch and how many presentations each image needed."""

    counts: Any  # (B, N) int32
    shown: Any  # (B,) int32


def shared_bytes(n: int, n_input: int, real_size: int) -> int:
    """Dynamic shared memory of one inference block (the kernel's layout, in bytes)."""
    return 64 + real_size * 3 * n + 4 * (3 * n + 2 * n_input) + 2 * n


def kernel_scalars(params: NetworkParams, dtype: Any) -> tuple[Any, ...]:
    """The real-valued kernel arguments, in the kernel's order, as exact ``dtype`` scalars."""
    real = np.dtype(dtype).type
    return (
        real(decays(params).v),
        real(params.v_rest),
        real(params.v_reset),
        real(params.v_thresh),
        real(params.inh_strength),
    )


def launch_infer(
    weights: Any,
    thetas: Any,
    spikes: Any,
    choices: Any,
    params: NetworkParams,
    *,
    threads: int | None = None,
) -> CudaCounts:
    """Validate, cast and launch :data:`INFER_SOURCE` on a batch (asynchronous).

    Parameters
    ----------
    weights
        (n_input, N) float32 or float64 device array (cast to C order when needed).
    thetas
        (N,) adaptive thresholds (cast to the weights' dtype).
    spikes
        (B, P, time_steps, n_words) input spike bits (:mod:`edge_node.cuda_encode`).
    choices
        (B, P, time_steps) one-spike uniforms on [0, 1).
    params
        Network parameters; an image is presented again (up to P times) while it draws
        fewer than ``min_spikes`` spikes.
    threads
        Threads per block (a multiple of 32), 128 by default.

    Returns
    -------
    CudaCounts
        Device arrays: (B, N) int32 counts and (B,) int32 presentations used.
    """
    check_inputs(params)
    dtype = getattr(weights, "dtype", None)
    if dtype is None:
        raise ConfigError(f"weights must be an array, got {type(weights).__name__}")
    real = cuda_common.real_name(dtype)
    xp = cuda_common.device_xp()
    w = cuda_common.as_device(xp, "weights", weights, dtype, 2)
    n_in, n = (int(s) for s in w.shape)
    if n_in != params.n_input or n < 1:
        raise ConfigError(f"weights must have shape ({params.n_input}, N >= 1), got {w.shape}")
    th = cuda_common.as_device(xp, "thetas", thetas, dtype, 1)
    if tuple(th.shape) != (n,):
        raise ConfigError(f"thetas must have shape ({n},), got {tuple(th.shape)}")
    words, steps = cuda_encode.n_words(n_in), params.time_steps
    spikes = cuda_common.as_device(xp, "spikes", spikes, np.uint32, 4)
    batch = int(spikes.shape[0])
    if spikes.shape[2:] != (steps, words) or spikes.shape[1] < 1:
        raise ConfigError(
            f"spikes must have shape (B, P >= 1, {steps}, {words}), got {tuple(spikes.shape)}"
        )
    n_pres = int(spikes.shape[1])
    choices = cuda_common.as_device(xp, "choices", choices, np.float64, 3)
    if tuple(choices.shape) != (batch, n_pres, steps):
        raise ConfigError(
            f"choices must have shape ({batch}, {n_pres}, {steps}), got {tuple(choices.shape)}"
        )
    threads = cuda_common.check_threads(threads if threads is not None else DEFAULT_THREADS)
    if threads > MAX_THREADS:
        raise ConfigError(f"inference takes at most {MAX_THREADS} threads per block, got {threads}")
    counts = xp.zeros((batch, n), dtype=xp.int32)
    shown = xp.zeros(batch, dtype=xp.int32)
    if batch == 0:
        return CudaCounts(counts, shown)
    smem = shared_bytes(n, n_in, np.dtype(dtype).itemsize)
    kernel = cuda_common.get_kernel(INFER_SOURCE, "lif_infer", real)
    cuda_common.enable_shared_memory(kernel, smem, xp)
    kernel(
        (batch,),
        (threads,),
        (
            w,
            th,
            spikes,
            choices,
            counts,
            shown,
            np.int32(batch),
            np.int32(n_pres),
            np.int32(n_in),
            np.int32(n),
            np.int32(words),
            np.int32(steps),
            np.int32(params.min_spikes),
            np.int32(params.refrac),
            np.int32(1 if params.one_spike else 0),
            np.int32(smem),
            *kernel_scalars(params, dtype),
        ),
        shared_mem=smem,
    )
    return CudaCounts(counts, shown)


def spike_counts_cuda(
    weights: Any,
    thetas: Any,
    images: Any,
    params: NetworkParams,
    *,
    rng: np.random.Generator | int,
    batch_size: int = DEFAULT_BATCH,
    draw: str = "device",
    dtype: Any = np.float32,
    threads: int | None = None,
) -> Any:
    """Spike counts of every image with frozen weights, ``batch_size`` images per launch.

    Parameters
    ----------
    weights, thetas
        (n_input, N) weights and (N,) thresholds (NumPy or CuPy); not modified.
    images
        (n_images, n_input) pixel values 0..255.
    params
        Network parameters.
    rng
        NumPy generator (or int seed) that all randomness comes from.
    batch_size
        Images per launch; bounds the scratch memory (~200 kB of uniforms per image).
    draw
        ``"device"`` (spikes drawn on the GPU, fast) or ``"host"``
        (:func:`edge_node.encoding.draw_presentation` image by image, every presentation
        an image may need drawn up front).
    dtype
        float32 or float64 arithmetic.
    threads
        Threads per block (a multiple of 32), 128 by default.

    Returns
    -------
    array
        (n_images, N) int32 device array.
    """
    if draw not in ("device", "host"):
        raise ConfigError(f"draw must be 'device' or 'host', got {draw!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ConfigError(f"batch_size must be an integer, got {batch_size!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    check_inputs(params)
    real = np.dtype(dtype)
    cuda_common.real_name(real)
    _check_images(images, params.n_input)
    if threads is not None and cuda_common.check_threads(threads) > MAX_THREADS:
        raise ConfigError(f"inference takes at most {MAX_THREADS} threads per block, got {threads}")
    xp = cuda_common.device_xp()
    w = cuda_common.as_device(xp, "weights", weights, real, 2)
    th = cuda_common.as_device(xp, "thetas", thetas, real, 1)
    n_images = int(images.shape[0])
    n_pres = params.max_presentations if params.min_spikes > 0 else 1
    steps = params.time_steps
    out = xp.zeros((n_images, int(w.shape[1])), dtype=xp.int32)
    if draw == "device":
        rs = xp.random.RandomState(_seed(rng))
    else:
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(_seed(rng))
        host_images = images.get() if hasattr(images, "get") else np.asarray(images)
        intensities = cuda_encode.presentation_intensities(params, n_pres)
    for start in range(0, n_images, batch_size):
        stop = min(n_images, start + batch_size)
        if draw == "device":
            batch = xp.asarray(images[start:stop])
            spikes = cuda_encode.draw_device_spikes(batch, params, n_pres, rs, xp)
            choices = cuda_encode.uniform(rs, (stop - start, n_pres, steps), np.float64, xp)
        else:
            words = np.zeros(
                (stop - start, n_pres, steps, cuda_encode.n_words(params.n_input)), np.uint32
            )
            choices = np.zeros((stop - start, n_pres, steps))
            for k in range(stop - start):
                for p in range(n_pres):
                    words[k, p], choices[k, p] = cuda_encode.draw_host_presentation(
                        host_images[start + k], params, gen, float(intensities[p])
                    )
            spikes = xp.asarray(words)
            choices = xp.asarray(choices)
        out[start:stop] = launch_infer(w, th, spikes, choices, params, threads=threads).counts
    return out
