"""Device and network profiles of simulated boards.

Device profiles
---------------
A simulated board runs the real node code on the host's CPU, then *paces* itself: after
each chunk of training that took ``c`` seconds of compute, it sleeps

    delay = c * (1 / speed - 1)

so that its wall time per image is ``c / speed``: ``speed`` is the board's compute speed
relative to the host (1.0 = as fast as one host core; 0.25 = four times slower). The
speeds of the Jetson presets are relative to the AGX Orin, scaled by the boards' FP32
GPU throughput (AGX Orin 64 GB ~5.3 TFLOPS, Orin NX 16 GB ~1.9, Orin Nano 8 GB ~1.3,
Jetson Nano ~0.24), so a fleet mixing them has the same stragglers as the real one; the
AGX Orin profile runs at host speed. ``c`` is measured as the node thread's CPU time, so
contention on a shared host does not count as the board being slow.

``memory_mb`` is what the board leaves to one training process (total RAM, shared with
the GPU on Jetson, minus what JetPack and the desktop take). :func:`check_fits` compares
it with an estimate of the training process's footprint before a node is started:

    bytes = base + 4 * n_input * n_neurons * 3 + n_images * n_input + 4 * batch * n_neurons * 4

(interpreter and libraries; weights, a working copy and the traces; the 8-bit image shard;
the batched inference buffers).

Network profiles
----------------
Applied around each publish of a node (see :mod:`firmware_sim.netem`):

- ``latency_ms`` +- ``jitter_ms`` (uniform): the publish is held that long;
- ``loss``: probability that a publish is dropped (as if the link failed and the session
  was lost before the broker acknowledged it), the node believing it was sent;
- ``disconnect_every_s`` / ``disconnect_for_s``: outages with exponentially distributed
  gaps (mean ``disconnect_every_s``; 0 = never) during which publishes wait for the link.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from estdp.errors import ConfigError


@dataclass(frozen=True)
class DeviceProfile:
    """A board's compute speed relative to the host and the memory it leaves to training."""

    name: str
    speed: float  # 1.0 = host speed; wall time per image is multiplied by 1 / speed
    memory_mb: float  # memory available to the training process, MiB
    description: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.speed <= 1e3:
            raise ConfigError(f"device {self.name}: speed must be in (0, 1000], got {self.speed}")
        if not self.memory_mb > 0:
            raise ConfigError(f"device {self.name}: memory must be > 0 MiB, got {self.memory_mb}")


@dataclass(frozen=True)
class NetworkProfile:
    """Link impairments applied around a node's publishes."""

    name: str
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    disconnect_every_s: float = 0.0  # mean seconds between outages; 0 = never
    disconnect_for_s: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        for field in ("latency_ms", "jitter_ms", "disconnect_every_s", "disconnect_for_s"):
            value = getattr(self, field)
            if not (value >= 0 and np.isfinite(value)):
                raise ConfigError(f"network {self.name}: {field} must be >= 0, got {value}")
        if not 0 <= self.loss < 1:
            raise ConfigError(f"network {self.name}: loss must be in [0, 1), got {self.loss}")

    @property
    def is_perfect(self) -> bool:
        return (
            self.latency_ms == 0
            and self.jitter_ms == 0
            and self.loss == 0
            and self.disconnect_every_s == 0
        )


DEVICES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile("host", 1.0, 1e9, "the host itself, unpaced and uncapped"),
        DeviceProfile("agx-orin", 1.0, 28_000, "Jetson AGX Orin 32/64 GB (reference speed)"),
        DeviceProfile("orin-nx", 0.35, 12_000, "Jetson Orin NX 16 GB"),
        DeviceProfile("orin-nano", 0.25, 5_500, "Jetson Orin Nano 8 GB"),
        DeviceProfile("nano", 0.05, 2_000, "Jetson Nano 4 GB (Maxwell)"),
    )
}

NETWORKS: dict[str, NetworkProfile] = {
    p.name: p
    for p in (
        NetworkProfile("lan", description="loopback / wired LAN: no impairment"),
        NetworkProfile("wifi", 15.0, 10.0, 0.0, description="Wi-Fi: 15 +- 10 ms"),
        NetworkProfile("lte", 60.0, 40.0, 0.01, description="cellular: 60 +- 40 ms, 1% loss"),
        NetworkProfile(
            "flaky",
            40.0,
            30.0,
            0.05,
            disconnect_every_s=20.0,
            disconnect_for_s=3.0,
            description="poor link: 5% loss, a 3 s outage every ~20 s",
        ),
    )
}


def parse_device(text: str) -> DeviceProfile:
    """A device profile by name, or ``custom:SPEED:MEMORY_MB``, or ``NAME:SPEED`` to rescale."""
    name, _, rest = text.strip().partition(":")
    name = name.lower()
    if name == "custom":
        parts = rest.split(":")
        if len(parts) != 2:
            raise ConfigError(f"device {text!r}: expected custom:SPEED:MEMORY_MB")
        speed, memory = (_number(text, p) for p in parts)
        return DeviceProfile(f"custom({speed:g}x,{memory:g}MiB)", speed, memory)
    if name not in DEVICES:
        raise ConfigError(
            f"unknown device profile {name!r}; choose one of {', '.join(DEVICES)} "
            "or custom:SPEED:MEMORY_MB"
        )
    profile = DEVICES[name]
    if rest:
        profile = replace(profile, speed=_number(text, rest))
    return profile


def parse_network(text: str) -> NetworkProfile:
    """A network profile by name, or ``custom:LATENCY_MS:JITTER_MS:LOSS[:EVERY_S:FOR_S]``."""
    name, _, rest = text.strip().partition(":")
    name = name.lower()
    if name == "custom":
        parts = [_number(text, p) for p in rest.split(":")] if rest else []
        if len(parts) not in (3, 5):
            raise ConfigError(
                f"network {text!r}: expected custom:LATENCY_MS:JITTER_MS:LOSS[:EVERY_S:FOR_S]"
            )
        every, outage = (parts[3], parts[4]) if len(parts) == 5 else (0.0, 0.0)
        return NetworkProfile("custom", parts[0], parts[1], parts[2], every, outage)
    if name not in NETWORKS or rest:
        raise ConfigError(
            f"unknown network profile {text!r}; choose one of {', '.join(NETWORKS)} "
            "or custom:LATENCY_MS:JITTER_MS:LOSS[:EVERY_S:FOR_S]"
        )
    return NETWORKS[name]


def _number(text: str, part: str) -> float:
    try:
        value = float(part)
    except ValueError:
        raise ConfigError(f"{text!r}: {part!r} is not a number") from None
    if not np.isfinite(value):
        raise ConfigError(f"{text!r}: {part!r} is not finite")
    return value


def expand_list(text: str, n_nodes: int) -> list[str]:
    """Per-node items from ``A,B*2,C``: ``*K`` repeats an item; the list cycles over nodes.

    >>> expand_list("nano*2,agx-orin", 5)
    ['nano', 'nano', 'agx-orin', 'nano', 'nano']
    """
    items: list[str] = []
    for raw in text.split(","):
        item, star, count = raw.strip().partition("*")
        if not item:
            raise ConfigError(f"empty item in {text!r}")
        if star:
            try:
                repeat = int(count)
            except ValueError:
                raise ConfigError(f"{raw!r}: repeat count must be a whole number") from None
            if repeat < 1:
                raise ConfigError(f"{raw!r}: repeat count must be >= 1")
        else:
            repeat = 1
        items.extend([item] * repeat)
    return [items[i % len(items)] for i in range(n_nodes)]


def pace_delay(compute_seconds: float, speed: float) -> float:
    """Seconds to sleep after ``compute_seconds`` of work so the board runs at ``speed``."""
    if speed >= 1.0 or compute_seconds <= 0:
        return 0.0
    return compute_seconds * (1.0 / speed - 1.0)


BASE_PROCESS_BYTES = 150 * 2**20  # interpreter, NumPy, paho, msgpack


def training_bytes(n_neurons: int, n_images: int, n_input: int = 784, batch_size: int = 256) -> int:
    """Estimated peak memory of a node process training ``n_neurons`` on ``n_images``."""
    weights = 4 * n_input * n_neurons * 3
    shard = n_images * n_input
    inference = 4 * batch_size * n_neurons * 4
    return BASE_PROCESS_BYTES + weights + shard + inference


def check_fits(profile: DeviceProfile, n_neurons: int, n_images: int, n_input: int = 784) -> int:
    """Raise :class:`ConfigError` when the model and shard do not fit the board's memory.

    Returns
    -------
    int
        The estimated bytes.
    """
    need = training_bytes(n_neurons, n_images, n_input)
    if need > profile.memory_mb * 2**20:
        raise ConfigError(
            f"device {profile.name}: training {n_neurons} neurons on {n_images} images needs "
            f"about {need / 2**20:.0f} MiB, more than its {profile.memory_mb:g} MiB"
        )
    return need


def publish_delay(profile: NetworkProfile, rng: np.random.Generator) -> float:
    """Seconds to hold one publish: latency +- uniform jitter, never negative."""
    if profile.latency_ms == 0 and profile.jitter_ms == 0:
        return 0.0
    jitter = rng.uniform(-profile.jitter_ms, profile.jitter_ms) if profile.jitter_ms else 0.0
    return max(0.0, profile.latency_ms + jitter) / 1000.0


def drops(profile: NetworkProfile, rng: np.random.Generator) -> bool:
    """Whether one publish is lost."""
    return profile.loss > 0 and bool(rng.random() < profile.loss)


def outages(
    profile: NetworkProfile, rng: np.random.Generator, horizon_s: float
) -> list[tuple[float, float]]:
    """Outage windows ``(start, end)`` in seconds from the start, up to ``horizon_s``."""
    if profile.disconnect_every_s <= 0 or profile.disconnect_for_s <= 0:
        return []
    windows: list[tuple[float, float]] = []
    t = 0.0
    while True:
        t += rng.exponential(profile.disconnect_every_s)
        if t >= horizon_s:
            return windows
        windows.append((t, t + profile.disconnect_for_s))
        t += profile.disconnect_for_s
