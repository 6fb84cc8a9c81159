"""Protocol messages over a transport: encode, chunk when too large, reassemble, decode.

A message whose payload fits ``max_packet_bytes`` goes whole to its topic; a larger one
is split (:mod:`estdp.chunking`) into chunks published to ``<topic>/chunk/<i>`` with the
same QoS and retain flag. Retained chunked messages stay retained chunk by chunk, so a
late subscriber to ``<topic>/#`` still reassembles them. When a retained topic switches
between whole and chunked forms (or shrinks), the stale retained form is cleared with an
empty retained message; receivers ignore empty payloads.

:meth:`Channel.poll` is a service's receive step: one message from the queue, reassembled
and decoded; a payload that fails (malformed, oversized, damaged) is logged, counted in
:attr:`Channel.rejected`, and skipped, so one bad sender cannot stop a service.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from estdp import protocol
from estdp.chunking import Reassembler, chunk_bytes_for, decode_chunk, encode_chunk, split
from estdp.errors import ProtocolError
from estdp.protocol import DEFAULT_LIMITS, Limits
from estdp.topics import chunk_topic, split_chunk_topic
from estdp.transport.base import Transport

log = logging.getLogger(__name__)

# Under EMQX's default 1 MB packet limit with room for the topic and the MQTT header.
DEFAULT_MAX_PACKET_BYTES = 1_000_000


@dataclass(frozen=True)
class Received:
    """A decoded message and where it came from."""

    topic: str  # without the chunk suffix
    message: protocol.Message
    payload: bytes  # the whole (reassembled) payload, as it arrived
    retained: bool

    @property
    def size(self) -> int:
        return len(self.payload)


class Channel:
    """Send and receive protocol messages over ``transport``.

    Parameters
    ----------
    transport
        A connected (or about to connect) transport.
    max_packet_bytes
        Largest packet to publish; larger payloads are chunked.
    limits
        Decoding bounds; also caps a reassembled payload.
    reassembler
        Chunk reassembly state (default: bounded by ``limits.max_message_bytes``).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
        limits: Limits = DEFAULT_LIMITS,
        reassembler: Reassembler | None = None,
    ) -> None:
        self.transport = transport
        self.max_packet_bytes = max_packet_bytes
        self.limits = limits
        self.reassembler = reassembler or Reassembler(
            max_total_bytes=max(limits.max_message_bytes * 4, 1), timeout_s=120.0
        )
        self.rejected = 0
        self.last_rejection = ""
        self._retained_chunks: dict[str, int] = {}  # topic -> chunks last retained there

    # ---- sending ------------------------------------------------------------------------

    def send(
        self,
        topic: str,
        message: protocol.Message | bytes,
        *,
        retain: bool = False,
        qos: int = 1,
        wait: bool = True,
        timeout: float = 30.0,
        weight_encoding: str = "float32",
    ) -> int:
        """Publish ``message`` (or already encoded bytes) to ``topic``, chunked if needed.

        Returns
        -------
        int
            Packets published (1 when sent whole).

        Raises
        ------
        TransportError
            A publish failed or, with ``wait``, was not acknowledged within ``timeout``.
        """
        payload = (
            message
            if isinstance(message, (bytes, bytearray))
            else protocol.encode(message, weight_encoding=weight_encoding)
        )
        limit = self.packet_limit(topic)
        if len(payload) <= limit:
            self.transport.publish(
                topic, bytes(payload), qos=qos, retain=retain, wait=wait, timeout=timeout
            )
            if retain:
                self._clear_chunks(topic, keep=0)
            return 1
        chunks = split(bytes(payload), chunk_bytes_for(limit, len(topic) + 16))
        for chunk in chunks:
            self.transport.publish(
                chunk_topic(topic, chunk.index),
                encode_chunk(chunk),
                qos=qos,
                retain=retain,
                wait=wait,
                timeout=timeout,
            )
        if retain:
            # The whole form of an earlier message would otherwise stay retained beside
            # the new chunks, and so would chunks beyond this transfer's count.
            self.transport.publish(topic, b"", qos=qos, retain=True, wait=wait, timeout=timeout)
            self._clear_chunks(topic, keep=len(chunks))
            self._retained_chunks[topic] = len(chunks)
        log.debug("sent %d bytes to %s in %d chunks", len(payload), topic, len(chunks))
        return len(chunks)

    def packet_limit(self, topic: str) -> int:
        """Largest payload sent whole to ``topic``: ours, or the broker's if lower."""
        broker = self.transport.max_packet_bytes
        if broker is None:
            return self.max_packet_bytes
        return min(self.max_packet_bytes, broker - len(topic.encode()) - 16)

    def _clear_chunks(self, topic: str, keep: int) -> None:
        previous = self._retained_chunks.pop(topic, 0)
        for index in range(keep, previous):
            self.transport.publish(chunk_topic(topic, index), b"", qos=1, retain=True)

    # ---- receiving ----------------------------------------------------------------------

    def poll(self, timeout: float | None = 0.1) -> Received | None:
        """The next complete, valid message, or None (nothing came, a chunk of an
        unfinished transfer came, or a payload was rejected)."""
        raw = self.transport.get(timeout)
        for incomplete in self.reassembler.expire():
            self._reject(incomplete.source, f"incomplete chunked transfer ({incomplete.reason})", 0)
        if raw is None or not raw.payload:
            return None
        try:
            base, index = split_chunk_topic(raw.topic)
            if index is None:
                payload = raw.payload
            else:
                chunk = decode_chunk(raw.payload, self.limits)
                if chunk.index != index:
                    raise ProtocolError(
                        f"chunk {chunk.index} published on the topic of chunk {index}"
                    )
                whole = self.reassembler.add(chunk, source=base)
                if whole is None:
                    return None
                payload = whole
            message = protocol.decode(payload, self.limits)
        except ProtocolError as exc:
            self._reject(raw.topic, str(exc), len(raw.payload))
            return None
        return Received(base, message, bytes(payload), raw.retain)

    def poll_batch(self, timeout: float | None = 0.1, max_messages: int = 256) -> list[Received]:
        """Every complete message queued now (waiting up to ``timeout`` for the first),
        at most ``max_messages``, so a flood cannot starve the caller's other duties."""
        out: list[Received] = []
        received = self.poll(timeout)
        while True:
            if received is not None:
                out.append(received)
            if len(out) >= max_messages or not len(self.transport.queue):
                return out
            received = self.poll(0)

    def _reject(self, topic: str, why: str, size: int) -> None:
        self.rejected += 1
        self.last_rejection = f"{topic}: {why}"
        log.warning("rejected a payload on %s (%d bytes): %s", topic, size, why)
