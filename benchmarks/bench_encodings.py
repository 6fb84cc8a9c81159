"""Size and accuracy cost of each weight encoding of the wire protocol.

A model (``--model FILE``, or one trained here on ``--images`` MNIST images) is sent
through :func:`estdp.protocol.encode` / :func:`~estdp.protocol.decode_global` with each
weight encoding (float32, float16, uint8), and each decoded copy is evaluated on the same
test images with the same input spike trains (same seed), so an accuracy difference is
the encoding's alone. Reports message bytes, the largest weight error, and both accuracies.

    python benchmarks/bench_encodings.py --data ../shared/data/mnist --neurons 100 \\
        --images 2000 --test 1000

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import numpy as np

from estdp import protocol
from estdp.backend import resolve_backend
from estdp.model import load_model
from estdp.params import load_params
from estdp.protocol import GlobalModel


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a saved model; default: train one here")
    parser.add_argument("--data", default=None, help="MNIST IDX directory")
    parser.add_argument("--neurons", type=int, default=100)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from edge_node.workflow import evaluate_model, train_model  # the engine
    from estdp.datasets import load_mnist

    backend = resolve_backend(args.backend)
    if args.model:
        model = load_model(args.model)
        train_s = 0.0
    else:
        images, labels = load_mnist("train", args.data, limit=args.images)
        t0 = time.perf_counter()
        model = train_model(
            images, labels, args.neurons, load_params("bindsnet"), backend, seed=args.seed
        ).model
        train_s = time.perf_counter() - t0
    test_images, test_labels = load_mnist("test", args.data, limit=args.test)

    results = {}
    for encoding in protocol.WEIGHT_ENCODINGS:
        payload = protocol.encode(GlobalModel(1, model, ("bench",)), weight_encoding=encoding)
        decoded = protocol.decode_global(payload).model
        ev = evaluate_model(decoded, test_images, test_labels, backend, seed=args.seed + 1)
        results[encoding] = {
            "bytes": len(payload),
            "max_abs_weight_error": float(np.abs(decoded.weights - model.weights).max()),
            "accuracy_all_activity": ev.all_activity,
            "accuracy_proportion_weighting": ev.proportion_weighting,
        }
        print(json.dumps({"encoding": encoding, **results[encoding]}))
    base = results["float32"]
    summary = {
        "benchmark": "encodings",
        "neurons": model.n_neurons,
        "train_images": args.images if not args.model else None,
        "train_seconds": round(train_s, 2),
        "test_images": int(test_images.shape[0]),
        "backend": backend.name,
        **{
            f"{enc}_{key}": value
            for enc, res in results.items()
            for key, value in (
                ("bytes", res["bytes"]),
                ("accuracy", res["accuracy_all_activity"]),
                (
                    "accuracy_cost",
                    round(base["accuracy_all_activity"] - res["accuracy_all_activity"], 4),
                ),
            )
        },
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
