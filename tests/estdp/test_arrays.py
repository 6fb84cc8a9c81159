"""Array <-> msgpack-ready dict: lossless and lossy round trips, and strict decoding."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from estdp.arrays import DTYPES, MAX_DIM, decode_array, encode_array
from estdp.errors import ConfigError, ProtocolError


def wire_round_trip(d):
    """Through real msgpack, as the protocol and the model files will carry it."""
    return msgpack.unpackb(msgpack.packb(d, use_bin_type=True), raw=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 0, 3)])
def test_raw_round_trip_every_dtype(dtype, shape):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, size=shape) if dtype == "bool" else rng.integers(-100, 100, size=shape)
    a = np.abs(a).astype(dtype) if dtype.startswith("uint") else a.astype(dtype)
    d = wire_round_trip(encode_array(a))
    assert d["dtype"] == dtype and d["shape"] == list(shape)
    out = decode_array(d)
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    np.testing.assert_array_equal(out, a)
    assert out.flags.writeable and out.dtype.isnative


def test_wire_is_little_endian_even_for_big_endian_input():
    big = np.array([1.5, -2.0], dtype=">f4")
    d = encode_array(big)
    assert d["data"] == struct.pack("<2f", 1.5, -2.0)
    assert d["dtype"] == "float32"
    out = decode_array(d)
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, [1.5, -2.0])


def test_non_contiguous_input_is_encoded_in_c_order():
    a = np.arange(12, dtype=np.int32).reshape(3, 4).T
    np.testing.assert_array_equal(decode_array(encode_array(a)), a)


def test_float32_encoding_casts():
    d = encode_array(np.array([0.1, 0.2]), "float32")
    assert d["dtype"] == "float32" and "enc" not in d and len(d["data"]) == 8


def test_float16_within_half_ulp():
    a = np.random.default_rng(1).uniform(1e-3, 1.0, size=(50, 20)).astype(np.float32)
    d = wire_round_trip(encode_array(a, "float16"))
    assert d["enc"] == "float16" and len(d["data"]) == a.size * 2
    out = decode_array(d, expected_dtype="float32")
    assert out.dtype == np.float32
    assert np.all(np.abs(out - a) <= np.abs(a) * 2.0**-11)
    assert not np.array_equal(out, a)  # it is lossy: the bound above is not vacuous


def test_uint8_within_half_step():
    a = np.random.default_rng(2).uniform(-0.3, 1.0, size=(784, 10)).astype(np.float32)
    d = wire_round_trip(encode_array(a, "uint8"))
    assert d["enc"] == "uint8" and len(d["data"]) == a.size
    assert d["offset"] == pytest.approx(float(a.min()))
    step = (float(a.max()) - float(a.min())) / 255
    out = decode_array(d, expected_dtype="float32", expected_shape=(784, None))
    err = np.abs(out.astype(np.float64) - a)
    assert err.max() <= step / 2 + 1e-6
    assert err.max() > step / 10  # genuinely quantised
    assert out.min() == pytest.approx(a.min()) and out.max() == pytest.approx(a.max(), abs=1e-6)


@pytest.mark.parametrize("a", [np.full((3, 2), 0.25, np.float32), np.zeros((0, 4), np.float32)])
def test_uint8_constant_and_empty(a):
    np.testing.assert_array_equal(decode_array(encode_array(a, "uint8")), a)


def test_encode_rejections():
    with pytest.raises(ConfigError, match="unknown array encoding"):
        encode_array(np.zeros(2), "bfloat16")
    with pytest.raises(ValueError, match="float array"):
        encode_array(np.zeros(2, np.int32), "uint8")
    with pytest.raises(ValueError, match="finite"):
        encode_array(np.array([1.0, np.nan]), "float16")
    with pytest.raises(ValueError, match="float16 range"):
        encode_array(np.array([1e6], np.float32), "float16")
    with pytest.raises(ValueError, match="dtype"):
        encode_array(np.array([1 + 2j]))
    with pytest.raises(ValueError, match="dtype"):
        encode_array(np.array(["a"]))


GOOD = encode_array(np.arange(6, dtype=np.float32).reshape(2, 3))


def edited(**changes):
    d = dict(GOOD)
    for key, value in changes.items():
        if value is KeyError:
            d.pop(key)
        else:
            d[key] = value
    return d


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ([1, 2], "expected a map"),
        (edited(data=KeyError), "missing key"),
        (edited(extra=1), "unexpected key"),
        (edited(dtype="object"), "not allowed"),
        (edited(dtype="complex64"), "not allowed"),
        (edited(dtype=7), "not allowed"),
        (edited(shape="2,3"), "list of integers"),
        (edited(shape=[2, -3]), "non-negative"),
        (edited(shape=[2, 3.0]), "non-negative"),
        (edited(shape=[True, 6]), "non-negative"),
        (edited(shape=[1] * 33), "dimensions"),
        (edited(shape=[0, MAX_DIM + 1]), "dimension above"),
        (edited(data="abc"), "must be bytes"),
        (edited(data=GOOD["data"][:-1]), "needs 24"),
        (edited(data=GOOD["data"] + b"\0"), "needs 24"),
        (edited(shape=[4, 3]), "needs 48"),
        (edited(enc="bfloat16"), "unknown encoding"),
        (edited(enc="uint8"), "unexpected key|missing"),
        (edited(enc="uint8", scale=1.0, offset=float("nan"), data=b"\0" * 6), "finite"),
        (edited(enc="uint8", scale=-1.0, offset=0.0, data=b"\0" * 6), ">= 0"),
        (edited(enc="uint8", scale="1", offset=0.0, data=b"\0" * 6), "number"),
        (edited(enc="float16", data=b"\0" * 24), "needs 12"),
    ],
)
def test_decode_rejects(d, match):
    with pytest.raises(ProtocolError, match=match):
        decode_array(d, name="weights")


def test_decode_message_names_the_array():
    with pytest.raises(ProtocolError, match="^thetas: "):
        decode_array(edited(dtype="object"), name="thetas")


def test_lossy_encoding_of_integers_is_refused():
    d = encode_array(np.zeros(3, np.int16))
    d.update(enc="float16", data=b"\0" * 6)
    with pytest.raises(ProtocolError, match="float arrays only"):
        decode_array(d)


def test_bool_bytes_must_be_0_or_1():
    d = encode_array(np.array([True, False]))
    d["data"] = b"\x01\x02"
    with pytest.raises(ProtocolError, match="0 and 1"):
        decode_array(d)


def test_expected_dtype_and_shape():
    with pytest.raises(ProtocolError, match="float64 where float32"):
        decode_array(encode_array(np.zeros(3)), expected_dtype=np.float32)
    with pytest.raises(ProtocolError, match=r"where \(3, \*\) is expected"):
        decode_array(GOOD, expected_shape=(3, None))
    with pytest.raises(ProtocolError, match="where"):
        decode_array(GOOD, expected_shape=(2,))
    assert decode_array(GOOD, expected_shape=(None, 3)).shape == (2, 3)


def test_size_limit_is_checked_before_allocating():
    # A tiny message that claims a huge array must fail on the claim, not on memory.
    d = {"dtype": "float64", "shape": [1 << 20, 1 << 20], "data": b""}
    with pytest.raises(ProtocolError, match="size limit"):
        decode_array(d)
    with pytest.raises(ProtocolError, match="size limit"):
        decode_array(GOOD, max_bytes=23)
    # uint8 on the wire, float64 when decoded: the decoded size counts too.
    q = encode_array(np.zeros(16, np.float64), "uint8")
    with pytest.raises(ProtocolError, match="size limit"):
        decode_array(q, max_bytes=64)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.int64, np.uint16, np.bool_]),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
    )
)
def test_raw_round_trip_property(a):
    out = decode_array(wire_round_trip(encode_array(a)))
    np.testing.assert_array_equal(out, a)
    assert out.dtype == a.dtype


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=32),
    st.lists(st.integers(-3, 10), max_size=4),
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["dtype", "shape", "data", "enc", "scale", "offset", "x"]),
        st.one_of(_VALUES, st.sampled_from(list(DTYPES) + ["float16", "uint8"])),
    )
)
def test_garbage_only_ever_raises_protocol_error(d):
    try:
        out = decode_array(d, max_bytes=4096)
    except ProtocolError:
        return
    assert isinstance(out, np.ndarray)
