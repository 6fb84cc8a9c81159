"""Partial selection of pairs and their exact ordering."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator import similarity as sim
from aggregator.selection import (
    Candidates,
    PartialSelection,
    initial_k,
    max_candidates,
    ordered_pairs,
    select_candidates,
)


def _triangle(values: np.ndarray) -> np.ndarray:
    """A (n, n) block with +inf on and below the diagonal, like the similarity blocks."""
    block = values.astype(np.float64).copy()
    block[np.tril_indices(block.shape[0])] = np.inf
    return block


def test_keeps_the_k_smallest_and_certifies_the_rest():
    rng = np.random.default_rng(0)
    n = 60
    full = _triangle(rng.random((n, n)))
    selection = PartialSelection(40)
    # Feed the upper triangle as row blocks, like the similarity stage.
    for r0 in range(0, n, 7):
        selection.add(r0, full[r0 : r0 + 7, r0:])
    cands = selection.result()
    iu = np.triu_indices(n, 1)
    values = full[iu]
    assert 40 <= cands.size <= 80
    kept = set(zip(cands.rows.tolist(), cands.cols.tolist(), strict=True))
    assert all(i < j for i, j in kept)
    np.testing.assert_array_equal(cands.lo, full[cands.rows, cands.cols])
    # Every pair left out is at or above the bound; every pair below it is kept.
    for i, j, v in zip(*iu, values, strict=True):
        if (i, j) not in kept:
            assert v >= cands.bound
        if v < cands.bound:
            assert (i, j) in kept
    assert np.sort(values)[39] < cands.bound


def test_small_inputs_keep_everything_with_an_infinite_bound():
    selection = PartialSelection(100)
    selection.add(0, _triangle(np.arange(16.0).reshape(4, 4)))
    cands = selection.result()
    assert cands.size == 6
    assert math.isinf(cands.bound)


def test_k_must_be_positive():
    with pytest.raises(ValueError):
        PartialSelection(0)


def test_initial_k_grows_with_the_fraction_removed():
    assert initial_k(500, 0) == 0
    assert initial_k(10, 9) == 45  # capped at all pairs
    assert initial_k(500, 200) < initial_k(500, 400)
    assert initial_k(10_000, 7_000) >= 231_303  # what trained-like weights consumed
    # Near-total removal is capped (the walk continues in passes over the survivors)...
    assert initial_k(5_000, 4_700) == max_candidates(5_000) == 320_000
    # ...but 10,000 -> 3,000 keeps its full candidate set, twice over for Manhattan.
    assert 2 * initial_k(10_000, 7_000) <= max_candidates(10_000)


def _ordered(w: np.ndarray, metric: str, k: int) -> list[tuple[int, int]]:
    bounds = sim.pair_bounds(w, metric, threads=1)
    cands = select_candidates(bounds, k)
    out = []
    for rows, cols in ordered_pairs(cands, bounds):
        out.extend(zip(rows.tolist(), cols.tolist(), strict=True))
    return out


def _exact_order(w: np.ndarray, metric: str) -> list[tuple[int, int]]:
    n = w.shape[1]
    iu = np.triu_indices(n, 1)
    keys = sim.rank_keys(sim.pair_values(w, *iu, metric), metric)
    order = np.lexsort((iu[1], iu[0], keys))
    return list(zip(iu[0][order].tolist(), iu[1][order].tolist(), strict=True))


@pytest.mark.parametrize("metric", sim.METRICS)
def test_emitted_pairs_are_an_exact_prefix_of_the_full_order(metric):
    rng = np.random.default_rng(1)
    w = rng.random((784, 40)).astype(np.float32)
    # Ties: three copies of one neuron, and a pair of copies of another.
    w[:, 5] = w[:, 1]
    w[:, 9] = w[:, 1]
    w[:, 30] = w[:, 12]
    full = _exact_order(w, metric)
    emitted = _ordered(w, metric, k=60)
    assert len(emitted) >= 10
    assert emitted == full[: len(emitted)]
    # Tied pairs come by (i, j).
    assert full[:4] == [(1, 5), (1, 9), (5, 9), (12, 30)]


@pytest.mark.parametrize("metric", sim.METRICS)
def test_all_pairs_kept_gives_the_full_order(metric):
    rng = np.random.default_rng(2)
    w = rng.random((50, 15)).astype(np.float32)
    assert _ordered(w, metric, k=10_000) == _exact_order(w, metric)


def test_nothing_to_order():
    empty = Candidates(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), math.inf)
    bounds = sim.pair_bounds(np.ones((4, 3), np.float32), "mse")
    assert list(ordered_pairs(empty, bounds)) == []


def test_selection_timer_counts_both_stages():
    w = np.random.default_rng(3).random((784, 30)).astype(np.float32)
    timer: dict[str, float] = {}
    select_candidates(sim.pair_bounds(w, "cosine"), 20, timer)
    assert set(timer) == {"similarity", "selection"}
    assert all(v >= 0 for v in timer.values())
