"""Speed (and memory) of the merge: concatenate, similarity, selection, removal.

    python benchmarks/bench_merge.py --models 5 --per-model 100 --target 300 --repeat 9
    python benchmarks/bench_merge.py --models 100 --per-model 100 --target 3000 \\
        --metric mse,cosine,correlation,manhattan --repeat 3 --memory
    python benchmarks/bench_merge.py --inputs a.estdp b.estdp ... --target 300

Sub-models are ``--inputs`` files, or ``--models`` x ``--per-model`` neurons of
*trained-like* weights (default): each neuron is the mean of three random MNIST training
images (``--data``, default ../shared/data/mnist) raised to the power 1.5 plus 5% uniform
background, normalised to sum 78.4 within [0, 1] like Diehl & Cook's weights; or
``--weights random`` (uniform [0, 0.3)). Each metric is merged ``--repeat`` times and the
median of each stage is reported. With ``--memory`` each metric also runs once in a
fresh child process that reports its peak resident memory (``VmHWM``) and the peak
of memory traced by ``tracemalloc`` during the merge (NumPy's arrays included).

Prints one JSON line per metric (metric, neurons, target, seconds per stage, medians);
the last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _memory import vm_hwm_mib

from aggregator.merge import merge
from aggregator.removal import RULES
from aggregator.similarity import METRICS
from estdp.backend import resolve_backend
from estdp.model import Provenance, SubModel, load_model
from estdp.params import NetworkParams

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def trained_like(n: int, rng: np.random.Generator, data: Path | None) -> np.ndarray:
    """(784, n) float32 weights that look trained (see the module docstring)."""
    if data is not None and (data / "train-images-idx3-ubyte.gz").exists():
        from estdp.datasets import load_mnist

        images, _ = load_mnist("train", data, limit=20000)
        flat = images.reshape(images.shape[0], -1).astype(np.float64) / 255.0
    else:  # no MNIST: smooth random strokes stand in for digits
        flat = np.clip(rng.normal(0.0, 1.0, (2000, 784)), 0, None) ** 2 / 4
    w = np.empty((784, n))
    for j in range(n):
        p = flat[rng.integers(0, flat.shape[0], 3)].mean(axis=0) ** 1.5
        col = p + 0.05 * rng.random(784)
        w[:, j] = np.clip(col * 78.4 / col.sum(), 0.0, 1.0)
    return w.astype(np.float32)


def make_models(args: argparse.Namespace) -> list[SubModel]:
    if args.inputs:
        return [load_model(p) for p in args.inputs]
    rng = np.random.default_rng(args.seed)
    data = Path(args.data) if args.data else None
    total = args.models * args.per_model
    if args.weights == "random":
        weights = rng.random((784, total), dtype=np.float32) * 0.3
    else:
        weights = trained_like(total, rng, data)
    models = []
    for m in range(args.models):
        n = args.per_model
        w = weights[:, m * n : (m + 1) * n]
        models.append(
            SubModel(
                weights=np.ascontiguousarray(w),
                thetas=(rng.random(n) * 0.1).astype(np.float32),
                labels=rng.integers(0, 10, n).astype(np.int16),
                class_rates=rng.random((10, n)).astype(np.float32),
                params=NetworkParams(),
                provenance=Provenance(
                    node_id=f"node-{m}", images_seen=1000, seed=m, sources=(f"node-{m}",)
                ),
                origin_node=np.zeros(n, np.int32),
                origin_index=np.arange(n, dtype=np.int32),
            )
        )
    return models


def run_once(models: list[SubModel], args: argparse.Namespace, metric: str, xp) -> dict:
    t0 = time.perf_counter()
    _, report = merge(models, args.target, metric, rule=args.rule, xp=xp, threads=args.threads)
    total = time.perf_counter() - t0
    record = report.to_dict()
    record["seconds"]["total"] = total
    return record


def child_memory(models_file: str, args: argparse.Namespace, metric: str) -> dict:
    """Peak memory of one merge in a fresh process (see the module docstring)."""
    cmd = [
        sys.executable, __file__, "--child", models_file, "--metric", metric,
        "--target", str(args.target), "--rule", args.rule, "--backend", args.backend,
    ]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_child(args: argparse.Namespace) -> int:
    blob = np.load(args.child)
    weights, sizes = blob["weights"], blob["sizes"]
    models = []
    start = 0
    for m, n in enumerate(sizes.tolist()):
        models.append(
            SubModel(
                weights=np.ascontiguousarray(weights[:, start : start + n]),
                thetas=blob["thetas"][start : start + n],
                labels=blob["labels"][start : start + n],
                class_rates=np.ascontiguousarray(blob["rates"][:, start : start + n]),
                params=NetworkParams(),
                provenance=Provenance(
                    node_id=f"node-{m}", images_seen=1, seed=m, sources=(f"node-{m}",)
                ),
                origin_node=np.zeros(n, np.int32),
                origin_index=np.arange(n, dtype=np.int32),
            )
        )
        start += n
    del weights, blob
    xp = resolve_backend(args.backend).xp
    base_rss = vm_hwm_mib()
    tracemalloc.start()
    merge(models, args.target, args.metric, rule=args.rule, xp=xp, threads=args.threads)
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak_rss = vm_hwm_mib()
    print(json.dumps({"peak_rss_mib": round(peak_rss, 1), "rss_before_mib": round(base_rss, 1),
                      "peak_traced_mib": round(traced / 2**20, 1)}))  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", nargs="*", default=None, help="sub-model files")
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--per-model", type=int, default=100)
    parser.add_argument("--target", type=int, default=300)
    parser.add_argument("--metric", default=",".join(METRICS), help="comma-separated metrics")
    parser.add_argument("--rule", choices=RULES, default="later")
    parser.add_argument("--weights", choices=("trained-like", "random"), default="trained-like")
    parser.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA.exists() else None)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="Manhattan kernel threads")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--memory", action="store_true", help="peak memory in a child process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args)

    xp = resolve_backend(args.backend).xp
    models = make_models(args)
    neurons = sum(m.n_neurons for m in models)
    models_file = None
    if args.memory:
        fd, models_file = tempfile.mkstemp(suffix=".npz")
        os.close(fd)
        np.savez(
            models_file,
            weights=np.concatenate([m.weights for m in models], axis=1),
            thetas=np.concatenate([m.thetas for m in models]),
            labels=np.concatenate([m.labels for m in models]),
            rates=np.concatenate([m.class_rates for m in models], axis=1),
            sizes=np.array([m.n_neurons for m in models]),
        )
    try:
        for metric in args.metric.split(","):
            run_once(models, args, metric, xp)  # warm-up: imports, BLAS threads, caches
            runs = [run_once(models, args, metric, xp) for _ in range(args.repeat)]
            stages = runs[0]["seconds"].keys()
            median = {k: statistics.median(r["seconds"][k] for r in runs) for k in stages}
            work = [
                r["seconds"]["similarity"] + r["seconds"]["selection"] + r["seconds"]["removal"]
                for r in runs
            ]
            record = {
                "bench": "merge",
                "metric": metric,
                "rule": args.rule,
                "neurons": neurons,
                "inputs": len(models),
                "target": args.target,
                "weights": "files" if args.inputs else args.weights,
                "backend": args.backend,
                "repeat": args.repeat,
                "seconds": {k: round(v, 6) for k, v in median.items()},
                "similarity_selection_removal_s": round(statistics.median(work), 6),
                "min_similarity_selection_removal_s": round(min(work), 6),
                "candidates": runs[0]["candidates"],
                "consumed": runs[0]["consumed"],
                "passes": runs[0]["passes"],
                "pairs": runs[0]["pairs"],
            }
            if models_file:
                record.update(child_memory(models_file, args, metric))
            print(json.dumps(record), flush=True)
    finally:
        if models_file:
            os.unlink(models_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
