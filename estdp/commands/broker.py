"""``estdp broker``: run an MQTT broker for one machine in the foreground."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

from estdp.broker import BROKER_KINDS, DEFAULT_KIND, EmbeddedBroker
from estdp.commands._common import emit_json, non_negative_int

NAME = "broker"
HELP = "run an MQTT broker on this machine (amqtt by default, or mosquitto) until stopped"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kind",
        choices=BROKER_KINDS,
        default=DEFAULT_KIND,
        help="amqtt (pure Python, always installed; default), mosquitto (the binary on "
        "PATH), or auto (mosquitto when installed, else amqtt)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=non_negative_int, default=0, help="TCP port (default 0: a free port)"
    )
    parser.add_argument(
        "--max-packet-bytes",
        type=non_negative_int,
        default=0,
        help="mosquitto only: largest MQTT packet accepted (default: no limit)",
    )
    parser.add_argument("--json", action="store_true", help="print the broker URL as a JSON line")


def run(args: argparse.Namespace) -> int:
    broker = EmbeddedBroker(
        args.kind, args.host, args.port, max_packet_bytes=args.max_packet_bytes or None
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    broker.start()
    try:
        if args.json:
            emit_json({"event": "broker_started", "kind": broker.kind, "url": broker.url})
        else:
            print(f"{broker.kind} broker listening at {broker.url} (Ctrl-C to stop)", flush=True)
        while not stop.is_set() and broker.is_running:
            stop.wait(0.5)
        if not stop.is_set():
            print(f"estdp broker: the broker exited: {broker.log_tail()}", flush=True)
            return 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        broker.close()
        signal.signal(signal.SIGTERM, previous)
