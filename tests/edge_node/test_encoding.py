"""Input encoding: Bernoulli spike trains at the Poisson rate of each pixel."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node.encoding import draw_presentation, spike_probability
from estdp.params import BINDSNET


def test_probability_is_rate_times_step():
    p = spike_probability(np.array([0, 51, 255]), BINDSNET)
    assert p.tolist() == pytest.approx([0.0, 0.2 * 0.128, 0.128])
    assert spike_probability(np.array([255]), BINDSNET, 63.75)[0] == pytest.approx(0.06375)


def test_only_non_zero_pixels_are_drawn_and_dense_puts_them_back():
    image = np.zeros((28, 28), dtype=np.uint8)
    image[3, 4] = 255
    image[10, 10] = 128
    drawn = draw_presentation(image, BINDSNET, np.random.default_rng(0))
    assert drawn.active.tolist() == [3 * 28 + 4, 10 * 28 + 10]
    assert drawn.spikes.shape == (250, 2)
    assert drawn.choices.shape == (250,)
    dense = drawn.dense(784)
    assert dense.shape == (250, 784)
    assert dense.sum() == drawn.spikes.sum()
    assert np.array_equal(dense[:, 3 * 28 + 4], drawn.spikes[:, 0])


def test_spike_rate_matches_the_probability():
    image = np.full(784, 255, dtype=np.uint8)
    drawn = draw_presentation(image, BINDSNET.replace(time_steps=2000), np.random.default_rng(1))
    rate = drawn.spikes.mean()
    assert rate == pytest.approx(0.128, abs=0.003)  # 1.6M trials: sd ~ 2.6e-4


def test_same_seed_same_presentation():
    image = np.arange(784) % 256
    a = draw_presentation(image, BINDSNET, np.random.default_rng(7))
    b = draw_presentation(image, BINDSNET, np.random.default_rng(7))
    assert np.array_equal(a.spikes, b.spikes)
    assert np.array_equal(a.choices, b.choices)


def test_float32_comparison_is_the_float64_comparison():
    from edge_node.encoding import _float32_bound

    rng = np.random.default_rng(2)
    p = rng.random(20000) * 0.13
    bound = _float32_bound(p)
    nearest = p.astype(np.float32)
    # the uniforms most likely to disagree: the float32 neighbours of each p
    for u in (nearest, np.nextafter(nearest, np.float32(0)), np.nextafter(nearest, np.float32(1))):
        assert np.array_equal(u < bound, u.astype(np.float64) < p)
