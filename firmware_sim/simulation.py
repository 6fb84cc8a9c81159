"""One simulation from start to report: data, fleet, scoring, report.

:func:`run_simulation` is what ``estdp simulate`` runs and what the ``ensemble`` and
``non-iid`` experiments run for each of their configurations:

1. load the training pool (the first ``images`` training images from ``offset``) and the
   test set; partition the pool and write each board's data directory;
2. run the fleet (:class:`firmware_sim.fleet.Fleet`): broker, aggregator, boards and the
   baseline, each its own process, until the final global model of the last round
   arrives (with federated labels, the one published again after the labelling phase);
3. score on the test set, with ``estdp eval``'s code and seed: every sub-model of the last
   round, their concatenation ("merged"), the final global model of every round
   ("compressed", whose labels are those the fleet ends the round with), and the baseline; the compression curve of the merged model for the four metrics, and
   the merge time of each metric on the last round's sub-models;
4. write results.json, report.md and the plots into the report directory.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from estdp.backend import resolve_backend
from estdp.datasets import load_mnist
from estdp.errors import ConfigError
from estdp.model import load_model, save_model
from firmware_sim import evaluation, report
from firmware_sim.display import Display
from firmware_sim.fleet import Fleet, FleetConfig, FleetOutcome

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringConfig:
    """What to measure after the fleet has run."""

    test_images: int = 10000
    curve: bool = True
    curve_points: int = 4  # removal counts after 0, evenly spaced up to the run's removal
    curve_test_images: int | None = 1000  # None: all test_images
    merge_time_repeats: int = 3
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)  # scoring processes


def load_data(
    config: FleetConfig, test_images: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The training pool and the test set (the DataError of a missing set says how to fix it)."""
    images, labels = load_mnist(
        "train", config.data_dir, config.dataset, limit=config.images, offset=config.offset
    )
    if images.shape[0] < config.nodes:
        raise ConfigError(
            f"{images.shape[0]} training images cannot be split over {config.nodes} nodes"
        )
    test_x, test_y = load_mnist("test", config.data_dir, config.dataset, limit=test_images)
    return images, labels, test_x, test_y


def run_simulation(
    config: FleetConfig,
    scoring: ScoringConfig,
    *,
    display: Display | None = None,
    command: str | None = None,
    title: str = "Simulation",
) -> dict[str, Any]:
    """Run one simulation end to end and write its report into ``config.run_dir``.

    Returns
    -------
    dict
        The results (also written to ``results.json``).
    """
    display = display or Display(quiet=True)
    t_start = time.perf_counter()
    pool_x, pool_y, test_x, test_y = load_data(config, scoring.test_images)
    if pool_x.shape[0] < config.images:
        config = replace(config, images=int(pool_x.shape[0]))
    fleet = Fleet(config, display)
    fleet.prepare_data(pool_x, pool_y, (test_x, test_y))
    del pool_x
    display.message(
        f"simulating {config.nodes} nodes x {config.neurons} neurons -> {config.target} "
        f"({config.metric}, {config.partition}, {config.rounds} round(s)) on "
        f"{config.images} images; reports in {config.run_dir}"
    )
    try:
        outcome = fleet.run()
        fleet_seconds = time.perf_counter() - t_start
        display.message(
            f"fleet done in {fleet_seconds:.1f} s; scoring on {test_x.shape[0]} test images"
        )
        results = score_run(config, scoring, fleet, outcome, test_x, test_y, display)
    finally:
        fleet.close()
    results.update(
        title=title,
        command=command or shlex.join(["estdp", *sys.argv[1:]]),
        fleet_seconds=fleet_seconds,
        total_seconds=time.perf_counter() - t_start,
    )
    global_weights = None
    if outcome.round_ids:
        global_weights = load_model(outcome.globals_[outcome.round_ids[-1]]).weights
    report.write_report(results, config.run_dir, global_weights)
    return results


def _config_dict(config: FleetConfig, scoring: ScoringConfig) -> dict[str, Any]:
    return {
        "nodes": config.nodes,
        "neurons_per_node": config.neurons,
        "target": config.target,
        "metric": config.metric,
        "labels": config.labels,
        "rounds": config.rounds,
        "images": config.images,
        "offset": config.offset,
        "partition": str(config.partition),
        "devices": [d.name for d in config.devices],
        "networks": [n.name for n in config.networks],
        "faults": [str(f) for f in config.faults],
        "backend": config.backend,
        "seed": config.seed,
        "baseline_neurons": config.baseline_neurons,
        "preset": config.preset,
        "overrides": list(config.overrides),
        "test_images": scoring.test_images,
        "sites": config.sites,
        "site_targets": {s: config.site_target_for(s) for s in config.site_ids()},
    }


def _row(scored: evaluation.Scored, kind: str, path: Path | None, **extra: Any) -> dict[str, Any]:
    return {**scored.to_dict(), "kind": kind, "path": str(path) if path else None, **extra}


def score_run(
    config: FleetConfig,
    scoring: ScoringConfig,
    fleet: Fleet,
    outcome: FleetOutcome,
    test_x: np.ndarray,
    test_y: np.ndarray,
    display: Display,
) -> dict[str, Any]:
    """Scores, curve and merge times of a finished fleet run, as the results dict.

    Every score runs in a :class:`~firmware_sim.evaluation.ScorePool` while the baseline
    (if any) finishes its training; the baseline is scored last.
    """
    backend = resolve_backend(config.backend)
    rounds = outcome.round_ids
    results: dict[str, Any] = {
        "config": _config_dict(config, scoring),
        "broker": outcome.broker,
        "shards": {
            n: {"images": outcome.shard_sizes[n], "classes": outcome.class_counts[n]}
            for n in outcome.node_ids
        },
        "faults_fired": outcome.faults_fired,
        "notes": [],
    }
    if config.hierarchical:
        results["sites"] = outcome.sites
        results["notes"].append(
            "hierarchical aggregation: each site-N row is that site aggregator's model of the "
            "last round (its boards merged); 'merged' concatenates every board's sub-model; "
            "'compressed' is the root's global model, merged from the site models"
        )
    last = rounds[-1] if rounds else None
    updates = outcome.updates.get(last, {}) if last is not None else {}
    subs = {node: load_model(path) for node, path in sorted(updates.items())}
    device = outcome.device_seconds.get(last, {}) if last is not None else {}
    wall = outcome.wall_seconds.get(last, {}) if last is not None else {}
    # The fleet's training time: the slowest board of each round, summed over the rounds
    # (boards train in parallel; rounds follow one another).
    per_round = [max(d.values()) for d in outcome.device_seconds.values() if d]
    fleet_device = sum(per_round) if per_round else None
    fleet_wall = max(wall.values()) if wall else None

    merged_path = None
    curve_plan: tuple[list[int], int] | None = None
    if subs and last is not None:
        merged = evaluation.concatenate(list(subs.values()))
        merged_path = fleet.models_dir / f"round{last}" / "merged.estdp"
        save_model(merged, merged_path)
        target = min(config.target, merged.n_neurons)
        # Timed before any scoring starts, so the workers do not slow the merges down.
        results["merge_times"] = {
            m: evaluation.merge_time(
                list(subs.values()), target, m, repeats=scoring.merge_time_repeats
            )
            for m in evaluation.METRICS
        }
        if scoring.curve:
            removal = merged.n_neurons - target
            step = max(1, -(-removal // max(1, scoring.curve_points)))
            points = evaluation.removal_points(merged.n_neurons, removal, step)
            curve_plan = (points, merged.n_neurons)

    with evaluation.ScorePool(test_x, test_y, backend, scoring.jobs) as pool:
        futures: list[tuple[Any, str, Path | None, dict[str, Any]]] = []
        for node, path in sorted(updates.items()):
            extra = {
                "train_seconds": device.get(node),
                "train_wall_seconds": wall.get(node),
                "images": outcome.shard_sizes.get(node),
            }
            futures.append((pool.score(node, path), "sub-model", path, extra))
        site_updates = outcome.site_updates.get(last, {}) if last is not None else {}
        for site, path in sorted(site_updates.items()):
            boards = outcome.sites.get(site, [])
            times = [device[n] for n in boards if n in device]
            extra = {
                "train_seconds": max(times) if times else None,
                "sources": len(boards),
                "nodes": boards,
            }
            futures.append((pool.score(site, path), "site-model", path, extra))
        if merged_path is not None:
            extra = {
                "train_seconds": fleet_device,
                "train_wall_seconds": fleet_wall,
                "sources": len(subs),
            }
            futures.append((pool.score("merged", merged_path), "merged", merged_path, extra))
        for number in rounds:
            name = f"compressed (round {number})" if len(rounds) > 1 else "compressed"
            extra = {
                "train_seconds": sum(
                    max(d.values()) for r, d in outcome.device_seconds.items() if r <= number and d
                )
                or None,
                "train_wall_seconds": fleet_wall if number == last else None,
                "round": number,
                "labels": outcome.global_labels.get(number),
            }
            futures.append(
                (
                    pool.score(name, outcome.globals_[number]),
                    "compressed",
                    outcome.globals_[number],
                    extra,
                )
            )
        collect_curve = None
        if curve_plan is not None and merged_path is not None:
            points, n_merged = curve_plan
            collect_curve = evaluation.compression_curve(
                pool,
                merged_path,
                n_merged,
                points,
                n_images=scoring.curve_test_images,
                rule=config.rule,
            )
        baseline = fleet.wait_baseline()
        base_future = None
        if baseline and baseline.get("event") == "done":
            base_path = Path(baseline["path"])
            extra = {
                "train_seconds": baseline.get("cpu_seconds"),
                "train_wall_seconds": baseline.get("train_seconds"),
                "images": baseline.get("images"),
            }
            base_future = (pool.score("baseline", base_path), "baseline", base_path, extra)
        elif config.baseline_neurons:
            results["notes"].append(
                f"baseline failed: {(baseline or {}).get('message', 'no result')}"
            )
        rows = []
        for future, kind, path, extra in [*futures, *([base_future] if base_future else [])]:
            row = _row(future.result(), kind, path, **extra)
            display.message(
                f"  {row['model']}: {row['neurons']} neurons, {100 * row['accuracy']:.2f}%"
            )
            rows.append(row)
        if collect_curve is not None:
            results["compression_curve"] = collect_curve()
    if not rounds:
        results["notes"].append("no global model arrived: nothing to score")
    # Table order: sub-models, site models (a hierarchy), merged, the last round's
    # compressed model, baseline.
    compressed = [r for r in rows if r["kind"] == "compressed"]
    table = [r for r in rows if r["kind"] in ("sub-model", "site-model", "merged")]
    table += compressed[-1:]
    table += [r for r in rows if r["kind"] == "baseline"]
    results["models"] = table
    results["rounds"] = [_round_row(outcome, config, r) for r in compressed]
    base_row = next((r for r in rows if r["kind"] == "baseline"), None)
    results["baseline_accuracy"] = base_row["accuracy"] if base_row else None
    results["per_node"] = [
        {"node": r["model"], "accuracy": r["accuracy"]} for r in rows if r["kind"] == "sub-model"
    ]
    if base_row and base_row["train_seconds"] and fleet_device:
        results["speedup"] = base_row["train_seconds"] / fleet_device
    results["labels"] = outcome.global_labels.get(last) if last is not None else None
    results["notes"].append(_labels_note(config, outcome, last))
    results["notes"].append(
        "training time: device seconds, i.e. the CPU seconds of the board's (or the baseline's) "
        "process from the start of training to its update, divided by the board's speed; for "
        "the merged and compressed models, the slowest board of each round summed over the "
        "rounds; wall seconds on the shared host are in results.json (train_wall_seconds)"
    )
    return results


def _labels_note(config: FleetConfig, outcome: FleetOutcome, last: int | None) -> str:
    """Which labels the scored global model carries, in words."""
    labels = outcome.global_labels.get(last) if last is not None else None
    metrics = outcome.global_metrics.get(last, {}) if last is not None else {}
    if labels == "federated":
        # The root of a hierarchy hears from its sites, each relaying its boards' sums.
        who = "sites' boards" if config.hierarchical else "boards"
        calibrated = ""
        if "calibration_images" in metrics:
            calibrated = (
                f", after {int(metrics.get('calibration_nodes', 0))} {who} re-measured its "
                f"thresholds on {int(metrics['calibration_images'])} images "
                "(--calibrate-images)"
            )
        return (
            "labels of the global model: federated (--labels federated): re-assigned from "
            f"the spike counts of {int(metrics.get('label_nodes', 0))} {who} on their "
            f"{int(metrics.get('label_images', 0))} labelled training images{calibrated}"
        )
    if config.labels == "federated":
        return (
            "labels of the global model: kept from the sub-models (no board sent label "
            "statistics before the label deadline)"
        )
    return "labels of the global model: kept from the sub-models (--labels kept)"


def _round_row(outcome: FleetOutcome, config: FleetConfig, row: dict[str, Any]) -> dict[str, Any]:
    number = row["round"]
    state = outcome.state.rounds.get(number)
    metrics = outcome.global_metrics.get(number, {})
    return {
        "round": number,
        "expected": state.expected if state else config.nodes,
        "nodes": sorted(outcome.updates.get(number, {})),
        "contains": state.nodes_in_global if state else [],
        "merge_seconds": state.merge_seconds if state else None,
        "round_wall_seconds": outcome.round_wall.get(number),
        "neurons": row["neurons"],
        "accuracy": row["accuracy"],
        "accuracy_proportion": row["accuracy_proportion"],
        "labels": outcome.global_labels.get(number),
        "label_nodes": int(metrics["label_nodes"]) if "label_nodes" in metrics else None,
        "label_images": int(metrics["label_images"]) if "label_images" in metrics else None,
        "calibration_images": (
            int(metrics["calibration_images"]) if "calibration_images" in metrics else None
        ),
        "node_metrics": outcome.node_metrics.get(number, {}),
    }
