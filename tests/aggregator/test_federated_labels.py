"""Federated label assignment: pooling the nodes' label statistics, on hand-made numbers."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.federated_labels import pool, relabel, with_labels_note
from edge_node.daemon import label_statistics
from edge_node.labels import assign_labels
from estdp.errors import ConfigError, MergeError
from estdp.lineage import class_counts, parent_tag
from estdp.model import new_model
from estdp.params import NetworkParams
from estdp.protocol import LABELS_FEDERATED, LABELS_KEPT, global_labels

# Two skewed nodes, two classes, three neurons. Node A holds 90 images of class 0 and 10
# of class 1, node B the other way round. Neuron 0 fires 1.0 per class-0 image on A and
# 3.0 on B; never on class 1 on A, 1.5 per class-1 image on B. Neuron 1 never fires.
# Neuron 2 only fires for class 1 (A only).
A_COUNTS = np.array([90, 10])
A_SUMS = np.array([[90.0, 0.0, 0.0], [0.0, 0.0, 20.0]])
B_COUNTS = np.array([10, 90])
B_SUMS = np.array([[30.0, 0.0, 0.0], [135.0, 0.0, 0.0]])


def test_pooling_weighs_each_class_by_its_images_on_skewed_nodes() -> None:
    pooled = pool([(A_COUNTS, A_SUMS), (B_COUNTS, B_SUMS)])
    # rates[c, j] = (S_A + S_B)[c, j] / (n_A + n_B)[c]: 100 images of each class in all.
    np.testing.assert_allclose(pooled.class_rates, [[1.2, 0.0, 0.0], [1.35, 0.0, 0.2]], rtol=1e-6)
    # Neuron 0 is a class-1 neuron over the fleet, although the mean of the two nodes'
    # own rates, (1.0 + 3.0) / 2 = 2.0 for class 0 against (0 + 1.5) / 2 = 0.75, says 0.
    assert pooled.labels.tolist() == [1, -1, 1]
    assert pooled.labels.dtype == np.int16 and pooled.class_rates.dtype == np.float32
    assert pooled.class_counts.tolist() == [100, 100]
    assert (pooled.nodes, pooled.images) == (2, 200)
    naive = (A_SUMS / A_COUNTS[:, None] + B_SUMS / B_COUNTS[:, None]) / 2
    assert naive[:, 0].argmax() == 0  # what ignoring the counts would have said


def test_a_class_no_node_has_scores_zero_and_ties_take_the_lowest_class() -> None:
    counts = np.array([4, 0, 4])
    sums = np.array([[8.0, 2.0], [0.0, 0.0], [8.0, 1.0]])
    pooled = pool([(counts, sums)])
    np.testing.assert_array_equal(pooled.class_rates, [[2.0, 0.5], [0.0, 0.0], [2.0, 0.25]])
    assert pooled.labels.tolist() == [0, 0]  # neuron 0: a tie between 0 and 2


def test_pooled_statistics_equal_assign_labels_on_all_the_images_together() -> None:
    rng = np.random.default_rng(3)
    n_classes, n_neurons = 10, 40
    spikes, labels, stats = [], [], []
    for size, skew in ((300, 0.2), (120, 3.0), (40, 0.05)):  # unequal, non-IID shards
        y = rng.choice(n_classes, size, p=rng.dirichlet(np.full(n_classes, skew)))
        counts = rng.poisson(rng.random(n_neurons) * 3, (size, n_neurons)).astype(np.float64)
        counts[:, 5] = 0  # a neuron that never fires anywhere
        spikes.append(counts)
        labels.append(y)
        stats.append(label_statistics(counts, y, n_classes))
    pooled = pool(stats)
    want_labels, want_rates = assign_labels(np.concatenate(spikes), np.concatenate(labels))
    np.testing.assert_array_equal(pooled.labels, want_labels)
    np.testing.assert_allclose(pooled.class_rates, want_rates, rtol=1e-6)
    assert pooled.labels[5] == -1
    assert pooled.images == 460


def test_label_statistics_of_one_node() -> None:
    spikes = np.array([[1, 0], [3, 2], [0, 5]])
    counts, sums = label_statistics(spikes, np.array([2, 0, 2]), 3)
    assert counts.tolist() == [1, 0, 2] and counts.dtype == np.int64
    np.testing.assert_array_equal(sums, [[3, 2], [0, 0], [1, 5]])
    with pytest.raises(ConfigError, match="do not match"):
        label_statistics(spikes, np.array([0, 1]), 3)


@pytest.mark.parametrize(
    ("stats", "needle"),
    [
        ([], "no label statistics"),
        ([(A_COUNTS, A_SUMS), (B_COUNTS, B_SUMS[:, :2])], "statistics 1 have shapes"),
        ([(A_COUNTS, -A_SUMS)], "negative or non-finite"),
        ([(A_COUNTS, A_SUMS * np.nan)], "negative or non-finite"),
        ([(np.array([[1, 2]]), A_SUMS)], "counts \\(C,\\)"),
    ],
)
def test_pooling_refuses_what_does_not_fit(stats, needle: str) -> None:
    with pytest.raises(MergeError, match=needle):
        pool(stats)


def model(n: int = 3):
    rng = np.random.default_rng(0)
    return new_model(
        rng.random((784, n), dtype=np.float32),
        rng.random(n, dtype=np.float32) * 0.05,
        NetworkParams(),
        node_id="aggregator",
        images_seen=200,
        seed=0,
        labels=[0, 0, 0],
        class_rates=np.zeros((10, n)),
        notes={"merge_metric": "mse"},
    )


def test_relabel_keeps_the_weights_and_notes_where_the_labels_come_from() -> None:
    counts = np.zeros(10, np.int64)
    counts[:2] = [100, 100]
    sums = np.zeros((10, 3))
    sums[:2] = A_SUMS + B_SUMS
    original = model()
    relabelled = relabel(original, pool([(counts, sums)]))
    assert relabelled.labels.tolist() == [1, -1, 1]
    assert relabelled.class_rates[1, 0] == pytest.approx(1.35)
    np.testing.assert_array_equal(relabelled.weights, original.weights)
    assert parent_tag(relabelled) == parent_tag(original)  # the nodes' statistics name it
    assert global_labels(relabelled) == LABELS_FEDERATED
    assert class_counts(relabelled).tolist() == counts.tolist()
    assert relabelled.provenance.notes["merge_metric"] == "mse"  # other notes stay
    with pytest.raises(MergeError, match="do not fit"):
        relabel(model(), pool([(A_COUNTS, A_SUMS)]))  # 2 classes for a 10-class model
    assert global_labels(with_labels_note(original, LABELS_KEPT)) == LABELS_KEPT
    with pytest.raises(ValueError):
        with_labels_note(original, "guessed")
