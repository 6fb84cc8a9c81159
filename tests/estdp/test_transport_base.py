"""Transport interface pieces: broker URLs, settings, and the bounded receive queue."""

from __future__ import annotations

import threading
import time

import pytest

from estdp.errors import ConfigError
from estdp.transport.base import Message, MessageQueue, TransportConfig, parse_broker_url


def test_broker_urls() -> None:
    assert parse_broker_url("mqtt://10.0.0.5") == {"host": "10.0.0.5", "port": 1883, "tls": False}
    assert parse_broker_url("mqtts://user:p%40ss@broker.lan:9883") == {
        "host": "broker.lan",
        "port": 9883,
        "tls": True,
        "username": "user",
        "password": "p@ss",
    }
    for bad in ("http://x", "mqtt://", "mqtt://h:99999", "mqtt://h/path", "h:1883"):
        with pytest.raises(ConfigError):
            parse_broker_url(bad)


def test_config_validation() -> None:
    assert TransportConfig(port=8883, tls=True).url == "mqtts://127.0.0.1:8883"
    with pytest.raises(ConfigError):
        TransportConfig(protocol="4")
    with pytest.raises(ConfigError):
        TransportConfig(cert_file="c.pem")  # no key
    with pytest.raises(ConfigError):
        TransportConfig(reconnect_min_s=5, reconnect_max_s=1)


def msg(i: int, size: int = 10) -> Message:
    return Message(f"t/{i}", bytes(size))


def test_queue_is_fifo_and_bounded_in_messages_dropping_the_oldest() -> None:
    q = MessageQueue(max_messages=3, block_s=0)
    for i in range(5):
        q.put(msg(i))
    assert q.dropped == 2
    assert [q.get(0).topic for _ in range(3)] == ["t/2", "t/3", "t/4"]
    assert q.get(0.01) is None


def test_queue_is_bounded_in_bytes_but_takes_one_huge_message() -> None:
    q = MessageQueue(max_bytes=100, block_s=0)
    q.put(msg(0, 60))
    q.put(msg(1, 60))  # 120 > 100: the first goes
    assert (len(q), q.bytes, q.dropped) == (1, 60, 1)
    q.put(msg(2, 500))  # alone, larger than the bound: still accepted
    assert (len(q), q.bytes) == (1, 500)


def test_a_full_queue_waits_for_the_consumer_before_dropping() -> None:
    q = MessageQueue(max_messages=1, block_s=5.0)
    q.put(msg(0))
    taken: list[Message | None] = []
    consumer = threading.Timer(0.1, lambda: taken.append(q.get(0)))
    consumer.start()
    started = time.monotonic()
    q.put(msg(1))  # blocks until the consumer took msg 0
    consumer.join()
    assert time.monotonic() - started < 4.0
    assert q.dropped == 0 and taken[0].topic == "t/0" and q.get(0).topic == "t/1"
