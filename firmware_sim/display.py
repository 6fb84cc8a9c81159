"""Live view of the fleet: a compact block redrawn in place on a terminal, log lines otherwise.

On a terminal, :meth:`Display.refresh` redraws one line per node (status, round, images
trained, images/s, a bar) and one line per round (arrivals, merge time, accuracy) at most
``max_hz`` times a second. Elsewhere (a pipe, a CI log) it prints each new event once as a
plain timestamped line, plus a one-line progress summary every ``summary_every`` seconds,
so logs stay readable and bounded.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from firmware_sim.state import FleetState, NodeState

BAR_WIDTH = 16


def _bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = int(round(width * min(max(fraction, 0.0), 1.0)))
    return "#" * filled + "." * (width - filled)


def _node_line(node: NodeState, name_width: int) -> str:
    acc = f" acc {100 * node.accuracy:5.1f}%" if node.accuracy is not None else ""
    restarts = f" restarts {node.restarts}" if node.restarts else ""
    rnd = f"r{node.round}" if node.round else "r-"
    return (
        f"{node.node_id:<{name_width}} {node.device:<9} {node.status:<10} {rnd:<3} "
        f"[{_bar(node.fraction)}] {node.images_done:>6}/{node.images_total:<6} "
        f"{node.images_per_s:7.0f} img/s{acc}{restarts}"
    )


def render(state: FleetState, width: int = 100, events: int = 3) -> list[str]:
    """The display block for ``state`` as lines no wider than ``width``."""
    lines = [f"fleet {state.elapsed:7.1f}s  broker {state.broker}  aggregator {state.aggregator}"]
    nodes = list(state.nodes.values())
    if state.baseline is not None:
        nodes.append(state.baseline)
    name_width = max((len(n.node_id) for n in nodes), default=4)
    lines += [_node_line(n, name_width) for n in nodes]
    for rnd in sorted(state.rounds.values(), key=lambda r: r.round):
        merge = f"merged in {rnd.merge_seconds:.3f} s" if rnd.merge_seconds is not None else ""
        size = f" -> {rnd.global_neurons} neurons" if rnd.global_neurons else ""
        acc = f"  acc {100 * rnd.accuracy:.2f}%" if rnd.accuracy is not None else ""
        lines.append(
            f"round {rnd.round}: {len(rnd.arrivals)}/{rnd.expected} updates  {merge}{size}{acc}"
        )
    lines += state.events[-events:] if events else []
    return [line[:width] for line in lines]


def summary_line(state: FleetState) -> str:
    """One plain line: elapsed time, images trained over all nodes, current round."""
    done = sum(n.images_done for n in state.nodes.values())
    total = sum(n.images_total for n in state.nodes.values())
    rate = sum(n.images_per_s for n in state.nodes.values() if n.status == "training")
    rnd = state.current_round
    where = f"round {rnd.round}: {len(rnd.arrivals)}/{rnd.expected} updates" if rnd else "no round"
    base = ""
    if state.baseline is not None:
        b = state.baseline
        base = f"; baseline {b.images_done}/{b.images_total} ({b.status})"
    return f"[{state.elapsed:6.1f}s] nodes {done}/{total} images ({rate:.0f} img/s); {where}{base}"


class Display:
    """Shows a :class:`FleetState` live on a terminal, or as log lines elsewhere."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        live: bool | None = None,
        max_hz: float = 4.0,
        summary_every: float = 10.0,
        quiet: bool = False,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.live = isatty() if live is None else live
        self.quiet = quiet
        self.min_interval = 1.0 / max_hz
        self.summary_every = summary_every
        self._drawn = 0
        self._last_draw = -1e9
        self._last_summary = time.monotonic()
        self._events_seen = 0

    def refresh(self, state: FleetState, *, force: bool = False) -> None:
        """Redraw (terminal) or print new events and a periodic summary (log)."""
        if self.quiet:
            return
        now = time.monotonic()
        if self.live:
            if not force and now - self._last_draw < self.min_interval:
                return
            self._last_draw = now
            self._redraw(render(state, self._width()))
            return
        for event in state.events[self._events_seen :]:
            self.stream.write(event + "\n")
        self._events_seen = len(state.events)
        if force or now - self._last_summary >= self.summary_every:
            self._last_summary = now
            self.stream.write(summary_line(state) + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line above the live block (or as a log line)."""
        if self.quiet:
            return
        if self.live:
            self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self, state: FleetState) -> None:
        """Leave the final block on screen (terminal) or print the final summary (log)."""
        if self.quiet:
            return
        self.refresh(state, force=True)
        self._drawn = 0
        self._events_seen = len(state.events)

    def _width(self) -> int:
        try:
            import shutil

            return max(60, shutil.get_terminal_size((100, 24)).columns - 1)
        except OSError:
            return 100

    def _clear(self) -> None:
        if self._drawn:
            # Cursor up over the previous block, then clear to the end of the screen.
            self.stream.write(f"\033[{self._drawn}F\033[J")
            self._drawn = 0

    def _redraw(self, lines: list[str]) -> None:
        self._clear()
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn = len(lines)
