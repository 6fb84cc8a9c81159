"""The MQTT transport: the one module that imports paho-mqtt.

paho-mqtt 2.x with callback API version 2. MQTT 5 where the broker offers it, else 3.1.1
(``protocol="auto"``: a broker that answers an MQTT 5 CONNECT with "unsupported protocol
version", such as the embedded amqtt broker, is asked again in 3.1.1). Clean sessions:
subscriptions are renewed in ``on_connect`` after every (re)connect, and paho reconnects
in its network thread with exponential back-off (``reconnect_delay_set``). Messages go
from paho's thread into the bounded queue of :class:`~estdp.transport.base.Transport`;
nothing else runs there. paho's and the socket layer's errors leave this module as
:class:`~estdp.errors.TransportError` (``raise ... from exc``).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import OrderedDict
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from estdp.errors import TransportError
from estdp.transport.base import (
    ConnectStopped,
    Transport,
    TransportConfig,
    ensure_qos,
    sleep_unless_stopped,
)

log = logging.getLogger(__name__)

_UNSUPPORTED_VERSION = (132, 1)  # MQTT 5 reason code, MQTT 3.1.1 CONNACK return code
_CLOSED = -1  # our code: the connection closed before any CONNACK
_NAMES = {paho.MQTTv5: "MQTT 5", paho.MQTTv311: "MQTT 3.1.1"}


class _Refused(Exception):
    """The broker answered CONNECT with a failure code."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


def _code(reason: Any) -> tuple[int, str]:
    if isinstance(reason, ReasonCode):
        return int(reason.value), str(reason)
    return int(reason), paho.connack_string(int(reason))


class MqttTransport(Transport):
    """A :class:`~estdp.transport.base.Transport` over paho-mqtt."""

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        self._client: paho.Client | None = None
        self._protocol: int | None = None
        self._connected = threading.Event()
        self._connack = threading.Event()
        self._gone = threading.Event()  # the connection closed (set by on_disconnect)
        self._connack_code: tuple[int, str] = (0, "")
        self._last_disconnect = ""
        self._ack_cond = threading.Condition()
        self._acks: OrderedDict[int, tuple[float, int, str]] = OrderedDict()
        self._closing = False
        self._probing = False
        self._announced_max_packet: int | None = None
        self._stop: threading.Event | None = None  # connect()'s stop request

    # ---- connection ---------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    @property
    def max_packet_bytes(self) -> int | None:
        announced, configured = self._announced_max_packet, self.config.max_packet_bytes
        if announced is None or configured is None:
            return announced if configured is None else configured
        return min(announced, configured)

    @property
    def protocol_name(self) -> str:
        return _NAMES.get(self._protocol or 0, "not connected")

    def connect(self, timeout: float = 10.0, stop: threading.Event | None = None) -> None:
        """Connect within ``timeout`` seconds, retrying with back-off while the broker is
        unreachable; then paho keeps the connection up in its thread.

        ``stop`` (set by a SIGTERM handler, say) ends the attempts within ~0.1 s.

        Raises
        ------
        ConnectStopped
            ``stop`` was set first.
        TransportError
            No connection in time, a TLS failure, or the broker refused the login.
        """
        self._closing = False
        self._probing = False
        self._stop = stop
        deadline = time.monotonic() + timeout
        versions = {"5": [paho.MQTTv5], "3.1.1": [paho.MQTTv311]}.get(
            self.config.protocol, [paho.MQTTv5, paho.MQTTv311]
        )
        delay = self.config.reconnect_min_s
        last: Exception | None = None
        while True:
            self._check_stop()
            try:
                if len(versions) > 1 and self.config.will is not None:
                    versions = [self._probe_version(deadline)]
                self._connect_once(versions[0], deadline)
                return
            except _Refused as refused:
                if refused.code in (*_UNSUPPORTED_VERSION, _CLOSED) and len(versions) > 1:
                    log.info(
                        "broker %s does not speak %s; trying %s",
                        self.config.url,
                        _NAMES[versions[0]],
                        _NAMES[versions[1]],
                    )
                    versions = versions[1:]
                    continue
                raise TransportError(
                    f"broker {self.config.url} refused the connection: {refused}"
                ) from None
            except ConnectStopped:
                raise
            except (OSError, ssl.SSLError, TransportError) as exc:
                last = exc
            # A certificate the other side refuses will not get better by retrying.
            fatal = isinstance(last, ssl.SSLError) or isinstance(last.__cause__, ssl.SSLError)
            if fatal or time.monotonic() + delay >= deadline:
                raise TransportError(f"cannot connect to {self.config.url}: {last}") from last
            log.info(
                "cannot connect to %s yet (%s); retrying in %.1f s", self.config.url, last, delay
            )
            # A stop request must not wait out the back-off (nor the whole --connect-timeout).
            sleep_unless_stopped(delay, stop)
            delay = min(delay * 2, self.config.reconnect_max_s)

    def _check_stop(self) -> None:
        if self._stop is not None and self._stop.is_set():
            raise ConnectStopped(f"stopped before connecting to {self.config.url}")

    def _probe_version(self, deadline: float) -> int:
        # amqtt (3.1.1 only) answers an MQTT 5 CONNECT with "unsupported protocol version"
        # unless it carries a will, which it cannot parse and then never answers: ask
        # without the will first, then connect for real in the version that worked.
        self._probing = True
        try:
            self._connect_once(paho.MQTTv5, deadline, with_will=False)
        except _Refused as refused:
            if refused.code in _UNSUPPORTED_VERSION:
                log.info("broker %s does not speak MQTT 5; using MQTT 3.1.1", self.config.url)
                return paho.MQTTv311
            raise
        finally:
            self._probing = False
        if self._client is not None:
            self._discard(self._client)
        return paho.MQTTv5

    def _build(self, protocol: int, with_will: bool = True) -> paho.Client:
        cfg = self.config
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=protocol,
            clean_session=True if protocol != paho.MQTTv5 else None,
        )
        if cfg.tls:
            try:
                client.tls_set(
                    ca_certs=cfg.ca_file,
                    certfile=cfg.cert_file,
                    keyfile=cfg.key_file,
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ValueError, ssl.SSLError) as exc:
                raise TransportError(f"TLS set-up failed: {exc}") from exc
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.will is not None and with_will:
            client.will_set(
                cfg.will.topic, cfg.will.payload, ensure_qos(cfg.will.qos), cfg.will.retain
            )
        client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)  # type: ignore[arg-type]
        # paho's own queue of outgoing QoS 1 messages: unbounded, so a publish made while
        # the broker is away is kept and sent after the reconnect.
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    def _connect_once(self, protocol: int, deadline: float, with_will: bool = True) -> None:
        client = self._build(protocol, with_will)
        self._connack.clear()
        self._gone.clear()
        self._protocol = protocol
        self._client = client
        try:
            if protocol == paho.MQTTv5:
                client.connect(
                    self.config.host, self.config.port, self.config.keepalive_s, clean_start=True
                )
            else:
                client.connect(self.config.host, self.config.port, self.config.keepalive_s)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._client = None
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        client.loop_start()
        while not self._connack.wait(0.02):
            if self._stop is not None and self._stop.is_set():
                self._discard(client)
                self._check_stop()
            if self._gone.is_set():
                # Accepted, then closed before CONNACK: the broker (or its TLS layer)
                # refused this client, e.g. no or a bad client certificate, or a
                # 3.1.1-only broker hanging up on MQTT 5 (connect() then tries 3.1.1).
                self._discard(client)
                raise _Refused(_CLOSED, "the broker closed the connection before CONNACK")
            if time.monotonic() >= deadline:
                self._discard(client)
                raise TransportError(self._last_disconnect or "no CONNACK from the broker")
        code, text = self._connack_code
        if code != 0:
            self._discard(client)
            raise _Refused(code, text)

    def _discard(self, client: paho.Client) -> None:
        self._closing = True
        try:
            client.disconnect()
        finally:
            client.loop_stop()
            self._client = None
            self._closing = False
            self._connected.clear()

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        self._closing = True
        try:
            client.disconnect()
        except Exception as exc:  # closing must not fail; the socket may already be gone
            log.debug("disconnect: %s", exc)
        client.loop_stop()
        self._connected.clear()

    # ---- paho callbacks (network thread: record and return) --------------------------------

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        code, text = _code(reason)
        self._connack_code = (code, text)
        if code == 0 and self._probing:
            pass
        elif code == 0:
            # MQTT 5 brokers announce their packet limit in CONNACK (Maximum Packet Size).
            self._announced_max_packet = getattr(properties, "MaximumPacketSize", None)
            self.connects += 1
            self._connected.set()
            filters = list(self.subscriptions.items())
            if filters:
                client.subscribe(filters)
            log.info(
                "%r connected to %s (%s)%s",
                self.config.client_id,
                self.config.url,
                _NAMES.get(self._protocol or 0, "?"),
                f"; renewed {len(filters)} subscription(s)"
                if self.connects > 1 and filters
                else "",
            )
        elif code in _UNSUPPORTED_VERSION and self.config.protocol == "auto":
            log.debug("broker %s refused %s", self.config.url, _NAMES.get(self._protocol or 0, "?"))
        else:
            log.error(
                "broker %s refused the connection of %r: %s",
                self.config.url,
                self.config.client_id,
                text,
            )
        self._connack.set()

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._gone.set()
        _, text = _code(reason)
        self._last_disconnect = f"disconnected: {text}"
        if was and not self._closing:
            log.warning(
                "%r lost the connection to %s (%s); reconnecting with back-off",
                self.config.client_id,
                self.config.url,
                text,
            )

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            log.warning("dropped a message whose topic is not UTF-8")
            return
        self._deliver(topic, message.payload, message.qos, bool(message.retain))

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        code, text = _code(reason) if reason is not None else (0, "")
        with self._ack_cond:
            self._acks[mid] = (time.monotonic(), code, text)
            while len(self._acks) > 4096:
                self._acks.popitem(last=False)
            self._ack_cond.notify_all()

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        for reason in reasons or ():
            code, text = _code(reason)
            if code >= 0x80:
                log.error("the broker refused a subscription: %s", text)

    # ---- publish / subscribe ------------------------------------------------------------

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
        client = self._client
        if client is None:
            raise TransportError(
                "publish on a transport that is not connected (call connect first)"
            )
        self.check_size(topic, payload)
        started = time.monotonic()
        try:
            info = client.publish(topic, payload, ensure_qos(qos), retain)
        except (ValueError, TypeError) as exc:
            raise TransportError(f"cannot publish to {topic!r}: {exc}") from exc
        queued = info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not queued:
            raise TransportError(f"cannot publish to {topic!r}: {paho.error_string(info.rc)}")
        if wait and qos > 0:
            self._wait_ack(info.mid, started, topic, timeout)

    def _wait_ack(self, mid: int, since: float, topic: str, timeout: float) -> None:
        def acked() -> bool:
            entry = self._acks.get(mid)
            return entry is not None and entry[0] >= since

        with self._ack_cond:
            if not self._ack_cond.wait_for(acked, timeout=timeout):
                raise TransportError(
                    f"no acknowledgement for a message to {topic!r} within {timeout:g} s"
                )
            _, code, text = self._acks.pop(mid)
        if code >= 0x80:
            raise TransportError(f"the broker refused a message to {topic!r}: {text}")

    def _send_subscribe(self, filters: list[tuple[str, int]]) -> None:
        client = self._client
        if client is not None:
            client.subscribe(filters)

    def _send_unsubscribe(self, topic_filter: str) -> None:
        client = self._client
        if client is not None:
            client.unsubscribe(topic_filter)

    def abort(self) -> None:
        """Drop the connection without a DISCONNECT, as a crash would (the broker then
        publishes the will). For fault-injection tests and simulations."""
        client, self._client = self._client, None
        if client is None:
            return
        self._closing = True
        client.loop_stop()
        sock = client.socket()
        if sock is not None:
            sock.close()
        self._connected.clear()
