"""The edge-node daemon: wait for a round, train on local data, publish, install the global.

A round, from a node's side::

    round     RoundAnnouncement r (retained) arrives; unless r's global model is already
              installed or r's update already sent, the node trains (status "training")
              neurons_per_node neurons on its local data, from the installed global model
              when the round says continue_from_global, else from fresh weights
    update    SubModelUpdate(r) to estdp/<fleet>/nodes/<id>/update: retained, QoS 1,
              waiting for the broker's acknowledgement; kept on disk until r's global
              model is installed, and published again after every reconnect, so neither
              an aggregator restart nor a broker restart loses it
    global    GlobalModel r (retained, verified by the protocol's checksums) is written
              atomically to the state directory, evaluated on local test data, and the
              metrics go to estdp/<fleet>/nodes/<id>/metrics
    labels    when that model's labels are provisional (note labels=provisional), the
              node first runs it frozen on its labelled training images and publishes
              LabelStats(r, tag, per-class image counts, per-class spike-count sums) to
              estdp/<fleet>/nodes/<id>/labels (retained, QoS 1; kept on disk and sent
              again after a reconnect until the round's final model is installed). When
              the model carries the note calibrate=N, the node first runs a
              thresholds-only pass over N of its images (weights frozen) and sends its
              thresholds with statistics measured under them
    final     the same round's global model again, with the pooled labels: installed
              atomically in place of the provisional one (same weights), evaluated and
              reported again. A node that comes late installs the final one directly.

The status topic (retained) says online / training / offline; the connection's last will
says offline. Training runs in the daemon's thread, never in the network thread, and a
stop request (SIGTERM) parks it: the partial work is dropped, the node says offline, and
after a restart it trains the round again if the round is still open.

Training and evaluation are one object, a :class:`Trainer`; :class:`LocalTrainer` wires in
the engine (:mod:`edge_node.workflow`), tests pass a fast fake.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from edge_node.labels import class_sums
from estdp import protocol
from estdp.atomic import atomic_write_bytes, atomic_write_text
from estdp.backend import Backend
from estdp.errors import ConfigError, EstdpError, ModelFileError, ProtocolError, TransportError
from estdp.lineage import parent_tag
from estdp.model import SubModel, load_model, save_model
from estdp.params import NetworkParams
from estdp.protocol import (
    LABELS_PROVISIONAL,
    GlobalModel,
    LabelStats,
    NodeMetrics,
    NodeStatus,
    RoundAnnouncement,
    SubModelUpdate,
    global_labels,
    requested_calibration,
)
from estdp.topics import Topics, validate_id
from estdp.transport.base import Will
from estdp.transport.channel import Channel, Received

log = logging.getLogger(__name__)

EventSink = Callable[[dict[str, Any]], None]
Progress = Callable[[int, int], None]  # (images done, images total)


class Parked(Exception):
    """Training was interrupted by a stop request."""


@dataclass(frozen=True)
class TrainOutcome:
    """A trained sub-model and what the node measured while training it."""

    model: SubModel
    metrics: dict[str, float] = field(default_factory=dict)


class LabelCounts(NamedTuple):
    """A node's label statistics for one model (see :func:`label_statistics`)."""

    class_counts: np.ndarray  # (C,) int64: labelled images per class
    response_sums: np.ndarray  # (C, N) float64: spike counts summed per class


def label_statistics(
    spike_counts: np.ndarray, image_labels: np.ndarray, n_classes: int
) -> LabelCounts:
    """Per-class image counts and per-class sums of each neuron's spike counts.

    ``edge_node.labels.assign_labels`` divides the second by the first; sent instead of
    the quotient, they can be pooled over nodes exactly (:mod:`aggregator.federated_labels`).

    Parameters
    ----------
    spike_counts
        (n, N) spike counts of the frozen model on n images.
    image_labels
        (n,) classes in ``[0, n_classes)``.
    n_classes
        C.

    Raises
    ------
    ConfigError
        The shapes disagree or a label is out of range.
    """
    return LabelCounts(*class_sums(spike_counts, image_labels, n_classes))


class Trainer(Protocol):
    """What a node does with its data."""

    def train(
        self,
        announcement: RoundAnnouncement,
        n_neurons: int,
        start: SubModel | None,
        progress: Progress,
    ) -> TrainOutcome: ...

    def evaluate(self, model: SubModel) -> dict[str, float]: ...

    def label_stats(self, model: SubModel, round_id: int) -> LabelCounts:
        """Label statistics of ``model`` (frozen) on the node's labelled images."""
        ...

    def calibrate(self, model: SubModel, n_images: int, round_id: int) -> tuple[np.ndarray, int]:
        """``model``'s thresholds after a thresholds-only pass over up to ``n_images`` of
        the node's images, and how many it used."""
        ...


class LocalTrainer:
    """The engine on local data: one pass of STDP, label assignment, evaluation.

    Parameters
    ----------
    images, labels
        Training images (n, 28, 28) uint8 and their labels.
    test_images, test_labels
        Local evaluation set (may be empty: no evaluation).
    params, backend
        Network parameters and array backend.
    node_id, seed
        Provenance; round ``r`` trains with seed ``seed + r``.
    label_images
        Cap on the training images the label statistics of a global model are measured
        on (a seeded random subset; None: all of them).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        test_images: np.ndarray,
        test_labels: np.ndarray,
        params: NetworkParams,
        backend: Backend,
        *,
        node_id: str,
        seed: int = 0,
        label_images: int | None = None,
    ) -> None:
        self.images, self.labels = images, labels
        self.test_images, self.test_labels = test_images, test_labels
        self.params, self.backend = params, backend
        self.node_id, self.seed = node_id, seed
        self.label_images = label_images

    def train(
        self,
        announcement: RoundAnnouncement,
        n_neurons: int,
        start: SubModel | None,
        progress: Progress,
    ) -> TrainOutcome:
        from edge_node.workflow import train_model  # the engine, loaded when first used

        total = int(self.images.shape[0])
        run = train_model(
            self.images,
            self.labels,
            n_neurons,
            self.params,
            self.backend,
            seed=self.seed + announcement.round_id,
            node_id=self.node_id,
            start=start,
            progress=lambda done: progress(done, total),
            round_id=announcement.round_id,
        )
        return TrainOutcome(
            run.model,
            {
                "train_seconds": run.train_seconds,
                "label_seconds": run.label_seconds,
                "images": float(total),
                "neurons_labelled": float((run.model.labels >= 0).sum()),
            },
        )

    def _subset(self, count: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """At most ``count`` of the node's images and labels, a seeded random subset in
        shard order, so that it does not depend on how the shard is sorted (e.g. by class)."""
        total = int(self.images.shape[0])
        if count is None or count >= total:
            return self.images, self.labels
        pick = np.sort(np.random.default_rng(seed).choice(total, count, replace=False))
        return self.images[pick], self.labels[pick]

    def label_stats(self, model: SubModel, round_id: int) -> LabelCounts:
        from edge_node.workflow import spike_counts

        images, labels = self._subset(self.label_images, self.seed)
        # The seed of train_model's own label pass in round r (seed + r, plus one).
        counts = spike_counts(
            model.weights,
            model.thetas,
            images,
            model.params,
            self.backend,
            seed=self.seed + round_id + 1,
        )
        return label_statistics(counts, labels, model.n_classes)

    def calibrate(self, model: SubModel, n_images: int, round_id: int) -> tuple[np.ndarray, int]:
        from edge_node.workflow import calibrate_thetas

        images, _ = self._subset(n_images, self.seed + 1)
        thetas = calibrate_thetas(model, images, self.backend, seed=self.seed + round_id + 2)
        return thetas, int(images.shape[0])

    def evaluate(self, model: SubModel) -> dict[str, float]:
        if self.test_images.shape[0] == 0:
            return {}
        from edge_node.workflow import evaluate_model

        result = evaluate_model(
            model, self.test_images, self.test_labels, self.backend, seed=self.seed
        )
        return {k: float(v) for k, v in result.to_dict().items()}


@dataclass(frozen=True)
class NodeConfig:
    """A node's identity and behaviour.

    Parameters
    ----------
    node_id
        This node's id (topic level, client id, and what the broker ACL binds).
    fleet
        Topic prefix ``estdp/<fleet>/``.
    state_dir
        Where the installed global model and the pending update are kept (None: memory).
    neurons
        Train this many neurons whatever the round asks (None: the round's number).
    weight_encoding
        Weight encoding of the published updates.
    publish_timeout_s
        How long to wait for the broker to acknowledge an update.
    """

    node_id: str
    fleet: str = "default"
    state_dir: Path | None = None
    neurons: int | None = None
    weight_encoding: str = "float32"
    publish_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        validate_id(self.node_id, "node id")

    def will(self) -> Will:
        """The last will: a retained offline status."""
        payload = protocol.encode(
            NodeStatus(self.node_id, "offline", -1, time.time(), "connection lost")
        )
        return Will(Topics(self.fleet).status(self.node_id), payload, qos=1, retain=True)


def _state_error(action: str, path: Path, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot {action} the node state {path}: {exc.strerror or exc}")


def ensure_state_dir(directory: Path) -> Path:
    """Create the node's state directory (and its parents) unless it exists.

    Raises
    ------
    ConfigError
        It cannot be created (a parent is a file, no permission, ...).
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the node state directory {directory}: {exc.strerror or exc}"
        ) from None
    return directory


class NodeDaemon:
    """The node service over a :class:`~estdp.transport.channel.Channel`.

    Parameters
    ----------
    config
        Identity and behaviour.
    channel
        A channel over a transport connected with ``config.will()``.
    trainer
        Training and evaluation on local data.
    events
        Receives one dict per notable event (the CLI prints them as JSON lines).
    stop
        Set to ask the daemon to stop (parks training in progress).
    """

    def __init__(
        self,
        config: NodeConfig,
        channel: Channel,
        trainer: Trainer,
        *,
        events: EventSink | None = None,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.channel = channel
        self.trainer = trainer
        self.events = events or (lambda event: None)
        self.stop = stop or threading.Event()
        self.clock = clock
        self.topics = Topics(config.fleet)
        self.installed_round = 0
        self.published_round = 0
        self.pending_update: bytes | None = None  # sent, global model not yet installed
        self.global_model: SubModel | None = None
        # Label statistics sent for the installed provisional global model, and which
        # (session:round:tag) they answer; re-sent after a reconnect until the final one.
        self.pending_labels: bytes | None = None
        self.labels_sent = ""
        self.session: str | None = None  # the aggregator session this node follows
        self._todo: RoundAnnouncement | None = None
        self._connects_seen = 0
        self._last_progress = 0.0
        self._load_state()

    # ---- persistence --------------------------------------------------------------------

    def _path(self, name: str) -> Path | None:
        return None if self.config.state_dir is None else Path(self.config.state_dir) / name

    @property
    def global_path(self) -> Path | None:
        """The installed global model's file (when there is a state directory)."""
        return self._path("global.estdp")

    def _load_state(self) -> None:
        state_file = self._path("node.json")
        if state_file is None:
            return
        ensure_state_dir(Path(self.config.state_dir))  # type: ignore[arg-type]
        try:
            text = state_file.read_text() if state_file.exists() else None
        except OSError as exc:
            raise _state_error("read", state_file, exc) from None
        if text is None:
            return
        try:
            record = json.loads(text)
            self.installed_round = int(record.get("installed_round", 0))
            self.published_round = int(record.get("published_round", 0))
            self.session = record.get("session")
            self.labels_sent = str(record.get("labels_sent", ""))
        except (ValueError, TypeError, AttributeError) as exc:
            # Garbled counters only cost a round trained again; refusing to start would
            # cost the node until someone deletes the file.
            log.error("ignoring the unreadable node state %s: %s", state_file, exc)
            return
        if self.installed_round and self.global_path is not None and self.global_path.exists():
            try:
                self.global_model = load_model(self.global_path)
            except ModelFileError as exc:
                log.error("ignoring the installed global model: %s", exc)
                self.installed_round = 0
        pending = self._path("update.msg")
        if self.published_round > self.installed_round and pending is not None and pending.exists():
            try:
                self.pending_update = pending.read_bytes()
            except OSError as exc:
                raise _state_error("read", pending, exc) from None
        labels = self._path("labels.msg")
        if self.labels_provisional and self.labels_sent and labels is not None and labels.exists():
            try:
                self.pending_labels = labels.read_bytes()
            except OSError as exc:
                raise _state_error("read", labels, exc) from None

    def _save_state(self) -> None:
        state_file = self._path("node.json")
        if state_file is not None:
            record = {
                "session": self.session,
                "installed_round": self.installed_round,
                "published_round": self.published_round,
                "labels_sent": self.labels_sent,
            }
            try:
                atomic_write_text(state_file, json.dumps(record) + "\n")
            except OSError as exc:
                raise _state_error("write", state_file, exc) from None

    @property
    def labels_provisional(self) -> bool:
        """Whether the installed global model's labels are provisional (its final model,
        with the pooled labels, is still to come)."""
        return self.global_model is not None and (
            global_labels(self.global_model) == LABELS_PROVISIONAL
        )

    # ---- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe, say online, and re-send an update still waiting for its round."""
        transport = self.channel.transport
        transport.subscribe(self.topics.round, qos=1)
        transport.subscribe(self.topics.global_all, qos=1)
        self._connects_seen = transport.connects
        self._status("online")
        self._resend_pending()

    def run(self, poll_s: float = 0.1) -> int:
        """Serve until :attr:`stop` is set; 0 on a clean stop."""
        self.start()
        try:
            while not self.stop.is_set():
                self.step(poll_s)
        finally:
            # Acknowledged before the caller disconnects (a clean close sends no will).
            self._status("offline", "stopped", wait=True)
        return 0

    def step(self, timeout: float = 0.1) -> None:
        """One step: take queued messages, react to a reconnect, train when a round asks."""
        for received in self.channel.poll_batch(timeout):
            self._handle(received)
        transport = self.channel.transport
        if transport.connects > self._connects_seen:
            self._connects_seen = transport.connects
            log.info("reconnected: status and pending update published again")
            self._status("training" if self._todo else "online")
            self._resend_pending()
        if self._todo is not None and not self.stop.is_set():
            announcement, self._todo = self._todo, None
            self._train(announcement)

    # ---- messages -----------------------------------------------------------------------

    def _handle(self, received: Received) -> None:
        message = received.message
        if isinstance(message, RoundAnnouncement) and received.topic == self.topics.round:
            # The retained announcement is the aggregator's latest word: a new session
            # (a fresh aggregator state) starts the round count again.
            if message.session != self.session:
                self._new_session(message.session)
            if message.round_id > max(self.installed_round, self.published_round):
                self._todo = message
        elif isinstance(message, GlobalModel) and received.topic == self.topics.global_model:
            if self.session is None:
                self.session = message.session
            if message.session == self.session:
                self._install(message)
            else:
                log.debug("ignoring a global model of another session (%s)", message.session)
        else:
            log.debug("ignoring a %s message on %s", type(message).__name__, received.topic)

    def _new_session(self, session: str) -> None:
        if self.session is not None:
            log.info("the aggregator started a new session (%s): rounds start again", session)
        self.session = session
        self.installed_round = self.published_round = 0
        self.pending_update = None
        self.global_model = None
        self.pending_labels, self.labels_sent = None, ""
        self._todo = None
        self._save_state()

    def _train(self, announcement: RoundAnnouncement) -> None:
        rid = announcement.round_id
        if rid <= max(self.installed_round, self.published_round):
            return
        n = self.config.neurons or announcement.neurons_per_node
        start = self.global_model if announcement.continue_from_global else None
        log.info(
            "round %d: training %d neurons%s",
            rid,
            n,
            " from the global model" if start is not None else "",
        )
        self._status("training", f"round {rid}", rid)
        self._emit("training", round=rid, neurons=n, from_global=start is not None)
        started = time.perf_counter()
        try:
            outcome = self.trainer.train(announcement, n, start, self._progress(rid))
        except Parked:
            log.info("round %d: training parked by a stop request", rid)
            self._emit("parked", round=rid)
            return
        except EstdpError as exc:
            log.error("round %d: training failed: %s", rid, exc)
            self._status("online", f"training failed: {exc}"[:200], rid)
            self._emit("error", round=rid, message=str(exc))
            return
        seconds = time.perf_counter() - started
        update = SubModelUpdate(
            self.config.node_id,
            rid,
            outcome.model,
            int(outcome.model.provenance.images_seen),
            {"seconds": seconds, **outcome.metrics},
            announcement.session,
        )
        payload = protocol.encode(update, weight_encoding=self.config.weight_encoding)
        self.pending_update, self.published_round = payload, rid
        self._keep("update.msg", payload)
        self._publish_update(payload, rid)
        self._status("online", f"update {rid} sent", rid)
        self._emit(
            "update_sent",
            round=rid,
            neurons=outcome.model.n_neurons,
            bytes=len(payload),
            train_seconds=round(seconds, 3),
        )

    def _progress(self, round_id: int) -> Progress:
        def progress(done: int, total: int) -> None:
            if self.stop.is_set():
                raise Parked
            now = time.monotonic()
            if now - self._last_progress >= 0.5 or done >= total:
                self._last_progress = now
                self._emit("progress", round=round_id, done=done, total=total)

        return progress

    def _keep(self, name: str, payload: bytes) -> None:
        """Store a message to (re-)send in the state directory, then the state itself, so
        that a restarted node sends it again."""
        path = self._path(name)
        if path is not None:
            try:
                atomic_write_bytes(path, payload)
            except OSError as exc:
                raise _state_error("write", path, exc) from None
        self._save_state()

    def _publish_update(self, payload: bytes, round_id: int) -> None:
        self._publish_retained(self.topics.update(self.config.node_id), payload, round_id, "update")

    def _publish_retained(self, topic: str, payload: bytes, round_id: int, what: str) -> None:
        try:
            self.channel.send(topic, payload, retain=True, timeout=self.config.publish_timeout_s)
        except TransportError as exc:
            # Kept: paho re-sends it after the reconnect, and so do we.
            log.warning(
                "round %d: %s not acknowledged yet (%s); it is re-sent after a reconnect",
                round_id,
                what,
                exc,
            )

    def _resend_pending(self) -> None:
        if self.pending_update is not None and self.published_round > self.installed_round:
            self._publish_update(self.pending_update, self.published_round)
        if self.pending_labels is not None and self.labels_provisional:
            self._publish_labels(self.pending_labels, self.installed_round)

    def _install(self, message: GlobalModel) -> None:
        rid = message.round_id
        labels = global_labels(message.model)
        provisional = labels == LABELS_PROVISIONAL
        if rid < self.installed_round:
            return
        replacing = rid == self.installed_round
        if replacing and (provisional or not self.labels_provisional):
            # The model installed already, again (a retained copy after a restart or a
            # reconnect): only label statistics not sent yet are still owed.
            if provisional and self.labels_provisional:
                self._send_label_stats(message)
            return
        if self.global_path is not None:
            # Atomic: a crash leaves the provisional model or the final one, never a mix.
            save_model(message.model, self.global_path)
        self.global_model = message.model
        self.installed_round = rid
        if self.published_round <= rid:
            self.pending_update = None
        if not provisional:
            self.pending_labels = None
        self._save_state()
        log.info(
            "round %d: installed the global model (%d neurons, labels %s%s)",
            rid,
            message.model.n_neurons,
            labels,
            ", in place of the provisional one" if replacing else "",
        )
        self._emit(
            "installed",
            round=rid,
            neurons=message.model.n_neurons,
            contains=list(message.contains),
            path=str(self.global_path) if self.global_path else None,
            labels=labels,
            replaced=replacing,
        )
        if provisional:
            # Before the evaluation: the aggregator waits for these, not for the metrics.
            self._send_label_stats(message)
        try:
            metrics = self.trainer.evaluate(message.model)
        except EstdpError as exc:
            log.error("round %d: evaluating the global model failed: %s", rid, exc)
            return
        if metrics:
            self.channel.send(
                self.topics.metrics(self.config.node_id),
                NodeMetrics(self.config.node_id, rid, metrics),
                wait=False,
            )
            self._emit("metrics", round=rid, metrics=metrics)

    def _send_label_stats(self, message: GlobalModel) -> None:
        """Measure the provisional global model on the local labelled images and publish
        the statistics (once per session, round and model)."""
        rid = message.round_id
        tag = parent_tag(message.model)
        key = f"{message.session}:{rid}:{tag}"
        if self.labels_sent == key:
            return  # already sent; a reconnect sends them again
        measure = getattr(self.trainer, "label_stats", None)
        if measure is None:
            # A trainer written before federated labels: the aggregator's label deadline
            # copes with a node that does not answer; a crash here would not.
            log.warning("round %d: this node's trainer cannot measure label statistics", rid)
            self.labels_sent = key
            return
        started = time.perf_counter()
        measured, thetas, used = message.model, None, 0
        asked = requested_calibration(message.model)
        calibrate = getattr(self.trainer, "calibrate", None)
        try:
            if asked > 0 and calibrate is not None:
                thetas, used = calibrate(message.model, asked, rid)
                measured = dataclasses.replace(
                    message.model, thetas=np.asarray(thetas, dtype=np.float32)
                )
                log.info(
                    "round %d: thresholds-only pass over %d images (mean theta %.2f -> %.2f)",
                    rid,
                    used,
                    float(np.mean(message.model.thetas)),
                    float(np.mean(thetas)),
                )
            counts = measure(measured, rid)
        except EstdpError as exc:
            log.error("round %d: label statistics failed: %s", rid, exc)
            self._emit("error", round=rid, message=f"label statistics failed: {exc}")
            return
        stats = LabelStats(
            self.config.node_id,
            rid,
            tag,
            counts.class_counts,
            counts.response_sums,
            message.session,
            thetas=thetas,
            calibration_images=used,
        )
        payload = protocol.encode(stats)
        self.pending_labels, self.labels_sent = payload, key
        self._keep("labels.msg", payload)
        self._publish_labels(payload, rid)
        seconds = time.perf_counter() - started
        log.info(
            "round %d: label statistics of the global model on %d images sent (%.1f s)",
            rid,
            stats.n_images,
            seconds,
        )
        self._emit(
            "label_stats_sent",
            round=rid,
            images=stats.n_images,
            calibration_images=used,
            seconds=round(seconds, 3),
            bytes=len(payload),
        )

    def _publish_labels(self, payload: bytes, round_id: int) -> None:
        self._publish_retained(
            self.topics.labels(self.config.node_id), payload, round_id, "label statistics"
        )

    # ---- status -------------------------------------------------------------------------

    def _status(
        self, state: str, detail: str = "", round_id: int | None = None, *, wait: bool = False
    ) -> None:
        rid = max(self.installed_round, self.published_round) if round_id is None else round_id
        message = NodeStatus(self.config.node_id, state, rid, self.clock(), detail)
        try:
            self.channel.send(
                self.topics.status(self.config.node_id),
                message,
                retain=True,
                wait=wait,
                timeout=2.0,
            )
        except (TransportError, ProtocolError) as exc:
            log.warning("status %r not published: %s", state, exc)

    def _emit(self, event: str, **fields: Any) -> None:
        self.events(
            {
                "event": event,
                "node": self.config.node_id,
                "time_unix": round(self.clock(), 3),
                **fields,
            }
        )
