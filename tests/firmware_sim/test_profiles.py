"""Device and network profiles: parsing, pacing, memory check, impairments."""

from __future__ import annotations

import numpy as np
import pytest

from estdp.errors import ConfigError
from firmware_sim import profiles as P


def test_jetson_presets_are_ordered_by_speed():
    speeds = [P.DEVICES[n].speed for n in ("agx-orin", "orin-nx", "orin-nano", "nano")]
    assert speeds == sorted(speeds, reverse=True)
    assert P.DEVICES["agx-orin"].speed == 1.0


def test_pace_delay_makes_wall_time_match_speed():
    # 0.25x speed: 1 s of compute becomes 4 s of wall time.
    assert P.pace_delay(1.0, 0.25) == pytest.approx(3.0)
    assert P.pace_delay(0.2, 0.05) == pytest.approx(3.8)
    assert P.pace_delay(1.0, 1.0) == 0.0
    assert P.pace_delay(1.0, 2.0) == 0.0  # a faster board cannot speed the host up


def test_parse_device_names_rescale_and_custom():
    assert P.parse_device("Nano").name == "nano"
    assert P.parse_device("orin-nano:0.5").speed == 0.5
    custom = P.parse_device("custom:0.2:1024")
    assert (custom.speed, custom.memory_mb) == (0.2, 1024)
    for bad in ("pi4", "custom:1", "custom:x:1", "nano:0", "custom:1:-5"):
        with pytest.raises(ConfigError):
            P.parse_device(bad)


def test_parse_network_names_and_custom():
    assert P.parse_network("lan").is_perfect
    flaky = P.parse_network("flaky")
    assert flaky.loss > 0 and flaky.disconnect_every_s > 0
    custom = P.parse_network("custom:10:5:0.1:30:2")
    assert (custom.latency_ms, custom.jitter_ms, custom.loss) == (10, 5, 0.1)
    assert (custom.disconnect_every_s, custom.disconnect_for_s) == (30, 2)
    for bad in ("5g", "custom:1:2", "custom:1:2:1.5", "lan:3"):
        with pytest.raises(ConfigError):
            P.parse_network(bad)


def test_expand_list_repeats_and_cycles():
    assert P.expand_list("nano*2,agx-orin", 5) == ["nano", "nano", "agx-orin", "nano", "nano"]
    assert P.expand_list("host", 3) == ["host"] * 3
    for bad in ("a,,b", "a*0", "a*x"):
        with pytest.raises(ConfigError):
            P.expand_list(bad, 2)


def test_memory_check_refuses_a_model_that_does_not_fit():
    small = P.DeviceProfile("tiny", 1.0, 200)
    assert P.check_fits(small, 100, 6000) < 200 * 2**20
    with pytest.raises(ConfigError, match="tiny.*6400 neurons.*MiB"):
        P.check_fits(small, 6400, 60000)
    # The estimate grows with the model and the shard.
    assert P.training_bytes(400, 1000) > P.training_bytes(100, 1000)
    assert P.training_bytes(100, 60000) > P.training_bytes(100, 1000)


def test_publish_delay_stays_within_latency_plus_jitter():
    rng = np.random.default_rng(0)
    prof = P.NetworkProfile("x", latency_ms=50, jitter_ms=20)
    delays = np.array([P.publish_delay(prof, rng) for _ in range(500)])
    assert delays.min() >= 0.030 and delays.max() <= 0.070
    assert abs(delays.mean() - 0.050) < 0.005
    assert P.publish_delay(P.NETWORKS["lan"], rng) == 0.0


def test_drop_rate_matches_loss():
    rng = np.random.default_rng(1)
    prof = P.NetworkProfile("x", loss=0.2)
    rate = np.mean([P.drops(prof, rng) for _ in range(5000)])
    assert 0.17 < rate < 0.23
    assert not any(P.drops(P.NETWORKS["lan"], rng) for _ in range(100))


def test_outages_are_disjoint_and_within_horizon():
    rng = np.random.default_rng(2)
    prof = P.NetworkProfile("x", disconnect_every_s=5.0, disconnect_for_s=1.0)
    windows = P.outages(prof, rng, 200.0)
    assert len(windows) > 10
    assert all(end - start == pytest.approx(1.0) for start, end in windows)
    assert all(a[1] <= b[0] for a, b in zip(windows, windows[1:], strict=False))
    assert windows[-1][0] < 200.0
    assert P.outages(P.NETWORKS["wifi"], rng, 200.0) == []


def test_invalid_profiles_are_refused():
    with pytest.raises(ConfigError):
        P.NetworkProfile("x", loss=1.0)
    with pytest.raises(ConfigError):
        P.NetworkProfile("x", latency_ms=-1)
    with pytest.raises(ConfigError):
        P.DeviceProfile("x", 0.0, 100)
