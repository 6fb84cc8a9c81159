"""deploy/broker/bridge-site.conf: a site broker bridged to a central broker, both running
the production configuration and ACL with certificates from make-certs.sh.

The bridge is the WAN link of hierarchical aggregation: a real round runs across it (two
boards and a site aggregator on the site broker, the root aggregator on the central one),
and only the site aggregator's upstream topics go up, only the root's round and global
model come down.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.broker

BRIDGE_STATE = "$SYS/broker/connection/bridge-site-a/state"
SHIPPED = Path(__file__).resolve().parents[2] / "deploy/broker/bridge-site.conf"


@pytest.fixture
def site_and_central(production_broker, pki, render_mosquitto_config, mqtt_connect):
    central = production_broker("central")
    crt, key = pki.cert("bridge-site-a")
    bridge = render_mosquitto_config(
        SHIPPED.read_text(),
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
    # The client id is the certificate's CN: a second operator would take this one's place.
    operator.close()
    return site, central


@pytest.mark.slow
def test_a_hierarchical_round_crosses_the_bridge(
    site_and_central, pki, mqtt_connect, estdp_fleet, mnist_dir, tmp_path
):
    from estdp import protocol
    from estdp.model import load_model

    site, central = site_and_central
    # Everything that reaches the central broker, as the operator sees it.
    watcher = mqtt_connect(central.port(8883), ca=pki.ca, cert=pki.cert("operator"))
    watcher.subscribe("estdp/#")
    central_url = f"mqtts://127.0.0.1:{central.port(8883)}"
    site_url = f"mqtts://127.0.0.1:{site.port(8883)}"
    agg_crt, agg_key = pki.cert("aggregator")
    up_crt, up_key = pki.cert("site-a")
    tls = ["--ca", pki.ca]
    estdp_fleet.start(
        "root", "aggregator", "--broker", central_url, *tls, "--cert", agg_crt, "--key", agg_key,
        "--fleet", "lab", "--nodes", 1, "--neurons", 8, "--target", 6, "--rounds", 1,
        "--deadline", 120, "--state", tmp_path / "root", "--json",
    )  # fmt: skip
    # The site aggregator: "aggregator" for its own fleet, "site-a" upstream, both on the
    # site broker (the default --upstream-broker); the bridge carries the upstream part.
    estdp_fleet.start(
        "site", "aggregator", "--broker", site_url, *tls, "--cert", agg_crt, "--key", agg_key,
        "--fleet", "site-a", "--upstream-fleet", "lab",
        "--upstream-cert", up_crt, "--upstream-key", up_key,
        "--nodes", 2, "--neurons", 5, "--target", 8, "--rounds", 1, "--deadline", 100,
        "--state", tmp_path / "site", "--json",
    )  # fmt: skip
    for i, node in enumerate(("node-1", "node-2")):
        crt, key = pki.cert(node)
        estdp_fleet.start(
            node, "node", "--broker", site_url, *tls, "--cert", crt, "--key", key,
            "--fleet", "site-a", "--node-id", node, "--data", mnist_dir, "--images", 100,
            "--shard", f"{i}/2", "--test-images", 20, "--backend", "numpy", "--seed", i + 1,
            "--state", tmp_path / node, "--json",
        )  # fmt: skip
    assert estdp_fleet.wait("root", 150) == 0, estdp_fleet.logs()
    assert estdp_fleet.wait("site", 30) == 0, estdp_fleet.logs()
    states = [tmp_path / "node-1", tmp_path / "node-2"]
    estdp_fleet.wait_installed(states, 1, 30)

    # The root merged one site model, which the site made of its two boards.
    root_global = next(e for e in estdp_fleet.events("root") if e["event"] == "global")
    assert root_global["contains"] == ["site-a"] and root_global["neurons"] == 6
    forwarded = next(e for e in estdp_fleet.events("site") if e["event"] == "forwarded")
    assert forwarded["contains"] == ["node-1", "node-2"] and forwarded["neurons"] == 8
    stored = protocol.decode_update((tmp_path / "root/rounds/1/updates/site-a.msg").read_bytes())
    assert stored.node_id == "site-a" and stored.model.n_neurons == 8
    # The boards hold the root's model, which came down over the bridge.
    expected = load_model(tmp_path / "root/rounds/1/global.estdp")
    for state in states:
        np.testing.assert_array_equal(load_model(state / "global.estdp").weights, expected.weights)
    # Up the WAN went the site aggregator's topics only: nothing of the site's own fleet.
    crossed = set(watcher.drain())
    assert "estdp/lab/nodes/site-a/update" in crossed
    assert "estdp/lab/nodes/site-a/status" in crossed
    assert not [t for t in crossed if t.startswith("estdp/site-a/")], crossed


def test_the_bridge_carries_round_and_global_down_and_they_stay_retained(
    site_and_central, pki, mqtt_connect
):
    site, central = site_and_central
    upstream = mqtt_connect(site.port(8883), ca=pki.ca, cert=pki.cert("site-a"))
    upstream.subscribe("estdp/lab/round")
    upstream.subscribe("estdp/lab/global")
    aggregator = mqtt_connect(central.port(8883), ca=pki.ca, cert=pki.cert("aggregator"))
    aggregator.publish("estdp/lab/round", b"round 7", retain=True)
    aggregator.publish("estdp/lab/global", b"merged model", retain=True)
    assert upstream.expect("estdp/lab/round", timeout=10) == b"round 7"
    assert upstream.expect("estdp/lab/global", timeout=10) == b"merged model"
    # Retained on the site broker too: a site aggregator that starts later still gets it.
    late = mqtt_connect(site.port(8883), ca=pki.ca, cert=pki.cert("node-1"))
    late.subscribe("estdp/lab/round")
    assert late.expect("estdp/lab/round") == b"round 7"


def test_the_bridge_keeps_the_sites_own_traffic_at_the_site(site_and_central, pki, mqtt_connect):
    site, central = site_and_central
    central_operator = mqtt_connect(central.port(8883), ca=pki.ca, cert=pki.cert("operator"))
    central_operator.subscribe("estdp/#")
    # The site's boards and its aggregator, in the site's fleet...
    node = mqtt_connect(site.port(8883), ca=pki.ca, cert=pki.cert("node-1"))
    node.publish("estdp/site-a/nodes/node-1/update", b"\x01\x02" * 400_000)
    site_aggregator = mqtt_connect(site.port(8883), ca=pki.ca, cert=pki.cert("aggregator"))
    site_aggregator.publish("estdp/site-a/global", b"site model")
    # ...and a board writing into the root fleet: its own id there, but not the site's.
    node.publish("estdp/lab/nodes/node-1/update", b"not a site model")
    # Sent last, the site aggregator's upstream status crosses: everything before it had
    # its chance to cross too.
    upstream = mqtt_connect(site.port(8883), ca=pki.ca, cert=pki.cert("site-a"))
    upstream.publish("estdp/lab/nodes/site-a/status", b"online")
    assert central_operator.expect("estdp/lab/nodes/site-a/status", timeout=10) == b"online"
    assert central_operator.drain() == ["estdp/lab/nodes/site-a/status"]


def test_the_central_acl_lets_a_bridge_write_only_its_sites_topics(
    production_broker, pki, mqtt_connect
):
    # A broker without the bridge running: the probe borrows the bridge's identity.
    central = production_broker("central-acl")
    watcher = mqtt_connect(central.port(8883), ca=pki.ca, cert=pki.cert("operator"))
    watcher.subscribe("estdp/#")
    bridge = mqtt_connect(central.port(8883), ca=pki.ca, cert=pki.cert("bridge-site-a"))
    assert bridge.connected, bridge.reason
    bridge.publish("estdp/lab/nodes/site-b/update", b"another site's model")
    bridge.publish("estdp/lab/global", b"a forged global model")
    bridge.publish("estdp/lab/nodes/site-a/update", b"site model")
    assert watcher.expect("estdp/lab/nodes/site-a/update") == b"site model"
    assert watcher.drain() == ["estdp/lab/nodes/site-a/update"]
