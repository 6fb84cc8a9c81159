"""Hierarchical aggregation in the simulator: ``estdp simulate --sites 2`` over a real
broker, with tiny models on a few hundred images.

Two site aggregators (``estdp aggregator --upstream-fleet``), each merging its own boards
in its own fleet, forward their site models to a root aggregator with K = 2; the root's
global model must contain both site models and come back down to every board.
"""

from __future__ import annotations

import io
import json
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from estdp import cli, protocol
from estdp.model import load_model

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SITES = {"site-1": ["node-1", "node-2"], "site-2": ["node-3", "node-4"]}


def test_two_sites_forward_to_the_root_and_every_board_installs_its_model(
    mnist_dir: Path, tmp_path: Path, broker_url: str
) -> None:
    out = tmp_path / "report"
    stdout = io.StringIO()
    t0 = time.monotonic()
    with redirect_stdout(stdout):
        code = cli.main(
            [
                "simulate",
                "--sites", "2",
                "--nodes", "4",
                "--neurons", "6",
                "--target", "8",
                "--images", "240",
                "--test", "100",
                "--node-test", "20",
                "--no-curve",
                "--baseline-neurons", "0",
                "--data", str(mnist_dir),
                "--backend", "numpy",
                "--broker", broker_url,
                "--fleet", f"h{time.time_ns() % 10**9}",
                "--out", str(out),
                "--quiet",
                "--json",
            ]
        )  # fmt: skip
    seconds = time.monotonic() - t0
    assert code == 0, stdout.getvalue()
    results = json.loads((out / "results.json").read_text())
    assert results["sites"] == SITES
    kinds = [m["kind"] for m in results["models"]]
    assert kinds == ["sub-model"] * 4 + ["site-model"] * 2 + ["merged", "compressed"]

    # The root merged the two site models (each site a node of the root fleet).
    root_state = tmp_path / "report" / "aggregator"
    assert json.loads((root_state / "state.json").read_text())["contains"] == list(SITES)
    root_global = load_model(out / "models" / "round1" / "global.estdp")
    assert root_global.n_neurons == 8
    for site, boards in SITES.items():
        # What the root received from the site is the site aggregator's merge of its own
        # boards, and nothing of the other site's.
        forwarded = protocol.decode_update(
            (root_state / "rounds/1/updates" / f"{site}.msg").read_bytes()
        )
        site_model = load_model(out / f"aggregator-{site}" / "rounds/1/site.estdp")
        assert forwarded.node_id == site
        np.testing.assert_array_equal(forwarded.model.weights, site_model.weights)
        assert sorted(site_model.provenance.sources) == boards
    # Its neurons come from boards of both sites.
    sources = set(root_global.provenance.sources)
    assert sources <= {n for b in SITES.values() for n in b}
    assert all(sources & set(boards) for boards in SITES.values()), sources

    # Every board installed exactly the root's model, through its own site's fleet.
    for boards in SITES.values():
        for node in boards:
            state = json.loads((out / "nodes" / node / "node.json").read_text())
            assert state["installed_round"] == 1, node
            installed = load_model(out / "nodes" / node / "global.estdp")
            np.testing.assert_array_equal(installed.weights, root_global.weights)
            # ... the final one, with the labels pooled over every board (relayed by the
            # sites), not the provisional one.
            np.testing.assert_array_equal(installed.labels, root_global.labels)
            np.testing.assert_array_equal(installed.thetas, root_global.thetas)
            assert protocol.global_labels(installed) == protocol.LABELS_FEDERATED, node
    assert protocol.global_labels(root_global) == protocol.LABELS_FEDERATED
    assert results["rounds"][0]["labels"] == "federated"
    assert results["rounds"][0]["label_nodes"] == 2  # the two sites, each summing its boards
    assert results["rounds"][0]["label_images"] == 240
    # The sites relayed their boards' threshold calibrations too (60 images each).
    assert root_global.provenance.notes.get("calibrated") == "240/2"
    assert results["rounds"][0]["calibration_images"] == 240
    assert seconds < 60, f"the two-site simulation took {seconds:.0f} s"
