"""CPU speed of STDP training and inference: milliseconds per image, numpy and native.

    python benchmarks/bench_stdp.py [--neurons 300] [--warmup 1000] [--images 300]
                                    [--repeat 5] [--preset bindsnet] [--data DIR]
                                    [--backend numpy,native] [--infer 1000]

Spike counts per image, and so the cost of the event-driven trainer, depend on how far
training has gone, so the network is first trained on ``--warmup`` images (reported, not
part of the figure); then training on the next ``--images`` images is timed ``--repeat``
times per backend, each run from the same warmed-up state and seed, the backends taking
turns so that a noisy neighbour slows both alike. ``numpy-prefetch`` is the NumPy trainer
with its inputs drawn and prepared by a second process (:mod:`edge_node.prefetch`; the
worker's start-up is part of its figure, and its CPU time is the trainer's process only);
it needs ``--images`` of at least ``prefetch.MIN_IMAGES``. With ``--infer N``,
frozen-weight inference on N images is timed the same way (``numpy``: the batched
float32 NumPy loop; ``native``: the C kernel with its threads). Uses MNIST from
``--data`` / ``$ESTDP_DATA`` / ../shared/data/mnist when present, else synthetic
digit-like images. Each run prints a line; the last line is one JSON object with
``backend`` and ``ms_per_image`` (the first ``--backend``'s training median), the medians
per backend (wall clock and process CPU time: on a shared machine the CPU time is
the steadier of the two) and the speed-ups measured in this process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from _images import load_images

from edge_node import inference, native_kernels, prefetch
from edge_node.trainer import init_weights, train
from estdp.params import load_params

BACKENDS = ("numpy", "numpy-prefetch", "native")


def _timed(run) -> tuple[float, float, object]:
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    result = run()
    return time.perf_counter() - start_wall, time.process_time() - start_cpu, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=1000, help="images trained before timing")
    parser.add_argument("--images", type=int, default=300, help="images per timed run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--preset", default="bindsnet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None)
    parser.add_argument(
        "--backend", default="numpy,native", help="comma-separated: numpy, numpy-prefetch, native"
    )
    parser.add_argument("--infer", type=int, default=0, help="also time inference on N images")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    if not backends or set(backends) - set(BACKENDS):
        parser.error(f"--backend takes {', '.join(BACKENDS)}, got {args.backend!r}")
    if "numpy-prefetch" in backends and args.images < prefetch.MIN_IMAGES:
        parser.error(
            f"numpy-prefetch needs --images >= {prefetch.MIN_IMAGES} (below that the trainer "
            "does not start the worker, whose start-up is part of the figure)"
        )

    params = load_params(args.preset)
    images, source = load_images(args.warmup + max(args.images, args.infer), args.data, args.seed)
    rng = np.random.default_rng(args.seed)
    weights, thetas = init_weights(args.neurons, params, rng)
    t0 = time.perf_counter()
    warm = train(
        weights, thetas, images[: args.warmup], params, rng=rng, native="native" in backends
    )
    warm_ms = (time.perf_counter() - t0) / max(args.warmup, 1) * 1e3
    print(f"warm-up: {args.warmup} images, {warm_ms:.3f} ms/image", flush=True)

    timed = images[args.warmup : args.warmup + args.images]
    test = images[args.warmup : args.warmup + args.infer]
    figures: dict[str, dict[str, list[float]]] = {
        b: {"train_wall": [], "train_cpu": [], "infer_wall": [], "infer_cpu": []} for b in backends
    }
    spikes = 0.0
    for run in range(args.repeat):
        for name in backends:
            wall, cpu, result = _timed(
                lambda name=name: train(
                    warm.weights, warm.thetas, timed, params,
                    rng=np.random.default_rng(args.seed + 1), native=name == "native",
                    prefetch=name == "numpy-prefetch",
                )
            )  # fmt: skip
            figures[name]["train_wall"].append(wall / len(timed) * 1e3)
            figures[name]["train_cpu"].append(cpu / len(timed) * 1e3)
            spikes = result.spike_counts.sum() / len(timed)
            line = f"run {run + 1} {name}: train {wall / len(timed) * 1e3:.3f} ms/image wall"
            if args.infer and name != "numpy-prefetch":  # its inference is numpy's
                counts = inference.spike_counts if name == "numpy" else native_kernels.spike_counts
                wall, cpu, _ = _timed(
                    lambda counts=counts: counts(
                        warm.weights, warm.thetas, test, params, rng=np.random.default_rng(7)
                    )
                )
                figures[name]["infer_wall"].append(wall / len(test) * 1e3)
                figures[name]["infer_cpu"].append(cpu / len(test) * 1e3)
                line += f", infer {wall / len(test) * 1e3:.3f} ms/image wall"
            print(f"{line}, {spikes:.1f} excitatory spikes/image", flush=True)

    def median(values: list[float]) -> float | None:
        return round(statistics.median(values), 4) if values else None

    summary = {
        "benchmark": "stdp_train",
        # The first --backend's training figure, under the plain names; every backend's
        # figures follow under <backend>_train_wall_ms_per_image and the like.
        "backend": backends[0],
        "ms_per_image": median(figures[backends[0]]["train_wall"]),
        "preset": params.preset,
        "neurons": args.neurons,
        "images": len(timed),
        "infer_images": len(test),
        "warmup_images": args.warmup,
        "data": source,
        "repeat": args.repeat,
        "spikes_per_image": round(float(spikes), 2),
        "ms_per_image_warmup": round(warm_ms, 4),
    }
    for name in backends:
        for key, values in figures[name].items():
            summary[f"{name.replace('-', '_')}_{key}_ms_per_image"] = median(values)

    def speedup(slow: str, fast: str, key: str) -> float:
        pairs = zip(figures[slow][key], figures[fast][key], strict=True)
        return round(statistics.median(a / b for a, b in pairs), 3)

    if {"numpy", "native"} <= set(backends):
        summary["native_speedup_train"] = speedup("numpy", "native", "train_wall")
        if args.infer:
            summary["native_speedup_infer"] = speedup("numpy", "native", "infer_wall")
    if {"numpy", "numpy-prefetch"} <= set(backends):
        summary["prefetch_speedup_train"] = speedup("numpy", "numpy-prefetch", "train_wall")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
