"""A node's link, impaired: a transport wrapper that applies a :class:`NetworkProfile`.

It wraps any object with a ``publish(topic, payload, ...)`` method (the project's
transport interface) and forwards every other attribute unchanged. Around each publish:

1. during an outage window (see :func:`firmware_sim.profiles.outages`) the publish waits
   for the link to come back, as a client with a persistent session would;
2. it is held for latency +- jitter;
3. with probability ``loss`` it is dropped: the call returns as if it had been sent and
   the broker never sees it (a QoS 1 message lost with its session).

Delays run in the publishing thread (the node's work loop), never in the MQTT client's
network thread, so keep-alive is unaffected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from firmware_sim.profiles import NetworkProfile, drops, outages, publish_delay

log = logging.getLogger(__name__)

OUTAGE_HORIZON_S = 24 * 3600.0


class ImpairedTransport:
    """Forwards to ``inner``, applying ``profile`` to each publish."""

    def __init__(
        self,
        inner: Any,
        profile: NetworkProfile,
        *,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._inner = inner
        self.profile = profile
        self._rng = np.random.default_rng(seed)
        self._clock = clock
        self._sleep = sleep
        self._t0 = clock()
        self._outages = outages(profile, self._rng, OUTAGE_HORIZON_S)
        self.dropped = 0
        self.published = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _wait_for_link(self) -> None:
        now = self._clock() - self._t0
        for start, end in self._outages:
            if start <= now < end:
                log.info("link down (%s) for %.1f s more", self.profile.name, end - now)
                self._sleep(end - now)
                return
            if start > now:
                return

    def publish(self, topic: str, payload: Any, *args: Any, **kwargs: Any) -> Any:
        """Publish through the impaired link (may wait, may silently drop)."""
        if self.profile.is_perfect:
            self.published += 1
            return self._inner.publish(topic, payload, *args, **kwargs)
        self._wait_for_link()
        delay = publish_delay(self.profile, self._rng)
        if delay:
            self._sleep(delay)
        if drops(self.profile, self._rng):
            self.dropped += 1
            log.warning("network profile %s dropped a publish on %s", self.profile.name, topic)
            return None
        self.published += 1
        return self._inner.publish(topic, payload, *args, **kwargs)
