"""Spike bits for the CUDA kernels: packing, host draws, and the device packing kernel."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node import cuda_encode
from edge_node.encoding import draw_presentation
from estdp.backend import to_host
from estdp.params import NetworkParams


@pytest.mark.parametrize("n_in", [1, 31, 32, 33, 784])
def test_pack_round_trip_and_bit_layout(n_in: int) -> None:
    rng = np.random.default_rng(n_in)
    bits = rng.random((3, 5, n_in)) < 0.3
    words = cuda_encode.pack_spike_bits(bits)
    assert words.dtype == np.uint32
    assert words.shape == (3, 5, -(-n_in // 32))
    np.testing.assert_array_equal(cuda_encode.unpack_spike_bits(words, n_in), bits)
    # input 32k + l is bit l of word k, and padding bits stay zero
    k, i = 1, 4
    if n_in > 32 * k + i:
        assert bool((words[k, i, k] >> np.uint32(i)) & 1) == bits[k, i, 32 * k + i]
    assert cuda_encode.pack_spike_bits(np.ones((1, n_in), bool))[0, -1] == np.uint32(
        (1 << (n_in - 32 * (-(-n_in // 32) - 1))) - 1
    )


def test_host_presentation_is_the_numpy_draw_packed() -> None:
    params = NetworkParams(time_steps=20)
    image = (np.arange(784) % 256).astype(np.uint8)
    words, choices = cuda_encode.draw_host_presentation(
        image, params, np.random.default_rng(3), params.intensity
    )
    drawn = draw_presentation(image, params, np.random.default_rng(3), params.intensity)
    np.testing.assert_array_equal(cuda_encode.unpack_spike_bits(words, 784), drawn.dense(784))
    np.testing.assert_array_equal(choices, drawn.choices)
    assert words.shape == (20, 25)


def test_presentation_intensities_rise_by_the_boost() -> None:
    params = NetworkParams(intensity=63.75, intensity_boost=32.0)
    np.testing.assert_allclose(
        cuda_encode.presentation_intensities(params, 3), [63.75, 95.75, 127.75]
    )


def test_device_draw_packs_uniform_below_probability(xp) -> None:
    params = NetworkParams(n_input=70, time_steps=6, intensity=900.0, intensity_boost=3000.0)
    images = np.random.default_rng(0).integers(0, 256, (3, 70)).astype(np.uint8)
    images[:, :5] = 0  # silent pixels never fire
    spikes = cuda_encode.draw_device_spikes(
        xp.asarray(images), params, 2, xp.random.RandomState(11), xp
    )
    assert spikes.shape == (3, 2, 6, 3) and spikes.dtype == np.uint32
    u = to_host(cuda_encode.uniform(xp.random.RandomState(11), (3 * 2 * 6, 70), np.float32, xp))
    scale = cuda_encode.presentation_intensities(params, 2) * params.dt / 255_000.0
    prob = images[:, None, None, :].astype(np.float64) * scale[None, :, None, None]
    expected = u.reshape(3, 2, 6, 70).astype(np.float64) < prob
    got = cuda_encode.unpack_spike_bits(to_host(spikes), 70)
    np.testing.assert_array_equal(got, expected)
    assert not got[..., :5].any()
    assert got[:, 1].mean() > got[:, 0].mean()  # the boosted presentation fires more
