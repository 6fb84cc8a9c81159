"""`estdp aggregator` and `estdp node` as processes over a real broker, with the real engine
on MNIST: a round of three tiny nodes, with the aggregator killed (SIGKILL) and restarted
in the middle of it; and a round in which a node process is killed while it trains."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from estdp.model import load_model
from estdp.transport import TransportConfig, mqtt_transport, parse_broker_url

pytestmark = [pytest.mark.broker, pytest.mark.slow]

pytest.importorskip("edge_node.inference", reason="the engine is not in this tree yet")
pytest.importorskip("aggregator.merge", reason="the merge is not in this tree yet")


def estdp(*args: str, log: Path) -> subprocess.Popen:
    handle = open(log, "wb")  # noqa: SIM115 - the child owns it until it exits
    return subprocess.Popen(
        [sys.executable, "-m", "estdp.cli", "--log-level", "INFO", *args],
        stdout=handle,
        stderr=subprocess.STDOUT,
    )


def wait_for(condition, timeout: float, what: str, logs: Path) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            tails = "\n".join(
                f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(logs.glob("*.log"))
            )
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.1)


def clear_retained(broker_url: str, fleet: str) -> None:
    """Leave nothing of this test retained on a shared broker."""
    t = mqtt_transport(
        TransportConfig(client_id=f"{fleet}-cleaner", **parse_broker_url(broker_url))
    )  # type: ignore[arg-type]
    t.connect(timeout=5)
    t.subscribe(f"estdp/{fleet}/#")
    time.sleep(0.3)
    for msg in iter(lambda: t.get(0.1), None):
        if msg.retain and msg.payload:
            t.publish(msg.topic, b"", retain=True)
    t.close()


def installed(state: Path) -> int:
    try:
        return json.loads((state / "node.json").read_text()).get("installed_round", 0)
    except (OSError, ValueError):
        return 0


def test_a_round_of_three_node_processes_survives_an_aggregator_kill(
    broker_url: str, mnist_dir: Path, tmp_path: Path
) -> None:
    fleet = f"cli{uuid.uuid4().hex[:8]}"
    common = ["--broker", broker_url, "--fleet", fleet, "--json"]
    agg_args = [
        "aggregator",
        *common,
        "--nodes",
        "3",
        "--target",
        "15",
        "--neurons",
        "10",
        "--metric",
        "mse",
        "--deadline",
        "120",
        "--state",
        str(tmp_path / "agg"),
    ]

    def node(i: int) -> subprocess.Popen:
        return estdp(
            "node",
            *common,
            "--node-id",
            f"n{i}",
            "--data",
            str(mnist_dir),
            "--images",
            "150",
            "--shard",
            f"{i}/3",
            "--test-images",
            "50",
            "--backend",
            "numpy",
            "--seed",
            str(i),
            "--state",
            str(tmp_path / f"n{i}"),
            log=tmp_path / f"n{i}.log",
        )

    procs: list[subprocess.Popen] = []
    try:
        agg = estdp(*agg_args, log=tmp_path / "agg1.log")
        procs += [agg, node(0), node(1)]
        updates = tmp_path / "agg" / "rounds" / "1" / "updates"
        wait_for(lambda: len(list(updates.glob("*.msg"))) == 2, 60, "two updates", tmp_path)
        agg.send_signal(signal.SIGKILL)  # a crash: nothing is flushed or said
        agg.wait(10)
        procs.append(node(2))  # its update arrives while no aggregator runs
        wait_for(
            lambda: '"update_sent"' in (tmp_path / "n2.log").read_text(),
            60,
            "n2's update",
            tmp_path,
        )
        agg2 = estdp(*agg_args, log=tmp_path / "agg2.log")
        procs.append(agg2)
        assert agg2.wait(60) == 0  # --rounds 1: it exits after publishing
        states = [tmp_path / f"n{i}" for i in range(3)]
        wait_for(
            lambda: all(installed(s) == 1 for s in states), 30, "every node to install", tmp_path
        )
        models = [load_model(s / "global.estdp") for s in states]
        for m in models[1:]:
            np.testing.assert_array_equal(m.weights, models[0].weights)
        assert models[0].n_neurons == 15
        events = [
            json.loads(line)
            for line in (tmp_path / "agg2.log").read_text().splitlines()
            if line.startswith("{")
        ]
        merged = next(e for e in events if e["event"] == "global")
        assert merged["contains"] == ["n0", "n1", "n2"]
        for p in procs[1:4]:
            p.send_signal(signal.SIGTERM)
        assert all(p.wait(15) == 0 for p in procs[1:4])  # a clean shutdown on SIGTERM
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        clear_retained(broker_url, fleet)


def test_a_node_process_killed_mid_round_is_marked_offline_and_the_deadline_merges_the_rest(
    broker_url: str, mnist_dir: Path, tmp_path: Path
) -> None:
    from estdp import protocol

    fleet = f"crash{uuid.uuid4().hex[:8]}"
    common = ["--broker", broker_url, "--fleet", fleet, "--json"]
    # Statuses as the broker delivers them, the last will included.
    watcher = mqtt_transport(
        TransportConfig(client_id=f"{fleet}-watcher", **parse_broker_url(broker_url))
    )  # type: ignore[arg-type]
    watcher.connect(timeout=5)
    watcher.subscribe(f"estdp/{fleet}/nodes/+/status")
    statuses: list[tuple[str, str, str]] = []

    def drain() -> None:
        for msg in iter(lambda: watcher.get(0), None):
            if msg.payload:
                s = protocol.decode_status(msg.payload)
                statuses.append((s.node_id, s.state, s.detail))

    def node(i: int, images: int) -> subprocess.Popen:
        return estdp(
            "node", *common, "--node-id", f"n{i}", "--data", str(mnist_dir),
            "--images", str(images), "--test-images", "50", "--backend", "numpy",
            "--seed", str(i), "--state", str(tmp_path / f"n{i}"), log=tmp_path / f"n{i}.log",
        )  # fmt: skip

    procs: list[subprocess.Popen] = []
    try:
        agg = estdp(
            "aggregator", *common, "--nodes", "3", "--min-nodes", "2", "--target", "15",
            "--neurons", "10", "--metric", "mse", "--deadline", "10",
            "--state", str(tmp_path / "agg"), log=tmp_path / "agg.log",
        )  # fmt: skip
        # n2 has 20,000 images to train on: a minute of work, so it is killed mid-training.
        procs += [agg, node(0, 150), node(1, 150), node(2, 20_000)]
        victim = procs[3]
        wait_for(
            lambda: '"event": "progress"' in (tmp_path / "n2.log").read_text(),
            60,
            "n2 to be training",
            tmp_path,
        )
        assert agg.poll() is None  # the round is still open
        victim.send_signal(signal.SIGKILL)  # a crash: no clean disconnect, no status
        victim.wait(10)

        def offline() -> bool:
            drain()
            return ("n2", "offline", "connection lost") in statuses

        wait_for(offline, 10, "the broker to publish n2's last will", tmp_path)
        assert ("n2", "training") in [(n, s) for n, s, _ in statuses]  # before the crash
        assert agg.wait(60) == 0  # the deadline merged the two updates; --rounds 1 ends it
        events = [
            json.loads(line)
            for line in (tmp_path / "agg.log").read_text().splitlines()
            if line.startswith("{")
        ]
        merged = next(e for e in events if e["event"] == "global")
        assert merged["contains"] == ["n0", "n1"]
        assert merged["reason"] == "deadline passed with 2 of 3"
        assert not any(e["event"] == "update" and e["node"] == "n2" for e in events)
        states = [tmp_path / "n0", tmp_path / "n1"]
        wait_for(lambda: all(installed(s) == 1 for s in states), 30, "n0, n1 to install", tmp_path)
        assert load_model(states[0] / "global.estdp").n_neurons == 15
        for p in procs[1:3]:
            p.send_signal(signal.SIGTERM)
        assert all(p.wait(15) == 0 for p in procs[1:3])
    finally:
        watcher.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        clear_retained(broker_url, fleet)
