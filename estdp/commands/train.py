"""``estdp train``: one pass of in-situ STDP over N training images, then label assignment."""

from __future__ import annotations

import argparse
import logging

from edge_node.workflow import train_model
from estdp.backend import resolve_backend
from estdp.commands._common import (
    add_backend_arg,
    add_data_args,
    add_params_args,
    emit_json,
    non_negative_int,
    output_path,
    params_from_args,
    positive_int,
)
from estdp.datasets import load_mnist
from estdp.model import load_model, save_model
from estdp.progress import ProgressBar

NAME = "train"
HELP = "train a Diehl & Cook network with STDP on training images and save it"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--neurons", type=positive_int, default=100, help="excitatory neurons (default 100)"
    )
    parser.add_argument(
        "--images", type=positive_int, default=10000, help="training images (default 10000)"
    )
    parser.add_argument(
        "--offset", type=non_negative_int, default=0, help="index of the first training image"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--node-id", default="local", help="node id recorded in the model's provenance"
    )
    parser.add_argument(
        "--init", metavar="MODEL", default=None, help="continue training from this model"
    )
    parser.add_argument("--out", required=True, help="where to write the model (.estdp)")
    parser.add_argument("--json", action="store_true", help="print a one-line JSON summary")
    parser.add_argument(
        "--no-prefetch",
        action="store_true",
        help="numpy backend: do not draw and prepare the next images' inputs in a second "
        "process (by default it does with 2+ CPUs and 2000+ images; same result, ~10%% faster)",
    )
    add_data_args(parser)
    add_backend_arg(parser)
    add_params_args(parser)


def run(args: argparse.Namespace) -> int:
    out = output_path(args.out)
    params = params_from_args(args)
    backend = resolve_backend(args.backend)
    start = load_model(args.init) if args.init else None
    images, labels = load_mnist(
        "train", args.data, args.dataset, limit=args.images, offset=args.offset
    )
    bar = ProgressBar(images.shape[0], label="train")
    run_ = train_model(
        images,
        labels,
        args.neurons,
        params,
        backend,
        seed=args.seed,
        node_id=args.node_id,
        start=start,
        progress=bar.update,
        prefetch=not args.no_prefetch,
    )
    bar.close()
    save_model(run_.model, out)
    summary = {
        "out": str(out),
        "backend": backend.name,
        "preset": params.preset,
        "neurons": run_.model.n_neurons,
        "images": int(images.shape[0]),
        "offset": args.offset,
        "train_seconds": round(run_.train_seconds, 3),
        "ms_per_image": round(1000 * run_.train_seconds / images.shape[0], 4),
        "label_seconds": round(run_.label_seconds, 3),
        "neurons_labelled": int((run_.model.labels >= 0).sum()),
    }
    if args.json:
        emit_json(summary)
    else:
        print(
            f"trained {summary['neurons']} neurons on {summary['images']} images in "
            f"{summary['train_seconds']:.1f} s ({summary['ms_per_image']:.2f} ms/image, {backend.name}); "
            f"labels from a frozen pass in {summary['label_seconds']:.1f} s "
            f"({summary['neurons_labelled']} neurons fired); saved {out}"
        )
    return 0
