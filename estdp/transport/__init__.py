"""Transports: the project's interface to a message broker.

:mod:`~estdp.transport.base` defines the interface; :mod:`~estdp.transport.mqtt` is the
MQTT implementation (the only module importing paho-mqtt), :mod:`~estdp.transport.memory`
an in-memory one for unit tests, and :mod:`~estdp.transport.channel` sends and receives
protocol messages over any of them, chunking what is too large for one packet.
"""

from __future__ import annotations

from estdp.transport.base import (
    ConnectStopped,
    Message,
    MessageQueue,
    Transport,
    TransportConfig,
    Will,
    parse_broker_url,
)

__all__ = [
    "ConnectStopped",
    "Message",
    "MessageQueue",
    "Transport",
    "TransportConfig",
    "Will",
    "mqtt_transport",
    "parse_broker_url",
]


def mqtt_transport(config: TransportConfig) -> Transport:
    """A (not yet connected) MQTT transport for ``config``."""
    from estdp.transport.mqtt import MqttTransport  # paho is imported there only

    return MqttTransport(config)
