"""``estdp experiment NAME``: reproduce one of the seed's experiments (table, plot, docs)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from estdp.commands._common import (
    add_backend_arg,
    add_data_args,
    add_fleet_label_args,
    add_params_args,
    emit_json,
    non_negative_int,
    positive_int,
)

if TYPE_CHECKING:
    from firmware_sim.experiments import ExperimentConfig

NAME = "experiment"
HELP = "reproduce an experiment of the slides: compression, merge-time, ensemble, ga, non-iid"

NAMES = ("compression", "merge-time", "ensemble", "ga", "non-iid")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=NAMES, help="which experiment")
    parser.add_argument(
        "--out",
        default="reports/experiments",
        help="report root; NAME/ goes under it (default reports/experiments)",
    )
    parser.add_argument(
        "--docs",
        default="docs/results.md",
        help="results page whose '## Simulation' section gets the table (default docs/results.md)",
    )
    parser.add_argument("--no-docs", action="store_true", help="leave the results page alone")
    parser.add_argument(
        "--images", type=positive_int, default=30000, help="training pool (default 30000)"
    )
    parser.add_argument(
        "--test", type=positive_int, default=10000, help="test images (default 10000)"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--ga-seconds", type=float, default=540.0, help="time budget of the genetic search"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every neuron count by this (e.g. 0.1 for a quick look; default 1)",
    )
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=os.cpu_count() or 1,
        help="processes that score models (default: the number of CPUs)",
    )
    parser.add_argument("--broker", default=None, help="use this broker (mqtt://HOST:PORT)")
    add_fleet_label_args(parser.add_argument_group("fleet experiments (ensemble, non-iid)"))
    parser.add_argument("--json", action="store_true", help="print a one-line JSON summary last")
    parser.add_argument("--quiet", action="store_true", help="no live display")
    add_data_args(parser)
    add_backend_arg(parser)
    add_params_args(parser)


def experiment_config(args: argparse.Namespace) -> ExperimentConfig:
    """The :class:`~firmware_sim.experiments.ExperimentConfig` that ``args`` ask for."""
    from firmware_sim.experiments import ExperimentConfig

    return ExperimentConfig(
        out_dir=Path(args.out),
        data_dir=args.data,
        dataset=args.dataset,
        backend=args.backend,
        seed=args.seed,
        images=args.images,
        test_images=args.test,
        preset=args.preset,
        config_path=args.config,
        overrides=tuple(args.overrides),
        broker_url=args.broker,
        docs=None if args.no_docs else Path(args.docs),
        ga_seconds=args.ga_seconds,
        scale=args.scale,
        jobs=args.jobs,
        labels=args.labels,
        calibrate_images=args.calibrate_images,
    )


def run(args: argparse.Namespace) -> int:
    from firmware_sim.display import Display
    from firmware_sim.experiments import run_experiment
    from firmware_sim.report import format_generic

    config = experiment_config(args)
    results = run_experiment(args.name, config, Display(quiet=args.quiet))
    for table in results.get("tables", []):
        print(f"{table['title']}:")
        print(format_generic(table["rows"]))
    print(f"report: {Path(args.out) / args.name / 'report.md'}")
    if args.json:
        emit_json(
            {
                "experiment": args.name,
                "seconds": round(results["seconds"], 2),
                "report": str(Path(args.out) / args.name),
                "tables": results.get("tables", []),
            }
        )
    return 0
