"""The baseline of a simulation: one model on the whole training pool, in its own process.

Run by the orchestrator as ``python -m firmware_sim.baseline ...``. It trains with the
same workflow as ``estdp train`` (one pass, then labels from a frozen pass), saves the
model, and reports on stdout as JSON lines: ``progress`` while training, then ``done``
with the training wall and CPU seconds, or ``error`` with a one-line message.
"""

from __future__ import annotations

import argparse
import sys
import time

from edge_node.workflow import train_model
from estdp.backend import resolve_backend
from estdp.commands._common import add_backend_arg, add_data_args, add_params_args, params_from_args
from estdp.datasets import load_mnist
from estdp.errors import EstdpError
from estdp.model import save_model
from firmware_sim.pacing import ProgressLines, emit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="firmware_sim.baseline", description=__doc__)
    parser.add_argument("--neurons", type=int, required=True)
    parser.add_argument("--images", type=int, required=True)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    add_data_args(parser)
    add_backend_arg(parser)
    add_params_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = params_from_args(args)
        backend = resolve_backend(args.backend)
        images, labels = load_mnist(
            "train", args.data, args.dataset, limit=args.images, offset=args.offset
        )
        emit({"event": "started", "images": int(images.shape[0]), "backend": backend.name})
        cpu0 = time.process_time()
        run = train_model(
            images,
            labels,
            args.neurons,
            params,
            backend,
            seed=args.seed,
            node_id="baseline",
            progress=ProgressLines(int(images.shape[0])),
        )
        cpu = time.process_time() - cpu0
        save_model(run.model, args.out)
    except EstdpError as exc:
        emit({"event": "error", "message": str(exc)})
        return 1
    emit(
        {
            "event": "done",
            "path": args.out,
            "neurons": run.model.n_neurons,
            "images": int(images.shape[0]),
            "train_seconds": run.train_seconds,
            "label_seconds": run.label_seconds,
            "cpu_seconds": cpu,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
