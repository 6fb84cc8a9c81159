"""Flags and helpers shared by several verbs."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from estdp.backend import BACKEND_NAMES
from estdp.errors import ConfigError
from estdp.params import DEFAULT_PRESET, PRESETS, NetworkParams, load_params


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="directory with MNIST-format IDX files (.gz or raw); default: $ESTDP_DATA, "
        "else the user cache, downloading and verifying the files there",
    )
    parser.add_argument(
        "--dataset",
        choices=("mnist", "fashion-mnist"),
        default="mnist",
        help="which IDX dataset (default: mnist)",
    )


def add_backend_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        default="auto",
        help="array backend: numpy, native (C kernels), cupy, or auto (cupy with a usable GPU, else native when a C compiler works, else numpy; default)",
    )


def add_params_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=DEFAULT_PRESET,
        help=f"network parameter preset (default: {DEFAULT_PRESET})",
    )
    parser.add_argument(
        "--config", metavar="TOML", default=None, help="TOML file with a [network] table"
    )
    parser.add_argument(
        "--set",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override one network parameter (repeatable), e.g. --set nu_post=0.02",
    )


def params_from_args(args: argparse.Namespace) -> NetworkParams:
    return load_params(args.preset, args.config, args.overrides)


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number >= 1, got 0")
    return value


def positive_seconds(text: str) -> float:
    """A finite number of seconds > 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text}")
    return value


def add_fleet_label_args(group: argparse._ActionsContainer) -> None:
    """``--labels`` and ``--calibrate-images`` of a simulated fleet (simulate, experiment)."""
    from aggregator.calibration import DEFAULT_IMAGES

    group.add_argument(
        "--labels",
        choices=("kept", "federated"),
        default="federated",
        help="labels of the global model: federated (default; the boards measure each "
        "round's global model on their own labelled images and the aggregator pools them "
        "before the next round) or kept (each neuron keeps the label its board gave it)",
    )
    group.add_argument(
        "--calibrate-images",
        type=non_negative_int,
        default=DEFAULT_IMAGES,
        metavar="N",
        help="after a merge that pruned, each board re-measures the merged model's adaptive "
        "thresholds over N of its images before the labels are assigned (estdp aggregator "
        f"--calibrate-images; 0: off; default {DEFAULT_IMAGES})",
    )


def output_path(text: str) -> Path:
    path = Path(text)
    if path.exists() and path.is_dir():
        raise ConfigError(f"{path} is a directory; --out needs a file name")
    if not path.parent.exists():
        raise ConfigError(f"{path.parent} does not exist (directory of --out)")
    return path


def emit_json(record: dict[str, Any]) -> None:
    """Print one JSON line on stdout."""
    sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
    sys.stdout.flush()
