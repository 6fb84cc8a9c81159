"""``estdp merge`` end to end on model files (no MNIST needed without --eval)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from estdp.cli import main
from estdp.model import load_model, new_model, save_model
from estdp.params import NetworkParams


def _write(path, node: str, n: int, seed: int, params: NetworkParams | None = None):
    rng = np.random.default_rng(seed)
    model = new_model(
        rng.random((784, n), dtype=np.float32) * 0.3,
        rng.random(n, dtype=np.float32) * 0.1,
        params or NetworkParams(),
        node_id=node,
        images_seen=100,
        seed=seed,
        labels=rng.integers(0, 10, n),
    )
    save_model(model, path)
    return path


@pytest.fixture
def inputs(tmp_path):
    return [str(_write(tmp_path / f"m{i}.estdp", f"node-{i}", 20, i)) for i in range(3)]


@pytest.mark.parametrize("metric", ["mse", "manhattan", "cosine", "correlation"])
def test_merge_writes_the_model_and_reports_stages(inputs, tmp_path, capsys, metric):
    out = tmp_path / "merged.estdp"
    rc = main(["merge", *inputs, "--target", "25", "--metric", metric, "--out", str(out), "--json"])
    assert rc == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["neurons_in"] == 60 and record["neurons_out"] == 25
    assert set(record["seconds"]) >= {"concatenate", "similarity", "selection", "removal"}
    merged = load_model(out)
    assert merged.n_neurons == 25
    assert merged.provenance.sources == ("node-0", "node-1", "node-2")
    assert merged.provenance.notes["merge_metric"] == metric


def test_human_output_names_the_stages(inputs, tmp_path, capsys):
    rc = main(
        ["merge", *inputs, "--target", "30", "--rule", "theta", "--out", str(tmp_path / "o.estdp")]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "into 30 by mse (rule theta)" in text
    for stage in ("concatenate", "similarity", "selection", "removal"):
        assert stage in text


def test_missing_file_is_one_line_and_exit_1(inputs, tmp_path, capsys):
    rc = main(
        [
            "merge",
            inputs[0],
            str(tmp_path / "nope.estdp"),
            "--target",
            "5",
            "--out",
            str(tmp_path / "o.estdp"),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("estdp merge: error:") and "\n" not in err
    assert not (tmp_path / "o.estdp").exists()


def test_mismatched_parameters_are_one_line(inputs, tmp_path, capsys):
    other = _write(tmp_path / "other.estdp", "odd", 10, 9, NetworkParams(nu_post=0.02))
    rc = main(["merge", inputs[0], str(other), "--target", "5", "--out", str(tmp_path / "o.estdp")])
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert "nu_post" in err and "\n" not in err


def test_bad_target_is_a_usage_error(inputs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["merge", *inputs, "--target", "0", "--out", str(tmp_path / "o.estdp")])
    assert exc.value.code == 2


def test_out_in_a_missing_directory_is_refused(inputs, tmp_path, capsys):
    rc = main(["merge", *inputs, "--target", "5", "--out", str(tmp_path / "no" / "o.estdp")])
    assert rc == 1
    assert "does not exist" in capsys.readouterr().err


def test_eval_and_calibrate_on_mnist(inputs, tmp_path, capsys, mnist_dir):
    out = tmp_path / "merged.estdp"
    rc = main(
        ["merge", *inputs, "--target", "30", "--metric", "cosine", "--out", str(out),
         "--eval", "--test", "30", "--calibrate", "--labelled-images", "40",
         "--data", str(mnist_dir), "--json"]
    )  # fmt: skip
    assert rc == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["labels"] == "calibrated" and record["test_images"] == 30
    assert len(record["accuracy_inputs"]) == 3
    for acc in [*record["accuracy_inputs"], record["accuracy"]]:
        assert 0.0 <= acc["all_activity"] <= 1.0
        assert 0.0 <= acc["proportion_weighting"] <= 1.0
    assert "labels" in record["seconds"]


def test_thresholds_then_labels_on_mnist(inputs, tmp_path, capsys, mnist_dir):
    from aggregator.merge import LabelledImages, calibrate_labels
    from estdp.datasets import load_mnist

    plain, tuned = tmp_path / "plain.estdp", tmp_path / "tuned.estdp"
    common = ["--target", "30", "--labelled-images", "40", "--data", str(mnist_dir), "--json"]
    assert main(["merge", *inputs, *common, "--out", str(plain)]) == 0
    assert (
        main(["merge", *inputs, *common, "--thresholds", "30", "--calibrate", "--out", str(tuned)])
        == 0
    )
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["labels"] == "calibrated"
    assert record["seconds"]["thresholds"] > 0 and record["seconds"]["labels"] > 0
    before, after = load_model(plain), load_model(tuned)
    np.testing.assert_array_equal(after.weights, before.weights)
    assert after.provenance.notes["calibrated"] == "30/1"
    assert (after.thetas >= before.thetas - 1e-3).all() and (
        after.thetas > before.thetas + 0.04
    ).any()
    # The labels are those of the calibrated thresholds, on the same labelled images.
    images, labels = load_mnist("train", str(mnist_dir), limit=40, offset=50000, download=False)
    expected, _ = calibrate_labels(after, LabelledImages(images, labels, seed=0))
    np.testing.assert_array_equal(after.labels, expected)


def test_thresholds_without_labels_keeps_the_sub_models_labels(inputs, tmp_path, capsys, mnist_dir):
    out = tmp_path / "t.estdp"
    rc = main(["merge", *inputs, "--target", "30", "--thresholds", "20", "--labelled-images", "40",
               "--data", str(mnist_dir), "--out", str(out), "--json"])  # fmt: skip
    assert rc == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["labels"] == "kept" and "thresholds" in record["seconds"]
