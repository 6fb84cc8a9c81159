"""deploy/broker/bridge-site.conf: a site broker bridged to a central broker, both running
the production configuration with certificates from make-certs.sh."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.broker

BRIDGE_STATE = "$SYS/broker/connection/bridge-site-a/state"


@pytest.fixture
def site_and_central(production_broker, pki, render_mosquitto_config, mqtt_connect):
    from pathlib import Path

    central = production_broker("central")
    shipped = (Path(__file__).resolve().parents[2] / "deploy/broker/bridge-site.conf").read_text()
    crt, key = pki.cert("bridge-site-a")
    bridge = render_mosquitto_config(
        shipped,
        paths={
            "/etc/mosquitto/estdp/ca.crt": str(pki.ca),
            "/etc/mosquitto/estdp/bridge-site-a.crt": str(crt),
            "/etc/mosquitto/estdp/bridge-site-a.key": str(key),
        },
        # Certificate name checks stay on: the server certificate names 127.0.0.1.
        addresses={"central.example.org:8883": f"127.0.0.1:{central.port(8883)}"},
        main=False,
    )
    # The operator watches the bridge come up on the central broker.
    operator = mqtt_connect(central.port(8883), ca=pki.ca, cert=pki.cert("operator"))
    assert operator.connected, operator.reason
    operator.subscribe(BRIDGE_STATE)
    site = production_broker("site-a", snippets={"bridge-central.conf": bridge})
    assert operator.expect(BRIDGE_STATE, timeout=15) == b"1", "the bridge did not connect"
    return site, central


def test_bridge_carries_node_updates_to_central(site_and_central, pki, mqtt_connect):
    site, central = site_and_central
    aggregator = mqtt_connect(central.port(8883), ca=pki.ca, cert=pki.cert("aggregator"))
    aggregator.subscribe("estdp/+/nodes/#")
    node = mqtt_connect(site.port(8883), ca=pki.ca, cert=pki.cert("node-1"))
    assert node.connected, node.reason
    model = b"\x01\x02" * 400_000
    node.publish("estdp/lab/nodes/node-1/update", model)
    node.publish("estdp/lab/nodes/node-1/status", b"training")
    assert aggregator.expect("estdp/lab/nodes/node-1/update", timeout=10) == model
    assert aggregator.expect("estdp/lab/nodes/node-1/status") == b"training"


def test_bridge_carries_round_and_global_to_site(site_and_central, pki, mqtt_connect):
    site, central = site_and_central
    node = mqtt_connect(site.port(8883), ca=pki.ca, cert=pki.cert("node-2"))
    node.subscribe("estdp/lab/round")
    node.subscribe("estdp/lab/global")
    aggregator = mqtt_connect(central.port(8883), ca=pki.ca, cert=pki.cert("aggregator"))
    aggregator.publish("estdp/lab/round", b"round 7", retain=True)
    aggregator.publish("estdp/lab/global", b"merged model", retain=True)
    assert node.expect("estdp/lab/round", timeout=10) == b"round 7"
    assert node.expect("estdp/lab/global", timeout=10) == b"merged model"
    # Retained on the site broker too: a node that joins later still gets the round.
    late = mqtt_connect(site.port(8883), ca=pki.ca, cert=pki.cert("node-1"))
    late.subscribe("estdp/lab/round")
    assert late.expect("estdp/lab/round") == b"round 7"


def test_bridge_does_not_carry_other_topics(site_and_central, pki, mqtt_connect):
    site, central = site_and_central
    site_aggregator = mqtt_connect(site.port(8883), ca=pki.ca, cert=pki.cert("aggregator"))
    central_operator = mqtt_connect(central.port(8883), ca=pki.ca, cert=pki.cert("operator"))
    central_operator.subscribe("estdp/#")
    # A site-local global model (e.g. from a site aggregator) stays at the site...
    site_aggregator.publish("estdp/lab/global", b"site model")
    # ...while node traffic, sent after it, crosses.
    node = mqtt_connect(site.port(8883), ca=pki.ca, cert=pki.cert("node-1"))
    node.publish("estdp/lab/nodes/node-1/metrics", b"{}")
    assert central_operator.expect("estdp/lab/nodes/node-1/metrics", timeout=10) == b"{}"
    assert "estdp/lab/global" not in central_operator.drain()
