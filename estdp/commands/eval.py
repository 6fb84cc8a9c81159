"""``estdp eval``: accuracy of a saved model on the test set, by both classification schemes."""

from __future__ import annotations

import argparse

from edge_node.workflow import evaluate_model
from estdp.backend import resolve_backend
from estdp.commands._common import (
    add_backend_arg,
    add_data_args,
    emit_json,
    non_negative_int,
    positive_int,
)
from estdp.datasets import load_mnist
from estdp.model import load_model

NAME = "eval"
HELP = "evaluate a saved model on the test images (all-activity and proportion weighting)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model file (.estdp)")
    parser.add_argument(
        "--test", type=positive_int, default=10000, help="test images (default: all 10000)"
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the input spike trains"
    )
    parser.add_argument("--json", action="store_true", help="print a one-line JSON summary")
    add_data_args(parser)
    add_backend_arg(parser)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    backend = resolve_backend(args.backend)
    images, labels = load_mnist("test", args.data, args.dataset, limit=args.test)
    result = evaluate_model(model, images, labels, backend, seed=args.seed)
    record = {
        "model": args.model,
        "neurons": model.n_neurons,
        "backend": backend.name,
        **result.to_dict(),
    }
    if args.json:
        emit_json(record)
    else:
        print(
            f"{args.model}: {model.n_neurons} neurons, {result.n_images} test images: "
            f"all-activity {100 * result.all_activity:.2f}%, "
            f"proportion weighting {100 * result.proportion_weighting:.2f}% "
            f"({result.seconds:.1f} s)"
        )
    return 0
