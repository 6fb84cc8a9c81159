"""Run the project's CUDA kernels on the CPU: a stand-in for ``cupy.RawModule`` in tests.

The kernel sources are compiled unchanged with g++ against ``cuda_emu.hpp`` (threads and
barriers for CUDA threads, warps and blocks) together with one generated launcher per
kernel. :class:`EmuKernel` is called like a CuPy kernel, ``kernel(grid, block, args,
shared_mem=...)``, and checks every argument against the kernel's signature the way the
GPU would need it: arrays must be C-contiguous NumPy arrays of the pointer's element type
and scalars NumPy scalars of exactly the parameter's type (a Python float would arrive
on a GPU as a double). :func:`install` points :mod:`edge_node.cuda_common` at NumPy and
these kernels, so that the real wrappers run end to end.

Floating point follows IEEE single/double on x86-64 and is compiled with
``-ffp-contract=off``, matching the ``--fmad=false`` build used on the GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HEADER = Path(__file__).with_name("cuda_emu.hpp")
_LIBS: dict[tuple, tuple[ctypes.CDLL, dict[str, list[tuple[str, str]]]]] = {}
# A process that loads a ThreadSanitizer build must start with libtsan preloaded.
SANITIZE = os.environ.get("ESTDP_CUDA_EMU_TSAN") == "1"

_SCALARS = {
    "int": np.int32,
    "unsigned int": np.uint32,
    "long long": np.int64,
    "float": np.float32,
    "double": np.float64,
}
_CTYPES = {
    np.int32: ctypes.c_int32,
    np.uint32: ctypes.c_uint32,
    np.int64: ctypes.c_int64,
    np.float32: ctypes.c_float,
    np.float64: ctypes.c_double,
}


_AVAILABLE: list[bool] = []


def available() -> bool:
    """True when g++ is on the PATH and builds C++20 ``<barrier>`` code (checked once)."""
    if not _AVAILABLE:
        ok = shutil.which("g++") is not None
        if ok:
            probe = "#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n"
            result = subprocess.run(
                ["g++", "-std=c++20", "-fsyntax-only", "-x", "c++", "-"],
                input=probe,
                capture_output=True,
                text=True,
            )
            ok = result.returncode == 0
        _AVAILABLE.append(ok)
    return _AVAILABLE[0]


def signatures(source: str) -> dict[str, list[tuple[str, str]]]:
    """Each ``extern "C"`` kernel of ``source``: its parameters as (type, name) pairs."""
    code = re.sub(r"//[^\n]*", "", source)
    code = re.sub(r"/\*.*?\*/", "", code, flags=re.S)
    found = {}
    pattern = (
        r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)'
    )
    for match in re.finditer(pattern, code):
        params = []
        for part in match.group(2).split(","):
            words = part.replace("__restrict__", " ").replace("*", " * ").split()
            params.append((" ".join(words[:-1]), words[-1]))
        found[match.group(1)] = params
    return found


def _element(ctype: str, real: str) -> Any:
    base = ctype.replace("const", " ").replace("*", " ").split()
    name = " ".join(base)
    if name == "real":
        name = real
    return _SCALARS[name]


def _launcher(name: str, params: list[tuple[str, str]]) -> str:
    args = ", ".join(f"*({ctype}*)a[{i}]" for i, (ctype, _) in enumerate(params))
    return (
        f'extern "C" int emu_launch_{name}(unsigned gx, unsigned gy, unsigned bx, '
        f"unsigned long long shared, void** a) {{\n"
        f"    return emu::launch(gx, gy, bx, shared, [&]() {{ {name}({args}); }});\n}}\n"
    )


def build(sources: list[str], real: str = "float") -> tuple[ctypes.CDLL, dict]:
    """Compile ``sources`` (with ``REAL`` = ``real``) into one library, cached on disk.

    With ``ESTDP_CUDA_EMU_TSAN=1`` the library is built with ThreadSanitizer, which then
    reports any two accesses to the same memory that no barrier orders.
    """
    key = (tuple(sources), real, SANITIZE)
    cached = _LIBS.get(key)  # type: ignore[arg-type]
    if cached is not None:
        return cached
    kernels: dict[str, list[tuple[str, str]]] = {}
    for source in sources:
        kernels.update(signatures(source))
    text = "\n".join(
        [f"#define REAL {real}", f'#include "{HEADER}"', *sources]
        + [_launcher(name, params) for name, params in kernels.items()]
    )
    flags = ["-fsanitize=thread", "-g"] if SANITIZE else []
    digest = hashlib.sha256((text + HEADER.read_text() + str(flags)).encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"estdp-cuda-emu-{os.getuid()}"
    cache.mkdir(exist_ok=True)
    lib_path = cache / f"kernels-{digest}.so"
    if not lib_path.exists():
        src = cache / f"kernels-{digest}-{os.getpid()}.cpp"
        src.write_text(text)
        tmp = lib_path.with_suffix(f".{os.getpid()}.tmp")
        cmd = ["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread"]
        cmd += flags
        result = subprocess.run([*cmd, "-o", str(tmp), str(src)], capture_output=True, text=True)
        src.unlink()
        if result.returncode != 0:
            raise RuntimeError(f"g++ failed on the kernel sources:\n{result.stderr[-4000:]}")
        os.replace(tmp, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    _LIBS[key] = (lib, kernels)  # type: ignore[index]
    return lib, kernels


class EmuKernel:
    """A compiled kernel, called like a CuPy ``RawKernel``."""

    def __init__(self, lib: ctypes.CDLL, name: str, params: list[tuple[str, str]], real: str):
        self.name = name
        self.params = params
        self.real = real
        self.max_dynamic_shared_size_bytes = 0
        self.launches = 0
        self._fn = getattr(lib, f"emu_launch_{name}")
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_ulonglong]
        self._fn.argtypes += [ctypes.POINTER(ctypes.c_void_p)]

    def __call__(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
        if len(args) != len(self.params):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(self.params)} parameters")
        keep = []
        pointers = (ctypes.c_void_p * len(args))()
        for i, ((ctype, pname), value) in enumerate(zip(self.params, args, strict=True)):
            want = _element(ctype, self.real)
            if "*" in ctype:
                if not isinstance(value, np.ndarray):
                    raise TypeError(f"{self.name}.{pname}: needs an array, got {type(value)}")
                if value.dtype != want:
                    raise TypeError(
                        f"{self.name}.{pname}: needs {np.dtype(want)}, got {value.dtype}"
                    )
                if "const" not in ctype and not value.flags.writeable:
                    raise TypeError(
                        f"{self.name}.{pname}: written by the kernel, array is read-only"
                    )
                holder = ctypes.c_void_p(value.ctypes.data)
            else:
                if not isinstance(value, np.generic) or value.dtype != want:
                    raise TypeError(
                        f"{self.name}.{pname}: needs a {np.dtype(want)} scalar, got {value!r} "
                        f"({type(value).__name__})"
                    )
                holder = _CTYPES[want](value)
            keep.append(holder)
            pointers[i] = ctypes.cast(ctypes.pointer(holder), ctypes.c_void_p)
        gx, gy = (tuple(grid) + (1,))[:2]
        status = self._fn(int(gx), int(gy), int(block[0]), int(shared_mem), pointers)
        if status != 0:
            raise RuntimeError(f"{self.name}: bad launch configuration {grid} {block} {shared_mem}")
        self.launches += 1


class Emulator:
    """All kernels of ``sources``, built for both ``REAL`` types on first use."""

    def __init__(self, sources: list[str]):
        self.sources = sources
        self.kernels: dict[tuple[str, str], EmuKernel] = {}

    def get_kernel(self, source: str, name: str, real: str = "float") -> EmuKernel:
        kernel = self.kernels.get((name, real))
        if kernel is None:
            lib, sigs = build(self.sources, real)
            kernel = EmuKernel(lib, name, sigs[name], real)
            self.kernels[(name, real)] = kernel
        return kernel


def all_sources() -> list[str]:
    """Every kernel source of the project, built into one library (one g++ run per type)."""
    from aggregator.cuda_similarity import MANHATTAN_SOURCE
    from edge_node.cuda_encode import PACK_SOURCE
    from edge_node.cuda_infer import INFER_SOURCE
    from edge_node.cuda_train import TRAIN_SOURCE

    return [TRAIN_SOURCE, INFER_SOURCE, PACK_SOURCE, MANHATTAN_SOURCE]


def install(monkeypatch: Any) -> Emulator:
    """Route :mod:`edge_node.cuda_common` to NumPy and emulated kernels for one test."""
    from edge_node import cuda_common

    emulator = Emulator(all_sources())
    monkeypatch.setattr(cuda_common, "device_xp", lambda: np)
    monkeypatch.setattr(cuda_common, "get_kernel", emulator.get_kernel)
    return emulator
