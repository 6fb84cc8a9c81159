"""How alike two neurons are: four metrics over their input weight vectors.

A neuron is its column of input weights (model weights are (d, n), d = n_input = 784),
a vector ``a`` of ``d`` values. For two neurons ``a`` and ``b`` (the slides' definitions,
computed in float64):

- mean squared error      ``mse(a, b) = (1/d) sum_k (a_k - b_k)^2``          (0 = same)
- Manhattan distance      ``l1(a, b) = sum_k |a_k - b_k|``                   (0 = same)
- cosine similarity       ``cos(a, b) = a.b / (|a| |b|)``                    (1 = same)
- Pearson correlation     ``corr(a, b) = cos(a - mean(a), b - mean(b))``     (1 = same)

Conventions: the cosine of an all-zero vector, and the correlation of a constant vector,
are 0 ("no similarity"), so that such a neuron is never taken for a copy of another one.
NaN or infinite weights are refused (:class:`~estdp.errors.MergeError`).

Pairs are ranked by a *rank key*, smallest first: the value itself for the distances and
its negative for the similarities, then by ``i`` and then by ``j`` (``i < j``); this is
a total order, so every implementation that ranks the same values agrees.

Exact values (:func:`pair_values`) follow the formulas literally, a chunk of pairs at a
time. Ranking all n(n-1)/2 pairs that way costs n^2 d; the fast path
(:func:`pair_bounds`) computes a cheap *interval* ``[lo, lo + width]`` guaranteed to hold
each pair's exact rank key, block by block:

- MSE, cosine and correlation through float64 matrix products (a block of rows against
  the rows after it, so memory stays O(n x block)):
  ``mse = (|a|^2 + |b|^2 - 2 a.b) / d`` and ``cos = a.b / (|a| |b|)`` (correlation: of
  the centred rows); the width is twice a rounding-error bound of these sums,
  ``gamma_d = d u / (1 - d u)`` with u = 2^-53: about 1e-13;
- Manhattan, on NumPy, through 8-bit quantisation: ``q = round((x - min) s)`` with the
  scale ``s`` chosen so that no sum overflows 16 bits, and
  ``l1(q_a, q_b) = S_a + S_b - 2 sum_k min(q_a,k, q_b,k)`` exactly in integers; since
  ``|l1(a, b) - l1(q_a, q_b)/s| <= e_a + e_b`` with ``e_a = sum_k |a_k - q_a,k / s|``,
  the width is ``2 (e_a + e_b)``. On CuPy the tiled CUDA kernel
  :func:`aggregator.cuda_similarity.manhattan_cuda` gives float32 distances, whose width
  is the float32 summation bound.

:mod:`aggregator.selection` keeps the pairs with the smallest ``lo`` and computes exact
values only where intervals leave the order in doubt, so the fast path ranks pairs
exactly as the formulas do.

Large temporaries are allocated once per call and reused block after block: on Linux a
fresh multi-megabyte NumPy array is a fresh ``mmap``, and touching its pages costs more
than the arithmetic done in it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from estdp.backend import usable_cpus
from estdp.errors import ConfigError, MergeError

METRICS = ("mse", "manhattan", "cosine", "correlation")
DISTANCES = frozenset(("mse", "manhattan"))

_U64 = 2.0**-53
_U32 = 2.0**-24
# Elements per matrix-product block (float64): 512 KB, reused block after block by its
# thread; 128 rows at least, for BLAS.
_BLOCK_ELEMENTS = 1 << 16
_MIN_BLOCK_ROWS = 128
# Manhattan tiles: rows x columns x d bytes, sized to stay in a core's L2 cache.
_TILE_ROWS = 8
_TILE_COLS = 128
_MANHATTAN_ROWS = 64  # rows per Manhattan block (one unit of work for a thread)
# Exact values of at least this many pairs are split across threads (below, the threads'
# start-up and buffers cost more than they save).
_PARALLEL_EXACT = 8192
# Pairs per chunk of exact evaluation: 2 x 64 x 784 float64 = 800 KB stay in cache.
_EXACT_CHUNK = 64

Compactor = Callable[[int, Any], Any]


def check_metric(metric: str) -> str:
    """``metric`` when it is one of :data:`METRICS`, else :class:`ConfigError`."""
    if metric not in METRICS:
        raise ConfigError(
            f"unknown similarity metric {metric!r}; choose one of {', '.join(METRICS)}"
        )
    return metric


def is_distance(metric: str) -> bool:
    """True when smaller values mean more alike (MSE, Manhattan)."""
    return check_metric(metric) in DISTANCES


def check_weights(weights: Any, *, xp: ModuleType = np) -> Any:
    """``weights`` (d, n) as an array of ``xp``, refused when not 2-D or not finite.

    Raises
    ------
    MergeError
        Not a 2-D array, or NaN or infinite values (their count is given).
    """
    w = xp.asarray(weights)
    if w.ndim != 2:
        raise MergeError(f"weights must be 2-D (n_input, n_neurons), got shape {tuple(w.shape)}")
    # A sum is NaN or infinite when any term is (and cannot overflow for weights that are
    # anywhere near a trained network's); count only then.
    if not bool(xp.isfinite(w.sum(dtype=xp.float64))):
        bad = int(xp.count_nonzero(~xp.isfinite(w)))
        raise MergeError(
            f"weights contain {bad} NaN or infinite value(s); cannot measure similarity"
        )
    return w


# ---------------------------------------------------------------------------------------
# Exact values


@dataclass(frozen=True)
class ExactPairs:
    """Per-neuron quantities that make exact pair values cheap to evaluate by chunks.

    It keeps scratch buffers, one set per thread that uses it.
    """

    metric: str
    z: Any  # (n, d) rows: float64 (centred for correlation); Manhattan keeps float32 input
    sq: Any  # (n,) float64 squared norms of z (cosine and correlation; else empty)
    xp: ModuleType = np
    _scratch: dict[int, Any] = field(default_factory=dict, repr=False, compare=False)

    def _buffers(self) -> tuple[Any, Any, Any]:
        # One set per thread: values() may run on slices in several threads at once.
        key = threading.get_ident()
        if key not in self._scratch:
            shape = (_EXACT_CHUNK, int(self.z.shape[1]))
            self._scratch[key] = (
                self.xp.empty(shape, dtype=self.z.dtype),
                self.xp.empty(shape, dtype=self.z.dtype),
                self.xp.empty(shape),
            )
        return self._scratch[key]

    def values(
        self, rows: Any, cols: Any, pool: ThreadPoolExecutor | None = None, parts: int = 1
    ) -> Any:
        """Exact values of pairs (rows[p], cols[p]), float64.

        With a thread ``pool`` (NumPy only), a large request is split into ``parts``
        slices evaluated in its threads.
        """
        xp = self.xp
        m = int(rows.shape[0])
        out = xp.empty(m, dtype=xp.float64)
        if pool is not None and parts > 1 and m >= _PARALLEL_EXACT:
            step = -(-m // parts)
            spans = [(p0, min(m, p0 + step)) for p0 in range(0, m, step)]
            list(pool.map(lambda span: self._fill(rows, cols, out, *span), spans))
        else:
            self._fill(rows, cols, out, 0, m)
        return out

    def _fill(self, rows: Any, cols: Any, out: Any, start: int, stop: int) -> None:
        xp = self.xp
        a_buf, b_buf, c_buf = self._buffers()
        for p0 in range(start, stop, _EXACT_CHUNK):
            p1 = min(stop, p0 + _EXACT_CHUNK)
            i, j = rows[p0:p1], cols[p0:p1]
            a, b = a_buf[: p1 - p0], b_buf[: p1 - p0]
            xp.take(self.z, i, axis=0, out=a)
            xp.take(self.z, j, axis=0, out=b)
            out[p0:p1] = self._combine(a, b, c_buf[: p1 - p0], i, j)

    def _combine(self, a: Any, b: Any, c: Any, i: Any, j: Any) -> Any:
        xp = self.xp
        if self.metric in ("mse", "manhattan"):
            # float32 inputs are exact in float64: the difference is the reference's.
            xp.subtract(a, b, out=c, dtype=xp.float64)
            if self.metric == "manhattan":
                return xp.abs(c, out=c).sum(axis=1)
            c *= c
            return c.sum(axis=1) / c.shape[1]
        a *= b
        dots = a.sum(axis=1)
        denom = xp.sqrt(self.sq[i] * self.sq[j])
        out = xp.zeros_like(dots)
        nz = denom > 0
        out[nz] = dots[nz] / denom[nz]
        return out


def exact_pairs(weights: Any, metric: str, *, xp: ModuleType = np) -> ExactPairs:
    """Prepare exact evaluation of pair values for ``weights`` (d, n) (see :func:`pair_values`)."""
    check_metric(metric)
    w = xp.asarray(weights)
    if metric == "manhattan" and w.dtype in (xp.float32, xp.float64):
        # Half the bytes to gather for float32 weights; differences are taken in float64.
        return ExactPairs(metric, xp.ascontiguousarray(w.T), xp.zeros(0), xp)
    z = xp.array(w.T, dtype=xp.float64, order="C")  # a copy: correlation centres it
    sq = xp.zeros(0)
    if metric in ("cosine", "correlation"):
        if metric == "correlation":
            constant = z.max(axis=1) == z.min(axis=1)
            z -= z.mean(axis=1, keepdims=True)
            z[constant] = 0.0  # exactly zero, so its correlations are exactly 0
        sq = _row_sq(z, xp)
    return ExactPairs(metric, z, sq, xp)


def pair_values(weights: Any, rows: Any, cols: Any, metric: str, *, xp: ModuleType = np) -> Any:
    """Exact values of the metric for pairs of neurons.

    Parameters
    ----------
    weights
        (d, n) weights, neuron j being column j (float32 or float64); computed in float64.
    rows, cols
        Integer arrays of equal length: the pairs ``(rows[p], cols[p])``.
    metric
        One of :data:`METRICS`.

    Returns
    -------
    ndarray
        (len(rows),) float64 values (not rank keys: larger is more alike for cosine and
        correlation).
    """
    return exact_pairs(weights, metric, xp=xp).values(xp.asarray(rows), xp.asarray(cols))


def rank_keys(values: Any, metric: str) -> Any:
    """Rank keys of metric values: smaller means more alike (see the module docstring)."""
    return values if is_distance(metric) else -values


def similarity_matrix(weights: Any, metric: str, *, xp: ModuleType = np) -> Any:
    """All pair values as a dense (n, n) float64 matrix (for small n; O(n^2) memory).

    Computed by the exact per-pair formulas, so the diagonal holds each neuron's value
    with itself (0 for the distances; 1 for cosine and correlation, or 0 for a zero or
    constant vector).
    """
    n = int(xp.asarray(weights).shape[1])
    ii, jj = xp.meshgrid(xp.arange(n), xp.arange(n), indexing="ij")
    return pair_values(weights, ii.ravel(), jj.ravel(), metric, xp=xp).reshape(n, n)


# ---------------------------------------------------------------------------------------
# Bounds for all pairs, block by block


@dataclass(frozen=True)
class PairBounds:
    """Guaranteed intervals ``[lo, lo + width(i, j)]`` on the rank key of every pair.

    ``scan(compact)`` computes the blocks in row order and yields ``compact(r0, lo)`` for
    each: ``lo`` is a (rows, n - r0) float64 array for the pairs (r0 + a, r0 + b), with
    ``+inf`` where ``b <= a`` (each pair once, ``i < j``). ``lo`` is a scratch buffer,
    valid only during the call, so ``compact`` must copy what it keeps; it may run in
    worker threads. ``exact`` evaluates exact values; ``tight`` says the widths are so
    small that exact values are needed only for near-ties.
    """

    metric: str
    n: int
    scan: Callable[[Compactor], Iterator[Any]]
    width: Callable[[Any, Any], Any]
    exact: ExactPairs
    tight: bool
    xp: ModuleType
    workers: int = 1  # threads the scan runs its blocks in

    def exact_keys(self, rows: Any, cols: Any, pool: ThreadPoolExecutor | None = None) -> Any:
        """Exact rank keys of pairs, float64, on the backend of ``xp`` (see ``values``)."""
        return rank_keys(self.exact.values(rows, cols, pool, self.workers), self.metric)

    def blocks(self) -> Iterator[tuple[int, Any]]:
        """``(r0, copy of lo)`` for every block (for tests and small n)."""
        return self.scan(lambda r0, lo: (r0, lo.copy()))


def pair_bounds(
    weights: Any,
    metric: str,
    *,
    xp: ModuleType = np,
    block_rows: int | None = None,
    threads: int | None = None,
) -> PairBounds:
    """Blocked, guaranteed bounds on the rank keys of all pairs of neurons.

    Parameters
    ----------
    weights
        (d, n) finite weights, neuron j being column j (see :func:`check_weights`).
    metric
        One of :data:`METRICS`.
    xp
        numpy or cupy; ``weights`` are moved there.
    block_rows
        Rows per block of the matrix-product metrics (default: about 64K elements per
        block, at least 128 rows).
    threads
        Worker threads on the CPU (default: the usable CPU cores); each block's matrix
        product runs on one BLAS thread.

    Returns
    -------
    PairBounds
    """
    check_metric(metric)
    exact = exact_pairs(weights, metric, xp=xp)
    n, d = (int(s) for s in exact.z.shape)
    if metric == "manhattan":
        if _is_cupy(xp):
            return _manhattan_bounds_cuda(weights, exact, xp, block_rows)
        if d + 1 < 65535:
            return _manhattan_bounds_quantised(exact, threads)
        return _manhattan_bounds_float(exact, threads)
    return _gram_bounds(exact, xp, block_rows, threads)


def _is_cupy(xp: ModuleType) -> bool:
    return getattr(xp, "__name__", "") == "cupy"


def _gamma(k: int, u: float) -> float:
    """Higham's gamma_k = k u / (1 - k u): the error bound of a k-term float sum."""
    return k * u / (1.0 - k * u)


def _block_rows(n: int, block_rows: int | None) -> int:
    if block_rows is not None:
        if block_rows < 1:
            raise ConfigError(f"block_rows must be >= 1, got {block_rows}")
        return block_rows
    return max(1, min(n, max(_MIN_BLOCK_ROWS, _BLOCK_ELEMENTS // max(n, 1))))


def _mask_lower(lo: Any, xp: ModuleType) -> None:
    """Set lo[a, b] = +inf where column b (offset like the rows) is not after row a."""
    rows = int(lo.shape[0])
    xp.copyto(lo[:, :rows], xp.inf, where=_lower_triangle(rows, xp))


@functools.lru_cache(maxsize=8)
def _lower_triangle(rows: int, xp: ModuleType) -> Any:
    return xp.tril(xp.ones((rows, rows), dtype=bool))


@functools.lru_cache(maxsize=1)
def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - a core dependency
        return None
    return ThreadpoolController()


def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS to one thread (process-wide) while the context lasts."""
    controller = _blas_controller()
    if controller is None:  # pragma: no cover
        return contextlib.nullcontext()
    return controller.limit(limits=1, user_api="blas")


def _gram_bounds(
    exact: ExactPairs, xp: ModuleType, block_rows: int | None, threads: int | None
) -> PairBounds:
    metric = exact.metric
    z = exact.z
    n, d = (int(s) for s in z.shape)
    rows = _block_rows(n, block_rows)
    if metric == "mse":
        sq = _row_sq(z, xp)
        top = float(sq.max()) if n else 0.0
        # |fl(a.b) - a.b| <= gamma_d |a||b| on each of |a|^2, |b|^2 and a.b, a few
        # roundings combining them, and as much again for the exact value's own error.
        eps = 2.0 * (_gamma(d, _U64) + 8 * _U64) * 4.0 * top / d
        # lo = -2/d a.b + (|a|^2/d - eps) + |b|^2/d
        row_term = sq / d - eps
        col_term = sq / d
        scale = -2.0 / d
    else:
        # cos = a.b inv_a inv_b, with inv = 0 for a zero row (so its cosines are 0).
        inv = xp.zeros(n)
        nz = exact.sq > 0
        inv[nz] = 1.0 / xp.sqrt(exact.sq[nz])
        eps = 2.0 * (2.0 * _gamma(d + 8, _U64))
        row_term = inv
        col_term = -inv

    def block(r0: int, local: Any, compact: Compactor) -> Any:
        r1 = min(n, r0 + rows)
        shape = (r1 - r0, n - r0)
        g = _scratch(local, "gram", shape, np.float64) if xp is np else xp.empty(shape)
        xp.matmul(z[r0:r1], z[r0:].T, out=g)
        if metric == "mse":
            g *= scale
            g += row_term[r0:r1, None]
            g += col_term[None, r0:]
        else:
            g *= row_term[r0:r1, None]
            g *= col_term[None, r0:]  # the rank key of a similarity is its negative
            g -= eps
        _mask_lower(g, xp)
        return compact(r0, g)

    def width(i: Any, j: Any) -> Any:
        return xp.full(i.shape, 2.0 * eps)

    # On the CPU, blocks run in threads, each product on one BLAS thread: no thread
    # spins waiting for a core that another process holds.
    workers = _threads(threads) if xp is np else 1
    scan = _threaded_scan(n, rows, workers, block, single_blas=xp is np)
    return PairBounds(metric, n, scan, width, exact, True, xp, workers)


def _row_sq(z: Any, xp: ModuleType) -> Any:
    """Squared norms of rows, by chunks (no full-size temporary)."""
    out = xp.empty(z.shape[0])
    buf = xp.empty((_EXACT_CHUNK, z.shape[1]))
    for r0 in range(0, int(z.shape[0]), _EXACT_CHUNK):
        r1 = min(int(z.shape[0]), r0 + _EXACT_CHUNK)
        part = buf[: r1 - r0]
        # The same summation as a pair's dot product, so cos(a, a) is exactly 1.
        xp.multiply(z[r0:r1], z[r0:r1], out=part)
        out[r0:r1] = part.sum(axis=1)
    return out


def _threads(threads: int | None) -> int:
    return max(1, int(threads)) if threads is not None else usable_cpus()


def _threaded_scan(
    n: int,
    rows: int,
    workers: int,
    block: Callable[[int, Any, Compactor], Any],
    *,
    single_blas: bool = False,
) -> Callable[[Compactor], Iterator[Any]]:
    """A scan whose blocks (and their compaction) run in ``workers`` threads, in order."""

    def scan(compact: Compactor) -> Iterator[Any]:
        starts = range(0, n, rows)
        local = threading.local()

        def one(r0: int) -> Any:
            return block(r0, local, compact)

        with _one_blas_thread() if single_blas else contextlib.nullcontext():
            if workers == 1 or n <= rows:
                yield from map(one, starts)
                return
            with ThreadPoolExecutor(workers) as pool:
                yield from pool.map(one, starts)

    return scan


def _scratch(local: Any, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A per-thread buffer of at least ``shape``, reused across blocks; a view of it."""
    size = int(np.prod(shape))
    buf = getattr(local, name, None)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = np.empty(size, dtype=dtype)
        setattr(local, name, buf)
    return buf[:size].reshape(shape)


def _manhattan_bounds_quantised(exact: ExactPairs, threads: int | None) -> PairBounds:
    z = exact.z
    n, d = (int(s) for s in z.shape)
    low = float(z.min()) if n else 0.0
    span = float(z.max()) - low if n else 0.0
    row_sums = z.sum(axis=1, dtype=np.float64) - d * low  # sums of the shifted rows
    # q <= 255 and sum_k q_k <= s sum_k x_k + d/2 < 65536: no min-sum can overflow uint16.
    scale = min(255.0 / span, (65535.0 - d) / float(row_sums.max())) if span > 0 else 1.0
    q, err = _quantise(z, low, scale)
    q_sums = q.sum(axis=1, dtype=np.int64)
    # Slack for the float64 rounding of the terms of each error sum.
    err = err * (1 + 1e-9) + 1e-9 * (row_sums + 1.0)
    # lo = (S_a + S_b - 2 m_ab) / s - e_a - e_b, split into per-row and per-column terms.
    row_term = q_sums / scale - err
    factor = -2.0 / scale

    def block(r0: int, local: Any, compact: Compactor) -> Any:
        r1 = min(n, r0 + _MANHATTAN_ROWS)
        mins = _min_sums(q, r0, r1, local)
        lo = _scratch(local, "lo", mins.shape, np.float64)
        np.multiply(mins, factor, out=lo)
        lo += row_term[r0:r1, None]
        lo += row_term[None, r0:]
        _mask_lower(lo, np)
        return compact(r0, lo)

    def width(i: Any, j: Any) -> Any:
        return 2.0 * (err[i] + err[j])

    workers = _threads(threads)
    scan = _threaded_scan(n, _MANHATTAN_ROWS, workers, block)
    return PairBounds("manhattan", n, scan, width, exact, False, np, workers)


def _quantise(z: np.ndarray, low: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """``q = round((z - low) scale)`` as uint8, and each row's ``sum |z - low - q / scale|``.

    By chunks of rows through one small buffer. Rounds half up (truncation of y + 0.5 >= 0;
    np.rint is several times slower); the residual is exact whatever the rounding.
    """
    n, d = z.shape
    q = np.empty((n, d), np.uint8)
    err = np.empty(n)
    buf = np.empty((_EXACT_CHUNK, d))
    for r0 in range(0, n, _EXACT_CHUNK):
        r1 = min(n, r0 + _EXACT_CHUNK)
        y = buf[: r1 - r0]
        np.subtract(z[r0:r1], low, out=y)
        y *= scale
        y += 0.5
        np.copyto(q[r0:r1], y, casting="unsafe")
        y -= q[r0:r1]
        y -= 0.5
        err[r0:r1] = np.abs(y, out=y).sum(axis=1)
    return q, err / scale


def _min_sums(q: np.ndarray, r0: int, r1: int, local: Any) -> np.ndarray:
    """sum_k min(q[a, k], q[b, k]) for rows a in [r0, r1) and b in [r0, n), uint16.

    uint8 minima and a uint16 sum run 32 and 16 lanes per SIMD instruction; tiles of a few
    rows by a hundred columns keep the (rows, cols, d) temporary in cache.
    """
    n, d = q.shape
    out = _scratch(local, "mins", (r1 - r0, n - r0), np.uint16)
    buf = _scratch(local, "tile", (_TILE_ROWS, _TILE_COLS, d), np.uint8)
    for a0 in range(r0, r1, _TILE_ROWS):
        a1 = min(r1, a0 + _TILE_ROWS)
        # Columns before a0 belong to pairs counted elsewhere (or the masked triangle).
        out[a0 - r0 : a1 - r0, : a0 - r0] = 0
        for b0 in range(a0, n, _TILE_COLS):
            b1 = min(n, b0 + _TILE_COLS)
            t = buf[: a1 - a0, : b1 - b0]
            np.minimum(q[a0:a1, None, :], q[None, b0:b1, :], out=t)
            t.sum(axis=2, dtype=np.uint16, out=out[a0 - r0 : a1 - r0, b0 - r0 : b1 - r0])
    return out


def _manhattan_bounds_float(exact: ExactPairs, threads: int | None) -> PairBounds:
    """Direct float32 Manhattan distances: for inputs too wide for 16-bit sums."""
    z = exact.z
    n, d = (int(s) for s in z.shape)
    x = z.astype(np.float32)
    abs_sums = np.abs(z).sum(axis=1, dtype=np.float64)
    gamma = 2.0 * _gamma(d + 2, _U32)

    def block(r0: int, local: Any, compact: Compactor) -> Any:
        r1 = min(n, r0 + _MANHATTAN_ROWS)
        lo = _scratch(local, "lo", (r1 - r0, n - r0), np.float64)
        for a in range(r0, r1):
            lo[a - r0] = np.abs(x[a] - x[r0:]).sum(axis=1, dtype=np.float32)
        lo -= gamma * (abs_sums[r0:r1, None] + abs_sums[None, r0:])
        _mask_lower(lo, np)
        return compact(r0, lo)

    def width(i: Any, j: Any) -> Any:
        return 2.0 * gamma * (abs_sums[i] + abs_sums[j])

    workers = _threads(threads)
    scan = _threaded_scan(n, _MANHATTAN_ROWS, workers, block)
    return PairBounds("manhattan", n, scan, width, exact, False, np, workers)


def _manhattan_bounds_cuda(
    weights: Any, exact: ExactPairs, xp: ModuleType, block_rows: int | None
) -> PairBounds:  # pragma: no cover - needs a GPU
    from aggregator.cuda_similarity import manhattan_cuda

    n, d = (int(s) for s in exact.z.shape)
    abs_sums = xp.abs(exact.z).sum(axis=1, dtype=xp.float64)
    # float32 sums in any order: |error| <= gamma_d sum_k |a_k - b_k| <= gamma_d (|a|_1 + |b|_1).
    gamma = 2.0 * _gamma(d + 2, _U32)
    rows = _block_rows(n, block_rows)
    # The kernel takes neurons as columns; column slices of a C-ordered matrix need no copy.
    w = xp.ascontiguousarray(xp.asarray(weights), dtype=xp.float32)
    row_term = -gamma * abs_sums

    def scan(compact: Compactor) -> Iterator[Any]:
        buf = xp.empty(rows * n, dtype=xp.float32)
        lo_buf = xp.empty(rows * n)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            shape = (r1 - r0, n - r0)
            dist = buf[: shape[0] * shape[1]].reshape(shape)
            manhattan_cuda(w[:, r0:r1], w[:, r0:], out=dist)
            lo = lo_buf[: shape[0] * shape[1]].reshape(shape)
            lo[...] = dist
            lo += row_term[r0:r1, None]
            lo += row_term[None, r0:]
            _mask_lower(lo, xp)
            yield compact(r0, lo)

    def width(i: Any, j: Any) -> Any:
        return 2.0 * gamma * (abs_sums[i] + abs_sums[j])

    return PairBounds("manhattan", n, scan, width, exact, False, xp)


def total_pairs(n: int) -> int:
    """n (n - 1) / 2."""
    return n * (n - 1) // 2


__all__ = [
    "DISTANCES",
    "METRICS",
    "ExactPairs",
    "PairBounds",
    "check_metric",
    "check_weights",
    "exact_pairs",
    "is_distance",
    "pair_bounds",
    "pair_values",
    "rank_keys",
    "similarity_matrix",
    "total_pairs",
]
