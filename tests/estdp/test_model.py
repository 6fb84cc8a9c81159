"""The model container: construction, validation, wire and file round trips, damage."""

from __future__ import annotations

import contextlib
import dataclasses
import struct
import time

import msgpack
import numpy as np
import pytest

from estdp import model as model_mod
from estdp.errors import ConfigError, MergeError, ModelFileError, ProtocolError
from estdp.model import (
    FILE_MAGIC,
    FORMAT_VERSION,
    Provenance,
    SubModel,
    from_bytes,
    load_model,
    model_from_wire,
    model_to_wire,
    new_model,
    save_model,
    to_bytes,
    validate_model,
)
from estdp.params import PAPER, NetworkParams


def make(n_input: int = 12, n: int = 5, seed: int = 0, **kw) -> SubModel:
    rng = np.random.default_rng(seed)
    kw.setdefault("labels", rng.integers(-1, 10, n))
    kw.setdefault("class_rates", rng.uniform(0, 3, (10, n)))
    return new_model(
        rng.uniform(0, 1, (n_input, n)),
        rng.uniform(0, 0.5, n),
        NetworkParams().replace(n_input=n_input),
        node_id="node-1",
        images_seen=1000,
        seed=seed,
        **kw,
    )


def merged(m: SubModel) -> SubModel:
    """A model whose neurons come from two nodes, as the aggregator makes them."""
    prov = dataclasses.replace(
        m.provenance, node_id="aggregator", sources=("a", "b"), round=3, notes={"metric": "mse"}
    )
    n = m.n_neurons
    return dataclasses.replace(
        m,
        provenance=prov,
        origin_node=(np.arange(n) % 2).astype(np.int32),
        origin_index=np.arange(n, dtype=np.int32)[::-1].copy(),
    )


def assert_same(a: SubModel, b: SubModel, *, exact_weights: bool = True) -> None:
    if exact_weights:
        np.testing.assert_array_equal(a.weights, b.weights)
    for name in ("thetas", "labels", "class_rates", "origin_node", "origin_index"):
        x, y = getattr(a, name), getattr(b, name)
        np.testing.assert_array_equal(x, y)
        assert x.dtype == y.dtype, name
    assert a.params == b.params
    assert a.provenance == b.provenance


# --- construction ------------------------------------------------------------------------


def test_new_model_defaults_and_dtypes():
    before = time.time()
    w = np.random.default_rng(0).uniform(0, 1, (784, 7))
    m = new_model(w, np.zeros(7), NetworkParams(), node_id="n7", images_seen=5, seed=3)
    assert m.weights.dtype == np.float32 and m.weights.shape == (784, 7)
    assert m.thetas.dtype == np.float32
    assert m.labels.dtype == np.int16 and (m.labels == -1).all()
    assert m.class_rates.dtype == np.float32 and m.class_rates.shape == (10, 7)
    assert not m.class_rates.any()
    assert m.origin_node.dtype == np.int32 and not m.origin_node.any()
    np.testing.assert_array_equal(m.origin_index, np.arange(7))
    p = m.provenance
    assert p.sources == ("n7",) and p.images_seen == 5 and p.seed == 3 and p.round == 0
    assert p.format_version == FORMAT_VERSION
    assert before <= p.created_unix <= time.time()
    assert (m.n_input, m.n_neurons, m.n_classes) == (784, 7, 10)
    w[0, 0] = 42.0  # the model holds its own copy
    assert m.weights[0, 0] != 42.0


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"weights": np.full((12, 5), np.nan)}, "weights contain 60 NaN"),
        ({"thetas": np.array([0, 0, np.inf, 0, 0])}, "thetas contain 1 NaN or infinite"),
        ({"thetas": np.zeros(4)}, r"thetas has shape \(4,\); expected \(5,\)"),
        ({"weights": np.zeros((11, 5))}, "11 rows but params.n_input is 12"),
        ({"weights": np.zeros(12)}, "n_input, n_neurons"),
        ({"weights": np.zeros((12, 0))}, "n_neurons >= 1"),
        ({"labels": np.array([0, 1, 2, 3, 10])}, r"labels value 10 is outside \[-1, 10\)"),
        ({"labels": np.array([0, 1, -2, 3, 4])}, "labels value -2"),
        ({"labels": np.array([0, 1, 70000, 3, 4])}, "labels values must lie in"),
        ({"labels": np.zeros(5)}, "labels must be an integer array"),
        ({"class_rates": np.zeros((10, 4))}, "class_rates has shape"),
        ({"class_rates": np.zeros((0, 5))}, "class_rates has shape"),
        ({"node_id": ""}, "node_id must be a non-empty string"),
        ({"images_seen": -1}, "images_seen must be an integer >= 0"),
        ({"round": 1.5}, "round must be an integer"),
    ],
)
def test_new_model_rejects(change, match):
    rng = np.random.default_rng(0)
    args = {
        "weights": rng.uniform(0, 1, (12, 5)),
        "thetas": np.zeros(5),
        "params": NetworkParams().replace(n_input=12),
        "node_id": "n",
        "images_seen": 1,
        "seed": 0,
    }
    args.update(change)
    with pytest.raises(ConfigError, match=match):
        new_model(**args)


def test_labels_follow_the_number_of_classes():
    m = make(labels=np.array([0, 1, 2, -1, 2]), class_rates=np.zeros((3, 5)))
    assert m.n_classes == 3
    with pytest.raises(ConfigError, match=r"outside \[-1, 3\)"):
        make(labels=np.array([0, 1, 3, -1, 2]), class_rates=np.zeros((3, 5)))


def test_validate_model_error_class_and_sources():
    m = merged(make())
    validate_model(m)
    bad = dataclasses.replace(m, origin_node=np.array([0, 1, 2, 0, 1], np.int32))
    with pytest.raises(MergeError, match=r"origin_node value 2 is outside \[0, 2\)"):
        validate_model(bad, error=MergeError)
    dup = dataclasses.replace(m, provenance=dataclasses.replace(m.provenance, sources=("a", "a")))
    with pytest.raises(ProtocolError, match="duplicates"):
        validate_model(dup)
    neg = dataclasses.replace(m, origin_index=np.array([0, -1, 2, 3, 4], np.int32))
    with pytest.raises(ProtocolError, match="origin_index value -1"):
        validate_model(neg)
    floaty = dataclasses.replace(m, origin_node=m.origin_node.astype(np.float32))
    with pytest.raises(ProtocolError, match="origin_node has dtype float32"):
        validate_model(floaty)


# --- wire --------------------------------------------------------------------------------


def test_wire_round_trip_is_exact_and_msgpack_ready():
    m = merged(make())
    wire = model_to_wire(m)
    assert wire["format"] == "ensemble-stdp/model" and wire["version"] == FORMAT_VERSION
    assert len(wire["sha256"]) == 32
    back = model_from_wire(msgpack.unpackb(msgpack.packb(wire), raw=False))
    assert_same(m, back)


def test_paper_preset_and_notes_survive():
    rng = np.random.default_rng(5)
    m = new_model(
        rng.uniform(0, 1, (784, 3)),
        np.zeros(3),
        PAPER,
        node_id="jetson-07",
        images_seen=30000,
        seed=9,
        round=4,
        notes={"dataset": "mnist"},
    )
    back = from_bytes(to_bytes(m))
    assert back.params == PAPER and back.params.preset == "paper"
    assert back.provenance.notes == {"dataset": "mnist"} and back.provenance.round == 4


@pytest.mark.parametrize(("encoding", "ratio"), [("float32", 4), ("float16", 2), ("uint8", 1)])
def test_weight_encodings(encoding, ratio):
    m = merged(make(n_input=784, n=30, seed=4))
    blob = to_bytes(m, weight_encoding=encoding)
    back = from_bytes(blob)
    assert_same(m, back, exact_weights=encoding == "float32")  # other arrays stay lossless
    assert back.weights.dtype == np.float32
    err = np.abs(back.weights.astype(np.float64) - m.weights)
    if encoding == "float16":
        assert (err <= np.abs(m.weights) * 2.0**-11).all()
    elif encoding == "uint8":
        assert err.max() <= (float(m.weights.max()) - float(m.weights.min())) / 510 + 1e-6
    weight_bytes = m.weights.size * ratio
    assert weight_bytes < len(blob) < weight_bytes + 4096  # the weights dominate the size


def test_unknown_weight_encoding():
    with pytest.raises(ConfigError, match="unknown weight encoding"):
        to_bytes(make(), weight_encoding="int4")


def rebuilt(m: SubModel, edit) -> dict:
    """The wire map of ``m`` after ``edit(wire)``, with a valid checksum again."""
    wire = model_to_wire(m)
    edit(wire)
    wire["sha256"] = model_mod._wire_digest(wire)
    return wire


def set_array(name: str, array: np.ndarray):
    def edit(wire):
        wire["arrays"][name] = model_mod.encode_array(array)

    return edit


M = make()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            set_array("weights", np.where(np.eye(12, 5) > 0, np.nan, M.weights).astype(np.float32)),
            "weights contain 5 NaN",
        ),
        (set_array("class_rates", np.full((10, 5), np.inf, np.float32)), "class_rates contain 50"),
        (set_array("thetas", np.zeros(6, np.float32)), r"thetas has shape \(6,\)"),
        (
            set_array("weights", np.zeros((12, 5), np.float64)),
            "weights: dtype float64 where float32",
        ),
        (set_array("labels", np.array([0, 1, 2, 3, 10], np.int16)), "labels value 10"),
        (
            set_array("origin_node", np.array([0, 0, 1, 0, 0], np.int32)),
            r"origin_node value 1 is outside \[0, 1\)",
        ),
        (set_array("class_rates", np.zeros((10, 4), np.float32)), "class_rates has shape"),
        (lambda w: w["params"].update(bogus=1), "params: unknown network parameter"),
        (lambda w: w["params"].pop("nu_pre"), "params: missing nu_pre"),
        (lambda w: w["params"].update(tc_v=-1.0), "params: parameter tc_v must be > 0"),
        (lambda w: w["provenance"].pop("seed"), "provenance: missing \\['seed'\\]"),
        (lambda w: w["provenance"].update(sources="node-1"), "sources must be a list"),
        (lambda w: w["provenance"].update(images_seen="many"), "images_seen must be an integer"),
        (lambda w: w["provenance"].update(notes={"k": 1}), "notes must map strings"),
        (lambda w: w["arrays"].pop("thetas"), "arrays: missing \\['thetas'\\]"),
        (lambda w: w.update(extra=1), "unexpected extra"),
    ],
)
def test_decoding_validates_every_field(edit, match):
    with pytest.raises(ProtocolError, match=match):
        from_bytes(msgpack.packb(rebuilt(M, edit)))


def test_version_and_format_checks():
    newer = model_to_wire(M)
    newer["version"] = FORMAT_VERSION + 1
    with pytest.raises(ProtocolError, match="written by a newer version"):
        model_from_wire(newer)
    for bad in (0, "1", True):
        wire = model_to_wire(M)
        wire["version"] = bad
        with pytest.raises(ProtocolError, match="invalid model format version"):
            model_from_wire(wire)
    other = model_to_wire(M)
    other["format"] = "something-else"
    with pytest.raises(ProtocolError, match="not an ensemble-stdp model message"):
        model_from_wire(other)


def test_checksum_catches_changes_anywhere():
    for edit in (
        lambda w: w["provenance"].update(images_seen=1001),
        lambda w: w["params"].update(nu_post=0.02),
        lambda w: w["arrays"]["labels"].update(data=b"\x00" * 10),
    ):
        wire = model_to_wire(M)
        edit(wire)
        with pytest.raises(ProtocolError, match="checksum mismatch"):
            model_from_wire(wire)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"\xc1", "not valid msgpack"),
        (b"", "not valid msgpack"),
        (msgpack.packb([1, 2]), "must be a map"),
        (msgpack.packb(msgpack.ExtType(3, b"xx")), "not valid msgpack"),
        (msgpack.packb({"format": "x" * 70000}), "not valid msgpack"),
        (to_bytes(M) + b"\x00", "unexpected bytes after"),
        (to_bytes(M)[:-7], "not valid msgpack"),
        ("a string", "must be bytes"),
    ],
)
def test_from_bytes_rejects(blob, match):
    with pytest.raises(ProtocolError, match=match):
        from_bytes(blob)


def test_from_bytes_size_limit():
    blob = to_bytes(M)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        from_bytes(blob, max_bytes=len(blob) - 1)
    assert from_bytes(memoryview(blob), max_bytes=len(blob)).n_neurons == 5


# --- files -------------------------------------------------------------------------------


def temp_files(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def test_save_load_round_trip(tmp_path):
    m = merged(make(n_input=784, n=20))
    path = tmp_path / "m.estdp"
    size = save_model(m, path)
    assert size == path.stat().st_size
    data = path.read_bytes()
    assert data.startswith(FILE_MAGIC)
    assert_same(m, load_model(str(path)))
    assert temp_files(tmp_path) == []


def test_save_lossy_file(tmp_path):
    m = make(n_input=784, n=20)
    save_model(m, tmp_path / "h.estdp", weight_encoding="float16")
    save_model(m, tmp_path / "f.estdp")
    assert (tmp_path / "h.estdp").stat().st_size < 0.6 * (tmp_path / "f.estdp").stat().st_size
    np.testing.assert_allclose(load_model(tmp_path / "h.estdp").weights, m.weights, atol=2.0**-11)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.estdp"
    save_model(M, path)
    return path, path.read_bytes()


HEADER = struct.Struct("<8sHHQ")


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda d: d[:3], r"truncated model file \(3 bytes\)"),
        (lambda d: d[:12], "truncated model file .*header incomplete"),
        (lambda d: d[: len(d) // 2], "truncated model file .* of .* bytes of model data"),
        (lambda d: d[:-1], "truncated model file"),
        (lambda d: d + b"junk", "4 unexpected bytes after the model"),
        (lambda d: b"", "not an ensemble-stdp model file"),
        (lambda d: b"# a text file\n" + d, "not an ensemble-stdp model file"),
        (lambda d: b"PK\x03\x04" + bytes(100), "not an ensemble-stdp model file"),
        (
            lambda d: d[:8] + struct.pack("<H", FORMAT_VERSION + 1) + d[10:],
            "format version 2 was written by a newer version of ensemble-stdp",
        ),
        (lambda d: d[:8] + struct.pack("<H", 0) + d[10:], r"damaged model file \(bad header\)"),
        (lambda d: d[:10] + b"\x01\x00" + d[12:], r"damaged model file \(bad header\)"),
    ],
)
def test_damaged_files(saved, mangle, match):
    path, data = saved
    path.write_bytes(mangle(data))
    with pytest.raises(ModelFileError, match=match) as info:
        load_model(path)
    assert str(info.value).startswith(f"{path}: ")


def test_flipped_weight_byte_is_a_checksum_error(saved):
    path, data = saved
    at = data.find(M.weights.astype("<f4").tobytes())
    assert at > 0
    damaged = bytearray(data)
    damaged[at + 17] ^= 0x04
    path.write_bytes(bytes(damaged))
    with pytest.raises(ModelFileError, match=f"{path}: damaged model file: checksum mismatch"):
        load_model(path)


def test_every_single_byte_flip_is_detected(tmp_path):
    """No flipped byte anywhere loads silently or escapes as another exception."""
    m = new_model(
        np.full((2, 1), 0.5),
        np.zeros(1),
        NetworkParams().replace(n_input=2),
        node_id="n",
        images_seen=0,
        seed=0,
    )
    path = tmp_path / "tiny.estdp"
    save_model(m, path)
    data = path.read_bytes()
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0xFF if i % 2 else 0x01
        path.write_bytes(bytes(damaged))
        with pytest.raises(ModelFileError):
            load_model(path)


def test_nan_weights_in_a_file(saved):
    path, _ = saved
    nan_weights = M.weights.copy()
    nan_weights[3, 2] = np.nan
    payload = msgpack.packb(rebuilt(M, set_array("weights", nan_weights)))
    path.write_bytes(HEADER.pack(FILE_MAGIC, FORMAT_VERSION, 0, len(payload)) + payload)
    with pytest.raises(ModelFileError, match="damaged model file: weights contain 1 NaN"):
        load_model(path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "absent.estdp")
    with pytest.raises(ModelFileError, match="is a directory"):
        load_model(tmp_path)


def test_load_size_limit(saved):
    path, data = saved
    with pytest.raises(ModelFileError, match="exceeds the model size limit"):
        load_model(path, max_bytes=len(data) // 2)


class _FailOnSecondWrite:
    """A file whose second write stores half its data and then fails, as a full disk does."""

    def __init__(self, handle):
        self.handle = handle
        self.writes = 0

    def write(self, data):
        self.writes += 1
        if self.writes == 2:
            self.handle.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        return self.handle.write(data)


def test_failed_save_keeps_the_old_file(saved, monkeypatch):
    path, data = saved
    real = model_mod.atomic_open

    @contextlib.contextmanager
    def flaky(target, **kw):
        with real(target, **kw) as handle:
            yield _FailOnSecondWrite(handle)

    monkeypatch.setattr(model_mod, "atomic_open", flaky)
    with pytest.raises(ModelFileError, match=f"{path}: cannot write model file: No space left"):
        save_model(make(seed=9), path)
    assert path.read_bytes() == data
    assert_same(load_model(path), M)
    assert temp_files(path.parent) == []


def test_invalid_model_is_not_saved(tmp_path):
    bad = dataclasses.replace(M, thetas=np.full(5, np.nan, np.float32))
    path = tmp_path / "bad.estdp"
    with pytest.raises(ModelFileError, match="not saved, the model is invalid: thetas contain 5"):
        save_model(bad, path)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination(tmp_path):
    with pytest.raises(ModelFileError, match="cannot write model file"):
        save_model(M, tmp_path / "no-such-dir" / "m.estdp")
    (tmp_path / "d.estdp").mkdir()
    with pytest.raises(ModelFileError, match="cannot write model file"):
        save_model(M, tmp_path / "d.estdp")
    assert temp_files(tmp_path) == []


def test_provenance_is_a_plain_dataclass():
    p = Provenance("n", 1, 2)
    assert p.sources == () and p.notes == {} and p.format_version == FORMAT_VERSION
