"""The paho-mqtt transport against a real broker (Mosquitto, or the embedded amqtt)."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from estdp.broker import EmbeddedBroker, free_port, mosquitto_binary
from estdp.errors import TransportError
from estdp.model import new_model
from estdp.params import NetworkParams
from estdp.protocol import GlobalModel
from estdp.topics import Topics
from estdp.transport import TransportConfig, Will, mqtt_transport, parse_broker_url
from estdp.transport.channel import Channel
from estdp.transport.mqtt import MqttTransport

pytestmark = pytest.mark.broker


def connect(url: str, cid: str, **kw: object) -> MqttTransport:
    fields = parse_broker_url(url)
    t = mqtt_transport(TransportConfig(client_id=cid, reconnect_max_s=0.5, **fields, **kw))  # type: ignore[arg-type]
    t.connect(timeout=10)
    return t  # type: ignore[return-value]


def expect(t: MqttTransport, timeout: float = 5.0):
    m = t.get(timeout)
    assert m is not None, "no message arrived"
    return m


@pytest.fixture
def fleet() -> Topics:
    return Topics(f"t{uuid.uuid4().hex[:10]}")  # own topics on a shared broker


def test_publish_subscribe_retained_and_puback(broker_url: str, fleet: Topics) -> None:
    pub = connect(broker_url, f"p-{fleet.fleet}")
    sub = connect(broker_url, f"s-{fleet.fleet}")
    try:
        pub.publish(fleet.round, b"round-1", retain=True, wait=True)
        sub.subscribe(f"{fleet.root}/#")
        m = expect(sub)
        assert (m.topic, m.payload, m.retain) == (fleet.round, b"round-1", True)
        pub.publish(fleet.update("n1"), b"\x00" * 100_000, qos=1, wait=True)
        m = expect(sub)
        assert (m.topic, len(m.payload), m.retain) == (fleet.update("n1"), 100_000, False)
        pub.publish(fleet.round, b"", retain=True, wait=True)  # clear the retained message
    finally:
        pub.close()
        sub.close()


def test_will_is_published_when_a_client_vanishes(broker_url: str, fleet: Topics) -> None:
    watcher = connect(broker_url, f"w-{fleet.fleet}")
    watcher.subscribe(fleet.status("n1"))
    node = connect(
        broker_url, f"n-{fleet.fleet}", will=Will(fleet.status("n1"), b"offline", retain=False)
    )
    try:
        node.abort()
        assert expect(watcher, 10).payload == b"offline"
    finally:
        watcher.close()


def test_unreachable_broker_fails_with_a_transport_error() -> None:
    t = mqtt_transport(
        TransportConfig(port=free_port(), client_id="x", reconnect_min_s=0.05, reconnect_max_s=0.1)
    )
    started = time.monotonic()
    with pytest.raises(TransportError, match="cannot connect"):
        t.connect(timeout=0.5)
    assert time.monotonic() - started < 3
    with pytest.raises(TransportError):
        t.publish("a", b"x")


def test_reconnect_after_a_broker_restart_renews_subscriptions_and_sends_queued_messages(
    private_broker: EmbeddedBroker, fleet: Topics
) -> None:
    sub = connect(private_broker.url, "sub")
    pub = connect(private_broker.url, "pub")
    try:
        sub.subscribe(f"{fleet.root}/#")
        private_broker.stop()
        assert not sub.wait_connected(0) or sub.get(0.5) is None
        # Retained, as updates are: the publisher may be back before the subscriber has
        # renewed its subscription, and the broker then delivers it on subscription.
        pub.publish(fleet.update("n1"), b"sent while the broker was down", qos=1, retain=True)
        private_broker.start()
        assert sub.wait_connected(10) and pub.wait_connected(10)
        assert sub.connects == 2
        assert expect(sub, 10).payload == b"sent while the broker was down"
        pub.publish(fleet.update("n2"), b"after", wait=True)
        assert expect(sub).payload == b"after"
    finally:
        sub.close()
        pub.close()


@pytest.mark.skipif(mosquitto_binary() is None, reason="needs the mosquitto binary")
def test_a_large_model_crosses_a_packet_limited_broker_in_chunks(fleet: Topics) -> None:
    with EmbeddedBroker("mosquitto", max_packet_bytes=1_000_000) as broker:
        n = 6400  # 784 x 6400 float32: 20 MB, twenty times the 1 MB packet limit
        rng = np.random.default_rng(0)
        big = new_model(
            rng.random((784, n), dtype=np.float32),
            np.zeros(n, np.float32),
            NetworkParams(),
            node_id="aggregator",
            images_seen=1,
            seed=0,
        )
        tx = Channel(connect(broker.url, "agg"), max_packet_bytes=1_000_000)
        whole = connect(broker.url, "naive")
        rx = Channel(connect(broker.url, "n1"))
        try:
            rx.transport.subscribe(fleet.global_all)
            assert tx.send(fleet.global_model, GlobalModel(1, big, ("n1",)), retain=True) == 21
            deadline = time.monotonic() + 10
            got = None
            while got is None and time.monotonic() < deadline:
                got = rx.poll(0.2)
            assert got is not None and got.message.round_id == 1
            np.testing.assert_array_equal(got.message.model.weights, big.weights)
            # In one packet the bytes would get the client disconnected (and re-sent after
            # every reconnect): the transport knows the announced limit and refuses.
            assert whole.max_packet_bytes == 1_000_000
            with pytest.raises(TransportError, match="packet limit"):
                whole.publish(fleet.update("x"), bytes(1_500_000), qos=1)
            assert whole.is_connected
        finally:
            for t in (tx.transport, whole, rx.transport):
                t.close()
