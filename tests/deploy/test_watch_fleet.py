"""deploy/tools/watch-fleet.sh: the operator's view of a fleet through the production
broker, decoded with estdp.protocol."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from estdp.chunking import encode_chunk, split
from estdp.protocol import NodeStatus, RoundAnnouncement, encode

pytestmark = pytest.mark.broker

WATCH = Path(__file__).resolve().parents[2] / "deploy" / "tools" / "watch-fleet.sh"


def test_watch_prints_decoded_messages_and_protocol_errors(production_broker, pki, mqtt_connect):
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub is not installed")
    broker = production_broker()
    aggregator = mqtt_connect(broker.port(8883), ca=pki.ca, cert=pki.cert("aggregator"))
    node = mqtt_connect(broker.port(8883), ca=pki.ca, cert=pki.cert("node-1"))
    announcement = RoundAnnouncement(
        round_id=4, neurons_per_node=100, target_size=300, metric="mse", deadline_unix=2e9
    )
    # Retained, so that the watcher receives them whenever it subscribes.
    aggregator.publish("estdp/lab/round", encode(announcement), retain=True)
    node.publish(
        "estdp/lab/nodes/node-1/status", encode(NodeStatus("node-1", "training", 4)), retain=True
    )
    node.publish("estdp/lab/nodes/node-1/metrics", b"\x93not a message", retain=True)
    (chunk,) = split(encode(announcement), 10_000)
    node.publish("estdp/lab/nodes/node-1/update/chunk/0", encode_chunk(chunk), retain=True)
    crt, key = pki.cert("operator")
    result = subprocess.run(
        [
            "bash",
            str(WATCH),
            "--port",
            str(broker.port(8883)),
            "--ca",
            str(pki.ca),
            "--cert",
            str(crt),
        ]
        + ["--key", str(key), "--fleet", "lab", "--count", "4", "--timeout", "10"]
        + ["--python", sys.executable],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    records = {r["topic"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert records["estdp/lab/round"]["kind"] == "RoundAnnouncement"
    assert records["estdp/lab/round"]["target_size"] == 300
    status = records["estdp/lab/nodes/node-1/status"]
    assert (status["kind"], status["state"], status["round_id"]) == ("NodeStatus", "training", 4)
    assert "error" in records["estdp/lab/nodes/node-1/metrics"]
    chunk_record = records["estdp/lab/nodes/node-1/update/chunk/0"]
    assert (chunk_record["kind"], chunk_record["index"], chunk_record["count"]) == ("chunk", 0, 1)


def test_watch_needs_credentials(tmp_path):
    result = subprocess.run(
        ["bash", str(WATCH), "--ca", str(tmp_path / "ca.crt"), "--python", sys.executable],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "--cert" in result.stderr or "mosquitto_sub" in result.stderr
