"""Label assignment and the two classification schemes, on hand-made counts."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node.labels import assign_labels, predict_all_activity, predict_proportion_weighting
from estdp.errors import ConfigError

# 4 images of classes 0, 0, 1, 2; 4 neurons (neuron 3 never fires).
COUNTS = np.array([[4, 0, 1, 0], [2, 0, 1, 0], [0, 3, 1, 0], [1, 1, 3, 0]])
LABELS = np.array([0, 0, 1, 2])


def test_assign_labels_uses_mean_rate_per_class():
    neuron_labels, rates = assign_labels(COUNTS, LABELS, n_classes=3)
    assert neuron_labels.dtype == np.int16
    assert neuron_labels.tolist() == [0, 1, 2, -1]
    assert rates.dtype == np.float32
    assert rates.shape == (3, 4)
    assert rates[:, 0].tolist() == [3.0, 0.0, 1.0]  # (4 + 2) / 2 images of class 0
    assert rates[:, 2].tolist() == [1.0, 1.0, 3.0]


def test_class_without_images_has_zero_rate():
    _, rates = assign_labels(COUNTS, LABELS, n_classes=5)
    assert (rates[3:] == 0).all()


def test_all_activity_averages_over_the_neurons_of_each_class():
    neuron_labels = np.array([0, 1, 1, -1])
    counts = np.array([[3, 4, 0, 9], [3, 4, 4, 9]])
    # class 0: 3; class 1: (4 + 0) / 2 = 2, then (4 + 4) / 2 = 4
    assert predict_all_activity(counts, neuron_labels, 3).tolist() == [0, 1]


def test_proportion_weighting_weights_by_class_proportion():
    neuron_labels = np.array([0, 1])
    rates = np.array([[1.0, 0.0], [1.0, 1.0]])  # neuron 0 is half class 0, half class 1
    counts = np.array([[3, 2]])
    # all activity: class 0 -> 3, class 1 -> 2; proportion weighting: 0.5 * 3 < 1.0 * 2
    assert predict_all_activity(counts, neuron_labels, 2).tolist() == [0]
    assert predict_proportion_weighting(counts, neuron_labels, rates, 2).tolist() == [1]


def test_matches_bindsnet_formulas_on_random_counts():
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, size=(50, 12))
    labels = rng.integers(0, 4, size=50)
    neuron_labels, rates = assign_labels(counts, labels, 4)
    props = rates / rates.sum(axis=0)
    expected_aa, expected_pw = [], []
    for row in counts:
        aa = [row[neuron_labels == c].mean() if (neuron_labels == c).any() else 0 for c in range(4)]
        pw = [
            (props[c] * row)[neuron_labels == c].sum() / max((neuron_labels == c).sum(), 1)
            for c in range(4)
        ]
        expected_aa.append(int(np.argmax(aa)))
        expected_pw.append(int(np.argmax(pw)))
    assert predict_all_activity(counts, neuron_labels, 4).tolist() == expected_aa
    assert predict_proportion_weighting(counts, neuron_labels, rates, 4).tolist() == expected_pw


def test_silent_image_predicts_class_zero_and_mismatched_shapes_fail():
    assert predict_all_activity(np.zeros((1, 4)), np.array([1, 2, 3, -1]), 4).tolist() == [0]
    with pytest.raises(ConfigError):
        assign_labels(COUNTS, LABELS[:2])
    with pytest.raises(ConfigError):
        assign_labels(COUNTS, np.array([0, 0, 1, 10]))
    with pytest.raises(ConfigError):
        predict_all_activity(COUNTS, np.array([0, 1]), 3)
