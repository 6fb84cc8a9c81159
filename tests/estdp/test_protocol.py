"""Wire protocol: round trips, each malformed case refused, and only ProtocolError ever."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estdp import model as model_mod
from estdp import protocol
from estdp.arrays import encode_array
from estdp.chunking import decode_chunk, encode_chunk, split
from estdp.errors import ProtocolError
from estdp.model import SubModel, new_model
from estdp.params import NetworkParams
from estdp.protocol import (
    GlobalModel,
    LabelStats,
    Limits,
    NodeMetrics,
    NodeStatus,
    RoundAnnouncement,
    SubModelUpdate,
)


def tiny_model(n: int = 10, seed: int = 0, node: str = "n1") -> SubModel:
    rng = np.random.default_rng(seed)
    return new_model(
        rng.random((784, n), dtype=np.float32),
        rng.random(n, dtype=np.float32) * 0.05,
        NetworkParams(),
        node_id=node,
        images_seen=50,
        seed=seed,
        labels=rng.integers(-1, 10, n),
        class_rates=rng.random((10, n)),
    )


MODEL = tiny_model()
ROUND = RoundAnnouncement(3, 100, 300, "mse", 1.7e9, 5, 3, True, 1.6e9, "00ff")
UPDATE = SubModelUpdate("n1", 3, MODEL, 50, {"train_seconds": 1.5, "images": 50}, "00ff")
GLOBAL = GlobalModel(3, MODEL, ("n1", "n2"), {"merge_seconds": 0.25}, "00ff")
STATUS = NodeStatus("n1", "training", 3, 1.7e9, "round 3")
METRICS = NodeMetrics("n1", 3, {"accuracy_all_activity": 0.81})
LABEL_COUNTS = np.array([3, 0, 5, 1, 0, 2, 2, 0, 4, 1], np.int64)
LABELS = LabelStats(
    "n1",
    3,
    "0123456789abcdef",
    LABEL_COUNTS,
    LABEL_COUNTS[:, None] * np.linspace(0.0, 2.5, 10 * 10).reshape(10, 10),
    "00ff",
)
# In KINDS order (the fuzz test below looks a message up by its kind).
MESSAGES = [ROUND, UPDATE, GLOBAL, STATUS, METRICS, LABELS]
DECODERS = [
    protocol.decode,
    protocol.decode_round,
    protocol.decode_update,
    protocol.decode_global,
    protocol.decode_status,
    protocol.decode_metrics,
    protocol.decode_labels,
    decode_chunk,
]


def assert_same_model(a: SubModel, b: SubModel, atol: float = 0.0) -> None:
    np.testing.assert_allclose(a.weights, b.weights, atol=atol, rtol=0)
    np.testing.assert_array_equal(a.thetas, b.thetas)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.class_rates, b.class_rates)
    assert a.params == b.params
    assert a.provenance.node_id == b.provenance.node_id


def body_of(payload: bytes) -> dict:
    return msgpack.unpackb(payload, raw=False)


def repack(env: dict) -> bytes:
    return msgpack.packb(env, use_bin_type=True)


# ---- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("message", [ROUND, STATUS, METRICS], ids=lambda m: type(m).__name__)
def test_round_trip_of_plain_messages(message: protocol.Message) -> None:
    payload = protocol.encode(message)
    assert protocol.decode(payload) == message
    assert body_of(payload)["v"] == protocol.SCHEMA_VERSION


def test_round_trip_of_model_messages() -> None:
    update = protocol.decode_update(protocol.encode(UPDATE))
    assert (update.node_id, update.round_id, update.images_seen) == ("n1", 3, 50)
    assert update.metrics == {"train_seconds": 1.5, "images": 50.0}
    assert_same_model(update.model, MODEL)
    glob = protocol.decode_global(protocol.encode(GLOBAL))
    assert glob.contains == ("n1", "n2") and glob.round_id == 3 and glob.session == "00ff"
    assert_same_model(glob.model, MODEL)


def test_round_trip_of_label_statistics() -> None:
    payload = protocol.encode(LABELS)
    assert body_of(payload)["kind"] == "labels" and body_of(payload)["v"] == protocol.SCHEMA_VERSION
    back = protocol.decode(payload)
    assert isinstance(back, LabelStats)
    assert (back.node_id, back.round_id, back.model_tag, back.session) == (
        "n1",
        3,
        "0123456789abcdef",
        "00ff",
    )
    assert back.class_counts.dtype == np.int64 and back.response_sums.dtype == np.float64
    np.testing.assert_array_equal(back.class_counts, LABELS.class_counts)
    np.testing.assert_array_equal(back.response_sums, LABELS.response_sums)  # bit for bit
    assert back.n_images == 18
    assert protocol.decode_labels(payload).response_sums.shape == (10, 10)


def test_label_statistics_without_thresholds_keep_the_version_1_fields() -> None:
    body = body_of(protocol.encode(LABELS))["body"]
    assert "thetas" not in body and "calibration_images" not in body  # older peers accept it
    back = protocol.decode_labels(protocol.encode(LABELS))
    assert back.thetas is None and back.calibration_images == 0


def test_label_statistics_carry_the_thresholds_of_a_calibration_pass() -> None:
    thetas = np.linspace(10.0, 30.0, 10) + 1e-9  # float64, bit for bit
    stats = dataclasses.replace(LABELS, thetas=thetas, calibration_images=1500)
    back = protocol.decode_labels(protocol.encode(stats))
    assert back.calibration_images == 1500 and back.thetas.dtype == np.float64
    np.testing.assert_array_equal(back.thetas, thetas)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"thetas": np.zeros(9)}, "thetas"),  # one neuron short of response_sums
        ({"thetas": np.array([np.nan] + [0.0] * 9)}, "NaN"),
        ({"calibration_images": -1}, "calibration_images"),
    ],
)
def test_bad_thresholds_in_label_statistics_are_rejected(change, message) -> None:
    stats = dataclasses.replace(LABELS, thetas=np.zeros(10), calibration_images=5)
    env = body_of(protocol.encode(dataclasses.replace(stats, **change)))
    with pytest.raises(ProtocolError, match=message):
        protocol.decode_labels(repack(env))


def test_thresholds_without_their_image_count_are_rejected() -> None:
    env = body_of(protocol.encode(dataclasses.replace(LABELS, thetas=np.zeros(10))))
    del env["body"]["calibration_images"]
    with pytest.raises(ProtocolError, match="come together"):
        protocol.decode_labels(repack(env))


def test_the_calibration_request_of_a_provisional_model() -> None:
    def with_notes(notes):
        return model_mod.SubModel(
            **{
                **MODEL.__dict__,
                "provenance": model_mod.Provenance(**{**MODEL.provenance.__dict__, "notes": notes}),
            }
        )

    assert protocol.requested_calibration(with_notes({"labels": "provisional"})) == 0
    asked = with_notes({"labels": "provisional", "calibrate": "1500"})
    assert protocol.requested_calibration(asked) == 1500
    # Only a provisional model asks; a note that is not a count asks for nothing.
    assert (
        protocol.requested_calibration(with_notes({"labels": "federated", "calibrate": "9"})) == 0
    )
    assert (
        protocol.requested_calibration(with_notes({"labels": "provisional", "calibrate": "x"})) == 0
    )


def test_the_labels_note_of_a_global_model() -> None:
    assert protocol.global_labels(MODEL) == protocol.LABELS_KEPT  # no note: kept
    noted = model_mod.SubModel(
        **{
            **MODEL.__dict__,
            "provenance": model_mod.Provenance(
                **{**MODEL.provenance.__dict__, "notes": {"labels": "provisional"}}
            ),
        }
    )
    assert protocol.global_labels(noted) == protocol.LABELS_PROVISIONAL
    glob = protocol.decode_global(protocol.encode(GlobalModel(1, noted, ("n1",))))
    assert protocol.global_labels(glob.model) == protocol.LABELS_PROVISIONAL


@pytest.mark.parametrize(
    ("encoding", "ratio", "atol"), [("float16", 0.55, 2e-3), ("uint8", 0.3, 1 / 500)]
)
def test_lossy_weight_encodings_shrink_and_stay_close(
    encoding: str, ratio: float, atol: float
) -> None:
    full = protocol.encode(UPDATE)
    small = protocol.encode(UPDATE, weight_encoding=encoding)
    assert len(small) < ratio * len(full)
    assert_same_model(protocol.decode_update(small).model, MODEL, atol=atol)


def test_sender_drops_metrics_the_receiver_would_refuse() -> None:
    message = NodeMetrics("n1", 1, {"ok": 1.0, "nan": math.nan, "bad key!": 2.0, "flag": True})
    assert protocol.decode(protocol.encode(message)).metrics == {"ok": 1.0}


def test_encode_refuses_non_messages_and_unknown_encodings() -> None:
    with pytest.raises(TypeError):
        protocol.encode({"kind": "round"})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        protocol.encode(UPDATE, weight_encoding="int4")


# ---- each malformed case ------------------------------------------------------------------------


def mutate_body(message: protocol.Message, **changes: object) -> bytes:
    env = body_of(protocol.encode(message))
    for key, value in changes.items():
        if value is KeyError:
            del env["body"][key]
        else:
            env["body"][key] = value
    return repack(env)


BAD_BODIES = [
    (ROUND, {"round_id": -1}, "round_id"),
    (ROUND, {"round_id": True}, "integer"),
    (ROUND, {"round_id": 1.5}, "integer"),
    (ROUND, {"deadline_unix": math.inf}, "finite"),
    (ROUND, {"deadline_unix": "soon"}, "number"),
    (ROUND, {"neurons_per_node": 0}, "neurons_per_node"),
    (ROUND, {"min_nodes": 9}, "exceeds"),
    (ROUND, {"continue_from_global": 1}, "true or false"),
    (ROUND, {"metric": ""}, "empty"),
    (ROUND, {"metric": KeyError}, "missing"),
    (ROUND, {"surprise": 1}, "unexpected"),
    (STATUS, {"state": "asleep"}, "state"),
    (STATUS, {"node_id": "a/b"}, "node id"),
    (STATUS, {"node_id": "+"}, "node id"),
    (METRICS, {"metrics": {"acc": math.nan}}, "finite"),
    (METRICS, {"metrics": {"a/b": 1.0}}, "bad key"),
    (METRICS, {"metrics": {f"m{i}": 1.0 for i in range(65)}}, "at most"),
    (METRICS, {"metrics": [1.0]}, "map"),
    (UPDATE, {"model_sha256": b"\0" * 32}, "checksum"),
    (UPDATE, {"model_sha256": b"short"}, "32 bytes"),
    (UPDATE, {"model": "text"}, "bytes"),
    (UPDATE, {"images_seen": -5}, "images_seen"),
    (GLOBAL, {"contains": ["n1", "x/y"]}, "invalid node id"),
    (GLOBAL, {"contains": "n1"}, "list"),
    (GLOBAL, {"session": "NOT-HEX"}, "hex"),
    (ROUND, {"session": "a" * 33}, "hex"),
    (LABELS, {"node_id": "n/1"}, "node id"),
    (LABELS, {"round_id": -2}, "round_id"),
    (LABELS, {"model_tag": "0123"}, "16 lowercase hex"),
    (LABELS, {"model_tag": "0123456789ABCDEF"}, "16 lowercase hex"),
    (LABELS, {"session": "xyz"}, "hex"),
    (LABELS, {"class_counts": [1, 2]}, "expected a map"),
    (LABELS, {"response_sums": KeyError}, "missing"),
    (LABELS, {"class_counts": encode_array(np.ones(10))}, "int64 is expected"),
    (LABELS, {"class_counts": encode_array(-LABEL_COUNTS)}, "negative count"),
    (LABELS, {"class_counts": encode_array(np.zeros(0, np.int64))}, "0 classes"),
    (LABELS, {"response_sums": encode_array(np.ones((9, 10)))}, r"\(10, \*\) is expected"),
    (LABELS, {"response_sums": encode_array(np.ones((10, 10), np.float32))}, "float64"),
    (LABELS, {"response_sums": encode_array(np.zeros((10, 0)))}, "0 neurons"),
    (LABELS, {"response_sums": encode_array(np.full((10, 10), np.nan))}, "NaN or inf"),
    (LABELS, {"response_sums": encode_array(np.full((10, 10), -1.0))}, "negative sum"),
    (LABELS, {"response_sums": encode_array(np.ones((10, 10)))}, "class without images"),
]


@pytest.mark.parametrize(("message", "changes", "needle"), BAD_BODIES)
def test_each_malformed_body_is_refused_with_a_clear_message(
    message: protocol.Message, changes: dict, needle: str
) -> None:
    with pytest.raises(ProtocolError, match=needle):
        protocol.decode(mutate_body(message, **changes))


def model_blob_message(wire_change) -> bytes:
    """An update whose model map was changed by ``wire_change``, with both checksums made
    valid again (the model's own ``sha256`` and the envelope's ``model_sha256``), so that
    decoding gets past them to the check the change is meant for."""
    env = body_of(protocol.encode(UPDATE))
    wire = msgpack.unpackb(env["body"]["model"], raw=False)
    wire_change(wire)
    wire["sha256"] = model_mod._wire_digest(wire)
    blob = msgpack.packb(wire, use_bin_type=True)
    env["body"]["model"] = blob
    env["body"]["model_sha256"] = hashlib.sha256(blob).digest()
    return repack(env)


def _nan_weights(wire: dict) -> None:
    data = bytearray(wire["arrays"]["weights"]["data"])
    data[0:4] = np.float32(np.nan).tobytes()
    wire["arrays"]["weights"]["data"] = bytes(data)


def _shape_beyond_data(wire: dict) -> None:
    (n,) = wire["arrays"]["thetas"]["shape"]
    wire["arrays"]["thetas"]["shape"] = [n + 1]


def _one_theta_short(wire: dict) -> None:
    (n,) = wire["arrays"]["thetas"]["shape"]
    thetas = wire["arrays"]["thetas"]
    thetas["shape"] = [n - 1]
    thetas["data"] = thetas["data"][: 4 * (n - 1)]  # consistent in itself, not with the model


def test_a_rebuilt_model_message_decodes() -> None:
    # model_blob_message with no change decodes: a failure below is its own case's.
    decoded = protocol.decode_update(model_blob_message(lambda wire: None))
    assert_same_model(decoded.model, UPDATE.model)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (_nan_weights, r"weights contain 1 NaN or infinite value\(s\)"),
        (_shape_beyond_data, r"thetas: data has 40 bytes but shape \(11,\) needs 44"),
        (_one_theta_short, r"thetas has shape \(9,\); expected \(10,\)"),
    ],
)
def test_a_model_with_nan_weights_or_bad_shapes_is_refused(change, needle) -> None:
    with pytest.raises(ProtocolError, match=needle) as refused:
        protocol.decode_update(model_blob_message(change))
    assert "checksum" not in str(refused.value)


def test_envelope_cases() -> None:
    good = body_of(protocol.encode(ROUND))
    cases = {
        "version": repack({**good, "v": 2}),
        "integer": repack({**good, "v": "1"}),
        "unknown kind": repack({**good, "kind": "reboot"}),
        "keys v, kind, body": repack({"v": 1, "kind": "round"}),
        "body must be a map": repack({**good, "body": [1]}),
        "empty": b"",
        "not valid msgpack": protocol.encode(ROUND) + b"\x00",  # trailing bytes
        "expected bytes": "a string",
    }
    for needle, payload in cases.items():
        with pytest.raises(ProtocolError, match=needle):
            protocol.decode(payload)  # type: ignore[arg-type]


def test_kind_specific_decoders_refuse_other_kinds_and_chunks() -> None:
    with pytest.raises(ProtocolError, match="expected a 'update'"):
        protocol.decode_update(protocol.encode(ROUND))
    chunk = encode_chunk(split(b"x" * 10, 4)[0])
    with pytest.raises(ProtocolError, match="chunk"):
        protocol.decode(chunk)


def test_size_bounds() -> None:
    payload = protocol.encode(UPDATE)
    with pytest.raises(ProtocolError, match="exceed the limit"):
        protocol.decode(payload, Limits(max_message_bytes=len(payload) - 1))
    with pytest.raises(ProtocolError, match="neurons"):
        protocol.decode(payload, Limits(max_neurons=5))
    with pytest.raises(ProtocolError, match="at most 1 node"):
        protocol.decode(protocol.encode(GLOBAL), Limits(max_nodes=1))
    with pytest.raises(ProtocolError, match="10 neurons"):
        protocol.decode(protocol.encode(LABELS), Limits(max_neurons=9))
    ext = msgpack.packb(msgpack.ExtType(1, b"x" * 8))
    with pytest.raises(ProtocolError):
        protocol.decode(ext)
    deep = b"\x91" * 100_000 + b"\x00"  # 100k nested one-element arrays
    with pytest.raises(ProtocolError):
        protocol.decode(deep)


# ---- property: random and mutated bytes -> ProtocolError only --------------------------------

VALID_PAYLOADS = [protocol.encode(m) for m in MESSAGES] + [
    encode_chunk(c) for c in split(protocol.encode(STATUS), 16)
]

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def only_protocol_errors(payload: object) -> None:
    for decoder in DECODERS:
        with contextlib.suppress(ProtocolError):
            decoder(payload)


@FAST
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_protocol_errors(payload: bytes) -> None:
    only_protocol_errors(payload)


@FAST
@given(
    st.sampled_from(range(len(VALID_PAYLOADS))),
    st.lists(
        st.tuples(st.integers(0, 2**31), st.integers(0, 255), st.sampled_from("xid")),
        min_size=1,
        max_size=8,
    ),
)
def test_mutated_payloads_raise_only_protocol_errors(which: int, edits: list) -> None:
    data = bytearray(VALID_PAYLOADS[which])
    for pos, value, op in edits:
        i = pos % max(len(data), 1)
        if op == "x" and data:
            data[i] ^= value or 1
        elif op == "i":
            data.insert(i, value)
        elif data:
            del data[i]
    only_protocol_errors(bytes(data))


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=30,
)


@FAST
@given(
    st.sampled_from(protocol.KINDS),
    st.dictionaries(st.text(max_size=16), msgpack_values, max_size=8),
)
def test_well_formed_msgpack_with_wrong_contents_raises_only_protocol_errors(
    kind: str, body: dict
) -> None:
    only_protocol_errors(repack({"v": 1, "kind": kind, "body": body}))


@FAST
@given(st.sampled_from(protocol.KINDS[: len(MESSAGES)]), st.data())
def test_one_field_replaced_by_any_value_raises_only_protocol_errors(
    kind: str, data: st.DataObject
) -> None:
    message = MESSAGES[protocol.KINDS.index(kind)]
    env = body_of(protocol.encode(message))
    key = data.draw(st.sampled_from(sorted(env["body"])))
    env["body"][key] = data.draw(msgpack_values)
    only_protocol_errors(repack(env))
