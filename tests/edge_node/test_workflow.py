"""The engine's workflows: the thresholds-only calibration pass of a merged model."""

from __future__ import annotations

import numpy as np

from edge_node import trainer
from edge_node.workflow import calibrate_thetas
from estdp.backend import resolve_backend
from estdp.model import new_model
from estdp.params import BINDSNET


def _images(n: int, seed: int) -> np.ndarray:
    """Digit-sized images: a random blob of ~150 lit pixels each."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for img in images:
        r, c = rng.integers(6, 16, size=2)
        img[r : r + 12, c : c + 12] = rng.integers(0, 256, size=(12, 12)) * (
            rng.random((12, 12)) < 0.9
        )
    return images


def _trained(n_neurons: int = 12):
    w, th = trainer.init_weights(n_neurons, BINDSNET, np.random.default_rng(1))
    return trainer.train(w, th, _images(80, seed=2), BINDSNET, rng=np.random.default_rng(3))


def test_calibration_evens_out_thresholds_of_neurons_that_compete_unequally():
    # The same 12 neurons twice, the copies 4 mV easier to fire: in one population the
    # copies win, so the pass must raise their thresholds more and close the gap.
    run = _trained()
    weights = np.concatenate([run.weights, run.weights], axis=1)
    thetas = np.concatenate([run.thetas, run.thetas - 4.0])
    merged = new_model(weights, thetas, BINDSNET, node_id="agg", images_seen=160, seed=0)
    before_w, before_t = merged.weights.copy(), merged.thetas.copy()
    after = calibrate_thetas(merged, _images(60, seed=4), resolve_backend("numpy"), seed=5)
    gap_before = float(np.mean(thetas[:12] - thetas[12:]))
    gap_after = float(np.mean(after[:12] - after[12:]))
    assert after.shape == (24,) and after.dtype == np.float64
    assert gap_before > 3.9 and gap_after < 2.0  # measured: 4.0 -> 0.38
    assert (after[12:] - thetas[12:]).sum() > (after[:12] - thetas[:12]).sum()
    # The model itself is untouched: the pass learns nothing into it.
    np.testing.assert_array_equal(merged.weights, before_w)
    np.testing.assert_array_equal(merged.thetas, before_t)


def test_calibration_is_a_training_pass_with_learning_off():
    run = _trained(8)
    model = new_model(run.weights, run.thetas, BINDSNET, node_id="n", images_seen=80, seed=0)
    images = _images(20, seed=6)
    after = calibrate_thetas(model, images, resolve_backend("numpy"), seed=7)
    frozen = BINDSNET.replace(nu_pre=0.0, nu_post=0.0)
    expected = trainer.train(
        model.weights, model.thetas, images, frozen, rng=np.random.default_rng(7)
    )
    np.testing.assert_allclose(after, expected.thetas, rtol=0, atol=1e-6)
    assert (after > model.thetas + 0.04).any()  # some neuron fired: theta_plus is 0.05
    np.testing.assert_allclose(expected.weights, model.weights, atol=1e-6)  # nothing learnt


def test_calibration_over_no_images_keeps_the_thresholds():
    run = _trained(4)
    model = new_model(run.weights, run.thetas, BINDSNET, node_id="n", images_seen=80, seed=0)
    after = calibrate_thetas(model, _images(0, seed=8), resolve_backend("numpy"))
    np.testing.assert_array_equal(after, model.thetas)
