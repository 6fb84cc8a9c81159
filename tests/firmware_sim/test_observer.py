"""The orchestrator's MQTT observer, over a real broker."""

from __future__ import annotations

import contextlib
import queue
import time

import numpy as np
import pytest

from estdp import protocol
from estdp.model import load_model, new_model
from estdp.params import NetworkParams
from estdp.topics import Topics
from estdp.transport import TransportConfig, mqtt_transport, parse_broker_url
from estdp.transport.channel import Channel
from firmware_sim.observer import Observer, model_path

pytestmark = pytest.mark.broker


def _model(node: str, n: int = 4) -> object:
    rng = np.random.default_rng(len(node))
    return new_model(
        rng.random((784, n)), np.zeros(n), NetworkParams(), node_id=node, images_seen=10, seed=1
    )


def _events(q: queue.Queue, n: int, timeout: float = 10.0) -> list[dict]:
    out: list[dict] = []
    end = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < end:
        with contextlib.suppress(queue.Empty):
            out.append(q.get(timeout=0.2)[1])
    return out


def test_observer_turns_messages_into_events_and_saves_models(broker_url, tmp_path):
    fleet = f"obs{time.time_ns() % 10**9}"
    topics = Topics(fleet)
    fields = parse_broker_url(broker_url)
    events: queue.Queue = queue.Queue()
    observer = Observer(
        TransportConfig(client_id=f"{fleet}-obs", **fields), fleet, events, tmp_path
    )
    observer.start()
    sender = mqtt_transport(TransportConfig(client_id=f"{fleet}-pub", **fields))
    sender.connect()
    channel = Channel(sender)
    try:
        sub = _model("node-1")
        channel.send(
            topics.round,
            protocol.RoundAnnouncement(7, 4, 4, "mse", time.time() + 60, 2, 1),
            retain=True,
        )
        channel.send(
            topics.status("node-1"), protocol.NodeStatus("node-1", "training", 7), retain=True
        )
        channel.send(
            topics.update("node-1"),
            protocol.SubModelUpdate("node-1", 7, sub, 10, {"train_seconds": 1.5}),
        )
        channel.send(
            topics.global_model,
            protocol.GlobalModel(7, sub, ("node-1",), {"merge_seconds": 0.01}),
            retain=True,
        )
        channel.send(topics.metrics("node-1"), protocol.NodeMetrics("node-1", 7, {"accuracy": 0.5}))
        got = _events(events, 5)
    finally:
        for topic in (topics.round, topics.status("node-1"), topics.global_model):
            sender.publish(topic, b"", retain=True, wait=True)  # leave no retained state
        sender.close()
        observer.stop()
    by_kind = {e["event"]: e for e in got}
    assert set(by_kind) == {"round", "status", "update", "global", "metrics"}
    assert by_kind["round"]["round"] == 7 and by_kind["round"]["expected"] == 2
    assert by_kind["status"]["state"] == "training"
    assert by_kind["update"]["metrics"] == {"train_seconds": 1.5}
    assert by_kind["global"]["contains"] == ["node-1"]
    assert by_kind["metrics"]["metrics"]["accuracy"] == 0.5
    saved = load_model(model_path(tmp_path, 7, "node-1"))
    assert np.array_equal(saved.weights, sub.weights)
    assert load_model(model_path(tmp_path, 7, "global")).n_neurons == 4


@pytest.mark.parametrize(("notes", "calibrate"), [({}, 0), ({"calibrate": "1500"}, 1500)])
def test_a_provisional_global_event_says_whether_it_asks_for_calibration(
    tmp_path, notes, calibrate
):
    from aggregator.federated_labels import with_labels_note
    from firmware_sim.observer import to_event

    provisional = with_labels_note(_model("aggregator"), protocol.LABELS_PROVISIONAL, notes)
    event = to_event(protocol.GlobalModel(1, provisional, ("node-1",)), tmp_path)
    assert event["labels"] == "provisional" and event["calibrate"] == calibrate
