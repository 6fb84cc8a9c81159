r"""Training on the GPU: the whole time loop of a batch of images in one kernel launch.

The kernel runs the step of :mod:`edge_node.network` (decays ``d``, ``lam``, ``g``)::

    I        = S[t-1] @ W                         W as left by step t-1's update; 0 at t=0
    inh_j    = -inh_strength * (sum(s[t-2]) - s_j[t-2])
    v        = d (v - v_rest) + v_rest;  theta *= g
    v       += (refrac <= 0) * (I + inh);  refrac -= 1
    above    = v >= v_thresh + theta
    v[above] = v_reset;  refrac[above] = refrac_steps;  theta[above] += theta_plus
    s        = one-hot(above_sorted[floor(choice[t] * count)])   (one_spike), else above
    x_in     = lam x_in;  x_in[S[t]] = 1;  x_exc = lam x_exc;  x_exc[s] = 1
    W        = clip(W - nu_pre outer(S[t], x_exc) + nu_post outer(x_in, s), w_min, w_max)

and after each presentation ``W[:, j] *= norm / sum_i W[i, j]`` (a zero sum read as 1)
and ``theta *= g ** rest_steps`` (the rest period, not simulated). As in
:mod:`edge_node.trainer`, only the columns that can have changed are normalised: all of
them after a launch's first presentation, then those of neurons that fired and those the
first step clipped (a column nothing touched already sums to ``norm``; renormalising it
would change it by rounding only).

Training is sequential in the images, so one thread block does all of it: threads own
neurons (the membrane phase and the columns of ``W``) and inputs (the presynaptic traces
and the rows of ``W``). Each step needs two barriers:

1. membrane update of every neuron; warp 0 turns the step's spike bits (see
   :mod:`edge_node.cuda_encode`) into the ascending list of spiking inputs;
2. warp 0 picks the winner among the neurons above threshold with a ballot scan in
   index order; the input threads decay and set ``x_in``;
3. each neuron thread updates ``x_exc`` and, for the rows of the inputs that spiked,
   depresses its column where ``x_exc != 0`` (potentiating it too when it fired) and
   sums the updated rows into the next step's drive ``I``; the input threads potentiate
   the winner's column in the other rows. The two sets of entries are disjoint, so no
   barrier is needed before the next step's first phase; the input list and its bits
   are double-buffered by step parity because warp 0 rewrites them in that phase.

``W`` (n_input, N) stays in global memory: a step touches the ~13 rows of its spiking
inputs (most of them in L1) and, on a spike, one column. The clip of ``W`` after every
step only changes entries that were just updated, except on a presentation's first step,
where no update happens (no neuron can fire at ``v = v_rest < v_thresh + theta``): that
clip is folded into the normalisation of the presentation before, or done up front for
the first one. After the last presentation ``W`` is left unclipped, as the reference
leaves it.

``REAL`` is ``float`` for training; ``double`` makes the kernel follow the float64
reference (:mod:`edge_node.reference`) spike for spike, which the tests use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from edge_node import cuda_common, cuda_encode
from edge_node.network import decays
from estdp.errors import ConfigError
from estdp.params import NetworkParams

TRAIN_SOURCE = r"""
#ifndef REAL
#define REAL float
#endif
typedef REAL real;
#define FULL_MASK 0xffffffffu
#define MAX_WORD_CHUNKS 4   // n_words <= 128, i.e. up to 4096 inputs

__device__ __forceinline__ real train_clip(const real x, const real lo, const real hi)
{
    return x < lo ? lo : (x > hi ? hi : x);
}

extern "C" __global__ void __launch_bounds__(1024) stdp_train(
    real* __restrict__ w,                       // (n_in, n) weights, updated in place
    real* __restrict__ theta,                   // (n,) adaptive thresholds, updated in place
    const unsigned int* __restrict__ spikes,    // (n_images, n_pres, steps, n_words) input bits
    const double* __restrict__ choices,         // (n_images, n_pres, steps) one-spike uniforms
    int* __restrict__ counts,                   // (n_images, n) spikes of the last presentation
    int* __restrict__ shown,                    // (n_images,) presentations used
    const int n_images, const int n_pres, const int n_in, const int n, const int n_words,
    const int steps, const int min_spikes, const int refrac_steps, const int one_spike,
    const int smem_bytes,
    const real decay, const real trace_decay, const real theta_decay, const real rest_factor,
    const real v_rest, const real v_reset, const real v_thresh, const real theta_plus,
    const real inh, const real nu_pre, const real nu_post,
    const real w_min, const real w_max, const real norm)
{
    extern __shared__ __align__(16) unsigned char smem[];
    const int tid = threadIdx.x;
    const int nthr = blockDim.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;

    // [0] neurons above threshold, [1] spikes of the step, [2 + parity] input-list length
    int* misc = (int*)smem;
    unsigned long long off = 64;
    real* v = (real*)(smem + off);     off += sizeof(real) * n;
    real* th = (real*)(smem + off);    off += sizeof(real) * n;
    real* ff = (real*)(smem + off);    off += sizeof(real) * n;   // drive I of the next step
    real* xe = (real*)(smem + off);    off += sizeof(real) * n;
    real* xin = (real*)(smem + off);   off += sizeof(real) * n_in;
    int* refr = (int*)(smem + off);    off += sizeof(int) * n;
    int* cnt = (int*)(smem + off);     off += sizeof(int) * n;
    int* spk = (int*)(smem + off);     off += sizeof(int) * n;    // neurons that fire
    int* list = (int*)(smem + off);    off += sizeof(int) * 2 * n_in;
    unsigned int* words = (unsigned int*)(smem + off); off += sizeof(unsigned int) * 2 * n_words;
    unsigned char* above = smem + off; off += n;
    unsigned char* hist = smem + off;  off += n;   // bit 1: fired at t-1, bit 2: at t-2
    unsigned char* renorm = smem + off; off += n;  // column to normalise though no spike touched it
    if (off > (unsigned long long)smem_bytes) {    // the host computed the layout differently
        if (tid == 0) shown[0] = -1;
        return;
    }

    for (int j = tid; j < n; j += nthr) {
        th[j] = theta[j];
        renorm[j] = 1;   // the first presentation normalises every column
    }
    for (int e = tid; e < n_in * n; e += nthr) {
        const real x = w[e];
        const real c = train_clip(x, w_min, w_max);
        if (c != x) w[e] = c;
    }
    const unsigned int last_mask =
        (n_in & 31) ? ((1u << (n_in & 31)) - 1u) : FULL_MASK;   // padding bits of the last word
    __syncthreads();

    for (int b = 0; b < n_images; ++b) {
        for (int p = 0; p < n_pres; ++p) {
            const unsigned long long pres = (unsigned long long)b * n_pres + p;
            const unsigned int* sp = spikes + pres * steps * n_words;
            const double* cp = choices + pres * steps;
            for (int j = tid; j < n; j += nthr) {
                v[j] = v_rest; refr[j] = 0; ff[j] = (real)0; xe[j] = (real)0;
                cnt[j] = 0; hist[j] = 0;
            }
            for (int i = tid; i < n_in; i += nthr) xin[i] = (real)0;
            if (tid == 0) misc[0] = 0;
            int n1 = 0, n2 = 0, total = 0;   // spikes at t-1 and t-2, and in this presentation
            unsigned int pre[MAX_WORD_CHUNKS];   // warp 0: this step's words, loaded a step ahead
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
                unsigned int* wds = words + buf * n_words;

                // Phase 1: leak, integrate, threshold, reset (all above-threshold neurons).
                int local = 0;
                for (int j = tid; j < n; j += nthr) {
                    const unsigned int h = ((unsigned int)hist[j] << 1) & 7u;
                    hist[j] = (unsigned char)h;
                    real vj = decay * (v[j] - v_rest) + v_rest;
                    real tj = th[j] * theta_decay;
                    if (refr[j] <= 0) {
                        const real inh_j = -inh * (real)(n2 - (int)((h >> 2) & 1u));
                        vj = vj + (ff[j] + inh_j);
                    }
                    int r = refr[j] - 1;
                    unsigned char a = 0;
                    if (vj >= v_thresh + tj) {
                        r = refrac_steps; vj = v_reset; tj = tj + theta_plus; a = 1; ++local;
                    }
                    v[j] = vj; th[j] = tj; refr[j] = r; above[j] = a;
                }
                if (local) atomicAdd(&misc[0], local);
                // Warp 0: the ascending list of this step's spiking inputs.
                if (warp == 0) {
                    int base = 0;
#pragma unroll
                    for (int c = 0; c < MAX_WORD_CHUNKS; ++c) {
                        if (c * 32 < n_words) {
                            const int k = c * 32 + lane;
                            unsigned int word = k < n_words ? pre[c] : 0u;
                            if (k == n_words - 1) word &= last_mask;
                            if (k < n_words) wds[k] = word;
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

                // Phase 2: warp 0 picks who fires; the input threads update x_in.
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
                    } else if (n_above > 0) {
                        int at = 0;
                        for (int base = 0; base < n; base += 32) {
                            const int j = base + lane;
                            const bool a = j < n && above[j];
                            const unsigned int bal = __ballot_sync(FULL_MASK, a);
                            if (a) spk[at + __popc(bal & ((1u << lane) - 1u))] = j;
                            at += __popc(bal);
                        }
                    }
                    if (lane == 0) misc[1] = one_spike ? (n_above > 0 ? 1 : 0) : n_above;
                }
                for (int i = tid; i < n_in; i += nthr) {
                    const bool s = (wds[i >> 5] >> (i & 31)) & 1u;
                    xin[i] = s ? (real)1 : xin[i] * trace_decay;
                }
                __syncthreads();

                // Phase 3: x_exc, STDP, and the next step's drive.
                const int ns = misc[1];
                const int nl = misc[2 + buf];
                total += ns;
                n2 = n1;
                n1 = ns;
                const int first = ns > 0 ? spk[0] : -1;
                for (int j = tid; j < n; j += nthr) {
                    const bool fired = one_spike ? (j == first) : (ns > 0 && above[j]);
                    real x = xe[j] * trace_decay;
                    if (fired) {
                        x = (real)1;
                        hist[j] = (unsigned char)(hist[j] | 1u);
                        cnt[j] += 1;
                    }
                    xe[j] = x;
                    real acc = (real)0;
                    if (x != (real)0) {
                        const real dep = nu_pre * x;
                        for (int q = 0; q < nl; ++q) {
                            const int i = lst[q];
                            real wv = w[(unsigned long long)i * n + j] - dep;
                            if (fired) wv = wv + nu_post * xin[i];
                            wv = train_clip(wv, w_min, w_max);
                            w[(unsigned long long)i * n + j] = wv;
                            acc = acc + wv;
                        }
                    } else {
                        for (int q = 0; q < nl; ++q) acc = acc + w[(unsigned long long)lst[q] * n + j];
                    }
                    ff[j] = acc;
                }
                if (ns > 0) {
                    for (int i = tid; i < n_in; i += nthr) {
                        const bool s = (wds[i >> 5] >> (i & 31)) & 1u;
                        const real xi = xin[i];
                        if (!s && xi != (real)0) {
                            const real pot = nu_post * xi;
                            for (int q = 0; q < ns; ++q) {
                                const unsigned long long e = (unsigned long long)i * n + spk[q];
                                w[e] = train_clip(w[e] + pot, w_min, w_max);
                            }
                        }
                    }
                }
            }
            __syncthreads();

            // Normalise the columns that changed: those of neurons that fired, those clipped
            // on this presentation's first step, and all of them on a launch's first. A warp
            // per column: lane l sums rows l, l+32, ... in order, then a shuffle tree adds
            // the 32 partial sums. The clip of the next first step is folded in, except
            // after the very last presentation.
            const bool accepted = total >= min_spikes || p == n_pres - 1;
            const bool last = accepted && b == n_images - 1;
            for (int j = tid; j < n; j += nthr) th[j] = th[j] * rest_factor;
            for (int j = warp; j < n; j += (nthr >> 5)) {
                if (cnt[j] == 0 && !renorm[j]) continue;   // uniform: one column per warp
                real s = (real)0;
                for (int i = lane; i < n_in; i += 32) s = s + w[(unsigned long long)i * n + j];
                for (int d = 16; d > 0; d >>= 1) s = s + __shfl_down_sync(FULL_MASK, s, d);
                s = __shfl_sync(FULL_MASK, s, 0);
                const real f = norm / (s == (real)0 ? (real)1 : s);
                bool clipped = false;
                for (int i = lane; i < n_in; i += 32) {
                    const unsigned long long e = (unsigned long long)i * n + j;
                    real x = w[e] * f;
                    if (!last) {
                        const real c = train_clip(x, w_min, w_max);
                        clipped = clipped || c != x;
                        x = c;
                    }
                    w[e] = x;
                }
                const unsigned int any = __ballot_sync(FULL_MASK, clipped);
                if (lane == 0) renorm[j] = any ? 1 : 0;
            }
            __syncthreads();
            if (accepted) {
                for (int q = tid; q < n; q += nthr) counts[(unsigned long long)b * n + q] = cnt[q];
                if (tid == 0) shown[b] = p + 1;
                break;
            }
        }
    }
    for (int j = tid; j < n; j += nthr) theta[j] = th[j];
}
"""

MAX_INPUTS = 4096  # MAX_WORD_CHUNKS * 32 words * 32 inputs
# Uniforms drawn per launch on the device (float32): bounds the scratch memory to ~256 MB.
DEVICE_DRAW_BUDGET = 64 * 1024 * 1024


class CudaTrainResult(NamedTuple):
    """Trained parameters and spike counts, as device arrays."""

    weights: Any  # (n_input, N) float32
    thetas: Any  # (N,) float32
    counts: Any  # (n_images, N) int32, spikes of each image's last presentation


def shared_bytes(n: int, n_input: int, real_size: int) -> int:
    """Dynamic shared memory of one training block (the kernel's layout, in bytes)."""
    words = cuda_encode.n_words(n_input)
    return 64 + real_size * (4 * n + n_input) + 4 * (3 * n + 2 * n_input + 2 * words) + 3 * n


def check_inputs(params: NetworkParams) -> None:
    """Refuse more inputs than the kernels' spike-word registers hold."""
    if params.n_input > MAX_INPUTS:
        raise ConfigError(
            f"the CUDA kernels take at most {MAX_INPUTS} inputs, got {params.n_input}"
        )


def check_params(params: NetworkParams) -> None:
    """Refuse parameters under which the kernel's folded first-step clip would be wrong."""
    check_inputs(params)
    if not params.v_rest < params.v_thresh:
        raise ConfigError(
            f"the CUDA kernels need v_rest < v_thresh (got {params.v_rest} and "
            f"{params.v_thresh}): a neuron must not fire on the first step of an image"
        )
    if params.theta_plus < 0:
        raise ConfigError(f"the CUDA kernels need theta_plus >= 0, got {params.theta_plus}")


def kernel_scalars(params: NetworkParams, dtype: Any) -> tuple[Any, ...]:
    """The real-valued kernel arguments, in the kernel's order, as exact ``dtype`` scalars."""
    real = np.dtype(dtype).type
    dec = decays(params)
    return (
        real(dec.v),
        real(dec.trace),
        real(dec.theta),
        real(dec.theta**params.rest_steps if params.rest_steps else 1.0),
        real(params.v_rest),
        real(params.v_reset),
        real(params.v_thresh),
        real(params.theta_plus),
        real(params.inh_strength),
        real(params.nu_pre),
        real(params.nu_post),
        real(params.w_min),
        real(params.w_max),
        real(params.norm),
    )


def launch_train(
    weights: Any,
    thetas: Any,
    spikes: Any,
    choices: Any,
    counts: Any,
    shown: Any,
    params: NetworkParams,
    *,
    threads: int | None = None,
) -> None:
    """Validate, cast and launch :data:`TRAIN_SOURCE` on a batch of images (asynchronous).

    Parameters
    ----------
    weights
        (n_input, N) float32 or float64 device array, C order; trained in place.
    thetas
        (N,) device array of the same dtype; updated in place.
    spikes
        (B, P, time_steps, n_words) input spike bits (:mod:`edge_node.cuda_encode`);
        P presentations are available per image.
    choices
        (B, P, time_steps) one-spike uniforms on [0, 1).
    counts
        (B, N) int32 device array, C order: receives each image's spike counts.
    shown
        (B,) int32 device array: receives the presentations each image used.
    params
        Network parameters; an image is presented again (up to P times) while it draws
        fewer than ``min_spikes`` spikes.
    threads
        Threads per block (a multiple of 32); by default one per neuron, 256 to 1024.
    """
    check_params(params)
    xp = cuda_common.device_xp()
    dtype = getattr(weights, "dtype", None)
    cuda_common.require_array(xp, "weights", weights, dtype, (params.n_input, None))
    real = cuda_common.real_name(dtype)
    n_in, n = (int(s) for s in weights.shape)
    if n < 1:
        raise ConfigError("weights must have at least one neuron (column)")
    cuda_common.require_array(xp, "thetas", thetas, dtype, (n,))
    shape = getattr(counts, "shape", ())
    batch = int(shape[0]) if len(shape) == 2 else -1
    cuda_common.require_array(xp, "counts", counts, np.int32, (batch, n))
    cuda_common.require_array(xp, "shown", shown, np.int32, (batch,))
    words, steps = cuda_encode.n_words(n_in), params.time_steps
    spikes = cuda_common.as_device(xp, "spikes", spikes, np.uint32, 4)
    if spikes.shape[0] != batch or spikes.shape[2:] != (steps, words) or spikes.shape[1] < 1:
        raise ConfigError(
            f"spikes must have shape ({batch}, P >= 1, {steps}, {words}), got {tuple(spikes.shape)}"
        )
    n_pres = int(spikes.shape[1])
    choices = cuda_common.as_device(xp, "choices", choices, np.float64, 3)
    if tuple(choices.shape) != (batch, n_pres, steps):
        raise ConfigError(
            f"choices must have shape ({batch}, {n_pres}, {steps}), got {tuple(choices.shape)}"
        )
    threads = cuda_common.check_threads(
        threads if threads is not None else cuda_common.block_threads(n, 256, 1024)
    )
    if batch == 0:
        return
    smem = shared_bytes(n, n_in, np.dtype(weights.dtype).itemsize)
    kernel = cuda_common.get_kernel(TRAIN_SOURCE, "stdp_train", real)
    cuda_common.enable_shared_memory(kernel, smem, xp)
    kernel(
        (1,),
        (threads,),
        (
            weights,
            thetas,
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
            *kernel_scalars(params, weights.dtype),
        ),
        shared_mem=smem,
    )


def _seed(rng: np.random.Generator | int) -> int:
    """A 32-bit seed for ``xp.random.RandomState``, drawn from ``rng`` (or derived from an int)."""
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        rng = np.random.default_rng(int(rng))
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, 2**32))
    raise ConfigError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def _check_images(images: Any, n_input: int) -> None:
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 2 or int(shape[1]) != n_input:
        raise ConfigError(f"images must have shape (n_images, {n_input}), got {shape}")
    kind = np.dtype(images.dtype).kind
    if kind not in "uif":
        raise ConfigError(f"images must hold pixel values 0..255, got dtype {images.dtype}")


def train_images_cuda(
    weights: Any,
    thetas: Any,
    images: Any,
    params: NetworkParams,
    *,
    rng: np.random.Generator | int,
    draw: str = "device",
    dtype: Any = np.float32,
    chunk: int | None = None,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> CudaTrainResult:
    """Train on ``images`` in order (one pass) with the CUDA kernel.

    Parameters
    ----------
    weights
        (n_input, N) initial weights (NumPy or CuPy); not modified.
    thetas
        (N,) initial adaptive thresholds; not modified.
    images
        (n_images, n_input) pixel values 0..255.
    params
        Network parameters (either preset; re-presentations included).
    rng
        NumPy generator (or int seed) that all randomness comes from.
    draw
        ``"device"``: spikes drawn on the GPU from one seed, a batch per launch, no host
        round trip (fast). ``"host"``: drawn by :func:`edge_node.encoding.draw_presentation`
        exactly as the NumPy trainer draws them (same seed, same spikes); with
        re-presentations this waits for every image's spike count.
    dtype
        float32 (training) or float64 (follows the float64 reference spike for spike).
    chunk
        Images per launch (device draws): by default as many as ~256 MB of scratch allows.
    threads
        Threads per block; see :func:`launch_train`.
    progress
        Called with the number of images done so far, once per launch (every 100 images
        with host draws), as :func:`edge_node.trainer.train` calls it.

    Returns
    -------
    CudaTrainResult
        Device arrays ``(weights, thetas, counts)``.
    """
    if draw not in ("device", "host"):
        raise ConfigError(f"draw must be 'device' or 'host', got {draw!r}")
    check_params(params)
    real = np.dtype(dtype)
    cuda_common.real_name(real)
    _check_images(images, params.n_input)
    xp = cuda_common.device_xp()
    w = xp.array(cuda_common.as_device(xp, "weights", weights, real, 2), dtype=real, copy=True)
    th = xp.array(cuda_common.as_device(xp, "thetas", thetas, real, 1), dtype=real, copy=True)
    if w.shape[0] != params.n_input or th.shape != (w.shape[1],):
        raise ConfigError(
            f"weights {tuple(w.shape)} and thetas {tuple(th.shape)} do not fit "
            f"{params.n_input} inputs"
        )
    if not bool(xp.isfinite(w).all()) or not bool(xp.isfinite(th).all()):
        raise ConfigError("weights and thetas must be finite (no NaN or inf)")
    if th.size and float(th.min()) <= params.v_rest - params.v_thresh:
        raise ConfigError(
            f"thetas must be above v_rest - v_thresh = {params.v_rest - params.v_thresh}: "
            "a neuron must not fire on the first step of an image"
        )
    n_images, n = int(images.shape[0]), int(w.shape[1])
    counts = xp.zeros((n_images, n), dtype=xp.int32)
    shown = xp.zeros(n_images, dtype=xp.int32)
    n_pres = params.max_presentations if params.min_spikes > 0 else 1
    if draw == "host":
        _train_host(w, th, images, counts, shown, params, rng, threads, progress, xp)
        return CudaTrainResult(w, th, counts)
    rs = xp.random.RandomState(_seed(rng))
    per_image = n_pres * params.time_steps * params.n_input
    size = chunk if chunk is not None else max(1, DEVICE_DRAW_BUDGET // per_image)
    if size < 1:
        raise ConfigError(f"chunk must be >= 1, got {size}")
    pending: tuple[Any, int] | None = None
    for start in range(0, n_images, size):
        stop = min(n_images, start + size)
        batch = xp.asarray(images[start:stop])
        spikes = cuda_encode.draw_device_spikes(batch, params, n_pres, rs, xp)
        choices = cuda_encode.uniform(rs, (stop - start, n_pres, params.time_steps), np.float64, xp)
        launch_train(
            w, th, spikes, choices, counts[start:stop], shown[start:stop], params, threads=threads
        )
        if progress is not None:
            done = xp.cuda.Event()
            done.record()
            if pending is not None:  # report the previous launch while this one runs
                pending[0].synchronize()
                progress(pending[1])
            pending = (done, stop)
    if pending is not None and progress is not None:
        pending[0].synchronize()
        progress(pending[1])
    return CudaTrainResult(w, th, counts)


def _train_host(
    w: Any,
    th: Any,
    images: Any,
    counts: Any,
    shown: Any,
    params: NetworkParams,
    rng: np.random.Generator | int,
    threads: int | None,
    progress: Callable[[int], None] | None,
    xp: Any,
) -> None:
    """Host draws: the NumPy trainer's random stream, one image (presentation) per launch."""
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(_seed(rng))
    host_images = images.get() if hasattr(images, "get") else np.asarray(images)
    one = np.zeros(1, dtype=np.int32)
    for index, image in enumerate(host_images):
        intensity = params.intensity
        for presentation in range(params.max_presentations):
            words, choice = cuda_encode.draw_host_presentation(image, params, gen, intensity)
            # A single presentation per launch: the host decides on re-presentation.
            launch_train(
                w,
                th,
                words[None, None],
                choice[None, None],
                counts[index : index + 1],
                shown[index : index + 1],
                params.replace(min_spikes=0),
                threads=threads,
            )
            if params.min_spikes == 0:
                break
            drawn = int(counts[index].sum())
            if drawn >= params.min_spikes or presentation + 1 == params.max_presentations:
                shown[index : index + 1] = xp.asarray(one + presentation + 1)
                break
            intensity += params.intensity_boost
        if progress is not None and ((index + 1) % 100 == 0 or index + 1 == len(host_images)):
            progress(index + 1)
