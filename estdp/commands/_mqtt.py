"""Broker flags shared by the ``node`` and ``aggregator`` verbs, and the SIGTERM hook."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from estdp.commands._common import emit_json, positive_int, positive_seconds
from estdp.errors import ConfigError
from estdp.protocol import DEFAULT_LIMITS, Limits
from estdp.topics import validate_id
from estdp.transport import (
    ConnectStopped,
    Transport,
    TransportConfig,
    Will,
    mqtt_transport,
    parse_broker_url,
)
from estdp.transport.base import PROTOCOLS
from estdp.transport.channel import DEFAULT_MAX_PACKET_BYTES, Channel

PASSWORD_ENV = "ESTDP_MQTT_PASSWORD"

log = logging.getLogger(__name__)


def add_broker_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("broker")
    group.add_argument(
        "--broker",
        required=True,
        metavar="URL",
        help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS)",
    )
    group.add_argument(
        "--fleet", default="default", help="fleet name: topics live under estdp/<fleet>/"
    )
    group.add_argument(
        "--ca", metavar="PEM", default=None, help="CA certificate to verify the broker with"
    )
    group.add_argument(
        "--cert", metavar="PEM", default=None, help="client certificate (mutual TLS)"
    )
    group.add_argument("--key", metavar="PEM", default=None, help="client private key (mutual TLS)")
    group.add_argument("--username", default=None, help="MQTT username")
    group.add_argument(
        "--password-file",
        metavar="FILE",
        default=None,
        help=f"file holding the MQTT password (or set ${PASSWORD_ENV})",
    )
    group.add_argument(
        "--mqtt-protocol",
        choices=PROTOCOLS,
        default="auto",
        help="MQTT version: auto (5 where the broker offers it, else 3.1.1; default), 5, 3.1.1",
    )
    group.add_argument(
        "--max-packet-bytes",
        type=positive_int,
        default=DEFAULT_MAX_PACKET_BYTES,
        help="larger messages are sent in chunks (default 1000000: EMQX's default limit)",
    )
    group.add_argument(
        "--max-message-bytes",
        type=positive_int,
        default=DEFAULT_LIMITS.max_message_bytes,
        help="refuse received messages larger than this, whole or reassembled (default 64 MiB)",
    )
    group.add_argument(
        "--connect-timeout",
        type=positive_seconds,
        default=60.0,
        help="seconds to keep trying the first connection (default 60)",
    )
    group.add_argument("--json", action="store_true", help="print status events as JSON lines")


def transport_config(
    args: argparse.Namespace, client_id: str, will: Will | None = None
) -> TransportConfig:
    fields: dict[str, Any] = dict(parse_broker_url(args.broker))
    validate_id(args.fleet, "fleet")
    password = fields.pop("password", None)
    if args.password_file:
        try:
            password = Path(args.password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --password-file: {exc}") from None
    password = password or os.environ.get(PASSWORD_ENV) or None
    username = args.username or fields.pop("username", None)
    fields.pop("username", None)
    for flag in ("ca", "cert", "key"):
        value = getattr(args, flag)
        if value and not Path(value).is_file():
            raise ConfigError(f"--{flag} {value}: no such file")
    tls = bool(fields.pop("tls")) or bool(args.ca or args.cert)
    return TransportConfig(
        client_id=client_id,
        tls=tls,
        ca_file=args.ca,
        cert_file=args.cert,
        key_file=args.key,
        username=username,
        password=password,
        will=will,
        protocol=args.mqtt_protocol,
        **fields,
    )


def open_channel(
    args: argparse.Namespace,
    client_id: str,
    will: Will | None = None,
    *,
    stop: threading.Event | None = None,
) -> Channel:
    """Connect to the broker and wrap the transport in a channel.

    ``stop`` (default: the event of :func:`stop_on_sigterm`, once installed) ends the
    connection attempts at once: a SIGTERM must not wait out ``--connect-timeout``.

    Raises
    ------
    ConnectStopped
        The stop came first; the ``stopped`` event was printed (``--json``) and logged.
    """
    transport: Transport = mqtt_transport(transport_config(args, client_id, will))
    try:
        transport.connect(timeout=args.connect_timeout, stop=stop or _stop_request)
    except ConnectStopped:
        reason = stop_reason() or "stop requested"
        log.info("%s: stopped (%s) before connecting to %s", client_id, reason, args.broker)
        event_printer(args)(
            {
                "event": "stopped",
                "client_id": client_id,
                "reason": reason,
                "phase": "connecting",
                "time_unix": round(time.time(), 3),
            }
        )
        raise
    return Channel(
        transport,
        max_packet_bytes=args.max_packet_bytes,
        limits=Limits(max_message_bytes=args.max_message_bytes),
    )


def event_printer(args: argparse.Namespace) -> Callable[[dict[str, Any]], None]:
    """Print events as JSON lines with --json; otherwise leave them to the logs."""
    if args.json:
        return emit_json
    return lambda event: None


# The event of the last stop_on_sigterm() (one per process: signals are per process), and
# the name of the signal that set it.
_stop_request: threading.Event | None = None
_stop_signal: str | None = None


def stop_on_sigterm() -> threading.Event:
    """An event set by SIGTERM (and SIGINT), for a clean shutdown.

    :func:`open_channel` uses it too, so a signal also ends the first connection's
    retries.
    """
    global _stop_request
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        global _stop_signal
        _stop_signal = signal.Signals(signum).name
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    _stop_request = stop
    return stop


def stop_reason() -> str | None:
    """The signal (e.g. ``"SIGTERM"``) that set the :func:`stop_on_sigterm` event, if any."""
    return _stop_signal
