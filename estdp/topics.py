"""MQTT topics of a fleet, built and validated in one place.

Every topic lives under ``estdp/<fleet>/``::

    estdp/<fleet>/round                      round announcement (retained)
    estdp/<fleet>/global                     global model (retained)
    estdp/<fleet>/nodes/<id>/update          sub-model update of one node (retained)
    estdp/<fleet>/nodes/<id>/status          node status (retained; the last will says "offline")
    estdp/<fleet>/nodes/<id>/metrics         node metrics after installing a global model
    estdp/<fleet>/nodes/<id>/labels          label statistics for a provisional global
                                             model (retained)

A message too large for one MQTT packet is split into chunks published under
``<topic>/chunk/<index>`` (see :mod:`estdp.chunking`); subscribing to ``<topic>/#`` receives
both the whole message and its chunks, since ``a/#`` also matches ``a``.

Fleet and node ids are restricted to ``[A-Za-z0-9_.-]{1,64}`` so that no id can inject a
level separator (``/``) or a wildcard (``+``, ``#``) into a topic, and so that a broker ACL
pattern such as ``estdp/+/nodes/%c/#`` can bind a client to its own id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from estdp.errors import ConfigError, ProtocolError

ROOT = "estdp"
CHUNK_LEVEL = "chunk"
MAX_ID_LENGTH = 64
_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def validate_id(value: object, kind: str = "id") -> str:
    """Return ``value`` if it is a valid fleet or node id, else raise :class:`ConfigError`.

    Parameters
    ----------
    value
        The candidate id.
    kind
        What the id names, for the error message (``"node id"``, ``"fleet"``).
    """
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ConfigError(
            f"invalid {kind} {value!r}: use 1-{MAX_ID_LENGTH} characters from A-Z a-z 0-9 _ . -"
        )
    return value


def is_valid_id(value: object) -> bool:
    """True when ``value`` would pass :func:`validate_id`."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class Topics:
    """The topics of one fleet.

    Parameters
    ----------
    fleet
        Fleet name, the second topic level (``estdp/<fleet>/...``).
    """

    fleet: str = "default"

    def __post_init__(self) -> None:
        validate_id(self.fleet, "fleet")

    @property
    def root(self) -> str:
        return f"{ROOT}/{self.fleet}"

    @property
    def round(self) -> str:
        return f"{self.root}/round"

    @property
    def global_model(self) -> str:
        return f"{self.root}/global"

    def node(self, node_id: str) -> str:
        return f"{self.root}/nodes/{validate_id(node_id, 'node id')}"

    def update(self, node_id: str) -> str:
        return f"{self.node(node_id)}/update"

    def status(self, node_id: str) -> str:
        return f"{self.node(node_id)}/status"

    def metrics(self, node_id: str) -> str:
        return f"{self.node(node_id)}/metrics"

    def labels(self, node_id: str) -> str:
        return f"{self.node(node_id)}/labels"

    # Subscription filters.
    @property
    def all_updates(self) -> str:
        return f"{self.root}/nodes/+/update/#"

    @property
    def all_status(self) -> str:
        return f"{self.root}/nodes/+/status"

    @property
    def all_metrics(self) -> str:
        return f"{self.root}/nodes/+/metrics"

    @property
    def all_labels(self) -> str:
        # Chunked when large (many neurons): the chunks are below the topic.
        return f"{self.root}/nodes/+/labels/#"

    @property
    def global_all(self) -> str:
        return f"{self.global_model}/#"

    def node_of(self, topic: str) -> str | None:
        """The node id in a topic under ``estdp/<fleet>/nodes/<id>/...``, else None."""
        prefix = f"{self.root}/nodes/"
        if not topic.startswith(prefix):
            return None
        node_id = topic[len(prefix) :].split("/", 1)[0]
        return node_id if is_valid_id(node_id) else None


def chunk_topic(base: str, index: int) -> str:
    """The topic of chunk ``index`` of a message whose whole form goes to ``base``."""
    return f"{base}/{CHUNK_LEVEL}/{int(index)}"


def split_chunk_topic(topic: str) -> tuple[str, int | None]:
    """``(base, index)`` for a chunk topic, ``(topic, None)`` for any other topic.

    Raises
    ------
    ProtocolError
        The topic ends in ``/chunk/<x>`` with ``x`` not a small non-negative integer.
    """
    head, sep, tail = topic.rpartition(f"/{CHUNK_LEVEL}/")
    if not sep:
        return topic, None
    if not tail.isdigit() or len(tail) > 6:
        raise ProtocolError(f"bad chunk topic {topic!r}")
    return head, int(tail)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches the MQTT subscription ``topic_filter`` (``+`` and ``#``).

    ``a/#`` matches ``a`` itself, as the MQTT specification says; topics starting with
    ``$`` are not matched by a filter starting with a wildcard.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)
