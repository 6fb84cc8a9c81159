"""An MQTT broker for one machine: simulations, tests and single-host fleets.

Two kinds, each run as a child process so it can be stopped, killed and restarted on the
same port (fault tests do all three):

- ``amqtt`` (the default): a pure-Python MQTT 3.1.1 broker from PyPI, installed with
  ensemble-stdp, so ``estdp broker`` and the simulator work on any machine without
  system packages. It has no packet-size limit and no persistence; clients speak 3.1.1
  to it (the transport falls back from MQTT 5 by itself).
- ``mosquitto``: the ``mosquitto`` binary on PATH (MQTT 5, faster, a packet-size limit
  like production's). ``auto`` picks it when present, else amqtt.

Both listen on the loopback interface only, on a free port unless one is given, without
authentication or persistence: a development broker, never one for a network (the
production broker configuration is in ``deploy/broker/``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from estdp.errors import ConfigError, TransportError

log = logging.getLogger(__name__)

BROKER_KINDS = ("amqtt", "mosquitto", "auto")
DEFAULT_KIND = "amqtt"
_MOSQUITTO_FALLBACKS = (
    "/usr/sbin/mosquitto",
    "/usr/local/sbin/mosquitto",
    "/opt/homebrew/sbin/mosquitto",
)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str | None:
    """Path of a ``mosquitto`` executable (PATH, then the usual sbin directories)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _MOSQUITTO_FALLBACKS:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def mqtt_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when an MQTT broker at ``host:port`` accepts an anonymous 3.1.1 CONNECT."""
    client_id = b"estdp-probe-%d" % os.getpid()
    variable = b"\x00\x04MQTT\x04\x02\x00\x0a"  # protocol 3.1.1, clean session, keep-alive 10
    body = variable + len(client_id).to_bytes(2, "big") + client_id
    packet = b"\x10" + bytes([len(body)]) + body
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(packet)
            reply = sock.recv(4)
            with contextlib.suppress(OSError):
                sock.sendall(b"\xe0\x00")  # DISCONNECT
    except OSError:
        return False
    return len(reply) == 4 and reply[0] == 0x20 and reply[3] == 0


def _port_taken(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def resolve_kind(kind: str) -> str:
    """``amqtt`` or ``mosquitto`` for a requested kind.

    Raises
    ------
    ConfigError
        Unknown kind, or ``mosquitto`` asked for and not installed.
    """
    if kind not in BROKER_KINDS:
        raise ConfigError(f"unknown broker kind {kind!r}; choose one of {', '.join(BROKER_KINDS)}")
    if kind == "auto":
        return "mosquitto" if mosquitto_binary() else "amqtt"
    if kind == "mosquitto" and mosquitto_binary() is None:
        raise ConfigError("broker kind 'mosquitto' asked for, but no mosquitto binary is installed")
    return kind


def mosquitto_config(host: str, port: int, max_packet_bytes: int | None = None) -> str:
    """A development Mosquitto configuration: loopback, anonymous, no persistence."""
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
    ]
    if max_packet_bytes:
        lines.append(f"max_packet_size {int(max_packet_bytes)}")
    return "\n".join(lines) + "\n"


def amqtt_config(host: str, port: int) -> dict[str, object]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # Anonymous access only: the $SYS and packet-logging plugins of amqtt's default
        # configuration cost time on every packet and serve nobody here.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def serve_amqtt(host: str, port: int) -> None:
    """Run an amqtt broker in the foreground until SIGINT or SIGTERM."""
    from amqtt.broker import Broker  # imported here: only the broker process needs it

    # amqtt logs every connection at INFO and a warning per refused MQTT 5 attempt.
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    logging.getLogger("transitions").setLevel(logging.WARNING)

    async def main() -> None:
        broker = Broker(amqtt_config(host, port))
        await broker.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info("amqtt broker listening on %s:%d", host, port)
        await stop.wait()
        await broker.shutdown()

    asyncio.run(main())


class EmbeddedBroker:
    """A broker child process on one loopback port.

    Parameters
    ----------
    kind
        ``amqtt`` (default), ``mosquitto`` or ``auto``; see the module docstring.
    host
        Interface to listen on.
    port
        0 picks a free port (kept across :meth:`restart`).
    max_packet_bytes
        Mosquitto's ``max_packet_size``; amqtt has no such limit.

    Examples
    --------
    >>> with EmbeddedBroker() as broker:  # doctest: +SKIP
    ...     print(broker.url)
    mqtt://127.0.0.1:40123
    """

    def __init__(
        self,
        kind: str = DEFAULT_KIND,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_packet_bytes: int | None = None,
    ) -> None:
        self.kind = resolve_kind(kind)
        self.host = host
        self.port = port or free_port(host)
        self.max_packet_bytes = max_packet_bytes
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="estdp-broker-")
        self._log = Path(self._dir.name) / "broker.log"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The command line of the broker process."""
        if self.kind == "mosquitto":
            conf = Path(self._dir.name) / "mosquitto.conf"
            conf.write_text(mosquitto_config(self.host, self.port, self.max_packet_bytes))
            return [str(mosquitto_binary()), "-c", str(conf)]
        return [sys.executable, "-m", "estdp.broker", "--host", self.host, "--port", str(self.port)]

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        """Start the broker and wait until it answers MQTT.

        Raises
        ------
        TransportError
            It exited or did not answer within ``timeout`` (the message holds its log).
        """
        if self.is_running:
            return self
        if _port_taken(self.host, self.port):
            raise TransportError(
                f"cannot start a {self.kind} broker: {self.host}:{self.port} is in use"
            )
        with open(self._log, "ab") as log_file:
            self._proc = subprocess.Popen(
                self.command(), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while not mqtt_answers(self.host, self.port, timeout=0.5):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise TransportError(
                    f"the {self.kind} broker on {self.host}:{self.port} did not start: {self.log_tail()}"
                )
            time.sleep(0.05)
        log.info("%s broker running at %s (pid %d)", self.kind, self.url, self._proc.pid)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout``)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Kill the broker at once (SIGKILL), as a crash would."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self, timeout: float = 20.0, *, down_s: float = 0.0) -> None:
        """Stop and start again on the same port, after ``down_s`` seconds of absence."""
        self.stop()
        time.sleep(down_s)
        self.start(timeout)

    def log_tail(self, n_bytes: int = 2000) -> str:
        try:
            data = self._log.read_bytes()[-n_bytes:]
        except OSError:
            return "(no log)"
        return data.decode("utf-8", "replace").strip() or "(empty log)"

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run the embedded amqtt broker (foreground)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve_amqtt(args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
