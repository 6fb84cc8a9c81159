"""The report of a simulation or experiment: results.json, report.md and PNG plots.

Inputs are plain data (dicts, lists, arrays): this module never runs a model. Plots use
matplotlib's Agg backend (no display needed); matplotlib is imported only when a plot is
written, and a missing matplotlib skips the plots with a note instead of failing the run.

Plots
-----
- ``compression.png``: accuracy against neurons removed, one line per metric (the seed's
  compression-vs-accuracy figure);
- ``merge_time.png``: merge time per metric (log scale when they differ by 10x or more);
- ``receptive_fields.png``: each neuron's 784 input weights as a 28 x 28 tile, tiles on a
  ceil(sqrt(n))-column grid one pixel apart, one shared colour scale from 0 to the largest
  weight;
- ``per_node.png``: accuracy of each sub-model, with the merged, compressed and baseline
  models as horizontal lines;
- ``rounds.png``: accuracy of the global model per round (when there is more than one).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_JSON = "results.json"
REPORT_MD = "report.md"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(results: Mapping[str, Any], path: Path) -> Path:
    """Write ``results`` as indented JSON, atomically (temp file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 60:.2f} min" if value >= 120 else f"{value:.1f} s"


def format_table(rows: Sequence[Mapping[str, Any]], *, markdown: bool = False) -> str:
    """The comparison table: model, neurons, training wall time, both accuracies.

    Each row has ``model``, ``neurons``, ``train_seconds`` (or None), ``accuracy`` and
    ``accuracy_proportion`` (fractions, or None).
    """
    header = ["model", "neurons", "training time", "accuracy", "accuracy (prop.)"]
    body = [
        [
            str(r["model"]),
            str(r["neurons"]),
            _secs(r.get("train_seconds")),
            _pct(r.get("accuracy")),
            _pct(r.get("accuracy_proportion")),
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
    fmt = [f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths)]
    lines = ["  ".join(f.format(h) for f, h in zip(fmt, header, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(f.format(c) for f, c in zip(fmt, row, strict=True)) for row in body]
    return "\n".join(lines)


def tile_fields(weights: np.ndarray, side: int = 28, gap: int = 1) -> np.ndarray:
    """Receptive fields as one image: (n_input, n) weights -> a grid of side x side tiles.

    Tiles are ``gap`` pixels apart; the gaps and empty cells are NaN so a plot leaves them
    blank.
    """
    n_input, n = weights.shape
    if n_input != side * side:
        raise ValueError(f"weights have {n_input} inputs, not {side} x {side}")
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    pitch = side + gap
    grid = np.full((rows * pitch - gap, cols * pitch - gap), np.nan, dtype=np.float32)
    for j in range(n):
        r, c = divmod(j, cols)
        tile = weights[:, j].reshape(side, side)
        grid[r * pitch : r * pitch + side, c * pitch : c * pitch + side] = tile
    return grid


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_compression(curve: Mapping[str, Any], path: Path) -> Path:
    """``curve``: {"removed": [...], "start_neurons": n, "metrics": {name: [acc, ...]}}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for metric, accs in curve["metrics"].items():
        ax.plot(curve["removed"], [100 * a for a in accs], marker="o", label=metric)
    ax.set_xlabel(f"neurons removed (from {curve.get('start_neurons', '?')})")
    ax.set_ylabel("test accuracy (%)")
    images = curve.get("test_images")
    ax.set_title("Compression vs accuracy" + (f" ({images} test images)" if images else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_merge_times(times: Mapping[str, float], path: Path) -> Path:
    """Bar chart of merge seconds per metric."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = list(times)
    values = [times[n] for n in names]
    bars = ax.bar(names, values, color="tab:blue")
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) >= 10:
        ax.set_yscale("log")
    for bar, value in zip(bars, values, strict=True):
        label = f"{1000 * value:.1f} ms" if value < 1 else f"{value:.2f} s"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
    ax.set_ylabel("merge time (s)")
    ax.set_title("Merge time per metric")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_receptive_fields(weights: np.ndarray, path: Path, title: str = "") -> Path:
    """The global model's receptive fields as a grid of 28 x 28 tiles."""
    plt = _pyplot()
    grid = tile_fields(np.asarray(weights, dtype=np.float32))
    side = 8.0 * grid.shape[0] / max(grid.shape[1], 1)
    fig, ax = plt.subplots(figsize=(8.0, max(2.0, side)))
    vmax = float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0
    image = ax.imshow(grid, cmap="hot_r", vmin=0.0, vmax=vmax or 1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"Receptive fields ({weights.shape[1]} neurons)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_per_node(
    per_node: Sequence[Mapping[str, Any]], references: Mapping[str, float], path: Path
) -> Path:
    """Bars: accuracy per sub-model; lines: merged / compressed / baseline accuracy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = [str(p["node"]) for p in per_node]
    ax.bar(names, [100 * (p["accuracy"] or 0.0) for p in per_node], color="tab:gray")
    colors = ("tab:blue", "tab:green", "tab:red", "tab:purple")
    for (label, value), color in zip(references.items(), colors, strict=False):
        ax.axhline(100 * value, color=color, linestyle="--", label=f"{label} {100 * value:.2f}%")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy per node")
    if references:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_rounds(rounds: Sequence[Mapping[str, Any]], baseline: float | None, path: Path) -> Path:
    """Accuracy of the global model per round."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [100 * (r.get("accuracy") or 0.0) for r in rounds], marker="o", label="global")
    if baseline is not None:
        ax.axhline(100 * baseline, color="tab:red", linestyle="--", label="baseline")
    ax.set_xticks(xs)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Global model accuracy per round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(
    results: Mapping[str, Any], out_dir: Path, global_weights: np.ndarray | None = None
) -> tuple[list[Path], str | None]:
    """Every plot whose data is in ``results``; returns (paths, note when skipped)."""
    try:
        _pyplot()
    except ImportError as exc:
        return [], f"plots skipped: matplotlib is not installed ({exc}); pip install '.[plot]'"
    paths: list[Path] = []
    if results.get("compression_curve"):
        paths.append(plot_compression(results["compression_curve"], out_dir / "compression.png"))
    if results.get("merge_times"):
        paths.append(plot_merge_times(results["merge_times"], out_dir / "merge_time.png"))
    if global_weights is not None:
        paths.append(plot_receptive_fields(global_weights, out_dir / "receptive_fields.png"))
    if results.get("per_node"):
        refs = {
            r["model"]: r["accuracy"]
            for r in results.get("models", [])
            if r.get("kind") in ("merged", "compressed", "baseline") and r.get("accuracy")
        }
        paths.append(plot_per_node(results["per_node"], refs, out_dir / "per_node.png"))
    rounds = [r for r in results.get("rounds", []) if r.get("accuracy") is not None]
    if len(rounds) > 1:
        base = results.get("baseline_accuracy")
        paths.append(plot_rounds(rounds, base, out_dir / "rounds.png"))
    return paths, None


def render_markdown(results: Mapping[str, Any], plots: Sequence[Path]) -> str:
    """report.md: title, command, table, speed-up, rounds, curve, merge times, plots."""
    lines = [f"# {results.get('title', 'Simulation report')}", ""]
    if results.get("command"):
        lines += ["```sh", str(results["command"]), "```", ""]
    if results.get("summary"):
        lines += [str(results["summary"]), ""]
    if results.get("models"):
        lines += [format_table(results["models"], markdown=True), ""]
    if results.get("speedup") is not None:
        lines += [f"Training speed-up against the baseline: {results['speedup']:.2f}x", ""]
    for table in results.get("tables", []):
        lines += [f"## {table['title']}", "", format_generic(table["rows"]), ""]
    rounds = results.get("rounds") or []
    if rounds:
        lines += [
            "## Rounds",
            "",
            "| round | updates | merge time | labels | accuracy |",
            "|---|---|---|---|---|",
        ]
        for r in rounds:
            merge = "-" if r.get("merge_seconds") is None else f"{1000 * r['merge_seconds']:.1f} ms"
            labels = r.get("labels") or "-"
            if labels == "federated" and r.get("label_nodes") is not None:
                labels += f" ({r['label_nodes']} nodes, {r.get('label_images')} images"
                if r.get("calibration_images"):
                    labels += f"; thresholds calibrated on {r['calibration_images']}"
                labels += ")"
            lines.append(
                f"| {r['round']} | {len(r.get('nodes', []))}/{r.get('expected', '?')} | "
                f"{merge} | {labels} | {_pct(r.get('accuracy'))} |"
            )
        lines.append("")
    curve = results.get("compression_curve")
    if curve:
        names = list(curve["metrics"])
        lines += [
            "## Accuracy against neurons removed",
            "",
            f"From {curve.get('start_neurons', '?')} neurons, on {curve.get('test_images', '?')} "
            "test images.",
            "",
            "| removed | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for i, removed in enumerate(curve["removed"]):
            cells = [_pct(curve["metrics"][m][i]) for m in names]
            lines.append(f"| {removed} | " + " | ".join(cells) + " |")
        lines.append("")
    times = results.get("merge_times")
    if times:
        lines += ["## Merge time per metric", "", "| metric | seconds |", "|---|---|"]
        lines += [f"| {m} | {t:.4f} |" for m, t in times.items()]
        lines.append("")
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    if results.get("notes"):
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots]
        lines.append("")
    return "\n".join(lines)


def format_generic(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table from uniform dict rows (floats in [0, 1] under 'accuracy' as %)."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = []
        for key in keys:
            value = row.get(key)
            if isinstance(value, float) and "accuracy" in key:
                cells.append(_pct(value))
            elif isinstance(value, float):
                cells.append(f"{value:.4g}")
            else:
                cells.append("-" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    results: Mapping[str, Any], out_dir: str | Path, global_weights: np.ndarray | None = None
) -> list[Path]:
    """Write results.json, the plots and report.md into ``out_dir``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots, note = write_plots(results, out, global_weights)
    results = dict(results)
    if note:
        results["notes"] = [*results.get("notes", []), note]
    results["plots"] = [p.name for p in plots]
    json_path = write_json(results, out / RESULTS_JSON)
    md_path = out / REPORT_MD
    md_path.write_text(render_markdown(results, plots))
    return [json_path, md_path, *plots]
