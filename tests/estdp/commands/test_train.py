"""``estdp train``: the prefetch flag reaches the trainer, and a real run writes a model."""

from __future__ import annotations

import json

import pytest

from estdp import cli
from estdp.commands import train as train_command
from estdp.model import load_model


@pytest.mark.parametrize(("flags", "prefetch"), [([], True), (["--no-prefetch"], False)])
def test_prefetch_flag_reaches_train_model(tmp_path, mnist_dir, monkeypatch, flags, prefetch):
    seen = {}
    real = train_command.train_model

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_command, "train_model", spy)
    out = tmp_path / "m.estdp"
    argv = ["train", "--neurons", "6", "--images", "30", "--data", str(mnist_dir)]
    assert cli.main([*argv, "--backend", "numpy", "--out", str(out), *flags]) == 0
    assert seen["prefetch"] is prefetch
    assert load_model(out).provenance.images_seen == 30


def test_json_summary(tmp_path, mnist_dir, capsys):
    out = tmp_path / "m.estdp"
    argv = ["train", "--neurons", "6", "--images", "30", "--data", str(mnist_dir), "--json"]
    assert cli.main([*argv, "--backend", "numpy", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 30 and summary["backend"] == "numpy"
