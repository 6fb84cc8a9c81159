"""Fakes for the daemon tests: a fast trainer and a concatenating merge."""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence

import numpy as np
import pytest

from edge_node.daemon import LabelCounts, Progress, TrainOutcome
from estdp.errors import EstdpError
from estdp.model import SubModel, new_model
from estdp.params import NetworkParams
from estdp.protocol import RoundAnnouncement


class FakeTrainer:
    """Random weights seeded by node and round, in ``seconds`` of fake work."""

    def __init__(
        self, node_id: str, seconds: float = 0.0, lineage: bool = False, labels: bool = True
    ) -> None:
        self.node_id = node_id
        self.seconds = seconds
        self.lineage = lineage  # record class counts and the parent, as workflow does
        self.labels = labels  # False: label statistics fail (the node sends none)
        self.starts: list[SubModel | None] = []
        self.label_calls: list[tuple[int, str]] = []  # (round, the model's labels note)
        self.shard = 50  # images a calibration pass can use at most
        self.calibrate_calls: list[tuple[int, int]] = []  # (round, images asked for)
        self.thetas_measured: list[np.ndarray] = []  # the thresholds label_stats saw

    def train(
        self,
        announcement: RoundAnnouncement,
        n_neurons: int,
        start: SubModel | None,
        progress: Progress,
    ) -> TrainOutcome:
        self.starts.append(start)
        for i in range(5):
            time.sleep(self.seconds / 5)
            progress(i + 1, 5)
        rng = np.random.default_rng(zlib.crc32(f"{self.node_id}/{announcement.round_id}".encode()))
        notes = None
        if self.lineage:
            from edge_node.workflow import lineage_notes

            notes = lineage_notes(rng.integers(0, 10, 50), start)
        model = new_model(
            rng.random((784, n_neurons), dtype=np.float32) * 0.3,
            rng.random(n_neurons, dtype=np.float32) * 0.05,
            NetworkParams(),
            node_id=self.node_id,
            images_seen=50,
            seed=0,
            labels=rng.integers(0, 10, n_neurons),
            class_rates=rng.random((10, n_neurons), dtype=np.float32),
            round=announcement.round_id,
            notes=notes,
        )
        return TrainOutcome(model, {"images": 50.0})

    def evaluate(self, model: SubModel) -> dict[str, float]:
        return {"accuracy": float(model.weights.mean())}

    def label_stats(self, model: SubModel, round_id: int) -> LabelCounts:
        """Made-up statistics, seeded by node and round; a class without images has no
        responses, as real ones."""
        self.label_calls.append((round_id, model.provenance.notes.get("labels", "")))
        self.thetas_measured.append(model.thetas.copy())
        if not self.labels:
            raise EstdpError(f"{self.node_id}: no labelled images")
        rng = np.random.default_rng(zlib.crc32(f"labels/{self.node_id}/{round_id}".encode()))
        counts = rng.integers(0, 20, model.n_classes)
        sums = counts[:, None] * rng.random((model.n_classes, model.n_neurons)) * 4.0
        return LabelCounts(counts.astype(np.int64), sums)

    def calibrate(self, model: SubModel, n_images: int, round_id: int) -> tuple[np.ndarray, int]:
        """Made-up calibrated thresholds (the model's plus a seeded rise), from at most
        ``shard`` images."""
        self.calibrate_calls.append((round_id, n_images))
        rng = np.random.default_rng(zlib.crc32(f"calibrate/{self.node_id}/{round_id}".encode()))
        return model.thetas.astype(np.float64) + rng.random(model.n_neurons), min(
            n_images, self.shard
        )


def concat_merge(
    models: Sequence[SubModel], target: int, metric: str, **kw: object
) -> tuple[SubModel, dict]:
    """Concatenate and keep the first ``target`` neurons (stands in for aggregator.merge)."""
    weights = np.concatenate([m.weights for m in models], axis=1)[:, :target]
    thetas = np.concatenate([m.thetas for m in models])[:target]
    labels = np.concatenate([m.labels for m in models])[:target]
    merged = new_model(
        weights,
        thetas,
        models[0].params,
        node_id="aggregator",
        images_seen=sum(m.provenance.images_seen for m in models),
        seed=0,
        labels=labels,
    )
    return merged, {"pairs_compared": float(len(models)), "metric": metric}


@pytest.fixture
def fake_trainer() -> type[FakeTrainer]:
    return FakeTrainer


@pytest.fixture
def merge_fn():
    return concat_merge
