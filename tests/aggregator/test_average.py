"""Averaging the updates that continued the same global model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator import average
from aggregator.daemon import AggregatorConfig
from edge_node.workflow import lineage_notes
from estdp.errors import ConfigError, MergeError
from estdp.lineage import CLASS_COUNTS_NOTE, PARENT_NOTE, class_counts, parent_tag
from estdp.model import new_model
from estdp.params import BINDSNET


def _model(weights, thetas, rates, notes, node="n"):
    return new_model(
        np.asarray(weights, np.float32),
        np.asarray(thetas, np.float32),
        BINDSNET,
        node_id=node,
        images_seen=160,
        seed=0,
        class_rates=np.asarray(rates, np.float32),
        notes=notes,
    )


def _pair():
    """Two siblings of 2 neurons; node a saw 30 images of class 0, node b 10 of class 0 and
    20 of class 1."""
    wa = np.full((784, 2), 0.1)
    wb = np.full((784, 2), 0.4)
    ra = np.zeros((10, 2))
    ra[0] = [2.0, 1.0]
    rb = np.zeros((10, 2))
    rb[0] = [0.0, 1.0]
    rb[1] = [0.5, 3.0]
    a = _model(
        wa, [1.0, 2.0], ra, {PARENT_NOTE: "p", CLASS_COUNTS_NOTE: "30,0,0,0,0,0,0,0,0,0"}, "a"
    )
    b = _model(
        wb, [3.0, 6.0], rb, {PARENT_NOTE: "p", CLASS_COUNTS_NOTE: "10,20,0,0,0,0,0,0,0,0"}, "b"
    )
    return a, b


def test_weights_and_thresholds_are_image_weighted_and_rates_pooled_per_class():
    a, b = _pair()
    assert average.siblings([a, b])
    merged = average.average([a, b], round=3)
    # 30 and 30 labelled images: equal shares
    np.testing.assert_allclose(merged.weights, 0.25, rtol=1e-6)
    np.testing.assert_allclose(merged.thetas, [2.0, 4.0], rtol=1e-6)
    # class 0: (30 * 2 + 10 * 0) / 40 = 1.5 and (30 * 1 + 10 * 1) / 40 = 1; class 1: b only
    np.testing.assert_allclose(merged.class_rates[0], [1.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(merged.class_rates[1], [0.5, 3.0], rtol=1e-6)
    assert merged.labels.tolist() == [0, 1]
    assert class_counts(merged).tolist() == [40, 20, 0, 0, 0, 0, 0, 0, 0, 0]
    assert merged.provenance.round == 3 and merged.provenance.notes["merge"] == "average"
    assert merged.provenance.images_seen == 130 + 60  # 160 = 130 of the parent + 30 own


def test_unequal_shares_weight_the_larger_shard_more():
    a, b = _pair()
    b = _model(
        b.weights,
        b.thetas,
        b.class_rates,
        {**b.provenance.notes, CLASS_COUNTS_NOTE: "90,0,0,0,0,0,0,0,0,0"},
    )
    merged = average.average([a, b])
    np.testing.assert_allclose(merged.weights, 0.25 * 0.1 + 0.75 * 0.4, rtol=1e-6)


@pytest.mark.parametrize(
    "change",
    [
        {PARENT_NOTE: "other"},
        {PARENT_NOTE: ""},
        {CLASS_COUNTS_NOTE: "1,2,3"},
        {CLASS_COUNTS_NOTE: "x,0,0,0,0,0,0,0,0,0"},
        {CLASS_COUNTS_NOTE: "0,0,0,0,0,0,0,0,0,0"},
    ],
)
def test_models_that_are_not_siblings_are_not_averaged(change):
    a, b = _pair()
    b = _model(b.weights, b.thetas, b.class_rates, {**b.provenance.notes, **change})
    assert not average.siblings([a, b])
    with pytest.raises(MergeError, match="same global model"):
        average.average([a, b])


def test_a_different_size_is_not_a_sibling():
    a, _ = _pair()
    c = _model(np.full((784, 3), 0.1), [1, 1, 1], np.zeros((10, 3)), dict(a.provenance.notes))
    assert not average.siblings([a, c]) and not average.siblings([])


def test_training_records_its_class_counts_and_its_parent():
    a, _ = _pair()
    fresh = lineage_notes(np.array([0, 0, 3, 9]), None)
    assert fresh == {CLASS_COUNTS_NOTE: "2,0,0,1,0,0,0,0,0,1"}
    continued = lineage_notes(np.array([1]), a)
    assert continued[PARENT_NOTE] == parent_tag(a) and len(parent_tag(a)) == 16
    b = _model(a.weights + 0.001, a.thetas, a.class_rates, {})
    assert parent_tag(b) != parent_tag(a)


def test_the_daemon_averages_continued_rounds_unless_told_to_prune(
    tmp_path: Path, fake_trainer, merge_fn
):
    from tests.aggregator.test_daemon import Fleet

    def lineage_trainer(node_id):
        return fake_trainer(node_id, lineage=True)

    for mode in ("average", "prune"):
        fleet = Fleet(tmp_path / mode, lineage_trainer, merge_fn, rounds=2, continued_merge=mode)
        fleet.step(6)
        assert fleet.agg.done
        updates = fleet.agg.state.load_updates()
        models = [updates[n].model for n in sorted(updates)]
        assert all(m.provenance.round == 2 for m in models) and average.siblings(models)
        glob = fleet.agg.state.round_dir(2) / "global.estdp"
        from estdp.model import load_model

        got = load_model(glob)
        if mode == "average":
            np.testing.assert_allclose(
                got.weights, np.mean([m.weights for m in models], axis=0), rtol=1e-5
            )
        else:  # concat_merge keeps the first 12 neurons of the concatenation
            first = np.concatenate([m.weights for m in models], axis=1)[:, :12]
            np.testing.assert_array_equal(got.weights, first)


def test_an_unknown_continued_merge_is_refused():
    with pytest.raises(ConfigError, match="--continued-merge"):
        AggregatorConfig(nodes=2, target=5, continued_merge="vote")
