"""Ranking pairs of neurons without sorting all n^2 of them.

The walk (:mod:`aggregator.removal`) needs pairs in rank order only until it has removed
``r`` neurons, which for the sizes of interest is a small fraction of the n(n-1)/2
pairs. So instead of generating and sorting every pair (the seed's algorithm, which spent
over 99% of its time there) we:

1. **select** (:class:`PartialSelection`): stream the blocks of lower bounds ``lo`` from
   :func:`aggregator.similarity.pair_bounds` and keep only the ``k`` pairs with the
   smallest ``lo``. A block is first filtered against the running bound, and
   ``partition`` (``O(size)``, not a sort) trims the kept set to ``k`` whenever it grows
   past ``2k``. The result carries ``bound``: every pair left out has ``lo >= bound``, so
   its exact rank key is at least ``bound``.
2. **order** (:func:`ordered_pairs`): emit the kept pairs in exact rank order
   ``(key, i, j)``. With tight intervals (matrix-product metrics, width ~1e-13) only
   pairs whose intervals overlap (near-ties, e.g. identical neurons) get exact values;
   with wide intervals (8-bit Manhattan) exact values are computed lazily, in chunks in
   the order of ``lo``, just ahead of the walk: a pair is emitted once its exact key is
   below the ``lo`` of every pair not yet evaluated.
3. **certify**: a pair is emitted only when its key is strictly below ``bound``, so no
   pair left out could precede it. The emitted pairs are therefore a prefix of the full
   order. If the walk needs more pairs than were emitted, the caller selects again over
   the neurons still alive (see :func:`aggregator.merge.plan_removal`).

``k`` is capped at :func:`max_candidates` (64 per neuron): the number the walk needs
explodes as the fraction removed approaches 1 (``initial_k``), and each kept pair costs
hundreds of bytes while it is selected and ordered. Memory is O(k + n x block); time is the similarity blocks plus
O(n^2) cheap comparisons plus O(k log k) for the kept pairs.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from aggregator.similarity import PairBounds, total_pairs
from estdp.backend import to_host

_FIRST_CHUNK = 512
_MAX_CHUNK = 1 << 14
# Most pairs one selection pass keeps: CANDIDATES_PER_NEURON per neuron, at least
# MIN_CANDIDATE_CAP. Selecting and ordering k pairs holds up to 2k of them and ~15
# arrays of k 8-byte values (indices, bounds, widths, sort permutations): measured
# 400-900 bytes per kept pair at the peak, so the cap keeps that within a few times the
# weights' own float64 copy (784 x 8 bytes per neuron). Uncapped, 5,000 -> 300 asked
# for 5.2 million pairs (a 1.1-2.2 GiB peak). 10,000 -> 3,000 needs 311,000 (twice
# that for Manhattan), under the cap, so it runs as before.
CANDIDATES_PER_NEURON = 64
MIN_CANDIDATE_CAP = 1 << 16


def max_candidates(n: int) -> int:
    """The most pairs one selection pass over ``n`` neurons keeps (see above)."""
    return max(MIN_CANDIDATE_CAP, CANDIDATES_PER_NEURON * n)


def initial_k(n: int, n_remove: int) -> int:
    """How many pairs to keep for a walk removing ``n_remove`` of ``n`` neurons.

    The walk skips pairs whose neuron is already gone, more so the more it removes:
    measured on random and on trained-like weights it consumed 1.3 to 2.2 pairs per
    removal with 10% removed, 3.3 to 7.6 with 40%, 23 to 33 with 70% (10,000 -> 3,000)
    and 40 to 125 with 90%. ``4 r / (1 - r/n)^2`` covers those with room to spare,
    capped at :func:`max_candidates` (a walk that runs short continues in a new pass
    over the neurons still alive).
    """
    if n_remove <= 0:
        return 0
    keep = max(1, n - n_remove)
    k = 4 * n_remove * n * n // (keep * keep) + 64
    return int(min(total_pairs(n), max_candidates(n), k))


@dataclass(frozen=True)
class Candidates:
    """Pairs kept by the partial selection: host arrays, and the certificate ``bound``."""

    rows: np.ndarray  # (m,) int64, i < j
    cols: np.ndarray  # (m,) int64
    lo: np.ndarray  # (m,) float64 lower bounds of the rank keys
    bound: float  # every pair not kept has a rank key >= bound (inf: all pairs are kept)

    @property
    def size(self) -> int:
        return int(self.rows.shape[0])


class PartialSelection:
    """Streaming selection of the ``k`` pairs with the smallest lower bounds.

    Blocks go through :meth:`compact` (which may run in worker threads: it only reads the
    running bound, and a stale, larger bound merely keeps more) and then, in order,
    through :meth:`merge`.

    Parameters
    ----------
    k
        How many pairs to keep (at least; up to ``2k`` may be held).
    xp
        The array module of the blocks; filtering happens there, and only the survivors
        come to host memory.
    """

    def __init__(self, k: int, *, xp: ModuleType = np) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.xp = xp
        self.bound = math.inf
        self._rows: list[np.ndarray] = []
        self._cols: list[np.ndarray] = []
        self._lo: list[np.ndarray] = []
        self._held = 0

    def compact(self, r0: int, lo: Any) -> tuple[int, int, np.ndarray, np.ndarray, float]:
        """The pairs of a block that may be kept: ``(r0, width, flat indices, lo, cut)``.

        ``lo[a, b]`` bounds the pair (r0 + a, r0 + b); ``+inf`` marks no pair. At most
        ``k`` survive; ``cut`` (or inf) is a bound on those dropped for that reason.
        """
        xp = self.xp
        flat = lo.ravel()
        # One comparison per pair: after the first blocks, almost none survive.
        idx = xp.nonzero(flat < self.bound)[0]
        vals = flat[idx]
        cut = math.inf
        if int(vals.shape[0]) > self.k:
            cut = float(xp.partition(vals, self.k)[self.k])
            keep = vals < cut
            idx, vals = idx[keep], vals[keep]
        return r0, int(lo.shape[1]), to_host(idx), to_host(vals), cut

    def merge(self, item: tuple[int, int, np.ndarray, np.ndarray, float]) -> None:
        """Take in what :meth:`compact` returned for a block."""
        r0, width, idx, vals, cut = item
        self.bound = min(self.bound, cut)
        keep = vals < self.bound
        if not keep.all():
            idx, vals = idx[keep], vals[keep]
        idx = np.asarray(idx, dtype=np.int64)
        self._rows.append(r0 + idx // width)
        self._cols.append(r0 + idx % width)
        self._lo.append(np.asarray(vals, dtype=np.float64))
        self._held += int(idx.shape[0])
        if self._held > 2 * self.k:
            self._trim()

    def add(self, r0: int, lo: Any) -> None:
        """:meth:`compact` then :meth:`merge` one block."""
        self.merge(self.compact(r0, lo))

    def _trim(self) -> None:
        rows, cols, lo = self._joined()
        kth = float(np.partition(lo, self.k)[self.k])
        keep = lo < kth
        self.bound = min(self.bound, kth)
        self._rows, self._cols, self._lo = [rows[keep]], [cols[keep]], [lo[keep]]
        self._held = int(keep.sum())

    def _joined(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self._lo:
            empty = np.zeros(0, np.int64)
            return empty, empty, np.zeros(0)
        return np.concatenate(self._rows), np.concatenate(self._cols), np.concatenate(self._lo)

    def result(self) -> Candidates:
        """The kept pairs (every pair with ``lo < bound``, at most ``k``) and the bound."""
        if self._held > self.k:
            self._trim()
        rows, cols, lo = self._joined()
        # Entries admitted before the bound last fell may lie at or above it.
        keep = lo < self.bound
        return Candidates(rows[keep], cols[keep], lo[keep], self.bound)


def select_candidates(
    bounds: PairBounds, k: int, timer: dict[str, float] | None = None
) -> Candidates:
    """Run the partial selection over every block of ``bounds`` (see :class:`PartialSelection`).

    ``timer`` (optional) accumulates seconds under "similarity" (computing the blocks)
    and "selection" (filtering them and merging the survivors).
    """
    selection = PartialSelection(max(1, k), xp=bounds.xp)
    clock = time.perf_counter
    lock = threading.Lock()
    spent = {"merge": 0.0, "compact": 0.0}

    def compact(r0: int, lo: Any) -> Any:
        t = clock()
        item = selection.compact(r0, lo)
        with lock:
            spent["compact"] += clock() - t
        return item

    t0 = clock()
    for item in bounds.scan(compact):
        t1 = clock()
        selection.merge(item)
        spent["merge"] += clock() - t1
    result = selection.result()
    if timer is not None:
        # Filtering runs inside the block loop, in parallel when the scan is threaded:
        # its share of the wall time is its time divided by the workers.
        picked = spent["merge"] + spent["compact"] / bounds.workers
        total = clock() - t0
        timer["similarity"] = timer.get("similarity", 0.0) + total - picked
        timer["selection"] = timer.get("selection", 0.0) + picked
    return result


def _exact_keys(
    bounds: PairBounds, rows: np.ndarray, cols: np.ndarray, pool: ThreadPoolExecutor | None = None
) -> np.ndarray:
    xp = bounds.xp
    if xp is np:
        return bounds.exact_keys(rows, cols, pool)
    return np.asarray(to_host(bounds.exact_keys(xp.asarray(rows), xp.asarray(cols))))


def _widths(bounds: PairBounds, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    xp = bounds.xp
    if xp is np:
        return bounds.width(rows, cols)
    return np.asarray(to_host(bounds.width(xp.asarray(rows), xp.asarray(cols))))


def ordered_pairs(cands: Candidates, bounds: PairBounds) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks ``(rows, cols)`` of candidate pairs in exact rank order ``(key, i, j)``.

    Only pairs certified against ``cands.bound`` are emitted (see the module docstring);
    the iteration ends when no further pair can be certified.
    """
    if cands.size == 0:
        return iter(())
    if bounds.tight:
        return _order_by_clusters(cands, bounds)
    return _order_lazily(cands, bounds)


def _order_by_clusters(
    cands: Candidates, bounds: PairBounds
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    order = np.argsort(cands.lo, kind="stable")
    lo = cands.lo[order]
    rows, cols = cands.rows[order], cands.cols[order]
    hi = lo + _widths(bounds, rows, cols)
    # A cluster: a run of intervals each starting before the previous ones all ended.
    # Between clusters the order is certain; inside one it needs exact values.
    reach = np.maximum.accumulate(hi)
    starts = np.ones(lo.shape[0], dtype=bool)
    starts[1:] = lo[1:] > reach[:-1]
    cluster = np.cumsum(starts) - 1
    shared = np.bincount(cluster)[cluster] > 1
    key = hi.copy()  # a singleton is ordered by its cluster; hi certifies it
    if shared.any():
        key[shared] = _exact_keys(bounds, rows[shared], cols[shared])
    final = np.lexsort((cols, rows, key, cluster))
    safe = key[final] < cands.bound
    cut = int(safe.shape[0]) if safe.all() else int(np.argmin(safe))
    final = final[:cut]
    yield rows[final], cols[final]


def _order_lazily(cands: Candidates, bounds: PairBounds) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    order = np.argsort(cands.lo, kind="stable")
    lo = cands.lo[order]
    rows, cols = cands.rows[order], cands.cols[order]
    m = int(lo.shape[0])
    p_key = np.zeros(0)
    p_rows = np.zeros(0, np.int64)
    p_cols = np.zeros(0, np.int64)
    pos = 0
    chunk = _FIRST_CHUNK
    # Threads for evaluating large chunks; only when there will be large chunks.
    workers = bounds.workers if bounds.xp is np and m > 4 * _FIRST_CHUNK else 1
    with ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        while True:
            end = min(m, pos + chunk)
            if end > pos:
                keys = _exact_keys(bounds, rows[pos:end], cols[pos:end], pool)
                p_key = np.concatenate((p_key, keys))
                p_rows = np.concatenate((p_rows, rows[pos:end]))
                p_cols = np.concatenate((p_cols, cols[pos:end]))
                pos = end
                chunk = min(_MAX_CHUNK, 2 * chunk)
            # No pair not evaluated yet (kept or left out) can have a key below this.
            frontier = min(float(lo[pos]) if pos < m else math.inf, cands.bound)
            ready = p_key < frontier
            if ready.any():
                r_key, r_rows, r_cols = p_key[ready], p_rows[ready], p_cols[ready]
                emit = np.lexsort((r_cols, r_rows, r_key))
                p_key, p_rows, p_cols = p_key[~ready], p_rows[~ready], p_cols[~ready]
                yield r_rows[emit], r_cols[emit]
            if pos >= m:
                return


__all__ = [
    "Candidates",
    "PartialSelection",
    "initial_k",
    "max_candidates",
    "ordered_pairs",
    "select_candidates",
]
