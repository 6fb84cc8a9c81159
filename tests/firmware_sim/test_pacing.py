"""Device pacing and JSON progress lines."""

from __future__ import annotations

import io
import json

import pytest

from firmware_sim.pacing import Pacer, ProgressLines, chain


class _Fake:
    def __init__(self) -> None:
        self.cpu = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.cpu

    def sleep(self, s: float) -> None:
        self.slept.append(s)


def test_pacer_sleeps_so_wall_time_is_compute_over_speed():
    fake = _Fake()
    pacer = Pacer(0.25, min_sleep=0.05, cpu_clock=fake.clock, sleep=fake.sleep)
    for _ in range(100):
        fake.cpu += 0.001  # one image: 1 ms of compute
        pacer(0)
    pacer.flush()
    # 100 ms of compute at 0.25x speed: 300 ms of sleep, in batches of >= 50 ms.
    assert sum(fake.slept) == pytest.approx(0.3)
    assert all(s >= 0.05 for s in fake.slept[:-1])
    assert len(fake.slept) <= 7


def test_full_speed_never_sleeps():
    fake = _Fake()
    pacer = Pacer(1.0, cpu_clock=fake.clock, sleep=fake.sleep)
    fake.cpu += 10.0
    pacer(0)
    pacer.flush()
    assert fake.slept == []


def test_progress_lines_are_rate_limited_json_and_always_report_the_end():
    out = io.StringIO()
    t = [0.0]
    lines = ProgressLines(100, stream=out, max_hz=1.0, extra={"node": "n1"}, clock=lambda: t[0])
    for done in range(1, 101):
        t[0] = done * 0.05  # 5 s in total
        lines(done)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert 4 <= len(records) <= 7
    assert records[-1]["done"] == 100 and records[-1]["node"] == "n1"
    assert records[-1]["rate"] == pytest.approx(20.0)


def test_chain_calls_each():
    seen: list[tuple[str, int]] = []
    cb = chain(lambda d: seen.append(("a", d)), None, lambda d: seen.append(("b", d)))
    cb(3)
    assert seen == [("a", 3), ("b", 3)]
