"""What the CUDA kernel modules share: the lazy CuPy import, the kernel cache, launch sizes.

Every kernel module (:mod:`edge_node.cuda_train`, :mod:`edge_node.cuda_infer`,
:mod:`edge_node.cuda_encode`, :mod:`aggregator.cuda_similarity`) holds its CUDA source
as one constant and asks :func:`get_kernel` for the compiled function on first use, so
that importing them never needs CuPy. The sources include no headers (NVRTC, which CuPy
uses, provides the built-ins) and are compiled with ``--fmad=false``: a contracted
``a * b + c`` rounds differently from the NumPy twin that the kernels are tested
against, and would break the spike-for-spike comparisons.

The two seams :func:`device_xp` and :func:`get_kernel` are looked up at call time; the
tests replace them with NumPy and a CPU emulation of the kernels.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from estdp.backend import resolve_backend
from estdp.errors import BackendUnavailable, ConfigError

NVCC_OPTIONS = ("--fmad=false",)
# Default dynamic shared memory a block may use without opting in.
SHARED_DEFAULT_BYTES = 48 * 1024

_KERNELS: dict[tuple[str, str, str], Any] = {}
_DEVICE: list[ModuleType] = []


def device_xp() -> ModuleType:
    """The CuPy module; :class:`BackendUnavailable` (saying why) without CuPy or a GPU."""
    if not _DEVICE:
        try:
            _DEVICE.append(resolve_backend("cupy").xp)
        except BackendUnavailable as exc:
            raise BackendUnavailable(f"the CUDA kernels cannot run: {exc}") from exc
    return _DEVICE[0]


def get_kernel(source: str, name: str, real: str = "float") -> Any:
    """The compiled kernel ``name`` of ``source``, built once per process and ``real`` type.

    Parameters
    ----------
    source
        CUDA source with ``extern "C"`` kernels and no includes.
    name
        The kernel's name.
    real
        ``"float"`` or ``"double"``: the ``REAL`` macro the source is compiled with.
    """
    key = (source, name, real)
    kernel = _KERNELS.get(key)
    if kernel is None:
        cupy = device_xp()
        module = cupy.RawModule(code=source, options=(*NVCC_OPTIONS, f"-DREAL={real}"))
        kernel = module.get_function(name)
        _KERNELS[key] = kernel
    return kernel


def real_name(dtype: Any) -> str:
    """``"float"`` for float32 and ``"double"`` for float64; anything else is refused."""
    dt = np.dtype(dtype)
    if dt == np.float32:
        return "float"
    if dt == np.float64:
        return "double"
    raise ConfigError(f"the CUDA kernels compute in float32 or float64, not {dt}")


def enable_shared_memory(kernel: Any, nbytes: int, xp: ModuleType) -> None:
    """Let ``kernel`` use ``nbytes`` of dynamic shared memory, or say why it cannot."""
    if nbytes <= SHARED_DEFAULT_BYTES or xp is np:
        return
    try:
        limit = int(xp.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"])
    except (AttributeError, KeyError):  # an older CuPy: let the launch report it
        limit = nbytes
    if nbytes > limit:
        raise ConfigError(
            f"the kernel needs {nbytes} bytes of shared memory per block, "
            f"the GPU allows {limit}: use fewer neurons"
        )
    kernel.max_dynamic_shared_size_bytes = nbytes


def block_threads(n: int, lo: int, hi: int) -> int:
    """Threads per block for ``n`` neurons: one warp-rounded thread per neuron, in [lo, hi]."""
    return int(min(hi, max(lo, -(-n // 32) * 32)))


def check_threads(threads: int) -> int:
    """Validate a block size: a multiple of 32 from 32 to 1024 (the kernels use whole warps)."""
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
        raise ConfigError(f"threads must be an integer, got {threads!r}")
    if threads < 32 or threads > 1024 or threads % 32:
        raise ConfigError(f"threads must be a multiple of 32 in [32, 1024], got {threads}")
    return int(threads)


def require_array(
    xp: ModuleType, name: str, array: Any, dtype: Any, shape: tuple[int | None, ...]
) -> None:
    """Refuse ``array`` unless it is an ``xp`` array of ``dtype``, ``shape`` (None: any), C order.

    For arrays a kernel writes into: casting them would silently write into a copy.
    """
    if not isinstance(array, xp.ndarray):
        raise ConfigError(
            f"{name} must be a {xp.__name__} array (it is written in place), "
            f"got {type(array).__module__}.{type(array).__name__}"
        )
    if array.dtype != np.dtype(dtype):
        raise ConfigError(f"{name} must be {np.dtype(dtype)}, got {array.dtype}")
    if len(array.shape) != len(shape) or any(
        want is not None and got != want for got, want in zip(array.shape, shape, strict=False)
    ):
        want_text = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ConfigError(f"{name} must have shape {want_text}, got {tuple(array.shape)}")
    if not array.flags.c_contiguous:
        raise ConfigError(f"{name} must be C-contiguous")


def as_device(xp: ModuleType, name: str, array: Any, dtype: Any, ndim: int) -> Any:
    """``array`` as a C-contiguous ``dtype`` array of ``xp`` (copied only when needed)."""
    if not hasattr(array, "shape"):
        array = np.asarray(array)
    if len(array.shape) != ndim:
        raise ConfigError(f"{name} must be {ndim}-D, got shape {tuple(array.shape)}")
    return xp.ascontiguousarray(xp.asarray(array), dtype=dtype)
