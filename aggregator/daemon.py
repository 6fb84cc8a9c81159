"""The aggregator daemon: announce rounds, collect updates, merge, publish the global model.

A round, from the aggregator's side::

    announce  RoundAnnouncement(r, neurons, target, metric, deadline, session), retained
    collect   updates of round r on estdp/<fleet>/nodes/<id>/update, each stored on disk
              (aggregator.state) before it counts; the first update of a node counts;
              updates of another round or session (retained from earlier) are ignored
    merge     when all K expected nodes sent one, or the deadline passed with at least Q
              (past the deadline with fewer than Q it keeps waiting, and merges as soon as
              the Q-th arrives)
    publish   GlobalModel(r, merged model, contributing nodes), retained, chunked when
              larger than a packet; then the next round, until ``rounds`` are done

Faults: a restart reloads the state directory and re-announces the open round (same id,
same deadline); nodes publish their updates retained, so updates sent while the
aggregator was down are delivered when it subscribes again, and the ones it had are on
disk. After a reconnect (e.g. a broker restart that lost retained messages) the
announcement, or the last global model, is published again. A payload that fails to
decode, an update published under another node's topic, for another round, or with
parameters unlike the others' is logged and dropped; the daemon keeps serving.

The merge itself is one call, :func:`default_merge` (``aggregator.merge.merge``), passed
in as ``merge_fn`` so tests and simulations can swap it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aggregator.state import AggregatorState
from estdp import protocol
from estdp.errors import ConfigError, MergeError
from estdp.model import SubModel
from estdp.params import NetworkParams
from estdp.protocol import (
    GlobalModel,
    NodeStatus,
    RoundAnnouncement,
    SubModelUpdate,
    new_session,
)
from estdp.topics import Topics
from estdp.transport.channel import Channel, Received

log = logging.getLogger(__name__)

# merge_fn(models, target, metric, *, round_id) -> (merged model, report)
MergeFn = Callable[..., tuple[SubModel, Any]]
EventSink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class AggregatorConfig:
    """What the aggregator runs.

    Parameters
    ----------
    nodes
        K: updates expected per round.
    target
        N: neurons of the global model.
    neurons_per_node
        Neurons each node trains (announced).
    metric
        Similarity metric of the merge (announced and passed to the merge).
    deadline_s
        Seconds from a round's announcement to its deadline.
    min_nodes
        Q: updates needed to merge at the deadline (default: K).
    rounds
        Rounds to run; 0 runs forever.
    continue_from_global
        Ask nodes to continue from the last global model in rounds after the first.
    weight_encoding
        Weight encoding of the published global model.
    fleet
        Topic prefix ``estdp/<fleet>/``.
    """

    nodes: int
    target: int
    neurons_per_node: int = 100
    metric: str = "mse"
    deadline_s: float = 600.0
    min_nodes: int | None = None
    rounds: int = 1
    continue_from_global: bool = True
    weight_encoding: str = "float32"
    fleet: str = "default"

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.target < 1 or self.neurons_per_node < 1:
            raise ConfigError("--nodes, --target and --neurons must be >= 1")
        if not 1 <= self.quorum <= self.nodes:
            raise ConfigError(f"--min-nodes must be in 1..{self.nodes}, got {self.min_nodes}")
        if not (self.deadline_s > 0 and math.isfinite(self.deadline_s)):
            raise ConfigError(
                f"--deadline must be a positive number of seconds, got {self.deadline_s}"
            )
        if self.rounds < 0:
            raise ConfigError("--rounds must be >= 0")

    @property
    def quorum(self) -> int:
        return self.nodes if self.min_nodes is None else self.min_nodes


def default_merge(
    models: Sequence[SubModel], target: int, metric: str, *, round_id: int = 0
) -> tuple[SubModel, Any]:
    """Concatenate, measure similarity and prune to ``target`` (``aggregator.merge``)."""
    from aggregator.merge import merge  # the merge math; imported when first needed

    return merge(list(models), target, metric, round=round_id)


def report_metrics(report: Any) -> dict[str, float]:
    """Numeric fields of a merge report (``to_dict()``, a mapping, or a dataclass), one
    level of nesting flattened as ``<outer>_<inner>`` (e.g. ``seconds_similarity``)."""
    if hasattr(report, "to_dict"):
        items = dict(report.to_dict())
    elif isinstance(report, dict):
        items = dict(report)
    elif dataclasses.is_dataclass(report) and not isinstance(report, type):
        items = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
    else:
        return {}
    flat: dict[str, Any] = {}
    for key, value in items.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{k}": v for k, v in value.items()})
        else:
            flat[str(key)] = value
    out = {}
    for key, value in flat.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[str(key)] = float(value)
    return out


class AggregatorDaemon:
    """The aggregator service over a :class:`~estdp.transport.channel.Channel`.

    Parameters
    ----------
    config
        Rounds to run.
    channel
        A channel over a connected transport.
    state
        The on-disk state (resumed if it holds an open round).
    merge_fn
        ``merge_fn(models, target, metric) -> (model, report)``.
    events
        Receives one dict per notable event (the CLI prints them as JSON lines).
    clock
        Wall clock (seconds since the epoch) for deadlines.
    """

    def __init__(
        self,
        config: AggregatorConfig,
        channel: Channel,
        state: AggregatorState,
        merge_fn: MergeFn | None = None,
        *,
        events: EventSink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.channel = channel
        self.state = state
        self.merge_fn = merge_fn or default_merge
        self.events = events or (lambda event: None)
        self.clock = clock
        self.topics = Topics(config.fleet)
        self._connects_seen = 0
        self._warned_quorum = False
        self._reference: tuple[int, int, NetworkParams] | None = None
        self.node_status: dict[str, str] = {}
        self.done = False

    # ---- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe, then resume the stored round or open the first one."""
        transport = self.channel.transport
        transport.subscribe(self.topics.all_updates, qos=1)
        transport.subscribe(self.topics.all_status, qos=1)
        self._connects_seen = transport.connects
        current = self.state.current
        if current is None:
            self._open_round(1)
        elif current.phase == "open":
            log.info(
                "resuming round %d with %d stored update(s)",
                current.round_id,
                len(self.state.received()),
            )
            self._emit("resumed", round=current.round_id, received=self.state.received())
            self._announce(current.announcement)
            self._maybe_merge()
        else:
            self._republish_global()
            self._next_round()

    def run(self, stop: threading.Event, poll_s: float = 0.1) -> int:
        """Serve until ``stop`` is set or the configured rounds are done; 0 on success."""
        self.start()
        while not stop.is_set() and not self.done:
            self.step(poll_s)
        return 0

    def step(self, timeout: float = 0.1) -> None:
        """One receive-and-react step: a message (if any), reconnect and deadline checks."""
        for received in self.channel.poll_batch(timeout):
            self._handle(received)
        transport = self.channel.transport
        if transport.connects > self._connects_seen:
            self._connects_seen = transport.connects
            self._after_reconnect()
        self._maybe_merge()

    # ---- rounds -------------------------------------------------------------------------

    def _open_round(self, round_id: int) -> None:
        cfg = self.config
        now = self.clock()
        # One session per state directory: later rounds keep the first round's id.
        current = self.state.current
        session = current.announcement.session if current else ""
        announcement = RoundAnnouncement(
            round_id=round_id,
            neurons_per_node=cfg.neurons_per_node,
            target_size=cfg.target,
            metric=cfg.metric,
            deadline_unix=now + cfg.deadline_s,
            expected_nodes=cfg.nodes,
            min_nodes=cfg.quorum,
            continue_from_global=cfg.continue_from_global and round_id > 1,
            issued_unix=now,
            session=session or new_session(),
        )
        self.state.open_round(announcement)
        self._warned_quorum = False
        self._announce(announcement)
        self._emit(
            "round_open",
            round=round_id,
            deadline_unix=announcement.deadline_unix,
            expected=cfg.nodes,
        )

    def _announce(self, announcement: RoundAnnouncement) -> None:
        self.channel.send(self.topics.round, announcement, retain=True)

    def _next_round(self) -> None:
        last = self.state.last_round_id
        if self.config.rounds and last >= self.config.rounds:
            self.done = True
            self._emit("done", rounds=last)
            return
        self._open_round(last + 1)

    def _after_reconnect(self) -> None:
        # The broker may have restarted without its retained messages.
        current = self.state.current
        log.info("reconnected: publishing the round state again")
        if current is None:
            return
        if current.phase == "open":
            self._announce(current.announcement)
        else:
            self._republish_global()

    def _republish_global(self) -> None:
        payload = self.state.global_payload()
        if payload is not None:
            self.channel.send(self.topics.global_model, payload, retain=True)

    # ---- messages -----------------------------------------------------------------------

    def _handle(self, received: Received) -> None:
        message = received.message
        if isinstance(message, SubModelUpdate):
            self._on_update(received.topic, message, received.payload)
        elif isinstance(message, NodeStatus):
            sender = self.topics.node_of(received.topic)
            if sender == message.node_id:
                self.node_status[sender] = message.state
        else:
            log.debug("ignoring a %s message on %s", type(message).__name__, received.topic)

    def _reject(self, why: str, **fields: Any) -> None:
        self.channel.rejected += 1
        self.channel.last_rejection = why
        log.warning("rejected an update: %s", why)
        self._emit("rejected", reason=why, **fields)

    def _on_update(self, topic: str, update: SubModelUpdate, payload: bytes) -> None:
        sender = self.topics.node_of(topic)
        if topic != self.topics.update(update.node_id) or sender != update.node_id:
            self._reject(f"an update for node {update.node_id!r} arrived on {topic!r}", node=sender)
            return
        current = self.state.current
        if (
            current is None
            or current.phase != "open"
            or update.round_id != current.round_id
            or update.session != current.announcement.session
        ):
            # Typically retained from an earlier round, or from an earlier run of the fleet.
            log.debug(
                "ignoring an update of round %d from %s (not the open round)",
                update.round_id,
                sender,
            )
            return
        if update.node_id in self.state.received():
            log.debug("duplicate update from %s for round %d", sender, update.round_id)
            return
        problem = self._incompatible(update.model)
        if problem:
            self._reject(f"update from {sender}: {problem}", node=sender, round=update.round_id)
            return
        self.state.add_update(update.node_id, payload)
        count = len(self.state.received())
        log.info(
            "round %d: update from %s (%d/%d)", current.round_id, sender, count, self.config.nodes
        )
        self._emit(
            "update",
            round=current.round_id,
            node=sender,
            neurons=update.model.n_neurons,
            received=count,
            expected=self.config.nodes,
        )

    def _incompatible(self, model: SubModel) -> str:
        # The first stored update of the round sets what the others must match.
        round_id = self.state.last_round_id
        if self._reference is None or self._reference[0] != round_id:
            stored = self.state.load_updates()
            if not stored:
                return ""
            first = next(iter(stored.values())).model
            self._reference = (round_id, first.n_input, first.params)
        _, n_input, params = self._reference
        if model.n_input != n_input:
            return f"{model.n_input} inputs where the round's models have {n_input}"
        if model.params != params:
            return "network parameters differ from the other updates of the round"
        return ""

    # ---- merging ------------------------------------------------------------------------

    def _maybe_merge(self) -> None:
        current = self.state.current
        if current is None or current.phase != "open":
            return
        count = len(self.state.received())
        if count >= self.config.nodes:
            self._merge(current.announcement, "all nodes reported")
            return
        if self.clock() < current.announcement.deadline_unix:
            return
        if count >= self.config.quorum:
            self._merge(
                current.announcement, f"deadline passed with {count} of {self.config.nodes}"
            )
        elif not self._warned_quorum:
            self._warned_quorum = True
            log.warning(
                "round %d: deadline passed with %d update(s), fewer than the %d needed; waiting",
                current.round_id,
                count,
                self.config.quorum,
            )
            self._emit(
                "waiting_for_quorum",
                round=current.round_id,
                received=count,
                needed=self.config.quorum,
            )

    def _merge(self, announcement: RoundAnnouncement, why: str) -> None:
        updates = self.state.load_updates()
        node_ids = tuple(sorted(updates))
        models = [updates[n].model for n in node_ids]
        t0 = time.perf_counter()
        try:
            merged, report = self.merge_fn(
                models,
                announcement.target_size,
                announcement.metric,
                round_id=announcement.round_id,
            )
        except MergeError as exc:
            # Bad inputs will not get better by waiting: log, and leave the round open so
            # an operator sees it (status lines) and can fix or restart with other flags.
            log.error("round %d: merge failed: %s", announcement.round_id, exc)
            self._emit("merge_failed", round=announcement.round_id, error=str(exc))
            self.done = True
            return
        merge_seconds = time.perf_counter() - t0
        metrics = {"merge_seconds": merge_seconds, **report_metrics(report)}
        message = GlobalModel(
            announcement.round_id, merged, node_ids, metrics, announcement.session
        )
        payload = protocol.encode(message, weight_encoding=self.config.weight_encoding)
        packets = self.channel.send(self.topics.global_model, payload, retain=True)
        self.state.mark_merged(payload, merged, node_ids)
        log.info(
            "round %d merged (%s): %d neurons from %s in %.2f s",
            announcement.round_id,
            why,
            merged.n_neurons,
            ", ".join(node_ids),
            merge_seconds,
        )
        self._emit(
            "global",
            round=announcement.round_id,
            neurons=merged.n_neurons,
            contains=list(node_ids),
            reason=why,
            merge_seconds=round(merge_seconds, 4),
            bytes=len(payload),
            packets=packets,
        )
        self._next_round()

    def _emit(self, event: str, **fields: Any) -> None:
        self.events({"event": event, "time_unix": round(self.clock(), 3), **fields})
