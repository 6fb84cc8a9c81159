"""NumPy speed of STDP training: milliseconds per training image (event-driven trainer).

    python benchmarks/bench_stdp.py [--neurons 300] [--warmup 1000] [--images 300]
                                    [--repeat 5] [--preset bindsnet] [--data DIR]

Spike counts per image, and so the cost of the event-driven trainer, depend on how far
training has gone, so the network is first trained on ``--warmup`` images (reported, not
part of the figure); then training on the next ``--images`` images is timed ``--repeat``
times, each run from the same warmed-up state and seed. Uses MNIST from ``--data`` /
``$ESTDP_DATA`` / ../shared/data/mnist when present, else synthetic digit-like images.
Each run prints a line; the last line is one JSON object with the medians (wall clock
and process CPU time: on a shared machine the CPU time is the steadier of the two).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from edge_node.trainer import init_weights, train
from estdp.params import load_params


def synthetic_digits(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 784) uint8: strokes of lit pixels in the central 20 x 20, ~150 per image."""
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for k in range(n):
        y, x = rng.integers(6, 22, 2)
        for _ in range(10):
            y = int(np.clip(y + rng.integers(-3, 4), 4, 23))
            x = int(np.clip(x + rng.integers(-3, 4), 4, 23))
            images[k, y - 2 : y + 2, x - 2 : x + 2] = rng.integers(120, 256)
    return images.reshape(n, 784)


def load_images(n: int, data: str | None, seed: int) -> tuple[np.ndarray, str]:
    """The first ``n`` MNIST training images when available, else synthetic ones."""
    candidates = [data, os.environ.get("ESTDP_DATA")]
    candidates.append(str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
    for directory in candidates:
        if directory and (Path(directory) / "train-images-idx3-ubyte.gz").exists():
            from estdp.datasets import load_mnist

            images, _ = load_mnist("train", directory, download=False, limit=n)
            return images.reshape(len(images), -1), "mnist"
    return synthetic_digits(n, np.random.default_rng(seed)), "synthetic"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=1000, help="images trained before timing")
    parser.add_argument("--images", type=int, default=300, help="images per timed run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--preset", default="bindsnet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()

    params = load_params(args.preset)
    images, source = load_images(args.warmup + args.images, args.data, args.seed)
    rng = np.random.default_rng(args.seed)
    weights, thetas = init_weights(args.neurons, params, rng)
    t0 = time.perf_counter()
    warm = train(weights, thetas, images[: args.warmup], params, rng=rng)
    warm_ms = (time.perf_counter() - t0) / max(args.warmup, 1) * 1e3
    print(f"warm-up: {args.warmup} images, {warm_ms:.3f} ms/image", flush=True)

    timed = images[args.warmup :]
    wall, cpu = [], []
    for run in range(args.repeat):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        result = train(
            warm.weights, warm.thetas, timed, params, rng=np.random.default_rng(args.seed + 1)
        )
        wall.append((time.perf_counter() - start_wall) / len(timed) * 1e3)
        cpu.append((time.process_time() - start_cpu) / len(timed) * 1e3)
        spikes = result.spike_counts.sum() / len(timed)
        print(
            f"run {run + 1}: {wall[-1]:.3f} ms/image wall, {cpu[-1]:.3f} ms/image cpu, "
            f"{spikes:.1f} excitatory spikes/image",
            flush=True,
        )
    summary = {
        "benchmark": "stdp_train",
        "backend": "numpy",
        "preset": params.preset,
        "neurons": args.neurons,
        "images": len(timed),
        "warmup_images": args.warmup,
        "data": source,
        "repeat": args.repeat,
        "ms_per_image": round(statistics.median(wall), 4),
        "ms_per_image_cpu": round(statistics.median(cpu), 4),
        "ms_per_image_warmup": round(warm_ms, 4),
        "spikes_per_image": round(float(spikes), 2),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
