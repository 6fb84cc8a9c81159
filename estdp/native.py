"""C kernels for the CPU: compile once with the system's C compiler, cache, load with ctypes.

The ``native`` backend runs the per-step loops of the network in C instead of NumPy calls
(:mod:`edge_node.native_kernels`). Like CuPy's ``RawModule``, a kernel module holds its C
source as a constant and asks :func:`load` for the library on first use; nothing is built
at install time, so the project installs with pip alone and falls back to NumPy where no
compiler works.

The library is built with ``$CC`` (default ``cc``) as ``-O3 -fPIC -shared
-ffp-contract=off``: a contracted ``a * b + c`` rounds differently from the NumPy twin the
kernels are tested against. It is cached under
``${XDG_CACHE_HOME:-~/.cache}/ensemble-stdp/native/`` (or ``$ESTDP_NATIVE_CACHE``), named
by a hash of the source, the flags, the compiler's version and the machine, and written
atomically, so that several processes starting at once (a simulated fleet) each either
build it or load a complete one.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

from estdp.errors import BackendUnavailable

log = logging.getLogger(__name__)

CFLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off")
_PROBE = "int estdp_probe(int x) { return x + 1; }\n"

_LOCK = threading.Lock()
_LIBRARIES: dict[str, ctypes.CDLL] = {}
_COMPILER: list[tuple[list[str], str]] = []  # (command, version line), found once


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$ESTDP_NATIVE_CACHE`` or the user cache."""
    explicit = os.environ.get("ESTDP_NATIVE_CACHE")
    if explicit:
        return Path(explicit)
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "ensemble-stdp" / "native"


def _compiler() -> tuple[list[str], str]:
    """The compiler command and its version line; :class:`BackendUnavailable` without one."""
    if not _COMPILER:
        command = shlex.split(os.environ.get("CC", "cc")) or ["cc"]
        try:
            result = subprocess.run(
                [*command, "--version"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendUnavailable(f"no C compiler ({' '.join(command)}): {exc}") from None
        if result.returncode != 0:
            raise BackendUnavailable(
                f"C compiler {' '.join(command)} --version failed: {result.stderr.strip()}"
            )
        version = (result.stdout.strip().splitlines() or ["unknown"])[0]
        _COMPILER.append((command, version))
    return _COMPILER[0]


def _build(source: str, target: Path) -> None:
    command, _ = _compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="estdp-native-") as work:
        src = Path(work) / "kernels.c"
        src.write_text(source)
        # Built beside the target, then renamed over it: a concurrent loader sees either
        # no file or a complete one.
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(fd)
        try:
            result = subprocess.run(
                [*command, *CFLAGS, "-o", tmp, str(src), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if result.returncode != 0:
                tail = " | ".join(result.stderr.strip().splitlines()[-3:])
                raise BackendUnavailable(f"C kernels failed to compile with {command[0]}: {tail}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def load(source: str) -> ctypes.CDLL:
    """The shared library built from ``source`` (compiled on first use, then cached).

    Raises
    ------
    BackendUnavailable
        No working C compiler, the source does not compile, or the cache is unusable;
        the message says which.
    """
    with _LOCK:
        library = _LIBRARIES.get(source)
        if library is not None:
            return library
        _, version = _compiler()
        key = "\0".join((source, " ".join(CFLAGS), version, platform.machine()))
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        target = cache_dir() / f"kernels-{digest}.so"
        try:
            if not target.exists():
                log.info("compiling the native kernels into %s", target)
                _build(source, target)
            library = ctypes.CDLL(str(target))
        except OSError as exc:
            raise BackendUnavailable(f"native kernels unusable ({target}): {exc}") from None
        _LIBRARIES[source] = library
        return library


def usable() -> tuple[bool, str]:
    """Whether C kernels can be built and loaded here, and why not (probed once)."""
    try:
        probe = load(_PROBE)
        if probe.estdp_probe(41) != 42:
            return False, "the probe kernel returned a wrong value"
    except BackendUnavailable as exc:
        return False, str(exc)
    return True, f"C kernels built with {_compiler()[1]}"
