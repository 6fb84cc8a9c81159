"""NumPy twin of the CUDA training and inference kernels, in any float dtype.

The step of :mod:`edge_node.network` written out literally (the whole of ``W`` is
clipped after every learning step), in the arithmetic dtype of the kernel under test,
with the sums ordered as the kernels order them: the drive ``S[t-1] @ W`` row by row in
ascending input order, a column sum as 32 interleaved partial sums added by a halving
tree (a warp and its shuffles). After each presentation the columns that can have
changed are normalised, as :mod:`edge_node.trainer` does: all of them after a run's
first presentation, then those of neurons that fired and those the first step clipped. The float64 reference
(:mod:`edge_node.reference`) checks the float64 kernels; this twin checks the float32
ones bit for bit. It takes pre-drawn inputs with several presentations per image, the
layout the kernels read, and applies the re-presentation rule as the kernels do: the
next presentation while an image drew fewer than ``min_spikes`` spikes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from edge_node.network import decays, pick_winner
from estdp.params import NetworkParams


class TwinResult(NamedTuple):
    weights: np.ndarray
    thetas: np.ndarray
    counts: np.ndarray  # (B, N) int32, last presentation
    shown: np.ndarray  # (B,) int32


def _warp_column_sums(w: np.ndarray) -> np.ndarray:
    rows = -(-w.shape[0] // 32) * 32
    padded = np.zeros((rows, w.shape[1]), dtype=w.dtype)
    padded[: w.shape[0]] = w
    part = np.zeros((32, w.shape[1]), dtype=w.dtype)
    for k in range(rows // 32):
        part = part + padded[32 * k : 32 * k + 32]
    d = 16
    while d:
        part = part[:d] + part[d : 2 * d]
        d //= 2
    return part[0]


def _drive(w: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    acc = np.zeros(w.shape[1], dtype=w.dtype)
    for i in np.flatnonzero(inputs):
        acc = acc + w[i]
    return acc


def simulate(
    weights: np.ndarray,
    thetas: np.ndarray,
    spikes: np.ndarray,
    choices: np.ndarray,
    params: NetworkParams,
    *,
    learning: bool,
    dtype: type = np.float32,
) -> TwinResult:
    """Run images in order.

    Parameters
    ----------
    spikes
        (B, P, T, n_input) bool: P presentations available per image.
    choices
        (B, P, T) one-spike uniforms.
    """
    f = np.dtype(dtype).type
    dec = decays(params)
    d, lam, g = f(dec.v), f(dec.trace), f(dec.theta)
    rest = f(dec.theta**params.rest_steps if params.rest_steps else 1.0)
    v_rest, v_reset, v_thresh = f(params.v_rest), f(params.v_reset), f(params.v_thresh)
    inh, theta_plus = f(params.inh_strength), f(params.theta_plus)
    nu_pre, nu_post, norm = f(params.nu_pre), f(params.nu_post), f(params.norm)
    w_min, w_max = f(params.w_min), f(params.w_max)
    w = np.array(weights, dtype=dtype)
    th = np.array(thetas, dtype=dtype)
    n_images, n_pres, steps, _ = spikes.shape
    n = w.shape[1]
    counts = np.zeros((n_images, n), dtype=np.int32)
    shown = np.zeros(n_images, dtype=np.int32)
    to_normalise = np.ones(n, dtype=bool)
    for b in range(n_images):
        for p in range(n_pres):
            v = np.full(n, v_rest, dtype=dtype)
            refrac = np.zeros(n, dtype=np.int64)
            x_in = np.zeros(w.shape[0], dtype=dtype)
            x_exc = np.zeros(n, dtype=dtype)
            drive = np.zeros(n, dtype=dtype)
            fired1 = np.zeros(n, dtype=bool)
            fired2 = np.zeros(n, dtype=bool)
            count = np.zeros(n, dtype=np.int32)
            for t in range(steps):
                s_in = spikes[b, p, t]
                inhibition = -inh * (np.count_nonzero(fired2) - fired2).astype(dtype)
                v = d * (v - v_rest) + v_rest
                if learning:
                    th = th * g
                v = np.where(refrac <= 0, v + (drive + inhibition), v)
                refrac = refrac - 1
                above = v >= v_thresh + th
                refrac[above] = params.refrac
                v[above] = v_reset
                if learning:
                    th = np.where(above, th + theta_plus, th)
                fired = above.copy()
                if params.one_spike and above.any():
                    fired[:] = False
                    fired[pick_winner(np.flatnonzero(above), float(choices[b, p, t]))] = True
                count += fired
                if learning:
                    x_in = np.where(s_in, f(1), x_in * lam)
                    x_exc = np.where(fired, f(1), x_exc * lam)
                    w = w - nu_pre * np.outer(s_in, x_exc).astype(dtype)
                    w = w + nu_post * np.outer(x_in, fired).astype(dtype)
                    w = np.clip(w, w_min, w_max)
                drive = _drive(w, s_in)
                fired2, fired1 = fired1, fired
            if learning:
                cols = to_normalise | (count > 0)
                colsum = _warp_column_sums(w[:, cols])
                w[:, cols] = w[:, cols] * (norm / np.where(colsum == 0, f(1), colsum))
                block = w[:, cols]
                to_normalise = np.zeros(n, dtype=bool)
                to_normalise[cols] = ((block > w_max) | (block < w_min)).any(axis=0)
                th = th * rest
            counts[b] = count
            shown[b] = p + 1
            if count.sum() >= params.min_spikes:
                break
    return TwinResult(w, th, counts, shown)
