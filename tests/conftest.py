"""Shared fixtures: where the real MNIST lives, and GPU/broker availability."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from estdp.broker import EmbeddedBroker

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_mnist_dir() -> Path | None:
    """../shared/data/mnist beside the checkout (or $ESTDP_TEST_MNIST), when present."""
    candidates = [
        os.environ.get("ESTDP_TEST_MNIST"),
        REPO_ROOT.parent / "shared" / "data" / "mnist",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "t10k-labels-idx1-ubyte.gz").exists():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    path = shared_mnist_dir()
    if path is None:
        pytest.skip("the shared MNIST files (../shared/data/mnist) are not present")
    return path


# ---- MQTT brokers for integration tests -----------------------------------------------------


def _local_broker_kind() -> str:
    from estdp.broker import mosquitto_binary

    return "mosquitto" if mosquitto_binary() else "amqtt"


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """mqtt://127.0.0.1:PORT of a running broker, for the whole session.

    $ESTDP_TEST_BROKER when set; else the Mosquitto on 127.0.0.1:1883 when it answers; else
    a ``mosquitto`` started on a free port when the binary exists; else the embedded amqtt
    broker. Tests share it: each must use its own fleet name (topics under estdp/<fleet>/).
    """
    from estdp.broker import EmbeddedBroker, mqtt_answers

    configured = os.environ.get("ESTDP_TEST_BROKER")
    if configured:
        yield configured
        return
    if mqtt_answers("127.0.0.1", 1883, timeout=0.5):
        yield "mqtt://127.0.0.1:1883"
        return
    with EmbeddedBroker(_local_broker_kind()) as broker:
        yield broker.url


@pytest.fixture
def private_broker() -> Iterator[EmbeddedBroker]:
    """A throwaway broker of this test's own, to stop, kill and restart (mosquitto when
    installed, else amqtt)."""
    from estdp.broker import EmbeddedBroker

    with EmbeddedBroker(_local_broker_kind()) as broker:
        yield broker
