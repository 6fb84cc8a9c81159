"""Chunked transfer: one large payload as several small messages, and their reassembly.

Brokers cap packet sizes (EMQX 1 MB by default, Mosquitto 2.1+ 2,000,000 bytes), and a
784 x 6400 float32 model is 20 MB. :func:`split` cuts an encoded message into ``count``
chunks of at most ``chunk_bytes`` bytes each; every chunk is a protocol envelope of kind
``chunk`` carrying::

    transfer_id   16 random bytes, hex: names one transfer
    index, count  position of this chunk, number of chunks (0 <= index < count)
    total_size    length of the whole payload, bytes
    sha256        SHA-256 of the whole payload (32 bytes)
    data          bytes [index * chunk_size, (index + 1) * chunk_size) of the payload

so that chunk ``i`` starts at ``i * chunk_size`` with ``chunk_size = ceil(total / count)``.

:class:`Reassembler` accepts chunks in any order, ignores duplicates (including late ones
of a transfer already completed), refuses chunks that contradict their transfer, checks
the SHA-256 of the joined payload, and bounds its memory: at most ``max_transfers``
transfers and ``max_total_bytes`` bytes are held, the least recently active transfer is
evicted to make room, and a transfer idle for ``timeout_s`` is dropped as incomplete.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from estdp.errors import ProtocolError
from estdp.protocol import DEFAULT_LIMITS, Limits, envelope, open_envelope

log = logging.getLogger(__name__)

MAX_CHUNKS = 100_000
# Bytes the chunk envelope adds around ``data`` (keys, ids, sha256, msgpack headers): the
# fields are fixed-size, so this bound is exact enough to size chunks under a packet limit.
CHUNK_OVERHEAD = 160
_FIELDS = frozenset(("transfer_id", "index", "count", "total_size", "sha256", "data"))


@dataclass(frozen=True)
class Chunk:
    """One piece of a chunked transfer."""

    transfer_id: str
    index: int
    count: int
    total_size: int
    sha256: bytes
    data: bytes


@dataclass(frozen=True)
class Incomplete:
    """A transfer dropped before all its chunks arrived."""

    source: str
    transfer_id: str
    received: int
    count: int
    reason: str


def new_transfer_id() -> str:
    """32 hex digits of randomness."""
    return os.urandom(16).hex()


def split(payload: bytes, chunk_bytes: int, *, transfer_id: str | None = None) -> list[Chunk]:
    """Cut ``payload`` into chunks of at most ``chunk_bytes`` bytes of data.

    Parameters
    ----------
    payload
        The whole encoded message.
    chunk_bytes
        Most data bytes per chunk (use :func:`chunk_bytes_for` to fit a packet limit).
    transfer_id
        Id of this transfer; a fresh random one by default.

    Returns
    -------
    list of Chunk
        At least one chunk.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    total = len(payload)
    count = max(1, math.ceil(total / chunk_bytes))
    if count > MAX_CHUNKS:
        raise ValueError(
            f"{total} bytes in chunks of {chunk_bytes} need {count} > {MAX_CHUNKS} chunks"
        )
    size = max(1, math.ceil(total / count))
    tid = transfer_id or new_transfer_id()
    digest = hashlib.sha256(payload).digest()
    view = memoryview(payload)
    return [
        Chunk(tid, i, count, total, digest, bytes(view[i * size : (i + 1) * size]))
        for i in range(count)
    ]


def chunk_bytes_for(max_packet_bytes: int, topic_bytes: int = 128) -> int:
    """Data bytes per chunk so that a chunk's packet stays under ``max_packet_bytes``."""
    room = max_packet_bytes - CHUNK_OVERHEAD - topic_bytes - 16  # 16: MQTT fixed header etc.
    if room < 1:
        raise ValueError(f"a packet limit of {max_packet_bytes} bytes leaves no room for data")
    return room


def encode_chunk(chunk: Chunk) -> bytes:
    """The payload of one chunk message."""
    return envelope(
        "chunk",
        {
            "transfer_id": chunk.transfer_id,
            "index": chunk.index,
            "count": chunk.count,
            "total_size": chunk.total_size,
            "sha256": chunk.sha256,
            "data": chunk.data,
        },
    )


def decode_chunk(payload: Any, limits: Limits = DEFAULT_LIMITS) -> Chunk:
    """Decode and validate one chunk message.

    Raises
    ------
    ProtocolError
        Anything malformed: wrong kind, fields, types, or inconsistent sizes.
    """
    _, body = open_envelope(payload, limits, expect="chunk")
    if set(body) != _FIELDS:
        raise ProtocolError(f"chunk: expected fields {', '.join(sorted(_FIELDS))}")
    tid, index, count, total, digest, data = (
        body["transfer_id"],
        body["index"],
        body["count"],
        body["total_size"],
        body["sha256"],
        body["data"],
    )
    if not isinstance(tid, str) or not 1 <= len(tid) <= 64 or not tid.isalnum():
        raise ProtocolError("chunk: transfer_id must be 1-64 letters or digits")
    for name, value in (("index", index), ("count", count), ("total_size", total)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ProtocolError(f"chunk: {name} must be a non-negative integer")
    if not 1 <= count <= MAX_CHUNKS or index >= count:
        raise ProtocolError(f"chunk: index {index} of {count} is out of range")
    if total > limits.max_message_bytes:
        raise ProtocolError(
            f"chunk: transfer of {total} bytes exceeds the limit of {limits.max_message_bytes}"
        )
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise ProtocolError("chunk: sha256 must be 32 bytes")
    if not isinstance(data, bytes):
        raise ProtocolError("chunk: data must be bytes")
    size = math.ceil(total / count) if total else 0
    expected = max(0, min(size, total - index * size))
    if len(data) != expected:
        raise ProtocolError(
            f"chunk: {len(data)} data bytes where chunk {index} of {count} ({total} bytes) has {expected}"
        )
    return Chunk(tid, index, count, total, digest, data)


@dataclass
class _Transfer:
    count: int
    total_size: int
    sha256: bytes
    parts: dict[int, bytes] = field(default_factory=dict)
    held: int = 0
    last_seen: float = 0.0


class Reassembler:
    """Join chunks back into payloads, tolerant of loss, duplication and reordering.

    Parameters
    ----------
    max_transfers
        Transfers held at once; a new one evicts the least recently active.
    max_total_bytes
        Chunk bytes held at once, over all transfers.
    timeout_s
        A transfer with no new chunk for this long is dropped by :meth:`expire`.
    clock
        Monotonic clock (tests pass a fake one).
    """

    def __init__(
        self,
        *,
        max_transfers: int = 16,
        max_total_bytes: int = 256 * 1024 * 1024,
        timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_transfers < 1 or max_total_bytes < 1 or timeout_s <= 0:
            raise ValueError("max_transfers, max_total_bytes and timeout_s must be positive")
        self.max_transfers = max_transfers
        self.max_total_bytes = max_total_bytes
        self.timeout_s = timeout_s
        self._clock = clock
        self._transfers: OrderedDict[tuple[str, str], _Transfer] = OrderedDict()
        self._done: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.dropped: list[Incomplete] = []

    @property
    def pending(self) -> int:
        """Transfers started and not yet complete."""
        return len(self._transfers)

    @property
    def bytes_held(self) -> int:
        return sum(t.held for t in self._transfers.values())

    def add(self, chunk: Chunk, source: str = "") -> bytes | None:
        """Take one chunk; return the whole payload when this chunk completes it.

        Parameters
        ----------
        chunk
            A decoded chunk.
        source
            Where it came from (e.g. the topic without its chunk suffix): transfers from
            different sources never mix, so one sender cannot corrupt another's transfer.

        Returns
        -------
        bytes or None
            The verified payload, once; None while incomplete and for duplicates.

        Raises
        ------
        ProtocolError
            The chunk contradicts its transfer (count, size or checksum), is larger than
            the memory bound, or the joined payload fails its SHA-256; the transfer is
            dropped.
        """
        key = (source, chunk.transfer_id)
        if key in self._done:
            return None
        if chunk.total_size > self.max_total_bytes:
            raise ProtocolError(
                f"chunked transfer of {chunk.total_size} bytes exceeds the reassembly bound "
                f"of {self.max_total_bytes} bytes"
            )
        now = self._clock()
        transfer = self._transfers.get(key)
        if transfer is None:
            self._make_room(extra_transfers=1, extra_bytes=len(chunk.data), now=now)
            transfer = _Transfer(chunk.count, chunk.total_size, chunk.sha256, last_seen=now)
            self._transfers[key] = transfer
        elif (transfer.count, transfer.total_size, transfer.sha256) != (
            chunk.count,
            chunk.total_size,
            chunk.sha256,
        ):
            self._drop(key, "a chunk contradicts its transfer")
            raise ProtocolError(
                f"chunk {chunk.index} of transfer {chunk.transfer_id} contradicts it"
            )
        self._transfers.move_to_end(key)
        transfer.last_seen = now
        if chunk.index in transfer.parts:
            return None
        self._make_room(extra_transfers=0, extra_bytes=len(chunk.data), now=now, keep=key)
        transfer.parts[chunk.index] = chunk.data
        transfer.held += len(chunk.data)
        if len(transfer.parts) < transfer.count:
            return None
        del self._transfers[key]
        self._remember_done(key)
        payload = b"".join(transfer.parts[i] for i in range(transfer.count))
        if (
            len(payload) != transfer.total_size
            or hashlib.sha256(payload).digest() != transfer.sha256
        ):
            raise ProtocolError(f"chunked transfer {chunk.transfer_id} fails its SHA-256 check")
        return payload

    def expire(self) -> list[Incomplete]:
        """Drop transfers idle for longer than ``timeout_s``; return what was dropped."""
        now = self._clock()
        stale = [k for k, t in self._transfers.items() if now - t.last_seen > self.timeout_s]
        return [self._drop(k, f"no chunk for {self.timeout_s:g} s") for k in stale]

    def _make_room(
        self,
        *,
        extra_transfers: int,
        extra_bytes: int,
        now: float,
        keep: tuple[str, str] | None = None,
    ) -> None:
        def over() -> bool:
            return (
                len(self._transfers) + extra_transfers > self.max_transfers
                or self.bytes_held + extra_bytes > self.max_total_bytes
            )

        for key in list(self._transfers):  # oldest activity first
            if not over():
                return
            if key != keep:
                self._drop(key, "evicted to bound reassembly memory")
        if over():
            if keep is not None:
                self._drop(keep, "evicted to bound reassembly memory")
            raise ProtocolError("chunk does not fit in the reassembly memory bound")

    def _drop(self, key: tuple[str, str], reason: str) -> Incomplete:
        transfer = self._transfers.pop(key)
        info = Incomplete(key[0], key[1], len(transfer.parts), transfer.count, reason)
        log.warning(
            "incomplete chunked transfer %s from %r: %d of %d chunks (%s)",
            key[1],
            key[0],
            info.received,
            info.count,
            reason,
        )
        self.dropped.append(info)
        del self.dropped[:-100]  # a record for tests and status lines, not a leak
        return info

    def _remember_done(self, key: tuple[str, str]) -> None:
        self._done[key] = None
        while len(self._done) > 1024:
            self._done.popitem(last=False)
