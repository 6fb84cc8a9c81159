"""Genetic search for the neurons to keep (the seed's GA, metric ``ga``).

An individual is a *keep-set*: the sorted indices of exactly ``target`` of the ``n``
neurons of the concatenated model. Its fitness is an accuracy on a labelled validation
set (drawn from the training images), supplied as a callable, so that the search itself
is pure and testable with a cheap fake.

One generation, for a population of P (seeded with the similarity-based keep-sets and
mutants of them):

- elitism: the ``elite`` best individuals pass unchanged;
- selection: each parent is the best of ``tournament`` individuals drawn at random;
- crossover (probability ``crossover_rate``): the child keeps the neurons both parents
  keep, and fills up to ``target`` with neurons drawn from those only one parent keeps
  (there are always enough: ``|A \\ B| = |B \\ A| = target - |A & B|``);
- mutation: swap ``1 + Poisson(mutation_swaps - 1)`` kept neurons for removed ones.

Both operators preserve the size, so every individual keeps exactly ``target`` neurons.
The search stops after ``generations`` generations or when ``time_budget_s`` has passed,
whichever comes first (checked between evaluations). All randomness comes from one
``numpy.random.Generator`` seeded with ``seed``: with the same inputs and the same number
of generations the result is the same (a wall-time stop can end it earlier on a slower
machine; :attr:`GAResult.generations` says how far it got).

Fitness by simulation is expensive: every candidate is a different network (lateral
inhibition couples the neurons). :func:`surrogate_fitness` instead simulates the
concatenated network once and scores a keep-set from those spike counts restricted to
its columns; a neuron that loses its rivals would fire more in the pruned network, so
images whose kept neurons are all silent fall back to the neuron with the strongest
input drive ``x.w_j / (v_thresh + theta_j - v_rest)``. :func:`evolve` optionally
re-scores the best few keep-sets with an exact fitness (:func:`network_fitness`) and
returns the best by that; docs/merge.md reports how well the surrogate ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from estdp.errors import ConfigError, MergeError
from estdp.model import SubModel

Fitness = Callable[[np.ndarray], float]
N_CLASSES = 10


@dataclass(frozen=True)
class GAConfig:
    """Budget and operators of the genetic search."""

    population: int = 32
    generations: int = 100
    time_budget_s: float = 600.0
    elite: int = 2
    tournament: int = 3
    crossover_rate: float = 0.9
    mutation_swaps: float = 2.0  # mean swaps per mutation, >= 1
    seed: int = 0
    verify_top: int = 4  # keep-sets re-scored by the exact fitness, when one is given

    def __post_init__(self) -> None:
        if self.population < 2:
            raise ConfigError(f"GA population must be >= 2, got {self.population}")
        if self.generations < 0:
            raise ConfigError(f"GA generations must be >= 0, got {self.generations}")
        if not self.time_budget_s > 0:
            raise ConfigError(f"GA time budget must be > 0 s, got {self.time_budget_s}")
        if not 0 <= self.elite < self.population:
            raise ConfigError(f"GA elite must lie in [0, population), got {self.elite}")
        if self.tournament < 1:
            raise ConfigError(f"GA tournament size must be >= 1, got {self.tournament}")
        if not 0.0 <= self.crossover_rate <= 1.0:
            raise ConfigError(f"GA crossover rate must lie in [0, 1], got {self.crossover_rate}")
        if self.mutation_swaps < 1.0:
            raise ConfigError(f"GA mutation swaps must be >= 1, got {self.mutation_swaps}")
        if self.verify_top < 1:
            raise ConfigError(f"GA verify_top must be >= 1, got {self.verify_top}")


@dataclass(frozen=True)
class GAResult:
    """The keep-set found and how the search went."""

    keep: np.ndarray  # (target,) sorted int64
    fitness: float  # by the search fitness
    verified: float | None  # by the exact fitness, when one was given
    seed_fitness: float  # best search fitness among the seeds
    generations: int
    evaluations: int
    stopped: str  # "generations" or "time"
    seconds: float
    history: tuple[float, ...] = field(default=())  # best fitness after each generation

    def to_dict(self) -> dict[str, Any]:
        return {
            "fitness": self.fitness,
            "verified": self.verified,
            "seed_fitness": self.seed_fitness,
            "generations": self.generations,
            "evaluations": self.evaluations,
            "stopped": self.stopped,
            "seconds": self.seconds,
        }


def _normalise(keep: Any, n: int, target: int) -> np.ndarray:
    arr = np.unique(np.asarray(keep, dtype=np.int64))
    if arr.shape[0] != target or arr[0] < 0 or arr[-1] >= n:
        raise MergeError(
            f"a seed keep-set must hold {target} distinct neurons in [0, {n}), got {np.asarray(keep).shape[0]}"
        )
    return arr


def _mutate(keep: np.ndarray, n: int, swaps: int, rng: np.random.Generator) -> np.ndarray:
    removed = np.setdiff1d(np.arange(n), keep, assume_unique=True)
    swaps = min(swaps, keep.shape[0], removed.shape[0])
    if swaps == 0:
        return keep
    out = keep.copy()
    out[rng.choice(keep.shape[0], swaps, replace=False)] = rng.choice(removed, swaps, replace=False)
    return np.sort(out)


def _crossover(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    common = np.intersect1d(a, b, assume_unique=True)
    either = np.setxor1d(a, b, assume_unique=True)
    fill = rng.choice(either, a.shape[0] - common.shape[0], replace=False)
    return np.sort(np.concatenate((common, fill)))


def evolve(
    n: int,
    target: int,
    fitness: Fitness,
    seeds: Sequence[Any],
    config: GAConfig = GAConfig(),
    *,
    verify: Fitness | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> GAResult:
    """Evolve keep-sets of ``target`` of ``n`` neurons that maximise ``fitness``.

    Parameters
    ----------
    n, target
        Neurons in the concatenated model, and how many to keep (1 <= target <= n).
    fitness
        Maps a sorted int64 keep-set to a score (higher is better); called once per
        distinct keep-set.
    seeds
        Keep-sets to start from (e.g. those of the similarity metrics); at least one.
    config
        Budget and operators. ``time_budget_s`` covers the search and the verification.
    verify
        Optional exact fitness. The best seed is re-scored with it before the search
        (which also measures its cost, reserved for later); after the search, the
        ``config.verify_top`` best keep-sets by ``fitness``, in that order, while time
        is left (the first always). The best by it is returned (ties: the better search
        fitness, then the earlier).
    clock
        Seconds, for the time budget (injectable for tests).

    Returns
    -------
    GAResult
    """
    if not 1 <= target <= n:
        raise MergeError(f"target must lie in [1, {n}], got {target}")
    if len(seeds) == 0:
        raise MergeError("the genetic search needs at least one seed keep-set")
    start = clock()
    deadline = start + config.time_budget_s
    rng = np.random.default_rng(config.seed)
    cache: dict[bytes, float] = {}
    order: list[bytes] = []  # first-evaluation order: ties go to the earlier keep-set
    sets: dict[bytes, np.ndarray] = {}
    out_of_time = False
    reserve = 0.0  # time kept for verifying the search's best

    def score(keep: np.ndarray) -> float:
        nonlocal out_of_time
        tag = keep.tobytes()
        if tag not in cache:
            cache[tag] = float(fitness(keep))
            order.append(tag)
            sets[tag] = keep
            if clock() > deadline - reserve:
                out_of_time = True
        return cache[tag]

    seed_sets = []
    for s in seeds:
        keep = _normalise(s, n, target)
        if not any(np.array_equal(keep, t) for t in seed_sets):
            seed_sets.append(keep)
    population = list(seed_sets[: config.population])
    while len(population) < config.population:
        parent = seed_sets[int(rng.integers(len(seed_sets)))]
        population.append(_mutate(parent, n, _swaps(config, rng), rng))
    fits = [score(k) for k in population]
    seed_fitness = max(cache[s.tobytes()] for s in seed_sets[: config.population])
    best_seed = max(seed_sets[: config.population], key=lambda s: cache[s.tobytes()])
    checked: list[tuple[float, float, int, bytes]] = []
    if verify is not None:
        # The best seed first, so that the result never simulates worse than it.
        t0 = clock()
        checked.append(
            (float(verify(best_seed)), cache[best_seed.tobytes()], 0, best_seed.tobytes())
        )
        reserve = config.verify_top * (clock() - t0)
        out_of_time = clock() > deadline - reserve

    history: list[float] = []
    generation = 0
    while generation < config.generations and not out_of_time:
        ranked = np.argsort(-np.asarray(fits), kind="stable")
        children = [population[i] for i in ranked[: config.elite]]
        while len(children) < config.population:
            a = _tournament(population, fits, config.tournament, rng)
            if rng.random() < config.crossover_rate:
                child = _crossover(a, _tournament(population, fits, config.tournament, rng), rng)
            else:
                child = a
            children.append(_mutate(child, n, _swaps(config, rng), rng))
        population = children
        fits = [score(k) for k in population]
        generation += 1
        history.append(max(cache.values()))

    ranked_tags = sorted(order, key=lambda t: -cache[t])  # stable: earlier first on ties
    best = ranked_tags[0]
    verified = None
    if verify is not None:
        shortlist = [t for t in ranked_tags[: config.verify_top] if t != checked[0][3]]
        for i, tag in enumerate(shortlist, start=1):
            if i >= 2 and clock() > deadline:
                break
            checked.append((float(verify(sets[tag])), cache[tag], -i, tag))
        best_check = max(checked, key=lambda c: c[:3])
        verified, best = best_check[0], best_check[3]
    stopped = "time" if out_of_time and generation < config.generations else "generations"
    keep = sets[best]
    if keep.shape[0] != target:  # pragma: no cover - the operators preserve the size
        raise MergeError(f"internal error: genetic search produced {keep.shape[0]} neurons")
    return GAResult(
        keep=keep,
        fitness=cache[best],
        verified=verified,
        seed_fitness=seed_fitness,
        generations=generation,
        evaluations=len(cache),
        stopped=stopped,
        seconds=clock() - start,
        history=tuple(history),
    )


def _swaps(config: GAConfig, rng: np.random.Generator) -> int:
    return 1 + int(rng.poisson(config.mutation_swaps - 1.0))


def _tournament(
    population: list[np.ndarray], fits: list[float], size: int, rng: np.random.Generator
) -> np.ndarray:
    picks = rng.integers(len(population), size=size)
    winner = max(picks.tolist(), key=lambda i: (fits[i], -i))
    return population[winner]


# ---------------------------------------------------------------------------------------
# Fitness from the network (edge_node inference)


def flat_images(images: np.ndarray, n_input: int) -> np.ndarray:
    """Images (n, 28, 28) or (n, n_input) as (n, n_input) rows, checked against the model."""
    flat = np.asarray(images).reshape(np.asarray(images).shape[0], -1)
    if flat.shape[1] != n_input:
        raise MergeError(
            f"validation images have {flat.shape[1]} pixels; the model has {n_input} inputs"
        )
    return flat


def inference_backend(xp: ModuleType) -> Any:
    """The :class:`estdp.backend.Backend` of an array module, for edge_node.workflow.

    On the CPU that is the native C kernels when they build (the same spike counts as
    NumPy in float64, several times faster), else NumPy.
    """
    from estdp import native
    from estdp.backend import Backend

    if getattr(xp, "__name__", "") == "cupy":
        return Backend("cupy", xp)
    return Backend("native" if native.usable()[0] else "numpy", xp)


def _accuracy(counts: np.ndarray, labels: np.ndarray, truth: np.ndarray) -> float:
    from edge_node.labels import predict_all_activity

    predicted = predict_all_activity(counts, labels, N_CLASSES)
    return float(np.mean(predicted == truth)) if truth.shape[0] else 0.0


def network_fitness(
    model: SubModel,
    images: np.ndarray,
    image_labels: np.ndarray,
    *,
    xp: ModuleType = np,
    seed: int = 0,
) -> Fitness:
    """Exact fitness: all-activity accuracy of the pruned network, simulated on ``images``.

    The neurons keep their labels from ``model``; every call simulates the kept
    sub-network with the same input spike trains (``seed``).
    """
    from edge_node.workflow import spike_counts

    flat = flat_images(images, model.n_input)
    truth = np.asarray(image_labels)
    backend = inference_backend(xp)

    def fitness(keep: np.ndarray) -> float:
        counts = spike_counts(
            model.weights[:, keep], model.thetas[keep], flat, model.params, backend, seed=seed
        )
        return _accuracy(np.asarray(counts), model.labels[keep], truth)

    return fitness


def surrogate_fitness(
    model: SubModel,
    images: np.ndarray,
    image_labels: np.ndarray,
    *,
    xp: ModuleType = np,
    seed: int = 0,
    counts: np.ndarray | None = None,
) -> Fitness:
    """Cheap fitness from one simulation of the whole model (see the module docstring).

    All-activity prediction from the full model's spike counts restricted to the kept
    neurons: the class whose kept neurons fired most on average; an image on which every
    kept neuron is silent goes to the kept neuron with the strongest input drive.

    Parameters
    ----------
    model
        The concatenated model (all candidates are subsets of its neurons).
    images, image_labels
        The validation set.
    counts
        (n_images, n) spike counts of ``model`` on ``images``, when already simulated.
    """
    flat = flat_images(images, model.n_input)
    truth = np.asarray(image_labels)
    if counts is None:
        from edge_node.workflow import spike_counts

        counts = spike_counts(
            model.weights, model.thetas, flat, model.params, inference_backend(xp), seed=seed
        )
    counts32 = np.asarray(counts, dtype=np.float32)
    n = model.n_neurons
    labels = model.labels.astype(np.int64)
    classes = model.n_classes
    onehot = (labels[:, None] == np.arange(classes)).astype(np.float32)
    p = model.params
    # Time to threshold ~ (v_thresh + theta - v_rest) / drive: the first to get there wins.
    drive = (flat.astype(np.float32) @ model.weights) / (
        p.v_thresh - p.v_rest + model.thetas.astype(np.float32)
    )

    def fitness(keep: np.ndarray) -> float:
        kept = np.zeros(n, np.float32)
        kept[keep] = 1.0
        # Columns: each class's mean over its kept neurons, then the kept total.
        weights = np.empty((n, classes + 1), np.float32)
        np.multiply(onehot, kept[:, None], out=weights[:, :classes])
        weights[:, :classes] /= np.maximum(weights[:, :classes].sum(axis=0), 1.0)
        weights[:, classes] = kept
        scores = counts32 @ weights
        predicted = scores[:, :classes].argmax(axis=1)
        silent = np.flatnonzero(scores[:, classes] == 0)
        if silent.size:
            winners = np.asarray(keep)[np.argmax(drive[np.ix_(silent, keep)], axis=1)]
            predicted[silent] = np.maximum(labels[winners], 0)
        return float(np.mean(predicted == truth)) if truth.shape[0] else 0.0

    return fitness


__all__ = [
    "Fitness",
    "GAConfig",
    "GAResult",
    "evolve",
    "flat_images",
    "inference_backend",
    "network_fitness",
    "surrogate_fitness",
]
