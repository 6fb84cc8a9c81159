"""Input encoding: pixels to Poisson spike trains, drawn as one Bernoulli trial per step.

A pixel of value ``q`` (0..255) fires at rate ``r = q / 255 * intensity`` Hz. With steps
of ``dt`` ms, the probability that it fires in one step is

    p = r * dt / 1000 = q / 255 * intensity * dt / 1000      (<= 0.128 for 128 Hz, 1 ms)

and the spike train of one presentation is ``S[t, i] = (U[t, i] < p_i)`` for
``t = 0..T-1`` with ``U`` uniform on [0, 1).

BindsNET's ``poisson`` encoder draws inter-spike intervals from an exponential
distribution and rounds them to whole steps; a Bernoulli trial per step is the standard
discrete-time equivalent (a Poisson process observed on a grid of ``dt``), with the same
rate up to O(p^2) and no more than one spike per step, which is what the network can
represent anyway.

Only pixels with ``p > 0`` can fire, so a presentation draws uniforms for those pixels
alone (about 150 of 784 for an MNIST digit). Each presentation also draws one uniform
per step, ``choice[t]``, that breaks ties when several excitatory neurons cross their
threshold in the same step (see :func:`edge_node.network.pick_winner`). Every
simulator path (reference, event-driven, CUDA) consumes the generator through
:func:`draw_presentation` only, so that equal seeds give equal inputs everywhere.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from estdp.errors import ConfigError
from estdp.params import NetworkParams


class Presentation(NamedTuple):
    """The random inputs of one presentation of one image.

    Attributes
    ----------
    active
        (K,) int64, indices (into the flattened image) of the pixels with ``p > 0``,
        ascending.
    spikes
        (T, K) bool, ``spikes[t, k]`` is True when pixel ``active[k]`` fires at step ``t``.
    choices
        (T,) float64 uniforms on [0, 1), the tie-break of each step.
    """

    active: np.ndarray
    spikes: np.ndarray
    choices: np.ndarray

    def dense(self, n_input: int) -> np.ndarray:
        """The (T, n_input) bool spike train with the inactive pixels filled in as False."""
        full = np.zeros((self.spikes.shape[0], n_input), dtype=bool)
        full[:, self.active] = self.spikes
        return full


def spike_probability(
    pixels: np.ndarray, params: NetworkParams, intensity: float | None = None
) -> np.ndarray:
    """Per-step firing probability of each pixel.

    Parameters
    ----------
    pixels
        Array of pixel values 0..255 (any shape, any real dtype).
    params
        Network parameters (``dt`` and, unless ``intensity`` is given, ``intensity``).
    intensity
        Rate in Hz of a pixel of value 255; defaults to ``params.intensity``.

    Returns
    -------
    numpy.ndarray
        float64 array of the shape of ``pixels``, ``pixels / 255 * intensity * dt / 1000``.
    """
    rate = params.intensity if intensity is None else intensity
    return np.asarray(pixels, dtype=np.float64) * (rate * params.dt / (255.0 * 1000.0))


def draw_presentation(
    image: np.ndarray,
    params: NetworkParams,
    rng: np.random.Generator,
    intensity: float | None = None,
) -> Presentation:
    """Draw the input spike train and tie-break uniforms of one presentation.

    Parameters
    ----------
    image
        Pixel values 0..255 of one image, any shape (flattened in C order).
    params
        Network parameters: ``time_steps``, ``dt``, ``intensity``.
    rng
        Generator consumed as ``random((T, K), float32)`` then ``random(T)``.
    intensity
        Maximum rate for this presentation (the paper preset raises it on re-presentation).

    Returns
    -------
    Presentation
    """
    p = spike_probability(np.ravel(image), params, intensity)
    active = np.flatnonzero(p > 0.0)
    steps = params.time_steps
    uniforms = rng.random((steps, active.size), dtype=np.float32)
    spikes = uniforms < _float32_bound(p[active])
    choices = rng.random(steps)
    return Presentation(active=active, spikes=spikes, choices=choices)


def _float32_bound(p: np.ndarray) -> np.ndarray:
    """The least float32 ``b >= p``, so that ``u < b`` equals ``u < p`` for float32 ``u``.

    (Comparing float32 uniforms with float32 bounds avoids widening every uniform.)
    """
    bound = p.astype(np.float32)
    low = bound < p
    bound[low] = np.nextafter(bound[low], np.float32(np.inf))
    return bound


def flatten_images(images: np.ndarray, n_input: int) -> np.ndarray:
    """(n, n_input) view of ``images`` given as (n, n_input) or (n, H, W) pixel arrays."""
    images = np.asarray(images)
    if images.ndim < 2:
        raise ConfigError(f"images must be (n, {n_input}) or (n, H, W), got shape {images.shape}")
    flat = images.reshape(images.shape[0], math.prod(images.shape[1:]))  # -1 fails for n = 0
    if flat.shape[1] != n_input:
        raise ConfigError(
            f"images have {flat.shape[1]} pixels but the network has {n_input} inputs"
        )
    return flat
