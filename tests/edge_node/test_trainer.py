"""The training loop: contract, a small task it must learn, and an MNIST smoke test."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node import inference, labels, trainer
from estdp.errors import ConfigError
from estdp.params import BINDSNET, PAPER


def _bars(n, rng):
    """4 classes of 28x28 images: a thick bar at the top, bottom, left or right, noisy."""
    classes = rng.integers(0, 4, size=n)
    images = np.zeros((n, 28, 28))
    for img, c in zip(images, classes, strict=True):
        lo = rng.integers(3, 6)
        span = slice(lo, lo + 5) if c in (0, 2) else slice(28 - lo - 5, 28 - lo)
        if c < 2:
            img[span, 4:24] = 255
        else:
            img[4:24, span] = 255
        img *= rng.uniform(0.6, 1.0, size=img.shape)
    return images.astype(np.uint8), classes


def test_init_weights_range_and_types():
    w, th = trainer.init_weights(7, BINDSNET, np.random.default_rng(0))
    assert w.shape == (784, 7) and w.dtype == np.float32
    assert w.min() >= 0.0 and w.max() < BINDSNET.w_init_max
    assert th.tolist() == [0.0] * 7 and th.dtype == np.float32
    with pytest.raises(ConfigError):
        trainer.init_weights(0, BINDSNET, np.random.default_rng(0))


def test_train_is_pure_reports_progress_and_normalises():
    rng = np.random.default_rng(1)
    w, th = trainer.init_weights(6, BINDSNET, rng)
    images, _ = _bars(5, rng)
    w_before, th_before = w.copy(), th.copy()
    seen = []
    result = trainer.train(w, th, images, BINDSNET, rng=rng, progress=seen.append)
    assert np.array_equal(w, w_before) and np.array_equal(th, th_before)
    assert seen == [1, 2, 3, 4, 5]
    assert result.images_seen == 5 and result.presentations == 5
    assert result.weights.dtype == np.float32 and result.thetas.dtype == np.float32
    assert result.spike_counts.shape == (5, 6) and result.spike_counts.dtype == np.int32
    np.testing.assert_allclose(result.weights.sum(axis=0), BINDSNET.norm, rtol=1e-5)
    assert (result.thetas >= 0).all() and result.thetas.max() > 0


def test_paper_preset_presents_quiet_images_again():
    rng = np.random.default_rng(2)
    params = PAPER.replace(min_spikes=1000, max_presentations=3)  # never reached
    w, th = trainer.init_weights(4, params, rng)
    images, _ = _bars(2, rng)
    result = trainer.train(w, th, images, params, rng=rng)
    assert result.presentations == 6


def test_bad_shapes_are_config_errors():
    w, th = trainer.init_weights(3, BINDSNET, np.random.default_rng(3))
    with pytest.raises(ConfigError):
        trainer.train(w, th, np.zeros((2, 10)), BINDSNET, rng=np.random.default_rng(0))
    with pytest.raises(ConfigError):
        trainer.train(w, th[:2], np.zeros((2, 784)), BINDSNET, rng=np.random.default_rng(0))
    with pytest.raises(ConfigError):
        trainer.train(w[:5], th, np.zeros((2, 784)), BINDSNET, rng=np.random.default_rng(0))


def test_learns_bars_well_above_chance():
    rng = np.random.default_rng(4)
    w, th = trainer.init_weights(16, BINDSNET, rng)
    train_x, train_y = _bars(300, rng)
    result = trainer.train(w, th, train_x, BINDSNET, rng=rng)
    counts = inference.spike_counts(result.weights, result.thetas, train_x, BINDSNET, rng=rng)
    neuron_labels, rates = labels.assign_labels(counts, train_y, n_classes=4)
    test_x, test_y = _bars(200, rng)
    test_counts = inference.spike_counts(result.weights, result.thetas, test_x, BINDSNET, rng=rng)
    all_act = labels.predict_all_activity(test_counts, neuron_labels, 4)
    prop = labels.predict_proportion_weighting(test_counts, neuron_labels, rates, 4)
    assert np.mean(all_act == test_y) > 0.85  # chance is 0.25
    assert np.mean(prop == test_y) > 0.85
    assert len(set(neuron_labels.tolist()) - {-1}) == 4  # every class has neurons


def test_mnist_smoke(mnist_dir):
    from estdp.datasets import load_mnist

    train_x, train_y = load_mnist("train", mnist_dir, limit=400, download=False)
    test_x, test_y = load_mnist("test", mnist_dir, limit=300, download=False)
    rng = np.random.default_rng(5)
    w, th = trainer.init_weights(50, BINDSNET, rng)
    result = trainer.train(w, th, train_x, BINDSNET, rng=rng)
    assert (result.spike_counts.sum(axis=1) > 0).mean() > 0.95
    counts = inference.spike_counts(result.weights, result.thetas, train_x, BINDSNET, rng=rng)
    neuron_labels, rates = labels.assign_labels(counts, train_y)
    test_counts = inference.spike_counts(result.weights, result.thetas, test_x, BINDSNET, rng=rng)
    accuracy = np.mean(labels.predict_all_activity(test_counts, neuron_labels, 10) == test_y)
    assert accuracy > 0.25  # chance is 0.1; about 0.34 after 400 images (0.84 after 10,000)
