r"""The per-step loop of :mod:`edge_node.network` in C, for the ``native`` backend.

Both kernels run the step of :mod:`edge_node.reference` (decays ``d``, ``lam``, ``g``)::

    I        = S[t-1] @ W                         W as left by step t-1's update; 0 at t=0
    inh_j    = -inh_strength * (n[t-2] - s_j[t-2])
    v        = d (v - v_rest) + v_rest;  theta *= g         (theta only when learning)
    v       += (refrac <= 0) * (I + inh);  refrac -= 1
    above    = v >= v_thresh + theta
    v[above] = v_reset;  refrac[above] = refrac_steps;  theta[above] += theta_plus
    s        = one-hot(above_sorted[floor(choice[t] * count)])   (one_spike), else above
    x_in     = lam x_in;  x_in[S[t]] = 1;  x_exc = lam x_exc;  x_exc[s] = 1
    W        = clip(W - nu_pre outer(S[t], x_exc) + nu_post outer(x_in, s), w_min, w_max)

in float64, in the reference's order of operations, so that they follow it spike for
spike (the tests compare them). They touch only what can change: the ~13 rows of ``W``
whose inputs spiked in a step (drive and depression, the latter only in the columns of
neurons that have spiked, the others' ``x_exc`` being 0) and, on a spike, one column
(potentiation over the image's active pixels; the others' ``x_in`` is 0). A step thus
costs O(spiking inputs x N), not O(n_input x N): about 0.1 ms per image for 300 neurons.

``estdp_present`` trains on one presentation in place; the caller clips the columns that
may start out of range and normalises afterwards, as :mod:`edge_node.trainer` does for the
NumPy path. ``estdp_infer`` simulates a range of images of a batch with frozen weights;
its input spikes, drawn on the host from the NumPy generator in the order of
:mod:`edge_node.inference`, arrive as the ascending flat indices (image x n_input + pixel)
that fired at each step, so the same seed gives the same spike trains on both backends.
The GIL is released during a call, so threads can share a batch.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edge_node.encoding import Presentation, flatten_images, spike_probability
from edge_node.network import decays
from estdp import native
from estdp.errors import ConfigError
from estdp.params import NetworkParams

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { P_DV, P_LAM, P_G, P_VREST, P_VRESET, P_VTHRESH, P_THETA_PLUS, P_INH,
       P_NU_PRE, P_NU_POST, P_WMIN, P_WMAX, P_COUNT };

/* feed += -inh * (n[t-2] - s_j[t-2]); with no spike at t-2 that adds -0.0, a no-op. */
static void add_inhibition(double *feed, int n, double inh, const int *last2, int n_last2,
                           uint8_t *mark)
{
    if (n_last2 == 0) return;
    for (int q = 0; q < n_last2; ++q) mark[last2[q]] = 1;
    for (int j = 0; j < n; ++j) feed[j] = feed[j] + -inh * ((double)n_last2 - (double)mark[j]);
    for (int q = 0; q < n_last2; ++q) mark[last2[q]] = 0;
}

static int pick(const int *above, int count, double choice)
{
    long k = (long)(choice * (double)count);
    return above[k < count - 1 ? k : count - 1];
}

/* One learning presentation. w: (n_input, n) row-major float64, rows `active` updated in
   place; theta: (n,) in/out; spikes: (steps, k) 0/1 bytes over the active pixels;
   counts: (n,) out. Returns 0, or -1 when out of memory. */
int estdp_present(double *w, int n, double *theta, const int64_t *active, int k,
                  const uint8_t *spikes, const double *choices, int steps,
                  const double *p, int refrac_steps, int one_spike, int32_t *counts)
{
    double *v = malloc(sizeof(double) * (size_t)n);
    double *feed = malloc(sizeof(double) * (size_t)n);
    double *x_exc = calloc((size_t)n, sizeof(double));
    double *x_in = calloc((size_t)(k > 0 ? k : 1), sizeof(double));
    int *refrac = calloc((size_t)n, sizeof(int));
    int *above = malloc(sizeof(int) * (size_t)n);
    int *spk = malloc(sizeof(int) * (size_t)n * 2);
    int *dirty = malloc(sizeof(int) * (size_t)n);    /* neurons that have spiked */
    int *in_now = malloc(sizeof(int) * (size_t)(k > 0 ? k : 1));
    int *in_prev = malloc(sizeof(int) * (size_t)(k > 0 ? k : 1));
    uint8_t *is_dirty = calloc((size_t)n, 1);
    uint8_t *in_spk2 = calloc((size_t)n, 1);
    if (!v || !feed || !x_exc || !x_in || !refrac || !above || !spk || !dirty || !in_now
        || !in_prev || !is_dirty || !in_spk2) {
        free(v); free(feed); free(x_exc); free(x_in); free(refrac); free(above); free(spk);
        free(dirty); free(in_now); free(in_prev); free(is_dirty); free(in_spk2);
        return -1;
    }
    const double dv = p[P_DV], lam = p[P_LAM], g = p[P_G], v_rest = p[P_VREST];
    const double v_reset = p[P_VRESET], v_thresh = p[P_VTHRESH];
    const double theta_plus = p[P_THETA_PLUS], inh = p[P_INH];
    const double nu_pre = p[P_NU_PRE], nu_post = p[P_NU_POST];
    const double w_min = p[P_WMIN], w_max = p[P_WMAX];
    int *last = spk, *last2 = spk + n;  /* spikers of t-1 and t-2 */
    int n_last = 0, n_last2 = 0, n_in_prev = 0, n_dirty = 0;
    for (int j = 0; j < n; ++j) { v[j] = v_rest; counts[j] = 0; }
    for (int t = 0; t < steps; ++t) {
        /* 1. currents from the previous steps' spikes */
        memset(feed, 0, sizeof(double) * (size_t)n);
        for (int q = 0; q < n_in_prev; ++q) {
            const double *row = w + (size_t)active[in_prev[q]] * (size_t)n;
            for (int j = 0; j < n; ++j) feed[j] += row[j];
        }
        add_inhibition(feed, n, inh, last2, n_last2, in_spk2);
        /* 2.-4. leak, gated integration, count-down (branch-free: it vectorises) */
        for (int j = 0; j < n; ++j) {
            const double vj = dv * (v[j] - v_rest) + v_rest;
            v[j] = refrac[j] <= 0 ? vj + feed[j] : vj;
            theta[j] = theta[j] * g;
            refrac[j] -= 1;
        }
        /* 5.-6. threshold, reset */
        int n_above = 0;
        for (int j = 0; j < n; ++j) {
            if (v[j] >= v_thresh + theta[j]) {
                refrac[j] = refrac_steps;
                v[j] = v_reset;
                theta[j] = theta[j] + theta_plus;
                above[n_above++] = j;
            }
        }
        /* 7. at most one spike per step (into the buffer of t-2, no longer needed) */
        int *s_now = last2, n_now = 0;
        if (n_above > 0) {
            if (one_spike) s_now[n_now++] = pick(above, n_above, choices[t]);
            else for (int q = 0; q < n_above; ++q) s_now[n_now++] = above[q];
        }
        last2 = last; n_last2 = n_last; last = s_now; n_last = n_now;
        /* 8. traces: decay, then 1 on a spike */
        const uint8_t *row_spikes = spikes + (size_t)t * (size_t)k;
        int n_in = 0;
        for (int i = 0; i < k; ++i) {
            if (row_spikes[i]) { x_in[i] = 1.0; in_now[n_in++] = i; }
            else x_in[i] = lam * x_in[i];
        }
        for (int q = 0; q < n_dirty; ++q) x_exc[dirty[q]] = lam * x_exc[dirty[q]];
        for (int q = 0; q < n_now; ++q) {
            int j = s_now[q];
            x_exc[j] = 1.0;
            counts[j] += 1;
            if (!is_dirty[j]) { is_dirty[j] = 1; dirty[n_dirty++] = j; }
        }
        /* 9. STDP: depression in the rows of this step's input spikes (only where x_exc
           is non-zero), potentiation in the spikers' columns, then the clip of what moved */
        for (int q = 0; q < n_in; ++q) {
            double *row = w + (size_t)active[in_now[q]] * (size_t)n;
            for (int d = 0; d < n_dirty; ++d) {
                int j = dirty[d];
                row[j] = row[j] - nu_pre * x_exc[j];
            }
        }
        for (int q = 0; q < n_now; ++q) {
            int j = s_now[q];
            for (int i = 0; i < k; ++i) {
                double *wij = w + (size_t)active[i] * (size_t)n + j;
                double x = *wij + nu_post * x_in[i];
                *wij = x < w_min ? w_min : (x > w_max ? w_max : x);
            }
        }
        for (int q = 0; q < n_in; ++q) {
            double *row = w + (size_t)active[in_now[q]] * (size_t)n;
            for (int d = 0; d < n_dirty; ++d) {
                int j = dirty[d];
                double x = row[j];
                row[j] = x < w_min ? w_min : (x > w_max ? w_max : x);
            }
        }
        int *swap = in_prev; in_prev = in_now; in_now = swap;
        n_in_prev = n_in;
    }
    free(v); free(feed); free(x_exc); free(x_in); free(refrac); free(above); free(spk);
    free(dirty); free(in_now); free(in_prev); free(is_dirty); free(in_spk2);
    return 0;
}

/* Frozen-weight spike counts of images [b0, b1) of a batch. w: (n_input, n) float64;
   threshold: (n,) v_thresh + theta; fired[offsets[t]:offsets[t+1]]: ascending flat
   indices (image * n_input + pixel) of the inputs that fired at step t; choices:
   (steps, n_batch); counts: (n_batch, n) out (rows b0..b1-1 written). */
int estdp_infer(const double *w, int n_input, int n, const double *threshold,
                const int64_t *fired, const int64_t *offsets, const double *choices,
                int steps, int n_batch, int b0, int b1, const double *p,
                int refrac_steps, int one_spike, int32_t *counts)
{
    double *v = malloc(sizeof(double) * (size_t)n);
    double *feed = malloc(sizeof(double) * (size_t)n);
    int *refrac = malloc(sizeof(int) * (size_t)n);
    int *above = malloc(sizeof(int) * (size_t)n);
    int *spk = malloc(sizeof(int) * (size_t)n * 2);
    uint8_t *in_spk2 = calloc((size_t)n, 1);
    int64_t *cursor = malloc(sizeof(int64_t) * (size_t)(steps > 0 ? steps : 1));
    if (!v || !feed || !refrac || !above || !spk || !in_spk2 || !cursor) {
        free(v); free(feed); free(refrac); free(above); free(spk); free(in_spk2);
        free(cursor);
        return -1;
    }
    const double dv = p[P_DV], v_rest = p[P_VREST], v_reset = p[P_VRESET];
    const double inh = p[P_INH];
    /* cursor[t]: first index of step t's segment that belongs to image >= b */
    for (int t = 0; t < steps; ++t) {
        int64_t lo = offsets[t], hi = offsets[t + 1], key = (int64_t)b0 * n_input;
        while (lo < hi) {
            int64_t mid = lo + (hi - lo) / 2;
            if (fired[mid] < key) lo = mid + 1; else hi = mid;
        }
        cursor[t] = lo;
    }
    for (int b = b0; b < b1; ++b) {
        const int64_t base = (int64_t)b * n_input, next = base + n_input;
        int32_t *count = counts + (size_t)b * (size_t)n;
        int *last = spk, *last2 = spk + n;  /* spikers of t-1 and t-2 */
        int n_last = 0, n_last2 = 0;
        int64_t prev_lo = 0, prev_hi = 0;  /* image b's inputs at step t-1 */
        for (int j = 0; j < n; ++j) { v[j] = v_rest; refrac[j] = 0; count[j] = 0; }
        for (int t = 0; t < steps; ++t) {
            memset(feed, 0, sizeof(double) * (size_t)n);
            for (int64_t q = prev_lo; q < prev_hi; ++q) {
                const double *row = w + (size_t)(fired[q] - base) * (size_t)n;
                for (int j = 0; j < n; ++j) feed[j] += row[j];
            }
            add_inhibition(feed, n, inh, last2, n_last2, in_spk2);
            for (int j = 0; j < n; ++j) {
                const double vj = dv * (v[j] - v_rest) + v_rest;
                v[j] = refrac[j] <= 0 ? vj + feed[j] : vj;
                refrac[j] -= 1;
            }
            int n_above = 0;
            for (int j = 0; j < n; ++j) {
                if (v[j] >= threshold[j]) {
                    refrac[j] = refrac_steps;
                    v[j] = v_reset;
                    above[n_above++] = j;
                }
            }
            int *s_now = last2, n_now = 0;
            if (n_above > 0) {
                const double choice = choices[(size_t)t * (size_t)n_batch + (size_t)b];
                if (one_spike) s_now[n_now++] = pick(above, n_above, choice);
                else for (int q = 0; q < n_above; ++q) s_now[n_now++] = above[q];
            }
            for (int q = 0; q < n_now; ++q) count[s_now[q]] += 1;
            last2 = last; n_last2 = n_last; last = s_now; n_last = n_now;
            /* this step's inputs of image b drive step t+1 */
            int64_t lo = cursor[t], hi = lo, end = offsets[t + 1];
            while (hi < end && fired[hi] < next) ++hi;
            cursor[t] = hi;
            prev_lo = lo; prev_hi = hi;
        }
    }
    free(v); free(feed); free(refrac); free(above); free(spk); free(in_spk2); free(cursor);
    return 0;
}
"""

_F64 = ctypes.POINTER(ctypes.c_double)
_I64 = ctypes.POINTER(ctypes.c_int64)
_I32 = ctypes.POINTER(ctypes.c_int32)
_U8 = ctypes.POINTER(ctypes.c_uint8)
_INT = ctypes.c_int

_FUNCTIONS: dict[str, ctypes._CFuncPtr] = {}


def _function(name: str) -> ctypes._CFuncPtr:
    function = _FUNCTIONS.get(name)
    if function is None:
        library = native.load(SOURCE)
        function = getattr(library, name)
        function.restype = _INT
        if name == "estdp_present":
            function.argtypes = [_F64, _INT, _F64, _I64, _INT, _U8, _F64, _INT, _F64, _INT,
                                 _INT, _I32]  # fmt: skip
        else:
            function.argtypes = [_F64, _INT, _INT, _F64, _I64, _I64, _F64, _INT, _INT, _INT,
                                 _INT, _F64, _INT, _INT, _I32]  # fmt: skip
        _FUNCTIONS[name] = function
    return function


def _constants(params: NetworkParams) -> np.ndarray:
    """The float parameters in the order of the kernels' ``P_*`` enum."""
    dec = decays(params)
    return np.array(
        [
            dec.v,
            dec.trace,
            dec.theta,
            params.v_rest,
            params.v_reset,
            params.v_thresh,
            params.theta_plus,
            params.inh_strength,
            params.nu_pre,
            params.nu_post,
            params.w_min,
            params.w_max,
        ],
        dtype=np.float64,
    )


def _ptr(array: np.ndarray, kind):
    return array.ctypes.data_as(kind)


def _require(array: np.ndarray, dtype, name: str, shape: tuple[int, ...] | None = None):
    if not isinstance(array, np.ndarray) or array.dtype != dtype or not array.flags.c_contiguous:
        raise ConfigError(f"{name} must be a C-contiguous {np.dtype(dtype).name} NumPy array")
    if shape is not None and array.shape != shape:
        raise ConfigError(f"{name} must have shape {shape}, got {array.shape}")
    return array


def present(
    weights: np.ndarray,
    thetas: np.ndarray,
    presentation: Presentation,
    params: NetworkParams,
) -> np.ndarray:
    """Train on one presentation in C; ``weights`` and ``thetas`` are updated IN PLACE.

    Parameters
    ----------
    weights
        (n_input, N) C-contiguous float64 working weights, already clipped to
        ``[w_min, w_max]`` (only the entries a step updates are clipped afterwards).
    thetas
        (N,) float64 thresholds; on return, those after the presentation (no rest decay).
    presentation
        Input spikes over the active pixels and tie-break uniforms.
    params
        Network parameters.

    Returns
    -------
    numpy.ndarray
        (N,) int32 excitatory spike counts; the columns of the neurons with a non-zero
        count are the only ones that changed.
    """
    n_input, n = _require(weights, np.float64, "weights").shape
    if n_input != params.n_input:
        raise ConfigError(
            f"weights have {n_input} rows but the network has {params.n_input} inputs"
        )
    _require(thetas, np.float64, "thetas", (n,))
    active = np.ascontiguousarray(presentation.active, dtype=np.int64)
    steps = params.time_steps
    spikes = np.ascontiguousarray(presentation.spikes, dtype=np.uint8)
    if spikes.shape != (steps, active.size) or presentation.choices.shape != (steps,):
        raise ConfigError(
            f"presentation of shape {spikes.shape} does not fit {steps} steps x {active.size} pixels"
        )
    if active.size and (active.min() < 0 or active.max() >= n_input):
        raise ConfigError("presentation pixels out of range")
    choices = np.ascontiguousarray(presentation.choices, dtype=np.float64)
    counts = np.zeros(n, dtype=np.int32)
    status = _function("estdp_present")(
        _ptr(weights, _F64),
        n,
        _ptr(thetas, _F64),
        _ptr(active, _I64),
        active.size,
        _ptr(spikes, _U8),
        _ptr(choices, _F64),
        steps,
        _ptr(_constants(params), _F64),
        params.refrac,
        int(params.one_spike),
        _ptr(counts, _I32),
    )
    if status != 0:
        raise MemoryError("native kernel: out of memory")
    return counts


def draw_batch(
    batch: np.ndarray, params: NetworkParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Input spikes and tie-breaks of one batch, drawn as :mod:`edge_node.inference` does.

    Returns
    -------
    tuple
        ``(fired, offsets, choices)``: the ascending flat indices (image x n_input +
        pixel) that fire at step t are ``fired[offsets[t]:offsets[t+1]]``; ``choices``
        is (T, B) float64.
    """
    flat = batch.ravel()
    where = np.flatnonzero(flat > 0)
    p = spike_probability(flat[where], params).astype(np.float32)
    steps = params.time_steps
    parts = []
    choices = np.empty((steps, batch.shape[0]))
    for t in range(steps):
        parts.append(where[rng.random(where.size, dtype=np.float32) < p])
        choices[t] = rng.random(batch.shape[0])
    offsets = np.zeros(steps + 1, dtype=np.int64)
    np.cumsum([part.size for part in parts], out=offsets[1:])
    fired = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return fired.astype(np.int64, copy=False), offsets, choices


def spike_counts(
    weights: np.ndarray,
    thetas: np.ndarray,
    images: np.ndarray,
    params: NetworkParams,
    *,
    rng: np.random.Generator,
    batch_size: int = 1000,
    threads: int | None = None,
) -> np.ndarray:
    """Excitatory spike counts of each image with frozen weights, in C.

    The same inputs as :func:`edge_node.inference.spike_counts` for the same generator
    and batch size; the state is float64 (as the reference), so the counts equal the
    NumPy path's float64 counts.

    Parameters
    ----------
    weights, thetas, images, params, rng, batch_size
        As in :func:`edge_node.inference.spike_counts`.
    threads
        Threads sharing each batch (default: the usable cores, at most 4).

    Returns
    -------
    numpy.ndarray
        (n, N) int32 spike counts.
    """
    flat = flatten_images(images, params.n_input)
    w = np.ascontiguousarray(weights, dtype=np.float64)
    if w.shape[0] != params.n_input or np.shape(thetas) != (w.shape[1],):
        raise ConfigError(
            f"weights {w.shape} and thetas {np.shape(thetas)} do not fit {params.n_input} inputs"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    n = w.shape[1]
    threshold = params.v_thresh + np.asarray(thetas, dtype=np.float64)
    if threads is None:
        threads = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    threads = max(1, threads)
    out = np.zeros((flat.shape[0], n), dtype=np.int32)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for lo in range(0, flat.shape[0], batch_size):
            batch = flat[lo : lo + batch_size]
            drawn = draw_batch(batch, params, rng)
            counts = out[lo : lo + batch.shape[0]]  # a view: the kernel writes into it
            cuts = np.linspace(0, batch.shape[0], threads + 1).astype(int).tolist()
            jobs = [
                pool.submit(_infer, w, threshold, drawn, params, counts, b0, b1)
                for b0, b1 in zip(cuts[:-1], cuts[1:], strict=True)
                if b1 > b0
            ]
            if any(job.result() != 0 for job in jobs):
                raise MemoryError("native kernel: out of memory")
    return out


def _infer(
    w: np.ndarray,
    threshold: np.ndarray,
    drawn: tuple[np.ndarray, np.ndarray, np.ndarray],
    params: NetworkParams,
    counts: np.ndarray,
    b0: int,
    b1: int,
) -> int:
    """Run ``estdp_infer`` on images ``[b0, b1)`` of a batch; returns its status."""
    fired, offsets, choices = drawn
    return _function("estdp_infer")(
        _ptr(w, _F64),
        params.n_input,
        w.shape[1],
        _ptr(threshold, _F64),
        _ptr(fired, _I64),
        _ptr(offsets, _I64),
        _ptr(choices, _F64),
        params.time_steps,
        counts.shape[0],
        b0,
        b1,
        _ptr(_constants(params), _F64),
        params.refrac,
        int(params.one_spike),
        _ptr(counts, _I32),
    )
