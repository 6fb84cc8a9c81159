"""Shared helpers of the network: decays, tie-break, normalisation, rest."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_node.network import decays, normalise_columns, pick_winner, rest_decay
from estdp.params import BINDSNET, PAPER


def test_decays_follow_the_time_constants():
    dec = decays(BINDSNET.replace(dt=0.5))
    assert dec.v == pytest.approx(math.exp(-0.5 / 100.0))
    assert dec.trace == pytest.approx(math.exp(-0.5 / 20.0))
    assert dec.theta == pytest.approx(math.exp(-0.5 / 1e7))


@pytest.mark.parametrize(("choice", "expected"), [(0.0, 3), (0.33, 3), (0.34, 5), (0.999, 9)])
def test_pick_winner_is_floor_of_choice_times_count(choice, expected):
    assert pick_winner(np.array([3, 5, 9]), choice) == expected


def test_normalise_columns_sets_every_column_sum_and_keeps_zero_columns():
    w = np.array([[1.0, 0.0, 0.2], [3.0, 0.0, 0.2]], dtype=np.float32)
    out = normalise_columns(w, 78.4)
    assert out.dtype == np.float32
    assert np.allclose(out.sum(axis=0), [78.4, 0.0, 78.4])
    assert out[1, 0] == pytest.approx(3 * out[0, 0])
    assert w[0, 0] == 1.0  # input untouched


def test_rest_decay_only_with_rest_steps():
    theta = np.array([10.0, 0.0])
    assert rest_decay(theta, BINDSNET) is theta
    rested = rest_decay(theta, PAPER)
    assert rested[0] == pytest.approx(10.0 * math.exp(-150 / 1e7))
    assert rested[0] < 10.0
