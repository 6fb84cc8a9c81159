"""The merge written the slow, obvious way (slides, Algorithm 1 and step 4), for tests.

Nested loops generate every pair with its similarity, a full sort orders them (most
alike first, then by i, then by j), and a walk removes one neuron of each pair whose two
neurons are both still there. The metric formulas are written out here independently of
aggregator.similarity.

Also: weights that look trained (smooth digit-like prototypes, several noisy copies of
each, columns normalised like Diehl & Cook's), without needing MNIST.
"""

from __future__ import annotations

import numpy as np

DISTANCES = ("mse", "manhattan")


def similarity(a: np.ndarray, b: np.ndarray, metric: str) -> float:
    """One pair, by the slides' formulas, in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if metric == "mse":
        return float(np.mean((a - b) ** 2))
    if metric == "manhattan":
        return float(np.sum(np.abs(a - b)))
    if metric == "correlation":
        if a.max() == a.min() or b.max() == b.min():
            return 0.0
        a = a - a.mean()
        b = b - b.mean()
    elif metric != "cosine":
        raise ValueError(metric)
    na, nb = np.sum(a * a), np.sum(b * b)
    if na == 0 or nb == 0:
        return 0.0
    return float(np.sum(a * b) / np.sqrt(na * nb))


def generate_pairs(weights: np.ndarray, metric: str) -> list[tuple[int, int, float]]:
    """Algorithm 1: every pair (i, j), i < j, with its similarity."""
    n = weights.shape[1]
    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            pairs.append((i, j, similarity(weights[:, i], weights[:, j], metric)))
    return pairs


def sorted_pairs(weights: np.ndarray, metric: str) -> list[tuple[int, int, float]]:
    """All pairs, most alike first (a full sort by value, then i, then j)."""
    sign = 1.0 if metric in DISTANCES else -1.0
    return sorted(generate_pairs(weights, metric), key=lambda p: (sign * p[2], p[0], p[1]))


def walk(
    pairs: list[tuple[int, int, float]], n: int, target: int, strength: np.ndarray | None = None
) -> list[int]:
    """Remove neurons down to ``target``: drop the weaker of each live pair (else the later)."""
    alive = [True] * n
    removed: list[int] = []
    for i, j, _ in pairs:
        if len(removed) >= n - target:
            break
        if alive[i] and alive[j]:
            loser = i if strength is not None and strength[i] < strength[j] else j
            alive[loser] = False
            removed.append(loser)
    return removed


def removal_order(
    weights: np.ndarray, target: int, metric: str, strength: np.ndarray | None = None
) -> list[int]:
    """Neurons removed, in order: Algorithm 1, a full sort, then the walk."""
    return walk(sorted_pairs(weights, metric), weights.shape[1], target, strength)


def _blob_prototypes(rng: np.random.Generator, count: int, side: int = 28) -> np.ndarray:
    """Smooth stroke-like 28 x 28 patterns: a few Gaussian blobs along a random path."""
    yy, xx = np.mgrid[0:side, 0:side]
    out = np.zeros((count, side * side))
    for c in range(count):
        img = np.zeros((side, side))
        y, x = rng.uniform(8, 20, 2)
        for _ in range(rng.integers(4, 9)):
            y = np.clip(y + rng.normal(0, 3), 4, side - 5)
            x = np.clip(x + rng.normal(0, 3), 4, side - 5)
            img += np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * rng.uniform(1.2, 2.5) ** 2))
        out[c] = (img / img.max()).ravel()
    return out


def trained_like(
    n_models: int, per_model: int, rng: np.random.Generator, *, classes: int = 10
) -> list[np.ndarray]:
    """Weights (784, per_model) float32 for each of ``n_models`` sub-models.

    Every sub-model learns noisy copies of the same few prototypes (as sub-models trained
    on different shards of one dataset do), so neurons across models are alike; the
    background keeps small random weights, and each column sums to 78.4 within [0, 1].
    """
    protos = _blob_prototypes(rng, classes * 3)
    models = []
    for _ in range(n_models):
        w = np.empty((784, per_model))
        for j in range(per_model):
            p = protos[rng.integers(protos.shape[0])]
            col = p * rng.uniform(0.6, 1.0) + rng.normal(0, 0.04, 784) * p + 0.03 * rng.random(784)
            col = np.clip(col, 0, None)
            w[:, j] = np.clip(col * 78.4 / col.sum(), 0.0, 1.0)
        models.append(w.astype(np.float32))
    return models
