"""A short round of the real daemons through the production broker configuration: the
aggregator and one node on the certificate listener, one node on the password listener,
tiny models on real MNIST."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.broker, pytest.mark.slow]

pytest.importorskip("edge_node.daemon", reason="the node daemon is not in this tree yet")
pytest.importorskip("aggregator.daemon", reason="the aggregator daemon is not in this tree yet")


def estdp(*args: object, log: Path) -> subprocess.Popen:
    handle = open(log, "wb")  # noqa: SIM115 - the child owns it until it exits
    return subprocess.Popen(
        [sys.executable, "-m", "estdp.cli", "--log-level", "INFO", *map(str, args)],
        stdout=handle,
        stderr=subprocess.STDOUT,
    )


def installed_round(state: Path) -> int:
    try:
        return json.loads((state / "node.json").read_text()).get("installed_round", 0)
    except (OSError, ValueError):
        return 0


def logs(tmp_path: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.rglob("*.log"))
    )


def test_a_round_through_the_production_broker(production_broker, pki, mnist_dir, tmp_path):
    from estdp.model import load_model

    broker = production_broker()
    mtls, password = broker.port(8883), broker.port(8884)
    secret = tmp_path / "node-pw.password"
    secret.write_text("correct horse battery staple\n")
    node_common = ["--fleet", "lab", "--ca", pki.ca, "--data", mnist_dir, "--images", 100]
    node_common += ["--test-images", 50, "--backend", "numpy", "--json"]
    crt, key = pki.cert("node-1")
    agg_crt, agg_key = pki.cert("aggregator")
    procs = []
    try:
        aggregator = estdp(
            "aggregator", "--broker", f"mqtts://127.0.0.1:{mtls}", "--fleet", "lab",
            "--ca", pki.ca, "--cert", agg_crt, "--key", agg_key,
            "--nodes", 2, "--neurons", 10, "--target", 15, "--deadline", 120,
            "--rounds", 1, "--state", tmp_path / "agg", "--json",
            log=tmp_path / "aggregator.log",
        )  # fmt: skip
        procs.append(aggregator)
        node1 = estdp(
            "node", "--broker", f"mqtts://127.0.0.1:{mtls}", "--node-id", "node-1",
            "--cert", crt, "--key", key, "--shard", "0/2", "--seed", 1,
            "--state", tmp_path / "node-1", *node_common,
            log=tmp_path / "node-1.log",
        )  # fmt: skip
        procs.append(node1)
        # The second node logs in with a password on the other listener.
        node_pw = estdp(
            "node", "--broker", f"mqtts://127.0.0.1:{password}", "--node-id", "node-pw",
            "--username", "node-pw", "--password-file", secret, "--shard", "1/2",
            "--seed", 2, "--state", tmp_path / "node-pw", *node_common,
            log=tmp_path / "node-pw.log",
        )  # fmt: skip
        procs.append(node_pw)
        try:
            assert aggregator.wait(150) == 0, logs(tmp_path)  # --rounds 1: exits when published
        except subprocess.TimeoutExpired:
            pytest.fail(f"the round did not complete\n{logs(tmp_path)}")
        states = [tmp_path / "node-1", tmp_path / "node-pw"]
        deadline = time.monotonic() + 30
        while not all(installed_round(s) == 1 for s in states):
            assert time.monotonic() < deadline, f"nodes did not install\n{logs(tmp_path)}"
            time.sleep(0.2)
        models = [load_model(s / "global.estdp") for s in states]
        np.testing.assert_array_equal(models[0].weights, models[1].weights)
        assert models[0].n_neurons == 15
        events = [
            json.loads(line)
            for line in (tmp_path / "aggregator.log").read_text().splitlines()
            if line.startswith("{")
        ]
        merged = next(e for e in events if e["event"] == "global")
        assert sorted(merged["contains"]) == ["node-1", "node-pw"]
        for proc in procs[1:]:
            proc.send_signal(signal.SIGTERM)
        assert all(p.wait(15) == 0 for p in procs[1:])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
