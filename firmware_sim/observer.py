"""The orchestrator's view of the fleet through the broker: a read-only MQTT subscriber.

It subscribes to the fleet's round, global, update, status and metrics topics with the
project's own transport and protocol (so it sees exactly what the aggregator and the
nodes see), saves every sub-model update and global model it receives under
``models_dir`` (``round<R>/<node>.estdp``, ``round<R>/global.estdp``; a global model whose
labels are still provisional goes to ``round<R>/global-provisional.estdp``, so the final
one of the round is ``global.estdp``) and turns each
message into a small event dict on the orchestrator's queue. It publishes nothing while
the fleet runs; afterwards, on a shared broker, :meth:`Observer.clear_retained` deletes
the retained messages of the run.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any

from estdp import protocol
from estdp.model import save_model
from estdp.topics import Topics
from estdp.transport import TransportConfig, mqtt_transport
from estdp.transport.channel import Channel

log = logging.getLogger(__name__)

SOURCE = "observer"


def model_path(models_dir: Path, round_id: int, name: str) -> Path:
    """Where the observer saves the model ``name`` ("global" or a node id) of a round."""
    return models_dir / f"round{round_id}" / f"{name}.estdp"


def to_event(message: protocol.Message, models_dir: Path | None) -> dict[str, Any]:
    """A plain event dict for a decoded message (saving its model when it carries one)."""
    if isinstance(message, protocol.RoundAnnouncement):
        return {
            "event": "round",
            "round": message.round_id,
            "expected": message.expected_nodes,
            "min_nodes": message.min_nodes,
            "deadline_unix": message.deadline_unix,
            "continue_from_global": message.continue_from_global,
        }
    if isinstance(message, protocol.SubModelUpdate):
        path = None
        if models_dir is not None:
            path = model_path(models_dir, message.round_id, message.node_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_model(message.model, path)
        return {
            "event": "update",
            "node": message.node_id,
            "round": message.round_id,
            "neurons": message.model.n_neurons,
            "images_seen": message.images_seen,
            "metrics": dict(message.metrics),
            "path": str(path) if path else None,
        }
    if isinstance(message, protocol.GlobalModel):
        path = None
        labels = protocol.global_labels(message.model)
        if models_dir is not None:
            name = "global-provisional" if labels == protocol.LABELS_PROVISIONAL else "global"
            path = model_path(models_dir, message.round_id, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_model(message.model, path)
        return {
            "event": "global",
            "round": message.round_id,
            "neurons": message.model.n_neurons,
            "contains": list(message.contains),
            "metrics": dict(message.metrics),
            "labels": labels,
            "calibrate": protocol.requested_calibration(message.model),
            "path": str(path) if path else None,
        }
    if isinstance(message, protocol.NodeStatus):
        return {
            "event": "status",
            "node": message.node_id,
            "state": message.state,
            "round": message.round_id,
            "detail": message.detail,
        }
    if isinstance(message, protocol.NodeMetrics):
        return {
            "event": "metrics",
            "node": message.node_id,
            "round": message.round_id,
            "metrics": dict(message.metrics),
        }
    return {"event": "unknown", "type": type(message).__name__}


class Observer:
    """Subscribes to a fleet's topics on a thread; events go to ``events``."""

    def __init__(
        self,
        config: TransportConfig,
        fleet: str,
        events: queue.Queue[tuple[str, dict[str, Any]]],
        models_dir: Path | None,
        *,
        source: str = SOURCE,
    ) -> None:
        self.topics = Topics(fleet)
        self.source = source  # the tag of its events (one observer per fleet of a hierarchy)
        self.events = events
        self.models_dir = models_dir
        self.transport = mqtt_transport(config)
        self.channel = Channel(self.transport)
        self.retained_topics: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)

    def start(self, timeout: float = 20.0) -> None:
        t = self.topics
        for topic_filter in (
            f"{t.round}/#",
            t.global_all,
            t.all_updates,
            t.all_status,
            t.all_metrics,
        ):
            self.transport.subscribe(topic_filter, qos=1)
        self.transport.connect(timeout)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                received = self.channel.poll(0.2)
            except Exception as exc:  # the observer must never take the orchestrator down
                log.warning("observer: %s", exc)
                continue
            if received is None:
                continue
            try:
                event = to_event(received.message, self.models_dir)
            except Exception as exc:
                log.warning("observer: cannot record %s: %s", received.topic, exc)
                continue
            event["retained"] = received.retained
            if received.retained:
                self.retained_topics.add(received.topic)
            self.events.put((self.source, event))

    def clear_retained(self, extra: tuple[str, ...] = ()) -> None:
        """Delete the fleet's retained messages from the broker (an empty retained publish).

        Used on a shared broker after a run, so the run leaves nothing behind.
        """
        for topic in sorted(self.retained_topics | set(extra)):
            try:
                self.transport.publish(topic, b"", qos=1, retain=True, wait=True, timeout=5.0)
            except Exception as exc:  # cleaning up must not hide the run's result
                log.warning("observer: could not clear retained %s: %s", topic, exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.transport.close()
