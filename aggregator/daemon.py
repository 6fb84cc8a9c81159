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
    labelling (``labels="federated"``, the default) the global model published above is
              *provisional* (note labels=provisional: the sub-models' labels); each node
              that installs it runs it frozen on its labelled images and sends
              LabelStats(r, tag, per-class counts, per-class response sums) on
              estdp/<fleet>/nodes/<id>/labels, retained; each is stored on disk before
              it counts. When every node in the model's ``contains`` has reported, or
              the label deadline passed, the statistics are pooled
              (aggregator.federated_labels) and GlobalModel(r) is published again: the
              same weights, the pooled labels (labels=federated; labels=kept with the
              sub-models' labels if no node reported). Only then is the next round
              announced.
    calibrating (``calibrate_images`` N > 0, after a merge that pruned: the first round,
              or ``continued_merge="prune"``) before labelling: the provisional model
              carries the note calibrate=N; each node runs a thresholds-only pass over
              N of its images and answers with its thresholds (LabelStats.thetas),
              stored like label statistics. When every node has answered, or the label
              deadline passed, the thresholds are averaged, weighted by the images
              behind them (aggregator.calibration), and a second provisional model
              with them is published; labelling then runs on it as above, with a
              deadline of its own.

Faults: a restart reloads the state directory and re-announces the open round (same id,
same deadline); nodes publish their updates retained, so updates sent while the
aggregator was down are delivered when it subscribes again, and the ones it had are on
disk; a restart while labelling keeps the stored statistics and the same label
deadline. After a reconnect (e.g. a broker restart that lost retained messages) the
announcement, or the last global model, is published again. A payload that fails to
decode, an update (or label statistics) published under another node's topic, for
another round, or with parameters (or neurons, or model tag) unlike the round's is
logged and dropped; the daemon keeps serving.

The merge itself is one call, :func:`default_merge` (``aggregator.merge.merge``), passed
in as ``merge_fn`` so tests and simulations can swap it.

Upstream mode (hierarchical aggregation, ``config.upstream``): a *site* aggregator serves
its own fleet exactly as above, except for where its rounds come from and where its merge
goes. It is also an ordinary node, ``<site-id>``, of a root fleet (over a second channel,
possibly to another broker)::

    root round   the root's RoundAnnouncement(r) on estdp/<root>/round opens the site's
                 next round for its own nodes (deadline: the site's, at most the root's)
    forward      the site merge is sent as SubModelUpdate(<site-id>, r, site model,
                 root session) on estdp/<root>/nodes/<site-id>/update, retained; the round
                 is ``forwarded`` (stored before it is sent)
    deliver      the root's GlobalModel(r) is published on estdp/<site>/global as the
                 site round's global model (the site's session, the root's ``contains``),
                 so the site's nodes install the root model; then the round is merged

The root aggregator is an unmodified aggregator with K = the number of sites. A site
does no labelling of its own: its model goes upstream, not to its nodes. When the
root's global model is provisional, the site relays the labelling: its nodes send their
statistics to the site, which sums them (the sums pool exactly) and sends one
LabelStats(<site-id>, r, ...) to the root, then passes the root's final model down. A
provisional model that asks for a calibration goes down with the request: the site
relays its nodes' thresholds averaged (weighted by their calibration images) with the
total of those images, so the root's average over sites is the average over all nodes,
then passes the calibrated provisional model down and relays its labelling. If the
root moves on while a site round is open (a newer root round is announced), the open
round is pointed at it; if the root's global model for the round arrives before the
site has forwarded (the root merged without this site), it is delivered all the same.
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

from aggregator import average, calibration, federated_labels
from aggregator.removal import DEFAULT_RULE, check_rule
from aggregator.state import AggregatorState
from estdp import protocol
from estdp.errors import ConfigError, MergeError, ProtocolError, TransportError
from estdp.lineage import parent_tag
from estdp.model import SubModel
from estdp.params import NetworkParams
from estdp.protocol import (
    LABELS_FEDERATED,
    LABELS_KEPT,
    LABELS_PROVISIONAL,
    GlobalModel,
    LabelStats,
    NodeStatus,
    RoundAnnouncement,
    SubModelUpdate,
    new_session,
)
from estdp.topics import Topics, validate_id
from estdp.transport import Will
from estdp.transport.channel import Channel, Received

log = logging.getLogger(__name__)

# merge_fn(models, target, metric, *, round_id, rule) -> (merged model, report)
MergeFn = Callable[..., tuple[SubModel, Any]]
EventSink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class UpstreamConfig:
    """Where a site aggregator forwards its site model.

    Parameters
    ----------
    site_id
        This site's node id in the root fleet (the root's ACL binds it like a node's).
    fleet
        The root fleet (``estdp/<fleet>/``), on the upstream channel's broker.
    """

    site_id: str
    fleet: str = "default"

    def __post_init__(self) -> None:
        validate_id(self.site_id, "site id")
        validate_id(self.fleet, "upstream fleet")

    def will(self) -> Will:
        """The upstream connection's last will: the site, as a node of the root, offline."""
        payload = protocol.encode(
            NodeStatus(self.site_id, "offline", -1, time.time(), "connection lost")
        )
        return Will(Topics(self.fleet).status(self.site_id), payload, qos=1, retain=True)


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
    upstream
        Run as a site aggregator forwarding to this root fleet (None: a flat or root
        aggregator, which opens its own rounds).
    labels
        ``"federated"``: after each merge, re-assign the global model's labels from the
        nodes' label statistics (the labelling phase); ``"kept"``: keep the labels the
        sub-models came with. A site aggregator labels nothing itself (see the module
        docstring); it follows the root's global model.
    label_deadline_s
        Seconds the labelling phase waits for the nodes' statistics (and the
        calibrating phase for their thresholds).
    calibrate_images
        Images per node of the thresholds-only pass before labelling, after a merge
        that pruned (:mod:`aggregator.calibration`); 0: none. Needs federated labels.
    """

    nodes: int
    target: int
    neurons_per_node: int = 100
    metric: str = "mse"
    rule: str = DEFAULT_RULE  # which neuron of a similar pair goes (aggregator.removal)
    deadline_s: float = 600.0
    min_nodes: int | None = None
    rounds: int = 1
    continue_from_global: bool = True
    continued_merge: str = "average"  # updates that continued one global model: average|prune
    weight_encoding: str = "float32"
    fleet: str = "default"
    upstream: UpstreamConfig | None = None
    labels: str = LABELS_FEDERATED
    label_deadline_s: float = 120.0
    calibrate_images: int = calibration.DEFAULT_IMAGES

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
        if self.labels not in LABEL_MODES:
            raise ConfigError(
                f"--labels must be one of {', '.join(LABEL_MODES)}, got {self.labels!r}"
            )
        if not (self.label_deadline_s > 0 and math.isfinite(self.label_deadline_s)):
            raise ConfigError(
                f"--label-deadline must be a positive number of seconds, "
                f"got {self.label_deadline_s}"
            )
        if self.calibrate_images < 0:
            raise ConfigError(f"--calibrate-images must be >= 0, got {self.calibrate_images}")
        check_rule(self.rule)
        if self.continued_merge not in CONTINUED_MERGES:
            raise ConfigError(
                f"--continued-merge must be one of {', '.join(CONTINUED_MERGES)}, "
                f"got {self.continued_merge!r}"
            )
        if self.upstream is not None and self.upstream.fleet == self.fleet:
            # The site would read its own announcements as the root's.
            raise ConfigError(
                f"--upstream-fleet must differ from --fleet (both are {self.fleet!r})"
            )

    @property
    def quorum(self) -> int:
        return self.nodes if self.min_nodes is None else self.min_nodes


CONTINUED_MERGES = ("average", "prune")
LABEL_MODES = (LABELS_KEPT, LABELS_FEDERATED)


def default_merge(
    models: Sequence[SubModel],
    target: int,
    metric: str,
    *,
    round_id: int = 0,
    rule: str = DEFAULT_RULE,
) -> tuple[SubModel, Any]:
    """Concatenate, measure similarity and prune to ``target`` (``aggregator.merge``)."""
    from aggregator.merge import merge  # the merge math; imported when first needed

    return merge(list(models), target, metric, rule=rule, round=round_id)


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
    upstream
        Upstream mode: a channel to the root fleet's broker, connected with
        ``config.upstream.will()`` (required when ``config.upstream`` is set).
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
        upstream: Channel | None = None,
    ) -> None:
        if (config.upstream is None) != (upstream is None):
            raise ConfigError("upstream mode needs both an upstream config and its channel")
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
        self.upstream = upstream
        self.root_topics = Topics(config.upstream.fleet) if config.upstream else None
        self._upstream_connects_seen = 0
        # The latest root announcement and global model seen (upstream mode).
        self._root_round: RoundAnnouncement | None = None
        self._root_global: GlobalModel | None = None
        # The global model being labelled, decoded once from the state: (round, tag, model).
        self._label_model: tuple[int, str, SubModel] | None = None

    # ---- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe, then resume the stored round or open the first one."""
        transport = self.channel.transport
        transport.subscribe(self.topics.all_updates, qos=1)
        transport.subscribe(self.topics.all_status, qos=1)
        transport.subscribe(self.topics.all_labels, qos=1)
        self._connects_seen = transport.connects
        if self.upstream is not None:
            self._start_upstream()
        current = self.state.current
        if current is None:
            if self.upstream is None:
                self._open_round(1)
            # else: the root's (retained) announcement opens the first round
        elif current.phase == "open":
            log.info(
                "resuming round %d with %d stored update(s)",
                current.round_id,
                len(self.state.received()),
            )
            self._emit("resumed", round=current.round_id, received=self.state.received())
            self._announce(current.announcement)
            self._maybe_merge()
        elif current.phase == "forwarded":
            log.info("resuming round %d: the site model waits for the root", current.round_id)
            self._emit("resumed", round=current.round_id, phase=current.phase)
            self._announce(current.announcement)
            self._send_forwarded()
        elif current.phase in ("calibrating", "labelling"):
            stored = self.state.label_reporters()
            log.info(
                "resuming the %s of round %d with %d stored label statistics",
                "calibration" if current.phase == "calibrating" else "labelling",
                current.round_id,
                len(stored),
            )
            self._emit("resumed", round=current.round_id, phase=current.phase, labels_from=stored)
            self._republish_global()
            if self.upstream is not None:
                self._send_relayed_labels()
            self._maybe_finish_labelling()
        else:
            self._republish_global()
            self._next_round()

    def run(self, stop: threading.Event, poll_s: float = 0.1) -> int:
        """Serve until ``stop`` is set or the configured rounds are done; 0 on success."""
        self.start()
        try:
            while not stop.is_set() and not self.done:
                self.step(poll_s)
        finally:
            if self.upstream is not None:
                # A clean close sends no will: say goodbye to the root ourselves.
                self._site_status("offline", "stopped", wait=True)
        return 0

    def step(self, timeout: float = 0.1) -> None:
        """One receive-and-react step: a message (if any), reconnect and deadline checks."""
        for received in self.channel.poll_batch(timeout):
            self._handle(received)
        if self.upstream is not None and self.upstream is not self.channel:
            for received in self.upstream.poll_batch(0):
                self._handle(received)
        transport = self.channel.transport
        if transport.connects > self._connects_seen:
            self._connects_seen = transport.connects
            self._after_reconnect()
        if self.upstream is not None:
            upstream = self.upstream.transport
            if upstream.connects > self._upstream_connects_seen:
                self._upstream_connects_seen = upstream.connects
                self._after_upstream_reconnect()
        self._maybe_merge()
        self._maybe_finish_labelling()

    # ---- rounds -------------------------------------------------------------------------

    def _open_round(self, round_id: int, root: RoundAnnouncement | None = None) -> None:
        """Open round ``round_id``; a site aggregator passes the root round it serves."""
        cfg = self.config
        now = self.clock()
        # One session per state directory: later rounds keep the first round's id.
        current = self.state.current
        session = current.announcement.session if current else ""
        deadline = now + cfg.deadline_s
        continue_from_global = cfg.continue_from_global and round_id > 1
        if root is not None:
            # A site round that outlasts its root round would forward too late to count.
            deadline = min(deadline, root.deadline_unix)
            continue_from_global = continue_from_global and root.continue_from_global
        announcement = RoundAnnouncement(
            round_id=round_id,
            neurons_per_node=cfg.neurons_per_node,
            target_size=cfg.target,
            metric=cfg.metric,
            deadline_unix=deadline,
            expected_nodes=cfg.nodes,
            min_nodes=cfg.quorum,
            continue_from_global=continue_from_global,
            issued_unix=now,
            session=session or new_session(),
        )
        if root is None:
            self.state.open_round(announcement)
        else:
            self.state.open_round(announcement, root.session, root.round_id)
        self._warned_quorum = False
        self._announce(announcement)
        upstream = {} if root is None else {"root_round": root.round_id}
        self._emit(
            "round_open",
            round=round_id,
            deadline_unix=announcement.deadline_unix,
            expected=cfg.nodes,
            **upstream,
        )
        if root is not None:
            self._site_status("training", f"site round {round_id}", root.round_id)
            root_global = self._root_global
            if root_global is not None and self._serves(root_global.session, root_global.round_id):
                # The root merged this round before we joined it: pass its model on now.
                self._deliver(root_global)

    def _announce(self, announcement: RoundAnnouncement) -> None:
        self.channel.send(self.topics.round, announcement, retain=True)

    def _next_round(self) -> None:
        last = self.state.last_round_id
        if self.config.rounds and last >= self.config.rounds:
            self.done = True
            self._emit("done", rounds=last)
            return
        if self.upstream is None:
            self._open_round(last + 1)
        elif self._root_round is not None and self._is_new_root_round(self._root_round):
            # The root announced its next round while this one waited for its model.
            self._open_round(last + 1, self._root_round)
        # else: the next root announcement opens it

    def _after_reconnect(self) -> None:
        # The broker may have restarted without its retained messages.
        current = self.state.current
        log.info("reconnected: publishing the round state again")
        if current is None:
            return
        if current.phase in ("open", "forwarded"):
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
        root = self.root_topics
        if root is not None and received.topic in (root.round, root.global_model):
            if isinstance(message, RoundAnnouncement) and received.topic == root.round:
                self._on_root_round(message)
            elif isinstance(message, GlobalModel) and received.topic == root.global_model:
                self._on_root_global(message)
            else:
                log.debug("ignoring a %s message on %s", type(message).__name__, received.topic)
            return
        if isinstance(message, SubModelUpdate):
            self._on_update(received.topic, message, received.payload)
        elif isinstance(message, LabelStats):
            self._on_labels(received.topic, message, received.payload)
        elif isinstance(message, NodeStatus):
            sender = self.topics.node_of(received.topic)
            if sender == message.node_id:
                self.node_status[sender] = message.state
        else:
            log.debug("ignoring a %s message on %s", type(message).__name__, received.topic)

    def _reject(self, why: str, **fields: Any) -> None:
        self.channel.rejected += 1
        self.channel.last_rejection = why
        log.warning("rejected: %s", why)
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
            merged, report, averaged = self._combine(models, announcement)
        except MergeError as exc:
            # Bad inputs will not get better by waiting: log, and leave the round open so
            # an operator sees it (status lines) and can fix or restart with other flags.
            log.error("round %d: merge failed: %s", announcement.round_id, exc)
            self._emit("merge_failed", round=announcement.round_id, error=str(exc))
            self.done = True
            return
        merge_seconds = time.perf_counter() - t0
        metrics = {"merge_seconds": merge_seconds, **report_metrics(report)}
        if self.upstream is not None:
            images = sum(int(u.images_seen) for u in updates.values())
            self._forward(announcement, merged, node_ids, metrics, images, why)
            return
        labelling = self.config.labels == LABELS_FEDERATED
        labels = LABELS_PROVISIONAL if labelling else LABELS_KEPT
        merged = federated_labels.with_labels_note(merged, labels)
        # Averaged updates share their thresholds' history; a pruned concatenation does not.
        calibrating = labelling and self.config.calibrate_images > 0 and not averaged
        if calibrating:
            merged = calibration.requested(merged, self.config.calibrate_images)
        message = GlobalModel(
            announcement.round_id, merged, node_ids, metrics, announcement.session
        )
        payload = protocol.encode(message, weight_encoding=self.config.weight_encoding)
        packets = self.channel.send(self.topics.global_model, payload, retain=True)
        phase = "calibrating" if calibrating else "labelling"
        if labelling:
            deadline = self.clock() + self.config.label_deadline_s
            self.state.mark_labelling(
                payload, merged, node_ids, parent_tag(merged), deadline, phase=phase
            )
        else:
            self.state.mark_merged(payload, merged, node_ids)
        if calibrating:
            pending = (
                f"; thresholds calibrated by the nodes ({self.config.calibrate_images} images "
                "each), then labels from their label statistics"
            )
        elif labelling:
            pending = "; labels provisional until the nodes' label statistics are in"
        else:
            pending = ""
        log.info(
            "round %d merged (%s): %d neurons from %s in %.2f s%s",
            announcement.round_id,
            why,
            merged.n_neurons,
            ", ".join(node_ids),
            merge_seconds,
            pending,
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
            labels=labels,
        )
        if labelling:
            self._emit(
                phase,
                round=announcement.round_id,
                expected=list(node_ids),
                deadline_unix=round(deadline, 3),
                **({"images": self.config.calibrate_images} if calibrating else {}),
            )
        else:
            self._next_round()

    def _combine(
        self, models: list[SubModel], announcement: RoundAnnouncement
    ) -> tuple[SubModel, Any, bool]:
        """Average updates that continued the same global model (aggregator.average),
        pruning the average if it is still above the target; else ``merge_fn``. The flag
        says whether it averaged."""
        target, metric = announcement.target_size, announcement.metric
        if not (self.config.continued_merge == "average" and average.siblings(models)):
            merged, report = self.merge_fn(
                models, target, metric, round_id=announcement.round_id, rule=self.config.rule
            )
            return merged, report, False
        t0 = time.perf_counter()
        merged = average.average(models, round=announcement.round_id)
        report: dict[str, Any] = {
            "averaged": len(models),
            "seconds": {"average": time.perf_counter() - t0},
        }
        if merged.n_neurons > target:
            merged, pruned = self.merge_fn([merged], target, metric, round_id=announcement.round_id)
            report["pruned"] = report_metrics(pruned)
        log.info(
            "round %d: %d updates continued the same global model: averaged",
            announcement.round_id,
            len(models),
        )
        return merged, report, True

    # ---- labelling ----------------------------------------------------------------------

    def _labelling_model(self) -> SubModel | None:
        """The global model of the round being labelled (decoded from the state once)."""
        current = self.state.current
        if current is None:
            return None
        key = (current.round_id, current.model_tag)
        if self._label_model is None or self._label_model[:2] != key:
            payload = self.state.global_payload()
            if payload is None:
                return None
            try:
                model = protocol.decode_global(payload, self.state.limits).model
            except ProtocolError as exc:
                log.error("round %d: the stored global model is damaged: %s", current.round_id, exc)
                return None
            self._label_model = (*key, model)
        return self._label_model[2]

    def _label_expected(self) -> list[str]:
        """Who the labelling waits for: the nodes in the global model (a flat or root
        aggregator), or the site's own nodes of the round (a site relaying to its root)."""
        current = self.state.current
        if current is None:
            return []
        if self.upstream is not None:
            return self.state.received()
        return list(current.contains)

    def _on_labels(self, topic: str, stats: LabelStats, payload: bytes) -> None:
        sender = self.topics.node_of(topic)
        if topic != self.topics.labels(stats.node_id) or sender != stats.node_id:
            self._reject(
                f"label statistics for node {stats.node_id!r} arrived on {topic!r}", node=sender
            )
            return
        current = self.state.current
        if current is None or stats.session != current.announcement.session:
            # Retained from an earlier run of the fleet.
            log.info("ignoring label statistics from %s of another session", sender)
            return
        rid = stats.round_id
        if rid < current.round_id or (rid == current.round_id and current.phase == "merged"):
            # Retained from an earlier round, or a node that answered after the deadline.
            log.info(
                "ignoring label statistics of round %d from %s: its labelling is over", rid, sender
            )
            return
        if (
            rid == current.round_id
            and current.phase == "labelling"
            and stats.thetas is not None
            and stats.model_tag != current.model_tag
        ):
            log.info(
                "ignoring the calibration of round %d from %s: it came after the deadline",
                rid,
                sender,
            )
            return
        if rid != current.round_id or current.phase not in ("calibrating", "labelling"):
            self._reject(
                f"label statistics from {sender} for round {rid}, which is not being labelled",
                node=sender,
                round=rid,
            )
            return
        if stats.model_tag != current.model_tag:
            self._reject(
                f"label statistics from {sender} name model {stats.model_tag} where round "
                f"{rid}'s global model is {current.model_tag}",
                node=sender,
                round=rid,
            )
            return
        model = self._labelling_model()
        want = (model.n_classes, model.n_neurons) if model is not None else None
        if stats.response_sums.shape != want:
            self._reject(
                f"label statistics from {sender} of shape {stats.response_sums.shape} where "
                f"the global model has (classes, neurons) {want}",
                node=sender,
                round=rid,
            )
            return
        if current.phase == "calibrating" and stats.thetas is not None:
            assert model is not None
            why = calibration.problem(stats, model.n_neurons)
            if why:
                self._reject(f"calibration from {sender}: {why}", node=sender, round=rid)
                return
        if not self.state.add_label_stats(sender, payload):
            log.debug("duplicate label statistics from %s for round %d", sender, rid)
            return
        reporters = self.state.label_reporters()
        expected = self._label_expected()
        log.info(
            "round %d: label statistics from %s (%d images; %d/%d)",
            rid,
            sender,
            stats.n_images,
            len(set(reporters) & set(expected)),
            len(expected),
        )
        self._emit(
            "label_stats",
            round=rid,
            node=sender,
            images=stats.n_images,
            calibration_images=int(stats.calibration_images),
            received=len(reporters),
            expected=len(expected),
        )

    def _maybe_finish_labelling(self) -> None:
        current = self.state.current
        if current is None or current.phase not in ("calibrating", "labelling"):
            return
        calibrating = current.phase == "calibrating"
        finish = self._finish_calibrating if calibrating else self._finish_labelling
        if self.upstream is not None and self.state.relayed_labels_payload() is not None:
            return  # relayed: waiting for the root's final model
        reporters = self.state.label_reporters()
        expected = self._label_expected()
        if set(expected) <= set(reporters):
            finish(f"{len(reporters)} of {len(expected)} nodes reported")
        elif self.clock() >= current.label_deadline_unix:
            missing = sorted(set(expected) - set(reporters))
            finish(
                f"label deadline passed with {len(reporters)} of {len(expected)} "
                f"(missing: {', '.join(missing)})"
            )

    def _finish_calibrating(self, why: str) -> None:
        """Average the nodes' calibrated thresholds and publish the model with them as the
        round's provisional model again, for labelling; with no calibration to average, go
        on to label from what came (statistics of nodes that ran no calibration pass)."""
        current = self.state.current
        assert current is not None
        model = self._labelling_model()
        if model is None:
            self.done = True
            return
        stats = self.state.load_label_stats()
        good = {n: s for n, s in stats.items() if s.thetas is not None}
        made = self._calibrate(model, good) if good else None
        if self.upstream is not None:
            self._relay_labels(stats, why, made[0] if made else None)
            return
        if not good:
            log.warning(
                "round %d: no node calibrated the thresholds (%s); labels from the model as merged",
                current.round_id,
                why,
            )
            self._finish_labelling(why)
            return
        if made is None:
            self._finish_labelling(why)
            return
        averaged, tuned = made
        if parent_tag(tuned) == current.model_tag:
            # The nodes would not answer the same model again: its statistics are these.
            self._finish_labelling(why)
            return
        payload = self.state.global_payload()
        assert payload is not None  # _labelling_model decoded it
        provisional = protocol.decode_global(payload, self.state.limits)
        metrics = {
            **provisional.metrics,
            "calibration_nodes": float(len(averaged.nodes)),
            "calibration_images": float(averaged.images),
        }
        message = GlobalModel(
            current.round_id, tuned, provisional.contains, metrics, provisional.session
        )
        out = protocol.encode(message, weight_encoding=self.config.weight_encoding)
        packets = self.channel.send(self.topics.global_model, out, retain=True)
        deadline = self.clock() + self.config.label_deadline_s
        self.state.mark_labelling(out, tuned, provisional.contains, parent_tag(tuned), deadline)
        log.info(
            "round %d: thresholds calibrated by %d node(s) on %d images (%s; mean %.2f -> "
            "%.2f); provisional model published again for its labels",
            current.round_id,
            len(averaged.nodes),
            averaged.images,
            why,
            float(model.thetas.mean()),
            float(tuned.thetas.mean()),
        )
        self._emit(
            "calibrated",
            round=current.round_id,
            nodes=list(averaged.nodes),
            images=averaged.images,
            reason=why,
            bytes=len(out),
            packets=packets,
        )
        self._emit(
            "labelling",
            round=current.round_id,
            expected=list(provisional.contains),
            deadline_unix=round(deadline, 3),
        )

    def _calibrate(
        self, model: SubModel, calibrated: dict[str, LabelStats]
    ) -> tuple[calibration.AveragedThetas, SubModel] | None:
        """The nodes' calibrated thresholds averaged, and ``model`` with them; None
        (logged) if they cannot be."""
        current = self.state.current
        assert current is not None
        try:
            averaged = calibration.average_thetas(calibrated, model.n_neurons)
            return averaged, calibration.calibrated(model, averaged)
        except MergeError as exc:  # checked as they came; a damaged state directory
            log.error("round %d: the thresholds cannot be averaged: %s", current.round_id, exc)
            return None

    def _finish_labelling(self, why: str) -> None:
        """Pool the stored statistics into the global model's labels and publish it again
        (a site aggregator: sum them and send them to the root)."""
        current = self.state.current
        assert current is not None
        payload = self.state.global_payload()
        provisional = protocol.decode_global(payload, self.state.limits) if payload else None
        if provisional is None:
            log.error("round %d: no stored global model to label", current.round_id)
            self.done = True
            return
        stats = self.state.load_label_stats()
        if self.upstream is not None:
            self._relay_labels(stats, why)
            return
        images = sum(s.n_images for s in stats.values())
        model = calibration.without_request(provisional.model)  # not for the final model
        labels = LABELS_KEPT
        if stats:
            try:
                pooled = federated_labels.pool(
                    [(s.class_counts, s.response_sums) for s in stats.values()]
                )
                model = federated_labels.relabel(model, pooled)
                labels = LABELS_FEDERATED
            except MergeError as exc:
                log.error("round %d: label statistics cannot be pooled: %s", current.round_id, exc)
        if labels == LABELS_KEPT:
            model = federated_labels.with_labels_note(model, LABELS_KEPT)
            log.warning(
                "round %d: no label statistics (%s): the global model keeps the sub-models' labels",
                current.round_id,
                why,
            )
        metrics = {
            **provisional.metrics,
            "label_nodes": float(len(stats) if labels == LABELS_FEDERATED else 0),
            "label_images": float(images if labels == LABELS_FEDERATED else 0),
            "labelled_neurons": float((model.labels >= 0).sum()),
        }
        message = GlobalModel(
            current.round_id, model, provisional.contains, metrics, provisional.session
        )
        out = protocol.encode(message, weight_encoding=self.config.weight_encoding)
        packets = self.channel.send(self.topics.global_model, out, retain=True)
        self.state.mark_merged(out, model, provisional.contains)
        if labels == LABELS_FEDERATED:
            log.info(
                "round %d: labels from %d node(s), %d images (%s); global model published again",
                current.round_id,
                len(stats),
                images,
                why,
            )
        self._emit(
            "relabelled" if labels == LABELS_FEDERATED else "labels_kept",
            round=current.round_id,
            labels=labels,
            nodes=sorted(stats) if labels == LABELS_FEDERATED else [],
            images=int(metrics["label_images"]),
            reason=why,
            bytes=len(out),
            packets=packets,
        )
        self._next_round()

    # ---- upstream mode: a site of a root fleet -------------------------------------------

    def _start_upstream(self) -> None:
        assert self.upstream is not None and self.root_topics is not None
        transport = self.upstream.transport
        transport.subscribe(self.root_topics.round, qos=1)
        transport.subscribe(self.root_topics.global_all, qos=1)
        self._upstream_connects_seen = transport.connects
        self._site_status("online")

    def _serves(self, session: str, root_round: int) -> bool:
        """Whether the current site round serves root round ``root_round`` of ``session``."""
        current = self.state.current
        return (
            current is not None
            and current.upstream_session == session
            and current.upstream_round == root_round
        )

    def _is_new_root_round(self, root: RoundAnnouncement) -> bool:
        """Whether ``root`` is later than the root round the current site round serves
        (a new root session counts as later: its rounds start again at 1)."""
        current = self.state.current
        if current is None:
            return True
        if root.session != current.upstream_session:
            return True
        return root.round_id > current.upstream_round

    def _on_root_round(self, root: RoundAnnouncement) -> None:
        self._root_round = root
        if self.done or not self._is_new_root_round(root):
            return  # a re-announcement of the round we serve, or an older one
        current = self.state.current
        if current is None or current.phase == "merged":
            self._next_round()
        elif current.phase == "open":
            # The root moved on (it merged without us): the updates collected so far are
            # not wasted, they go to the root's current round instead.
            log.info(
                "round %d now serves root round %d (was %d)",
                current.round_id,
                root.round_id,
                current.upstream_round,
            )
            self.state.retarget(root.session, root.round_id)
            self._emit("retargeted", round=current.round_id, root_round=root.round_id)
        else:
            # Forwarded, and the root announced a later round without the model of ours
            # reaching us (lost with a broker's retained messages): our nodes keep the
            # model they have, and the next site round serves the new root round.
            log.warning(
                "round %d: the root moved on to round %d before its model of round %d arrived",
                current.round_id,
                root.round_id,
                current.upstream_round,
            )
            self.state.close_round()
            self._emit("root_moved_on", round=current.round_id, root_round=root.round_id)
            self._next_round()

    def _on_root_global(self, message: GlobalModel) -> None:
        self._root_global = message
        current = self.state.current
        if current is None or current.phase == "merged":
            return
        if (
            current.phase in ("calibrating", "labelling")
            and protocol.global_labels(message.model) == LABELS_PROVISIONAL
            and parent_tag(message.model) == current.model_tag
        ):
            return  # the provisional model again (a root reconnect): already passed down
        if self._serves(message.session, message.round_id):
            self._deliver(message)

    def _forward(
        self,
        announcement: RoundAnnouncement,
        merged: SubModel,
        node_ids: tuple[str, ...],
        metrics: dict[str, float],
        images: int,
        why: str,
    ) -> None:
        """Send the site model upstream as this site's update of the root round."""
        assert self.config.upstream is not None
        current = self.state.current
        assert current is not None
        update = SubModelUpdate(
            self.config.upstream.site_id,
            current.upstream_round,
            merged,
            images,
            {**metrics, "site_round": float(announcement.round_id), "site_nodes": len(node_ids)},
            current.upstream_session,
        )
        payload = protocol.encode(update, weight_encoding=self.config.weight_encoding)
        self.state.mark_forwarded(payload, merged, node_ids)
        packets = self._send_forwarded()
        log.info(
            "round %d merged (%s): %d neurons from %s, forwarded to root round %d",
            announcement.round_id,
            why,
            merged.n_neurons,
            ", ".join(node_ids),
            current.upstream_round,
        )
        self._emit(
            "forwarded",
            round=announcement.round_id,
            root_round=current.upstream_round,
            neurons=merged.n_neurons,
            contains=list(node_ids),
            reason=why,
            merge_seconds=round(metrics["merge_seconds"], 4),
            bytes=len(payload),
            packets=packets,
        )
        self._site_status("online", f"site model of round {announcement.round_id} sent")
        if self._root_global is not None and self._serves(
            self._root_global.session, self._root_global.round_id
        ):
            self._deliver(self._root_global)  # the root did not wait for us

    def _send_forwarded(self) -> int:
        """(Re-)send the stored site model of the current round; packets published."""
        assert self.upstream is not None and self.config.upstream is not None
        payload = self.state.forwarded_payload()
        if payload is None:
            return 0
        assert self.root_topics is not None
        try:
            return self.upstream.send(
                self.root_topics.update(self.config.upstream.site_id), payload, retain=True
            )
        except TransportError as exc:
            # Stored: sent again after the upstream connection comes back.
            log.warning("the site model is not acknowledged upstream yet (%s)", exc)
            return 0

    def _deliver(self, root: GlobalModel) -> None:
        """Publish the root's global model as the current site round's global model."""
        current = self.state.current
        assert current is not None
        labels = protocol.global_labels(root.model)
        # A provisional model asking for a calibration goes down as it is: the site's
        # nodes run the pass, and the site relays their averaged thresholds.
        calibrate = protocol.requested_calibration(root.model)
        model = root.model if calibrate else calibration.without_request(root.model)
        message = GlobalModel(
            current.round_id,
            model,
            root.contains,
            {**root.metrics, "root_round": float(root.round_id)},
            current.announcement.session,
        )
        payload = protocol.encode(message, weight_encoding=self.config.weight_encoding)
        packets = self.channel.send(self.topics.global_model, payload, retain=True)
        if current.phase == "calibrating":
            reason = "the root's calibrated model"
        elif current.phase == "labelling":
            reason = "the root's final model"
        elif current.phase == "forwarded":
            reason = "root model"
        else:
            reason = "root model (the root merged without us)"
        if labels == LABELS_PROVISIONAL:
            # The root asks for label statistics: relay our nodes' (see the module doc).
            deadline = self.clock() + self.config.label_deadline_s
            phase = "calibrating" if calibrate else "labelling"
            self.state.mark_labelling(
                payload, model, root.contains, parent_tag(model), deadline, phase=phase
            )
        else:
            self.state.mark_merged(payload, model, root.contains)
        log.info(
            "round %d: the root's model of round %d (%d neurons from %s, labels %s) "
            "published to the site",
            current.round_id,
            root.round_id,
            root.model.n_neurons,
            ", ".join(root.contains),
            labels,
        )
        self._emit(
            "global",
            round=current.round_id,
            root_round=root.round_id,
            neurons=root.model.n_neurons,
            contains=list(root.contains),
            reason=reason,
            bytes=len(payload),
            packets=packets,
            labels=labels,
            **({"calibrate": calibrate} if calibrate else {}),
        )
        if labels != LABELS_PROVISIONAL:
            self._next_round()

    def _relay_labels(
        self,
        stats: dict[str, LabelStats],
        why: str,
        averaged: calibration.AveragedThetas | None = None,
    ) -> None:
        """Send the sum of the site's nodes' label statistics to the root (they pool
        exactly: the root's sums over sites are the sums over all nodes). Calibrating,
        with their thresholds ``averaged`` (weighted by calibration images) and the total
        of those images, so that the root's average over sites is the average over nodes."""
        assert self.config.upstream is not None
        current = self.state.current
        assert current is not None
        thetas = averaged.thetas if averaged is not None else None
        calibration_images = averaged.images if averaged is not None else 0
        if not stats:
            log.warning(
                "round %d: no label statistics from the site's nodes (%s); none relayed",
                current.round_id,
                why,
            )
            payload = b""  # recorded as relayed: nothing to send, wait for the root
        else:
            message = LabelStats(
                self.config.upstream.site_id,
                current.upstream_round,
                current.model_tag,
                sum(s.class_counts for s in stats.values()),
                sum(s.response_sums for s in stats.values()),
                current.upstream_session,
                thetas,
                calibration_images,
            )
            payload = protocol.encode(message)
        self.state.mark_labels_relayed(payload)
        self._send_relayed_labels()
        self._emit(
            "labels_relayed",
            round=current.round_id,
            root_round=current.upstream_round,
            nodes=sorted(stats),
            images=sum(s.n_images for s in stats.values()),
            calibration_images=calibration_images,
            reason=why,
        )
        root = self._root_global
        if (
            root is not None
            and self._serves(root.session, root.round_id)
            and (
                protocol.global_labels(root.model) != LABELS_PROVISIONAL
                or parent_tag(root.model) != current.model_tag
            )
        ):
            self._deliver(root)  # the root's next model came first

    def _send_relayed_labels(self) -> None:
        """(Re-)send the site's summed label statistics of the current round upstream."""
        assert self.upstream is not None and self.config.upstream is not None
        assert self.root_topics is not None
        payload = self.state.relayed_labels_payload()
        if not payload:
            return
        try:
            self.upstream.send(
                self.root_topics.labels(self.config.upstream.site_id), payload, retain=True
            )
        except TransportError as exc:
            log.warning("the site's label statistics are not acknowledged upstream yet (%s)", exc)

    def _after_upstream_reconnect(self) -> None:
        # The root broker may have lost the retained site model with a restart.
        current = self.state.current
        log.info("upstream reconnected: status and site model published again")
        self._site_status("training" if current and current.phase == "open" else "online")
        if current is not None and current.phase == "forwarded":
            self._send_forwarded()
        if current is not None and current.phase in ("calibrating", "labelling"):
            self._send_relayed_labels()

    def _site_status(
        self, state: str, detail: str = "", round_id: int | None = None, *, wait: bool = False
    ) -> None:
        """This site's status in the root fleet, retained, like a node's."""
        if self.upstream is None or self.config.upstream is None or self.root_topics is None:
            return
        current = self.state.current
        rid = (current.upstream_round if current else 0) if round_id is None else round_id
        site = self.config.upstream.site_id
        message = NodeStatus(site, state, rid, self.clock(), detail)
        try:
            self.upstream.send(
                self.root_topics.status(site), message, retain=True, wait=wait, timeout=2.0
            )
        except TransportError as exc:
            log.warning("site status %r not published upstream: %s", state, exc)

    def _emit(self, event: str, **fields: Any) -> None:
        self.events({"event": event, "time_unix": round(self.clock(), 3), **fields})
