"""``estdp simulate``: a whole fleet on one machine, ending with the seed's comparison table.

Runs the real aggregator and node daemons, each board its own process, over a real MQTT
broker (an embedded one unless ``--broker`` is given), with a baseline model trained in
parallel; then scores every model on the test set and writes a report directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from aggregator.removal import DEFAULT_RULE, RULES
from estdp.commands._common import (
    add_backend_arg,
    add_data_args,
    add_fleet_label_args,
    add_params_args,
    emit_json,
    non_negative_int,
    positive_int,
    positive_seconds,
)
from estdp.errors import ConfigError

if TYPE_CHECKING:
    from firmware_sim.fleet import FleetConfig

NAME = "simulate"
HELP = "simulate a fleet of edge boards on this machine and compare with a single model"

METRICS = ("mse", "manhattan", "cosine", "correlation")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    fleet = parser.add_argument_group("fleet")
    fleet.add_argument("--nodes", type=positive_int, default=5, help="simulated boards (default 5)")
    fleet.add_argument(
        "--neurons", type=positive_int, default=100, help="neurons per board (default 100)"
    )
    fleet.add_argument(
        "--target", type=positive_int, default=300, help="neurons of the merged model (default 300)"
    )
    fleet.add_argument(
        "--metric", choices=METRICS, default="mse", help="similarity metric (default mse)"
    )
    fleet.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="rounds; after the first, boards continue from the global model (default 1)",
    )
    fleet.add_argument(
        "--rule",
        choices=RULES,
        default=DEFAULT_RULE,
        help=f"which neuron of a similar pair the merge removes (default {DEFAULT_RULE})",
    )
    fleet.add_argument(
        "--continued-merge",
        choices=("average", "prune"),
        default="average",
        help="how the aggregator merges the updates of rounds after the first, which all "
        "continued the same global model: average them neuron by neuron, or concatenate "
        "and prune (default average)",
    )
    add_fleet_label_args(fleet)
    fleet.add_argument(
        "--label-deadline",
        type=positive_seconds,
        default=None,
        help="seconds the aggregator waits for the boards' label statistics "
        "(default: from the workload)",
    )
    fleet.add_argument(
        "--sites",
        type=positive_int,
        default=1,
        help="hierarchical aggregation: split the boards over this many sites, each with "
        "its own fleet and site aggregator forwarding to a root aggregator (default 1: flat)",
    )
    fleet.add_argument(
        "--site-target",
        type=positive_int,
        default=None,
        help="neurons of each site model (default: twice the site's share of --target, "
        "at most what its boards hold)",
    )
    fleet.add_argument(
        "--images",
        type=positive_int,
        default=30000,
        help="training pool: the first N training images, split over the boards (default 30000)",
    )
    fleet.add_argument(
        "--offset", type=non_negative_int, default=0, help="index of the first image of the pool"
    )
    fleet.add_argument(
        "--partition",
        default="iid",
        help="iid (default), contiguous, classes:C, dirichlet:ALPHA, unequal:SIGMA, sizes:F1,F2,..",
    )
    fleet.add_argument(
        "--devices",
        default="host",
        help="device profile per board, cycled: host, agx-orin, orin-nx, orin-nano, nano, "
        "custom:SPEED:MEM_MB; NAME*K repeats (e.g. nano*2,agx-orin*3; default host)",
    )
    fleet.add_argument(
        "--network",
        default="lan",
        help="network profile per board, cycled: lan, wifi, lte, flaky, "
        "custom:LAT_MS:JITTER_MS:LOSS[:EVERY_S:FOR_S] (default lan)",
    )
    fleet.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="inject a fault (repeatable): kill-node:2@r1:50%%, restart-node:1@30s+5, "
        "restart-aggregator@r1:arrivals=2 (the root aggregator with --sites), restart-broker@20s",
    )
    fleet.add_argument(
        "--deadline",
        type=positive_seconds,
        default=None,
        help="seconds the aggregator waits for updates in a round (default: from the workload)",
    )
    fleet.add_argument(
        "--min-nodes", type=positive_int, default=None, help="fewest updates a round merges"
    )
    fleet.add_argument("--broker", default=None, help="use this broker (mqtt://HOST:PORT)")
    fleet.add_argument(
        "--broker-kind",
        choices=("amqtt", "mosquitto", "auto"),
        default="amqtt",
        help="embedded broker when no --broker is given (default amqtt)",
    )
    fleet.add_argument(
        "--fleet",
        default=None,
        help="fleet name in the topics (default sim-<time>: unique, so that retained "
        "messages of another run on the same broker cannot mix in)",
    )
    fleet.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    fleet.add_argument(
        "--timeout", type=positive_seconds, default=3600.0, help="give up after this many seconds"
    )
    score = parser.add_argument_group("baseline, scoring and report")
    score.add_argument(
        "--baseline-neurons",
        type=non_negative_int,
        default=None,
        help="neurons of the baseline model trained on the whole pool (default: --target; 0: none)",
    )
    score.add_argument(
        "--test", type=positive_int, default=10000, help="test images (default all 10000)"
    )
    score.add_argument(
        "--node-test",
        type=non_negative_int,
        default=200,
        help="test images each board evaluates the global model on, as a real board "
        "would (default 200; 0: none; the report scores every model on --test)",
    )
    score.add_argument(
        "--no-curve", action="store_true", help="skip the compression curve (accuracy vs removed)"
    )
    score.add_argument(
        "--curve-points",
        type=positive_int,
        default=4,
        help="removal counts on the compression curve besides 0 (default 4)",
    )
    score.add_argument(
        "--curve-test",
        type=non_negative_int,
        default=1000,
        help="test images for the compression curve (default 1000, an indicative curve that "
        "keeps the run short; 0: all of --test; the full curve: estdp experiment compression)",
    )
    score.add_argument(
        "--jobs",
        type=positive_int,
        default=os.cpu_count() or 1,
        help="processes that score models (default: the number of CPUs)",
    )
    score.add_argument(
        "--out", default=None, help="report directory (default reports/simulate-YYYYmmdd-HHMMSS)"
    )
    score.add_argument("--json", action="store_true", help="print a one-line JSON summary last")
    score.add_argument("--quiet", action="store_true", help="no live display")
    add_data_args(parser)
    add_backend_arg(parser)
    add_params_args(parser)


def fleet_config(args: argparse.Namespace, run_dir: Path) -> FleetConfig:
    """A :class:`~firmware_sim.fleet.FleetConfig` from the parsed flags."""
    from firmware_sim.faults import parse_fault
    from firmware_sim.fleet import FleetConfig
    from firmware_sim.partitions import parse_spec
    from firmware_sim.profiles import expand_list, parse_device, parse_network

    devices = tuple(parse_device(d) for d in expand_list(args.devices, args.nodes))
    networks = tuple(parse_network(n) for n in expand_list(args.network, args.nodes))
    baseline = args.target if args.baseline_neurons is None else args.baseline_neurons
    config = FleetConfig(
        run_dir=run_dir,
        nodes=args.nodes,
        neurons=args.neurons,
        target=args.target,
        metric=args.metric,
        rounds=args.rounds,
        continued_merge=args.continued_merge,
        rule=args.rule,
        labels=args.labels,
        label_deadline_s=args.label_deadline,
        calibrate_images=args.calibrate_images,
        images=args.images,
        offset=args.offset,
        partition=parse_spec(args.partition),
        devices=devices,
        networks=networks,
        deadline_s=args.deadline,
        min_nodes=args.min_nodes,
        backend=args.backend,
        seed=args.seed,
        broker_url=args.broker,
        broker_kind=args.broker_kind,
        fleet=args.fleet or f"sim-{time.strftime('%Y%m%d%H%M%S')}",
        baseline_neurons=baseline,
        data_dir=args.data,
        dataset=args.dataset,
        preset=args.preset,
        config_path=args.config,
        overrides=tuple(args.overrides),
        timeout_s=args.timeout,
        node_test_images=args.node_test,
        sites=args.sites,
        site_target=args.site_target,
    )
    faults = tuple(parse_fault(f, config.node_ids()) for f in args.fault)
    if args.broker and any(f.action == "restart-broker" for f in faults):
        raise ConfigError("restart-broker needs the embedded broker; drop --broker")
    if args.min_nodes is not None and args.min_nodes > args.nodes:
        raise ConfigError(f"--min-nodes {args.min_nodes} is more than --nodes {args.nodes}")
    if args.images < args.nodes:
        raise ConfigError(f"--images {args.images} cannot be split over {args.nodes} nodes")
    return dataclasses.replace(config, faults=faults)


def run(args: argparse.Namespace) -> int:
    from firmware_sim.display import Display
    from firmware_sim.report import format_table
    from firmware_sim.simulation import ScoringConfig, run_simulation

    run_dir = Path(args.out or f"reports/simulate-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir} exists and is not empty; choose another --out")
    config = fleet_config(args, run_dir)
    scoring = ScoringConfig(
        test_images=args.test,
        curve=not args.no_curve,
        curve_points=args.curve_points,
        curve_test_images=args.curve_test or None,
        jobs=args.jobs,
    )
    display = Display(quiet=args.quiet)
    results = run_simulation(config, scoring, display=display, title="estdp simulate")
    models = results.get("models", [])
    print(format_table(models))
    if results.get("labels"):
        print(f"labels of the global model: {results['labels']}")
    if results.get("speedup"):
        print(f"training speed-up against the baseline: {results['speedup']:.2f}x")
    for r in results.get("rounds", []) if len(results.get("rounds", [])) > 1 else []:
        print(f"round {r['round']}: {r['neurons']} neurons, accuracy {100 * r['accuracy']:.2f}%")
    print(f"report: {run_dir / 'report.md'}")
    if args.json:
        compressed = next((m for m in reversed(models) if m["kind"] == "compressed"), None)
        baseline = next((m for m in models if m["kind"] == "baseline"), None)
        emit_json(
            {
                "report": str(run_dir),
                "seconds": round(results.get("total_seconds", 0.0), 2),
                "fleet_seconds": round(results.get("fleet_seconds", 0.0), 2),
                "accuracy_compressed": compressed["accuracy"] if compressed else None,
                "accuracy_baseline": baseline["accuracy"] if baseline else None,
                "speedup": results.get("speedup"),
                "labels": results.get("labels"),
                "rounds": [
                    {"round": r["round"], "accuracy": r["accuracy"]}
                    for r in results.get("rounds", [])
                ],
                "models": [
                    {k: m.get(k) for k in ("model", "kind", "neurons", "accuracy", "path")}
                    for m in models
                ],
            }
        )
    return 0 if results.get("rounds") else 1
