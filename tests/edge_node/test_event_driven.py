"""The event-driven trainer against the per-step reference: same spikes, same weights."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node import event_driven, trainer
from edge_node.reference import train_reference
from estdp.params import BINDSNET, PAPER

# Equal spikes are expected, not just likely: both paths decide threshold crossings in
# float64 and differ by ~1e-12 mV, far below any margin random inputs produce.


def _images(n, seed=0):
    """Digit-sized images: a random blob of ~150 non-zero pixels each."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for img in images:
        r, c = rng.integers(6, 16, size=2)
        patch = rng.integers(0, 256, size=(12, 12)) * (rng.random((12, 12)) < 0.9)
        img[r : r + 12, c : c + 12] = patch
    return images


def _compare(weights, thetas, images, params, seed):
    fast = trainer.train(weights, thetas, images, params, rng=np.random.default_rng(seed))
    w, th, counts = train_reference(
        weights, thetas, images, params, rng=np.random.default_rng(seed)
    )
    assert counts.sum() > 0
    assert np.array_equal(fast.spike_counts, counts)
    np.testing.assert_allclose(fast.weights, w, atol=1e-5)
    np.testing.assert_allclose(fast.thetas, th, atol=1e-5)
    return fast


def test_fresh_weights_match_the_reference():
    w, th = trainer.init_weights(12, BINDSNET, np.random.default_rng(1))
    images = _images(10)
    images[3] = 0  # a blank image: no input, no spike, only normalisation and decay
    fast = _compare(w, th, images, BINDSNET, seed=2)
    assert fast.spike_counts[3].sum() == 0


def test_partially_trained_weights_match_the_reference():
    w, th = trainer.init_weights(16, BINDSNET, np.random.default_rng(3))
    warm = trainer.train(w, th, _images(60, seed=4), BINDSNET, rng=np.random.default_rng(5))
    assert warm.thetas.max() > 0.5  # thresholds have adapted
    fast = _compare(warm.weights, warm.thetas, _images(10, seed=6), BINDSNET, seed=7)
    assert fast.spike_counts.sum() >= 10


def test_mnist_trained_network_matches_the_reference(mnist_dir):
    from estdp.datasets import load_mnist

    images, _ = load_mnist("train", mnist_dir, limit=205, download=False)
    w, th = trainer.init_weights(100, BINDSNET, np.random.default_rng(19))
    warm = trainer.train(w, th, images[:200], BINDSNET, rng=np.random.default_rng(20))
    fast = _compare(warm.weights, warm.thetas, images[200:], BINDSNET, seed=21)
    assert (fast.spike_counts.sum(axis=1) > 0).all()


def test_paper_preset_with_re_presentations_matches_the_reference():
    params = PAPER.replace(min_spikes=25, max_presentations=3)
    w, th = trainer.init_weights(10, params, np.random.default_rng(8))
    fast = _compare(w, th, _images(4, seed=9), params, seed=10)
    assert fast.presentations > fast.images_seen


def test_tight_weight_bounds_match_the_reference():
    # w_max below what normalisation produces: columns get clipped at every image start;
    # w_min above 0: depression reaches the floor inside windows.
    params = BINDSNET.replace(w_min=0.002, w_max=0.3, norm=150.0)
    w, th = trainer.init_weights(12, params, np.random.default_rng(22))
    first = trainer.train(w, th, _images(1, seed=23), params, rng=np.random.default_rng(24))
    assert (first.weights > params.w_max).any()  # normalised past w_max: clipped next image
    warm = trainer.train(w, th, _images(30, seed=23), params, rng=np.random.default_rng(24))
    _compare(warm.weights, warm.thetas, _images(8, seed=25), params, seed=26)


def test_depression_stronger_than_potentiation_matches_the_reference():
    # nu_pre > nu_post: a spiker's own change can lower a weight, so the floor after it
    # is needed (with nu_post > nu_pre it is skipped).
    params = BINDSNET.replace(nu_pre=0.2, nu_post=1e-2, w_min=0.05)
    w, th = trainer.init_weights(10, params, np.random.default_rng(27))
    _compare(w, th, _images(6, seed=28), params, seed=29)


@pytest.mark.parametrize("steps", [9, 37, 100])
def test_presentation_lengths_off_the_chunk_grid_match_the_reference(steps):
    # windows, blocks (16) and chunks (32) that do not divide the presentation; stronger
    # input so that even 9 steps see spikes
    params = BINDSNET.replace(time_steps=steps, intensity=400.0)
    w, th = trainer.init_weights(10, params, np.random.default_rng(30 + steps))
    _compare(w, th, _images(6, seed=31), params, seed=32)


def test_without_one_spike_matches_the_reference():
    params = BINDSNET.replace(one_spike=False)
    w, th = trainer.init_weights(10, params, np.random.default_rng(11))
    _compare(w, th, _images(4, seed=12), params, seed=13)


def test_unsupported_parameters_fall_back_to_the_reference():
    params = BINDSNET.replace(refrac=1)
    assert not event_driven.supported(params, np.zeros(3))
    w, th = trainer.init_weights(8, params, np.random.default_rng(14))
    _compare(w, th, _images(3, seed=15), params, seed=16)


@pytest.mark.parametrize(
    ("changes", "thetas", "ok"),
    [
        ({}, [0.0, 30.0], True),
        ({"refrac": 1}, [0.0], False),
        ({"inh_strength": -1.0}, [0.0], False),
        ({"w_min": -0.1}, [0.0], False),
        ({}, [-9.0], False),  # reset -60 >= threshold -52 - 9
    ],
)
def test_supported(changes, thetas, ok):
    assert event_driven.supported(BINDSNET.replace(**changes), np.array(thetas)) is ok


def test_present_updates_only_the_columns_that_spiked():
    params = BINDSNET
    rng = np.random.default_rng(17)
    w = rng.random((784, 20)) * 0.3
    w32 = w.astype(np.float32)
    before = w.copy()
    drawn = event_driven_presentation(rng)
    thetas, counts, changed = event_driven.present(
        w, w32, np.zeros(20), drawn, params, event_driven.tables(params)
    )
    moved = np.flatnonzero((w != before).any(axis=0))
    assert set(moved) <= set(changed.tolist())
    assert set(np.flatnonzero(counts)) == set(changed.tolist())
    assert np.array_equal(w32, w.astype(np.float32))
    assert (thetas[counts > 0] > 0).all()


def event_driven_presentation(rng):
    from edge_node.encoding import draw_presentation

    return draw_presentation(_images(1, seed=18)[0], BINDSNET, rng)


@pytest.mark.parametrize("rows", [1, 2, 3, 31, 250, 350])
def test_cumulative_max_equals_numpy_accumulate(rows):
    rng = np.random.default_rng(rows)
    x = np.where(rng.random((rows, 7)) < 0.1, rng.random((rows, 7)) * 1e3, 0.0)
    expected = np.maximum.accumulate(x, axis=0)
    assert np.array_equal(event_driven._cumulative_max(x.copy()), expected)
