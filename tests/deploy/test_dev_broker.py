"""deploy/broker/mosquitto-dev.conf as shipped (on a free port): a short round of the real
`estdp aggregator` and two `estdp node` processes through it, over plain MQTT."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_a_round_through_the_development_broker(dev_broker, estdp_fleet, mnist_dir, tmp_path):
    from estdp.model import load_model

    url = f"mqtt://127.0.0.1:{dev_broker.port(1883)}"
    estdp_fleet.start(
        "aggregator", "aggregator", "--broker", url, "--fleet", "dev", "--nodes", 2,
        "--neurons", 6, "--target", 9, "--rounds", 1, "--deadline", 120,
        "--state", tmp_path / "agg", "--json",
    )  # fmt: skip
    states = []
    for i in range(2):
        node = f"dev-{i + 1}"
        states.append(tmp_path / node)
        estdp_fleet.start(
            node, "node", "--broker", url, "--fleet", "dev", "--node-id", node,
            "--data", mnist_dir, "--images", 100, "--shard", f"{i}/2", "--test-images", 20,
            "--backend", "numpy", "--seed", i + 1, "--state", states[-1], "--json",
        )  # fmt: skip
    assert estdp_fleet.wait("aggregator", 120) == 0, estdp_fleet.logs()
    estdp_fleet.wait_installed(states, 1, 30)
    merged = next(e for e in estdp_fleet.events("aggregator") if e["event"] == "global")
    assert merged["contains"] == ["dev-1", "dev-2"] and merged["neurons"] == 9
    expected = load_model(tmp_path / "agg/rounds/1/global.estdp")
    for state in states:
        np.testing.assert_array_equal(load_model(state / "global.estdp").weights, expected.weights)
    # It went through this broker (connection_messages is on in the shipped file).
    log = dev_broker.log.read_text()
    assert all(f"as {name}" in log for name in ("aggregator", "dev-1", "dev-2")), log
