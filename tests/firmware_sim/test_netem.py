"""The impaired transport wrapper: latency, loss, outages, pass-through."""

from __future__ import annotations

from firmware_sim.netem import ImpairedTransport
from firmware_sim.profiles import NETWORKS, NetworkProfile


class _Inner:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.subscribed: list[str] = []

    def publish(self, topic, payload, qos=1, retain=False):
        self.sent.append((topic, payload))
        return "ok"

    def subscribe(self, topic):
        self.subscribed.append(topic)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_perfect_link_passes_through_without_delay():
    inner, clock = _Inner(), _Clock()
    t = ImpairedTransport(inner, NETWORKS["lan"], clock=clock, sleep=clock.sleep)
    assert t.publish("a", b"x", qos=1, retain=True) == "ok"
    t.subscribe("b")
    assert inner.sent == [("a", b"x")] and inner.subscribed == ["b"]
    assert clock.slept == []


def test_latency_is_applied_to_each_publish():
    inner, clock = _Inner(), _Clock()
    prof = NetworkProfile("x", latency_ms=100)
    t = ImpairedTransport(inner, prof, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        t.publish("a", b"x")
    assert clock.slept == [0.1, 0.1, 0.1]
    assert len(inner.sent) == 3


def test_loss_drops_about_the_given_share():
    inner, clock = _Inner(), _Clock()
    t = ImpairedTransport(
        inner, NetworkProfile("x", loss=0.3), seed=5, clock=clock, sleep=clock.sleep
    )
    for _ in range(2000):
        t.publish("a", b"x")
    assert t.dropped + t.published == 2000
    assert 500 < t.dropped < 700
    assert len(inner.sent) == t.published


def test_publish_during_an_outage_waits_for_the_link():
    inner, clock = _Inner(), _Clock()
    prof = NetworkProfile("x", disconnect_every_s=10.0, disconnect_for_s=4.0)
    t = ImpairedTransport(inner, prof, seed=0, clock=clock, sleep=clock.sleep)
    start, end = t._outages[0]
    clock.now = start + 1.0
    t.publish("a", b"x")
    assert clock.slept == [end - start - 1.0]
    assert clock.now == end
    assert inner.sent == [("a", b"x")]
