"""Spike counts with frozen weights, simulated for a batch of images at once.

The step of :mod:`edge_node.network` without learning (no STDP; ``theta`` neither decays
nor grows), with the state of B images held as (B, N) arrays and one loop over the T
steps of a presentation. Per step, for the batch::

    S[t]   = U[t] < p                       Bernoulli input spikes, (B, n_input)
    I      = S[t-1] @ W                     one matrix product for the whole batch
    inh    = -inh_strength * (n[t-2] - s[t-2])   n: excitatory spikes of the image
    v      = d (v - v_rest) + v_rest
    v     += (refrac <= 0) * (I + inh);  refrac -= 1
    above  = v >= v_thresh + theta;  v[above] = v_reset;  refrac[above] = refrac_steps
    s      = one spike per image among ``above`` (tie-break uniform c: the
             floor(c * count)-th neuron above threshold), or ``above``

It is written against an array module ``xp`` (NumPy, or CuPy with the same calls); the
random numbers come from a NumPy generator on the host (inputs only where a pixel is
non-zero, then scattered), so the GPU path does its own drawing where speed matters.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from edge_node.encoding import flatten_images, spike_probability
from edge_node.network import decays
from estdp.errors import ConfigError
from estdp.params import NetworkParams


def spike_counts(
    weights: np.ndarray,
    thetas: np.ndarray,
    images: np.ndarray,
    params: NetworkParams,
    *,
    rng: np.random.Generator,
    batch_size: int = 1000,
    xp: ModuleType = np,
    dtype: type = np.float32,
):
    """Excitatory spike counts of each image with frozen weights.

    Parameters
    ----------
    weights
        (n_input, N) input->excitatory weights.
    thetas
        (N,) adaptive thresholds (frozen).
    images
        (n, n_input) or (n, 28, 28) pixel values 0..255.
    params
        Network parameters (``intensity``, ``time_steps``, neuron constants).
    rng
        NumPy generator for the input spikes and the tie-breaks.
    batch_size
        Images simulated together.
    xp
        Array module for the simulation (``numpy`` or ``cupy``).
    dtype
        Floating type of the state (float32 is plenty for counting; float64 matches
        :mod:`edge_node.reference` spike for spike).

    Returns
    -------
    array
        (n, N) int32 spike counts, an ``xp`` array.
    """
    flat = flatten_images(images, params.n_input)
    weights = np.asarray(weights)
    if weights.shape[0] != params.n_input or np.shape(thetas) != (weights.shape[1],):
        raise ConfigError(
            f"weights {weights.shape} and thetas {np.shape(thetas)} do not fit "
            f"{params.n_input} inputs"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    w = xp.asarray(weights, dtype=dtype)
    threshold = xp.asarray(params.v_thresh + np.asarray(thetas, dtype=np.float64), dtype=dtype)
    out = xp.zeros((flat.shape[0], weights.shape[1]), dtype=xp.int32)
    for lo in range(0, flat.shape[0], batch_size):
        batch = flat[lo : lo + batch_size]
        out[lo : lo + batch.shape[0]] = _simulate(w, threshold, batch, params, rng, xp, dtype)
    return out


def _simulate(w, threshold, batch: np.ndarray, params: NetworkParams, rng, xp, dtype):
    """Counts (B, N) of one batch, with inputs drawn from ``rng``."""
    n_batch = batch.shape[0]
    n_input = w.shape[0]
    # Only pixels above zero can fire: draw for those, then scatter into the batch.
    where = np.flatnonzero(batch.ravel() > 0)
    p = spike_probability(batch.ravel()[where], params).astype(np.float32)

    def draw(_: int):
        fired = where[rng.random(where.size, dtype=np.float32) < p]
        spikes = xp.zeros((n_batch, n_input), dtype=dtype)
        spikes.ravel()[xp.asarray(fired)] = 1.0
        return spikes, xp.asarray(rng.random(n_batch), dtype=dtype)

    return simulate(w, threshold, n_batch, draw, params, xp, dtype)


def simulate(w, threshold, n_batch: int, draw, params: NetworkParams, xp=np, dtype=np.float32):
    """Run one presentation of a batch with frozen weights; the loop over steps.

    Parameters
    ----------
    w
        (n_input, N) weights, an ``xp`` array of ``dtype``.
    threshold
        (N,) ``v_thresh + theta``.
    n_batch
        Number of images B.
    draw
        ``draw(t) -> (spikes (B, n_input) of dtype, choices (B,))``: the input spikes and
        tie-break uniforms of step t.
    params, xp, dtype
        As in :func:`spike_counts`.

    Returns
    -------
    array
        (B, N) int32 spike counts.
    """
    n = w.shape[1]
    dec = decays(params)
    v = xp.full((n_batch, n), params.v_rest, dtype=dtype)
    refrac = xp.zeros((n_batch, n), dtype=xp.int32)
    counts = xp.zeros((n_batch, n), dtype=xp.int32)
    inputs_prev = xp.zeros((n_batch, w.shape[0]), dtype=dtype)  # input spikes at t-1
    spikes_prev = xp.zeros((n_batch, n), dtype=dtype)  # excitatory spikes at t-1
    spikes_prev2 = xp.zeros((n_batch, n), dtype=dtype)  # and at t-2
    for t in range(params.time_steps):
        inputs, choices = draw(t)
        # currents from the previous steps' spikes
        current = inputs_prev @ w
        current -= params.inh_strength * (spikes_prev2.sum(axis=1, keepdims=True) - spikes_prev2)
        # leak, gated integration, refractory count-down (in place: B x N temporaries
        # dominate the cost; the operations and their rounding are the reference's)
        v -= params.v_rest
        v *= dec.v
        v += params.v_rest
        current *= refrac <= 0
        v += current
        refrac -= 1
        # threshold, reset, one spike per image
        above = v >= threshold
        v[above] = params.v_reset
        refrac[above] = params.refrac
        spikes = _one_spike(above, choices, xp) if params.one_spike else above
        spikes = spikes.astype(dtype)
        counts += spikes.astype(xp.int32)
        spikes_prev2, spikes_prev = spikes_prev, spikes
        inputs_prev = inputs
    return counts


def _one_spike(above, choices, xp):
    """Keep, per row, the ``floor(c * count)``-th True of ``above`` (ascending index)."""
    count = above.sum(axis=1)
    spikes = above.copy()
    many = count > 1
    if bool(many.any()):
        idx = xp.flatnonzero(many)
        ranks = xp.cumsum(above[idx], axis=1)
        k = xp.minimum((choices[idx] * count[idx]).astype(xp.int64), count[idx] - 1) + 1
        chosen = xp.argmax(ranks >= k[:, None], axis=1)
        spikes[idx] = False
        spikes[idx, chosen] = True
    return spikes
