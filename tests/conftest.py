"""Shared fixtures: where the real MNIST lives, GPU/broker availability, CUDA kernels
emulated on the CPU."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
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


# ---- CUDA kernels: emulated on the CPU, or on a real GPU --------------------------------


def load_support(name: str) -> ModuleType:
    """The module ``tests/support/<name>.py``, loaded once by path (tests/ is no package)."""
    module = sys.modules.get(f"estdp_test_{name}")
    if module is None:
        path = REPO_ROOT / "tests" / "support" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"estdp_test_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["emulated", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request, monkeypatch):
    """NumPy with the CUDA kernels emulated on the CPU, or CuPy on a real GPU."""
    if request.param == "emulated":
        emu = load_support("cuda_emu")
        if not emu.available():
            pytest.skip("g++ is needed to emulate the CUDA kernels")
        emu.install(monkeypatch)
        return np
    from estdp.backend import gpu_available

    if not gpu_available():
        pytest.skip("no CUDA GPU usable through CuPy (estdp.backend.gpu_available() is False)")
    import cupy

    return cupy


@pytest.fixture(scope="session")
def twin() -> ModuleType:
    """The float32 NumPy twin of the CUDA kernels (tests/support/stdp_twin.py)."""
    return load_support("stdp_twin")


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
