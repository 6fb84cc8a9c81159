"""Arrays to and from msgpack-ready dicts: dtype, shape and little-endian bytes.

An encoded array is a dict::

    {"dtype": "float32", "shape": [784, 100], "data": b"..."}

``dtype`` is the dtype of the decoded array and ``data`` holds its elements in C order,
little-endian whatever the host. Lossy encodings, for weights, add ``enc``:

- ``enc="float16"``: ``data`` holds IEEE half floats; decoding widens them to ``dtype``.
  Relative error at most 2**-11 (half an ulp) for values in the normal half range.
- ``enc="uint8"`` with floats ``scale`` and ``offset``: min/max affine quantisation,
  ``q = round((x - offset) / scale)`` with ``offset = min(x)``,
  ``scale = (max(x) - min(x)) / 255``, and ``x' = offset + scale * q``; absolute error at
  most ``scale / 2`` (plus float32 rounding).

Decoding validates everything (keys, types, dtype whitelist, shape, byte count, size
limit, expected dtype and shape) and raises :class:`~estdp.errors.ProtocolError` with one
clear message; it never trusts a size it has not checked, so a hostile message cannot
make it allocate more than ``max_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from estdp.backend import to_host
from estdp.errors import ConfigError, ProtocolError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DTYPES",
    "ENCODINGS",
    "decode_array",
    "encode_array",
]

DTYPES: tuple[str, ...] = (
    "float32",
    "float16",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "bool",
)
ENCODINGS: tuple[str, ...] = ("raw", "float32", "float16", "uint8")
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MAX_NDIM = 32
MAX_DIM = 2**40

_FLOAT_DTYPES = ("float16", "float32", "float64")
_WIRE_ITEMSIZE = {"float16": 2, "uint8": 1}
_REQUIRED_KEYS = ("dtype", "shape", "data")
_KEYS_BY_ENC: dict[str | None, frozenset[str]] = {
    None: frozenset(_REQUIRED_KEYS),
    "float16": frozenset((*_REQUIRED_KEYS, "enc")),
    "uint8": frozenset((*_REQUIRED_KEYS, "enc", "scale", "offset")),
}
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _wire(dtype_name: str) -> np.dtype:
    """The little-endian dtype used on the wire for ``dtype_name``."""
    return np.dtype(dtype_name).newbyteorder("<")


def encode_array(a: Any, encoding: str = "raw") -> dict[str, Any]:
    """Encode an array as a msgpack-ready dict.

    Parameters
    ----------
    a
        A NumPy (or CuPy) array, or anything ``np.asarray`` accepts, of a dtype in
        :data:`DTYPES`.
    encoding
        ``"raw"``: the array's own dtype, lossless. ``"float32"``: cast to float32
        (lossless for float32 input). ``"float16"`` and ``"uint8"``: lossy encodings of a
        float array (see the module docstring); the decoded dtype stays the input's.

    Returns
    -------
    dict
        ``{"dtype", "shape", "data"}``, plus ``"enc"`` (and ``"scale"``, ``"offset"``)
        for the lossy encodings.

    Raises
    ------
    ConfigError
        ``encoding`` is not one of :data:`ENCODINGS`.
    ValueError
        The dtype is not supported, or a lossy encoding was asked for an array that is
        not floating point or holds non-finite values (or, for float16, values beyond
        its range).
    """
    if encoding not in ENCODINGS:
        raise ConfigError(
            f"unknown array encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}"
        )
    arr = np.asarray(to_host(a))
    if encoding == "float32":
        arr = arr.astype(np.float32, copy=False)
    name = arr.dtype.name
    if name not in DTYPES:
        raise ValueError(
            f"cannot encode arrays of dtype {arr.dtype}; supported: {', '.join(DTYPES)}"
        )
    out: dict[str, Any] = {"dtype": name, "shape": [int(n) for n in arr.shape]}
    if encoding in ("raw", "float32"):
        out["data"] = np.ascontiguousarray(arr, dtype=_wire(name)).tobytes()
        return out
    if name not in _FLOAT_DTYPES:
        raise ValueError(f"{encoding} encoding needs a float array, got {arr.dtype}")
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{encoding} encoding needs finite values; the array has NaN or inf")
    if encoding == "float16":
        if arr.size and float(np.abs(arr).max()) > _FLOAT16_MAX:
            raise ValueError(
                f"values beyond the float16 range (+-{_FLOAT16_MAX}) cannot be encoded"
            )
        out["enc"] = "float16"
        out["data"] = np.ascontiguousarray(arr, dtype=_wire("float16")).tobytes()
        return out
    # uint8: min/max affine quantisation, computed in float64 so that scale and offset
    # are exact for any float32 input.
    wide = arr.astype(np.float64)
    lo = float(wide.min()) if wide.size else 0.0
    hi = float(wide.max()) if wide.size else 0.0
    scale = (hi - lo) / 255.0
    # A constant (or empty) array has scale 0: every element is the offset.
    q = np.rint((wide - lo) / scale) if scale > 0 else np.zeros_like(wide)
    out["enc"] = "uint8"
    out["scale"] = scale
    out["offset"] = lo
    out["data"] = np.clip(q, 0, 255).astype(np.uint8).tobytes()
    return out


def decode_array(
    d: Any,
    *,
    expected_dtype: str | np.dtype | None = None,
    expected_shape: Sequence[int | None] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    name: str = "array",
) -> np.ndarray:
    """Decode and validate an array encoded by :func:`encode_array`.

    Parameters
    ----------
    d
        The decoded msgpack value (untrusted).
    expected_dtype
        Refuse any other decoded dtype.
    expected_shape
        Refuse any other shape; ``None`` entries match any length along that axis.
    max_bytes
        Refuse arrays whose wire data or decoded size exceeds this many bytes.
    name
        What to call the array in error messages (e.g. ``"weights"``).

    Returns
    -------
    numpy.ndarray
        A new, writable, native-endian array of the encoded dtype and shape.

    Raises
    ------
    ProtocolError
        Anything is wrong; the message names ``name`` and the problem.
    """

    def fail(problem: str) -> ProtocolError:
        return ProtocolError(f"{name}: {problem}")

    if not isinstance(d, dict):
        raise fail(f"expected a map with dtype, shape and data, got {type(d).__name__}")
    enc = d.get("enc")
    if enc is not None and (not isinstance(enc, str) or enc not in _KEYS_BY_ENC):
        raise fail(f"unknown encoding {enc!r}; expected one of float16, uint8")
    keys = _KEYS_BY_ENC[enc]
    missing = sorted(keys - set(d))
    if missing:
        raise fail(f"missing key(s) {', '.join(missing)}")
    extra = sorted(str(k) for k in set(d) - keys)
    if extra:
        raise fail(f"unexpected key(s) {', '.join(extra)}")

    dtype_name = d["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise fail(f"dtype {dtype_name!r} is not allowed; allowed: {', '.join(DTYPES)}")
    dtype = np.dtype(dtype_name)
    if expected_dtype is not None and dtype != np.dtype(expected_dtype):
        raise fail(f"dtype {dtype_name} where {np.dtype(expected_dtype).name} is expected")
    if enc is not None and dtype_name not in _FLOAT_DTYPES:
        raise fail(f"{enc} encoding of a {dtype_name} array; it applies to float arrays only")

    shape = _check_shape(d["shape"], fail)
    if expected_shape is not None:
        want = tuple(expected_shape)
        if len(want) != len(shape) or any(
            w is not None and w != s for w, s in zip(want, shape, strict=True)
        ):
            shown = "(" + ", ".join("*" if w is None else str(w) for w in want) + ")"
            raise fail(f"shape {shape} where {shown} is expected")

    data = d["data"]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise fail(f"data must be bytes, got {type(data).__name__}")
    count = math.prod(shape)
    wire_itemsize = _WIRE_ITEMSIZE[enc] if enc is not None else dtype.itemsize
    if count * wire_itemsize > max_bytes or count * dtype.itemsize > max_bytes:
        raise fail(f"{count} elements of {dtype_name} exceed the size limit of {max_bytes} bytes")
    if len(data) != count * wire_itemsize:
        raise fail(
            f"data has {len(data)} bytes but shape {shape} needs {count * wire_itemsize} "
            f"({count} x {wire_itemsize})"
        )

    if enc is None:
        wire = np.frombuffer(data, dtype=_wire(dtype_name))
        if dtype_name == "bool" and wire.size and wire.view(np.uint8).max() > 1:
            raise fail("bool data holds bytes other than 0 and 1")
        out = wire.astype(dtype, copy=True)
    elif enc == "float16":
        out = np.frombuffer(data, dtype=_wire("float16")).astype(dtype)
    else:
        scale = _finite_float(d["scale"], "scale", fail)
        offset = _finite_float(d["offset"], "offset", fail)
        if scale < 0:
            raise fail(f"uint8 scale must be >= 0, got {scale}")
        q = np.frombuffer(data, dtype=np.uint8)
        out = (offset + scale * q.astype(np.float64)).astype(dtype)
    return out.reshape(shape)


def _check_shape(shape: Any, fail: Any) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)):
        raise fail(f"shape must be a list of integers, got {type(shape).__name__}")
    if len(shape) > MAX_NDIM:
        raise fail(f"shape has {len(shape)} dimensions (at most {MAX_NDIM})")
    for n in shape:
        # bool is an int subclass; True as a dimension is a malformed message
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise fail(f"shape {list(shape)!r} must hold non-negative integers")
        if n > MAX_DIM:  # a zero elsewhere would let it past the size limit
            raise fail(f"shape {list(shape)!r} has a dimension above {MAX_DIM}")
    return tuple(shape)


def _finite_float(value: Any, key: str, fail: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(f"{key} must be a number, got {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result):
        raise fail(f"{key} must be finite, got {result}")
    return result
