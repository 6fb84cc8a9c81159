"""``estdp merge``: concatenate sub-models and prune them to a target size by similarity.

Prints the seconds of each stage (concatenate, similarity, selection, removal; labels
and genetic when they run) and, with ``--eval``, the test accuracy of every input and of
the result. Validation (``ga``) and calibration images come from the training split.

``--thresholds N`` runs the merged model with its weights frozen over N of those images
before its labels are assigned, so that only the adaptive thresholds move: neurons merged
from different sub-models compete on one footing again (docs/merge.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import numpy as np

from aggregator.calibration import CALIBRATED_NOTE
from aggregator.genetic import GAConfig
from aggregator.merge import MERGE_METRICS, LabelledImages, calibrate_labels, merge
from aggregator.removal import DEFAULT_RULE, RULES
from estdp.backend import resolve_backend
from estdp.commands._common import (
    add_backend_arg,
    add_data_args,
    emit_json,
    non_negative_int,
    output_path,
    positive_int,
    positive_seconds,
)
from estdp.model import SubModel, load_model, save_model, with_notes

NAME = "merge"
HELP = "merge sub-models into one model of a target size (similarity pruning or genetic search)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL", help="sub-model files (.estdp)")
    parser.add_argument(
        "--target", type=positive_int, required=True, help="neurons of the merged model"
    )
    parser.add_argument(
        "--metric",
        choices=MERGE_METRICS,
        default="mse",
        help="similarity metric, or ga (default mse)",
    )
    parser.add_argument(
        "--rule",
        choices=RULES,
        default=DEFAULT_RULE,
        help="which neuron of a pair goes: later (the later one, as the seed), activity "
        "(the less active; default), theta (the one with the lower adaptive threshold)",
    )
    parser.add_argument("--out", required=True, help="where to write the merged model (.estdp)")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="re-assign the merged model's labels from labelled training images",
    )
    parser.add_argument(
        "--thresholds",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="before the labels, run the merged model frozen over N of the labelled images "
        "so that only its adaptive thresholds adapt (default 0: off)",
    )
    parser.add_argument(
        "--labelled-images",
        type=positive_int,
        default=10000,
        help="training images for --calibrate, --thresholds and ga's validation (default 10000)",
    )
    parser.add_argument(
        "--labelled-offset",
        type=non_negative_int,
        default=50000,
        help="index of the first of those training images (default 50000: the last 10000)",
    )
    parser.add_argument("--eval", action="store_true", help="test accuracy of inputs and result")
    parser.add_argument(
        "--test", type=positive_int, default=10000, help="test images for --eval (default 10000)"
    )
    parser.add_argument(
        "--generations", type=non_negative_int, default=100, help="ga: generations (default 100)"
    )
    parser.add_argument(
        "--population", type=positive_int, default=32, help="ga: population (default 32)"
    )
    parser.add_argument(
        "--time-budget",
        type=positive_seconds,
        default=540.0,
        help="ga: wall-time budget of the whole stage (seeds, simulation, search, verification), seconds (default 540)",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of ga and of input spike trains"
    )
    parser.add_argument("--json", action="store_true", help="print a one-line JSON summary")
    add_data_args(parser)
    add_backend_arg(parser)


def _labelled(args: argparse.Namespace) -> LabelledImages:
    from estdp.datasets import load_mnist

    images, labels = load_mnist(
        "train", args.data, args.dataset, limit=args.labelled_images, offset=args.labelled_offset
    )
    return LabelledImages(images, labels, seed=args.seed)


def _calibrate_thresholds(
    merged: SubModel,
    report: Any,
    labelled: LabelledImages,
    args: argparse.Namespace,
    backend: Any,
) -> tuple[SubModel, Any]:
    """The thresholds-only pass over ``--thresholds`` images, then the labels if asked."""
    from edge_node.workflow import calibrate_thetas

    seconds = dict(report.seconds)
    t0 = time.perf_counter()
    images = labelled.images[: args.thresholds]
    thetas = calibrate_thetas(merged, images, backend, seed=args.seed)
    # The fleet's note, as one node of all the images: <images>/<nodes>.
    notes = {**merged.provenance.notes, CALIBRATED_NOTE: f"{int(images.shape[0])}/1"}
    merged = with_notes(merged, notes, thetas=thetas.astype(np.float32))
    seconds["thresholds"] = time.perf_counter() - t0
    labels = report.labels
    if args.calibrate:
        t1 = time.perf_counter()
        neuron_labels, class_rates = calibrate_labels(merged, labelled, xp=backend.xp)
        merged = dataclasses.replace(merged, labels=neuron_labels, class_rates=class_rates)
        seconds["labels"] = time.perf_counter() - t1
        labels = "calibrated"
    return merged, dataclasses.replace(report, seconds=seconds, labels=labels)


def _accuracy(
    model: SubModel, test: tuple[np.ndarray, np.ndarray], backend: Any, seed: int
) -> dict[str, float]:
    from edge_node.workflow import evaluate_model

    result = evaluate_model(model, test[0], test[1], backend, seed=seed)
    return {
        "all_activity": result.all_activity,
        "proportion_weighting": result.proportion_weighting,
    }


def run(args: argparse.Namespace) -> int:
    out = output_path(args.out)
    backend = resolve_backend(args.backend)
    models = [load_model(path) for path in args.models]
    needs_images = args.calibrate or args.thresholds or args.metric == "ga"
    labelled = _labelled(args) if needs_images else None
    config = GAConfig(
        population=args.population,
        generations=args.generations,
        time_budget_s=args.time_budget,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    merged, report = merge(
        models,
        args.target,
        args.metric,
        rule=args.rule,
        # With --thresholds the labels come after the thresholds, below.
        calibration=labelled if args.calibrate and not args.thresholds else None,
        validation=labelled if args.metric == "ga" else None,
        ga=config,
        xp=backend.xp,
        seed=args.seed,
    )
    if args.thresholds:
        merged, report = _calibrate_thresholds(merged, report, labelled, args, backend)
    total = time.perf_counter() - t0
    save_model(merged, out)
    record: dict[str, Any] = {
        "out": str(out),
        "files": list(args.models),
        "backend": backend.name,
        "seconds_total": round(total, 6),
        **report.to_dict(),
    }
    if args.eval:
        from estdp.datasets import load_mnist

        test = load_mnist("test", args.data, args.dataset, limit=args.test)
        record["accuracy_inputs"] = [_accuracy(m, test, backend, args.seed) for m in models]
        record["accuracy"] = _accuracy(merged, test, backend, args.seed)
        record["test_images"] = int(test[0].shape[0])
    if args.json:
        emit_json(record)
    else:
        _print(record)
    return 0


def _print(record: dict[str, Any]) -> None:
    stages = ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in record["seconds"].items())
    print(
        f"merged {record['inputs']} models ({record['neurons_in']} neurons) into "
        f"{record['neurons_out']} by {record['metric']} (rule {record['rule']}) in "
        f"{record['seconds_total']:.3f} s: {stages}"
    )
    print(
        f"pairs: {record['pairs']} in all, {record['candidates']} selected, "
        f"{record['consumed']} walked, {record['passes']} pass(es); labels {record['labels']}"
    )
    if "genetic" in record:
        g = record["genetic"]
        verified = "" if g["verified"] is None else f", verified {100 * g['verified']:.2f}%"
        print(
            f"genetic search: {g['generations']} generations, {g['evaluations']} keep-sets, "
            f"fitness {100 * g['fitness']:.2f}% (best seed {100 * g['seed_fitness']:.2f}%"
            f"{verified}), stopped by {g['stopped']}"
        )
    if "accuracy" in record:
        for path, acc in zip(record["files"], record["accuracy_inputs"], strict=True):
            print(f"  {path}: {_fmt(acc)}")
        print(f"  merged: {_fmt(record['accuracy'])} on {record['test_images']} test images")
    print(f"saved {record['out']}")


def _fmt(acc: dict[str, float]) -> str:
    return (
        f"all-activity {100 * acc['all_activity']:.2f}%, "
        f"proportion weighting {100 * acc['proportion_weighting']:.2f}%"
    )
