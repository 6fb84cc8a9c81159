"""The C kernels of the native backend against the reference and the NumPy paths."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node import inference, native_kernels, trainer
from edge_node.encoding import draw_presentation
from edge_node.reference import run_image, train_reference
from estdp import native
from estdp.errors import ConfigError
from estdp.params import BINDSNET, PAPER
from tests.edge_node.test_event_driven import _images

pytestmark = pytest.mark.skipif(not native.usable()[0], reason="no working C compiler")


def _warm(n_neurons, params, seed):
    w, th = trainer.init_weights(n_neurons, params, np.random.default_rng(seed))
    warm = trainer.train(w, th, _images(40, seed), params, rng=np.random.default_rng(seed + 1))
    return warm.weights, warm.thetas


@pytest.mark.parametrize("one_spike", [True, False])
def test_one_presentation_matches_the_reference_step_for_step(one_spike):
    params = BINDSNET.replace(one_spike=one_spike)
    weights, thetas = _warm(20, params, seed=3)
    drawn = draw_presentation(_images(1, seed=9)[0], params, np.random.default_rng(4))
    ref = run_image(weights, thetas, drawn.dense(params.n_input), drawn.choices, params)

    w = np.array(weights, dtype=np.float64)
    th = np.array(thetas, dtype=np.float64)
    counts = native_kernels.present(w, th, drawn, params)

    assert counts.sum() > 0
    assert np.array_equal(counts, ref.spikes.sum(axis=0))
    np.testing.assert_allclose(th, ref.thetas, rtol=0, atol=1e-12)
    # run_image normalises; present leaves that to the trainer, and only spikers moved.
    moved = np.flatnonzero(counts)
    from edge_node.network import normalise_columns

    np.testing.assert_allclose(
        normalise_columns(w, params.norm)[:, moved], ref.weights[:, moved], atol=1e-12
    )
    untouched = np.setdiff1d(np.arange(w.shape[1]), moved)
    assert np.array_equal(w[:, untouched], np.asarray(weights, dtype=np.float64)[:, untouched])


@pytest.mark.parametrize(
    "params",
    [
        BINDSNET,
        PAPER.replace(min_spikes=25, max_presentations=3),
        BINDSNET.replace(w_min=0.002, w_max=0.3, norm=150.0),  # clips at both bounds
    ],
    ids=["bindsnet", "paper-re-presentations", "tight-bounds"],
)
def test_training_matches_the_reference_and_the_event_driven_path(params):
    w, th = trainer.init_weights(14, params, np.random.default_rng(11))
    images = _images(12, seed=12)
    fast = trainer.train(w, th, images, params, rng=np.random.default_rng(13), native=True)
    event = trainer.train(w, th, images, params, rng=np.random.default_rng(13))
    ref_w, ref_th, ref_counts = train_reference(
        w, th, images, params, rng=np.random.default_rng(13)
    )

    assert fast.spike_counts.sum() > 0
    assert np.array_equal(fast.spike_counts, ref_counts)
    assert np.array_equal(fast.spike_counts, event.spike_counts)
    assert fast.presentations == event.presentations
    np.testing.assert_allclose(fast.weights, ref_w, atol=1e-5)
    np.testing.assert_allclose(fast.thetas, ref_th, atol=1e-5)


def test_mnist_training_matches_the_event_driven_path(mnist_dir):
    from estdp.datasets import load_mnist

    images, _ = load_mnist("train", mnist_dir, limit=150, download=False)
    w, th = trainer.init_weights(60, BINDSNET, np.random.default_rng(19))
    fast = trainer.train(w, th, images, BINDSNET, rng=np.random.default_rng(20), native=True)
    event = trainer.train(w, th, images, BINDSNET, rng=np.random.default_rng(20))
    assert (fast.spike_counts.sum(axis=1) > 0).mean() > 0.9
    assert np.array_equal(fast.spike_counts, event.spike_counts)
    np.testing.assert_allclose(fast.weights, event.weights, atol=1e-6)


@pytest.mark.parametrize("one_spike", [True, False])
def test_inference_equals_the_numpy_path_in_float64(one_spike):
    params = BINDSNET.replace(one_spike=one_spike)
    weights, thetas = _warm(25, params, seed=5)
    images = _images(37, seed=6)
    ref = inference.spike_counts(
        weights, thetas, images, params, rng=np.random.default_rng(7), batch_size=16,
        dtype=np.float64,
    )  # fmt: skip
    for threads in (1, 3):
        got = native_kernels.spike_counts(
            weights, thetas, images, params, rng=np.random.default_rng(7), batch_size=16,
            threads=threads,
        )  # fmt: skip
        assert got.sum() > 0
        assert np.array_equal(got, ref)


def test_an_empty_image_and_an_empty_batch():
    weights, thetas = _warm(8, BINDSNET, seed=1)
    blank = np.zeros((3, 784), dtype=np.uint8)
    counts = native_kernels.spike_counts(
        weights, thetas, blank, BINDSNET, rng=np.random.default_rng(0)
    )
    assert counts.shape == (3, 8) and counts.sum() == 0
    none = native_kernels.spike_counts(
        weights, thetas, blank[:0], BINDSNET, rng=np.random.default_rng(0)
    )
    assert none.shape == (0, 8)


def test_the_kernels_refuse_arrays_they_cannot_use():
    weights, thetas = _warm(8, BINDSNET, seed=1)
    drawn = draw_presentation(_images(1)[0], BINDSNET, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="float64"):
        native_kernels.present(
            weights.astype(np.float32), thetas.astype(np.float64), drawn, BINDSNET
        )
    with pytest.raises(ConfigError, match="shape"):
        native_kernels.present(np.asarray(weights, np.float64), np.zeros(3), drawn, BINDSNET)
    with pytest.raises(ConfigError, match="784"):
        native_kernels.spike_counts(
            weights, thetas, np.zeros((2, 10)), BINDSNET, rng=np.random.default_rng(0)
        )
