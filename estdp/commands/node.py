"""``estdp node``: an edge node that trains on its local data in the fleet's rounds."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np

from edge_node.daemon import LocalTrainer, NodeConfig, NodeDaemon, ensure_state_dir
from estdp.backend import resolve_backend
from estdp.commands._common import (
    add_backend_arg,
    add_data_args,
    add_params_args,
    non_negative_int,
    params_from_args,
    positive_int,
)
from estdp.commands._mqtt import (
    add_broker_args,
    event_printer,
    open_channel,
    stop_on_sigterm,
    stop_reason,
)
from estdp.errors import ConfigError
from estdp.protocol import WEIGHT_ENCODINGS
from estdp.transport import ConnectStopped

NAME = "node"
HELP = "run an edge node: train on local data in each round, install the global model"

log = logging.getLogger(__name__)


def shard_spec(text: str) -> tuple[int, int]:
    """``I/N``: the I-th (0-based) of N equal contiguous parts of the loaded images."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected INDEX/COUNT such as 0/5, got {text!r}"
        ) from None
    if count < 1:
        raise argparse.ArgumentTypeError(
            f"the shard count (after the /) must be >= 1, got {text!r}"
        )
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(
            f"shard index must be in 0..{count - 1} for {count} shard(s), got {text!r}"
        )
    return index, count


def default_state_dir(fleet: str, node_id: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "estdp" / fleet / node_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node-id", required=True, help="this node's id (letters, digits, _ . -)")
    parser.add_argument(
        "--images", type=positive_int, default=None, help="training images to load (default: all)"
    )
    parser.add_argument(
        "--offset", type=non_negative_int, default=0, help="index of the first training image"
    )
    parser.add_argument(
        "--shard",
        type=shard_spec,
        default=None,
        metavar="I/N",
        help="train on the I-th of N equal contiguous parts of the loaded images",
    )
    parser.add_argument(
        "--test-images",
        type=non_negative_int,
        default=1000,
        help="test images for evaluating each global model (default 1000; 0: no evaluation)",
    )
    parser.add_argument(
        "--neurons",
        type=positive_int,
        default=None,
        help="neurons to train (default: the number the round announces)",
    )
    parser.add_argument(
        "--label-images",
        type=positive_int,
        default=None,
        metavar="N",
        help="measure the label statistics a provisional global model asks for on at most N "
        "of the training images (a seeded random subset; default: all of them)",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--state",
        metavar="DIR",
        default=None,
        help="where the installed global model and the pending update are kept "
        "(default: $XDG_STATE_HOME/estdp/<fleet>/<node-id>)",
    )
    parser.add_argument(
        "--weight-encoding",
        choices=WEIGHT_ENCODINGS,
        default="float32",
        help="weights of published updates: float32 (default), float16 or uint8 (lossy)",
    )
    add_broker_args(parser)
    add_data_args(parser)
    add_backend_arg(parser)
    add_params_args(parser)


def run(args: argparse.Namespace) -> int:
    from estdp.datasets import load_mnist

    stop = stop_on_sigterm()
    params = params_from_args(args)
    state_dir = Path(args.state) if args.state else default_state_dir(args.fleet, args.node_id)
    # Before the data is loaded and the broker contacted: a bad --state fails at once.
    ensure_state_dir(state_dir)
    backend = resolve_backend(args.backend)
    images, labels = load_mnist(
        "train", args.data, args.dataset, limit=args.images, offset=args.offset
    )
    if args.shard is not None:
        index, count = args.shard
        parts = np.array_split(np.arange(images.shape[0]), count)
        images, labels = images[parts[index]], labels[parts[index]]
    if images.shape[0] == 0:
        raise ConfigError("no training images on this node (check --data, --images, --shard)")
    if args.test_images:
        test_images, test_labels = load_mnist(
            "test", args.data, args.dataset, limit=args.test_images
        )
    else:
        test_images, test_labels = images[:0], labels[:0]
    config = NodeConfig(
        node_id=args.node_id,
        fleet=args.fleet,
        state_dir=state_dir,
        neurons=args.neurons,
        weight_encoding=args.weight_encoding,
    )
    trainer = LocalTrainer(
        images,
        labels,
        test_images,
        test_labels,
        params,
        backend,
        node_id=args.node_id,
        seed=args.seed,
        label_images=args.label_images,
    )
    log.info(
        "node %s: %d training and %d test images, state in %s",
        args.node_id,
        images.shape[0],
        test_images.shape[0],
        state_dir,
    )
    events = event_printer(args)
    try:
        channel = open_channel(args, args.node_id, config.will(), stop=stop)
    except ConnectStopped:
        return 0  # a clean stop; open_channel said "stopped"
    try:
        daemon = NodeDaemon(config, channel, trainer, events=events, stop=stop)
        code = daemon.run()
    finally:
        channel.transport.close()
    reason = stop_reason() or "stop requested"
    log.info("node %s: stopped (%s)", args.node_id, reason)
    events(
        {
            "event": "stopped",
            "node": args.node_id,
            "reason": reason,
            "phase": "serving",
            "time_unix": round(time.time(), 3),
        }
    )
    return code
