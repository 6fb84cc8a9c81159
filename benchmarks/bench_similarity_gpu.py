"""GPU speed of all-pairs neuron similarity, per metric, for a merged model of n neurons.

    python benchmarks/bench_similarity_gpu.py [--neurons 10000] [--block 2048] [--repeat 3]

For each metric of the seed (MSE, Manhattan, cosine, Pearson correlation) it computes
the similarity of every pair of neurons of a (784, n) float32 weight matrix in row
blocks of ``--block`` neurons, and keeps each block's ``--keep`` most alike pairs
(``argpartition``), so that memory stays O(n x block): the GPU work of a merge before the
final ranking. MSE, cosine and correlation go through matrix products; Manhattan
through :func:`aggregator.cuda_similarity.manhattan_cuda`. The weights are random with a
trained model's column sums (78.4). Each run prints a line; the last line is one JSON
object with the median seconds per metric. Exits 2 with the reason when no GPU is usable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from aggregator.cuda_similarity import manhattan_cuda
from estdp.backend import resolve_backend
from estdp.errors import EstdpError

# Pairs to smaller-is-more-alike scores, per metric, from a block (a, b) of statistics.
METRICS = ("mse", "manhattan", "cosine", "correlation")


def block_scores(xp, metric: str, w, a0: int, a1: int, stats: dict):
    """(a1 - a0, n) scores, smaller meaning more alike, for neurons a0..a1 against all."""
    k = w.shape[0]
    if metric == "manhattan":
        return manhattan_cuda(w[:, a0:a1], w)
    if metric == "mse":
        dots = w[:, a0:a1].T @ w
        sq = stats["sq"]
        return (sq[a0:a1, None] + sq[None, :] - 2.0 * dots) / k
    if metric == "cosine":
        unit = stats["unit"]
        return -(unit[:, a0:a1].T @ unit)
    centred = stats["centred"]
    return -(centred[:, a0:a1].T @ centred)


def prepare(xp, metric: str, w) -> dict:
    if metric == "mse":
        return {"sq": (w * w).sum(axis=0)}
    if metric == "cosine":
        norms = xp.sqrt((w * w).sum(axis=0))
        return {"unit": w / xp.where(norms == 0, 1, norms)}
    if metric == "correlation":
        c = w - w.mean(axis=0)
        norms = xp.sqrt((c * c).sum(axis=0))
        return {"centred": c / xp.where(norms == 0, 1, norms)}
    return {}


def run_metric(xp, metric: str, w, block: int, keep: int) -> float:
    xp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    n = w.shape[1]
    stats = prepare(xp, metric, w)
    best = []
    for a0 in range(0, n, block):
        a1 = min(n, a0 + block)
        scores = block_scores(xp, metric, w, a0, a1, stats)
        rows = xp.arange(a0, a1)[:, None]
        # Each pair once: only b > a counts.
        scores = xp.where(xp.arange(n)[None, :] > rows, scores, xp.inf)
        flat = scores.ravel()
        take = min(keep, flat.size)
        idx = xp.argpartition(flat, take - 1)[:take]
        best.append((flat[idx], idx + a0 * n))
    values = xp.concatenate([v for v, _ in best])
    xp.argpartition(values, min(keep, values.size) - 1)
    xp.cuda.Device().synchronize()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=10000)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--keep", type=int, default=7000, help="candidate pairs kept per block")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        xp = resolve_backend("cupy").xp
    except EstdpError as exc:
        print(f"bench_similarity_gpu: {exc}", file=sys.stderr)
        return 2
    host = np.random.default_rng(args.seed).random((784, args.neurons), dtype=np.float32)
    host *= np.float32(78.4) / host.sum(axis=0)
    w = xp.asarray(host)
    results = {}
    for metric in METRICS:
        run_metric(xp, metric, w[:, : min(256, args.neurons)], args.block, args.keep)  # warm up
        times = []
        for i in range(args.repeat):
            times.append(run_metric(xp, metric, w, args.block, args.keep))
            print(f"{metric} run {i}: {times[-1]:.4f} s ({args.neurons} neurons)", flush=True)
        results[metric] = round(statistics.median(times), 5)
    print(
        json.dumps(
            {
                "backend": "cupy",
                "neurons": args.neurons,
                "block": args.block,
                "seconds": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
