"""The walk over ranked pairs and the removal rules, on small crafted cases."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.removal import RULES, check_rule, rule_strength, walk
from estdp.errors import ConfigError


def _chunks(pairs: list[tuple[int, int]], size: int = 2):
    for p0 in range(0, len(pairs), size):
        part = pairs[p0 : p0 + size]
        yield np.array([p[0] for p in part]), np.array([p[1] for p in part])


def test_later_rule_drops_the_second_neuron_of_each_pair():
    result = walk(_chunks([(0, 1), (2, 3)]), 4, 2)
    assert result.removed.tolist() == [1, 3]
    assert result.complete
    assert result.consumed == 2


def test_pairs_with_a_removed_neuron_are_skipped():
    # (0, 1) removes 1; (1, 2) is skipped; (0, 2) removes 2.
    result = walk(_chunks([(0, 1), (1, 2), (0, 2), (3, 4)]), 5, 2)
    assert result.removed.tolist() == [1, 2]
    assert result.consumed == 3


def test_walk_stops_at_the_number_of_removals():
    result = walk(_chunks([(0, 1), (2, 3), (4, 5)]), 6, 1)
    assert result.removed.tolist() == [1]
    assert result.consumed == 1


def test_walk_reports_running_out_of_pairs():
    result = walk(_chunks([(0, 1), (0, 1)]), 4, 2)
    assert result.removed.tolist() == [1]
    assert not result.complete


def test_no_removals_reads_nothing():
    def exploding():
        raise AssertionError("read")
        yield  # pragma: no cover

    result = walk(exploding(), 3, 0)
    assert result.removed.size == 0 and result.complete and result.consumed == 0


def test_strength_drops_the_weaker_neuron_and_ties_drop_the_later():
    strength = np.array([1.0, 5.0, 2.0, 2.0])
    result = walk(_chunks([(0, 1), (2, 3)]), 4, 2, strength)
    # 0 is weaker than 1 -> 0 goes; 2 and 3 are equal -> the later (3) goes.
    assert result.removed.tolist() == [0, 3]


def test_the_rule_changes_what_later_pairs_can_remove():
    pairs = [(0, 1), (1, 2), (0, 2)]
    later = walk(_chunks(pairs), 3, 2)
    strong_1 = walk(_chunks(pairs), 3, 2, np.array([0.0, 1.0, 0.5]))
    assert later.removed.tolist() == [1, 2]
    assert strong_1.removed.tolist() == [0, 2]


def test_rule_strengths():
    thetas = np.array([0.1, 0.3, 0.2], np.float32)
    rates = np.array([[1.0, 0.0, 3.0], [3.0, 0.0, 1.0]], np.float32)
    assert rule_strength("later", thetas, rates) is None
    np.testing.assert_allclose(rule_strength("theta", thetas, rates), [0.1, 0.3, 0.2], rtol=1e-6)
    np.testing.assert_allclose(rule_strength("activity", thetas, rates), [2.0, 0.0, 2.0])
    assert set(RULES) == {"later", "activity", "theta"}


def test_unknown_rule_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown removal rule 'random'"):
        check_rule("random")
