"""The wire protocol: versioned msgpack messages between edge nodes and the aggregator.

Every message is one msgpack map, the *envelope*::

    {"v": SCHEMA_VERSION, "kind": KIND, "body": {...}}

with ``KIND`` one of ``round``, ``update``, ``global``, ``status``, ``metrics``, ``labels``
(and ``chunk``, see :mod:`estdp.chunking`). A message that carries a model holds it as one
msgpack blob (``body["model"]``, the packed :func:`estdp.model.model_to_wire` map) next to
its checksum ``body["model_sha256"] = sha256(body["model"])``, so a model damaged anywhere
between the trainer and the merge is refused before it is unpacked.

Decoding trusts nothing: the payload length is checked first, unpacking is bounded
(``max_buffer_size``, ``max_bin_len``, ``max_str_len``, ``max_array_len``, ``max_map_len``,
no ext types), then every field is checked for type, range and finiteness, the model for
its checksum, shapes and finite values. Every failure raises
:class:`~estdp.errors.ProtocolError`, and nothing else.

Rounds belong to a *session*: a random id the aggregator draws when its state directory
is new. Announcements and global models carry it and updates echo it, so that messages
retained from an earlier run on the same fleet (old updates, an old global model) are
never taken for the current run's, even though round numbers start again at 1.

Federated label assignment: a global model whose provenance note ``labels``
(:data:`LABELS_NOTE`) says ``provisional`` still carries the sub-models' labels; every node
that installs it answers with :class:`LabelStats` (its per-class image counts and each
neuron's summed spike counts per class on its labelled images), and the aggregator
publishes the same round's global model again with labels pooled from them
(``federated``), or ``kept`` when no node answered (:mod:`aggregator.federated_labels`).
A provisional model may also carry the note ``calibrate`` (:data:`CALIBRATE_NOTE`, a number
of images N): each node then first runs a thresholds-only pass over N of its images (the
weights frozen, theta adapting) and sends its thresholds with its statistics, measured
under them; the aggregator averages the thresholds.

Messages are plain frozen dataclasses; ``encode`` and the ``decode_*`` functions are the
only conversions to and from bytes. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from estdp.arrays import decode_array, encode_array
from estdp.errors import EstdpError, ProtocolError
from estdp.model import SubModel, model_from_wire, model_to_wire
from estdp.topics import is_valid_id

SCHEMA_VERSION = 1
NODE_STATES = ("online", "training", "offline")
WEIGHT_ENCODINGS = ("float32", "float16", "uint8")
MAX_METRICS = 64
MAX_TEXT = 256
MAX_CLASSES = 1024
MODEL_TAG_LENGTH = 16  # estdp.lineage.parent_tag
# The provenance note of a global model that says where its labels come from.
LABELS_NOTE = "labels"
LABELS_PROVISIONAL = "provisional"  # the sub-models' labels; label statistics requested
LABELS_KEPT = "kept"  # the sub-models' labels, final
LABELS_FEDERATED = "federated"  # pooled from the nodes' label statistics, final
LABEL_STATES = (LABELS_PROVISIONAL, LABELS_KEPT, LABELS_FEDERATED)
# On a provisional global model: images per node of the thresholds-only pass asked for.
CALIBRATE_NOTE = "calibrate"
_HEX = frozenset("0123456789abcdef")
_METRIC_RE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True)
class Limits:
    """Bounds applied while decoding untrusted bytes.

    Attributes
    ----------
    max_message_bytes
        Largest payload accepted (a whole message, or a reassembled chunked one).
    max_neurons
        Largest model accepted, in neurons.
    max_nodes
        Longest list of node ids (``GlobalModel.contains``).
    """

    max_message_bytes: int = 64 * 1024 * 1024
    max_neurons: int = 100_000
    max_nodes: int = 10_000

    def unpack_kwargs(self) -> dict[str, Any]:
        # unpackb has no max_buffer_size (Unpacker's): unpack() checks the length first.
        return {
            "max_bin_len": self.max_message_bytes,
            "max_str_len": 1024 * 1024,
            "max_array_len": max(self.max_nodes, 1024),
            "max_map_len": 4096,
            "max_ext_len": 0,
        }


DEFAULT_LIMITS = Limits()


# ---- messages -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundAnnouncement:
    """The aggregator opens a round (retained on ``estdp/<fleet>/round``).

    ``deadline_unix`` is absolute (seconds since the epoch) so that a restarted aggregator
    and every node agree on it. ``continue_from_global``: nodes start from the last global
    model instead of fresh weights.
    """

    round_id: int
    neurons_per_node: int
    target_size: int
    metric: str
    deadline_unix: float
    expected_nodes: int = 1
    min_nodes: int = 1
    continue_from_global: bool = False
    issued_unix: float = 0.0
    session: str = ""


@dataclass(frozen=True)
class SubModelUpdate:
    """A node's trained sub-model for one round."""

    node_id: str
    round_id: int
    model: SubModel
    images_seen: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    session: str = ""


@dataclass(frozen=True)
class GlobalModel:
    """The merged model of a round (retained on ``estdp/<fleet>/global``)."""

    round_id: int
    model: SubModel
    contains: tuple[str, ...]
    metrics: Mapping[str, float] = field(default_factory=dict)
    session: str = ""


@dataclass(frozen=True)
class NodeStatus:
    """A node's state; retained, and its last will says ``offline``."""

    node_id: str
    state: str
    round_id: int = -1
    time_unix: float = 0.0
    detail: str = ""


@dataclass(frozen=True)
class NodeMetrics:
    """What a node measured after installing a global model (accuracy, timings)."""

    node_id: str
    round_id: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)  # arrays: compare the fields, not the dataclass
class LabelStats:
    """A node's label statistics for a provisional global model.

    ``class_counts[c]``: the node's labelled images of class ``c``;
    ``response_sums[c, j]``: neuron ``j``'s spike counts summed over those images, with the
    global model frozen. ``model_tag`` is :func:`estdp.lineage.parent_tag` of the global
    model they were measured on, so that statistics of another model are never pooled.
    When that model asked for a calibration (:data:`CALIBRATE_NOTE`), ``thetas`` are the
    node's thresholds after its thresholds-only pass over ``calibration_images`` images,
    and the statistics were measured with them; otherwise ``thetas`` is None and
    ``calibration_images`` 0 (and neither is on the wire).
    """

    node_id: str
    round_id: int
    model_tag: str
    class_counts: np.ndarray  # (C,) int64
    response_sums: np.ndarray  # (C, N) float64
    session: str = ""
    thetas: np.ndarray | None = None  # (N,) float64, after the calibration pass
    calibration_images: int = 0

    @property
    def n_images(self) -> int:
        return int(np.asarray(self.class_counts).sum())


Message = RoundAnnouncement | SubModelUpdate | GlobalModel | NodeStatus | NodeMetrics | LabelStats

_KIND_OF: dict[type, str] = {
    RoundAnnouncement: "round",
    SubModelUpdate: "update",
    GlobalModel: "global",
    NodeStatus: "status",
    NodeMetrics: "metrics",
    LabelStats: "labels",
}
KINDS = (*_KIND_OF.values(), "chunk")


def new_session() -> str:
    """A fresh session id: 16 random hex digits."""
    return os.urandom(8).hex()


def global_labels(model: SubModel) -> str:
    """Where a global model's labels come from: one of :data:`LABEL_STATES` (a model
    without the note, e.g. from an earlier version, keeps the sub-models' labels)."""
    value = model.provenance.notes.get(LABELS_NOTE, LABELS_KEPT)
    return value if value in LABEL_STATES else LABELS_KEPT


def requested_calibration(model: SubModel) -> int:
    """Images per node of the thresholds-only pass a provisional global model asks for
    (:data:`CALIBRATE_NOTE`); 0 when it asks for none or the note is not a count."""
    if global_labels(model) != LABELS_PROVISIONAL:
        return 0
    text = model.provenance.notes.get(CALIBRATE_NOTE, "")
    try:
        value = int(text)
    except ValueError:
        return 0
    return max(value, 0)


# ---- encoding -------------------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    """msgpack bytes of ``obj`` (bin type for bytes, no ext types)."""
    return msgpack.packb(obj, use_bin_type=True)


def envelope(kind: str, body: Mapping[str, Any]) -> bytes:
    """The packed envelope of a message of ``kind``."""
    return pack({"v": SCHEMA_VERSION, "kind": kind, "body": dict(body)})


def _model_fields(model: SubModel, weight_encoding: str) -> dict[str, Any]:
    if weight_encoding not in WEIGHT_ENCODINGS:
        raise ValueError(
            f"unknown weight encoding {weight_encoding!r}; choose one of {', '.join(WEIGHT_ENCODINGS)}"
        )
    blob = pack(model_to_wire(model, weight_encoding=weight_encoding))
    return {"model": blob, "model_sha256": hashlib.sha256(blob).digest()}


def _clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    # Sender side: drop what the receiver would refuse rather than fail a whole update.
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            continue
        if _valid_metric_name(key) and math.isfinite(float(value)):
            out[key] = float(value)
        if len(out) == MAX_METRICS:
            break
    return out


def encode(message: Message, *, weight_encoding: str = "float32") -> bytes:
    """Encode a message as versioned msgpack bytes.

    Parameters
    ----------
    message
        One of the message dataclasses of this module.
    weight_encoding
        ``"float32"`` (lossless), ``"float16"`` or ``"uint8"`` (lossy, see
        :mod:`estdp.arrays`) for the model's weights; ignored for messages without a model.

    Returns
    -------
    bytes
        The payload to publish.

    Raises
    ------
    TypeError
        ``message`` is not a protocol message.
    ValueError
        ``weight_encoding`` is unknown, or the model cannot be encoded with it.
    """
    if isinstance(message, RoundAnnouncement):
        body: dict[str, Any] = {
            "round_id": int(message.round_id),
            "neurons_per_node": int(message.neurons_per_node),
            "target_size": int(message.target_size),
            "metric": message.metric,
            "deadline_unix": float(message.deadline_unix),
            "expected_nodes": int(message.expected_nodes),
            "min_nodes": int(message.min_nodes),
            "continue_from_global": bool(message.continue_from_global),
            "issued_unix": float(message.issued_unix),
            "session": message.session,
        }
    elif isinstance(message, SubModelUpdate):
        body = {
            "node_id": message.node_id,
            "round_id": int(message.round_id),
            "images_seen": int(message.images_seen),
            "metrics": _clean_metrics(message.metrics),
            "session": message.session,
            **_model_fields(message.model, weight_encoding),
        }
    elif isinstance(message, GlobalModel):
        body = {
            "round_id": int(message.round_id),
            "contains": list(message.contains),
            "metrics": _clean_metrics(message.metrics),
            "session": message.session,
            **_model_fields(message.model, weight_encoding),
        }
    elif isinstance(message, NodeStatus):
        body = {
            "node_id": message.node_id,
            "state": message.state,
            "round_id": int(message.round_id),
            "time_unix": float(message.time_unix),
            "detail": message.detail[:MAX_TEXT],
        }
    elif isinstance(message, NodeMetrics):
        body = {
            "node_id": message.node_id,
            "round_id": int(message.round_id),
            "metrics": _clean_metrics(message.metrics),
        }
    elif isinstance(message, LabelStats):
        body = {
            "node_id": message.node_id,
            "round_id": int(message.round_id),
            "model_tag": message.model_tag,
            "class_counts": encode_array(np.asarray(message.class_counts, dtype=np.int64)),
            "response_sums": encode_array(np.asarray(message.response_sums, dtype=np.float64)),
            "session": message.session,
        }
        if message.thetas is not None:
            body["thetas"] = encode_array(np.asarray(message.thetas, dtype=np.float64))
            body["calibration_images"] = int(message.calibration_images)
    else:
        raise TypeError(f"not a protocol message: {type(message).__name__}")
    return envelope(_KIND_OF[type(message)], body)


# ---- decoding -------------------------------------------------------------------------------


def unpack(payload: Any, limits: Limits = DEFAULT_LIMITS, *, what: str = "message") -> Any:
    """Unpack untrusted msgpack bytes with every size bounded.

    Raises
    ------
    ProtocolError
        Not bytes, too large, malformed, trailing data, ext types, too deep.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{what}: expected bytes, got {type(payload).__name__}")
    size = len(payload)
    if size == 0:
        raise ProtocolError(f"{what}: empty payload")
    if size > limits.max_message_bytes:
        raise ProtocolError(
            f"{what}: {size} bytes exceed the limit of {limits.max_message_bytes} bytes"
        )
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True, **limits.unpack_kwargs())
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ProtocolError(f"{what}: not valid msgpack ({type(exc).__name__}: {exc})") from exc


def open_envelope(
    payload: Any, limits: Limits = DEFAULT_LIMITS, *, expect: str | None = None
) -> tuple[str, dict[str, Any]]:
    """``(kind, body)`` of a message, with the version and kind checked.

    Parameters
    ----------
    expect
        Refuse any other kind.
    """
    env = unpack(payload, limits)
    if not isinstance(env, dict) or set(env) != {"v", "kind", "body"}:
        raise ProtocolError("message: expected a map with keys v, kind, body")
    version = env["v"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise ProtocolError(f"message: schema version must be an integer, got {version!r}")
    if version != SCHEMA_VERSION:
        raise ProtocolError(
            f"message: schema version {version} is not supported (this build speaks {SCHEMA_VERSION})"
        )
    kind = env["kind"]
    if kind not in KINDS:
        raise ProtocolError(f"message: unknown kind {kind!r}")
    if expect is not None and kind != expect:
        raise ProtocolError(f"message: expected a {expect!r} message, got {kind!r}")
    body = env["body"]
    if not isinstance(body, dict):
        raise ProtocolError(f"{kind}: body must be a map")
    return kind, body


class _Body:
    """Typed, checked access to the fields of a message body."""

    def __init__(
        self, kind: str, body: dict[str, Any], keys: tuple[str, ...], optional: tuple[str, ...]
    ) -> None:
        self.kind = kind
        self.body = body
        missing = [k for k in keys if k not in body]
        if missing:
            raise ProtocolError(f"{kind}: missing field(s) {', '.join(missing)}")
        extra = sorted(str(k) for k in set(body) - set(keys) - set(optional))
        if extra:
            raise ProtocolError(f"{kind}: unexpected field(s) {', '.join(extra)}")

    def fail(self, name: str, problem: str) -> ProtocolError:
        return ProtocolError(f"{self.kind}: {name} {problem}")

    def int(self, name: str, lo: int = 0, hi: int = 2**53) -> int:
        value = self.body[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"must be an integer, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise self.fail(name, f"must be in [{lo}, {hi}], got {value}")
        return value

    def float(self, name: str) -> float:
        value = self.body[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(name, f"must be a number, got {type(value).__name__}")
        result = float(value)
        if not math.isfinite(result):
            raise self.fail(name, f"must be finite, got {result}")
        return result

    def bool(self, name: str) -> bool:
        value = self.body[name]
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, got {type(value).__name__}")
        return value

    def text(self, name: str, max_len: int = MAX_TEXT) -> str:
        value = self.body[name]
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, got {type(value).__name__}")
        if len(value) > max_len:
            raise self.fail(name, f"is longer than {max_len} characters")
        return value

    def node_id(self, name: str = "node_id") -> str:
        value = self.body[name]
        if not is_valid_id(value):
            raise self.fail(name, f"{value!r} is not a valid node id")
        return value

    def session(self, name: str = "session") -> str:
        value = self.body[name]
        if not isinstance(value, str) or len(value) > 32 or not set(value) <= _HEX:
            raise self.fail(name, "must be at most 32 lowercase hex digits")
        return value

    def model_tag(self, name: str = "model_tag") -> str:
        value = self.body[name]
        if not (isinstance(value, str) and len(value) == MODEL_TAG_LENGTH and set(value) <= _HEX):
            raise self.fail(name, f"must be {MODEL_TAG_LENGTH} lowercase hex digits")
        return value

    def array(
        self, name: str, dtype: str, shape: tuple[int | None, ...], limits: Limits
    ) -> np.ndarray:
        # decode_array checks keys, dtype, shape and byte counts before it allocates.
        return decode_array(
            self.body[name],
            expected_dtype=dtype,
            expected_shape=shape,
            max_bytes=limits.max_message_bytes,
            name=f"{self.kind}: {name}",
        )

    def metrics(self, name: str = "metrics") -> dict[str, float]:
        value = self.body[name]
        if not isinstance(value, dict):
            raise self.fail(name, "must be a map")
        if len(value) > MAX_METRICS:
            raise self.fail(name, f"has {len(value)} entries (at most {MAX_METRICS})")
        out: dict[str, float] = {}
        for key, item in value.items():
            if not _valid_metric_name(key):
                raise self.fail(name, f"has a bad key {key!r}")
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise self.fail(name, f"[{key}] must be a number")
            if not math.isfinite(float(item)):
                raise self.fail(name, f"[{key}] must be finite")
            out[key] = float(item)
        return out

    def model(self, limits: Limits) -> SubModel:
        blob = self.body["model"]
        digest = self.body["model_sha256"]
        if not isinstance(blob, bytes):
            raise self.fail("model", "must be bytes")
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise self.fail("model_sha256", "must be 32 bytes")
        if hashlib.sha256(blob).digest() != digest:
            raise self.fail("model", "checksum mismatch (damaged in transit?)")
        wire = unpack(blob, limits, what=f"{self.kind}: model")
        return decode_model_wire(wire, limits, what=f"{self.kind}: model")


def _valid_metric_name(key: Any) -> bool:
    return isinstance(key, str) and 0 < len(key) <= 64 and set(key) <= _METRIC_RE_CHARS


def decode_model_wire(
    wire: Any, limits: Limits = DEFAULT_LIMITS, *, what: str = "model"
) -> SubModel:
    """A :class:`SubModel` from its unpacked wire map, validated.

    Raises
    ------
    ProtocolError
        The map is malformed, too large, or holds non-finite weights or thresholds.
    """
    if not isinstance(wire, dict):
        raise ProtocolError(f"{what}: expected a map, got {type(wire).__name__}")
    try:
        model = model_from_wire(wire)
    except ProtocolError as exc:
        raise ProtocolError(f"{what}: {exc}") from exc
    # model_from_wire is another module's code: whatever it lets escape is still a bad
    # payload from this decoder's point of view, and callers rely on one error type.
    except (EstdpError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ProtocolError(f"{what}: {exc}") from exc
    if not isinstance(model, SubModel):
        raise ProtocolError(f"{what}: did not decode to a model")
    n = model.n_neurons
    if not 1 <= n <= limits.max_neurons:
        raise ProtocolError(f"{what}: {n} neurons (accepted: 1 to {limits.max_neurons})")
    if model.weights.ndim != 2 or model.thetas.shape != (n,):
        raise ProtocolError(
            f"{what}: weights {model.weights.shape} and thetas {model.thetas.shape} disagree"
        )
    if not (np.isfinite(model.weights).all() and np.isfinite(model.thetas).all()):
        raise ProtocolError(f"{what}: weights or thresholds hold NaN or inf")
    return model


def _decode_round(b: _Body, limits: Limits) -> RoundAnnouncement:
    msg = RoundAnnouncement(
        round_id=b.int("round_id"),
        neurons_per_node=b.int("neurons_per_node", 1, limits.max_neurons),
        target_size=b.int("target_size", 1, limits.max_neurons),
        metric=b.text("metric", 64),
        deadline_unix=b.float("deadline_unix"),
        expected_nodes=b.int("expected_nodes", 1, limits.max_nodes),
        min_nodes=b.int("min_nodes", 1, limits.max_nodes),
        continue_from_global=b.bool("continue_from_global"),
        issued_unix=b.float("issued_unix"),
        session=b.session(),
    )
    if msg.min_nodes > msg.expected_nodes:
        raise b.fail(
            "min_nodes", f"({msg.min_nodes}) exceeds expected_nodes ({msg.expected_nodes})"
        )
    if not msg.metric:
        raise b.fail("metric", "is empty")
    return msg


def _decode_update(b: _Body, limits: Limits) -> SubModelUpdate:
    return SubModelUpdate(
        node_id=b.node_id(),
        round_id=b.int("round_id"),
        images_seen=b.int("images_seen"),
        metrics=b.metrics(),
        session=b.session(),
        model=b.model(limits),
    )


def _decode_global(b: _Body, limits: Limits) -> GlobalModel:
    contains = b.body["contains"]
    if not isinstance(contains, list) or len(contains) > limits.max_nodes:
        raise b.fail("contains", f"must be a list of at most {limits.max_nodes} node ids")
    if not all(is_valid_id(c) for c in contains):
        raise b.fail("contains", "holds an invalid node id")
    return GlobalModel(
        round_id=b.int("round_id"),
        contains=tuple(contains),
        metrics=b.metrics(),
        session=b.session(),
        model=b.model(limits),
    )


def _decode_status(b: _Body, limits: Limits) -> NodeStatus:
    state = b.text("state", 16)
    if state not in NODE_STATES:
        raise b.fail("state", f"must be one of {', '.join(NODE_STATES)}, got {state!r}")
    return NodeStatus(
        node_id=b.node_id(),
        state=state,
        round_id=b.int("round_id", -1),
        time_unix=b.float("time_unix"),
        detail=b.text("detail"),
    )


def _decode_metrics(b: _Body, limits: Limits) -> NodeMetrics:
    return NodeMetrics(node_id=b.node_id(), round_id=b.int("round_id"), metrics=b.metrics())


def _decode_labels(b: _Body, limits: Limits) -> LabelStats:
    counts = b.array("class_counts", "int64", (None,), limits)
    (n_classes,) = counts.shape
    if not 1 <= n_classes <= MAX_CLASSES:
        raise b.fail("class_counts", f"has {n_classes} classes (accepted: 1 to {MAX_CLASSES})")
    if (counts < 0).any():
        raise b.fail("class_counts", "holds a negative count")
    sums = b.array("response_sums", "float64", (n_classes, None), limits)
    n_neurons = sums.shape[1]
    if not 1 <= n_neurons <= limits.max_neurons:
        raise b.fail(
            "response_sums", f"has {n_neurons} neurons (accepted: 1 to {limits.max_neurons})"
        )
    if not np.isfinite(sums).all():
        raise b.fail("response_sums", "holds NaN or inf")
    if (sums < 0).any():
        raise b.fail("response_sums", "holds a negative sum (spike counts are >= 0)")
    if (sums[counts == 0] != 0).any():
        raise b.fail("response_sums", "holds responses to a class without images")
    thetas, calibration_images = None, 0
    if "thetas" in b.body or "calibration_images" in b.body:
        if "thetas" not in b.body or "calibration_images" not in b.body:
            raise b.fail("thetas", "and calibration_images come together")
        thetas = b.array("thetas", "float64", (n_neurons,), limits)
        if not np.isfinite(thetas).all():
            raise b.fail("thetas", "holds NaN or inf")
        calibration_images = b.int("calibration_images")
    return LabelStats(
        node_id=b.node_id(),
        round_id=b.int("round_id"),
        model_tag=b.model_tag(),
        class_counts=counts,
        response_sums=sums,
        session=b.session(),
        thetas=thetas,
        calibration_images=calibration_images,
    )


_FIELDS: dict[str, tuple[str, ...]] = {
    "round": (
        "round_id",
        "neurons_per_node",
        "target_size",
        "metric",
        "deadline_unix",
        "expected_nodes",
        "min_nodes",
        "continue_from_global",
        "issued_unix",
        "session",
    ),
    "update": ("node_id", "round_id", "images_seen", "metrics", "session", "model", "model_sha256"),
    "global": ("round_id", "contains", "metrics", "session", "model", "model_sha256"),
    "status": ("node_id", "state", "round_id", "time_unix", "detail"),
    "metrics": ("node_id", "round_id", "metrics"),
    "labels": (
        "node_id",
        "round_id",
        "model_tag",
        "class_counts",
        "response_sums",
        "session",
    ),
}
# Fields a message may leave out (added after schema version 1: older peers send and
# accept messages without them).
_OPTIONAL: dict[str, tuple[str, ...]] = {"labels": ("thetas", "calibration_images")}
_DECODERS = {
    "round": _decode_round,
    "update": _decode_update,
    "global": _decode_global,
    "status": _decode_status,
    "metrics": _decode_metrics,
    "labels": _decode_labels,
}


def decode(payload: Any, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode any protocol message (not a chunk; see :mod:`estdp.chunking`).

    Parameters
    ----------
    payload
        Untrusted bytes, e.g. an MQTT payload.
    limits
        Size bounds.

    Returns
    -------
    Message
        A validated message dataclass.

    Raises
    ------
    ProtocolError
        For every malformed, oversized, damaged or unsupported payload.
    """
    kind, body = open_envelope(payload, limits)
    if kind == "chunk":
        raise ProtocolError("message: a chunk where a whole message is expected")
    return _DECODERS[kind](_Body(kind, body, _FIELDS[kind], _OPTIONAL.get(kind, ())), limits)


def _decode_kind(kind: str, payload: Any, limits: Limits) -> Any:
    _, body = open_envelope(payload, limits, expect=kind)
    return _DECODERS[kind](_Body(kind, body, _FIELDS[kind], _OPTIONAL.get(kind, ())), limits)


def decode_round(payload: Any, limits: Limits = DEFAULT_LIMITS) -> RoundAnnouncement:
    """Decode a :class:`RoundAnnouncement`; raise ProtocolError for anything else."""
    return _decode_kind("round", payload, limits)


def decode_update(payload: Any, limits: Limits = DEFAULT_LIMITS) -> SubModelUpdate:
    """Decode a :class:`SubModelUpdate`; raise ProtocolError for anything else."""
    return _decode_kind("update", payload, limits)


def decode_global(payload: Any, limits: Limits = DEFAULT_LIMITS) -> GlobalModel:
    """Decode a :class:`GlobalModel`; raise ProtocolError for anything else."""
    return _decode_kind("global", payload, limits)


def decode_status(payload: Any, limits: Limits = DEFAULT_LIMITS) -> NodeStatus:
    """Decode a :class:`NodeStatus`; raise ProtocolError for anything else."""
    return _decode_kind("status", payload, limits)


def decode_metrics(payload: Any, limits: Limits = DEFAULT_LIMITS) -> NodeMetrics:
    """Decode a :class:`NodeMetrics`; raise ProtocolError for anything else."""
    return _decode_kind("metrics", payload, limits)


def decode_labels(payload: Any, limits: Limits = DEFAULT_LIMITS) -> LabelStats:
    """Decode a :class:`LabelStats`; raise ProtocolError for anything else."""
    return _decode_kind("labels", payload, limits)
