"""Concatenation of sub-models: arrays, provenance of every neuron, refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from aggregator.concat import concatenate, take_neurons
from estdp.errors import MergeError
from estdp.model import Provenance, SubModel
from estdp.params import NetworkParams


def make_model(
    node: str,
    n: int,
    *,
    seed: int = 0,
    n_input: int = 784,
    params: NetworkParams | None = None,
    sources: tuple[str, ...] | None = None,
    origin_node: np.ndarray | None = None,
    classes: int = 10,
) -> SubModel:
    rng = np.random.default_rng(seed)
    params = params or NetworkParams(n_input=n_input)
    return SubModel(
        weights=rng.random((n_input, n), dtype=np.float32) * 0.3,
        thetas=rng.random(n, dtype=np.float32) * 0.1,
        labels=rng.integers(0, classes, n).astype(np.int16),
        class_rates=rng.random((classes, n), dtype=np.float32),
        params=params,
        provenance=Provenance(
            node_id=node, images_seen=100 * n, seed=seed, sources=sources or (node,), round=seed
        ),
        origin_node=np.zeros(n, np.int32) if origin_node is None else origin_node,
        origin_index=np.arange(n, dtype=np.int32),
    )


def test_arrays_are_joined_side_by_side():
    a, b, c = make_model("a", 3, seed=1), make_model("b", 2, seed=2), make_model("c", 4, seed=3)
    m = concatenate([a, b, c], created_unix=5.0)
    assert m.n_neurons == 9
    np.testing.assert_array_equal(m.weights, np.concatenate([a.weights, b.weights, c.weights], 1))
    np.testing.assert_array_equal(m.thetas, np.concatenate([a.thetas, b.thetas, c.thetas]))
    np.testing.assert_array_equal(m.labels, np.concatenate([a.labels, b.labels, c.labels]))
    np.testing.assert_array_equal(m.class_rates[:, 3:5], b.class_rates)
    assert m.weights.dtype == np.float32 and m.labels.dtype == np.int16


def test_provenance_says_where_every_neuron_came_from():
    a, b = make_model("node-a", 3, seed=1), make_model("node-b", 2, seed=2)
    m = concatenate([a, b], node_id="agg", seed=7)
    prov = m.provenance
    assert prov.sources == ("node-a", "node-b")
    assert prov.node_id == "agg" and prov.seed == 7
    assert prov.images_seen == 500
    assert prov.round == 2  # the largest of the inputs
    assert m.origin_node.tolist() == [0, 0, 0, 1, 1]
    assert m.origin_index.tolist() == [0, 1, 2, 0, 1]
    for j in range(m.n_neurons):
        src = [a, b][m.origin_node[j]]
        np.testing.assert_array_equal(m.weights[:, j], src.weights[:, m.origin_index[j]])


def test_a_merged_input_keeps_pointing_at_the_original_nodes():
    first = concatenate([make_model("x", 2, seed=1), make_model("y", 2, seed=2)])
    again = concatenate([make_model("y", 1, seed=3), first, make_model("z", 1, seed=4)])
    assert again.provenance.sources == ("y", "x", "z")
    assert again.origin_node.tolist() == [0, 1, 1, 0, 0, 2]
    assert again.origin_index.tolist() == [0, 0, 1, 0, 1, 0]


def test_mismatched_inputs_are_refused_with_the_values():
    a = make_model("a", 3)
    with pytest.raises(MergeError, match="n_input 100.*has 784"):
        concatenate([a, make_model("b", 3, n_input=100)])
    other = NetworkParams(nu_post=0.02)
    with pytest.raises(MergeError, match=r"nu_post=0\.02 vs 0\.01"):
        concatenate([a, make_model("b", 3, params=other)])
    with pytest.raises(MergeError, match="11 classes"):
        concatenate([a, make_model("b", 3, classes=11)])


def test_bad_inputs_are_refused():
    with pytest.raises(MergeError, match="no models"):
        concatenate([])
    with pytest.raises(MergeError, match="not a SubModel"):
        concatenate([make_model("a", 2), "b.estdp"])
    bad = make_model("b", 2)
    bad.weights[5, 1] = np.nan
    with pytest.raises(MergeError, match=r"input 1 \('b'\).*NaN"):
        concatenate([make_model("a", 2), bad])


def test_take_neurons_keeps_columns_and_provenance():
    m = concatenate([make_model("a", 3, seed=1), make_model("b", 3, seed=2)])
    sub = take_neurons(m, np.array([1, 4, 5]), notes={"merge_metric": "mse"})
    assert sub.n_neurons == 3
    np.testing.assert_array_equal(sub.weights, m.weights[:, [1, 4, 5]])
    assert sub.origin_node.tolist() == [0, 1, 1]
    assert sub.origin_index.tolist() == [1, 1, 2]
    assert sub.provenance.notes["merge_metric"] == "mse"
    assert sub.provenance.sources == m.provenance.sources
    relabelled = take_neurons(m, np.array([0, 1]), labels=np.array([7, 8]))
    assert relabelled.labels.tolist() == [7, 8]
    with pytest.raises(MergeError, match="distinct"):
        take_neurons(m, np.array([1, 1]))
    with pytest.raises(MergeError, match=r"\[0, 6\)"):
        take_neurons(m, np.array([6]))


def test_inputs_are_not_modified():
    a = make_model("a", 3, seed=1)
    before = dataclasses.replace(a, weights=a.weights.copy())
    m = concatenate([a, make_model("b", 2)])
    m.weights[:] = 0
    np.testing.assert_array_equal(a.weights, before.weights)
