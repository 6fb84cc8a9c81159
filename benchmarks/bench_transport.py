"""Round overhead and fleet scale of the MQTT transport, on loopback.

Two measurements, each a set of rounds run by the real daemons over a real broker: the
aggregator in a process of its own (as deployed), the nodes as threads of this process,
each with its own MQTT connection:

- ``overhead``: announce, K updates of N neurons, merge, the global model delivered to all
  K nodes. Nodes "train" instantly (a precomputed random model), so a round's wall time
  is protocol + transport + merge; the overhead is that minus the merge's own seconds.
  Median over ``--rounds`` rounds. Goal: <= 200 ms at K=5, N=100.
- ``scale``: the same with ``--scale-nodes`` nodes (default 50): every update delivered,
  the round completes; the aggregator process's peak resident memory (``VmHWM``), and
  that peak up to the start of the merge (collecting and storing the updates), so the
  merge's share shows. Goal: aggregator memory < 1 GiB. The nodes' process is reported
  apart.

The merge is ``aggregator.merge.merge`` when it is installed, else a concatenate-and-
truncate stand-in (the JSON says which); its time is excluded from the overhead either way.

    python benchmarks/bench_transport.py [--broker mosquitto|amqtt|URL] [--rounds 5]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _memory import vm_hwm_mib

from aggregator.daemon import AggregatorConfig, AggregatorDaemon
from aggregator.state import AggregatorState
from edge_node.daemon import NodeConfig, NodeDaemon, TrainOutcome
from estdp.broker import EmbeddedBroker, mosquitto_binary
from estdp.model import SubModel, new_model
from estdp.params import NetworkParams
from estdp.transport import TransportConfig, mqtt_transport, parse_broker_url
from estdp.transport.channel import Channel


class InstantTrainer:
    """Returns a precomputed model: the round measures everything but training."""

    def __init__(self, node_id: str, n_neurons: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.model = new_model(
            rng.random((784, n_neurons), dtype=np.float32) * 0.3,
            rng.random(n_neurons, dtype=np.float32) * 0.05,
            NetworkParams(),
            node_id=node_id,
            images_seen=100,
            seed=seed,
            labels=rng.integers(0, 10, n_neurons),
        )

    def train(self, announcement, n_neurons, start, progress) -> TrainOutcome:
        return TrainOutcome(self.model, {})

    def evaluate(self, model: SubModel) -> dict[str, float]:
        return {}


def concat_merge(
    models: Sequence[SubModel], target: int, metric: str, **kw: object
) -> tuple[SubModel, dict]:
    weights = np.concatenate([m.weights for m in models], axis=1)[:, :target]
    thetas = np.concatenate([m.thetas for m in models])[:target]
    merged = new_model(
        weights, thetas, models[0].params, node_id="aggregator", images_seen=1, seed=0
    )
    return merged, {}


def pick_merge():
    if importlib.util.find_spec("aggregator.merge") is not None:
        from aggregator.daemon import default_merge

        return default_merge, "aggregator.merge"
    return concat_merge, "concat-stand-in"


def channel(url: str, cid: str, will=None) -> Channel:
    fields = parse_broker_url(url)
    transport = mqtt_transport(TransportConfig(client_id=cid, will=will, **fields))  # type: ignore[arg-type]
    transport.connect(timeout=30)
    return Channel(transport)


def run_aggregator_child(spec: dict[str, Any]) -> int:
    """The aggregator process: serve ``spec["rounds"]`` rounds, print events as JSON lines.

    Every event carries ``mono`` (``time.monotonic()``: CLOCK_MONOTONIC, the same clock in
    every process of the machine, so the parent can compare it with its own). It stops
    when the rounds are done or its stdin closes; the last line is its memory.
    """
    merge_fn, _ = pick_merge()
    memory: dict[str, float] = {}
    out_lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        event["mono"] = time.monotonic()
        with out_lock:
            print(json.dumps(event, default=str), flush=True)

    def measured_merge(models: Sequence[SubModel], target: int, metric: str, **kw: Any) -> Any:
        # The highest peak before the first merge: collecting and storing the updates.
        memory.setdefault("before_merge_mib", vm_hwm_mib())
        return merge_fn(models, target, metric, **kw)

    config = AggregatorConfig(
        nodes=spec["nodes"],
        target=spec["target"],
        neurons_per_node=spec["neurons"],
        deadline_s=600,
        rounds=spec["rounds"],
        continue_from_global=False,
        fleet=spec["fleet"],
        # Issue #4's round: announce, updates, merge, global model delivered; without the
        # labelling phase, which the instant trainers here cannot measure for.
        labels="kept",
    )
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()  # returns at EOF: the parent is done with us
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    agg_channel = channel(spec["url"], f"{spec['fleet']}-aggregator")
    with tempfile.TemporaryDirectory() as tmp:
        agg = AggregatorDaemon(
            config, agg_channel, AggregatorState(Path(tmp) / "agg"), measured_merge, events=emit
        )
        try:
            agg.run(stop, poll_s=0.02)
        finally:
            agg_channel.transport.close()
    emit(
        {
            "event": "memory",
            "peak_rss_mib": round(vm_hwm_mib(), 1),
            "peak_before_merge_mib": round(memory.get("before_merge_mib", float("nan")), 1),
        }
    )
    return 0


def run_rounds(url: str, fleet: str, n_nodes: int, neurons: int, target: int, rounds: int) -> dict:
    """Run ``rounds`` rounds; per round: wall seconds (announce -> all installed), merge
    seconds; and the aggregator process's memory."""
    events: list[dict] = []
    installed: dict[int, dict[str, float]] = {}
    lock = threading.Lock()

    def node_event(event: dict) -> None:
        if event["event"] == "installed":
            with lock:
                installed.setdefault(event["round"], {})[event["node"]] = time.monotonic()

    stops: list[threading.Event] = []
    threads: list[threading.Thread] = []
    channels: list[Channel] = []
    child: subprocess.Popen[str] | None = None
    reader: threading.Thread | None = None
    try:
        for i in range(n_nodes):
            cfg = NodeConfig(f"n{i}", fleet, state_dir=None)
            ch = channel(url, f"{fleet}-n{i}", cfg.will())
            channels.append(ch)
            node = NodeDaemon(cfg, ch, InstantTrainer(cfg.node_id, neurons, i), events=node_event)
            stops.append(node.stop)
            threads.append(threading.Thread(target=node.run, kwargs={"poll_s": 0.02}, daemon=True))
        for t in threads:
            t.start()
        time.sleep(0.5)  # every node subscribed before the first announcement
        spec = {"url": url, "fleet": fleet, "nodes": n_nodes, "neurons": neurons,
                "target": target, "rounds": rounds}  # fmt: skip
        child = subprocess.Popen(
            [sys.executable, __file__, "--aggregator-child", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        out = child.stdout
        assert out is not None

        def read_events() -> None:
            for line in out:
                if line.startswith("{"):
                    events.append(json.loads(line))

        reader = threading.Thread(target=read_events, daemon=True)
        reader.start()
        deadline = time.monotonic() + 120 + 10 * rounds
        while time.monotonic() < deadline:
            with lock:
                complete = len(installed.get(rounds, {})) == n_nodes
            # The aggregator exits by itself after its last round; the nodes may still be
            # installing that round's model, so only a failed exit ends the wait.
            if complete or child.poll() not in (None, 0):
                break
            time.sleep(0.01)
    finally:
        if child is not None:
            assert child.stdin is not None
            child.stdin.close()  # stops the aggregator if it is still serving
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if reader is not None:
            reader.join(10)  # the aggregator's last lines (its memory) are read
        for s in stops:
            s.set()
        for t in threads:
            t.join(10)
        for ch in channels:
            ch.transport.close()
    opened = {e["round"]: e["mono"] for e in events if e["event"] == "round_open"}
    merged = {e["round"]: e for e in events if e["event"] == "global"}
    per_round = []
    for r in range(1, rounds + 1):
        got = installed.get(r, {})
        if r not in opened or r not in merged or len(got) < n_nodes:
            per_round.append({"round": r, "complete": False, "installed": len(got)})
            continue
        wall = max(got.values()) - opened[r]
        per_round.append(
            {
                "round": r,
                "complete": True,
                "wall_s": wall,
                "merge_s": merged[r]["merge_seconds"],
                "overhead_s": wall - merged[r]["merge_seconds"],
                "updates": len(merged[r]["contains"]),
                "global_bytes": merged[r]["bytes"],
            }
        )
    memory = next((e for e in events if e["event"] == "memory"), {})
    return {
        "rounds": per_round,
        "aggregator_peak_rss_mib": memory.get("peak_rss_mib"),
        "aggregator_peak_before_merge_mib": memory.get("peak_before_merge_mib"),
        "aggregator_exit": child.returncode if child is not None else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--broker", default="auto", help="mosquitto, amqtt, auto, or an mqtt:// URL"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--neurons", type=int, default=100)
    parser.add_argument("--target", type=int, default=300)
    parser.add_argument("--scale-nodes", type=int, default=50, help="0 skips the scale run")
    parser.add_argument("--scale-rounds", type=int, default=1)
    parser.add_argument("--aggregator-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.aggregator_child:
        return run_aggregator_child(json.loads(args.aggregator_child))
    _, merge_name = pick_merge()

    broker = None
    if args.broker.startswith("mqtt"):
        url, kind = args.broker, "external"
    else:
        kind = (
            args.broker
            if args.broker != "auto"
            else ("mosquitto" if mosquitto_binary() else "amqtt")
        )
        broker = EmbeddedBroker(kind).start()
        url = broker.url
    try:
        stamp = int(time.time())
        small = run_rounds(
            url, f"bench{stamp}a", args.nodes, args.neurons, args.target, args.rounds
        )
        done = [r for r in small["rounds"] if r["complete"]]
        overheads = [r["overhead_s"] for r in done]
        for r in small["rounds"]:
            print(json.dumps({"run": "overhead", **r}))
        scale = None
        if args.scale_nodes:
            scale = run_rounds(
                url,
                f"bench{stamp}b",
                args.scale_nodes,
                args.neurons,
                args.target,
                args.scale_rounds,
            )
            for r in scale["rounds"]:
                print(json.dumps({"run": "scale", **r}))
    finally:
        if broker is not None:
            broker.close()
    summary = {
        "benchmark": "transport",
        "broker": kind,
        "merge": merge_name,
        "nodes": args.nodes,
        "neurons": args.neurons,
        "target": args.target,
        "rounds_complete": len(done),
        "rounds": args.rounds,
        "overhead_ms_median": round(1000 * statistics.median(overheads), 1) if overheads else None,
        "overhead_ms_max": round(1000 * max(overheads), 1) if overheads else None,
        "wall_ms_median": round(1000 * statistics.median(r["wall_s"] for r in done), 1)
        if done
        else None,
        "merge_ms_median": round(1000 * statistics.median(r["merge_s"] for r in done), 1)
        if done
        else None,
        "overhead_goal_ms": 200,
    }
    if scale is not None:
        complete = [r for r in scale["rounds"] if r["complete"]]
        summary.update(
            {
                "scale_nodes": args.scale_nodes,
                "scale_rounds_complete": len(complete),
                "scale_updates_delivered": min((r["updates"] for r in complete), default=0),
                "scale_wall_s": round(
                    max((r["wall_s"] for r in complete), default=float("nan")), 3
                ),
                "aggregator_peak_rss_mib": scale["aggregator_peak_rss_mib"],
                "aggregator_peak_before_merge_mib": scale["aggregator_peak_before_merge_mib"],
                "nodes_process_peak_rss_mib": round(vm_hwm_mib(), 1),
                "memory_goal_mib": 1024,
            }
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
