"""The merge pipeline: the fast path removes exactly what the slow reference removes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from aggregator import selection
from aggregator.concat import concatenate
from aggregator.genetic import GAConfig
from aggregator.merge import STAGES, merge, plan_removal
from aggregator.removal import RULES, rule_strength
from aggregator.selection import initial_k, max_candidates
from aggregator.similarity import METRICS
from estdp.errors import ConfigError, MergeError
from estdp.model import Provenance, SubModel, load_model, save_model
from estdp.params import NetworkParams


def _reference():
    name = "estdp_test_aggregator_slow_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("slow_reference.py")
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


ref = _reference()


def sub_model(node: str, weights: np.ndarray, seed: int) -> SubModel:
    rng = np.random.default_rng(seed)
    n = weights.shape[1]
    return SubModel(
        weights=np.asarray(weights, np.float32),
        thetas=(rng.random(n) * 0.2).astype(np.float32),
        labels=rng.integers(0, 10, n).astype(np.int16),
        class_rates=rng.random((10, n)).astype(np.float32),
        params=NetworkParams(),
        provenance=Provenance(node_id=node, images_seen=1000, seed=seed, sources=(node,)),
        origin_node=np.zeros(n, np.int32),
        origin_index=np.arange(n, dtype=np.int32),
    )


def _weights(kind: str) -> list[np.ndarray]:
    rng = np.random.default_rng(11 if kind == "random" else 12)
    if kind == "random":
        parts = [rng.random((784, 24), dtype=np.float32) * 0.3 for _ in range(4)]
    else:
        parts = ref.trained_like(4, 24, rng)
    # Ties across models: a neuron copied into another model, twice.
    parts[2][:, 5] = parts[0][:, 3]
    parts[3][:, 7] = parts[0][:, 3]
    return parts


_PAIRS: dict[tuple[str, str], list] = {}


def _sorted_pairs(kind: str, metric: str, weights: np.ndarray) -> list:
    if (kind, metric) not in _PAIRS:
        _PAIRS[kind, metric] = ref.sorted_pairs(weights, metric)
    return _PAIRS[kind, metric]


@pytest.mark.parametrize("kind", ["random", "trained"])
@pytest.mark.parametrize("metric", METRICS)
def test_fast_path_removes_exactly_what_the_reference_removes(kind, metric):
    models = [sub_model(f"n{i}", w, i) for i, w in enumerate(_weights(kind))]
    whole = concatenate(models)
    n = whole.n_neurons
    pairs = _sorted_pairs(kind, metric, whole.weights)
    for rule in RULES:
        strength = rule_strength(rule, whole.thetas, whole.class_rates)
        for target in (80, 40, 5):
            want = ref.walk(pairs, n, target, strength)
            plan = plan_removal(whole.weights, target, metric, strength=strength, threads=2)
            assert plan.removed.tolist() == want, (rule, target)
            assert plan.keep.tolist() == sorted(set(range(n)) - set(want))


@pytest.mark.parametrize("metric", METRICS)
def test_a_short_selection_is_enlarged_and_stays_exact(metric):
    weights = np.concatenate(_weights("trained"), axis=1)
    want = ref.walk(_sorted_pairs("trained", metric, weights), weights.shape[1], 20)
    plan = plan_removal(weights, 20, metric, k=10, threads=1)
    assert plan.passes > 1
    assert plan.removed.tolist() == want


_HIGH: dict[str, tuple[np.ndarray, list]] = {}


def _high_fraction(metric: str) -> tuple[np.ndarray, list]:
    """500 trained-like neurons and the reference's order of their pairs (cached)."""
    if metric not in _HIGH:
        rng = np.random.default_rng(21)
        weights = np.concatenate(ref.trained_like(5, 100, rng), axis=1)
        _HIGH[metric] = weights, ref.sorted_pairs(weights, metric)
    return _HIGH[metric]


@pytest.mark.parametrize("metric", METRICS)
def test_removing_94_percent_matches_the_reference(metric, monkeypatch):
    # 500 -> 30: the candidate count the walk would need (initial_k) is far above the
    # cap, so the selection is capped; with a tiny cap the walk must continue in later
    # passes over the survivors, and still remove exactly what the reference removes.
    weights, pairs = _high_fraction(metric)
    strength = np.random.default_rng(5).random(500)
    assert initial_k(500, 470) == max_candidates(500) < 124_750
    for s in (None, strength):
        want = ref.walk(pairs, 500, 30, s)
        plan = plan_removal(weights, 30, metric, strength=s, threads=2)
        assert plan.removed.tolist() == want
        assert plan.candidates <= max_candidates(500)
        monkeypatch.setattr(selection, "MIN_CANDIDATE_CAP", 300)
        monkeypatch.setattr(selection, "CANDIDATES_PER_NEURON", 0)
        small = plan_removal(weights, 30, metric, strength=s, threads=2)
        monkeypatch.undo()
        assert small.passes > 1
        if metric != "manhattan":
            # (With 8-bit Manhattan bounds, 300 pairs may certify none; that pass is
            # then enlarged.)
            assert small.candidates <= 300
        assert small.removed.tolist() == want


def test_identical_neurons_go_first():
    rng = np.random.default_rng(3)
    w = rng.random((784, 30), dtype=np.float32)
    w[:, 20] = w[:, 4]
    w[:, 25] = w[:, 9]
    for metric in METRICS:
        plan = plan_removal(w, 28, metric)
        assert plan.removed.tolist() == [20, 25], metric


@pytest.mark.parametrize("metric", ["cosine", "correlation"])
def test_zero_and_constant_neurons_merge_without_nan(metric):
    rng = np.random.default_rng(4)
    w = rng.random((784, 12), dtype=np.float32)
    w[:, 3] = 0.0
    w[:, 6] = 0.0
    w[:, 8] = 0.5
    plan = plan_removal(w, 6, metric)
    want = ref.removal_order(w, 6, metric)
    assert plan.removed.tolist() == want
    # Zero (and, for correlation, constant) neurons have 0 similarity with everything,
    # so two all-zero neurons are not taken for copies: their pairs come last.
    assert {3, 6}.isdisjoint(want)
    if metric == "correlation":
        assert 8 not in want


def test_merge_returns_a_valid_model_and_a_report():
    models = [sub_model(f"n{i}", w, i) for i, w in enumerate(_weights("trained"))]
    merged, report = merge(models, 50, "mse", rule="theta", seed=3, round=4)
    assert merged.n_neurons == 50
    assert report.neurons_in == 96 and report.neurons_out == 50 and report.inputs == 4
    assert report.removed.size == 46 and report.labels == "kept"
    assert set(STAGES) <= set(report.seconds)
    assert all(v >= 0 for v in report.seconds.values())
    assert report.candidates <= report.pairs == 96 * 95 // 2
    assert merged.provenance.sources == ("n0", "n1", "n2", "n3")
    assert merged.provenance.round == 4
    assert merged.provenance.notes["merge_metric"] == "mse"
    assert merged.provenance.notes["merge_rule"] == "theta"
    # Each kept neuron is the one its origin says, with its own label.
    for j in range(merged.n_neurons):
        src = models[merged.origin_node[j]]
        k = merged.origin_index[j]
        np.testing.assert_array_equal(merged.weights[:, j], src.weights[:, k])
        assert merged.labels[j] == src.labels[k]
    record = report.to_dict()
    assert record["removed"] == 46 and record["metric"] == "mse"


def test_merged_model_survives_the_file_format(tmp_path):
    models = [sub_model(f"n{i}", w, i) for i, w in enumerate(_weights("random"))]
    merged, _ = merge(models, 40, "cosine")
    path = tmp_path / "merged.estdp"
    save_model(merged, path)
    back = load_model(path)
    np.testing.assert_array_equal(back.weights, merged.weights)
    np.testing.assert_array_equal(back.origin_index, merged.origin_index)


def test_target_at_or_above_the_size_removes_nothing():
    models = [sub_model("a", _weights("random")[0], 0)]
    for target in (24, 100):
        merged, report = merge(models, target, "manhattan")
        assert merged.n_neurons == 24 and report.removed.size == 0


@pytest.mark.parametrize("target", [0, -3])
def test_target_below_one_is_refused(target):
    models = [sub_model("a", _weights("random")[0], 0)]
    with pytest.raises(MergeError, match=f"target must be >= 1 neuron, got {target}"):
        merge(models, target, "mse")


def test_nan_weights_are_refused():
    w = _weights("random")[0].copy()
    w[10, 2] = np.nan
    with pytest.raises(MergeError, match="NaN"):
        merge([sub_model("a", w, 0)], 10, "mse")


def test_unknown_metric_or_rule():
    models = [sub_model("a", _weights("random")[0], 0)]
    with pytest.raises(ConfigError, match="unknown merge metric 'l2'"):
        merge(models, 10, "l2")
    with pytest.raises(ConfigError, match="unknown removal rule"):
        merge(models, 10, "mse", rule="oldest")


def test_ga_needs_a_validation_set_or_a_fitness():
    models = [sub_model("a", _weights("random")[0], 0)]
    with pytest.raises(MergeError, match="validation"):
        merge(models, 10, "ga")


def test_ga_with_an_injected_fitness():
    models = [sub_model(f"n{i}", w, i) for i, w in enumerate(_weights("trained"))]
    value = np.random.default_rng(0).random(96)

    def fitness(keep: np.ndarray) -> float:
        return float(value[keep].sum())

    config = GAConfig(population=8, generations=15, seed=1)
    merged, report = merge(models, 40, "ga", ga=config, fitness=fitness)
    assert merged.n_neurons == 40
    assert report.genetic is not None
    assert report.genetic.fitness >= report.genetic.seed_fitness
    assert report.rule == "all"
    assert "genetic" in report.seconds and report.seconds["similarity"] > 0
    again, _ = merge(models, 40, "ga", ga=config, fitness=fitness)
    np.testing.assert_array_equal(again.origin_index, merged.origin_index)
