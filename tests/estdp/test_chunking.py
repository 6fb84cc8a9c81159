"""Chunked transfer: split, encode, and reassembly under loss, duplication and reordering."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estdp.chunking import (
    Chunk,
    Reassembler,
    chunk_bytes_for,
    decode_chunk,
    encode_chunk,
    split,
)
from estdp.errors import ProtocolError
from estdp.protocol import Limits


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def wire(chunks: list[Chunk]) -> list[Chunk]:
    """Chunks as a receiver sees them: encoded, then decoded."""
    return [decode_chunk(encode_chunk(c)) for c in chunks]


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 700), st.randoms(use_true_random=False))
def test_any_order_with_duplicates_gives_back_the_payload_once(
    payload: bytes, size: int, rnd: random.Random
) -> None:
    chunks = wire(split(payload, size))
    assert all(len(c.data) <= size for c in chunks)
    assert sum(len(c.data) for c in chunks) == len(payload)
    stream = chunks + rnd.sample(chunks, k=len(chunks) // 2)  # duplicates
    rnd.shuffle(stream)
    r = Reassembler()
    results = [r.add(c, "t") for c in stream]
    assert [x for x in results if x is not None] == [payload]
    assert r.pending == 0 and r.bytes_held == 0
    assert all(r.add(c, "t") is None for c in chunks)  # late duplicates are ignored


def test_a_lost_chunk_leaves_the_transfer_incomplete_until_it_times_out() -> None:
    clock = FakeClock()
    r = Reassembler(timeout_s=5.0, clock=clock)
    chunks = split(bytes(range(256)) * 10, 300)
    for c in chunks[:-1]:
        assert r.add(c, "t") is None
    assert r.pending == 1 and r.bytes_held == 2560 - len(chunks[-1].data)
    clock.now = 4.0
    assert r.expire() == []
    clock.now = 10.0
    (dropped,) = r.expire()
    assert (dropped.received, dropped.count) == (len(chunks) - 1, len(chunks))
    assert r.pending == 0 and r.bytes_held == 0


def test_sources_never_mix() -> None:
    chunks = split(b"a" * 100, 30)
    r = Reassembler()
    for c in chunks[:-1]:
        r.add(c, "node-a")
    assert r.add(chunks[-1], "node-b") is None  # same transfer id, other source
    assert r.add(chunks[-1], "node-a") == b"a" * 100


def test_memory_bounds_evict_the_least_recently_active_transfer() -> None:
    r = Reassembler(max_transfers=2, max_total_bytes=1000)
    a, b, c = (split(bytes([i]) * 400, 100) for i in range(3))
    r.add(a[0], "t")
    r.add(b[0], "t")
    r.add(a[1], "t")  # a is now the most recent
    r.add(c[0], "t")  # a third transfer: b goes
    assert r.pending == 2
    assert r.dropped[-1].transfer_id == b[0].transfer_id
    for chunk in c[1:]:
        r.add(chunk, "t")
    assert r.bytes_held <= 1000
    with pytest.raises(ProtocolError, match="reassembly bound"):
        r.add(split(b"x" * 2000, 100)[0], "t")


def test_contradicting_chunks_and_bad_checksums_are_refused() -> None:
    chunks = split(b"abcdefgh" * 10, 20)
    r = Reassembler()
    r.add(chunks[0], "t")
    liar = Chunk(
        chunks[1].transfer_id, 1, chunks[1].count + 1, 80, chunks[1].sha256, chunks[1].data
    )
    with pytest.raises(ProtocolError, match="contradicts"):
        r.add(liar, "t")
    assert r.pending == 0
    forged = [
        Chunk(c.transfer_id, c.index, c.count, c.total_size, c.sha256, c.data.upper())
        for c in chunks
    ]
    r2 = Reassembler()
    with pytest.raises(ProtocolError, match="SHA-256"):
        for c in forged:
            r2.add(c, "t")


def test_decode_chunk_validates_every_field() -> None:
    good = split(b"x" * 50, 20)[0]
    bad = [
        Chunk("not hex!", 0, 3, 50, good.sha256, good.data),
        Chunk(good.transfer_id, 3, 3, 50, good.sha256, good.data),
        Chunk(good.transfer_id, 0, 0, 50, good.sha256, good.data),
        Chunk(good.transfer_id, 0, 3, 50, b"short", good.data),
        Chunk(good.transfer_id, 0, 3, 50, good.sha256, good.data + b"!"),
    ]
    for chunk in bad:
        with pytest.raises(ProtocolError):
            decode_chunk(encode_chunk(chunk))
    big = split(b"x" * 5000, 1000)[0]
    with pytest.raises(ProtocolError, match="transfer of 5000 bytes exceeds the limit"):
        decode_chunk(encode_chunk(big), Limits(max_message_bytes=2000))


def test_chunks_fit_the_packet_limit() -> None:
    limit = 1_000_000
    payload = bytes(5_000_000)
    size = chunk_bytes_for(limit, len("estdp/fleet/nodes/node-12/update/chunk/99999"))
    chunks = split(payload, size)
    assert len(chunks) == 6
    assert max(len(encode_chunk(c)) for c in chunks) + 64 < limit
    with pytest.raises(ValueError):
        chunk_bytes_for(100)
