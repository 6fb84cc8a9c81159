"""Topics: built under estdp/<fleet>/, ids validated, filters matched as MQTT does."""

from __future__ import annotations

import pytest

from estdp.errors import ConfigError, ProtocolError
from estdp.topics import (
    Topics,
    chunk_topic,
    is_valid_id,
    split_chunk_topic,
    topic_matches,
    validate_id,
)


def test_layout_of_a_fleet() -> None:
    t = Topics("lab")
    assert t.round == "estdp/lab/round"
    assert t.global_model == "estdp/lab/global"
    assert t.update("n1") == "estdp/lab/nodes/n1/update"
    assert t.status("n1") == "estdp/lab/nodes/n1/status"
    assert t.metrics("n1") == "estdp/lab/nodes/n1/metrics"
    assert t.labels("n1") == "estdp/lab/nodes/n1/labels"
    assert topic_matches(t.all_labels, t.labels("n1"))
    assert topic_matches(t.all_labels, chunk_topic(t.labels("n1"), 2))
    assert not topic_matches(t.all_labels, t.metrics("n1"))
    assert t.node_of("estdp/lab/nodes/n1/update/chunk/3") == "n1"
    assert t.node_of("estdp/other/nodes/n1/update") is None
    assert t.node_of("estdp/lab/round") is None


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "n 1", "ü", "x" * 65, None, 3])
def test_ids_that_could_break_a_topic_are_refused(bad: object) -> None:
    assert not is_valid_id(bad)
    with pytest.raises(ConfigError):
        validate_id(bad, "node id")
    if isinstance(bad, str):
        with pytest.raises(ConfigError):
            Topics(bad)
        with pytest.raises(ConfigError):
            Topics("ok").update(bad)


@pytest.mark.parametrize("good", ["n1", "jetson-07", "a.b_c", "x" * 64])
def test_valid_ids(good: str) -> None:
    assert validate_id(good) == good
    assert Topics(good).root == f"estdp/{good}"


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("estdp/f/nodes/+/update/#", "estdp/f/nodes/n1/update", True),  # a/# matches a
        ("estdp/f/nodes/+/update/#", "estdp/f/nodes/n1/update/chunk/0", True),
        ("estdp/f/nodes/+/update/#", "estdp/f/nodes/n1/status", False),
        ("estdp/f/global/#", "estdp/f/global", True),
        ("estdp/f/global/#", "estdp/f/globalx", False),
        ("estdp/f/+", "estdp/f/round", True),
        ("estdp/f/+", "estdp/f/round/x", False),
        ("#", "$SYS/broker/uptime", False),
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
    ],
)
def test_topic_matching(flt: str, topic: str, expected: bool) -> None:
    assert topic_matches(flt, topic) is expected


def test_chunk_topics_round_trip_and_bad_suffixes() -> None:
    base = Topics("f").global_model
    assert split_chunk_topic(chunk_topic(base, 17)) == (base, 17)
    assert split_chunk_topic(base) == (base, None)
    for bad in (f"{base}/chunk/x", f"{base}/chunk/-1", f"{base}/chunk/12345678"):
        with pytest.raises(ProtocolError):
            split_chunk_topic(bad)
