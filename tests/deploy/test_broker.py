"""The production and development Mosquitto configurations, run on free loopback ports
with certificates from deploy/pki/make-certs.sh and checked with paho-mqtt clients."""

from __future__ import annotations

import time

import pytest

from estdp.topics import Topics, chunk_topic

pytestmark = pytest.mark.broker

# The topics come from estdp.topics, so that the ACL is tested against the real layout.
TOPICS = Topics("lab")
UPDATE = TOPICS.root + "/nodes/{}/update"
GLOBAL = TOPICS.global_model
ROUND = TOPICS.round
assert UPDATE.format("node-1") == TOPICS.update("node-1")


@pytest.fixture
def central(production_broker):
    return production_broker("central")


@pytest.fixture
def as_identity(central, pki, mqtt_connect):
    """Connect to the mutual-TLS listener with the certificate of an identity."""

    def connect(identity, **kwargs):
        probe = mqtt_connect(central.port(8883), ca=pki.ca, cert=pki.cert(identity), **kwargs)
        assert probe.connected, f"{identity} refused: {probe.reason}"
        return probe

    return connect


def test_valid_node_certificate_is_accepted(central, pki, mqtt_connect):
    probe = mqtt_connect(central.port(8883), ca=pki.ca, cert=pki.cert("node-1"))
    assert probe.connected, probe.reason


def test_certificate_from_another_ca_is_refused(central, pki, mqtt_connect):
    probe = mqtt_connect(central.port(8883), ca=pki.ca, cert=pki.rogue_cert("node-1"))
    assert not probe.connected
    print(probe.reason)


def test_client_without_certificate_is_refused(central, pki, mqtt_connect):
    probe = mqtt_connect(central.port(8883), ca=pki.ca, username="node-1", password="x")
    assert not probe.connected


def test_revoked_certificate_is_refused(central, pki, mqtt_connect):
    probe = mqtt_connect(central.port(8883), ca=pki.ca, cert=pki.revoked_cert())
    assert not probe.connected
    print(probe.reason)


def test_plain_tcp_is_refused(central, pki, mqtt_connect):
    probe = mqtt_connect(central.port(8883), ca=pki.ca, tls=False, timeout=2)
    assert not probe.connected


def test_password_listener_accepts_right_and_refuses_wrong_password(central, pki, mqtt_connect):
    good = mqtt_connect(
        central.port(8884), ca=pki.ca, username="node-pw", password="correct horse battery staple"
    )
    assert good.connected, good.reason
    wrong = mqtt_connect(central.port(8884), ca=pki.ca, username="node-pw", password="wrong")
    assert not wrong.connected
    assert "Not authorized" in wrong.reason or "authori" in wrong.reason.lower()
    nobody = mqtt_connect(central.port(8884), ca=pki.ca)
    assert not nobody.connected


def test_node_publishes_only_under_its_own_id(as_identity):
    aggregator = as_identity("aggregator")
    aggregator.subscribe("estdp/#")
    node = as_identity("node-1")
    forbidden = [
        TOPICS.update("node-2"),
        chunk_topic(TOPICS.update("node-2"), 0),
        TOPICS.status("node-2"),
        TOPICS.metrics("node-2"),
        TOPICS.labels("node-2"),
        chunk_topic(TOPICS.labels("node-2"), 0),
        GLOBAL,
        chunk_topic(GLOBAL, 0),
        ROUND,
        Topics("other").update("node-2"),
        "elsewhere/topic",
    ]
    for topic in forbidden:
        node.publish(topic, b"forged")
    # Mosquitto handles one client's publishes in order: once the allowed ones arrive,
    # the forbidden ones, sent before them, would have arrived too.
    own = [
        TOPICS.status("node-1"),
        TOPICS.metrics("node-1"),
        TOPICS.labels("node-1"),
        chunk_topic(TOPICS.update("node-1"), 3),
    ]
    for topic in own:
        node.publish(topic, b"mine")
    node.publish(TOPICS.update("node-1"), b"mine")
    assert aggregator.expect(TOPICS.update("node-1")) == b"mine"
    time.sleep(0.2)
    received = aggregator.drain()
    assert not set(received) & set(forbidden), received
    assert set(own) <= set(received)


def test_mqtt5_node_is_told_its_forged_publish_is_not_authorized(as_identity):
    node = as_identity("node-1", mqtt5=True)
    assert node.publish(TOPICS.update("node-2"), b"forged") == "Not authorized"
    assert node.publish(TOPICS.update("node-1"), b"mine") in ("Success", "No matching subscribers")


def test_node_reads_only_round_and_global(as_identity):
    aggregator = as_identity("aggregator")
    aggregator.subscribe("estdp/#")
    node1 = as_identity("node-1")
    node1.subscribe("estdp/#")
    node2 = as_identity("node-2")
    node2.publish(UPDATE.format("node-2"), b"theirs")
    # Seen by the aggregator: the broker has routed it before the global below.
    assert aggregator.expect(UPDATE.format("node-2")) == b"theirs"
    aggregator.publish(ROUND, b"round 1", retain=True)
    aggregator.publish(chunk_topic(GLOBAL, 0), b"chunk 0")
    aggregator.publish(GLOBAL, b"model", retain=True)
    assert node1.expect(ROUND) == b"round 1"
    assert node1.expect(GLOBAL) == b"model"
    received = node1.drain()
    assert chunk_topic(GLOBAL, 0) in received
    assert UPDATE.format("node-2") not in received


def test_client_id_cannot_take_over_another_node(as_identity):
    node2 = as_identity("node-2", client_id="node-2")
    # node-1 asks for node-2's client id; the broker gives it its own (the certificate CN).
    node1 = as_identity("node-1", client_id="node-2")
    node1.publish(UPDATE.format("node-1"), b"x")
    node2.publish(UPDATE.format("node-2"), b"y")
    assert not node2.disconnected.is_set()


def test_model_sized_message_passes_and_oversized_packet_disconnects(central, as_identity):
    aggregator = as_identity("aggregator")
    aggregator.subscribe("estdp/lab/nodes/+/update")
    node = as_identity("node-1")
    model = bytes(range(256)) * (1_300_000 // 256)  # a 784x400 float32 model and more
    node.publish(UPDATE.format("node-1"), model)
    assert aggregator.expect(UPDATE.format("node-1"), timeout=10) == model
    node.client.publish(UPDATE.format("node-1"), b"\0" * (4 * 1024 * 1024 + 1), qos=1)
    assert node.disconnected.wait(10), "the broker kept a client that sent an oversized packet"
    with pytest.raises(AssertionError):
        aggregator.expect(UPDATE.format("node-1"), timeout=0.5)
    assert "node-1 disconnected due to oversize packet" in central.log.read_text()


def test_retained_global_survives_restart(production_broker, pki, mqtt_connect, tmp_path):
    data = tmp_path / "persist"
    broker = production_broker("first", data_dir=data)
    aggregator = mqtt_connect(broker.port(8883), ca=pki.ca, cert=pki.cert("aggregator"))
    aggregator.publish(GLOBAL, b"global model v1", retain=True)
    aggregator.close()
    broker.stop()
    assert any(data.iterdir()), "no persistence file written on shutdown"
    again = production_broker("second", data_dir=data)
    node = mqtt_connect(again.port(8883), ca=pki.ca, cert=pki.cert("node-1"))
    node.subscribe(GLOBAL)
    assert node.expect(GLOBAL) == b"global model v1"
