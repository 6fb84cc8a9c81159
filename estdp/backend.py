"""Array-backend choice: numpy, native, cupy, or auto.

- ``numpy``: NumPy everywhere (the event-driven trainer, batched inference).
- ``native``: the same arrays (``xp`` is NumPy), with the per-step loops of training and
  inference in C kernels compiled on first use (:mod:`estdp.native`); needs a C compiler.
- ``cupy``: CuPy arrays and CUDA kernels; needs a usable GPU.
- ``auto``: cupy when a GPU is usable, else native when C kernels build, else numpy.

The choice is made once at start-up, logged, and passed down as ``xp``; nothing below
re-detects it. CuPy is imported in this module only, and its import error is kept so
that an explicit ``cupy`` request can report the real cause.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from estdp import native
from estdp.errors import BackendUnavailable, ConfigError

log = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "numpy", "native", "cupy")

_cupy: ModuleType | None
_cupy_error: BaseException | None
try:  # pragma: no cover - depends on the machine
    import cupy as _cupy

    _cupy_error = None
except Exception as exc:  # ImportError, or a CUDA library failing to load
    _cupy = None
    _cupy_error = exc


@dataclass(frozen=True)
class Backend:
    """The resolved array backend: its name and its array module."""

    name: str
    xp: ModuleType

    @property
    def is_gpu(self) -> bool:
        return self.name == "cupy"

    @property
    def is_native(self) -> bool:
        return self.name == "native"


def _cupy_usable() -> tuple[bool, str]:
    if _cupy is None:
        return False, f"cupy is not importable: {_cupy_error}"
    try:
        count = _cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # pragma: no cover - needs a broken CUDA install
        return False, f"CUDA runtime error: {exc}"
    if count < 1:
        return False, "no CUDA device is visible"
    return True, f"{count} CUDA device(s)"


def resolve_backend(name: str = "auto") -> Backend:
    """Resolve a backend name to a :class:`Backend`, once.

    Parameters
    ----------
    name
        ``"numpy"``, ``"native"``, ``"cupy"`` or ``"auto"`` (cupy when a GPU is usable,
        else native when C kernels build, else numpy).

    Raises
    ------
    BackendUnavailable
        ``"cupy"`` or ``"native"`` was asked for explicitly and cannot be used; the
        message says why.
    """
    if name not in BACKEND_NAMES:
        raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "numpy":
        log.info("array backend: numpy (requested)")
        return Backend("numpy", np)
    if name == "native":
        ok, why = native.usable()
        if not ok:
            raise BackendUnavailable(f"backend 'native' requested but unavailable: {why}")
        log.info("array backend: native (requested; %s)", why)
        return Backend("native", np)
    usable, why = _cupy_usable()
    if name == "cupy":
        if not usable:
            raise BackendUnavailable(f"backend 'cupy' requested but unavailable: {why}")
        log.info("array backend: cupy (requested; %s)", why)
        return Backend("cupy", _cupy)  # type: ignore[arg-type]
    if usable:
        log.info("array backend: cupy (auto; %s)", why)
        return Backend("cupy", _cupy)  # type: ignore[arg-type]
    native_ok, native_why = native.usable()
    if native_ok:
        log.info("array backend: native (auto; %s; %s)", why, native_why)
        return Backend("native", np)
    log.info("array backend: numpy (auto; %s; %s)", why, native_why)
    return Backend("numpy", np)


def gpu_available() -> bool:
    """True when a CUDA device is usable through CuPy (used by tests to skip)."""
    return _cupy_usable()[0]


def to_host(array: Any) -> np.ndarray:
    """The one exit to host memory: a NumPy array from a NumPy or CuPy array."""
    if isinstance(array, np.ndarray):
        return array
    get = getattr(array, "get", None)
    if get is not None:
        return get()
    return np.asarray(array)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
