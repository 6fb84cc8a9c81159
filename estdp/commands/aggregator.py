"""``estdp aggregator``: announce rounds, collect the nodes' updates, merge, publish."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from aggregator.daemon import AggregatorConfig, AggregatorDaemon
from aggregator.state import AggregatorState
from estdp.commands._common import non_negative_int, positive_int
from estdp.commands._mqtt import add_broker_args, event_printer, open_channel, stop_on_sigterm
from estdp.protocol import WEIGHT_ENCODINGS, Limits

# The genetic search ("ga") needs labelled validation images the aggregator does not
# hold; the similarity metrics need nothing but the models.
MERGE_METRICS = ("mse", "manhattan", "cosine", "correlation")

NAME = "aggregator"
HELP = "run the aggregator: rounds of collect, merge and publish over MQTT"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nodes", type=positive_int, required=True, help="updates expected per round (K)"
    )
    parser.add_argument(
        "--target", type=positive_int, required=True, help="neurons of the global model (N)"
    )
    parser.add_argument(
        "--neurons", type=positive_int, default=100, help="neurons each node trains (default 100)"
    )
    parser.add_argument(
        "--metric",
        choices=MERGE_METRICS,
        default="mse",
        help="similarity metric of the merge (default mse)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds from a round's announcement to its deadline (default 600)",
    )
    parser.add_argument(
        "--min-nodes",
        type=positive_int,
        default=None,
        metavar="Q",
        help="updates needed to merge at the deadline (default: all K)",
    )
    parser.add_argument(
        "--rounds", type=non_negative_int, default=1, help="rounds to run (default 1; 0: forever)"
    )
    parser.add_argument(
        "--fresh-each-round",
        action="store_true",
        help="nodes train fresh weights every round instead of continuing from the global model",
    )
    parser.add_argument(
        "--state",
        metavar="DIR",
        default="estdp-aggregator",
        help="state directory; a restart resumes the round stored there (default ./estdp-aggregator)",
    )
    parser.add_argument(
        "--weight-encoding",
        choices=WEIGHT_ENCODINGS,
        default="float32",
        help="weights of the published global model (default float32)",
    )
    parser.add_argument(
        "--client-id", default="aggregator", help="MQTT client id (default aggregator)"
    )
    add_broker_args(parser)


def run(args: argparse.Namespace) -> int:
    stop = stop_on_sigterm()
    config = AggregatorConfig(
        nodes=args.nodes,
        target=args.target,
        neurons_per_node=args.neurons,
        metric=args.metric,
        deadline_s=args.deadline,
        min_nodes=args.min_nodes,
        rounds=args.rounds,
        continue_from_global=not args.fresh_each_round,
        weight_encoding=args.weight_encoding,
        fleet=args.fleet,
    )
    state = AggregatorState(Path(args.state), Limits(max_message_bytes=args.max_message_bytes))
    channel = open_channel(args, args.client_id)
    try:
        daemon = AggregatorDaemon(config, channel, state, events=event_printer(args))
        return daemon.run(stop)
    finally:
        channel.transport.close()
