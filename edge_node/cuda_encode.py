"""Input spike trains for the CUDA kernels: Poisson encoding, packed 32 inputs to a word.

A pixel of value ``q`` fires in a step with probability ``p = q / 255 * rate * dt / 1000``
(see :mod:`edge_node.encoding`), so ``S[t, i] = U[t, i] < p_i`` for uniforms ``U``.
The kernels read ``S`` as bits: word ``k`` of step ``t`` holds inputs ``32k .. 32k+31``,
input ``32k + l`` in bit ``l``; the padding bits of the last word are zero. One step of
784 inputs is 25 words (100 bytes instead of 784), and the kernels turn each word into
the ascending list of the step's spiking inputs with one population count per lane.

Two ways to draw them, both consuming the caller's NumPy generator:

``device``
    One seed from the generator feeds ``cupy.random``; ``U`` for a whole batch of images
    (and, with re-presentations, for every presentation an image may need) is drawn on
    the GPU and packed by :data:`PACK_SOURCE`, without a host round trip.
``host``
    :func:`edge_node.encoding.draw_presentation`, image by image, exactly as the NumPy
    trainer draws them: the same seed gives the same spikes and tie-breaks on every
    path, which is what the spike-for-spike checks rely on. Slower (CPU-bound).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from edge_node import cuda_common
from edge_node.encoding import draw_presentation
from estdp.params import NetworkParams

PACK_SOURCE = r"""
#define FULL_MASK 0xffffffffu

// One warp per output word: lane l compares input 32 * word + l with its probability.
extern "C" __global__ void pack_spikes(
    const float* __restrict__ u,        // (rows, n_in) uniforms on [0, 1)
    const double* __restrict__ prob,    // (rows / rows_per_group, n_in) firing probability
    unsigned int* __restrict__ out,     // (rows, n_words) spike bits
    const long long rows, const int n_in, const int n_words, const int rows_per_group)
{
    const long long word = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    // A warp owns one word, so this return is uniform across the warp (blockDim % 32 == 0).
    if (word >= rows * n_words) return;
    const long long row = word / n_words;
    const int i = (int)(word - row * n_words) * 32 + lane;
    const long long group = row / rows_per_group;
    const bool fire = i < n_in && (double)u[row * n_in + i] < prob[group * n_in + i];
    const unsigned int bits = __ballot_sync(FULL_MASK, fire);
    if (lane == 0) out[word] = bits;
}
"""

PACK_THREADS = 256


def n_words(n_input: int) -> int:
    """Words per step for ``n_input`` inputs."""
    return -(-int(n_input) // 32)


def pack_spike_bits(bits: Any) -> np.ndarray:
    """Pack a boolean spike array along its last axis (host side).

    Parameters
    ----------
    bits
        (..., n_in) boolean (or 0/1) array.

    Returns
    -------
    numpy.ndarray
        (..., ceil(n_in / 32)) uint32; bit ``l`` of word ``k`` is input ``32k + l``.
    """
    bits = np.asarray(bits).astype(bool, copy=False)
    words = n_words(bits.shape[-1])
    packed = np.packbits(bits, axis=-1, bitorder="little")
    pad = 4 * words - packed.shape[-1]
    if pad:
        packed = np.concatenate(
            [packed, np.zeros((*packed.shape[:-1], pad), dtype=np.uint8)], axis=-1
        )
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32, copy=False)


def unpack_spike_bits(words: Any, n_input: int) -> np.ndarray:
    """The inverse of :func:`pack_spike_bits`: (..., n_words) uint32 to (..., n_input) bool."""
    raw = np.ascontiguousarray(np.asarray(words, dtype="<u4")).view(np.uint8)
    return np.unpackbits(raw, axis=-1, bitorder="little")[..., :n_input].astype(bool)


def presentation_intensities(params: NetworkParams, n_presentations: int) -> np.ndarray:
    """Maximum rate (Hz) of each presentation: raised by ``intensity_boost`` every time."""
    return params.intensity + params.intensity_boost * np.arange(n_presentations, dtype=np.float64)


def draw_host_presentation(
    image: np.ndarray, params: NetworkParams, rng: np.random.Generator, intensity: float
) -> tuple[np.ndarray, np.ndarray]:
    """One presentation drawn as the NumPy path draws it, packed for the kernels.

    Returns
    -------
    tuple
        ``(words, choices)``: (T, n_words) uint32 spike bits and (T,) float64 tie-breaks.
    """
    drawn = draw_presentation(image, params, rng, intensity)
    return pack_spike_bits(drawn.dense(params.n_input)), drawn.choices


def uniform(rs: Any, shape: tuple[int, ...], dtype: Any, xp: ModuleType) -> Any:
    """Uniforms on [0, 1) of ``dtype`` from a (NumPy or CuPy) ``RandomState``."""
    if xp is np:
        return rs.random_sample(shape).astype(dtype)
    return rs.random_sample(shape, dtype=dtype)


def draw_device_spikes(
    images: Any, params: NetworkParams, n_presentations: int, rs: Any, xp: ModuleType
) -> Any:
    """Spike bits of every presentation of a batch, drawn and packed on the device.

    Parameters
    ----------
    images
        (B, n_input) pixel values 0..255, an array of ``xp``.
    params
        Network parameters (``time_steps``, ``dt``, ``intensity``, ``intensity_boost``).
    n_presentations
        Presentations to draw per image; presentation ``p`` uses the rate raised ``p``
        times by ``intensity_boost``.
    rs
        ``xp.random.RandomState`` to draw from.
    xp
        CuPy (NumPy in the tests' emulation).

    Returns
    -------
    array
        (B, n_presentations, time_steps, n_words) uint32.
    """
    batch, n_in = int(images.shape[0]), int(images.shape[1])
    steps, words = params.time_steps, n_words(n_in)
    scale = presentation_intensities(params, n_presentations) * (params.dt / (255.0 * 1000.0))
    prob = xp.asarray(images, dtype=xp.float64)[:, None, :] * xp.asarray(scale)[None, :, None]
    prob = xp.ascontiguousarray(prob)
    rows = batch * n_presentations * steps
    out = xp.empty((batch, n_presentations, steps, words), dtype=xp.uint32)
    if rows == 0:
        return out
    u = uniform(rs, (rows, n_in), xp.float32, xp)
    threads = rows * words * 32
    kernel = cuda_common.get_kernel(PACK_SOURCE, "pack_spikes")
    kernel(
        (-(-threads // PACK_THREADS),),
        (PACK_THREADS,),
        (u, prob, out, np.int64(rows), np.int32(n_in), np.int32(words), np.int32(steps)),
    )
    return out
