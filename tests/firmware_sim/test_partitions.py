"""Partitioners: disjointness, coverage, class proportions, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from estdp.errors import ConfigError
from firmware_sim import partitions as P

N_CLASSES = 10


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    # Balanced-ish synthetic labels, as MNIST's (about 10% per class).
    return np.random.default_rng(123).integers(0, N_CLASSES, size=6000)


ALL_SPECS = ["iid", "contiguous", "classes:2", "dirichlet:0.1", "dirichlet:1.0", "unequal:1.0"]


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_shards_are_disjoint_and_cover_the_pool(labels, spec):
    shards = P.partition(labels, 5, spec, seed=7)
    assert len(shards) == 5
    joined = np.concatenate(shards)
    assert joined.dtype == np.int64
    assert joined.shape[0] == labels.shape[0]
    assert np.array_equal(np.sort(joined), np.arange(labels.shape[0]))
    assert all(s.shape[0] > 0 for s in shards)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_same_seed_same_shards_other_seed_other_shards(labels, spec):
    a = P.partition(labels, 4, spec, seed=1)
    b = P.partition(labels, 4, spec, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    if spec != "contiguous":
        c = P.partition(labels, 4, spec, seed=2)
        assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_shards_have_equal_sizes_and_pool_class_proportions(labels):
    shards = P.iid(labels, 5, seed=0)
    sizes = [s.shape[0] for s in shards]
    assert max(sizes) - min(sizes) <= 1
    pool = np.bincount(labels, minlength=N_CLASSES) / labels.shape[0]
    counts = P.class_counts(labels, shards)
    props = counts / counts.sum(axis=1, keepdims=True)
    # 1200 images per shard: each class share within 4 points of the pool's.
    assert np.abs(props - pool).max() < 0.04


def test_contiguous_is_the_seed_split_of_the_first_images(labels):
    shards = P.contiguous(labels, 3)
    assert np.array_equal(shards[0], np.arange(2000))
    assert np.array_equal(shards[2], np.arange(4000, 6000))


def test_per_class_shards_hold_about_c_classes(labels):
    shards = P.by_class(labels, 5, classes_per_node=2, seed=3)
    counts = P.class_counts(labels, shards)
    for row in counts:
        # A class shard may straddle a class boundary: at most 2 * C classes, and the two
        # largest classes hold nearly all of the shard.
        assert (row > 0).sum() <= 4
        assert np.sort(row)[-2:].sum() >= 0.9 * row.sum()


def test_dirichlet_small_alpha_is_skewed_and_large_alpha_is_near_iid(labels):
    def skew(alpha: float) -> float:
        counts = P.class_counts(labels, P.dirichlet(labels, 5, alpha=alpha, seed=11))
        props = counts / counts.sum(axis=1, keepdims=True)
        return float(props.max(axis=1).mean())  # share of each node's biggest class

    assert skew(0.1) > 0.5
    assert skew(1000.0) < 0.15
    assert skew(0.1) > skew(1.0) > skew(1000.0)


def test_shards_are_shuffled_within(labels):
    # A class-sorted stream would wreck STDP: the node's order must mix its classes.
    for shard in P.dirichlet(labels, 3, alpha=1.0, seed=0):
        changes = np.count_nonzero(np.diff(labels[shard]))
        assert changes > shard.shape[0] // 3


def test_unequal_sizes_differ_and_sigma_zero_is_equal(labels):
    sizes = [s.shape[0] for s in P.unequal(labels, 5, sigma=1.5, seed=4)]
    assert max(sizes) > 2 * min(sizes)
    equal = [s.shape[0] for s in P.unequal(labels, 5, sigma=0.0, seed=4)]
    assert max(equal) - min(equal) <= 5


def test_sizes_follow_fractions(labels):
    shards = P.partition(labels, 3, "sizes:0.5,0.3,0.2", seed=0)
    assert [s.shape[0] for s in shards] == pytest.approx([3000, 1800, 1200], abs=3)


def test_every_node_gets_data_even_when_dirichlet_leaves_one_empty():
    labels = np.repeat(np.arange(2), 10)
    for seed in range(30):
        shards = P.dirichlet(labels, 8, alpha=0.01, seed=seed)
        assert all(s.shape[0] >= 1 for s in shards)
        assert np.concatenate(shards).shape[0] == 20


@pytest.mark.parametrize(
    "text",
    [
        "nope",
        "iid:3",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:x",
        "classes:1.5",
        "sizes:",
        "sizes:1,-1",
    ],
)
def test_bad_specs_raise_config_errors(text):
    with pytest.raises(ConfigError):
        P.parse_spec(text)


def test_spec_round_trips_and_defaults():
    assert str(P.parse_spec("Dirichlet")) == "dirichlet:0.5"
    assert str(P.parse_spec("classes:3")) == "classes:3"
    assert str(P.parse_spec("sizes:0.5,0.5")) == "sizes:0.5,0.5"
    assert P.parse_spec("unequal:0").value == 0.0


def test_bad_inputs(labels):
    with pytest.raises(ConfigError, match="cannot be split"):
        P.iid(labels[:3], 5)
    with pytest.raises(ConfigError, match=">= 1"):
        P.iid(labels, 0)
    with pytest.raises(ConfigError, match="integers"):
        P.iid(labels.astype(float), 2)
    with pytest.raises(ConfigError, match="3 fractions for 2 nodes"):
        P.partition(labels, 2, "sizes:1,1,1")
