"""The project's transport interface: messages, connection settings and a bounded queue.

Only :mod:`estdp.transport.mqtt` knows paho-mqtt; services see :class:`Transport`,
:class:`Message`, :class:`TransportConfig` and :class:`~estdp.errors.TransportError`.

Incoming messages are handed from the network thread to a :class:`MessageQueue`, bounded
in messages and bytes, which the service drains from its own thread, so that a slow
handler (a merge, a training pass) never stalls MQTT keep-alive. When the queue is full
the network thread waits up to ``block_s`` (a short backpressure: QoS 1 acknowledgements
wait with it) with a logged warning, then drops the *oldest* message with a logged error:
keep-alive must survive a stalled consumer, and the newest messages are the ones a
service needs (retained round and global topics are re-delivered on every reconnect,
and nodes re-send a pending update after a reconnect).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import unquote, urlsplit

from estdp.errors import ConfigError, TransportError

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
PROTOCOLS = ("auto", "5", "3.1.1")


class ConnectStopped(TransportError):
    """A stop was requested (e.g. SIGTERM) while the first connection was being tried."""


def sleep_unless_stopped(seconds: float, stop: threading.Event | None) -> bool:
    """Sleep up to ``seconds``; return True as soon as ``stop`` is set.

    Polls ``stop.is_set()`` in short slices instead of ``stop.wait()``: a signal handler
    that sets the event while this (main) thread holds the event's lock inside ``wait``
    would deadlock, and ``is_set`` takes no lock.
    """
    end = time.monotonic() + seconds
    while True:
        if stop is not None and stop.is_set():
            return True
        left = end - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(left, 0.05))


@dataclass(frozen=True)
class Message:
    """One received (or to-be-sent) MQTT message."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    received_unix: float = 0.0


@dataclass(frozen=True)
class Will:
    """The last will the broker publishes when the client vanishes without a goodbye."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class TransportConfig:
    """How to reach and log in to the broker.

    Parameters
    ----------
    host, port
        Broker address.
    client_id
        MQTT client id (a node uses its node id).
    tls
        Use TLS; with ``ca_file`` the server certificate is verified against that CA,
        otherwise against the system store.
    ca_file, cert_file, key_file
        CA bundle, and client certificate and key for mutual TLS.
    username, password
        Credentials, if the broker asks for them.
    will
        Last will.
    keepalive_s
        MQTT keep-alive interval.
    protocol
        ``"5"``, ``"3.1.1"``, or ``"auto"``: MQTT 5 where the broker offers it, else 3.1.1.
    reconnect_min_s, reconnect_max_s
        Back-off between reconnect attempts (doubling from min to max).
    queue_max_messages, queue_max_bytes, queue_block_s
        Bounds of the receive queue (see :class:`MessageQueue`).
    max_packet_bytes
        The broker's packet-size limit when it does not announce one (MQTT 3.1.1); a
        larger publish is refused here instead of getting the client disconnected (and
        the message re-sent, and refused, after every reconnect).
    """

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    will: Will | None = None
    keepalive_s: int = 30
    protocol: str = "auto"
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 10.0
    queue_max_messages: int = 10_000
    queue_max_bytes: int = 512 * 1024 * 1024
    queue_block_s: float = 2.0
    max_packet_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"MQTT protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if not 0 < self.port < 65536:
            raise ConfigError(f"broker port must be in 1-65535, got {self.port}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("a client certificate needs both --cert and --key")
        if self.reconnect_min_s <= 0 or self.reconnect_max_s < self.reconnect_min_s:
            raise ConfigError("reconnect delays must satisfy 0 < min <= max")

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> dict[str, object]:
    """Fields of :class:`TransportConfig` from ``mqtt[s]://[user[:password]@]host[:port]``.

    Raises
    ------
    ConfigError
        Another scheme, no host, a bad port, or a path.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad broker URL {url!r}: {exc}") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise ConfigError(f"bad broker URL {url!r}: the scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ConfigError(f"bad broker URL {url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"bad broker URL {url!r}: unexpected path or query")
    fields: dict[str, object] = {
        "host": parts.hostname,
        "port": port or DEFAULT_PORTS[parts.scheme],
        "tls": parts.scheme == "mqtts",
    }
    if parts.username:
        fields["username"] = unquote(parts.username)
    if parts.password:
        fields["password"] = unquote(parts.password)
    return fields


class MessageQueue:
    """A thread-safe FIFO bounded in messages and bytes (see the module docstring).

    Parameters
    ----------
    max_messages, max_bytes
        Bounds; a single message larger than ``max_bytes`` is still accepted alone.
    block_s
        How long :meth:`put` waits for room before dropping the oldest message.
    """

    def __init__(
        self, max_messages: int = 10_000, max_bytes: int = 512 * 1024 * 1024, block_s: float = 2.0
    ) -> None:
        if max_messages < 1 or max_bytes < 1 or block_s < 0:
            raise ValueError("queue bounds must be positive")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.block_s = block_s
        self._items: deque[Message] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self.dropped = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def bytes(self) -> int:
        with self._cond:
            return self._bytes

    def _full(self, extra: int) -> bool:
        if not self._items:
            return False
        return len(self._items) >= self.max_messages or self._bytes + extra > self.max_bytes

    def put(self, message: Message) -> None:
        """Append ``message``, waiting up to ``block_s`` for room, then dropping the oldest."""
        size = len(message.payload)
        with self._cond:
            if self._full(size) and self.block_s > 0:
                log.warning(
                    "receive queue full (%d messages, %d bytes): waiting up to %.1f s for the consumer",
                    len(self._items),
                    self._bytes,
                    self.block_s,
                )
                self._cond.wait_for(lambda: not self._full(size), timeout=self.block_s)
            while self._full(size):
                old = self._items.popleft()
                self._bytes -= len(old.payload)
                self.dropped += 1
                log.error(
                    "receive queue full: dropped the oldest message (%s, %d bytes; %d dropped so far)",
                    old.topic,
                    len(old.payload),
                    self.dropped,
                )
            self._items.append(message)
            self._bytes += size
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> Message | None:
        """The oldest message, waiting up to ``timeout`` seconds; None when none came."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._items), timeout=timeout):
                return None
            message = self._items.popleft()
            self._bytes -= len(message.payload)
            self._cond.notify_all()
            return message

    def clear(self) -> None:
        with self._cond:
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()


class Transport(ABC):
    """A publish/subscribe connection to one broker.

    Subscriptions are remembered and renewed after every reconnect; received messages
    wait in a bounded :class:`MessageQueue` until :meth:`get` takes them.
    """

    def __init__(self, config: TransportConfig) -> None:
        self.config = config
        self.queue = MessageQueue(
            config.queue_max_messages, config.queue_max_bytes, config.queue_block_s
        )
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self.connects = 0  # successful connections so far (a reconnect makes it > 1)

    @abstractmethod
    def connect(self, timeout: float = 10.0, stop: threading.Event | None = None) -> None:
        """Connect (and keep reconnecting in the background until :meth:`close`).

        Parameters
        ----------
        timeout
            Seconds to keep trying the first connection.
        stop
            When set (e.g. by a SIGTERM handler), the attempts end within ~0.1 s.

        Raises
        ------
        ConnectStopped
            ``stop`` was set before a connection was made.
        TransportError
            No connection within ``timeout``, or the broker refused the credentials.
        """

    @abstractmethod
    def close(self) -> None:
        """Disconnect cleanly (the broker does not publish the will); idempotent."""

    @abstractmethod
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
        """Publish one message.

        Parameters
        ----------
        wait
            Block until the broker acknowledged it (PUBACK for QoS 1). A QoS 1 message
            published while disconnected is sent after the reconnect.

        Raises
        ------
        TransportError
            The client refused it, or ``wait`` and no acknowledgement within ``timeout``.
        """

    @property
    @abstractmethod
    def is_connected(self) -> bool:
        """True while a broker connection is up."""

    @property
    def max_packet_bytes(self) -> int | None:
        """The largest packet the broker accepts, when known (announced or configured)."""
        return self.config.max_packet_bytes

    def check_size(self, topic: str, payload: bytes) -> None:
        """Raise :class:`TransportError` when the packet would exceed the broker limit."""
        limit = self.max_packet_bytes
        # Fixed header (up to 5 bytes), topic length prefix, packet id, v5 properties.
        size = len(payload) + len(topic.encode()) + 16
        if limit is not None and size > limit:
            raise TransportError(
                f"a message of {len(payload)} bytes to {topic!r} exceeds the broker's "
                f"packet limit of {limit} bytes (send it in chunks)"
            )

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now (when connected) and after every reconnect."""
        with self._lock:
            self._subscriptions[topic_filter] = qos
        if self.is_connected:
            self._send_subscribe([(topic_filter, qos)])

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
        if self.is_connected:
            self._send_unsubscribe(topic_filter)

    @property
    def subscriptions(self) -> dict[str, int]:
        with self._lock:
            return dict(self._subscriptions)

    @abstractmethod
    def _send_subscribe(self, filters: list[tuple[str, int]]) -> None: ...

    @abstractmethod
    def _send_unsubscribe(self, topic_filter: str) -> None: ...

    def get(self, timeout: float | None = None) -> Message | None:
        """The next received message, or None after ``timeout`` seconds."""
        return self.queue.get(timeout)

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected; False after ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while not self.is_connected:
            if time.monotonic() >= end:
                return False
            time.sleep(0.02)
        return True

    def _deliver(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        # Called on the network thread: enqueue and return, nothing heavier.
        self.queue.put(Message(topic, bytes(payload), qos, retain, time.time()))

    def __enter__(self) -> Transport:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def ensure_qos(qos: int) -> int:
    if qos not in (0, 1, 2):
        raise TransportError(f"QoS must be 0, 1 or 2, got {qos}")
    return qos
