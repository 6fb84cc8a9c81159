"""A board's paced trainer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from firmware_sim.board import PacedTrainer


@dataclass
class _Outcome:
    metrics: dict = field(default_factory=dict)


class _Busy:
    """A trainer that burns CPU: 20 images of ~2 ms each."""

    def train(self, announcement, n, start, progress):
        for i in range(20):
            end = time.thread_time() + 0.002
            while time.thread_time() < end:
                pass
            progress(i + 1, 20)
        return _Outcome()

    def evaluate(self, model):
        return {"accuracy": 0.5}


def test_paced_trainer_stretches_wall_time_by_one_over_speed():
    seen = []
    t0, c0 = time.perf_counter(), time.thread_time()
    outcome = PacedTrainer(_Busy(), 0.25).train(None, 10, None, lambda d, t: seen.append(d))
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    assert seen == list(range(1, 21))
    assert wall >= 3.5 * cpu  # ~4x: compute + 3x compute of sleep
    assert outcome.metrics["paced_sleep_seconds"] > 2.5 * cpu


def test_full_speed_board_is_not_wrapped_in_sleep():
    t0 = time.perf_counter()
    assert PacedTrainer(_Busy(), 1.0).evaluate(None) == {"accuracy": 0.5}
    assert time.perf_counter() - t0 < 0.5
