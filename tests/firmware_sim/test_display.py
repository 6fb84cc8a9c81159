"""The live display: rendering, terminal redraw, plain log lines."""

from __future__ import annotations

import io

from firmware_sim.display import Display, render, summary_line
from firmware_sim.state import FleetState, NodeState


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _state() -> FleetState:
    state = FleetState(broker="up", aggregator="waiting", elapsed=12.0)
    state.nodes["node-1"] = NodeState(
        "node-1",
        "nano",
        status="training",
        round=1,
        images_done=300,
        images_total=600,
        images_per_s=150,
    )
    state.nodes["node-2"] = NodeState(
        "node-2", status="published", round=1, images_done=600, images_total=600, accuracy=0.8123
    )
    rnd = state.round_state(1, 2)
    rnd.arrivals.append("node-2")
    return state


def test_render_shows_each_node_and_round():
    lines = render(_state(), width=200)
    text = "\n".join(lines)
    assert "node-1" in text and "nano" in text and "300/600" in text and "150 img/s" in text
    assert "########........" in lines[1]  # half the bar
    assert "acc  81.2%" in text
    assert "round 1: 1/2 updates" in text
    assert all(len(line) <= 60 for line in render(_state(), width=60))


def test_summary_line():
    line = summary_line(_state())
    assert "900/1200 images" in line and "round 1: 1/2 updates" in line


def test_log_mode_prints_each_event_once_and_no_escape_codes():
    out = io.StringIO()
    display = Display(out, summary_every=1e9)
    state = _state()
    state.note("node-2 published")
    display.refresh(state)
    display.refresh(state)
    state.note("round 1 merged")
    display.close(state)
    text = out.getvalue()
    assert text.count("node-2 published") == 1
    assert text.count("round 1 merged") == 1
    assert "\033" not in text
    assert "900/1200" in text.splitlines()[-1]


def test_terminal_mode_redraws_in_place():
    out = _Tty()
    display = Display(out, max_hz=1e9)
    assert display.live
    state = _state()
    display.refresh(state)
    first = out.getvalue()
    display.refresh(state)
    n_lines = len(render(state, 100))
    # The second draw moves the cursor up over the first block before redrawing.
    assert f"\033[{n_lines}F" in out.getvalue()[len(first) :]
    display.message("hello")
    assert out.getvalue().endswith("hello\n")


def test_quiet_prints_nothing():
    out = io.StringIO()
    display = Display(out, quiet=True)
    state = _state()
    state.note("x")
    display.refresh(state, force=True)
    display.message("y")
    display.close(state)
    assert out.getvalue() == ""
