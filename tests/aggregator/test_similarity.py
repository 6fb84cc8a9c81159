"""The four metrics against their formulas, and the blocked bounds against exact values."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from aggregator import similarity as sim
from estdp.errors import ConfigError, MergeError


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

# The slides' example: two 2 x 2 weight matrices, flattened row by row.
SLIDE_A = np.array([0.1, 0.2, 0.3, 0.4])
SLIDE_B = np.array([0.2, 0.3, 0.1, 0.4])


def _columns(*vectors: np.ndarray) -> np.ndarray:
    """Weights (d, n) with the vectors as neurons."""
    return np.stack([np.asarray(v, dtype=np.float32) for v in vectors], axis=1)


def _value(a, b, metric):
    return float(sim.pair_values(_columns(a, b), np.array([0]), np.array([1]), metric)[0])


def test_manhattan_of_the_slides_example_is_0_4():
    assert _value(SLIDE_A, SLIDE_B, "manhattan") == pytest.approx(0.4, abs=1e-6)


def test_mse_is_the_mean_of_squared_differences():
    # (0.01 + 0.01 + 0.04 + 0) / 4
    assert _value(SLIDE_A, SLIDE_B, "mse") == pytest.approx(0.015, abs=1e-7)


def test_cosine_matches_its_formula():
    a, b = np.array([1.0, 2.0, 0.0, 2.0]), np.array([2.0, 0.0, 1.0, 2.0])
    expected = (2 + 0 + 0 + 4) / (3.0 * 3.0)
    assert _value(a, b, "cosine") == pytest.approx(expected, rel=1e-12)
    assert _value(a, -a, "cosine") == pytest.approx(-1.0, rel=1e-12)
    assert _value(a, 3 * a, "cosine") == pytest.approx(1.0, rel=1e-12)


def test_correlation_is_pearson():
    rng = np.random.default_rng(0)
    a, b = rng.random(784), rng.random(784)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    expected = np.corrcoef(a32.astype(np.float64), b32.astype(np.float64))[0, 1]
    assert _value(a32, b32, "correlation") == pytest.approx(expected, rel=1e-10)
    # Invariant to shift and positive scale, unlike cosine.
    assert _value(a32, 2 * a32 + 5, "correlation") == pytest.approx(1.0, rel=1e-6)
    assert _value(a32, 2 * a32 + 5, "cosine") < 0.99


def test_identical_neurons_are_exactly_alike():
    rng = np.random.default_rng(1)
    a = rng.random(784).astype(np.float32)
    assert _value(a, a, "mse") == 0.0
    assert _value(a, a, "manhattan") == 0.0
    assert _value(a, a, "cosine") == 1.0
    assert _value(a, a, "correlation") == 1.0


def test_zero_and_constant_vectors_have_zero_similarity():
    rng = np.random.default_rng(2)
    a = rng.random(16)
    zero, const = np.zeros(16), np.full(16, 0.3)
    assert _value(a, zero, "cosine") == 0.0
    assert _value(zero, zero, "cosine") == 0.0
    assert _value(a, const, "correlation") == 0.0
    assert _value(const, const, "correlation") == 0.0
    # A constant but non-zero vector still has a cosine.
    assert _value(a, const, "cosine") > 0.5


@pytest.mark.parametrize("metric", sim.METRICS)
def test_values_match_the_slow_formulas(metric):
    rng = np.random.default_rng(3)
    w = rng.random((784, 6)).astype(np.float32)
    w[:, 4] = 0.0
    w[:, 5] = 0.25
    got = sim.similarity_matrix(w, metric)
    want = np.array(
        [[ref.similarity(w[:, i], w[:, j], metric) for j in range(6)] for i in range(6)]
    )
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(got, got.T)


def test_rank_keys_put_the_most_alike_first():
    values = np.array([0.1, 0.5, 0.9])
    assert np.argmin(sim.rank_keys(values, "mse")) == 0
    assert np.argmin(sim.rank_keys(values, "cosine")) == 2


def test_unknown_metric_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown similarity metric 'euclid'"):
        sim.check_metric("euclid")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(bad):
    w = np.ones((784, 4), dtype=np.float32)
    w[3, 2] = bad
    with pytest.raises(MergeError, match="1 NaN or infinite"):
        sim.check_weights(w)


def _all_bounds(bounds: sim.PairBounds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair's (i, j, lo) from the blocks, checking that each appears once."""
    n = bounds.n
    seen = np.zeros((n, n), dtype=int)
    lo_all = np.full((n, n), np.nan)
    for r0, lo in bounds.blocks():
        rows, cols = lo.shape
        assert cols == n - r0
        for a in range(rows):
            for b in range(cols):
                if np.isfinite(lo[a, b]):
                    seen[r0 + a, r0 + b] += 1
                    lo_all[r0 + a, r0 + b] = lo[a, b]
    iu = np.triu_indices(n, 1)
    assert (seen[iu] == 1).all()
    assert seen.sum() == len(iu[0])
    return iu[0], iu[1], lo_all[iu]


def _weights_for_bounds(kind: str) -> np.ndarray:
    rng = np.random.default_rng(4)
    if kind == "random":
        w = rng.random((784, 70)).astype(np.float32) * 0.3
    else:
        w = np.concatenate(ref.trained_like(2, 35, rng), axis=1)
    w[:, 10] = w[:, 3]  # exact duplicates: ties
    w[:, 11] = w[:, 3]
    w[:, 20] = 0.0
    w[:, 21] = 0.2
    return w


@pytest.mark.parametrize("kind", ["random", "trained"])
@pytest.mark.parametrize("metric", sim.METRICS)
def test_bounds_contain_the_exact_rank_keys(metric, kind):
    w = _weights_for_bounds(kind)
    bounds = sim.pair_bounds(w, metric, block_rows=16, threads=2)
    rows, cols, lo = _all_bounds(bounds)
    exact = sim.rank_keys(sim.pair_values(w, rows, cols, metric), metric)
    hi = lo + bounds.width(rows, cols)
    assert (lo <= exact).all()
    assert (exact <= hi).all()
    # The intervals are narrow enough to be useful.
    spread = np.ptp(exact)
    assert np.median(hi - lo) < 0.05 * spread
    np.testing.assert_array_equal(bounds.exact_keys(rows[:50], cols[:50]), exact[:50])


def test_matrix_product_bounds_are_tight():
    w = _weights_for_bounds("trained")
    for metric in ("mse", "cosine", "correlation"):
        bounds = sim.pair_bounds(w, metric)
        assert bounds.tight
        assert float(bounds.width(np.array([0]), np.array([1]))[0]) < 1e-10


def test_float_manhattan_fallback_bounds_hold():
    # The path for inputs too wide for 16-bit sums, exercised here on a narrow input.
    w = _weights_for_bounds("random")[:, :50]
    bounds = sim._manhattan_bounds_float(sim.exact_pairs(w, "manhattan"), threads=2)
    rows, cols, lo = _all_bounds(bounds)
    exact = sim.pair_values(w, rows, cols, "manhattan")
    assert (lo <= exact).all()
    assert (exact <= lo + bounds.width(rows, cols)).all()


def test_quantised_manhattan_handles_negative_and_constant_weights():
    rng = np.random.default_rng(5)
    w = (rng.random((40, 12)) - 0.5).astype(np.float32)
    for data in (w, np.zeros_like(w)):
        bounds = sim.pair_bounds(data, "manhattan", threads=1)
        rows, cols, lo = _all_bounds(bounds)
        exact = sim.pair_values(data, rows, cols, "manhattan")
        assert (lo <= exact).all()
        assert (exact <= lo + bounds.width(rows, cols)).all()


def test_block_rows_must_be_positive():
    with pytest.raises(ConfigError):
        sim.pair_bounds(np.ones((8, 4), np.float32), "mse", block_rows=0)
