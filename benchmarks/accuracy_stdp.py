"""MNIST accuracy of one Diehl & Cook network trained on the CPU (numpy or native).

    python benchmarks/accuracy_stdp.py --neurons 100 --images 10000 [--preset bindsnet]
                                       [--seed 0] [--data DIR] [--out model.npz]
                                       [--backend numpy|native]

One pass of STDP over the first ``--images`` training images; labels assigned two ways:
from a frozen-weight pass over those same images (as ``estdp train`` does) and from the
spike counts recorded during training; then both classification schemes on the 10,000
test images. Progress lines go to stderr; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from edge_node import inference, labels, native_kernels, trainer
from estdp.datasets import load_mnist
from estdp.params import load_params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=100)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--preset", default="bindsnet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", default=None, help="save weights and thresholds (.npz)")
    parser.add_argument("--backend", choices=("numpy", "native"), default="numpy")
    args = parser.parse_args()
    native = args.backend == "native"
    spike_counts = native_kernels.spike_counts if native else inference.spike_counts

    data = args.data or os.environ.get("ESTDP_DATA")
    if data is None:
        shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
        data = str(shared) if shared.exists() else None
    params = load_params(args.preset)
    train_x, train_y = load_mnist("train", data, limit=args.images)
    test_x, test_y = load_mnist("test", data)
    rng = np.random.default_rng(args.seed)
    weights, thetas = trainer.init_weights(args.neurons, params, rng)

    def progress(done: int) -> None:
        if done % 1000 == 0:
            print(f"{done} images, {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    result = trainer.train(
        weights, thetas, train_x, params, rng=rng, progress=progress, native=native
    )
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    frozen = spike_counts(
        result.weights, result.thetas, train_x, params, rng=np.random.default_rng(args.seed + 1)
    )
    test_counts = spike_counts(
        result.weights, result.thetas, test_x, params, rng=np.random.default_rng(args.seed + 2)
    )
    infer_s = time.perf_counter() - t1
    summary = {
        "benchmark": "stdp_accuracy",
        "backend": args.backend,
        "preset": params.preset,
        "neurons": args.neurons,
        "images": int(len(train_x)),
        "test_images": int(len(test_x)),
        "seed": args.seed,
        "presentations": result.presentations,
        "train_s": round(train_s, 1),
        "ms_per_train_image": round(train_s / len(train_x) * 1e3, 3),
        "inference_s": round(infer_s, 1),
    }
    for source, counts in (("frozen", frozen), ("during_training", result.spike_counts)):
        neuron_labels, rates = labels.assign_labels(counts, train_y, 10)
        all_activity = labels.predict_all_activity(test_counts, neuron_labels, 10)
        proportion = labels.predict_proportion_weighting(test_counts, neuron_labels, rates, 10)
        summary[f"accuracy_all_activity_{source}"] = round(
            float(np.mean(all_activity == test_y)), 4
        )
        summary[f"accuracy_proportion_{source}"] = round(float(np.mean(proportion == test_y)), 4)
    if args.out:
        np.savez(args.out, weights=result.weights, thetas=result.thetas)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
