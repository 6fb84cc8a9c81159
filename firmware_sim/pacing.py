"""Device pacing and progress reporting inside a simulated board's process.

:class:`Pacer` is a training progress callback. It measures the CPU time the training
thread spent since the last call and sleeps ``pace_delay(cpu, speed)`` (see
:mod:`firmware_sim.profiles`), so the board's wall time per image is its compute time
divided by its speed. Sleeps are batched (at least ``min_sleep`` seconds at once) because
one image takes about a millisecond and a sleep that short costs as much as it waits.

:class:`ProgressLines` reports progress to the orchestrator as JSON lines on a stream
(``{"event": "progress", "done": .., "total": .., "rate": ..}``), at most ``max_hz``
times a second plus the last one.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from firmware_sim.profiles import pace_delay


class Pacer:
    """Sleeps after training work so that a board of relative ``speed`` is emulated."""

    def __init__(
        self,
        speed: float,
        *,
        min_sleep: float = 0.02,
        cpu_clock: Callable[[], float] = time.thread_time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.speed = speed
        self.min_sleep = min_sleep
        self._cpu = cpu_clock
        self._sleep = sleep
        self._last = cpu_clock()
        self._owed = 0.0
        self.slept = 0.0

    def __call__(self, done: int = 0) -> None:
        now = self._cpu()
        self._owed += pace_delay(now - self._last, self.speed)
        self._last = now
        if self._owed >= self.min_sleep:
            self._sleep(self._owed)
            self.slept += self._owed
            self._owed = 0.0

    def flush(self) -> None:
        """Pay any delay still owed (end of a training pass)."""
        self.__call__()
        if self._owed > 0:
            self._sleep(self._owed)
            self.slept += self._owed
            self._owed = 0.0


def emit(record: dict[str, Any], stream: TextIO | None = None) -> None:
    """One JSON line to ``stream`` (stdout by default), flushed."""
    out = stream if stream is not None else sys.stdout
    out.write(json.dumps(record, sort_keys=True) + "\n")
    out.flush()


class ProgressLines:
    """A progress callback that emits JSON lines, rate-limited."""

    def __init__(
        self,
        total: int,
        *,
        stream: TextIO | None = None,
        max_hz: float = 2.0,
        extra: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.stream = stream
        self.min_interval = 1.0 / max_hz
        self.extra = extra or {}
        self._clock = clock
        self._start = clock()
        self._last = -1e9

    def __call__(self, done: int) -> None:
        now = self._clock()
        if done < self.total and now - self._last < self.min_interval:
            return
        self._last = now
        rate = done / max(now - self._start, 1e-9)
        emit(
            {
                "event": "progress",
                "done": int(done),
                "total": self.total,
                "rate": rate,
                **self.extra,
            },
            self.stream,
        )


def chain(*callbacks: Callable[[int], None] | None) -> Callable[[int], None]:
    """One progress callback that calls each of ``callbacks`` (None entries skipped)."""
    live = [cb for cb in callbacks if cb is not None]

    def call(done: int) -> None:
        for cb in live:
            cb(done)

    return call
