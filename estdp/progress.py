"""Progress of long work: a one-line bar with rate and ETA on a terminal, quiet otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """A minimal progress bar: ``update(done)`` redraws at most ``max_hz`` times a second.

    It draws only when ``stream`` is a terminal (or ``force`` is true), so logs and pipes
    stay clean; ``close()`` ends the line.
    """

    def __init__(
        self,
        total: int,
        label: str = "",
        unit: str = "img",
        stream: TextIO | None = None,
        force: bool | None = None,
        max_hz: float = 5.0,
    ) -> None:
        self.total = max(int(total), 0)
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.enabled = isatty() if force is None else force
        self.min_interval = 1.0 / max_hz
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self.done = 0

    def update(self, done: int) -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last_draw < self.min_interval and done < self.total:
            return
        self._last_draw = now
        self.stream.write("\r" + self.render(now) + "\033[K")
        self.stream.flush()

    def render(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        frac = self.done / self.total if self.total else 1.0
        width = 24
        filled = int(width * min(frac, 1.0))
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = _fmt_seconds(eta) if eta != float("inf") else "?"
        prefix = f"{self.label} " if self.label else ""
        return (
            f"{prefix}[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{rate:,.0f} {self.unit}/s  elapsed {_fmt_seconds(elapsed)}  ETA {eta_text}"
        )

    def close(self) -> None:
        if self.enabled:
            self.update(self.done) if self.done < self.total else None
            self.stream.write("\r" + self.render() + "\033[K\n")
            self.stream.flush()


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes}:{sec:02d}"
