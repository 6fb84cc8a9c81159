"""Shared fixtures: where the real MNIST lives, and GPU/broker availability."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_mnist_dir() -> Path | None:
    """../shared/data/mnist beside the checkout (or $ESTDP_TEST_MNIST), when present."""
    candidates = [os.environ.get("ESTDP_TEST_MNIST"), REPO_ROOT.parent / "shared" / "data" / "mnist"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "t10k-labels-idx1-ubyte.gz").exists():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    path = shared_mnist_dir()
    if path is None:
        pytest.skip("the shared MNIST files (../shared/data/mnist) are not present")
    return path
