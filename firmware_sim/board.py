"""One simulated board: the unmodified ``estdp node`` daemon, behind a device and a network profile.

Run by the orchestrator as::

    python -m firmware_sim.board --speed 0.25 --network custom:15:10:0:0:0 --net-seed 3 \\
        -- --broker mqtt://127.0.0.1:PORT --node-id node-1 --data DIR ... (estdp node flags)

Everything after ``--`` is parsed by ``estdp node``'s own parser and run by its own
``run``; the board only wraps two of its seams:

- the transport that ``open_channel`` connects is wrapped in
  :class:`firmware_sim.netem.ImpairedTransport` (latency, loss, outages on publishes);
- the :class:`edge_node.daemon.LocalTrainer` it builds is wrapped in :class:`PacedTrainer`,
  which sleeps after training work so the board runs at its profile's ``speed``
  (:class:`firmware_sim.pacing.Pacer`): during training (progress callbacks), after the
  label-assignment pass that ends ``train`` and after each evaluation.

The seams are replaced in ``estdp.commands.node``'s namespace, in this process only; a
missing seam (the node command changed) fails at once with a clear message.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from estdp.errors import EstdpError
from firmware_sim.netem import ImpairedTransport
from firmware_sim.pacing import Pacer
from firmware_sim.profiles import pace_delay, parse_network

SEAMS = ("open_channel", "LocalTrainer")


class PacedTrainer:
    """A node trainer that runs at ``speed`` times the host's pace (see the module docstring)."""

    def __init__(self, inner: Any, speed: float) -> None:
        self.inner = inner
        self.speed = speed

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def train(self, announcement: Any, n_neurons: int, start: Any, progress: Any) -> Any:
        pacer = Pacer(self.speed)

        def paced(done: int, total: int) -> None:
            pacer(done)
            progress(done, total)

        outcome = self.inner.train(announcement, n_neurons, start, paced)
        pacer.flush()  # the label-assignment pass after the last image
        if pacer.slept:
            outcome.metrics["paced_sleep_seconds"] = pacer.slept
        return outcome

    def evaluate(self, model: Any) -> dict[str, float]:
        cpu0 = time.thread_time()
        metrics = self.inner.evaluate(model)
        time.sleep(pace_delay(time.thread_time() - cpu0, self.speed))
        return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="firmware_sim.board", description="a simulated board")
    parser.add_argument(
        "--speed", type=float, default=1.0, help="compute speed relative to the host"
    )
    parser.add_argument(
        "--network", default="lan", help="network profile (see firmware_sim.profiles)"
    )
    parser.add_argument("--net-seed", type=int, default=0, help="seed of the network impairments")
    parser.add_argument("node_args", nargs=argparse.REMAINDER, help="-- then estdp node flags")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    node_argv = args.node_args[1:] if args.node_args[:1] == ["--"] else args.node_args
    from estdp import cli
    from estdp.commands import node as node_command

    missing = [name for name in SEAMS if not hasattr(node_command, name)]
    if missing:
        print(
            f"firmware_sim.board: estdp node lacks {', '.join(missing)}; cannot apply profiles",
            file=sys.stderr,
        )
        return 1
    try:
        network = parse_network(args.network)
    except EstdpError as exc:
        print(f"firmware_sim.board: {exc}", file=sys.stderr)
        return 2
    real_open, real_trainer = node_command.open_channel, node_command.LocalTrainer

    def open_channel(*a: Any, **kw: Any) -> Any:
        channel = real_open(*a, **kw)
        if not network.is_perfect:
            channel.transport = ImpairedTransport(channel.transport, network, seed=args.net_seed)
        return channel

    def local_trainer(*a: Any, **kw: Any) -> Any:
        trainer = real_trainer(*a, **kw)
        return trainer if args.speed >= 1.0 else PacedTrainer(trainer, args.speed)

    node_command.open_channel = open_channel
    node_command.LocalTrainer = local_trainer
    return cli.main(["node", *node_argv])


if __name__ == "__main__":
    sys.exit(main())
