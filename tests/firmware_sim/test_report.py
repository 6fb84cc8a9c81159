"""The report writer: results.json, report.md, plots, table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from firmware_sim import report as R

ROWS = [
    {
        "model": "node-1",
        "kind": "sub-model",
        "neurons": 100,
        "train_seconds": 12.5,
        "accuracy": 0.8012,
        "accuracy_proportion": 0.81,
    },
    {
        "model": "compressed",
        "kind": "compressed",
        "neurons": 300,
        "train_seconds": 14.0,
        "accuracy": 0.8642,
        "accuracy_proportion": None,
    },
    {
        "model": "baseline",
        "kind": "baseline",
        "neurons": 300,
        "train_seconds": 300.0,
        "accuracy": 0.8887,
        "accuracy_proportion": 0.89,
    },
]


def test_table_has_every_model_and_formats_values():
    text = R.format_table(ROWS)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["model", "neurons"]
    assert "86.42%" in text and "5.00 min" in text and "12.5 s" in text
    assert len(lines) == 2 + len(ROWS)
    md = R.format_table(ROWS, markdown=True)
    assert md.splitlines()[1].startswith("|---")


def test_tile_fields_places_each_neuron():
    w = np.zeros((784, 5), dtype=np.float32)
    for j in range(5):
        w[:, j] = j + 1
    grid = R.tile_fields(w)
    # ceil(sqrt(5)) = 3 columns, 2 rows, tiles 1 pixel apart.
    assert grid.shape == (2 * 28 + 1, 3 * 28 + 2)
    assert grid[0, 0] == 1 and grid[0, 29] == 2 and grid[29, 29] == 5
    assert np.isnan(grid[0, 28]) and np.isnan(grid[28, 0])  # the gaps
    assert np.isnan(grid[29, 58])  # the sixth cell is empty
    assert R.tile_fields(w, gap=0).shape == (56, 84)
    with pytest.raises(ValueError):
        R.tile_fields(np.zeros((100, 3)))


def test_write_report_writes_json_markdown_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    results = {
        "title": "test run",
        "command": "estdp simulate --nodes 2",
        "models": ROWS,
        "speedup": 4.2,
        "per_node": [{"node": "node-1", "accuracy": 0.80}, {"node": "node-2", "accuracy": 0.78}],
        "rounds": [
            {
                "round": 1,
                "nodes": ["node-1"],
                "expected": 2,
                "merge_seconds": 0.01,
                "accuracy": 0.8,
            },
            {
                "round": 2,
                "nodes": ["node-1", "node-2"],
                "expected": 2,
                "merge_seconds": 0.02,
                "accuracy": 0.85,
                "labels": "federated",
                "label_nodes": 2,
                "label_images": 600,
                "calibration_images": 300,
            },
        ],
        "baseline_accuracy": 0.8887,
        "compression_curve": {
            "start_neurons": 500,
            "test_images": 100,
            "removed": [0, 100, 200],
            "metrics": {"mse": [0.9, 0.89, 0.88], "cosine": [0.9, 0.88, 0.85]},
        },
        "merge_times": {"mse": 0.005, "correlation": 0.2},
        "scalar": np.float32(1.5),
    }
    weights = np.random.default_rng(0).random((784, 12)).astype(np.float32)
    paths = R.write_report(results, tmp_path / "rep", global_weights=weights)
    names = {p.name for p in paths}
    assert {
        "results.json",
        "report.md",
        "compression.png",
        "merge_time.png",
        "receptive_fields.png",
        "per_node.png",
        "rounds.png",
    } <= names
    for p in paths:
        assert p.stat().st_size > 100
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert loaded["models"][1]["accuracy"] == 0.8642
    assert loaded["scalar"] == 1.5
    assert "receptive_fields.png" in loaded["plots"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "# test run" in md and "4.20x" in md and "| 200 | 88.00% | 85.00% |" in md
    assert "![per_node](per_node.png)" in md
    assert (
        "| 2 | 2/2 | 20.0 ms | federated (2 nodes, 600 images; thresholds calibrated on 300) "
        "| 85.00% |"
    ) in md
    assert not list((tmp_path / "rep").glob("*.tmp"))


def test_report_without_plot_data_still_writes_json_and_markdown(tmp_path):
    paths = R.write_report({"models": ROWS}, tmp_path)
    assert {p.name for p in paths} == {"results.json", "report.md"}
