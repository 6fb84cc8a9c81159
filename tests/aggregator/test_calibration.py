"""aggregator.calibration: averaging the nodes' calibrated thresholds, and what is refused."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.calibration import (
    CALIBRATED_NOTE,
    average_thetas,
    calibrated,
    problem,
    requested,
    without_request,
)
from estdp.errors import MergeError
from estdp.model import new_model
from estdp.params import NetworkParams
from estdp.protocol import CALIBRATE_NOTE, LABELS_NOTE, LabelStats, requested_calibration

N = 6


def model():
    rng = np.random.default_rng(0)
    return new_model(
        rng.random((784, N), dtype=np.float32),
        rng.random(N, dtype=np.float32) * 20,
        NetworkParams(),
        node_id="aggregator",
        images_seen=100,
        seed=0,
        labels=rng.integers(0, 10, N),
        class_rates=rng.random((10, N), dtype=np.float32),
        notes={LABELS_NOTE: "provisional", "merge": "mse"},
    )


def stats(thetas, images: int, node: str = "n0") -> LabelStats:
    return LabelStats(
        node,
        1,
        "0123456789abcdef",
        np.full(10, 3, np.int64),
        np.ones((10, N)),
        thetas=None if thetas is None else np.asarray(thetas, np.float64),
        calibration_images=images,
    )


def test_the_request_is_a_note_the_nodes_read_as_a_count() -> None:
    asked = requested(model(), 1500)
    assert asked.provenance.notes[CALIBRATE_NOTE] == "1500"
    assert requested_calibration(asked) == 1500  # what the node reads
    assert asked.provenance.notes["merge"] == "mse"  # other notes kept
    np.testing.assert_array_equal(asked.thetas, model().thetas)
    with pytest.raises(ValueError, match=">= 1"):
        requested(model(), 0)


def test_thresholds_are_averaged_weighted_by_the_images_behind_them() -> None:
    a, b, c = np.arange(N) * 1.0, np.full(N, 10.0), np.full(N, 4.0)
    out = average_thetas({"n1": stats(b, 300, "n1"), "n0": stats(a, 100), "n2": stats(c, 600)}, N)
    np.testing.assert_allclose(out.thetas, (100 * a + 300 * b + 600 * c) / 1000)
    assert out.nodes == ("n0", "n1", "n2") and out.images == 1000
    # Not the plain mean: a node with more images pulls harder.
    assert not np.allclose(out.thetas, (a + b + c) / 3)


@pytest.mark.parametrize(
    ("thetas", "images", "why"),
    [
        (None, 0, "no thresholds"),
        (np.ones(N + 1), 10, f"shape ({N + 1},) where the model has ({N},)"),
        (np.r_[np.ones(N - 1), np.nan], 10, "NaN or inf"),
        (np.r_[np.ones(N - 1), np.inf], 10, "NaN or inf"),
        (np.r_[np.ones(N - 1), -1.0], 10, "negative"),
        (np.ones(N), 0, "0 calibration images"),
    ],
)
def test_bad_calibrations_are_named_and_refused(thetas, images, why) -> None:
    assert why in problem(stats(thetas, images), N)
    with pytest.raises(MergeError, match="calibration from n0"):
        average_thetas({"n0": stats(thetas, images), "n1": stats(np.ones(N), 5, "n1")}, N)


def test_a_good_calibration_has_no_problem_and_none_is_no_average() -> None:
    assert problem(stats(np.ones(N), 1), N) == ""
    with pytest.raises(MergeError, match="no calibrated thresholds"):
        average_thetas({}, N)


def test_the_calibrated_model_has_the_thresholds_and_says_so() -> None:
    asked = requested(model(), 40)
    averaged = average_thetas({"n0": stats(np.full(N, 7.5), 40), "n1": stats(np.ones(N), 20)}, N)
    out = calibrated(asked, averaged)
    np.testing.assert_allclose(out.thetas, np.full(N, (40 * 7.5 + 20) / 60), rtol=1e-6)
    assert out.thetas.dtype == np.float32
    np.testing.assert_array_equal(out.weights, asked.weights)
    np.testing.assert_array_equal(out.labels, asked.labels)
    notes = out.provenance.notes
    assert CALIBRATE_NOTE not in notes and notes[CALIBRATED_NOTE] == "60/2"
    assert notes[LABELS_NOTE] == "provisional"  # still to be labelled
    assert requested_calibration(out) == 0  # the nodes are not asked again
    short = average_thetas({"n0": stats(np.ones(N - 1), 5)}, N - 1)
    with pytest.raises(MergeError, match=f"for a model of {N} neurons"):
        calibrated(asked, short)


def test_without_the_request_the_model_is_otherwise_the_same() -> None:
    asked = requested(model(), 40)
    plain = without_request(asked)
    assert CALIBRATE_NOTE not in plain.provenance.notes
    assert plain.provenance.notes == model().provenance.notes
    np.testing.assert_array_equal(plain.thetas, asked.thetas)
    assert requested_calibration(plain) == 0
    unasked = model()
    assert without_request(unasked) is unasked
