"""Scoring helpers: removal points, the compression curve's bookkeeping, merge timing."""

from __future__ import annotations

import numpy as np
import pytest

from estdp.model import new_model
from estdp.params import NetworkParams
from firmware_sim import evaluation as E


def _model(n: int, seed: int = 0, node: str = "n"):
    rng = np.random.default_rng(seed)
    return new_model(
        rng.random((784, n)) * 0.3,
        np.zeros(n),
        NetworkParams(),
        node_id=node,
        images_seen=1,
        seed=seed,
    )


def test_removal_points():
    assert E.removal_points(300, 250, 50) == [0, 50, 100, 150, 200, 250]
    assert E.removal_points(500, 200, 67) == [0, 67, 134, 200]
    assert E.removal_points(10, 50, 5) == [0, 5, 9]  # never all neurons
    assert E.removal_points(10, 0, 5) == [0]


def test_pooled_curve_equals_scoring_each_merged_model_directly(tmp_path, mnist_dir):
    from estdp.backend import resolve_backend
    from estdp.datasets import load_mnist
    from estdp.model import save_model

    x, y = load_mnist("test", mnist_dir, limit=40)
    backend = resolve_backend("numpy")
    model = _model(12)
    path = tmp_path / "m.estdp"
    save_model(model, path)
    with E.ScorePool(x, y, backend, jobs=2) as pool:
        curve = E.compression_curve(pool, path, 12, [0, 4, 8], n_images=30)()
        whole = pool.score("whole", path).result()
    assert curve["removed"] == [0, 4, 8] and curve["test_images"] == 30
    assert len({curve["metrics"][m][0] for m in E.METRICS}) == 1  # r = 0 is shared
    pruned, _ = E.merge_models([model], 8, "cosine")
    direct = E.score("direct", pruned, x[:30], y[:30], backend)
    assert curve["metrics"]["cosine"][1] == direct.accuracy
    assert whole.accuracy == E.score("w", model, x, y, backend).accuracy


def test_merge_models_and_concatenate_use_the_aggregator():
    subs = [_model(30, i, f"n{i}") for i in range(3)]
    whole = E.concatenate(subs)
    assert whole.n_neurons == 90 and whole.provenance.sources == ("n0", "n1", "n2")
    merged, report = E.merge_models(subs, 50, "cosine")
    assert merged.n_neurons == 50 and report["removed"] == 40
    # Every kept neuron is one of the concatenated model's columns.
    cols = {whole.weights[:, j].tobytes() for j in range(90)}
    assert all(merged.weights[:, j].tobytes() in cols for j in range(50))


def test_merge_time_is_the_median_of_timed_runs():
    ticks = iter([0.0, 1.0, 10.0, 10.5, 20.0, 23.0])
    t = E.merge_time([_model(20)], 10, "mse", repeats=3, clock=lambda: next(ticks))
    assert t == pytest.approx(1.0)


def test_curve_merges_with_the_runs_removal_rule(tmp_path, mnist_dir):
    from edge_node.workflow import train_model
    from estdp.backend import resolve_backend
    from estdp.datasets import load_mnist
    from estdp.model import save_model

    backend = resolve_backend("numpy")
    train_x, train_y = load_mnist("train", mnist_dir, limit=300)
    model = train_model(train_x, train_y, 40, NetworkParams(), backend).model
    x, y = load_mnist("test", mnist_dir, limit=300)
    path = tmp_path / "m.estdp"
    save_model(model, path)
    expected = {
        rule: E.score(rule, E.merge_models([model], 12, "mse", rule=rule)[0], x, y, backend)
        for rule in ("later", "theta")
    }
    # The rules keep different neurons here, so the curve shows which one it used.
    assert expected["later"].accuracy != expected["theta"].accuracy
    with E.ScorePool(x, y, backend, jobs=1) as pool:
        for rule, scored in expected.items():
            curve = E.compression_curve(pool, path, 40, [28], metrics=["mse"], rule=rule)()
            assert curve["metrics"]["mse"] == [scored.accuracy]
