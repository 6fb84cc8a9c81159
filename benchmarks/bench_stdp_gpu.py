"""GPU speed of the STDP engine: training ms per image and inference images per second.

    python benchmarks/bench_stdp_gpu.py [--neurons 300] [--images 2000] [--repeat 3]
                                        [--infer-images 10000] [--preset bindsnet] [--data DIR]

Trains ``--images`` images from fresh weights with the CUDA kernel (device draws), times
it ``--repeat`` times after one warm-up (which compiles the kernels), then times batched
inference on ``--infer-images`` images. Uses MNIST from ``--data`` / ``$ESTDP_DATA`` /
../shared/data/mnist when present, else synthetic digit-like images with MNIST's pixel
statistics (about 150 lit pixels of 784), and says which in the result. Each run prints a
line; the last line is one JSON object with the medians. Exits 2 with the reason when no
GPU is usable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
from _images import load_images

from edge_node.cuda_infer import spike_counts_cuda
from edge_node.cuda_train import train_images_cuda
from edge_node.trainer import init_weights
from estdp.backend import resolve_backend
from estdp.errors import EstdpError
from estdp.params import load_params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=300)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--infer-images", type=int, default=10000)
    parser.add_argument("--preset", default="bindsnet")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        xp = resolve_backend("cupy").xp
    except EstdpError as exc:
        print(f"bench_stdp_gpu: {exc}", file=sys.stderr)
        return 2
    params = load_params(args.preset)
    images, source = load_images(max(args.images, args.infer_images), args.data, args.seed)
    train_set = images[: args.images]
    w0, th0 = init_weights(args.neurons, params, np.random.default_rng(args.seed))

    def train() -> tuple[float, object]:
        xp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        result = train_images_cuda(
            w0, th0, train_set, params, rng=np.random.default_rng(args.seed), threads=args.threads
        )
        xp.cuda.Device().synchronize()
        return time.perf_counter() - t0, result

    train_images_cuda(w0, th0, train_set[:8], params, rng=np.random.default_rng(0))  # compile
    runs = []
    for i in range(args.repeat):
        seconds, result = train()
        runs.append(1000.0 * seconds / len(train_set))
        spikes = float(xp.asnumpy(result.counts).sum(axis=1).mean())
        print(
            f"train run {i}: {runs[-1]:.4f} ms/image ({len(train_set)} images, "
            f"{spikes:.1f} spikes/image)",
            flush=True,
        )
    weights, thetas = result.weights, result.thetas
    infer_set = images[: args.infer_images]
    spike_counts_cuda(weights, thetas, infer_set[:8], params, rng=np.random.default_rng(0))
    rates = []
    for i in range(args.repeat):
        xp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        spike_counts_cuda(weights, thetas, infer_set, params, rng=np.random.default_rng(i))
        xp.cuda.Device().synchronize()
        rates.append(len(infer_set) / (time.perf_counter() - t0))
        print(f"infer run {i}: {rates[-1]:.0f} images/s ({len(infer_set)} images)", flush=True)
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    print(
        json.dumps(
            {
                "backend": "cupy",
                "device": name,
                "preset": params.preset,
                "data": source,
                "neurons": args.neurons,
                "images": len(train_set),
                "ms_per_image": round(statistics.median(runs), 5),
                "ms_per_image_runs": [round(r, 5) for r in runs],
                "infer_images": len(infer_set),
                "infer_images_per_s": round(statistics.median(rates), 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
