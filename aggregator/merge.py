"""The merge pipeline: concatenate, measure similarity, select pairs, remove neurons.

``merge(models, target, metric)`` runs the slides' steps 2 to 4 as pure functions:

1. **concatenate** the sub-models (:mod:`aggregator.concat`);
2. **similarity**: blocked bounds on every pair's rank key (:mod:`aggregator.similarity`);
3. **selection**: keep the most alike pairs and put them in exact order
   (:mod:`aggregator.selection`);
4. **removal**: walk the pairs and drop one neuron of each until ``target`` remain
   (:mod:`aggregator.removal`). If the kept pairs run out before that (many pairs had a
   neuron already gone), selection runs again over the neurons still alive, and the
   walk goes on there (see :func:`plan_removal`).

Metric ``ga`` instead evolves the keep-set (:mod:`aggregator.genetic`), seeded with the
keep-sets of the four similarity metrics under every rule.

The merged model keeps its neurons in concatenation order and their labels from the
sub-models, unless a labelled calibration set is given: then labels and class rates are
re-assigned from the merged network's spike counts on it (edge_node inference).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from aggregator.concat import AGGREGATOR_ID, concatenate, take_neurons
from aggregator.genetic import (
    Fitness,
    GAConfig,
    GAResult,
    evolve,
    flat_images,
    inference_backend,
    network_fitness,
    surrogate_fitness,
)
from aggregator.removal import DEFAULT_RULE, RULES, check_rule, rule_strength, walk
from aggregator.selection import initial_k, max_candidates, ordered_pairs, select_candidates
from aggregator.similarity import METRICS, check_metric, check_weights, pair_bounds, total_pairs
from estdp.errors import ConfigError, MergeError
from estdp.model import SubModel

MERGE_METRICS = (*METRICS, "ga")
STAGES = ("concatenate", "similarity", "selection", "removal")


@dataclass(frozen=True)
class LabelledImages:
    """Images (n, 28, 28) or (n, n_input) uint8 with their labels, and the spike-train seed."""

    images: np.ndarray
    labels: np.ndarray
    seed: int = 0

    def __post_init__(self) -> None:
        if np.asarray(self.images).shape[0] != np.asarray(self.labels).shape[0]:
            raise ConfigError(
                f"{np.asarray(self.images).shape[0]} images but {np.asarray(self.labels).shape[0]} labels"
            )
        if np.asarray(self.images).shape[0] == 0:
            raise ConfigError("a labelled image set needs at least one image")


@dataclass(frozen=True)
class RemovalPlan:
    """Which neurons the similarity walk removes, and what it cost."""

    removed: np.ndarray  # (r,) indices in removal order
    keep: np.ndarray  # (n - r,) sorted indices
    candidates: int  # most pairs kept by the partial selection in one pass
    consumed: int  # pairs the walk looked at, over all passes
    passes: int  # selection passes (1 unless the walk ran short)
    seconds: dict[str, float]  # similarity, selection, removal


@dataclass(frozen=True)
class MergeReport:
    """What a merge did, with the seconds of each stage."""

    metric: str
    rule: str
    inputs: int
    neurons_in: int
    neurons_out: int
    target: int
    removed: np.ndarray  # indices into the concatenated model, in removal order
    candidates: int
    pairs: int  # n (n - 1) / 2
    consumed: int
    passes: int
    labels: str  # "kept" or "calibrated"
    seconds: dict[str, float] = field(default_factory=dict)
    genetic: GAResult | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "metric": self.metric,
            "rule": self.rule,
            "inputs": self.inputs,
            "neurons_in": self.neurons_in,
            "neurons_out": self.neurons_out,
            "target": self.target,
            "removed": int(self.removed.shape[0]),
            "candidates": self.candidates,
            "pairs": self.pairs,
            "consumed": self.consumed,
            "passes": self.passes,
            "labels": self.labels,
            "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
        }
        if self.genetic is not None:
            out["genetic"] = self.genetic.to_dict()
        return out


class _Timed:
    """Iterate ``inner``, adding the time spent producing items to ``timer[name]``."""

    def __init__(self, inner: Iterable[Any], timer: dict[str, float], name: str) -> None:
        self._inner: Iterator[Any] = iter(inner)
        self._timer = timer
        self._name = name
        self.spent = 0.0

    def __iter__(self) -> _Timed:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            return next(self._inner)
        finally:
            dt = time.perf_counter() - t0
            self.spent += dt
            self._timer[self._name] = self._timer.get(self._name, 0.0) + dt


def plan_removal(
    weights: Any,
    target: int,
    metric: str,
    *,
    strength: np.ndarray | None = None,
    xp: ModuleType = np,
    k: int | None = None,
    block_rows: int | None = None,
    threads: int | None = None,
) -> RemovalPlan:
    """Rank pairs by ``metric`` and walk them down to ``target`` neurons.

    The walk runs in passes. Each pass selects at most ``k`` candidate pairs among the
    neurons still alive (:func:`aggregator.selection.select_candidates`) and walks the
    certified ones, which are a prefix of the exact order of those neurons' pairs. When
    they run out first, every pair walked has lost a neuron, so the rest of the walk
    over all pairs is the walk over the pairs of the survivors, in the same order (their
    relative order, hence the ``(i, j)`` tie-break, is kept): the next pass selects
    among the survivors only. So the result is exactly that of one walk over all pairs,
    while the candidate set, the memory it costs, stays bounded even when almost every
    neuron is removed.

    Parameters
    ----------
    weights
        (n_input, n) weights of the concatenated model (NumPy, or on ``xp``).
    target
        Neurons to keep, 1 <= target; nothing is removed when target >= n.
    metric
        One of :data:`aggregator.similarity.METRICS`.
    strength
        Per-neuron strength of the removal rule (:func:`aggregator.removal.rule_strength`).
    xp
        numpy or cupy.
    k
        Pairs kept by each selection pass (default :func:`aggregator.selection.initial_k`
        of the pass's neurons and removals, at most
        :func:`aggregator.selection.max_candidates`).
    block_rows, threads
        Passed to :func:`aggregator.similarity.pair_bounds`.

    Returns
    -------
    RemovalPlan

    Raises
    ------
    MergeError
        target < 1, or weights with NaN or infinite values.
    """
    check_metric(metric)
    timer = {"similarity": 0.0, "selection": 0.0, "removal": 0.0}
    t0 = time.perf_counter()
    w = check_weights(weights, xp=xp)
    n = int(w.shape[1])
    if target < 1:
        raise MergeError(f"target must be >= 1 neuron, got {target}")
    n_remove = max(0, n - target)
    if n_remove == 0:
        return RemovalPlan(np.zeros(0, np.int64), np.arange(n), 0, 0, 0, timer)
    s = None if strength is None else np.asarray(strength, dtype=np.float64)
    alive = np.arange(n)  # original indices of the neurons of this pass, ascending
    removed: list[np.ndarray] = []
    left = n_remove
    consumed = passes = most = 0
    bounds = pair_bounds(w, metric, xp=xp, block_rows=block_rows, threads=threads)
    timer["similarity"] += time.perf_counter() - t0
    grow = 1  # > 1 after a pass that certified no removal at all
    while True:
        passes += 1
        m = int(alive.shape[0])
        k_pass = _pass_k(m, left, bounds.tight, k) * grow
        k_pass = max(1, min(k_pass, total_pairs(m)))
        cands = select_candidates(bounds, k_pass, timer)
        most = max(most, cands.size)
        pairs = _Timed(ordered_pairs(cands, bounds), timer, "selection")
        t1 = time.perf_counter()
        result = walk(pairs, m, left, None if s is None else s[alive])
        timer["removal"] += time.perf_counter() - t1 - pairs.spent
        consumed += result.consumed
        removed.append(alive[result.removed])
        left -= int(result.removed.shape[0])
        if result.complete:
            break
        if cands.bound == float("inf"):  # pragma: no cover - all pairs walked
            raise MergeError(
                f"internal error: {n} neurons but the walk removed only {n_remove - left}"
            )
        if result.removed.shape[0] == 0:
            # Nothing certified (a near-tie straddles the bound): same neurons, more pairs.
            grow *= 4
            continue
        grow = 1
        t2 = time.perf_counter()
        survivors = np.ones(m, dtype=bool)
        survivors[result.removed] = False
        alive = alive[survivors]
        idx = alive if xp is np else xp.asarray(alive)
        bounds = pair_bounds(
            xp.take(w, idx, axis=1), metric, xp=xp, block_rows=block_rows, threads=threads
        )
        timer["similarity"] += time.perf_counter() - t2
    gone = np.concatenate(removed)
    keep = np.setdiff1d(np.arange(n), gone)
    return RemovalPlan(gone, keep, most, consumed, passes, timer)


def _pass_k(n: int, n_remove: int, tight: bool, k: int | None) -> int:
    """Pairs to keep in a pass over ``n`` neurons that still has ``n_remove`` to remove."""
    if k is not None:
        return int(k)
    # With wide intervals (8-bit Manhattan) only pairs whose exact key is below the
    # bound can be certified, fewer than those whose lower bound is: keep twice as many.
    return min(max_candidates(n), initial_k(n, n_remove) * (1 if tight else 2))


def merge(
    models: Sequence[SubModel],
    target: int,
    metric: str,
    *,
    rule: str = DEFAULT_RULE,
    calibration: LabelledImages | None = None,
    validation: LabelledImages | None = None,
    ga: GAConfig | None = None,
    fitness: Fitness | None = None,
    verify: Fitness | None = None,
    xp: ModuleType = np,
    node_id: str = AGGREGATOR_ID,
    seed: int = 0,
    round: int | None = None,
    threads: int | None = None,
    created_unix: float | None = None,
) -> tuple[SubModel, MergeReport]:
    """Merge sub-models into one model of ``target`` neurons.

    Parameters
    ----------
    models
        The sub-models (equal n_input, parameters and class count).
    target
        Neurons of the result, >= 1; when it is at least the total, nothing is removed.
    metric
        ``mse``, ``manhattan``, ``cosine``, ``correlation`` or ``ga``.
    rule
        Which neuron of a pair goes: ``later``, ``activity`` or ``theta``
        (:mod:`aggregator.removal`). For ``ga``, the rule of the seeds is every rule.
    calibration
        Labelled images to re-assign the merged model's labels from (default: keep them).
    validation
        For ``ga``: the labelled validation set (from the training images) that the
        default fitness (surrogate, verified by simulation) is computed on.
    ga
        Budget and operators of the genetic search (default :class:`GAConfig`).
    fitness, verify
        For ``ga``: a fitness callable replacing the default, and an optional exact one.
    xp
        numpy or cupy, for similarity and inference.
    node_id, seed, round, created_unix
        Provenance of the merged model.
    threads
        CPU threads of the Manhattan kernel (default: usable cores).

    Returns
    -------
    (SubModel, MergeReport)

    Raises
    ------
    MergeError
        Inputs that cannot be merged, target < 1, NaN weights, or ``ga`` without a
        validation set or fitness.
    ConfigError
        Unknown metric or rule.
    """
    if metric not in MERGE_METRICS:
        raise ConfigError(
            f"unknown merge metric {metric!r}; choose one of {', '.join(MERGE_METRICS)}"
        )
    check_rule(rule)
    seconds = dict.fromkeys(STAGES, 0.0)
    t0 = time.perf_counter()
    whole = concatenate(models, node_id=node_id, seed=seed, round=round, created_unix=created_unix)
    seconds["concatenate"] = time.perf_counter() - t0
    if target < 1:
        raise MergeError(f"target must be >= 1 neuron, got {target}")
    n = whole.n_neurons
    genetic = None
    if metric == "ga":
        t_ga = time.perf_counter()
        keep, removed, plans, genetic = _genetic_keep(
            whole, target, xp, threads, validation, ga, fitness, verify, seed
        )
        ga_stage = time.perf_counter() - t_ga
        seeded = 0.0
        for plan in plans:
            for stage, spent in plan.seconds.items():
                seconds[stage] += spent
                seeded += spent
        # Simulation of the validation set, search and verification: the rest of the stage.
        seconds["genetic"] = ga_stage - seeded
        candidates = max((p.candidates for p in plans), default=0)
        consumed = max((p.consumed for p in plans), default=0)
        passes = max((p.passes for p in plans), default=0)
    else:
        strength = rule_strength(rule, whole.thetas, whole.class_rates)
        plan = plan_removal(
            whole.weights, target, metric, strength=strength, xp=xp, threads=threads
        )
        seconds.update(plan.seconds)
        keep, removed = plan.keep, plan.removed
        candidates, consumed, passes = plan.candidates, plan.consumed, plan.passes

    notes = {
        "merge_metric": metric,
        "merge_rule": "all" if metric == "ga" else rule,
        "merge_target": str(target),
        "merge_inputs": str(len(models)),
    }
    labels = class_rates = None
    if calibration is not None:
        t1 = time.perf_counter()
        pruned = take_neurons(whole, keep)
        labels, class_rates = calibrate_labels(pruned, calibration, xp=xp)
        seconds["labels"] = time.perf_counter() - t1
    merged = take_neurons(whole, keep, notes=notes, labels=labels, class_rates=class_rates)
    report = MergeReport(
        metric=metric,
        rule="all" if metric == "ga" else rule,
        inputs=len(models),
        neurons_in=n,
        neurons_out=merged.n_neurons,
        target=target,
        removed=removed,
        candidates=candidates,
        pairs=total_pairs(n),
        consumed=consumed,
        passes=passes,
        labels="calibrated" if calibration is not None else "kept",
        seconds=seconds,
        genetic=genetic,
    )
    return merged, report


def _genetic_keep(
    whole: SubModel,
    target: int,
    xp: ModuleType,
    threads: int | None,
    validation: LabelledImages | None,
    config: GAConfig | None,
    fitness: Fitness | None,
    verify: Fitness | None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, list[RemovalPlan], GAResult | None]:
    n = whole.n_neurons
    if target >= n:
        return np.arange(n), np.zeros(0, np.int64), [], None
    if fitness is None and validation is None:
        raise MergeError("metric 'ga' needs a labelled validation set (or a fitness function)")
    config = config or GAConfig(seed=seed)
    start = time.perf_counter()
    plans = []
    seeds = []
    for metric in METRICS:
        for rule in RULES:
            strength = rule_strength(rule, whole.thetas, whole.class_rates)
            plan = plan_removal(
                whole.weights, target, metric, strength=strength, xp=xp, threads=threads
            )
            plans.append(plan)
            seeds.append(plan.keep)
    if fitness is None:
        assert validation is not None
        fitness = surrogate_fitness(
            whole, validation.images, validation.labels, xp=xp, seed=validation.seed
        )
        if verify is None:
            verify = network_fitness(
                whole, validation.images, validation.labels, xp=xp, seed=validation.seed
            )
    # The time budget covers the whole stage: seeds, simulation, search and verification.
    left = config.time_budget_s - (time.perf_counter() - start)
    budget = dataclasses.replace(config, time_budget_s=max(left, 1e-3))
    result = evolve(n, target, fitness, seeds, budget, verify=verify)
    removed = np.setdiff1d(np.arange(n), result.keep)
    return result.keep, removed, plans, result


def calibrate_labels(
    model: SubModel, calibration: LabelledImages, *, xp: ModuleType = np
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and class rates of ``model``'s neurons from its spike counts on ``calibration``.

    Returns
    -------
    (labels (n,) int16, class_rates (C, n) float32)
    """
    from edge_node.labels import assign_labels
    from edge_node.workflow import spike_counts

    flat = flat_images(calibration.images, model.n_input)
    counts = spike_counts(
        model.weights,
        model.thetas,
        flat,
        model.params,
        inference_backend(xp),
        seed=calibration.seed,
    )
    labels, rates = assign_labels(
        np.asarray(counts), np.asarray(calibration.labels), model.n_classes
    )
    return np.asarray(labels, dtype=np.int16), np.asarray(rates, dtype=np.float32)


__all__ = [
    "MERGE_METRICS",
    "STAGES",
    "LabelledImages",
    "MergeReport",
    "RemovalPlan",
    "calibrate_labels",
    "merge",
    "plan_removal",
]
