"""Training images for the benchmarks: real MNIST when present, else digit-like strokes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def synthetic_digits(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 784) uint8: strokes of lit pixels in the central 20 x 20, ~150 per image."""
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for k in range(n):
        y, x = rng.integers(6, 22, 2)
        for _ in range(10):  # a random walk of thick strokes
            y = int(np.clip(y + rng.integers(-3, 4), 4, 23))
            x = int(np.clip(x + rng.integers(-3, 4), 4, 23))
            images[k, y - 2 : y + 2, x - 2 : x + 2] = rng.integers(120, 256)
    return images.reshape(n, 784)


def load_images(n: int, data: str | None, seed: int) -> tuple[np.ndarray, str]:
    """The first ``n`` MNIST training images from ``data`` / ``$ESTDP_DATA`` /
    ../shared/data/mnist when one holds them, else synthetic ones; and which it was."""
    candidates = [data, os.environ.get("ESTDP_DATA")]
    candidates.append(str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
    for directory in candidates:
        if directory and (Path(directory) / "train-images-idx3-ubyte.gz").exists():
            from estdp.datasets import load_mnist

            images, _ = load_mnist("train", directory, download=False, limit=n)
            return images.reshape(len(images), -1), "mnist"
    return synthetic_digits(n, np.random.default_rng(seed)), "synthetic"
