"""The seed's experiments, reproduced: each writes its table and plot to a report directory
and its section of docs/results.md.

- ``compression``: one 300-neuron model trained on the pool (30,000 images), compressed by
  0 to 250 neurons with each of the four metrics; accuracy against neurons removed.
- ``merge-time``: merge time per metric, compressing the 300-neuron model by 50 to 250
  neurons and merging a 500-neuron model to 300 (median of several runs).
- ``ensemble``: the fleet (:func:`firmware_sim.simulation.run_simulation`) with 5 x 100 and
  2 x 250 neurons merged to 300, against the 300-neuron baseline: the seed's two tables.
- ``ga``: a 500-neuron model merged to 300 by the four metrics and by the genetic search
  (validation images drawn from training images after the pool).
- ``non-iid``: 5 x 100 -> 300 on IID shards and on Dirichlet shards (alpha 0.1, 0.5, 1.0).

Single models are trained in-process with the workflow of ``estdp train`` and cached in
the report directory (``models/single-<N>-...estdp``), so experiments that share a model
train it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.calibration import DEFAULT_IMAGES as DEFAULT_CALIBRATE_IMAGES
from edge_node.workflow import train_model
from estdp.backend import resolve_backend
from estdp.datasets import load_mnist
from estdp.errors import ConfigError
from estdp.model import SubModel, load_model, save_model, with_notes
from estdp.params import load_params
from firmware_sim import evaluation, report
from firmware_sim.display import Display
from firmware_sim.fleet import FleetConfig
from firmware_sim.partitions import PartitionSpec
from firmware_sim.profiles import DEVICES, NETWORKS
from firmware_sim.simulation import ScoringConfig, run_simulation

log = logging.getLogger(__name__)

SECTION = "## Simulation"


@dataclass(frozen=True)
class ExperimentConfig:
    """Shared settings of every experiment."""

    out_dir: Path
    data_dir: str | None = None
    dataset: str = "mnist"
    backend: str = "auto"
    seed: int = 0
    images: int = 30000
    test_images: int = 10000
    validation_images: int = 5000
    preset: str = "bindsnet"
    config_path: str | None = None
    overrides: tuple[str, ...] = ()
    broker_url: str | None = None
    broker_kind: str = "amqtt"
    docs: Path | None = None
    scale: float = 1.0  # neurons x scale (tests run tiny versions)
    ga_seconds: float = 540.0
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    labels: str = "federated"  # fleet experiments: FleetConfig.labels
    calibrate_images: int = DEFAULT_CALIBRATE_IMAGES  # fleet experiments: FleetConfig's

    def __post_init__(self) -> None:
        if not 0 < self.scale <= 10:
            raise ConfigError(f"scale must be in (0, 10], got {self.scale}")
        if self.images < 10 or self.test_images < 1:
            raise ConfigError("experiments need at least 10 training and 1 test image")

    def neurons(self, n: int) -> int:
        return max(2, round(n * self.scale))


@dataclass
class Context:
    """What an experiment needs at run time."""

    config: ExperimentConfig
    display: Display
    command: str

    def params(self):  # noqa: ANN201 - NetworkParams
        c = self.config
        return load_params(c.preset, c.config_path, list(c.overrides))

    def test_set(self):  # noqa: ANN201
        c = self.config
        return load_mnist("test", c.data_dir, c.dataset, limit=c.test_images)

    def model_path(self, neurons: int) -> Path:
        """Where the single model of ``neurons`` trained on the pool is cached."""
        c = self.config
        tag = f"{neurons}-{c.images}-s{c.seed}-{c.preset}"
        if c.overrides or c.config_path:
            tag += "-" + hashlib.sha256(repr((c.overrides, c.config_path)).encode()).hexdigest()[:8]
        return c.out_dir / "models" / f"single-{tag}.estdp"

    def trained(self, neurons: int) -> tuple[SubModel, float]:
        """A single model of ``neurons`` trained on the pool (cached); and its train seconds."""
        c = self.config
        path = self.model_path(neurons)
        params = self.params()
        if path.exists():
            model = load_model(path)
            if model.params == params:
                return model, float(model.provenance.notes.get("train_seconds", "nan"))
        images, labels = load_mnist("train", c.data_dir, c.dataset, limit=c.images)
        self.display.message(f"training a {neurons}-neuron model on {images.shape[0]} images")
        run = train_model(
            images,
            labels,
            neurons,
            params,
            resolve_backend(c.backend),
            seed=c.seed,
            node_id=f"single-{neurons}",
        )
        notes = {**run.model.provenance.notes, "train_seconds": f"{run.train_seconds:.3f}"}
        model = with_notes(run.model, notes)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, path)
        return model, run.train_seconds

    def fleet(self, name: str, **changes: Any) -> FleetConfig:
        c = self.config
        nodes = changes.get("nodes", 5)
        base = FleetConfig(
            run_dir=c.out_dir / name,
            images=c.images,
            devices=(DEVICES["host"],) * nodes,
            networks=(NETWORKS["lan"],) * nodes,
            backend=c.backend,
            seed=c.seed,
            broker_url=c.broker_url,
            broker_kind=c.broker_kind,
            fleet=re.sub(r"[^A-Za-z0-9_.-]", "-", f"exp-{name}"),
            data_dir=c.data_dir,
            dataset=c.dataset,
            preset=c.preset,
            config_path=c.config_path,
            overrides=c.overrides,
            labels=c.labels,
            calibrate_images=c.calibrate_images,
        )
        return dataclasses.replace(base, **changes)

    def simulate(self, name: str, title: str, **changes: Any) -> dict[str, Any]:
        scoring = ScoringConfig(
            test_images=self.config.test_images, curve=False, merge_time_repeats=1
        )
        return run_simulation(
            self.fleet(name, **changes),
            scoring,
            display=self.display,
            command=self.command,
            title=title,
        )


# ---- experiments ------------------------------------------------------------------------


def compression(ctx: Context) -> dict[str, Any]:
    c = ctx.config
    model, train_s = ctx.trained(c.neurons(300))
    test_x, test_y = ctx.test_set()
    step = max(1, round(50 * c.scale))
    removed = evaluation.removal_points(model.n_neurons, 5 * step, step)
    with evaluation.ScorePool(test_x, test_y, resolve_backend(c.backend), c.jobs) as pool:
        collect = evaluation.compression_curve(
            pool, ctx.model_path(model.n_neurons), model.n_neurons, removed
        )
        curve = collect()
    rows = [
        {
            "removed": r,
            "neurons": model.n_neurons - r,
            **{f"accuracy {m}": curve["metrics"][m][i] for m in curve["metrics"]},
        }
        for i, r in enumerate(removed)
    ]
    return {
        "title": f"Compression vs accuracy: {model.n_neurons}-neuron model on {c.images} images",
        "compression_curve": curve,
        "tables": [{"title": "Accuracy by neurons removed", "rows": rows}],
        "train_seconds": train_s,
    }


def merge_time(ctx: Context) -> dict[str, Any]:
    c = ctx.config
    model, _ = ctx.trained(c.neurons(300))
    big, _ = ctx.trained(c.neurons(500))
    step = max(1, round(50 * c.scale))
    rows = []
    for r in evaluation.removal_points(model.n_neurons, 5 * step, step)[1:]:
        row: dict[str, Any] = {"model": f"{model.n_neurons} -> {model.n_neurons - r}"}
        for m in evaluation.METRICS:
            row[f"{m} s"] = evaluation.merge_time([model], model.n_neurons - r, m, repeats=5)
        rows.append(row)
    target = c.neurons(300)
    times = {m: evaluation.merge_time([big], target, m, repeats=5) for m in evaluation.METRICS}
    rows.append(
        {"model": f"{big.n_neurons} -> {target}", **{f"{m} s": t for m, t in times.items()}}
    )
    return {
        "title": "Merge time per metric (median of 5 runs)",
        "merge_times": times,
        "tables": [{"title": "Seconds per merge (concatenate, similarity, removal)", "rows": rows}],
    }


def _table(results: dict[str, Any], kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    return [m for m in results.get("models", []) if m["kind"] in kinds]


def ensemble(ctx: Context) -> dict[str, Any]:
    c = ctx.config
    target = c.neurons(300)
    runs = {}
    for nodes, per in ((5, 100), (2, 250)):
        name = f"{nodes}x{c.neurons(per)}"
        runs[name] = ctx.simulate(
            f"ensemble-{name}",
            f"Ensemble {name} -> {target}",
            nodes=nodes,
            neurons=c.neurons(per),
            target=target,
            baseline_neurons=target if nodes == 5 else 0,
            devices=(DEVICES["host"],) * nodes,
            networks=(NETWORKS["lan"],) * nodes,
        )
    baseline = next(iter(_table(runs[f"5x{c.neurons(100)}"], ("baseline",))), None)
    tables = []
    for name, res in runs.items():
        ours = next(m for m in res["models"] if m["kind"] == "compressed")
        rows = []
        if baseline:
            rows.append(
                {
                    "model": "baseline",
                    "neurons": baseline["neurons"],
                    "training s": baseline["train_seconds"],
                    "accuracy": baseline["accuracy"],
                }
            )
        removed = res["config"]["nodes"] * res["config"]["neurons_per_node"] - ours["neurons"]
        rows.append(
            {
                "model": f"ours ({name}-{removed})",
                "neurons": ours["neurons"],
                "training s": ours["train_seconds"],
                "accuracy": ours["accuracy"],
            }
        )
        speed = (
            baseline["train_seconds"] / ours["train_seconds"]
            if baseline and ours.get("train_seconds")
            else None
        )
        tables.append(
            {
                "title": f"Single {target}-neuron model vs ours ({name} -> {target}); speed-up {speed:.2f}x"
                if speed
                else name,
                "rows": rows,
            }
        )
    return {
        "title": "Ensemble of sub-models vs a single model",
        "tables": tables,
        "runs": {k: v.get("models") for k, v in runs.items()},
    }


def ga(ctx: Context) -> dict[str, Any]:
    from aggregator.genetic import GAConfig
    from aggregator.merge import LabelledImages

    c = ctx.config
    big, _ = ctx.trained(c.neurons(500))
    target = c.neurons(300)
    test_x, test_y = ctx.test_set()
    backend = resolve_backend(c.backend)
    # Validation images come from the training set after the pool: never the test set.
    val_x, val_y = load_mnist(
        "train", c.data_dir, c.dataset, limit=c.validation_images, offset=c.images
    )
    unmerged = evaluation.score("unmerged", big, test_x, test_y, backend).accuracy
    rows = [{"method": "unmerged", "neurons": big.n_neurons, "seconds": 0.0, "accuracy": unmerged}]
    options: dict[str, dict[str, Any]] = {m: {} for m in evaluation.METRICS}
    options["ga"] = {
        "validation": LabelledImages(val_x, val_y, seed=c.seed),
        "ga": GAConfig(time_budget_s=c.ga_seconds, seed=c.seed, generations=100_000),
        "xp": backend.xp,
        "seed": c.seed,
    }
    genetic: dict[str, Any] = {}
    for method, extra in options.items():
        t0 = time.perf_counter()
        merged, merge_report = evaluation.merge_models([big], target, method, **extra)
        seconds = time.perf_counter() - t0
        acc = evaluation.score(method, merged, test_x, test_y, backend).accuracy
        ctx.display.message(f"  {method}: {100 * acc:.2f}% in {seconds:.3f} s")
        rows.append(
            {"method": method, "neurons": merged.n_neurons, "seconds": seconds, "accuracy": acc}
        )
        genetic = merge_report.get("genetic", genetic)
    return {
        "title": f"{big.n_neurons} -> {target}: similarity metrics and genetic search",
        "tables": [{"title": f"Merging {big.n_neurons} -> {target} neurons", "rows": rows}],
        "merge_times": {r["method"]: r["seconds"] for r in rows[1:]},
        "genetic": genetic,
        "validation_images": int(val_x.shape[0]),
    }


def non_iid(ctx: Context) -> dict[str, Any]:
    c = ctx.config
    target = c.neurons(300)
    rows = []
    iid_acc = None
    for spec in (
        PartitionSpec("iid"),
        PartitionSpec("dirichlet", 1.0),
        PartitionSpec("dirichlet", 0.5),
        PartitionSpec("dirichlet", 0.1),
    ):
        name = str(spec).replace(":", "-")
        res = ctx.simulate(
            f"non-iid-{name}",
            f"5 x {c.neurons(100)} -> {target} on {spec} shards",
            nodes=5,
            neurons=c.neurons(100),
            target=target,
            partition=spec,
            baseline_neurons=0,
        )
        ours = next(m for m in res["models"] if m["kind"] == "compressed")
        subs = [m["accuracy"] for m in res["models"] if m["kind"] == "sub-model"]
        if spec.scheme == "iid":
            iid_acc = ours["accuracy"]
        rows.append(
            {
                "partition": str(spec),
                "sub-model accuracy (mean)": sum(subs) / len(subs) if subs else None,
                "accuracy": ours["accuracy"],
                "points vs IID": None
                if iid_acc is None
                else round(100 * (ours["accuracy"] - iid_acc), 2),
            }
        )
    return {
        "title": f"Non-IID shards (Dirichlet) against IID, 5 x {c.neurons(100)} -> {target}",
        "tables": [{"title": "Compressed-model accuracy by partition", "rows": rows}],
    }


EXPERIMENTS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "compression": compression,
    "merge-time": merge_time,
    "ensemble": ensemble,
    "ga": ga,
    "non-iid": non_iid,
}


def run_experiment(
    name: str, config: ExperimentConfig, display: Display | None = None
) -> dict[str, Any]:
    """Run experiment ``name``; write its report under ``config.out_dir/name`` and its docs section."""
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    display = display or Display(quiet=True)
    command = (
        shlex.join(["estdp", *sys.argv[1:]])
        if sys.argv[1:2] == ["experiment"]
        else f"estdp experiment {name}"
    )
    ctx = Context(config, display, command)
    t0 = time.perf_counter()
    results = EXPERIMENTS[name](ctx)
    results.update(command=command, seconds=time.perf_counter() - t0, experiment=name)
    out = config.out_dir / name
    paths = report.write_report(results, out)
    if config.docs is not None:
        update_docs(config.docs, name, results, [p for p in paths if p.suffix == ".png"])
    return results


def docs_markdown(name: str, results: dict[str, Any], plots: list[Path], docs: Path) -> str:
    """The docs/results.md subsection of one experiment."""
    lines = [
        f"### Experiment `{name}`: {results.get('title', '')}",
        "",
        "```sh",
        results["command"],
        "```",
        "",
    ]
    for table in results.get("tables", []):
        lines += [f"{table['title']}:", "", report.format_generic(table["rows"]), ""]
    lines.append(f"({results['seconds']:.0f} s on this machine.)")
    for plot in plots:
        rel = os.path.relpath(plot.resolve(), docs.resolve().parent)
        lines += ["", f"![{plot.stem}]({rel})"]
    return "\n".join(lines) + "\n"


def _is_section(line: str) -> bool:
    """The Simulation section's heading: ``## Simulation`` or ``## Simulation (...)``."""
    line = line.rstrip("\n")
    return line == SECTION or line.startswith(SECTION + " ")


def replace_subsection(text: str, heading: str, body: str) -> str:
    """``text`` with the ``### heading...`` subsection of the Simulation section set to ``body``.

    The Simulation section (a ``## Simulation`` heading, possibly with a suffix such as
    ``(issue #5)``) is created at the end when missing; other
    sections are left byte for byte.
    """
    if not any(_is_section(line) for line in text.splitlines()):
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + SECTION + "\n\n"
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if _is_section(line))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    section = lines[start:end]
    sub = next((i for i, line in enumerate(section) if line.startswith(heading)), None)
    block = body if body.endswith("\n") else body + "\n"
    if sub is None:
        while section and not section[-1].strip():
            section.pop()
        section += ["\n", block, "\n"]
    else:
        stop = next(
            (i for i in range(sub + 1, len(section)) if section[i].startswith(("### ", "## "))),
            len(section),
        )
        section[sub:stop] = [block, "\n"]
    return "".join(lines[:start] + section + lines[end:])


def update_docs(docs: Path, name: str, results: dict[str, Any], plots: list[Path]) -> None:
    """Write experiment ``name``'s subsection into the Simulation section of ``docs``.

    The plots are copied beside the page (``img/experiment-<name>/``) so the page keeps
    its figures when the report directory (ignored by git) is gone.
    """
    text = docs.read_text() if docs.exists() else "# Results\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    copies = []
    if plots:
        img_dir = docs.parent / "img" / f"experiment-{name}"
        img_dir.mkdir(parents=True, exist_ok=True)
        for plot in plots:
            copies.append(Path(shutil.copy2(plot, img_dir / plot.name)))
    body = docs_markdown(name, results, copies, docs)
    docs.write_text(replace_subsection(text, f"### Experiment `{name}`", body))
