"""The in-memory transport, and the channel (chunking, retained forms, rejection) over it."""

from __future__ import annotations

import numpy as np
import pytest

from estdp import protocol
from estdp.errors import TransportError
from estdp.model import new_model
from estdp.params import NetworkParams
from estdp.protocol import GlobalModel, Limits, NodeStatus
from estdp.topics import Topics
from estdp.transport.base import TransportConfig, Will
from estdp.transport.channel import Channel
from estdp.transport.memory import MemoryBroker, MemoryTransport

TOPICS = Topics("mem")


def model(n: int) -> object:
    rng = np.random.default_rng(n)
    return new_model(
        rng.random((784, n), dtype=np.float32),
        np.zeros(n, np.float32),
        NetworkParams(),
        node_id="aggregator",
        images_seen=1,
        seed=0,
    )


def client(broker: MemoryBroker, cid: str, **kw: object) -> MemoryTransport:
    t = MemoryTransport(broker, TransportConfig(client_id=cid, **kw))
    t.connect()
    return t


def drain(channel: Channel) -> list:
    out = []
    while (r := channel.poll(0)) is not None or len(channel.transport.queue):
        if r is not None:
            out.append(r)
    return out


def test_publish_subscribe_retained_and_will() -> None:
    broker = MemoryBroker()
    will = Will(TOPICS.status("n1"), b"offline")
    node = client(broker, "n1", will=will)
    node.publish(TOPICS.round, b"r1", retain=True)
    watcher = client(broker, "agg")
    watcher.subscribe(f"{TOPICS.root}/#")
    assert watcher.get(0).payload == b"r1"  # retained, delivered on subscribe
    node.abort()
    assert watcher.get(0).payload == b"offline"
    node2 = client(broker, "n2", will=Will(TOPICS.status("n2"), b"offline"))
    node2.close()  # a clean close sends no will
    assert watcher.get(0) is None


def test_broker_restart_renews_subscriptions() -> None:
    broker = MemoryBroker()
    sub = client(broker, "s")
    sub.subscribe("a/#")
    broker.down()
    assert not sub.is_connected
    with pytest.raises(TransportError):
        client(broker, "late")
    broker.up()
    assert sub.is_connected and sub.connects == 2
    pub = client(broker, "p")
    pub.publish("a/b", b"x")
    assert sub.get(0).payload == b"x"


def test_large_messages_are_chunked_and_reassembled_even_when_retained_and_late() -> None:
    broker = MemoryBroker(max_payload_bytes=20_000)
    sender = Channel(client(broker, "agg"), max_packet_bytes=20_000)
    big = GlobalModel(1, model(40), ("n1",))  # ~125 kB
    packets = sender.send(TOPICS.global_model, big, retain=True)
    assert packets > 5
    late = Channel(client(broker, "n1"))
    late.transport.subscribe(TOPICS.global_all)
    (got,) = drain(late)
    assert got.topic == TOPICS.global_model and got.retained
    np.testing.assert_array_equal(got.message.model.weights, big.model.weights)
    # A smaller model replaces it: the stale chunks are cleared from the retained store.
    sender.send(TOPICS.global_model, GlobalModel(2, model(2), ("n1",)), retain=True)
    assert sorted(broker.retained) == [TOPICS.global_model]
    (got,) = drain(late)
    assert got.message.round_id == 2


def test_garbage_and_oversized_payloads_are_rejected_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = MemoryBroker()
    rx = Channel(client(broker, "agg"), limits=Limits(max_message_bytes=50_000))
    rx.transport.subscribe(f"{TOPICS.root}/#")
    tx = client(broker, "n1")
    tx.publish(TOPICS.update("n1"), b"\xc1garbage")
    tx.publish(TOPICS.update("n1"), bytes(60_000))
    tx.publish(f"{TOPICS.update('n1')}/chunk/0", b"not a chunk")
    tx.publish(TOPICS.status("n1"), protocol.encode(NodeStatus("n1", "online")))
    (ok,) = drain(rx)
    assert ok.message.state == "online"
    assert rx.rejected == 3
    assert "60000 bytes exceed the limit" in caplog.text
    assert "not valid msgpack" in caplog.text
