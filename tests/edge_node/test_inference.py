"""Batched inference with frozen weights against the reference, and its contract."""

from __future__ import annotations

import numpy as np

from edge_node import inference, trainer
from edge_node.encoding import draw_presentation
from edge_node.reference import run_image
from estdp.params import BINDSNET


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 784), dtype=np.uint8)
    for img in images:
        on = rng.choice(784, 160, replace=False)
        img[on] = rng.integers(1, 256, 160)
    return images


def test_batched_simulation_matches_the_reference_spike_for_spike():
    params = BINDSNET
    rng = np.random.default_rng(1)
    w, _ = trainer.init_weights(15, params, rng)
    thetas = rng.random(15) * 5
    images = _images(5)
    drawn = [
        draw_presentation(img, params, np.random.default_rng(10 + i))
        for i, img in enumerate(images)
    ]
    dense = np.stack([d.dense(784) for d in drawn], axis=1).astype(np.float64)  # (T, B, 784)
    choices = np.stack([d.choices for d in drawn], axis=1)

    counts = inference.simulate(
        w.astype(np.float64),
        params.v_thresh + thetas,
        len(images),
        lambda t: (dense[t], choices[t]),
        params,
        dtype=np.float64,
    )
    for b, d in enumerate(drawn):
        ref = run_image(w, thetas, d.dense(784), d.choices, params, learning=False)
        assert counts[b].tolist() == ref.spikes.sum(axis=0).tolist()
    assert counts.sum() > 0


def test_spike_counts_shape_and_batching_do_not_change_the_statistics():
    params = BINDSNET
    w, th = trainer.init_weights(20, params, np.random.default_rng(2))
    images = _images(12, seed=3).reshape(12, 28, 28)
    one = inference.spike_counts(w, th, images, params, rng=np.random.default_rng(4), batch_size=5)
    assert one.shape == (12, 20)
    assert one.dtype == np.int32
    assert (one.sum(axis=1) > 0).all()
    again = inference.spike_counts(
        w, th, images, params, rng=np.random.default_rng(4), batch_size=5
    )
    assert np.array_equal(one, again)


def test_frozen_weights_are_not_modified():
    params = BINDSNET
    w, th = trainer.init_weights(5, params, np.random.default_rng(5))
    before = w.copy()
    inference.spike_counts(w, th, _images(2), params, rng=np.random.default_rng(6))
    assert np.array_equal(w, before)
