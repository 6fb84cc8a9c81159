"""The embedded broker: both kinds start, answer, stop and restart; the `estdp broker` verb."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from estdp.broker import (
    DEFAULT_KIND,
    EmbeddedBroker,
    free_port,
    mosquitto_binary,
    mosquitto_config,
    mqtt_answers,
    resolve_kind,
)
from estdp.errors import ConfigError, TransportError

pytestmark = pytest.mark.broker

KINDS = ["amqtt"] + (["mosquitto"] if mosquitto_binary() else [])


def test_default_is_the_pure_python_broker() -> None:
    assert DEFAULT_KIND == "amqtt"
    assert resolve_kind("auto") == ("mosquitto" if mosquitto_binary() else "amqtt")
    with pytest.raises(ConfigError):
        resolve_kind("emqx")


@pytest.mark.parametrize("kind", KINDS)
def test_start_stop_restart_kill(kind: str) -> None:
    broker = EmbeddedBroker(kind)
    try:
        broker.start()
        assert broker.is_running and mqtt_answers(broker.host, broker.port)
        port = broker.port
        broker.restart()
        assert broker.port == port and mqtt_answers(broker.host, port)
        broker.kill()
        assert not broker.is_running and not mqtt_answers(broker.host, port, timeout=0.2)
    finally:
        broker.close()


def test_nothing_answers_on_a_free_port() -> None:
    assert not mqtt_answers("127.0.0.1", free_port(), timeout=0.2)


def test_a_taken_port_or_a_failing_broker_is_reported() -> None:
    with EmbeddedBroker("amqtt") as first, pytest.raises(TransportError, match="is in use"):
        EmbeddedBroker("amqtt", port=first.port).start()
    failing = EmbeddedBroker("amqtt")
    failing.command = lambda: [sys.executable, "-c", "print('boom'); raise SystemExit(3)"]  # type: ignore[method-assign]
    with pytest.raises(TransportError, match="did not start: boom"):
        failing.start(timeout=5)
    failing.close()


def test_mosquitto_config_is_loopback_and_limited() -> None:
    text = mosquitto_config("127.0.0.1", 1999, 1_000_000)
    assert "listener 1999 127.0.0.1" in text and "max_packet_size 1000000" in text
    assert "persistence false" in text


# The verb module on its own, as estdp.cli runs it (without importing every other verb).
VERB = (
    "import argparse, sys; from estdp.commands import broker as verb; "
    "p = argparse.ArgumentParser(); verb.add_arguments(p); sys.exit(verb.run(p.parse_args()))"
)


def test_the_broker_verb_runs_in_the_foreground_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", VERB, "--kind", "amqtt", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        record = json.loads(line)
        assert record["kind"] == "amqtt" and record["url"].startswith("mqtt://127.0.0.1:")
        port = int(record["url"].rsplit(":", 1)[1])
        assert mqtt_answers("127.0.0.1", port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not mqtt_answers("127.0.0.1", port, timeout=0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
