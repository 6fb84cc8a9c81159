"""Experiments: the docs section writer (the runs themselves are exercised by test_fleet)."""

from __future__ import annotations

from pathlib import Path

import pytest

from estdp.errors import ConfigError
from firmware_sim import experiments as E

DOC = """# Results

## Engine

engine text

## Simulation

intro kept

### Experiment `compression`: old

old table

### Experiment `ga`: other

ga table

## Merge

merge text
"""


def test_replace_subsection_touches_only_its_subsection():
    out = E.replace_subsection(
        DOC, "### Experiment `compression`", "### Experiment `compression`: new\n\nnew table\n"
    )
    assert "old table" not in out and "new table" in out
    assert "ga table" in out and "intro kept" in out
    assert out.split("## Simulation")[0] == DOC.split("## Simulation")[0]
    assert out.endswith("## Merge\n\nmerge text\n")


def test_the_section_heading_may_carry_a_suffix():
    doc = DOC.replace("## Simulation\n", "## Simulation (issue #5)\n")
    out = E.replace_subsection(doc, "### Experiment `ga`", "### Experiment `ga`: new\n")
    assert "ga table" not in out and out.count("## Simulation") == 1


def test_replace_subsection_appends_new_subsection_and_creates_the_section():
    out = E.replace_subsection(
        DOC, "### Experiment `ensemble`", "### Experiment `ensemble`: e\n\nrows\n"
    )
    sim = out.split("## Simulation")[1].split("## Merge")[0]
    assert sim.index("ga table") < sim.index("rows")
    fresh = E.replace_subsection(
        "# Results\n\n## Engine\n\nx\n", "### Experiment `ga`", "### Experiment `ga`\n\nbody\n"
    )
    assert fresh.startswith("# Results\n\n## Engine\n\nx\n\n## Simulation\n")
    assert fresh.rstrip().endswith("body")
    # Idempotent: writing the same body twice gives the same page.
    assert (
        E.replace_subsection(fresh, "### Experiment `ga`", "### Experiment `ga`\n\nbody\n") == fresh
    )


def test_update_docs_writes_the_table_and_plot_links(tmp_path: Path):
    docs = tmp_path / "docs" / "results.md"
    docs.parent.mkdir()
    docs.write_text(DOC)
    plot = tmp_path / "runs" / "compression" / "compression.png"
    plot.parent.mkdir(parents=True)
    plot.write_bytes(b"png")
    results = {
        "title": "T",
        "command": "estdp experiment compression",
        "seconds": 12.0,
        "tables": [{"title": "Acc", "rows": [{"removed": 0, "accuracy mse": 0.9}]}],
    }
    E.update_docs(docs, "compression", results, [plot])
    text = docs.read_text()
    assert "| 0 | 90.00% |" in text
    assert "estdp experiment compression" in text
    assert "](img/experiment-compression/compression.png)" in text
    assert (
        docs.parent / "img" / "experiment-compression" / "compression.png"
    ).read_bytes() == b"png"
    assert "engine text" in text and "merge text" in text


def test_unknown_experiment_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown experiment"):
        E.run_experiment("nope", E.ExperimentConfig(out_dir=tmp_path))


@pytest.mark.slow
def test_compression_experiment_at_small_scale_writes_report_and_docs(tmp_path, mnist_dir):
    docs = tmp_path / "results.md"
    config = E.ExperimentConfig(
        out_dir=tmp_path / "runs",
        data_dir=str(mnist_dir),
        backend="numpy",
        images=150,
        test_images=60,
        scale=0.05,  # 15 neurons, removal in steps of 2
        docs=docs,
        jobs=2,
    )
    results = E.run_experiment("compression", config)
    curve = results["compression_curve"]
    assert curve["start_neurons"] == 15 and curve["removed"] == [0, 2, 4, 6, 8, 10]
    assert all(len(v) == 6 and all(0 <= a <= 1 for a in v) for v in curve["metrics"].values())
    assert (tmp_path / "runs" / "compression" / "compression.png").exists()
    assert "### Experiment `compression`" in docs.read_text()
    # The trained model is cached for the other experiments.
    cached = list((tmp_path / "runs" / "models").glob("single-15-150-*.estdp"))
    assert len(cached) == 1
