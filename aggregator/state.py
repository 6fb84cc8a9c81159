"""The aggregator's round state on disk, so that a restart resumes where it stopped.

Layout of the state directory::

    state.json                         the current round: its announcement and phase
    rounds/<R>/updates/<node>.msg      each accepted update, as the bytes that arrived
    rounds/<R>/calibration/<node>.msg  each accepted calibration (calibrating)
    rounds/<R>/labels/<node>.msg       each accepted label statistics message (labelling)
    rounds/<R>/global.msg              the published global model message (the provisional
                                       one while labelling, then the final one)
    rounds/<R>/global.estdp            the same model as a model file, for people
    rounds/<R>/forwarded.msg           a site aggregator's site model, as sent upstream
    rounds/<R>/labels-relayed.msg      a site's summed label statistics, as sent upstream
    rounds/<R>/calibration-relayed.msg the same, of the calibrating phase (with thetas)
    rounds/<R>/site.estdp              the same site model as a model file

Every file is written atomically (:mod:`estdp.atomic`): a crash leaves the old file or
the new one, never half of one. An update is on disk before it counts, and the directory
of updates *is* the list of received updates: there is no second list to disagree with
it. Files are decoded again when loaded, so a damaged file is reported and skipped,
never merged. ``state.json`` is rewritten when a round opens and when it is merged; a
crash between the global model's publication and that rewrite only means the merge is
done again after the restart, with the same updates.

With federated labels (``aggregator.daemon``, ``labels="federated"``) a round has a phase
``labelling`` between the two: the provisional global model is published and the nodes'
label statistics are collected, each stored before it counts (the directory of stats is
the list of reporters, as for updates); ``state.json`` also records the model tag the
statistics must name and the label deadline, so that a restart resumes the phase with
the statistics it had, and the same deadline.

With threshold calibration (``aggregator.calibration``) the phase ``calibrating`` comes
before ``labelling``: the provisional model that asks for it is published, and the nodes'
thresholds (label statistics with ``thetas``) are collected in the same way, in their own
directory, under the same two records (that model's tag, the calibration deadline). Then
``labelling`` starts over with the model of averaged thresholds, its tag and deadline.

A *site* aggregator (``aggregator.daemon``, upstream mode) has one more phase between
the two: ``forwarded``, its site model sent upstream and the root's global model not yet
back. Each of its rounds also records the root round it serves (``upstream_session``,
``upstream_round``), so that a restart re-sends the site model to the right round.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from estdp import protocol
from estdp.atomic import atomic_write_bytes, atomic_write_text
from estdp.errors import ConfigError, ProtocolError
from estdp.model import SubModel, save_model
from estdp.protocol import LabelStats, Limits, RoundAnnouncement, SubModelUpdate
from estdp.topics import is_valid_id

log = logging.getLogger(__name__)

STATE_VERSION = 1
# "open": collecting updates; "forwarded": a site model sent upstream, waiting for the
# root's global model; "labelling": the provisional global model published, collecting
# the nodes' label statistics; "calibrating" (before "labelling"): the provisional model
# asking for a thresholds-only pass published, collecting the nodes' thresholds;
# "merged": the round's (final) global model published.
PHASES = ("open", "forwarded", "calibrating", "labelling", "merged")


@dataclass(frozen=True)
class RoundState:
    """The aggregator's current round."""

    announcement: RoundAnnouncement
    phase: str = "open"
    contains: tuple[str, ...] = ()  # node ids in the published global (or forwarded) model
    # Upstream mode only: the root round this site round serves ("" and 0 otherwise).
    upstream_session: str = ""
    upstream_round: int = 0
    # Calibrating and labelling only: the tag of the provisional global model and the
    # deadline of the phase.
    model_tag: str = ""
    label_deadline_unix: float = 0.0

    @property
    def round_id(self) -> int:
        return self.announcement.round_id


class AggregatorState:
    """Round state kept in ``directory`` (created if missing).

    Parameters
    ----------
    directory
        The state directory.
    limits
        Decoding bounds for the stored updates.

    Raises
    ------
    ConfigError
        The directory cannot be created, or ``state.json`` is unreadable.
    """

    def __init__(self, directory: str | Path, limits: Limits = protocol.DEFAULT_LIMITS) -> None:
        self.directory = Path(directory)
        self.limits = limits
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the state directory {self.directory}: {exc}"
            ) from None
        self.current: RoundState | None = self._load()

    # ---- paths ----------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.directory / "state.json"

    def round_dir(self, round_id: int) -> Path:
        return self.directory / "rounds" / str(int(round_id))

    def _updates_dir(self, round_id: int) -> Path:
        return self.round_dir(round_id) / "updates"

    def _labels_dir(self, round_id: int, phase: str = "labelling") -> Path:
        name = "calibration" if phase == "calibrating" else "labels"
        return self.round_dir(round_id) / name

    # ---- state.json -----------------------------------------------------------------------

    def _load(self) -> RoundState | None:
        if not self.state_file.exists():
            return None
        try:
            record = json.loads(self.state_file.read_text())
            if record.get("version") != STATE_VERSION:
                raise ValueError(f"unsupported state version {record.get('version')!r}")
            phase = record["phase"]
            if phase not in PHASES:
                raise ValueError(f"unknown phase {phase!r}")
            announcement = RoundAnnouncement(**record["announcement"])
            contains = tuple(record.get("contains", ()))
            # Absent from the state of a flat aggregator (and of earlier versions).
            upstream_session = str(record.get("upstream_session", ""))
            upstream_round = int(record.get("upstream_round", 0))
            model_tag = str(record.get("model_tag", ""))
            label_deadline = float(record.get("label_deadline_unix", 0.0))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"cannot read the aggregator state {self.state_file}: {exc}"
            ) from None
        return RoundState(
            announcement,
            phase,
            contains,
            upstream_session,
            upstream_round,
            model_tag,
            label_deadline,
        )

    def _save(self, state: RoundState) -> None:
        record: dict[str, Any] = {
            "version": STATE_VERSION,
            "phase": state.phase,
            "announcement": asdict(state.announcement),
            "contains": list(state.contains),
        }
        if state.upstream_session or state.upstream_round:
            record["upstream_session"] = state.upstream_session
            record["upstream_round"] = state.upstream_round
        if state.model_tag:
            record["model_tag"] = state.model_tag
            record["label_deadline_unix"] = state.label_deadline_unix
        atomic_write_text(self.state_file, json.dumps(record, indent=1, sort_keys=True) + "\n")
        self.current = state

    @property
    def last_round_id(self) -> int:
        """The id of the current (or last) round; 0 before the first."""
        return self.current.round_id if self.current else 0

    # ---- transitions ----------------------------------------------------------------------

    def open_round(
        self, announcement: RoundAnnouncement, upstream_session: str = "", upstream_round: int = 0
    ) -> RoundState:
        """Start ``announcement``'s round (its update directory is created empty); a site
        aggregator also names the root round it serves."""
        self._updates_dir(announcement.round_id).mkdir(parents=True, exist_ok=True)
        state = RoundState(
            announcement, upstream_session=upstream_session, upstream_round=upstream_round
        )
        self._save(state)
        return state

    def retarget(self, upstream_session: str, upstream_round: int) -> None:
        """Point the open round at a newer root round (the root moved on while it was open)."""
        if self.current is None:
            raise ConfigError("no round is open")
        self._save(
            replace(self.current, upstream_session=upstream_session, upstream_round=upstream_round)
        )

    def add_update(self, node_id: str, payload: bytes) -> bool:
        """Store an accepted update of the current round; False if ``node_id`` already
        has one (the first one counts)."""
        if self.current is None:
            raise ConfigError("no round is open")
        return _store_once(self._updates_dir(self.current.round_id), node_id, payload)

    def received(self) -> list[str]:
        """Node ids with an update stored for the current round, sorted."""
        if self.current is None:
            return []
        return _stored_ids(self._updates_dir(self.current.round_id))

    def load_updates(self) -> dict[str, SubModelUpdate]:
        """The stored updates of the current round, decoded again; a damaged file is
        logged and left out."""
        if self.current is None:
            return {}
        return _load_stored(
            self._updates_dir(self.current.round_id),
            lambda data: protocol.decode_update(data, self.limits),
            "update",
        )

    def mark_merged(
        self, global_payload: bytes, model: SubModel, contains: tuple[str, ...]
    ) -> None:
        """Record the published global model of the current round."""
        if self.current is None:
            raise ConfigError("no round is open")
        directory = self.round_dir(self.current.round_id)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / "global.msg", global_payload)
        save_model(model, directory / "global.estdp")
        self._save(replace(self.current, phase="merged", contains=tuple(contains)))

    def mark_labelling(
        self,
        global_payload: bytes,
        model: SubModel,
        contains: tuple[str, ...],
        model_tag: str,
        label_deadline_unix: float,
        *,
        phase: str = "labelling",
    ) -> None:
        """Record the provisional global model of the current round, published; the
        label statistics for ``model_tag`` are collected until ``label_deadline_unix``
        (``phase="calibrating"``: the nodes' calibrations, in their own directory)."""
        if self.current is None:
            raise ConfigError("no round is open")
        if phase not in ("calibrating", "labelling"):
            raise ValueError(f"not a phase of provisional models: {phase!r}")
        directory = self.round_dir(self.current.round_id)
        self._labels_dir(self.current.round_id, phase).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / "global.msg", global_payload)
        save_model(model, directory / "global.estdp")
        self._save(
            replace(
                self.current,
                phase=phase,
                contains=tuple(contains),
                model_tag=model_tag,
                label_deadline_unix=float(label_deadline_unix),
            )
        )

    def add_label_stats(self, node_id: str, payload: bytes) -> bool:
        """Store accepted label statistics of the current round (of its current phase,
        calibrating or labelling); False if ``node_id`` already has some (the first ones
        count)."""
        if self.current is None:
            raise ConfigError("no round is open")
        directory = self._labels_dir(self.current.round_id, self.current.phase)
        return _store_once(directory, node_id, payload)

    def label_reporters(self) -> list[str]:
        """Node ids with label statistics stored for the current round (its current
        phase, calibrating or labelling), sorted."""
        if self.current is None:
            return []
        return _stored_ids(self._labels_dir(self.current.round_id, self.current.phase))

    def load_label_stats(self) -> dict[str, LabelStats]:
        """The stored label statistics of the current round (its current phase), decoded
        again; a damaged file is logged and left out."""
        if self.current is None:
            return {}
        return _load_stored(
            self._labels_dir(self.current.round_id, self.current.phase),
            lambda data: protocol.decode_labels(data, self.limits),
            "label statistics",
        )

    def _relayed_file(self, round_id: int) -> Path:
        phase = self.current.phase if self.current is not None else "labelling"
        name = "calibration-relayed.msg" if phase == "calibrating" else "labels-relayed.msg"
        return self.round_dir(round_id) / name

    def mark_labels_relayed(self, payload: bytes) -> None:
        """Record the label statistics a site sent upstream for the current round and
        phase (empty: none to send); written before they are sent, so that a restart
        sends them again."""
        if self.current is None:
            raise ConfigError("no round is open")
        atomic_write_bytes(self._relayed_file(self.current.round_id), payload)

    def relayed_labels_payload(self) -> bytes | None:
        """The label statistics a site relayed upstream in the current round and phase
        (b"" when it had none), or None before it relayed."""
        try:
            return self._relayed_file(self.last_round_id).read_bytes()
        except OSError:
            return None

    def mark_forwarded(
        self, update_payload: bytes, model: SubModel, contains: tuple[str, ...]
    ) -> None:
        """Record the site model sent upstream for the current round (a site aggregator);
        written before it is sent, so that a restart can send it again."""
        if self.current is None:
            raise ConfigError("no round is open")
        directory = self.round_dir(self.current.round_id)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / "forwarded.msg", update_payload)
        save_model(model, directory / "site.estdp")
        self._save(replace(self.current, phase="forwarded", contains=tuple(contains)))

    def close_round(self) -> None:
        """Close the current round without a global model of its own (a site whose root
        moved on before sending its model back): the fleet keeps the model it has."""
        if self.current is None:
            raise ConfigError("no round is open")
        self._save(replace(self.current, phase="merged"))

    def forwarded_payload(self, round_id: int | None = None) -> bytes | None:
        """The site model message sent upstream in a round (default: the current one)."""
        rid = self.last_round_id if round_id is None else round_id
        try:
            return (self.round_dir(rid) / "forwarded.msg").read_bytes()
        except OSError:
            return None

    def global_payload(self, round_id: int | None = None) -> bytes | None:
        """The published global model message of a round (default: the current one)."""
        rid = self.last_round_id if round_id is None else round_id
        path = self.round_dir(rid) / "global.msg"
        try:
            return path.read_bytes()
        except OSError:
            return None

    def summary(self) -> dict[str, Any]:
        cur = self.current
        out: dict[str, Any] = {
            "round": cur.round_id if cur else 0,
            "phase": cur.phase if cur else "none",
            "received": self.received(),
        }
        if cur is not None and cur.upstream_round:
            out["upstream_round"] = cur.upstream_round
        if cur is not None and cur.phase in ("calibrating", "labelling"):
            out["labels_from"] = self.label_reporters()
        return out


# ---- per-node messages of a round: one file each, the first one counts -------------------


def _store_once(directory: Path, node_id: str, payload: bytes) -> bool:
    """Write ``payload`` as ``node_id``'s message in ``directory`` (atomically); False,
    and nothing written, when that node has one there already."""
    if not is_valid_id(node_id):
        raise ConfigError(f"invalid node id {node_id!r}")
    path = directory / f"{node_id}.msg"
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, payload)
    return True


def _stored_ids(directory: Path) -> list[str]:
    """Node ids with a message stored in ``directory``, sorted."""
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.msg") if is_valid_id(p.stem))


def _load_stored(directory: Path, decode: Callable[[bytes], Any], what: str) -> dict[str, Any]:
    """The messages stored in ``directory`` by node id, decoded again; a damaged file is
    logged and left out."""
    out: dict[str, Any] = {}
    for node_id in _stored_ids(directory):
        path = directory / f"{node_id}.msg"
        try:
            out[node_id] = decode(path.read_bytes())
        except (OSError, ProtocolError) as exc:
            log.error("skipping the stored %s %s: %s", what, path, exc)
    return out
