"""The fleet's live state as the orchestrator sees it: plain records, updated by events.

The display renders it, the fault plan triggers on it, the report reads its history.
Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NODE_STATUSES = (
    "starting",
    "waiting",
    "training",
    "publishing",
    "published",
    "installed",
    "offline",
    "killed",
    "failed",
    "done",
)


@dataclass
class NodeState:
    """One simulated board."""

    node_id: str
    device: str = "host"
    network: str = "lan"
    status: str = "starting"
    round: int = 0
    images_done: int = 0
    images_total: int = 0
    images_per_s: float = 0.0
    train_seconds: float = 0.0
    accuracy: float | None = None  # last reported local accuracy of the global model
    restarts: int = 0
    pid: int | None = None

    @property
    def fraction(self) -> float:
        return self.images_done / self.images_total if self.images_total else 0.0


@dataclass
class RoundState:
    """One federated round as seen from the aggregator's side."""

    round: int
    expected: int
    arrivals: list[str] = field(default_factory=list)
    started_at: float | None = None  # seconds since the fleet started
    merged_at: float | None = None
    merge_seconds: float | None = None
    global_neurons: int | None = None
    nodes_in_global: list[str] = field(default_factory=list)
    accuracy: float | None = None


@dataclass
class FleetState:
    """Everything the orchestrator knows, keyed by node id and round number."""

    nodes: dict[str, NodeState] = field(default_factory=dict)
    rounds: dict[int, RoundState] = field(default_factory=dict)
    aggregator: str = "starting"
    broker: str = "starting"
    baseline: NodeState | None = None
    elapsed: float = 0.0
    events: list[str] = field(default_factory=list)

    def round_state(self, number: int, expected: int) -> RoundState:
        if number not in self.rounds:
            self.rounds[number] = RoundState(number, expected)
        return self.rounds[number]

    @property
    def current_round(self) -> RoundState | None:
        return self.rounds[max(self.rounds)] if self.rounds else None

    def note(self, text: str) -> None:
        """Record an event (kept bounded: the display shows the last few)."""
        self.events.append(f"[{self.elapsed:6.1f}s] {text}")
        del self.events[:-200]
