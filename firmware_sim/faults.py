"""The fault-injection plan: what to break, and when.

A fault is written ``ACTION[:TARGET]@WHEN[+DOWN]``:

- ACTION: ``kill-node`` (the node's process is killed with SIGKILL and stays dead),
  ``restart-node`` (killed, then started again after DOWN seconds),
  ``restart-aggregator`` (SIGKILL, restarted after DOWN seconds from its state directory),
  ``restart-broker`` (the embedded broker is stopped and started again on the same port).
- TARGET: a node id (``node-2``) or a node number (``2``) for the node actions.
- WHEN: ``30s`` (seconds since the fleet started); ``rR:P%`` (in round R, once the target
  node, or for the other actions the slowest node, has trained P% of its shard);
  ``rR:arrivals=K`` (in round R, once the aggregator has received K updates).
- DOWN: seconds a restarted process stays down (default 1).

Examples: ``kill-node:2@r1:50%``, ``restart-aggregator@r1:arrivals=2``,
``restart-broker@20s+2``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from estdp.errors import ConfigError
from firmware_sim.state import FleetState

ACTIONS = ("kill-node", "restart-node", "restart-aggregator", "restart-broker")
NODE_ACTIONS = ("kill-node", "restart-node")

_FAULT = re.compile(
    r"^(?P<action>[a-z-]+)(?::(?P<target>[\w.-]+))?@(?P<when>[^+]+)(?:\+(?P<down>[\d.]+)s?)?$"
)
_SECONDS = re.compile(r"^(?P<s>\d+(?:\.\d+)?)s$")
_PROGRESS = re.compile(r"^r(?P<round>\d+):(?P<pct>\d+(?:\.\d+)?)%$")
_ARRIVALS = re.compile(r"^r(?P<round>\d+):arrivals=(?P<k>\d+)$")


@dataclass(frozen=True)
class Fault:
    """One planned fault."""

    action: str
    target: str | None = None  # node id for node actions
    at_seconds: float | None = None
    round: int | None = None
    progress: float | None = None  # fraction of the shard trained, 0..1
    arrivals: int | None = None
    down_seconds: float = 1.0
    text: str = ""

    def __str__(self) -> str:
        return self.text or self.action


def parse_fault(text: str, node_ids: list[str]) -> Fault:
    """Parse one fault; node numbers are resolved against ``node_ids`` (1-based).

    Raises
    ------
    ConfigError
        Unknown action, bad target or bad trigger.
    """
    match = _FAULT.match(text.strip())
    if not match:
        raise ConfigError(
            f"fault {text!r}: expected ACTION[:TARGET]@WHEN[+DOWN], e.g. kill-node:2@r1:50%"
        )
    action, target, when = match["action"], match["target"], match["when"]
    if action not in ACTIONS:
        raise ConfigError(f"fault {text!r}: unknown action; choose one of {', '.join(ACTIONS)}")
    if action in NODE_ACTIONS:
        target = _resolve_node(text, target, node_ids)
    elif target:
        raise ConfigError(f"fault {text!r}: {action} takes no target")
    down = float(match["down"]) if match["down"] else 1.0
    fields: dict[str, float | int] = {}
    if m := _SECONDS.match(when):
        fields["at_seconds"] = float(m["s"])
    elif m := _PROGRESS.match(when):
        pct = float(m["pct"])
        if pct > 100:
            raise ConfigError(f"fault {text!r}: progress above 100%")
        fields.update(round=int(m["round"]), progress=pct / 100.0)
    elif m := _ARRIVALS.match(when):
        fields.update(round=int(m["round"]), arrivals=int(m["k"]))
    else:
        raise ConfigError(f"fault {text!r}: WHEN must be 30s, r1:50% or r1:arrivals=2")
    if fields.get("round", 1) < 1:
        raise ConfigError(f"fault {text!r}: rounds are numbered from 1")
    return Fault(action, target, down_seconds=down, text=text.strip(), **fields)  # type: ignore[arg-type]


def _resolve_node(text: str, target: str | None, node_ids: list[str]) -> str:
    if not target:
        raise ConfigError(f"fault {text!r}: name the node, e.g. kill-node:2@30s")
    if target in node_ids:
        return target
    if target.isdigit() and 1 <= int(target) <= len(node_ids):
        return node_ids[int(target) - 1]
    raise ConfigError(f"fault {text!r}: no node {target!r} (nodes: {', '.join(node_ids)})")


def is_due(fault: Fault, state: FleetState) -> bool:
    """Whether ``fault``'s trigger holds in ``state``."""
    if fault.at_seconds is not None:
        return state.elapsed >= fault.at_seconds
    rnd = state.rounds.get(fault.round or 0)
    if fault.arrivals is not None:
        return rnd is not None and len(rnd.arrivals) >= fault.arrivals
    if fault.progress is None:
        return False
    if fault.target is not None:
        nodes = [state.nodes[fault.target]] if fault.target in state.nodes else []
    else:
        nodes = list(state.nodes.values())
    live = [n for n in nodes if n.round == fault.round and n.images_total > 0]
    return bool(live) and min(n.fraction for n in live) >= fault.progress


def due_faults(plan: list[Fault], state: FleetState, fired: set[int]) -> list[int]:
    """Indices into ``plan`` of faults now due that have not fired yet."""
    return [i for i, f in enumerate(plan) if i not in fired and is_due(f, state)]
