"""Scoring a run's models: test accuracy, the compression curve, merge time per metric.

Accuracies come from :func:`edge_node.workflow.evaluate_model` with the same test images
and seed that ``estdp eval`` uses (``--test N --seed 0``), so every number in a report
equals what ``estdp eval`` prints for the saved model. Merges call the aggregator's own
merge function, the same one the aggregator daemon runs.

Compression curve: from a model of ``n`` neurons, for each metric ``m`` and each removal
count ``r``, the model merged down to ``n - r`` neurons by ``m`` and scored. ``r = 0``
is the unmerged model, scored once and shared by all metrics.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_node.workflow import Evaluation, evaluate_model
from estdp.backend import Backend
from estdp.model import SubModel

log = logging.getLogger(__name__)

METRICS = ("mse", "manhattan", "cosine", "correlation")
EVAL_SEED = 0  # estdp eval's default --seed


@dataclass(frozen=True)
class Scored:
    """A model's accuracy by both classification schemes."""

    name: str
    neurons: int
    accuracy: float  # all-activity
    accuracy_proportion: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "neurons": self.neurons,
            "accuracy": self.accuracy,
            "accuracy_proportion": self.accuracy_proportion,
            "eval_seconds": self.seconds,
        }


def score(
    name: str,
    model: SubModel,
    images: np.ndarray,
    labels: np.ndarray,
    backend: Backend,
    *,
    seed: int = EVAL_SEED,
) -> Scored:
    """Accuracy of ``model`` on ``images`` (what ``estdp eval --seed seed`` prints)."""
    result: Evaluation = evaluate_model(model, images, labels, backend, seed=seed)
    return Scored(
        name=name,
        neurons=model.n_neurons,
        accuracy=result.all_activity,
        accuracy_proportion=result.proportion_weighting,
        seconds=result.seconds,
    )


def merge_models(
    models: Sequence[SubModel], target: int, metric: str, **options: Any
) -> tuple[SubModel, Mapping[str, Any]]:
    """The aggregator's merge: concatenate ``models`` and prune to ``target`` by ``metric``.

    Returns the merged model and the merge report as a plain mapping (stage timings under
    keys ending in ``_seconds`` where the merge reports them).
    """
    from aggregator.merge import merge  # imported late: the simulator must start without it

    merged, report = merge(list(models), target, metric, **options)
    return merged, report.to_dict()


def concatenate(models: Sequence[SubModel]) -> SubModel:
    """All neurons of ``models`` side by side: the aggregator's concatenation step alone."""
    from aggregator.concat import concatenate as concat

    return concat(list(models))


def merge_time(
    models: Sequence[SubModel],
    target: int,
    metric: str,
    *,
    repeats: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median wall seconds of the whole merge (concatenate, similarity, removal).

    One untimed merge first, so imports and first-call set-up are not counted.
    """
    merge_models(models, target, metric)
    times = []
    for _ in range(max(1, repeats)):
        t0 = clock()
        merge_models(models, target, metric)
        times.append(clock() - t0)
    return statistics.median(times)


def removal_points(n_neurons: int, max_removed: int, step: int) -> list[int]:
    """0, step, 2 step, ... up to ``max_removed`` (always included), below ``n_neurons``."""
    max_removed = min(max_removed, n_neurons - 1)
    if max_removed <= 0:
        return [0]
    points = list(range(0, max_removed + 1, max(1, step)))
    if points[-1] != max_removed:
        points.append(max_removed)
    return points


# ---- scoring in worker processes ----------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(images: np.ndarray, labels: np.ndarray, backend_name: str) -> None:
    from estdp.backend import resolve_backend

    _WORKER.update(images=images, labels=labels, backend=resolve_backend(backend_name))


def _score_task(
    name: str,
    path: str,
    metric: str | None,
    target: int | None,
    n_images: int | None,
    rule: str | None = None,
) -> Scored:
    from estdp.model import load_model

    model = load_model(path)
    if metric is not None and target is not None:
        options = {} if rule is None else {"rule": rule}
        model, _ = merge_models([model], target, metric, **options)
    images, labels = _WORKER["images"], _WORKER["labels"]
    if n_images is not None:
        images, labels = images[:n_images], labels[:n_images]
    return score(name, model, images, labels, _WORKER["backend"])


class ScorePool:
    """Scores saved models in ``jobs`` worker processes, each holding the test set.

    Scoring is the bulk of a simulation's work after training, and every score is
    independent, so the workers keep all cores busy (including the one the fleet leaves
    idle while the baseline still trains). Workers use one BLAS thread each.
    """

    THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

    def __init__(self, images: np.ndarray, labels: np.ndarray, backend: Backend, jobs: int) -> None:
        self.images, self.labels, self.backend, self.jobs = images, labels, backend, max(1, jobs)
        self._pool: Any = None
        self._saved_env: dict[str, str | None] = {}

    def __enter__(self) -> ScorePool:
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor

        # Workers start on demand and read their thread settings at start-up.
        self._saved_env = {k: os.environ.get(k) for k in self.THREAD_VARS}
        os.environ.update(dict.fromkeys(self.THREAD_VARS, "1"))
        self._pool = ProcessPoolExecutor(
            self.jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.images, self.labels, self.backend.name),
        )
        return self

    def __exit__(self, *exc: object) -> None:
        import os

        self._pool.shutdown(wait=True, cancel_futures=True)
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def score(self, name: str, path: str | Path, n_images: int | None = None) -> Future[Scored]:
        """Accuracy of the model saved at ``path`` (as ``estdp eval`` computes it)."""
        return self._pool.submit(_score_task, name, str(path), None, None, n_images)

    def score_merged(
        self,
        name: str,
        path: str | Path,
        metric: str,
        target: int,
        n_images: int | None = None,
        rule: str | None = None,
    ) -> Future[Scored]:
        """Accuracy of the model at ``path`` merged down to ``target`` neurons by ``metric``
        (with the removal ``rule``; None: the aggregator's default)."""
        return self._pool.submit(_score_task, name, str(path), metric, target, n_images, rule)


def compression_curve(
    pool: ScorePool,
    path: str | Path,
    n_neurons: int,
    removed: Sequence[int],
    *,
    n_images: int | None = None,
    metrics: Sequence[str] = METRICS,
    rule: str | None = None,
) -> Callable[[], dict[str, Any]]:
    """Submit the compression curve of the model at ``path`` to ``pool``.

    Each point is the merge the aggregator would make (``rule``: its removal rule; None:
    the default), scored on the first ``n_images`` test images.

    Returns a function that waits for the scores and returns ``{"start_neurons",
    "test_images", "removed", "metrics": {metric: [accuracy per removal count]}}``.
    """
    unmerged = pool.score("unmerged", path, n_images) if 0 in removed else None
    futures: dict[tuple[str, int], Future[Scored]] = {
        (m, r): pool.score_merged(f"{m}-{r}", path, m, n_neurons - r, n_images, rule)
        for r in removed
        if r > 0
        for m in metrics
    }

    def collect() -> dict[str, Any]:
        curve: dict[str, list[float]] = {m: [] for m in metrics}
        for r in removed:
            for m in metrics:
                if r == 0:
                    assert unmerged is not None
                    curve[m].append(unmerged.result().accuracy)
                else:
                    curve[m].append(futures[(m, r)].result().accuracy)
        return {
            "start_neurons": n_neurons,
            "test_images": int(
                pool.images.shape[0] if n_images is None else min(n_images, pool.images.shape[0])
            ),
            "removed": list(removed),
            "metrics": curve,
        }

    return collect
