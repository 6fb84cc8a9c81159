"""An in-memory broker and transport, for unit tests only.

:class:`MemoryBroker` keeps retained messages, matches ``+``/``#`` filters, publishes a
client's will when the client is :meth:`~MemoryTransport.abort`-ed, and can be taken
:meth:`~MemoryBroker.down` and back :meth:`~MemoryBroker.up` to exercise reconnects.
Delivery is synchronous, into each subscriber's bounded queue. Integration tests use a
real broker (see :mod:`estdp.broker`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from estdp.errors import TransportError
from estdp.topics import topic_matches
from estdp.transport.base import ConnectStopped, Transport, TransportConfig, ensure_qos


class MemoryBroker:
    """A process-local publish/subscribe hub with retained messages and wills.

    Parameters
    ----------
    max_payload_bytes
        Refuse larger publishes, as a broker's ``max_packet_size`` would.
    acl
        Optional ``acl(client_id, topic) -> bool`` deciding who may publish where.
    """

    def __init__(
        self,
        max_payload_bytes: int | None = None,
        acl: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.acl = acl
        self.retained: dict[str, tuple[bytes, int]] = {}
        self._clients: list[MemoryTransport] = []
        self._known: list[MemoryTransport] = []  # to reconnect after up()
        self._lock = threading.RLock()
        self._up = True
        self.published = 0

    @property
    def is_up(self) -> bool:
        return self._up

    def attach(self, transport: MemoryTransport) -> None:
        with self._lock:
            if not self._up:
                raise TransportError("memory broker is down")
            if transport not in self._clients:
                self._clients.append(transport)
            if transport not in self._known:
                self._known.append(transport)

    def detach(self, transport: MemoryTransport, *, publish_will: bool) -> None:
        with self._lock:
            if transport in self._clients:
                self._clients.remove(transport)
            if transport in self._known:
                self._known.remove(transport)
        will = transport.config.will
        if publish_will and will is not None:
            self.publish(will.topic, will.payload, will.qos, will.retain, sender=None)

    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, sender: MemoryTransport | None
    ) -> None:
        with self._lock:
            if not self._up:
                raise TransportError("memory broker is down")
            if self.max_payload_bytes is not None and len(payload) > self.max_payload_bytes:
                raise TransportError(f"payload of {len(payload)} bytes exceeds the broker limit")
            if (
                sender is not None
                and self.acl is not None
                and not self.acl(sender.config.client_id, topic)
            ):
                raise TransportError(f"not authorised to publish to {topic!r}")
            self.published += 1
            if retain:
                if payload:
                    self.retained[topic] = (bytes(payload), qos)
                else:  # MQTT: an empty retained message clears the topic
                    self.retained.pop(topic, None)
            targets = list(self._clients)
        for client in targets:
            client._offer(topic, payload, qos, retain=False)

    def retained_for(self, topic_filter: str) -> list[tuple[str, bytes, int]]:
        with self._lock:
            return [
                (t, p, q) for t, (p, q) in self.retained.items() if topic_matches(topic_filter, t)
            ]

    def down(self) -> None:
        """Stop, dropping every client connection (as a broker restart would) and, like a
        broker without persistence, every retained message."""
        with self._lock:
            self._up = False
            clients, self._clients = self._clients, []
            self.retained.clear()
        for client in clients:
            client._lost()

    def up(self) -> None:
        """Start again; clients that were connected reconnect."""
        with self._lock:
            self._up = True
            waiting = [c for c in self._known if c.wants_connection]
        for client in waiting:
            client._reconnect()


class MemoryTransport(Transport):
    """A :class:`~estdp.transport.base.Transport` attached to a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, config: TransportConfig | None = None) -> None:
        super().__init__(config or TransportConfig())
        self.broker = broker
        self._connected = False
        self.wants_connection = False

    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self, timeout: float = 10.0, stop: threading.Event | None = None) -> None:
        if stop is not None and stop.is_set():
            raise ConnectStopped("stopped before connecting to the in-memory broker")
        self.wants_connection = True
        self._reconnect(raise_errors=True)

    def _reconnect(self, raise_errors: bool = False) -> None:
        try:
            self.broker.attach(self)
        except TransportError:
            if raise_errors:
                raise
            return
        self._connected = True
        self.connects += 1
        for topic_filter, qos in self.subscriptions.items():
            self._send_subscribe([(topic_filter, qos)])

    def _lost(self) -> None:
        self._connected = False

    def close(self) -> None:
        self.wants_connection = False
        self._connected = False
        self.broker.detach(self, publish_will=False)

    def abort(self) -> None:
        """Vanish without a goodbye: the broker publishes the will."""
        self.wants_connection = False
        if self._connected:
            self._connected = False
            self.broker.detach(self, publish_will=True)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> None:
        ensure_qos(qos)
        self.check_size(topic, payload)
        if not self._connected:
            raise TransportError("memory transport is not connected")
        self.broker.publish(topic, bytes(payload), qos, retain, sender=self)

    def _send_subscribe(self, filters: list[tuple[str, int]]) -> None:
        for topic_filter, _ in filters:
            for topic, payload, qos in self.broker.retained_for(topic_filter):
                self._deliver(topic, payload, qos, True)

    def _send_unsubscribe(self, topic_filter: str) -> None:
        pass

    def _offer(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if not self._connected:
            return
        for topic_filter in self.subscriptions:
            if topic_matches(topic_filter, topic):
                self._deliver(topic, payload, qos, retain)
                return
