"""The fault plan: parsing and triggers."""

from __future__ import annotations

import pytest

from estdp.errors import ConfigError
from firmware_sim.faults import due_faults, is_due, parse_fault
from firmware_sim.state import FleetState, NodeState

NODES = ["node-1", "node-2", "node-3"]


def test_parse_forms():
    f = parse_fault("kill-node:2@r1:50%", NODES)
    assert (f.action, f.target, f.round, f.progress) == ("kill-node", "node-2", 1, 0.5)
    f = parse_fault("restart-aggregator@r2:arrivals=3+2.5", NODES)
    assert (f.round, f.arrivals, f.down_seconds, f.target) == (2, 3, 2.5, None)
    f = parse_fault("restart-broker@12.5s", NODES)
    assert (f.at_seconds, f.down_seconds) == (12.5, 1.0)
    assert parse_fault("restart-node:node-3@1s", NODES).target == "node-3"


@pytest.mark.parametrize(
    "text",
    [
        "explode@1s",
        "kill-node@1s",
        "kill-node:9@1s",
        "kill-node:2@soon",
        "restart-broker:1@1s",
        "kill-node:1@r0:10%",
        "kill-node:1@r1:150%",
        "kill-node:1",
    ],
)
def test_bad_faults(text):
    with pytest.raises(ConfigError):
        parse_fault(text, NODES)


def _state() -> FleetState:
    state = FleetState()
    for i, node_id in enumerate(NODES):
        state.nodes[node_id] = NodeState(
            node_id, round=1, images_done=10 * (i + 1), images_total=100
        )
    state.round_state(1, 3)
    return state


def test_triggers():
    state = _state()
    plan = [
        parse_fault("kill-node:2@r1:20%", NODES),  # node-2 at 20%: due
        parse_fault("kill-node:3@r1:50%", NODES),  # node-3 at 30%: not yet
        parse_fault("restart-broker@r1:15%", NODES),  # slowest node at 10%: not yet
        parse_fault("restart-aggregator@r1:arrivals=1", NODES),
        parse_fault("restart-broker@5s", NODES),
        parse_fault("kill-node:1@r2:10%", NODES),  # round 2 not reached
    ]
    assert due_faults(plan, state, set()) == [0]
    state.rounds[1].arrivals.append("node-1")
    state.elapsed = 5.0
    assert due_faults(plan, state, {0}) == [3, 4]
    state.nodes["node-1"].images_done = 20
    assert is_due(plan[2], state)
    assert not is_due(plan[5], state)
