"""The model container: a trained (sub-)model and its provenance.

A :class:`SubModel` is what an edge node trains, what travels over MQTT and what the
aggregator merges. Arrays are host (NumPy) arrays:

- ``weights``: (n_input, n_neurons) float32, input->excitatory weights (column j is neuron j)
- ``thetas``: (n_neurons,) float32, adaptive-threshold offsets in mV
- ``labels``: (n_neurons,) int16, assigned class of each neuron, -1 when unassigned
- ``class_rates``: (n_classes, n_neurons) float32, mean spike count of each neuron per class
  over the images its labels were assigned from (zeros when unassigned)
- ``origin_node`` / ``origin_index``: (n_neurons,) int32; for neuron j, the index into
  ``provenance.sources`` of the node it was trained on and its index in that node's model
  (a fresh model has one source, itself, and origin_index = arange(n))

Wire form (:func:`model_to_wire` / :func:`model_from_wire`), a msgpack-ready map::

    {"format": "ensemble-stdp/model", "version": 1,
     "params": {...NetworkParams.to_dict()...},
     "provenance": {"node_id", "images_seen", "seed", "sources", "round",
                    "created_unix", "notes"},
     "arrays": {"weights", "thetas", "labels", "class_rates",
                "origin_node", "origin_index"},      # each as estdp.arrays encodes it
     "sha256": <32 bytes>}

``sha256`` covers everything else: SHA-256 over a domain tag, the canonical JSON of
format, version, params and provenance, then for each array in name order its JSON
header, its byte count and its bytes. :func:`to_bytes` / :func:`from_bytes` pack that map
with msgpack (no ext types, bounded sizes, never pickle): this is the MQTT payload.

File form (:func:`save_model` / :func:`load_model`, written atomically)::

    magic  b"\\x89ESTDP\\r\\n"   8 bytes
    version                     uint16 little-endian (FORMAT_VERSION)
    flags                       uint16, 0
    length                      uint64, bytes of msgpack that follow
    payload                     to_bytes(model)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from estdp.arrays import DEFAULT_MAX_BYTES, decode_array, encode_array
from estdp.atomic import atomic_open
from estdp.backend import to_host
from estdp.errors import ConfigError, EstdpError, ModelFileError, ProtocolError
from estdp.params import NetworkParams

FORMAT_VERSION = 1
WIRE_FORMAT = "ensemble-stdp/model"
N_CLASSES = 10
WEIGHT_ENCODINGS = ("float32", "float16", "uint8")

FILE_MAGIC = b"\x89ESTDP\r\n"
_FILE_HEADER = struct.Struct("<8sHHQ")

# Bounds on what a decoder accepts, so that a hostile payload cannot make it allocate
# much more than its own size. A 784 x 6400 float32 model is 20 MB.
MAX_MODEL_BYTES = DEFAULT_MAX_BYTES
MAX_STR_LEN = 64 * 1024
MAX_ARRAY_LEN = 65536  # list lengths: sources, shapes
MAX_MAP_LEN = 4096  # map sizes: params, notes

_TOP_KEYS = frozenset(("format", "version", "params", "provenance", "arrays", "sha256"))
_PROVENANCE_KEYS = frozenset(
    ("node_id", "images_seen", "seed", "sources", "round", "created_unix", "notes")
)
_ARRAY_DTYPES = {
    "weights": np.float32,
    "thetas": np.float32,
    "labels": np.int16,
    "class_rates": np.float32,
    "origin_node": np.int32,
    "origin_index": np.int32,
}
_DIGEST_TAG = b"ensemble-stdp model sha256\x00"


@dataclass(frozen=True)
class Provenance:
    """Where a model came from."""

    node_id: str  # the node (or "aggregator") that produced this model
    images_seen: int  # training images seen (summed over sources for a merged model)
    seed: int
    sources: tuple[str, ...] = ()  # node ids that neurons originate from (see origin_node)
    round: int = 0  # federated round the model belongs to (0 = standalone training)
    format_version: int = FORMAT_VERSION
    created_unix: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)  # e.g. merge metric, rule, target


@dataclass(frozen=True)
class SubModel:
    """A trained Diehl & Cook network: weights, thresholds, labels and provenance."""

    weights: np.ndarray
    thetas: np.ndarray
    labels: np.ndarray
    class_rates: np.ndarray
    params: NetworkParams
    provenance: Provenance
    origin_node: np.ndarray
    origin_index: np.ndarray

    @property
    def n_neurons(self) -> int:
        return int(self.weights.shape[1])

    @property
    def n_input(self) -> int:
        return int(self.weights.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.class_rates.shape[0])


def with_notes(model: SubModel, notes: Mapping[str, str], **changes: Any) -> SubModel:
    """``model`` with its provenance notes replaced by ``notes`` (and the other fields in
    ``changes`` replaced too, e.g. ``thetas``); not validated again."""
    provenance = dataclasses.replace(model.provenance, notes=dict(notes))
    return dataclasses.replace(model, provenance=provenance, **changes)


# ---------------------------------------------------------------------------------------
# Construction and validation


def new_model(
    weights: Any,
    thetas: Any,
    params: NetworkParams,
    *,
    node_id: str,
    images_seen: int,
    seed: int,
    labels: Any = None,
    class_rates: Any = None,
    round: int = 0,
    notes: Mapping[str, str] | None = None,
) -> SubModel:
    """A validated single-source model, with defaults for what is not known yet.

    Parameters
    ----------
    weights, thetas
        (n_input, N) and (N,) arrays, NumPy or CuPy; copied to host float32.
    params
        The parameters the model was trained with; ``params.n_input`` must match.
    node_id, images_seen, seed, round, notes
        Provenance. ``sources`` becomes ``(node_id,)`` and ``created_unix`` now.
    labels
        (N,) integer classes in [-1, C); default all -1 (unassigned).
    class_rates
        (C, N) mean responses per class; default zeros (10, N).

    Returns
    -------
    SubModel
        With ``origin_node`` zeros and ``origin_index`` arange(N).

    Raises
    ------
    ConfigError
        Any array or field is inconsistent (shape, dtype, NaN/inf, label range, ...).
    """
    w = _as_float32(weights, "weights")
    t = _as_float32(thetas, "thetas")
    n = int(w.shape[1]) if w.ndim == 2 else 0
    lab = np.full(n, -1, np.int16) if labels is None else _as_int(labels, np.int16, "labels")
    rates = (
        np.zeros((N_CLASSES, n), np.float32)
        if class_rates is None
        else _as_float32(class_rates, "class_rates")
    )
    model = SubModel(
        weights=w,
        thetas=t,
        labels=lab,
        class_rates=rates,
        params=params,
        provenance=Provenance(
            node_id=node_id,
            images_seen=images_seen,
            seed=seed,
            sources=(node_id,),
            round=round,
            created_unix=time.time(),
            notes=dict(notes or {}),
        ),
        origin_node=np.zeros(n, np.int32),
        origin_index=np.arange(n, dtype=np.int32),
    )
    validate_model(model, error=ConfigError)
    return model


def _as_float32(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(to_host(a))
    if arr.dtype.kind not in "fiu":
        raise ConfigError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    return np.array(arr, dtype=np.float32, copy=True)


def _as_int(a: Any, dtype: type[np.integer], name: str) -> np.ndarray:
    arr = np.asarray(to_host(a))
    if arr.dtype.kind not in "iu":
        raise ConfigError(f"{name} must be an integer array, got dtype {arr.dtype}")
    info = np.iinfo(dtype)
    # Range first: a plain cast would wrap an out-of-range value into a valid-looking one.
    if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
        raise ConfigError(f"{name} values must lie in [{info.min}, {info.max}]")
    return arr.astype(dtype)


def validate_model(model: SubModel, *, error: type[EstdpError] = ProtocolError) -> None:
    """Check that every field of ``model`` is present, consistent and finite.

    Checks: array types and dtype kinds; shapes (weights (n_input, N) with n_input equal
    to ``params.n_input``; thetas, labels, origin_* (N,); class_rates (C, N), C >= 1);
    weights, thetas and class_rates finite; labels in [-1, C); origin_node indices valid
    for ``provenance.sources``, origin_index >= 0; provenance field types and ranges.

    Parameters
    ----------
    model
        The model to check.
    error
        The exception class to raise: ProtocolError while decoding (the default),
        ConfigError from :func:`new_model`, e.g. MergeError from the aggregator.

    Raises
    ------
    EstdpError
        Of class ``error``, with a message naming the field and the problem.
    """
    if not isinstance(model, SubModel):
        raise error(f"expected a SubModel, got {type(model).__name__}")
    if not isinstance(model.params, NetworkParams):
        raise error(f"params must be NetworkParams, got {type(model.params).__name__}")
    arrays = {
        "weights": model.weights,
        "thetas": model.thetas,
        "labels": model.labels,
        "class_rates": model.class_rates,
        "origin_node": model.origin_node,
        "origin_index": model.origin_index,
    }
    for name, arr in arrays.items():
        if not isinstance(arr, np.ndarray):
            raise error(f"{name} must be a NumPy array, got {type(arr).__name__}")
        kinds = "f" if _ARRAY_DTYPES[name] is np.float32 else "iu"
        if arr.dtype.kind not in kinds:
            raise error(f"{name} has dtype {arr.dtype}; expected {np.dtype(_ARRAY_DTYPES[name])}")

    w = model.weights
    if w.ndim != 2 or w.shape[1] < 1:
        raise error(f"weights must be (n_input, n_neurons) with n_neurons >= 1, got {w.shape}")
    n_input, n = w.shape
    if n_input != model.params.n_input:
        raise error(f"weights have {n_input} rows but params.n_input is {model.params.n_input}")
    for name in ("thetas", "labels", "origin_node", "origin_index"):
        if arrays[name].shape != (n,):
            raise error(f"{name} has shape {arrays[name].shape}; expected ({n},)")
    rates = model.class_rates
    if rates.ndim != 2 or rates.shape[0] < 1 or rates.shape[1] != n:
        raise error(f"class_rates has shape {rates.shape}; expected (n_classes, {n})")
    for name in ("weights", "thetas", "class_rates"):
        bad = int(np.count_nonzero(~np.isfinite(arrays[name])))
        if bad:
            raise error(f"{name} contain {bad} NaN or infinite value(s)")

    n_classes = rates.shape[0]
    _check_index_range(model.labels, -1, n_classes, "labels", error)
    prov = model.provenance
    if not isinstance(prov, Provenance):
        raise error(f"provenance must be Provenance, got {type(prov).__name__}")
    _validate_provenance(prov, error)
    _check_index_range(model.origin_node, 0, len(prov.sources), "origin_node", error)
    _check_index_range(model.origin_index, 0, 2**31 - 1, "origin_index", error)


def _check_index_range(
    arr: np.ndarray, lo: int, hi: int, name: str, error: type[EstdpError]
) -> None:
    """Values must lie in [lo, hi)."""
    if arr.size == 0:
        return
    vmin, vmax = int(arr.min()), int(arr.max())
    if vmin < lo or vmax >= hi:
        bad = vmin if vmin < lo else vmax
        raise error(f"{name} value {bad} is outside [{lo}, {hi})")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _validate_provenance(prov: Provenance, error: type[EstdpError]) -> None:
    if not isinstance(prov.node_id, str) or not prov.node_id:
        raise error(f"provenance.node_id must be a non-empty string, got {prov.node_id!r}")
    if not _is_int(prov.images_seen) or prov.images_seen < 0:
        raise error(f"provenance.images_seen must be an integer >= 0, got {prov.images_seen!r}")
    if not _is_int(prov.seed) or not -(2**63) <= prov.seed < 2**64:
        raise error(f"provenance.seed must be a 64-bit integer, got {prov.seed!r}")
    if not _is_int(prov.round) or prov.round < 0:
        raise error(f"provenance.round must be an integer >= 0, got {prov.round!r}")
    if not _is_int(prov.format_version) or prov.format_version < 1:
        raise error(f"provenance.format_version must be >= 1, got {prov.format_version!r}")
    created = prov.created_unix
    if isinstance(created, bool) or not isinstance(created, (int, float)):
        raise error(f"provenance.created_unix must be a number, got {created!r}")
    if not math.isfinite(created):
        raise error(f"provenance.created_unix must be finite, got {created!r}")
    if not isinstance(prov.sources, tuple) or not all(
        isinstance(s, str) and s for s in prov.sources
    ):
        raise error(
            f"provenance.sources must be a tuple of non-empty strings, got {prov.sources!r}"
        )
    if len(set(prov.sources)) != len(prov.sources):
        raise error(f"provenance.sources has duplicates: {list(prov.sources)}")
    if not isinstance(prov.notes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prov.notes.items()
    ):
        raise error("provenance.notes must map strings to strings")


# ---------------------------------------------------------------------------------------
# Wire form


def model_to_wire(model: SubModel, *, weight_encoding: str = "float32") -> dict[str, Any]:
    """The msgpack-ready map of a model (see the module docstring).

    Parameters
    ----------
    model
        A valid model.
    weight_encoding
        ``"float32"`` (lossless), ``"float16"`` (half the size) or ``"uint8"`` (a quarter;
        absolute error at most (max - min) / 510). Other arrays are always lossless.

    Raises
    ------
    ConfigError
        Unknown ``weight_encoding``.
    ProtocolError
        The model does not validate (see :func:`validate_model`).
    """
    if weight_encoding not in WEIGHT_ENCODINGS:
        raise ConfigError(
            f"unknown weight encoding {weight_encoding!r}; choose one of {', '.join(WEIGHT_ENCODINGS)}"
        )
    validate_model(model)
    prov = model.provenance
    wire: dict[str, Any] = {
        "format": WIRE_FORMAT,
        "version": FORMAT_VERSION,
        "params": model.params.to_dict(),
        "provenance": {
            "node_id": prov.node_id,
            "images_seen": int(prov.images_seen),
            "seed": int(prov.seed),
            "sources": list(prov.sources),
            "round": int(prov.round),
            "created_unix": float(prov.created_unix),
            "notes": dict(prov.notes),
        },
        "arrays": {
            "weights": _encode_weights(model.weights, weight_encoding),
            # Validation bounded every value, so these casts cannot wrap.
            **{
                name: encode_array(np.asarray(getattr(model, name), dtype))
                for name, dtype in _ARRAY_DTYPES.items()
                if name != "weights"
            },
        },
    }
    wire["sha256"] = _wire_digest(wire)
    return wire


def _encode_weights(weights: np.ndarray, encoding: str) -> dict[str, Any]:
    try:
        return encode_array(np.asarray(weights, np.float32), encoding)
    except ValueError as exc:  # e.g. weights beyond the float16 range
        raise ProtocolError(f"weights: {exc}") from None


def _wire_digest(wire: Mapping[str, Any]) -> bytes:
    """SHA-256 over everything in ``wire`` but the digest itself (see the module docstring).

    Raises TypeError or ValueError on values JSON cannot represent (e.g. bytes where a
    string belongs).
    """
    digest = hashlib.sha256(_DIGEST_TAG)
    meta = {key: wire[key] for key in ("format", "version", "params", "provenance")}
    digest.update(_canonical_json(meta))
    arrays = wire["arrays"]
    for name in sorted(arrays):
        entry = arrays[name]
        data = entry["data"]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"arrays.{name}.data is {type(data).__name__}, not bytes")
        digest.update(_canonical_json([name, {k: v for k, v in entry.items() if k != "data"}]))
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def model_from_wire(d: Any, *, max_bytes: int = MAX_MODEL_BYTES) -> SubModel:
    """Decode and validate a model map made by :func:`model_to_wire` (untrusted input).

    Parameters
    ----------
    d
        The unpacked msgpack value.
    max_bytes
        Refuse any array larger than this.

    Raises
    ------
    ProtocolError
        Wrong format or version (a newer one says so), a missing or unexpected field, a
        checksum mismatch, or a model that does not validate. One message says which.
    """
    if not isinstance(d, dict):
        raise ProtocolError(f"a model message must be a map, got {type(d).__name__}")
    if d.get("format") != WIRE_FORMAT:
        raise ProtocolError(f"not an ensemble-stdp model message (format {d.get('format')!r})")
    version = d.get("version")
    if not _is_int(version) or version < 1:
        raise ProtocolError(f"invalid model format version {version!r}")
    if version > FORMAT_VERSION:
        raise ProtocolError(
            f"model format version {version} was written by a newer version of ensemble-stdp "
            f"(this one reads versions up to {FORMAT_VERSION}); upgrade to read it"
        )
    keys = set(d)
    if keys != _TOP_KEYS:
        missing, extra = sorted(_TOP_KEYS - keys), sorted(map(str, keys - _TOP_KEYS))
        raise ProtocolError(
            "model message fields: "
            + "; ".join(
                part
                for part in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unexpected {', '.join(extra)}" if extra else "",
                )
                if part
            )
        )
    for key in ("params", "provenance", "arrays"):
        if not isinstance(d[key], dict):
            raise ProtocolError(f"{key} must be a map, got {type(d[key]).__name__}")
    arrays = d["arrays"]
    if set(arrays) != set(_ARRAY_DTYPES):
        missing = sorted(set(_ARRAY_DTYPES) - set(arrays))
        extra = sorted(map(str, set(arrays) - set(_ARRAY_DTYPES)))
        raise ProtocolError(f"arrays: missing {missing or 'none'}, unexpected {extra or 'none'}")
    for name, entry in arrays.items():
        if not isinstance(entry, dict) or "data" not in entry:
            raise ProtocolError(f"arrays.{name} must be a map with data")

    claimed = d["sha256"]
    if not isinstance(claimed, bytes) or len(claimed) != 32:
        raise ProtocolError("sha256 must be 32 bytes")
    try:
        actual = _wire_digest(d)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed model message: {exc}") from None
    if actual != claimed:
        raise ProtocolError("checksum mismatch: the model data is damaged")

    params = _params_from_wire(d["params"])
    provenance = _provenance_from_wire(d["provenance"], version)
    decoded = {
        name: decode_array(arrays[name], expected_dtype=dtype, max_bytes=max_bytes, name=name)
        for name, dtype in _ARRAY_DTYPES.items()
    }
    model = SubModel(params=params, provenance=provenance, **decoded)
    validate_model(model)
    return model


def _params_from_wire(values: dict[Any, Any]) -> NetworkParams:
    try:
        params = NetworkParams.from_dict(values)
    except ConfigError as exc:
        raise ProtocolError(f"params: {exc}") from None
    except (TypeError, ValueError) as exc:  # e.g. a non-string key
        raise ProtocolError(f"params: malformed: {exc}") from None
    # from_dict fills absent names from the preset; a model must carry all of them, so
    # that it means the same thing whatever the presets of the reading version are.
    missing = sorted(set(params.to_dict()) - set(values))
    if missing:
        raise ProtocolError(f"params: missing {', '.join(missing)}")
    return params


def _provenance_from_wire(p: dict[Any, Any], version: int) -> Provenance:
    keys = set(p)
    if keys != _PROVENANCE_KEYS:
        missing = sorted(_PROVENANCE_KEYS - keys)
        extra = sorted(map(str, keys - _PROVENANCE_KEYS))
        raise ProtocolError(
            f"provenance: missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    sources = p["sources"]
    if not isinstance(sources, list):
        raise ProtocolError(f"provenance.sources must be a list, got {type(sources).__name__}")
    return Provenance(
        node_id=p["node_id"],
        images_seen=p["images_seen"],
        seed=p["seed"],
        sources=tuple(sources),
        round=p["round"],
        format_version=version,
        created_unix=p["created_unix"],
        notes=p["notes"],
    )


def to_bytes(model: SubModel, **kw: Any) -> bytes:
    """The model as msgpack bytes (the MQTT payload); ``kw`` go to :func:`model_to_wire`."""
    return msgpack.packb(model_to_wire(model, **kw), use_bin_type=True)


def from_bytes(b: bytes | bytearray | memoryview, *, max_bytes: int = MAX_MODEL_BYTES) -> SubModel:
    """Decode a model from msgpack bytes made by :func:`to_bytes` (untrusted input).

    Sizes are bounded: the buffer by ``max_bytes`` and, inside it, strings, lists and
    maps by ``MAX_STR_LEN``, ``MAX_ARRAY_LEN`` and ``MAX_MAP_LEN``; ext types are refused.

    Raises
    ------
    ProtocolError
        Not msgpack, too large, trailing bytes, or any problem of :func:`model_from_wire`.
    """
    if not isinstance(b, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"a model message must be bytes, got {type(b).__name__}")
    size = memoryview(b).nbytes
    if size > max_bytes:
        raise ProtocolError(f"model message of {size} bytes exceeds the limit of {max_bytes}")
    try:
        # unpackb has no max_buffer_size (that is Unpacker's): the check above is it.
        wire = msgpack.unpackb(
            b,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_STR_LEN,
            max_bin_len=max_bytes,
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,
        )
    except msgpack.ExtraData:
        raise ProtocolError("unexpected bytes after the model message") from None
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"not valid msgpack: {exc}") from None
    return model_from_wire(wire, max_bytes=max_bytes)


# ---------------------------------------------------------------------------------------
# Files


def save_model(
    model: SubModel, path: str | os.PathLike[str], *, weight_encoding: str = "float32"
) -> int:
    """Write ``model`` to ``path`` atomically (the old file stays whole if this fails).

    Returns
    -------
    int
        The size of the file in bytes.

    Raises
    ------
    ModelFileError
        The model does not validate, or the file cannot be written (the message says
        which file and why).
    """
    path = Path(path)
    try:
        payload = to_bytes(model, weight_encoding=weight_encoding)
    except ProtocolError as exc:
        raise ModelFileError(f"{path}: not saved, the model is invalid: {exc}") from None
    header = _FILE_HEADER.pack(FILE_MAGIC, FORMAT_VERSION, 0, len(payload))
    try:
        with atomic_open(path) as handle:
            handle.write(header)
            handle.write(payload)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot write model file: {exc.strerror or exc}") from None
    return len(header) + len(payload)


def load_model(path: str | os.PathLike[str], *, max_bytes: int = MAX_MODEL_BYTES) -> SubModel:
    """Read and validate a model file written by :func:`save_model`.

    Raises
    ------
    ModelFileError
        Missing or unreadable file, not a model file, truncated or damaged, or written by
        a newer version; the message names the file and the problem.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes + _FILE_HEADER.size:
            raise ModelFileError(
                f"{path}: {size} bytes exceeds the model size limit of {max_bytes}"
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a directory, not a model file") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read model file: {exc.strerror or exc}") from None

    if not data.startswith(FILE_MAGIC):
        if data and FILE_MAGIC.startswith(data):
            raise ModelFileError(f"{path}: truncated model file ({len(data)} bytes)")
        raise ModelFileError(f"{path}: not an ensemble-stdp model file")
    if len(data) < _FILE_HEADER.size:
        raise ModelFileError(f"{path}: truncated model file ({len(data)} bytes, header incomplete)")
    _, version, flags, length = _FILE_HEADER.unpack_from(data)
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model file format version {version} was written by a newer version of "
            f"ensemble-stdp (this one reads versions up to {FORMAT_VERSION}); upgrade to read it"
        )
    if version < 1 or flags != 0:
        raise ModelFileError(f"{path}: damaged model file (bad header)")
    found = len(data) - _FILE_HEADER.size
    if found < length:
        raise ModelFileError(
            f"{path}: truncated model file ({found} of {length} bytes of model data)"
        )
    if found > length:
        raise ModelFileError(
            f"{path}: damaged model file ({found - length} unexpected bytes after the model)"
        )
    try:
        model = from_bytes(memoryview(data)[_FILE_HEADER.size :], max_bytes=max_bytes)
    except ProtocolError as exc:
        raise ModelFileError(f"{path}: damaged model file: {exc}") from None
    if model.provenance.format_version != version:
        raise ModelFileError(f"{path}: damaged model file (header and content versions differ)")
    return model
