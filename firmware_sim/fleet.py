"""The simulated fleet: broker, aggregator, one process per board, and the baseline.

Everything runs the real code over a real MQTT broker: the embedded broker
(:class:`estdp.broker.EmbeddedBroker`, its own process) unless a ``broker_url`` is
given, the aggregator daemon (``estdp aggregator``), each board as its own node daemon
process (through :mod:`firmware_sim.board`, which applies the board's device and network
profile around the unmodified node daemon), and the baseline trainer
(:mod:`firmware_sim.baseline`) in parallel. The orchestrator only starts, watches and
breaks things:

- it writes each board's shard as the board's own IDX data directory
  (:mod:`firmware_sim.shards`);
- it follows the fleet through a read-only MQTT subscriber (:mod:`firmware_sim.observer`)
  that also saves every update and global model, and through the JSON lines the
  processes print;
- it fires the fault plan (:mod:`firmware_sim.faults`) when its triggers hold;
- it stops the fleet when the global model of the last round has arrived; the baseline
  may train on while the fleet's models are scored (:meth:`Fleet.wait_baseline`).

Hierarchical aggregation (``sites`` >= 2): the boards are split into contiguous groups,
one per site. Each site is its own fleet (``<fleet>.site-<i>``) on the same broker, with
its own site aggregator (``estdp aggregator --upstream-fleet <fleet>``), which merges its
boards and forwards the site model to the root aggregator (``--nodes`` = the number of
sites) on ``<fleet>``; the root's global model comes back down through each site. One
observer follows each fleet. The run ends when every live board has installed the last
round's root model (or a short grace period has passed).

Time accounting: a board's *device seconds* are the CPU seconds its process spent from
the start of its training to its update (read from ``/proc``), divided by its profile's
speed: the time the board would take on its own processor. Five boards sharing two host
cores wait for each other; that waiting is not the boards' compute and is reported apart
as wall time.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.calibration import DEFAULT_IMAGES as DEFAULT_CALIBRATE_IMAGES
from aggregator.removal import DEFAULT_RULE
from estdp.errors import ConfigError, EstdpError
from estdp.topics import Topics, validate_id
from estdp.transport import TransportConfig, parse_broker_url
from firmware_sim import partitions, procs, shards
from firmware_sim.display import Display
from firmware_sim.faults import Fault, due_faults
from firmware_sim.observer import SOURCE as OBSERVER
from firmware_sim.observer import Observer
from firmware_sim.profiles import DeviceProfile, NetworkProfile, check_fits
from firmware_sim.state import FleetState, NodeState

log = logging.getLogger(__name__)

POLL_S = 0.1
# How long a hierarchical run waits, after the root's last global model, for the sites to
# hand it down to every live board.
INSTALL_GRACE_S = 30.0


@dataclass(frozen=True)
class FleetConfig:
    """What to simulate. Paths are created under ``run_dir``."""

    run_dir: Path
    nodes: int = 5
    neurons: int = 100
    target: int = 300
    metric: str = "mse"
    rounds: int = 1
    continued_merge: str = "average"  # rounds after the first (aggregator --continued-merge)
    rule: str = DEFAULT_RULE  # removal rule of the merge (aggregator --rule)
    labels: str = "federated"  # labels of the global model (aggregator --labels)
    label_deadline_s: float | None = None  # None: default_label_deadline
    calibrate_images: int = DEFAULT_CALIBRATE_IMAGES  # aggregator --calibrate-images
    images: int = 30000
    offset: int = 0
    partition: partitions.PartitionSpec = field(default_factory=partitions.PartitionSpec)
    devices: tuple[DeviceProfile, ...] = ()
    networks: tuple[NetworkProfile, ...] = ()
    faults: tuple[Fault, ...] = ()
    deadline_s: float | None = None
    min_nodes: int | None = None
    backend: str = "auto"
    seed: int = 0
    broker_url: str | None = None
    broker_kind: str = "amqtt"
    fleet: str = "sim"
    baseline_neurons: int = 0  # 0: no baseline
    data_dir: str | None = None
    dataset: str = "mnist"
    preset: str = "bindsnet"
    config_path: str | None = None
    overrides: tuple[str, ...] = ()
    timeout_s: float = 3600.0
    node_test_images: int = 200  # each board's local evaluation of the global model
    sites: int = 1  # >= 2: hierarchical aggregation over this many sites
    site_target: int | None = None  # neurons of each site model (None: site_target_for)

    def __post_init__(self) -> None:
        if self.labels not in ("kept", "federated"):
            raise ConfigError(f"--labels must be kept or federated, got {self.labels!r}")
        if self.calibrate_images < 0:
            raise ConfigError(f"--calibrate-images must be >= 0, got {self.calibrate_images}")
        if not 1 <= self.sites <= self.nodes:
            raise ConfigError(f"--sites must be in 1..{self.nodes} (the nodes), got {self.sites}")
        if self.site_target is not None and self.sites < 2:
            raise ConfigError("--site-target needs --sites 2 or more")
        for site in self.site_ids():
            validate_id(self.site_fleet(site), "site fleet")

    def node_ids(self) -> list[str]:
        width = len(str(self.nodes))
        return [f"node-{i + 1:0{width}d}" for i in range(self.nodes)]

    @property
    def hierarchical(self) -> bool:
        return self.sites >= 2

    def site_ids(self) -> list[str]:
        """The sites' ids, which are also their node ids in the root fleet ([] if flat)."""
        if not self.hierarchical:
            return []
        width = len(str(self.sites))
        return [f"site-{i + 1:0{width}d}" for i in range(self.sites)]

    def site_nodes(self) -> dict[str, list[str]]:
        """Site id -> its boards: contiguous groups of the node ids, sizes within one."""
        ids = self.node_ids()
        groups = np.array_split(np.arange(len(ids)), max(self.sites, 1))
        return {
            site: [ids[i] for i in group]
            for site, group in zip(self.site_ids(), groups, strict=False)
        }

    def site_fleet(self, site: str) -> str:
        """The fleet (topic prefix) of one site's boards and site aggregator."""
        return f"{self.fleet}.{site}"

    def fleet_of(self, node_id: str) -> str:
        """The fleet a board talks to: its site's, or the root fleet when flat."""
        for site, nodes in self.site_nodes().items():
            if node_id in nodes:
                return self.site_fleet(site)
        return self.fleet

    def site_target_for(self, site: str) -> int:
        """Neurons of a site's model: ``site_target``, or by default twice the site's share
        of the global target, so that the root still chooses among alike neurons across
        sites; never more than the site's boards hold together."""
        held = len(self.site_nodes()[site]) * self.neurons
        wanted = self.site_target or max(self.neurons, -(-2 * self.target // self.sites))
        return min(held, wanted)

    def params_args(self) -> list[str]:
        """The network-parameter flags, passed on to every child process."""
        args = ["--preset", self.preset]
        if self.config_path:
            args += ["--config", self.config_path]
        for item in self.overrides:
            args += ["--set", item]
        return args


@dataclass
class FleetOutcome:
    """What a finished run leaves behind for scoring and reporting."""

    state: FleetState
    node_ids: list[str]
    shard_sizes: dict[str, int]
    class_counts: dict[str, list[int]]
    round_ids: list[int]
    updates: dict[int, dict[str, Path]]  # round -> node -> saved update
    globals_: dict[int, Path]  # round -> saved final global model (after its labelling)
    global_metrics: dict[int, dict[str, float]]
    node_metrics: dict[int, dict[str, dict[str, float]]]  # round -> node -> metrics
    device_seconds: dict[int, dict[str, float]]  # round -> node -> device seconds
    wall_seconds: dict[int, dict[str, float]]  # round -> node -> training wall seconds
    round_wall: dict[int, float]  # round -> seconds from announcement to global model
    baseline: dict[str, Any] | None
    faults_fired: list[str]
    elapsed: float
    broker: str
    installed: dict[int, dict[str, str]] = field(default_factory=dict)  # round -> node -> file
    # Hierarchical runs: round -> site -> saved site model (the site's update to the root).
    site_updates: dict[int, dict[str, Path]] = field(default_factory=dict)
    sites: dict[str, list[str]] = field(default_factory=dict)  # site -> its boards
    # Federated labels: round -> the global model as first published (labels provisional),
    # and round -> where the final global's labels come from (kept | federated).
    provisional: dict[int, Path] = field(default_factory=dict)
    global_labels: dict[int, str] = field(default_factory=dict)


def default_deadline(config: FleetConfig, shard_images: int) -> float:
    """A round deadline generous enough for the slowest board (used without --deadline).

    Start-up (~20 s) plus ten times a pessimistic compute estimate of 1.5e-5 s per image
    per neuron, scaled by the slowest board and by how many boards share each core.
    """
    slowest = min((d.speed for d in config.devices), default=1.0)
    sharing = max(1.0, (config.nodes + (1 if config.baseline_neurons else 0)) / 2.0)
    neurons = max(config.neurons, config.target if config.rounds > 1 else 0)
    compute = shard_images * neurons * 1.5e-5 * sharing / slowest
    return math.ceil(30.0 + 10.0 * compute)


def default_label_deadline(config: FleetConfig, shard_images: int) -> float:
    """How long the labelling phase waits for the boards (used without --label-deadline).

    Each board runs the global model (``target`` neurons) frozen over its shard: about a
    tenth of the per-image, per-neuron cost of training, with the same margins, after a
    thresholds-only pass over ``calibrate_images`` of them (the cost of training); never
    below the aggregator's own default of 120 s. The labelling after the calibration
    waits as long again.
    """
    slowest = min((d.speed for d in config.devices), default=1.0)
    sharing = max(1.0, (config.nodes + (1 if config.baseline_neurons else 0)) / 2.0)
    calibrate = min(config.calibrate_images, shard_images)  # a pass as costly as training
    compute = (shard_images * 1.5e-6 + calibrate * 1.5e-5) * config.target * sharing / slowest
    return float(max(120, math.ceil(30.0 + 10.0 * compute)))


class Fleet:
    """Runs one simulation; see the module docstring."""

    def __init__(self, config: FleetConfig, display: Display | None = None) -> None:
        self.config = config
        self.display = display or Display(quiet=True)
        self.run_dir = Path(config.run_dir)
        self.log_dir = self.run_dir / "logs"
        self.models_dir = self.run_dir / "models"
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.state = FleetState()
        self.node_ids = config.node_ids()
        self.procs: dict[str, procs.ManagedProcess] = {}
        self.broker: Any = None
        self.broker_url = config.broker_url or ""
        self.observer: Observer | None = None
        self.site_observers: dict[str, Observer] = {}
        self._install_deadline: float | None = None
        self._t0 = time.monotonic()
        self._fired: set[int] = set()
        self._pending: list[tuple[float, str]] = []  # (monotonic time, what to start)
        self._cpu_mark: dict[str, float] = {}
        self._wall_mark: dict[str, float] = {}
        self._rate_mark: dict[str, tuple[float, int]] = {}
        self._deadline_s = config.deadline_s
        self._label_deadline_s = config.label_deadline_s
        self.outcome = FleetOutcome(
            state=self.state,
            node_ids=self.node_ids,
            shard_sizes={},
            class_counts={},
            round_ids=[],
            updates={},
            globals_={},
            global_metrics={},
            node_metrics={},
            device_seconds={},
            wall_seconds={},
            round_wall={},
            baseline=None,
            faults_fired=[],
            elapsed=0.0,
            broker="",
            sites=config.site_nodes(),
        )

    # ---- set-up ---------------------------------------------------------------------------

    def prepare_data(
        self, images: np.ndarray, labels: np.ndarray, test: tuple[np.ndarray, np.ndarray]
    ) -> None:
        """Partition the pool and write each board's data directory."""
        cfg = self.config
        parts = partitions.partition(labels, cfg.nodes, cfg.partition, seed=cfg.seed)
        counts = partitions.class_counts(labels, parts)
        test_dir = shards.write_test_set(self.run_dir / "data" / "test", *test)
        for node_id, idx, device, row in zip(
            self.node_ids, parts, cfg.devices, counts, strict=True
        ):
            check_fits(device, max(cfg.neurons, cfg.target), int(idx.shape[0]))
            shards.write_shard(self.run_dir / "data" / node_id, images[idx], labels[idx], test_dir)
            self.outcome.shard_sizes[node_id] = int(idx.shape[0])
            self.outcome.class_counts[node_id] = [int(c) for c in row]
        if self._deadline_s is None:
            self._deadline_s = default_deadline(cfg, max(self.outcome.shard_sizes.values()))
        if self._label_deadline_s is None:
            self._label_deadline_s = default_label_deadline(
                cfg, max(self.outcome.shard_sizes.values())
            )

    def _elapsed(self) -> float:
        return time.monotonic() - self._t0

    def _note(self, text: str) -> None:
        self.state.elapsed = self._elapsed()
        self.state.note(text)
        log.info("%s", text)

    def _start_broker(self) -> None:
        if self.config.broker_url:
            parse_broker_url(self.config.broker_url)  # a bad URL fails here, clearly
            self.state.broker = "external"
            self.outcome.broker = self.config.broker_url
            return
        from estdp.broker import EmbeddedBroker

        self.broker = EmbeddedBroker(self.config.broker_kind).start()
        self.broker_url = self.broker.url
        self.state.broker = "up"
        self.outcome.broker = f"embedded {self.broker.kind} at {self.broker.url}"
        self._note(f"broker: embedded {self.broker.kind} at {self.broker.url}")

    def _transport_config(self, fleet: str | None = None) -> TransportConfig:
        fields = parse_broker_url(self.broker_url)
        name = fleet or self.config.fleet
        return TransportConfig(client_id=f"estdp-sim-observer-{name}", **fields)  # type: ignore[arg-type]

    def _common_args(self, fleet: str | None = None) -> list[str]:
        return ["--broker", self.broker_url, "--fleet", fleet or self.config.fleet]

    def root_deadline(self) -> float:
        """The root's round deadline: a site's, plus time for the sites to merge and forward
        (site rounds end at the root's deadline at the latest)."""
        assert self._deadline_s is not None
        if not self.config.hierarchical:
            return self._deadline_s
        return self._deadline_s + max(30.0, self._deadline_s / 2)

    def label_deadlines(self) -> tuple[float, float]:
        """(root, site) label deadlines: in a hierarchy the sites collect their boards'
        label statistics first and relay them, so the root waits longer."""
        assert self._label_deadline_s is not None
        site = self._label_deadline_s
        if not self.config.hierarchical:
            return site, site
        return site + max(30.0, site / 2), site

    def _merge_args(self) -> list[str]:
        """How every aggregator of the run merges (root and sites alike)."""
        cfg = self.config
        return [
            "--metric",
            cfg.metric,
            "--rounds",
            str(cfg.rounds),
            "--continued-merge",
            cfg.continued_merge,
            "--rule",
            cfg.rule,
        ]

    def aggregator_argv(self) -> list[str]:
        """The root aggregator (the only one of a flat fleet)."""
        cfg = self.config
        if cfg.hierarchical:
            # Its "nodes" are the sites, each sending one site model.
            expected = cfg.sites
            neurons = max(cfg.site_target_for(s) for s in cfg.site_ids())
        else:
            expected, neurons = cfg.nodes, cfg.neurons
        args = [
            *self._common_args(),
            "--nodes",
            str(expected),
            "--neurons",
            str(neurons),
            "--target",
            str(cfg.target),
            *self._merge_args(),
            "--labels",
            cfg.labels,
            "--label-deadline",
            f"{self.label_deadlines()[0]:g}",
            "--calibrate-images",  # in a hierarchy the sites relay their boards' passes
            str(cfg.calibrate_images),
            "--deadline",
            f"{self.root_deadline():g}",
            "--state",
            str(self.run_dir / "aggregator"),
            "--json",
        ]
        if cfg.min_nodes is not None and not cfg.hierarchical:
            args += ["--min-nodes", str(cfg.min_nodes)]
        return procs.estdp_command("aggregator", *args)

    def site_aggregator_argv(self, site: str) -> list[str]:
        """A site aggregator: merges its boards, forwards upstream as node ``site``."""
        cfg = self.config
        boards = len(cfg.site_nodes()[site])
        args = [
            *self._common_args(cfg.site_fleet(site)),
            "--upstream-fleet",
            cfg.fleet,
            "--site-id",
            site,
            # Same broker for both connections, maybe shared with other runs: client ids
            # unique to this run.
            "--client-id",
            f"aggregator-{cfg.site_fleet(site)}",
            "--upstream-client-id",
            f"{cfg.site_fleet(site)}-upstream",
            "--nodes",
            str(boards),
            "--neurons",
            str(cfg.neurons),
            "--target",
            str(cfg.site_target_for(site)),
            *self._merge_args(),
            "--label-deadline",
            f"{self.label_deadlines()[1]:g}",
            "--deadline",
            f"{self._deadline_s:g}",
            "--state",
            str(self.run_dir / f"aggregator-{site}"),
            "--json",
        ]
        if cfg.min_nodes is not None:
            # --min-nodes is a share of the whole fleet: each site asks for its share.
            args += ["--min-nodes", str(max(1, -(-cfg.min_nodes * boards // cfg.nodes)))]
        return procs.estdp_command("aggregator", *args)

    def node_argv(self, index: int) -> list[str]:
        cfg = self.config
        node_id = self.node_ids[index]
        device, network = cfg.devices[index], cfg.networks[index]
        board = [
            "--speed",
            f"{device.speed:g}",
            "--network",
            _network_spec(network),
            "--net-seed",
            str(cfg.seed * 1000 + index),
            "--",
        ]
        node = [
            *self._common_args(cfg.fleet_of(node_id)),
            "--node-id",
            node_id,
            "--data",
            str(self.run_dir / "data" / node_id),
            "--dataset",
            cfg.dataset,
            "--state",
            str(self.run_dir / "nodes" / node_id),
            "--test-images",
            str(cfg.node_test_images),
            "--backend",
            cfg.backend,
            "--seed",
            str(cfg.seed + 1 + index),
            "--json",
            *cfg.params_args(),
        ]
        return procs.python_command("firmware_sim.board", *board, *node)

    def baseline_argv(self) -> list[str]:
        cfg = self.config
        args = [
            "--neurons",
            str(cfg.baseline_neurons),
            "--images",
            str(cfg.images),
            "--offset",
            str(cfg.offset),
            "--seed",
            str(cfg.seed),
            "--out",
            str(self.models_dir / "baseline.estdp"),
            "--dataset",
            cfg.dataset,
            "--backend",
            cfg.backend,
            *cfg.params_args(),
        ]
        if cfg.data_dir:
            args += ["--data", cfg.data_dir]
        return procs.python_command("firmware_sim.baseline", *args)

    def _add_proc(self, name: str, argv: list[str]) -> procs.ManagedProcess:
        proc = procs.ManagedProcess(name, argv, self.events, self.log_dir)
        self.procs[name] = proc
        return proc

    # ---- running --------------------------------------------------------------------------

    def run(self) -> FleetOutcome:
        """Start everything and watch until the last round is merged; then stop the fleet.

        The baseline may still be training when this returns (its process keeps the
        host's spare core busy while the fleet's models are scored): :meth:`wait_baseline`
        waits for it, :meth:`close` stops it. On an error everything is stopped.
        """
        cfg = self.config
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self._t0 = time.monotonic()
        try:
            self._start_broker()
            self.observer = Observer(
                self._transport_config(), cfg.fleet, self.events, self.models_dir
            )
            self.observer.start()
            for site in cfg.site_ids():
                fleet = cfg.site_fleet(site)
                observer = Observer(
                    self._transport_config(fleet),
                    fleet,
                    self.events,
                    self.models_dir / site,
                    source=f"{OBSERVER}:{site}",
                )
                observer.start()
                self.site_observers[site] = observer
            self._add_proc("aggregator", self.aggregator_argv()).start()
            for site in cfg.site_ids():
                self._add_proc(f"aggregator-{site}", self.site_aggregator_argv(site)).start()
            self.state.aggregator = "up"
            for i, node_id in enumerate(self.node_ids):
                self.state.nodes[node_id] = NodeState(
                    node_id,
                    device=cfg.devices[i].name,
                    network=cfg.networks[i].name,
                    images_total=self.outcome.shard_sizes.get(node_id, 0),
                )
                self._add_proc(node_id, self.node_argv(i)).start()
                self.state.nodes[node_id].pid = self.procs[node_id].pid
            if cfg.baseline_neurons:
                self.state.baseline = NodeState(
                    "baseline", status="training", images_total=cfg.images
                )
                self._add_proc("baseline", self.baseline_argv()).start()
            sites = f", {cfg.sites} site aggregators" if cfg.hierarchical else ""
            self._note(
                f"started the aggregator{sites}, {cfg.nodes} nodes"
                + (" and the baseline" if cfg.baseline_neurons else "")
            )
            self._watch()
        except BaseException:
            self.close()
            raise
        finally:
            self._stop_fleet()
        self.outcome.elapsed = self._elapsed()
        self.outcome.round_ids = sorted(self.outcome.globals_)
        return self.outcome

    def _baseline_done(self) -> bool:
        return self.state.baseline is None or self.state.baseline.status in ("done", "failed")

    def wait_baseline(self, report_every: float = 15.0) -> dict[str, Any] | None:
        """Wait for the baseline to finish (bounded by the run's timeout); its ``done`` or
        ``error`` record, or None without a baseline."""
        deadline = self._t0 + self.config.timeout_s
        last, said = time.monotonic(), ""
        while not self._baseline_done():
            if time.monotonic() > deadline:
                self.close()
                raise EstdpError(
                    f"the baseline did not finish within {self.config.timeout_s:.0f} s; "
                    f"log: {self.log_dir / 'baseline.log'}"
                )
            self._drain(POLL_S)
            self._check_processes()
            if time.monotonic() - last >= report_every and self.state.baseline is not None:
                last = time.monotonic()
                b = self.state.baseline
                text = (
                    f"baseline: {b.images_done}/{b.images_total} images ({b.images_per_s:.0f} img/s)"
                    if b.images_done < b.images_total
                    else "baseline: trained; assigning labels (a frozen pass over its images)"
                )
                if text != said:
                    self.display.message(text)
                said = text
        self.close()
        return self.outcome.baseline

    def close(self) -> None:
        """Stop the baseline process if it still runs (idempotent)."""
        base = self.procs.get("baseline")
        if base is not None:
            if self._baseline_done():
                base.wait(10.0)
            base.stop(timeout=5.0)

    def _finished(self) -> bool:
        """The last round's global model is here (and, in a hierarchy, on every live board
        or the grace period is over)."""
        if len(self.outcome.globals_) < self.config.rounds:
            return False
        if not self.config.hierarchical:
            return True
        if self._install_deadline is None:
            self._install_deadline = time.monotonic() + INSTALL_GRACE_S
        last = max(self.outcome.globals_)
        installed = self.outcome.installed.get(last, {})
        live = [
            n for n, node in self.state.nodes.items() if node.status not in ("killed", "failed")
        ]
        if all(n in installed for n in live):
            return True
        if time.monotonic() > self._install_deadline:
            missing = ", ".join(n for n in live if n not in installed)
            self._note(f"round {last}: no install of the root model reported by {missing}")
            return True
        return False

    def _watch(self) -> None:
        deadline = self._t0 + self.config.timeout_s
        while not self._finished():
            if time.monotonic() > deadline:
                raise EstdpError(
                    f"simulation timed out after {self.config.timeout_s:.0f} s "
                    f"({len(self.outcome.globals_)}/{self.config.rounds} rounds merged); "
                    f"logs in {self.log_dir}"
                )
            self._drain(POLL_S)
            self.state.elapsed = self._elapsed()
            self._check_processes()
            self._run_pending()
            for index in due_faults(list(self.config.faults), self.state, self._fired):
                self._fired.add(index)
                self._fire(self.config.faults[index])
            self.display.refresh(self.state)
        self._drain(0.0)
        self.display.close(self.state)

    def _drain(self, timeout: float) -> None:
        try:
            source, event = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        self._apply(source, event)
        while True:
            try:
                source, event = self.events.get_nowait()
            except queue.Empty:
                return
            self._apply(source, event)

    # ---- events ---------------------------------------------------------------------------

    def _apply(self, source: str, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if source == "baseline":
            self._apply_baseline(event)
        elif source == OBSERVER:
            if self.config.hierarchical and kind == "update":
                self._on_site_update(event)  # the root fleet's "nodes" are the sites
                return
            handler = getattr(self, f"_on_{kind}", None)
            if handler is not None:
                handler(event)
        elif source.startswith(f"{OBSERVER}:"):
            # A site's fleet: its boards' updates, status and metrics. Its round and global
            # messages mirror the root's, which the root observer already follows.
            if kind in ("update", "status", "metrics"):
                getattr(self, f"_on_{kind}")(event)
        elif source in self.state.nodes:
            self._apply_node(source, event)

    def _apply_node(self, node_id: str, event: dict[str, Any]) -> None:
        """A JSON event line of a node daemon (``estdp node --json``)."""
        node = self.state.nodes[node_id]
        kind = event.get("event")
        if kind == "training":
            self._mark_training(node_id)
            node.round = int(event.get("round", node.round))
            node.images_done = 0
            self._rate_mark[node_id] = (time.monotonic(), 0)
        elif kind == "progress":
            done = int(event.get("done", node.images_done))
            node.images_total = int(event.get("total") or node.images_total)
            node.round = int(event.get("round", node.round))
            t_prev, done_prev = self._rate_mark.get(node_id, (time.monotonic(), 0))
            now = time.monotonic()
            if now > t_prev and done > done_prev:
                node.images_per_s = (done - done_prev) / (now - t_prev)
                self._rate_mark[node_id] = (now, done)
            node.images_done = done
            if node.status not in ("training", "killed"):
                self._mark_training(node_id)
        elif kind == "installed" and event.get("labels") != "provisional":
            # The round's final model (a provisional one is replaced within the round).
            number = int(event.get("round", 0))
            self.outcome.installed.setdefault(number, {})[node_id] = str(event.get("path") or "")
            if node.status not in ("killed", "failed"):
                node.status = "installed"
        elif kind == "error":
            self._note(f"{node_id}: {event.get('message')}")

    def _apply_baseline(self, event: dict[str, Any]) -> None:
        base = self.state.baseline
        if base is None:
            return
        kind = event.get("event")
        if kind == "progress":
            base.images_done = int(event["done"])
            base.images_total = int(event["total"])
            base.images_per_s = float(event.get("rate", 0.0))
        elif kind == "done":
            base.status = "done"
            base.images_done = base.images_total
            base.train_seconds = float(event["train_seconds"])
            self.outcome.baseline = event
            self._note(
                f"baseline: {event['neurons']} neurons trained in {event['train_seconds']:.1f} s"
            )
        elif kind == "error":
            base.status = "failed"
            self.outcome.baseline = event
            self._note(f"baseline failed: {event.get('message')}")

    def _mark_training(self, node_id: str) -> None:
        node = self.state.nodes[node_id]
        node.status = "training"
        cpu = self.procs[node_id].cpu_seconds()
        self._cpu_mark[node_id] = cpu if cpu is not None else 0.0
        self._wall_mark[node_id] = self._elapsed()

    def _on_round(self, event: dict[str, Any]) -> None:
        number = int(event["round"])
        # A round's arrivals are the boards' updates, in a hierarchy too (not the sites').
        expected = (
            self.config.nodes
            if self.config.hierarchical
            else int(event.get("expected", self.config.nodes))
        )
        rnd = self.state.round_state(number, expected)
        if rnd.started_at is None:
            rnd.started_at = self._elapsed()
            self._note(f"round {number} announced ({rnd.expected} nodes expected)")
        for node in self.state.nodes.values():
            if node.status not in ("killed", "failed"):
                node.round = number

    def _on_status(self, event: dict[str, Any]) -> None:
        node = self.state.nodes.get(event["node"])
        if node is None or node.status in ("killed",):
            return
        state = event["state"]
        if state == "training" and node.status != "training":
            self._mark_training(node.node_id)
        elif state == "offline":
            node.status = "offline"
        elif state == "online" and node.status in ("starting", "offline"):
            node.status = "waiting"

    def _on_update(self, event: dict[str, Any]) -> None:
        number = int(event["round"])
        node_id = event["node"]
        rnd = self.state.round_state(number, self.config.nodes)
        if node_id in rnd.arrivals:
            return  # the same update again (a node re-sends it after a reconnect)
        rnd.arrivals.append(node_id)
        if event.get("path"):
            self.outcome.updates.setdefault(number, {})[node_id] = Path(event["path"])
        node = self.state.nodes.get(node_id)
        if node is None:
            return
        node.status = "published"
        node.images_done = node.images_total
        index = self.node_ids.index(node_id)
        proc = self.procs.get(node_id)
        cpu_now = proc.cpu_seconds() if proc else None
        if node_id in self._cpu_mark and cpu_now is not None:
            device = (cpu_now - self._cpu_mark[node_id]) / self.config.devices[index].speed
            self.outcome.device_seconds.setdefault(number, {})[node_id] = device
        if node_id in self._wall_mark:
            wall = self._elapsed() - self._wall_mark[node_id]
            self.outcome.wall_seconds.setdefault(number, {})[node_id] = wall
            node.train_seconds = wall
        self._note(f"round {number}: update from {node_id} ({event['neurons']} neurons)")

    def _on_site_update(self, event: dict[str, Any]) -> None:
        number, site = int(event["round"]), event["node"]
        updates = self.outcome.site_updates.setdefault(number, {})
        if site in updates:
            return
        if event.get("path"):
            updates[site] = Path(event["path"])
        self._note(f"round {number}: site model from {site} ({event['neurons']} neurons)")

    def _on_global(self, event: dict[str, Any]) -> None:
        number = int(event["round"])
        rnd = self.state.round_state(number, self.config.nodes)
        if number in self.outcome.globals_:
            return  # the round's final model is here already
        labels = str(event.get("labels", "kept"))
        metrics = event.get("metrics", {})
        if rnd.merged_at is None:
            rnd.merged_at = self._elapsed()
            rnd.global_neurons = int(event["neurons"])
            rnd.nodes_in_global = list(event.get("contains", []))
            rnd.merge_seconds = _merge_seconds(metrics)
        if labels == "provisional":
            if event.get("path"):
                self.outcome.provisional[number] = Path(event["path"])
            calibrate = int(event.get("calibrate", 0))
            phase = (
                f"thresholds-only pass on the nodes ({calibrate} images each)"
                if calibrate
                else "labelling"
            )
            self._note(
                f"round {number}: global model of {rnd.global_neurons} neurons from "
                f"{len(rnd.nodes_in_global)} nodes; {phase}"
            )
            return
        self.outcome.global_metrics[number] = metrics
        self.outcome.global_labels[number] = labels
        if event.get("path"):
            self.outcome.globals_[number] = Path(event["path"])
        if rnd.started_at is not None:
            self.outcome.round_wall[number] = self._elapsed() - rnd.started_at
        if labels == "federated":
            source = (
                f"labels from {int(metrics.get('label_nodes', 0))} nodes' "
                f"{int(metrics.get('label_images', 0))} images"
            )
        else:
            source = "labels kept from the sub-models"
        self._note(
            f"round {number}: global model of {rnd.global_neurons} neurons from "
            f"{len(rnd.nodes_in_global)} nodes ({source})"
        )

    def _on_metrics(self, event: dict[str, Any]) -> None:
        number = int(event["round"])
        metrics = event.get("metrics", {})
        self.outcome.node_metrics.setdefault(number, {})[event["node"]] = metrics
        node = self.state.nodes.get(event["node"])
        if node is not None:
            node.status = "installed"
            acc = metrics.get("accuracy", metrics.get("accuracy_all_activity"))
            node.accuracy = float(acc) if acc is not None else node.accuracy

    # ---- processes and faults -------------------------------------------------------------

    def _check_processes(self) -> None:
        for name, proc in self.procs.items():
            code = proc.returncode
            if code is None or proc.exit_reported:
                continue
            proc.exit_reported = True
            if name == "aggregator":
                if code == 0:
                    self.state.aggregator = "done"  # its rounds are done
                elif self.state.aggregator != "killed":
                    raise EstdpError(f"the aggregator exited with status {code}: {proc.tail(3)}")
            elif name.startswith("aggregator-"):
                if code != 0:  # a site aggregator exits 0 once it has passed its rounds on
                    raise EstdpError(f"{name} exited with status {code}: {proc.tail(3)}")
            elif name in self.state.nodes:
                node = self.state.nodes[name]
                if node.status != "killed":
                    node.status = "failed"
                    self._note(f"{name} exited with status {code}: {proc.tail(1)}")
            elif (
                name == "baseline" and self.state.baseline and self.state.baseline.status != "done"
            ):
                self.state.baseline.status = "failed"
                self._note(f"baseline exited with status {code}: {proc.tail(1)}")

    def _fire(self, fault: Fault) -> None:
        self._note(f"fault: {fault}")
        self.outcome.faults_fired.append(f"{self._elapsed():.1f}s {fault}")
        when = time.monotonic() + fault.down_seconds
        if fault.action in ("kill-node", "restart-node"):
            assert fault.target is not None
            self.state.nodes[fault.target].status = "killed"
            self.procs[fault.target].kill()
            if fault.action == "restart-node":
                self._pending.append((when, fault.target))
        elif fault.action == "restart-aggregator":
            self.state.aggregator = "killed"
            self.procs["aggregator"].kill()
            self._pending.append((when, "aggregator"))
        elif fault.action == "restart-broker":
            if self.broker is None:
                raise ConfigError("restart-broker needs the embedded broker (no --broker)")
            self.state.broker = "down"
            self.broker.stop()
            self._pending.append((when, "broker"))

    def _run_pending(self) -> None:
        now = time.monotonic()
        due = [p for p in self._pending if p[0] <= now]
        self._pending = [p for p in self._pending if p[0] > now]
        for _, what in due:
            if what == "broker":
                self.broker.start()
                self.state.broker = "up"
                self._note("broker restarted")
                continue
            proc = self.procs[what]
            proc.start()
            if what == "aggregator":
                self.state.aggregator = "up"
            else:
                node = self.state.nodes[what]
                node.status, node.restarts, node.pid = "starting", node.restarts + 1, proc.pid
            self._note(f"{what} restarted")

    def _stop_fleet(self) -> None:
        """Stop the nodes, the aggregator, the observer and the embedded broker."""
        for name in [n for n in self.procs if n != "baseline"]:
            self.procs[name].stop(timeout=10.0)
            self.procs[name].exit_reported = True  # stopped by us: not a failure
        cfg = self.config
        # Each fleet's observer, with the ids that publish updates in that fleet: the
        # boards, or in a hierarchy the sites (in the root fleet) and each site's boards.
        observers: list[tuple[str, Observer | None, list[str]]] = [
            (cfg.fleet, self.observer, cfg.site_ids() if cfg.hierarchical else self.node_ids)
        ]
        for site, boards in cfg.site_nodes().items():
            observers.append((cfg.site_fleet(site), self.site_observers.get(site), boards))
        for fleet, observer, members in observers:
            if observer is None:
                continue
            if self.broker is None:
                topics = Topics(fleet)
                observer.clear_retained(
                    (
                        topics.round,
                        topics.global_model,
                        *(topics.status(n) for n in members),
                        *(topics.update(n) for n in members),
                        *(topics.labels(n) for n in members),
                    )
                )
            observer.stop()
        if self.broker is not None:
            self.broker.close()
            self.state.broker = "stopped"


def _merge_seconds(metrics: dict[str, Any]) -> float | None:
    for key in ("merge_seconds", "merge_s", "seconds"):
        if key in metrics:
            return float(metrics[key])
    return None


def _network_spec(profile: NetworkProfile) -> str:
    """A network profile as text that :func:`parse_network` reads back."""
    return (
        f"custom:{profile.latency_ms:g}:{profile.jitter_ms:g}:{profile.loss:g}"
        f":{profile.disconnect_every_s:g}:{profile.disconnect_for_s:g}"
    )
