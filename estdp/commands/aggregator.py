"""``estdp aggregator``: announce rounds, collect the nodes' updates, merge, publish.

With ``--upstream-fleet`` it is a *site* aggregator (hierarchical aggregation): its
rounds follow the root fleet's, its merge goes upstream as node ``--site-id`` of the
root fleet, and the root's global model comes back down to its own nodes
(:mod:`aggregator.daemon`, "Upstream mode").
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from aggregator.calibration import DEFAULT_IMAGES as DEFAULT_CALIBRATE_IMAGES
from aggregator.daemon import (
    CONTINUED_MERGES,
    LABEL_MODES,
    AggregatorConfig,
    AggregatorDaemon,
    UpstreamConfig,
)
from aggregator.removal import DEFAULT_RULE, RULES
from aggregator.state import AggregatorState
from estdp.commands._common import non_negative_int, positive_int, positive_seconds
from estdp.commands._mqtt import (
    add_broker_args,
    event_printer,
    open_channel,
    stop_on_sigterm,
    stop_reason,
    transport_config,
)
from estdp.errors import ConfigError
from estdp.protocol import WEIGHT_ENCODINGS, Limits
from estdp.transport import ConnectStopped, parse_broker_url

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
        "--rule",
        choices=RULES,
        default=DEFAULT_RULE,
        help=f"which neuron of a similar pair the merge removes (default {DEFAULT_RULE}; "
        "see estdp merge --help)",
    )
    parser.add_argument(
        "--continued-merge",
        choices=CONTINUED_MERGES,
        default="average",
        help="updates that all continued the same global model (rounds after the first): "
        "average them neuron by neuron, or concatenate and prune like the first round "
        "(default average)",
    )
    parser.add_argument(
        "--labels",
        choices=LABEL_MODES,
        default="federated",
        help="federated (default): after each merge, the nodes measure the global model on "
        "their labelled images and its labels are re-assigned from all of them before the "
        "next round; kept: the labels the sub-models came with (see docs/merge.md). A site "
        "aggregator (--upstream-fleet) follows its root's global model instead",
    )
    parser.add_argument(
        "--label-deadline",
        type=positive_seconds,
        default=120.0,
        metavar="S",
        help="seconds the labelling phase waits for the nodes' label statistics (default 120)",
    )
    parser.add_argument(
        "--calibrate-images",
        type=non_negative_int,
        default=DEFAULT_CALIBRATE_IMAGES,
        metavar="N",
        help="after a merge that pruned (the first round), each node re-measures the "
        "merged model's adaptive thresholds with a thresholds-only pass over N of its "
        "images (weights frozen), and the labels are assigned with their average; 0: off "
        f"(default {DEFAULT_CALIBRATE_IMAGES}; needs --labels federated; not estdp merge's "
        "--calibrate, which re-assigns labels only; see docs/merge.md)",
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
    up = parser.add_argument_group(
        "upstream (a site aggregator of a hierarchy)",
        "Follow the rounds of a root fleet, forward the site model to it as node --site-id, "
        "and pass its global model down. The upstream connection has its own identity: to "
        "the root, the site is a node, so its certificate's CN (or username) is the site id.",
    )
    up.add_argument(
        "--upstream-fleet",
        metavar="FLEET",
        default=None,
        help="the root fleet; turns on upstream mode",
    )
    up.add_argument(
        "--site-id",
        default=None,
        help="this site's node id in the root fleet (default: --fleet)",
    )
    up.add_argument(
        "--upstream-broker",
        metavar="URL",
        default=None,
        help="the root fleet's broker (default: --broker, e.g. a site broker bridged to it)",
    )
    up.add_argument(
        "--upstream-ca",
        metavar="PEM",
        default=None,
        help="CA of the upstream broker (default --ca)",
    )
    up.add_argument(
        "--upstream-cert", metavar="PEM", default=None, help="upstream client certificate"
    )
    up.add_argument("--upstream-key", metavar="PEM", default=None, help="upstream client key")
    up.add_argument("--upstream-username", default=None, help="upstream MQTT username")
    up.add_argument(
        "--upstream-client-id",
        default=None,
        help="MQTT client id of the upstream connection (default: the site id)",
    )
    up.add_argument(
        "--upstream-password-file", metavar="FILE", default=None, help="upstream MQTT password"
    )


UPSTREAM_ONLY = (
    "site_id",
    "upstream_broker",
    "upstream_ca",
    "upstream_cert",
    "upstream_key",
    "upstream_username",
    "upstream_client_id",
    "upstream_password_file",
)


def upstream_config(args: argparse.Namespace) -> UpstreamConfig | None:
    """The upstream settings from the flags (None without ``--upstream-fleet``)."""
    if args.upstream_fleet is None:
        stray = [f"--{name.replace('_', '-')}" for name in UPSTREAM_ONLY if getattr(args, name)]
        if stray:
            raise ConfigError(f"{', '.join(stray)}: only with --upstream-fleet (upstream mode)")
        return None
    return UpstreamConfig(site_id=args.site_id or args.fleet, fleet=args.upstream_fleet)


def upstream_args(args: argparse.Namespace, upstream: UpstreamConfig) -> argparse.Namespace:
    """The flags of the upstream connection, as the broker flags ``open_channel`` reads."""
    return argparse.Namespace(
        **{
            **vars(args),
            "broker": args.upstream_broker or args.broker,
            "fleet": upstream.fleet,
            "ca": args.upstream_ca or args.ca,
            "cert": args.upstream_cert,
            "key": args.upstream_key,
            "username": args.upstream_username,
            "password_file": args.upstream_password_file,
            "client_id": args.upstream_client_id or upstream.site_id,
        }
    )


def check_upstream(args: argparse.Namespace, up_args: argparse.Namespace) -> None:
    """Refuse bad upstream flags before any connection is made."""
    transport_config(up_args, up_args.client_id)  # URL, files, ids
    same_broker = parse_broker_url(up_args.broker) == parse_broker_url(args.broker)
    if same_broker and args.client_id == up_args.client_id:
        # One broker, two connections: the same client id would knock one off.
        raise ConfigError(
            f"--client-id {args.client_id} would clash with the upstream client id; "
            "give one another (--upstream-client-id)"
        )


def run(args: argparse.Namespace) -> int:
    stop = stop_on_sigterm()
    upstream = upstream_config(args)
    config = AggregatorConfig(
        nodes=args.nodes,
        target=args.target,
        neurons_per_node=args.neurons,
        metric=args.metric,
        deadline_s=args.deadline,
        min_nodes=args.min_nodes,
        rounds=args.rounds,
        continue_from_global=not args.fresh_each_round,
        continued_merge=args.continued_merge,
        rule=args.rule,
        weight_encoding=args.weight_encoding,
        fleet=args.fleet,
        upstream=upstream,
        labels=args.labels,
        label_deadline_s=args.label_deadline,
        calibrate_images=args.calibrate_images,
    )
    up_args = None
    if upstream is not None:
        up_args = upstream_args(args, upstream)
        check_upstream(args, up_args)
    state = AggregatorState(Path(args.state), Limits(max_message_bytes=args.max_message_bytes))
    events = event_printer(args)
    try:
        channel = open_channel(args, args.client_id)
    except ConnectStopped:
        return 0  # a clean stop; open_channel said "stopped"
    up_channel = None
    try:
        if upstream is not None and up_args is not None:
            try:
                up_channel = open_channel(up_args, up_args.client_id, upstream.will())
            except ConnectStopped:
                return 0
        daemon = AggregatorDaemon(config, channel, state, events=events, upstream=up_channel)
        code = daemon.run(stop)
    finally:
        if up_channel is not None:
            up_channel.transport.close()
        channel.transport.close()
    reason = stop_reason() or ("stop requested" if stop.is_set() else "rounds done")
    log.info("aggregator: stopped (%s)", reason)
    events(
        {
            "event": "stopped",
            "reason": reason,
            "phase": "serving",
            "time_unix": round(time.time(), 3),
        }
    )
    return code
