"""The ``estdp`` command line: one verb per module in :mod:`estdp.commands`.

Errors a user can cause end as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from estdp import __version__
from estdp.errors import EstdpError

# Verb modules, in the order `estdp --help` lists them. A module that fails to import
# (e.g. a verb still being built) must not take the whole CLI down.
COMMAND_MODULES = (
    "train",
    "eval",
    "merge",
    "node",
    "aggregator",
    "broker",
    "simulate",
    "experiment",
)

EXIT_USAGE = 2
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, with the usual exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="estdp", description="Distributed on-device STDP learning.")
    parser.add_argument("--version", action="version", version=f"estdp {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("ESTDP_LOG_LEVEL", "WARNING"),
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging threshold (default: WARNING, or $ESTDP_LOG_LEVEL)",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"estdp.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"estdp.commands.{name}":
                continue
            raise
        sub = verbs.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args._run(args) or 0)
    except EstdpError as exc:
        print(f"estdp {args.verb}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"estdp {args.verb}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
