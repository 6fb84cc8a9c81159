"""The genetic search with cheap fake fitness functions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from aggregator.genetic import GAConfig, _crossover, _mutate, evolve
from estdp.errors import ConfigError, MergeError

N, TARGET = 60, 20
VALUE = np.random.default_rng(0).random(N)


def additive(keep: np.ndarray) -> float:
    """Best keep-set: the TARGET neurons of highest value."""
    return float(VALUE[keep].sum())


def _seeds(rng_seed: int = 5, count: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(rng_seed)
    return [np.sort(rng.choice(N, TARGET, replace=False)) for _ in range(count)]


def test_same_seed_same_result():
    config = GAConfig(population=10, generations=12, seed=3)
    a = evolve(N, TARGET, additive, _seeds(), config)
    b = evolve(N, TARGET, additive, _seeds(), config)
    np.testing.assert_array_equal(a.keep, b.keep)
    assert a.history == b.history and a.evaluations == b.evaluations
    c = evolve(N, TARGET, additive, _seeds(), GAConfig(population=10, generations=12, seed=4))
    assert c.history != a.history


def test_every_individual_keeps_exactly_target_neurons():
    sizes = set()

    def checking(keep: np.ndarray) -> float:
        sizes.add(keep.shape[0])
        assert np.unique(keep).shape[0] == keep.shape[0]
        assert keep.min() >= 0 and keep.max() < N
        return additive(keep)

    result = evolve(N, TARGET, checking, _seeds(), GAConfig(population=12, generations=20, seed=1))
    assert sizes == {TARGET}
    assert result.keep.shape == (TARGET,)
    assert (np.diff(result.keep) > 0).all()


def test_search_improves_on_its_seeds_and_never_gets_worse():
    result = evolve(N, TARGET, additive, _seeds(), GAConfig(population=16, generations=40, seed=2))
    assert result.fitness > result.seed_fitness
    assert list(result.history) == sorted(result.history)
    best_possible = np.sort(VALUE)[-TARGET:].sum()
    assert result.fitness <= best_possible + 1e-9
    # Most of the gap to the optimum is closed.
    assert best_possible - result.fitness < 0.5 * (best_possible - result.seed_fitness)


def test_wall_time_budget_stops_the_search():
    ticks = iter(np.arange(0.0, 1e6, 1.0))  # every clock reading advances one "second"

    result = evolve(
        N,
        TARGET,
        additive,
        _seeds(),
        GAConfig(population=6, generations=1000, time_budget_s=30, seed=0),
        clock=lambda: float(next(ticks)),
    )
    assert result.stopped == "time"
    assert result.generations < 1000
    assert result.keep.shape == (TARGET,)


def test_verification_reports_the_exact_fitness_of_the_result():
    calls = []

    def exact(keep: np.ndarray) -> float:
        calls.append(keep)
        return additive(keep) + 0.5

    config = GAConfig(population=8, generations=5, seed=0, verify_top=3)
    result = evolve(N, TARGET, additive, _seeds(), config, verify=exact)
    assert 3 <= len(calls) <= 4  # the top three, plus the best seed when not among them
    assert result.verified == pytest.approx(result.fitness + 0.5)


def test_verification_time_is_reserved_and_bounded():
    ticks = iter(np.arange(0.0, 1e6, 1.0))  # every clock reading advances one "second"
    calls = []

    def exact(keep: np.ndarray) -> float:
        calls.append(keep)
        return additive(keep)

    config = GAConfig(population=6, generations=1000, seed=0, verify_top=4, time_budget_s=40)
    result = evolve(
        N, TARGET, additive, _seeds(), config, verify=exact, clock=lambda: float(next(ticks))
    )
    assert result.stopped == "time"
    # The best seed, then the search's best while the deadline allows (at least one).
    assert 2 <= len(calls) <= 5
    assert result.seconds <= 40 + 10


def test_the_best_seed_is_always_verified():
    seeds = _seeds()
    best_seed = max(seeds, key=additive)

    def exact(keep: np.ndarray) -> float:
        return 1.0 if np.array_equal(keep, best_seed) else 0.0

    result = evolve(
        N,
        TARGET,
        additive,
        seeds,
        GAConfig(population=8, generations=10, seed=0, verify_top=1),
        verify=exact,
    )
    np.testing.assert_array_equal(result.keep, best_seed)
    assert result.verified == 1.0


def test_operators_preserve_the_size():
    rng = np.random.default_rng(9)
    a, b = _seeds(1, 2)
    for _ in range(50):
        child = _crossover(a, b, rng)
        assert child.shape == (TARGET,) and np.unique(child).shape == (TARGET,)
        assert set(np.intersect1d(a, b)) <= set(child) <= set(a) | set(b)
        mutant = _mutate(child, N, 3, rng)
        assert mutant.shape == (TARGET,) and np.unique(mutant).shape == (TARGET,)
        assert len(set(mutant) - set(child)) == 3
    full = np.arange(N)
    np.testing.assert_array_equal(_mutate(full, N, 2, rng), full)


def test_bad_seeds_and_targets():
    with pytest.raises(MergeError, match="at least one seed"):
        evolve(N, TARGET, additive, [], GAConfig())
    with pytest.raises(MergeError, match="hold 20 distinct"):
        evolve(N, TARGET, additive, [np.arange(19)], GAConfig())
    with pytest.raises(MergeError, match="target"):
        evolve(N, 0, additive, [np.arange(1)], GAConfig())


@pytest.mark.parametrize(
    "field, value",
    [
        ("population", 1),
        ("generations", -1),
        ("time_budget_s", 0),
        ("elite", 99),
        ("tournament", 0),
        ("crossover_rate", 1.5),
        ("mutation_swaps", 0.5),
        ("verify_top", 0),
    ],
)
def test_bad_configs(field, value):
    with pytest.raises(ConfigError):
        GAConfig(**{field: value})


# ---- fitness from the network (edge_node inference), on a few real images --------------


@pytest.fixture(scope="module")
def small_network(mnist_dir):
    from estdp.datasets import load_mnist
    from estdp.model import new_model
    from estdp.params import NetworkParams

    images, labels = load_mnist("train", mnist_dir, limit=40, download=False)
    rng = np.random.default_rng(0)
    # Neurons tuned to a few training images: each fires for digits like its own.
    protos = images[rng.choice(40, 16, replace=False)].reshape(16, -1).T.astype(np.float32)
    weights = protos / protos.sum(axis=0) * 78.4 * 0.6 + 0.01
    model = new_model(
        np.clip(weights, 0, 1),
        np.zeros(16, np.float32),
        NetworkParams(),
        node_id="n",
        images_seen=40,
        seed=0,
        labels=rng.integers(0, 10, 16),
    )
    return model, images, labels


def test_surrogate_and_network_fitness_agree_on_the_whole_model(small_network):
    from aggregator.genetic import network_fitness, surrogate_fitness

    model, images, labels = small_network
    exact = network_fitness(model, images, labels, seed=3)
    cheap = surrogate_fitness(model, images, labels, seed=3)
    everything = np.arange(model.n_neurons)
    # Keeping every neuron, the surrogate sees the simulated network itself, except on
    # images where no neuron fired (there it guesses from the input drive).
    from aggregator.genetic import inference_backend
    from edge_node.workflow import spike_counts

    counts = spike_counts(
        model.weights, model.thetas, images, model.params, inference_backend(np), seed=3
    )
    silent = int((counts.sum(axis=1) == 0).sum())
    assert abs(cheap(everything) - exact(everything)) <= silent / len(images) + 1e-12
    subset = np.arange(0, 16, 2)
    for f in (exact, cheap):
        value = f(subset)
        assert 0.0 <= value <= 1.0
        assert f(subset) == value  # same input spike trains: deterministic


def test_ga_merge_with_a_validation_set(small_network):
    from aggregator.merge import LabelledImages, merge

    model, images, labels = small_network
    halves = [
        dataclasses.replace(
            model,
            weights=model.weights[:, k : k + 8].copy(),
            thetas=model.thetas[k : k + 8],
            labels=model.labels[k : k + 8],
            class_rates=model.class_rates[:, k : k + 8],
            origin_node=model.origin_node[:8],
            origin_index=model.origin_index[:8],
            provenance=dataclasses.replace(model.provenance, node_id=f"n{k}", sources=(f"n{k}",)),
        )
        for k in (0, 8)
    ]
    config = GAConfig(population=6, generations=3, seed=0, verify_top=2)
    validation = LabelledImages(images, labels, seed=2)
    merged, report = merge(
        halves, 10, "ga", validation=validation, ga=config, calibration=validation
    )
    assert merged.n_neurons == 10
    assert report.genetic is not None and report.genetic.verified is not None
    assert report.genetic.generations == 3
    assert report.labels == "calibrated"
    assert {"genetic", "labels"} <= set(report.seconds)


def test_calibration_reassigns_labels_from_responses(small_network):
    from aggregator.merge import LabelledImages, calibrate_labels

    model, images, labels = small_network
    new_labels, rates = calibrate_labels(model, LabelledImages(images, labels, seed=1))
    assert new_labels.shape == (16,) and rates.shape == (10, 16)
    fired = rates.max(axis=0) > 0
    np.testing.assert_array_equal(new_labels[fired], rates.argmax(axis=0)[fired])
    assert (new_labels[~fired] == -1).all()
