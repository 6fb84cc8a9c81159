"""Whole simulations over a real broker: tiny models, a few hundred images.

Every node, the aggregator and the broker are real processes; these tests check the
report and that its accuracies equal ``estdp eval`` on the saved models, and that a
round completes when a node is killed mid-round.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from estdp import cli
from estdp.errors import ConfigError
from estdp.model import load_model
from estdp.protocol import LABELS_FEDERATED, LABELS_PROVISIONAL, global_labels
from firmware_sim.faults import parse_fault
from firmware_sim.fleet import Fleet, FleetConfig, default_deadline, default_label_deadline
from firmware_sim.partitions import parse_spec
from firmware_sim.profiles import DEVICES, NETWORKS, parse_device
from firmware_sim.simulation import load_data

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _cli_json(argv: list[str]) -> dict:
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(argv) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_simulate_writes_the_report_and_its_accuracies_equal_estdp_eval(mnist_dir, tmp_path):
    out = tmp_path / "report"
    summary = _cli_json(
        [
            "simulate",
            "--nodes", "2",
            "--neurons", "8",
            "--target", "10",
            "--images", "240",
            "--test", "150",
            "--curve-points", "2",
            "--data", str(mnist_dir),
            "--backend", "numpy",
            "--fleet", f"t{time.time_ns() % 10**9}",
            "--devices", "host,orin-nano:0.5",
            "--network", "lan,wifi",
            "--out", str(out),
            "--quiet",
            "--json",
        ]
    )  # fmt: skip
    for name in (
        "results.json",
        "report.md",
        "compression.png",
        "merge_time.png",
        "receptive_fields.png",
        "per_node.png",
    ):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    kinds = [m["kind"] for m in results["models"]]
    assert kinds == ["sub-model", "sub-model", "merged", "compressed", "baseline"]
    neurons = {m["kind"]: m["neurons"] for m in results["models"]}
    assert neurons == {"sub-model": 8, "merged": 16, "compressed": 10, "baseline": 10}
    assert set(results["compression_curve"]["metrics"]) == {
        "mse",
        "manhattan",
        "cosine",
        "correlation",
    }
    assert results["compression_curve"]["removed"] == [0, 3, 6]
    assert set(results["merge_times"]) == {"mse", "manhattan", "cosine", "correlation"}
    assert results["rounds"][0]["contains"] == ["node-1", "node-2"]
    # What is scored as "compressed" is the round's final global model: the same weights
    # as the provisional one, with labels pooled from both boards' 240 images.
    assert results["labels"] == summary["labels"] == "federated"
    assert results["rounds"][0]["labels"] == "federated"
    assert results["rounds"][0]["label_images"] == 240
    # The thresholds were re-measured first (--calibrate-images, on by default): each
    # board's pass took all of its 120 images (fewer than asked for).
    assert results["rounds"][0]["calibration_images"] == 240
    assert any("re-measured its thresholds on 240 images" in n for n in results["notes"])
    compressed = next(m for m in results["models"] if m["kind"] == "compressed")
    final = load_model(compressed["path"])
    provisional = load_model(out / "models" / "round1" / "global-provisional.estdp")
    assert Path(compressed["path"]).name == "global.estdp"
    assert global_labels(final) == LABELS_FEDERATED
    assert global_labels(provisional) == LABELS_PROVISIONAL
    np.testing.assert_array_equal(final.weights, provisional.weights)
    assert final.provenance.notes["calibrated"] == "240/2"
    assert any("federated" in note for note in results["notes"])
    assert results["speedup"] > 0
    # What the command printed is what `estdp eval` says about each saved model.
    printed = {m["model"]: m for m in summary["models"]}
    for name in ("node-1", "compressed", "baseline"):
        evaluated = _cli_json(
            [
                "eval",
                printed[name]["path"],
                "--test",
                "150",
                "--data",
                str(mnist_dir),
                "--backend",
                "numpy",
                "--json",
            ]
        )
        assert evaluated["accuracy_all_activity"] == printed[name]["accuracy"], name
    assert summary["accuracy_compressed"] == printed["compressed"]["accuracy"]
    report = (out / "report.md").read_text()
    assert "| compressed | 10 |" in report


def test_a_killed_node_does_not_stop_the_round(mnist_dir, tmp_path, broker_url):
    nodes = 3
    config = FleetConfig(
        run_dir=tmp_path,
        nodes=nodes,
        neurons=6,
        target=8,
        images=300,
        partition=parse_spec("dirichlet:1.0"),
        devices=(DEVICES["host"], parse_device("custom:0.01:2000"), DEVICES["host"]),
        networks=(NETWORKS["lan"],) * nodes,
        deadline_s=12.0,
        min_nodes=2,
        backend="numpy",
        broker_url=broker_url,
        fleet=f"k{time.time_ns() % 10**9}",
        data_dir=str(mnist_dir),
        timeout_s=90.0,
        node_test_images=50,
    )
    # node-2 is a board 100x slower than the host: it is killed while it trains.
    config = dataclasses.replace(
        config, faults=(parse_fault("kill-node:2@r1:10%", config.node_ids()),)
    )
    pool_x, pool_y, test_x, test_y = load_data(config, 50)
    fleet = Fleet(config)
    fleet.prepare_data(pool_x, pool_y, (test_x, test_y))
    outcome = fleet.run()
    assert outcome.faults_fired and "kill-node:2" in outcome.faults_fired[0]
    assert outcome.state.nodes["node-2"].status == "killed"
    assert outcome.round_ids == [1]
    assert outcome.state.rounds[1].nodes_in_global == ["node-1", "node-3"]
    assert sorted(outcome.updates[1]) == ["node-1", "node-3"]
    assert Path(outcome.globals_[1]).exists()
    assert sum(outcome.shard_sizes.values()) == 300


def test_the_labels_mode_and_label_deadline_reach_the_aggregator():
    config = FleetConfig(
        run_dir=Path("x"), devices=(DEVICES["host"],) * 5, labels="kept", deadline_s=600.0
    )
    fleet = Fleet(config)
    fleet._label_deadline_s = default_label_deadline(config, 6000)
    argv = fleet.aggregator_argv()
    assert argv[argv.index("--labels") + 1] == "kept"
    assert float(argv[argv.index("--label-deadline") + 1]) >= 120
    with pytest.raises(ConfigError, match="--labels"):
        FleetConfig(run_dir=Path("x"), labels="guessed")
    slow = FleetConfig(run_dir=Path("x"), devices=(DEVICES["nano"],) * 5)
    assert default_label_deadline(slow, 6000) > default_label_deadline(config, 6000)


def test_default_deadline_grows_with_the_slowest_board():
    base = FleetConfig(run_dir=Path("x"), devices=(DEVICES["host"],) * 5)
    slow = FleetConfig(run_dir=Path("x"), devices=(DEVICES["host"],) * 4 + (DEVICES["nano"],))
    assert default_deadline(slow, 6000) > 10 * default_deadline(base, 6000) / 2
    assert default_deadline(base, 6000) >= 30


def test_the_calibration_reaches_the_root_aggregator_and_lengthens_the_label_deadline():
    from aggregator.calibration import DEFAULT_IMAGES

    host = (DEVICES["host"],) * 4
    config = FleetConfig(run_dir=Path("x"), nodes=4, devices=host, deadline_s=600.0)
    fleet = Fleet(config)
    fleet._label_deadline_s = default_label_deadline(config, 6000)
    argv = fleet.aggregator_argv()
    assert argv[argv.index("--calibrate-images") + 1] == str(DEFAULT_IMAGES)
    off = FleetConfig(
        run_dir=Path("x"), nodes=4, devices=host, calibrate_images=0, deadline_s=600.0
    )
    fleet = Fleet(off)
    fleet._label_deadline_s = default_label_deadline(off, 6000)
    argv = fleet.aggregator_argv()
    assert argv[argv.index("--calibrate-images") + 1] == "0"
    # The pass costs like training: the boards get longer to answer (slow boards, to get
    # above the 120 s floor).
    nano = (DEVICES["nano"],) * 4
    slow_on = FleetConfig(run_dir=Path("x"), nodes=4, devices=nano, calibrate_images=3000)
    slow_off = FleetConfig(run_dir=Path("x"), nodes=4, devices=nano, calibrate_images=0)
    assert default_label_deadline(slow_on, 6000) > default_label_deadline(slow_off, 6000)
    # The sites relay their boards' calibrations: a hierarchy's root asks for them too.
    sites = FleetConfig(
        run_dir=Path("x"), nodes=4, devices=host, sites=2, deadline_s=600.0, calibrate_images=700
    )
    fleet = Fleet(sites)
    fleet._label_deadline_s = default_label_deadline(sites, 6000)
    fleet._deadline_s = 600.0
    argv = fleet.aggregator_argv()
    assert argv[argv.index("--calibrate-images") + 1] == "700"
    with pytest.raises(ConfigError, match="--calibrate-images"):
        FleetConfig(run_dir=Path("x"), calibrate_images=-1)
