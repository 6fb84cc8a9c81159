"""Training loop: present images one by one with STDP, on the NumPy fast path.

For each image (one pass, in order):

1. the columns that may lie outside ``[w_min, w_max]`` are clipped (BindsNET clips all of
   ``W`` at every step; after the first step only the clip of step 0 can change a
   column that no spike touches);
2. one presentation is drawn (:func:`edge_node.encoding.draw_presentation`) and run by
   the event-driven simulator (:mod:`edge_node.event_driven`), or by the reference loop
   for parameter sets it does not cover (:func:`edge_node.event_driven.supported`), or,
   for the ``native`` backend, by the C kernel (:mod:`edge_node.native_kernels`);
3. the changed columns are normalised to sum ``norm`` (columns no spike touched already
   sum to ``norm``); thresholds decay over ``rest_steps`` of rest;
4. paper preset: an image that drew fewer than ``min_spikes`` excitatory spikes is
   presented again with its maximum rate raised by ``intensity_boost``, at most
   ``max_presentations`` times; each presentation learns.

Spike counts are those of each image's last presentation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from edge_node import event_driven, native_kernels, reference
from edge_node import prefetch as _prefetch
from edge_node.encoding import draw_presentation, flatten_images
from edge_node.network import normalise_columns, rest_decay
from estdp.errors import ConfigError
from estdp.params import NetworkParams

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - a declared dependency; only speed depends on it
    threadpool_limits = None


class TrainResult(NamedTuple):
    """Outcome of :func:`train`."""

    weights: np.ndarray  # (n_input, N) float32
    thetas: np.ndarray  # (N,) float32
    spike_counts: np.ndarray  # (n_images, N) int32, last presentation of each image
    images_seen: int
    presentations: int  # >= images_seen (paper preset re-presentations)


def init_weights(
    n_neurons: int, params: NetworkParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Initial weights uniform in ``[0, w_init_max)`` and zero thresholds.

    Parameters
    ----------
    n_neurons
        Number of excitatory neurons N (>= 1).
    params
        Network parameters (``n_input``, ``w_init_max``).
    rng
        Random generator.

    Returns
    -------
    tuple
        ``(weights (n_input, N) float32, thetas (N,) float32 zeros)``.
    """
    if n_neurons < 1:
        raise ConfigError(f"n_neurons must be >= 1, got {n_neurons}")
    weights = rng.random((params.n_input, n_neurons)) * params.w_init_max
    return weights.astype(np.float32), np.zeros(n_neurons, dtype=np.float32)


class _Working:
    """Mutable training state owned by one :func:`train` call."""

    def __init__(self, weights: np.ndarray, thetas: np.ndarray, params: NetworkParams) -> None:
        self.params = params
        self.w = np.array(weights, dtype=np.float64)
        self.w32 = self.w.astype(np.float32)
        self.theta = np.array(thetas, dtype=np.float64)
        # BindsNET normalises every column after every image; a column no spike touched
        # keeps its sum, so only the first image needs all of them.
        self.to_normalise = np.arange(self.w.shape[1])
        self.to_clip = self._out_of_range(self.to_normalise)

    def _out_of_range(self, cols: np.ndarray) -> np.ndarray:
        block = self.w[:, cols]
        bad = (block.max(axis=0, initial=-np.inf) > self.params.w_max) | (
            block.min(axis=0, initial=np.inf) < self.params.w_min
        )
        return cols[bad]

    def clip_for_step0(self) -> None:
        if self.to_clip.size:
            p = self.params
            self.w[:, self.to_clip] = np.clip(self.w[:, self.to_clip], p.w_min, p.w_max)
            self.w32[:, self.to_clip] = self.w[:, self.to_clip]
            self.to_normalise = np.union1d(self.to_normalise, self.to_clip)
            self.to_clip = self.to_clip[:0]

    def finish(self, changed: np.ndarray) -> None:
        cols = np.union1d(self.to_normalise, changed) if self.to_normalise.size else changed
        if cols.size:
            block = normalise_columns(self.w[:, cols], self.params.norm)
            self.w[:, cols] = block
            self.w32[:, cols] = block
            self.to_clip = self._out_of_range(cols)
        self.to_normalise = cols[:0]
        self.theta = rest_decay(self.theta, self.params)


def train(
    weights: np.ndarray,
    thetas: np.ndarray,
    images: np.ndarray,
    params: NetworkParams,
    *,
    rng: np.random.Generator,
    progress: Callable[[int], None] | None = None,
    native: bool = False,
    prefetch: bool = False,
) -> TrainResult:
    """Train on ``images`` in order, one pass, with STDP (NumPy event-driven, or C).

    Parameters
    ----------
    weights
        (n_input, N) initial weights (any float dtype); not modified.
    thetas
        (N,) initial adaptive thresholds; not modified.
    images
        (n, n_input) or (n, 28, 28) pixel values 0..255.
    params
        Network parameters.
    rng
        Random generator (input spikes and tie-breaks; see :mod:`edge_node.encoding`).
    progress
        Called with the number of images done after each image.
    native
        Run each presentation in the C kernel (:mod:`edge_node.native_kernels`) instead
        of the event-driven NumPy path; the same inputs, the same spikes.
    prefetch
        Draw and prepare the next images' inputs in a second process
        (:mod:`edge_node.prefetch`) when that can gain (NumPy path, no re-presentations,
        two cores, enough images); the same spikes and the same final ``rng`` state.

    Returns
    -------
    TrainResult
    """
    weights = np.asarray(weights)
    if weights.ndim != 2 or weights.shape[0] != params.n_input:
        raise ConfigError(f"weights must be ({params.n_input}, N), got shape {weights.shape}")
    thetas = np.asarray(thetas)
    if thetas.shape != (weights.shape[1],):
        raise ConfigError(f"thetas must be ({weights.shape[1]},), got shape {thetas.shape}")
    flat = flatten_images(images, params.n_input)
    ahead = prefetch and not native and _prefetch.usable(params, flat.shape[0])
    with one_blas_thread():
        return _train(weights, thetas, flat, params, rng, progress, native, ahead)


def one_blas_thread() -> contextlib.AbstractContextManager:
    """Limit BLAS to one thread: the event-driven path multiplies small matrices, where
    BLAS threads only wait on each other (3 ms become 13 ms per image on 2 busy cores)."""
    if threadpool_limits is None:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _train(
    weights: np.ndarray,
    thetas: np.ndarray,
    flat: np.ndarray,
    params: NetworkParams,
    rng: np.random.Generator,
    progress: Callable[[int], None] | None,
    native: bool,
    ahead: bool,
) -> TrainResult:
    state = _Working(weights, thetas, params)
    tab = event_driven.tables(params)
    counts = np.zeros((flat.shape[0], weights.shape[1]), dtype=np.int32)
    presentations = 0
    stream = _prefetch.start(flat, params, rng) if ahead else None
    if stream is not None:  # one presentation per image, its inputs made by the worker
        with stream:
            for n, (drawn, prepared) in enumerate(stream):
                counts[n] = _present(state, drawn, params, tab, native, prepared)
                presentations += 1
                if progress is not None:
                    progress(n + 1)
    else:
        for n, image in enumerate(flat):
            intensity = params.intensity
            for attempt in range(params.max_presentations):
                drawn = draw_presentation(image, params, rng, intensity)
                presentations += 1
                counts[n] = _present(state, drawn, params, tab, native)
                if counts[n].sum() >= params.min_spikes or attempt + 1 == params.max_presentations:
                    break
                intensity += params.intensity_boost
            if progress is not None:
                progress(n + 1)
    return TrainResult(
        weights=state.w.astype(np.float32),
        thetas=state.theta.astype(np.float32),
        spike_counts=counts,
        images_seen=int(counts.shape[0]),
        presentations=presentations,
    )


def _present(
    state: _Working,
    drawn,
    params: NetworkParams,
    tab: event_driven.Tables,
    native: bool,
    prepared: event_driven.Prepared | None = None,
) -> np.ndarray:
    """One learning presentation; updates ``state``; returns the (N,) spike counts."""
    if native:
        state.clip_for_step0()
        counts = native_kernels.present(state.w, state.theta, drawn, params)
        state.finish(np.flatnonzero(counts))
        return counts
    if event_driven.supported(params, state.theta):
        state.clip_for_step0()
        state.theta, counts, changed = event_driven.present(
            state.w, state.w32, state.theta, drawn, params, tab, prepared
        )
        state.finish(changed)
        return counts
    result = reference.run_image(
        state.w, state.theta, drawn.dense(params.n_input), drawn.choices, params
    )
    state.w = result.weights
    state.w32 = state.w.astype(np.float32)
    state.theta = rest_decay(result.thetas, params)
    state.to_normalise = state.to_normalise[:0]
    state.to_clip = state._out_of_range(np.arange(state.w.shape[1]))
    return result.spikes.sum(axis=0).astype(np.int32)
