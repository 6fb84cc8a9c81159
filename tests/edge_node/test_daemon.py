"""The node daemon over the in-memory transport, against a scripted aggregator."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from aggregator.federated_labels import with_labels_note
from edge_node.daemon import LabelCounts, NodeConfig, NodeDaemon, TrainOutcome
from estdp import protocol
from estdp.errors import ConfigError
from estdp.lineage import parent_tag
from estdp.model import load_model, new_model
from estdp.params import NetworkParams
from estdp.protocol import GlobalModel, RoundAnnouncement
from estdp.topics import Topics
from estdp.transport.base import TransportConfig
from estdp.transport.channel import Channel
from estdp.transport.memory import MemoryBroker, MemoryTransport

TOPICS = Topics("mem")


def model(n: int, value: float = 0.1, node: str = "n1"):
    return new_model(
        np.full((784, n), value, np.float32),
        np.zeros(n, np.float32),
        NetworkParams(),
        node_id=node,
        images_seen=7,
        seed=0,
    )


class Trainer:
    def __init__(self, stop_after: threading.Event | None = None) -> None:
        self.calls: list[tuple[int, int, object]] = []
        self.stop_after = stop_after

    def train(self, announcement, n_neurons, start, progress):
        self.calls.append((announcement.round_id, n_neurons, start))
        progress(1, 2)
        if self.stop_after is not None:
            self.stop_after.set()
        progress(2, 2)  # a stop request lands here
        return TrainOutcome(model(n_neurons), {"images": 2.0})

    def evaluate(self, m):
        return {"accuracy": 0.5}

    def label_stats(self, m, round_id):
        self.label_calls = getattr(self, "label_calls", []) + [round_id]
        self.measured_thetas = m.thetas.copy()
        counts = np.arange(10, dtype=np.int64)  # class 0: no images
        return LabelCounts(counts, counts[:, None] * np.ones((10, m.n_neurons)))

    def calibrate(self, m, n_images, round_id):
        self.calibrate_calls = getattr(self, "calibrate_calls", []) + [(n_images, round_id)]
        return m.thetas + 2.5, min(n_images, 40)  # a 40-image shard


def connect(broker: MemoryBroker, cid: str, will=None) -> Channel:
    t = MemoryTransport(broker, TransportConfig(client_id=cid, will=will))
    t.connect()
    return Channel(t)


def announce(agg: Channel, round_id: int, neurons: int = 4, cont: bool = False) -> None:
    ann = RoundAnnouncement(round_id, neurons, 8, "mse", 2e9, 1, 1, cont, 1e9)
    agg.send(TOPICS.round, ann, retain=True)


def make_node(broker: MemoryBroker, tmp: Path, trainer=None, **kw) -> tuple[NodeDaemon, list[dict]]:
    events: list[dict] = []
    cfg = NodeConfig("n1", "mem", state_dir=tmp / "n1", **kw)
    node = NodeDaemon(
        cfg, connect(broker, "n1", cfg.will()), trainer or Trainer(), events=events.append
    )
    node.start()
    return node, events


@pytest.fixture
def agg_side() -> tuple[MemoryBroker, Channel]:
    broker = MemoryBroker()
    agg = connect(broker, "aggregator")
    agg.transport.subscribe(f"{TOPICS.root}/nodes/#")
    return broker, agg


def received(agg: Channel) -> list:
    return [r.message for r in agg.poll_batch(0)]


def test_round_train_publish_install_evaluate(agg_side, tmp_path: Path) -> None:
    broker, agg = agg_side
    node, events = make_node(broker, tmp_path)
    announce(agg, 1)
    node.step(0)
    msgs = received(agg)
    states = [m.state for m in msgs if isinstance(m, protocol.NodeStatus)]
    assert states == ["online", "training", "online"]
    (update,) = [m for m in msgs if isinstance(m, protocol.SubModelUpdate)]
    assert (update.node_id, update.round_id, update.model.n_neurons) == ("n1", 1, 4)
    assert TOPICS.update("n1") in broker.retained  # retained: survives an aggregator restart
    assert [e["event"] for e in events if e["event"] == "progress"] == ["progress", "progress"]

    agg.send(TOPICS.global_model, GlobalModel(1, model(8, 0.2, "aggregator"), ("n1",)), retain=True)
    node.step(0)
    installed = load_model(tmp_path / "n1" / "global.estdp")
    assert installed.n_neurons == 8 and node.installed_round == 1 and node.pending_update is None
    (metrics,) = [m for m in received(agg) if isinstance(m, protocol.NodeMetrics)]
    assert metrics.metrics == {"accuracy": 0.5} and metrics.round_id == 1


def test_next_round_continues_from_the_installed_global_model(agg_side, tmp_path: Path) -> None:
    broker, agg = agg_side
    trainer = Trainer()
    node, _ = make_node(broker, tmp_path, trainer)
    agg.send(TOPICS.global_model, GlobalModel(1, model(8, 0.2, "aggregator"), ("n1",)), retain=True)
    announce(agg, 1)  # already has round 1's global model: nothing to train
    node.step(0)
    assert trainer.calls == []
    announce(agg, 2, cont=True)
    node.step(0)
    (round_id, n, start) = trainer.calls[0]
    assert round_id == 2 and start is not None and start.n_neurons == 8


def test_stale_global_models_are_ignored(agg_side, tmp_path: Path) -> None:
    broker, agg = agg_side
    node, _ = make_node(broker, tmp_path)
    agg.send(TOPICS.global_model, GlobalModel(3, model(8, 0.3, "aggregator"), ("n1",)))
    agg.send(TOPICS.global_model, GlobalModel(2, model(8, 0.9, "aggregator"), ("n1",)))
    node.step(0)
    assert node.installed_round == 3 and float(node.global_model.weights[0, 0]) == pytest.approx(
        0.3
    )


def test_a_restarted_node_resends_its_pending_update_and_keeps_its_global(
    agg_side, tmp_path: Path
) -> None:
    broker, agg = agg_side
    node, _ = make_node(broker, tmp_path)
    announce(agg, 1)
    node.step(0)
    node.channel.transport.abort()
    received(agg)
    again, _ = make_node(broker, tmp_path)  # same state directory
    assert again.published_round == 1 and again.pending_update is not None
    msgs = received(agg)
    assert any(isinstance(m, protocol.SubModelUpdate) for m in msgs)  # re-sent on start
    again.step(0)
    assert len(again.trainer.calls) == 0  # round 1 is not trained twice


def test_reconnect_resends_the_pending_update(agg_side, tmp_path: Path) -> None:
    broker, agg = agg_side
    node, _ = make_node(broker, tmp_path)
    announce(agg, 1)
    node.step(0)
    broker.down()  # loses the retained messages, as a broker without persistence does
    broker.up()
    node.step(0)
    assert TOPICS.update("n1") in broker.retained


def test_stop_during_training_parks_it(agg_side, tmp_path: Path) -> None:
    broker, agg = agg_side
    stop = threading.Event()
    trainer = Trainer(stop_after=stop)
    events: list[dict] = []
    cfg = NodeConfig("n1", "mem", state_dir=tmp_path / "n1")
    node = NodeDaemon(
        cfg, connect(broker, "n1", cfg.will()), trainer, events=events.append, stop=stop
    )
    announce(agg, 1)
    assert node.run(poll_s=0) == 0
    assert "parked" in [e["event"] for e in events] and node.published_round == 0
    msgs = received(agg)
    assert not any(isinstance(m, protocol.SubModelUpdate) for m in msgs)
    assert msgs[-1].state == "offline"


def test_the_will_says_offline() -> None:
    will = NodeConfig("n1", "mem").will()
    assert will.retain and will.topic == TOPICS.status("n1")
    assert protocol.decode_status(will.payload).state == "offline"
    with pytest.raises(ConfigError):
        NodeConfig("bad/id")


def test_a_new_aggregator_session_restarts_the_round_count(agg_side, tmp_path: Path) -> None:
    broker, agg = agg_side
    trainer = Trainer()
    node, _ = make_node(broker, tmp_path, trainer)
    old = RoundAnnouncement(5, 4, 8, "mse", 2e9, 1, 1, False, 1e9, session="aaaa")
    agg.send(TOPICS.round, old, retain=True)
    agg.send(TOPICS.global_model, GlobalModel(5, model(8), ("n1",), session="aaaa"), retain=True)
    node.step(0)
    assert node.installed_round == 5 and node.session == "aaaa"
    new = RoundAnnouncement(1, 4, 8, "mse", 2e9, 1, 1, False, 1e9, session="bbbb")
    agg.send(TOPICS.round, new, retain=True)
    node.step(0)
    assert [c[0] for c in trainer.calls] == [1]  # 5 had its global; 1 is a new session's
    agg.send(TOPICS.global_model, GlobalModel(9, model(8), ("n1",), session="aaaa"))
    node.step(0)
    assert node.installed_round == 0  # the old session's global model is not installed


def test_a_state_directory_that_cannot_be_created_is_one_config_error(
    agg_side, tmp_path: Path
) -> None:
    broker, _ = agg_side
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    cfg = NodeConfig("n1", "mem", state_dir=blocker / "x")  # like --state /etc/passwd/x
    with pytest.raises(ConfigError, match=r"cannot create the node state directory .*a-file/x"):
        NodeDaemon(cfg, connect(broker, "n1", cfg.will()), Trainer())


def test_unreadable_and_unwritable_state_are_config_errors(agg_side, tmp_path: Path) -> None:
    broker, agg = agg_side
    state = tmp_path / "n1"
    (state / "node.json").mkdir(parents=True)  # a directory where the state file belongs
    cfg = NodeConfig("n1", "mem", state_dir=state)
    with pytest.raises(ConfigError, match=r"cannot read the node state .*node\.json"):
        NodeDaemon(cfg, connect(broker, "n1", cfg.will()), Trainer())
    (state / "node.json").rmdir()
    node, _ = make_node(broker, tmp_path)
    (state / "node.json").mkdir()  # saving (an atomic rename onto it) now fails
    announce(agg, 1)
    with pytest.raises(ConfigError, match=r"cannot write the node state .*node\.json"):
        node.step(0)


def test_garbled_state_counters_are_ignored(agg_side, tmp_path: Path) -> None:
    # Garbled content (not an OS error) costs a round trained again, not the node.
    broker, _ = agg_side
    (tmp_path / "n1").mkdir()
    (tmp_path / "n1" / "node.json").write_text("{not json")
    node, _ = make_node(broker, tmp_path)
    assert node.installed_round == 0 and node.published_round == 0


# ---- federated labels: a provisional global model, then the final one ------------------


def noted(m, labels: str):
    return with_labels_note(m, labels)


def test_a_provisional_global_gets_label_stats_then_the_final_replaces_it(
    agg_side, tmp_path: Path
) -> None:
    broker, agg = agg_side
    trainer = Trainer()
    node, events = make_node(broker, tmp_path, trainer)
    announce(agg, 1)
    node.step(0)
    received(agg)
    provisional = noted(model(8, 0.2, "aggregator"), protocol.LABELS_PROVISIONAL)
    agg.send(TOPICS.global_model, GlobalModel(1, provisional, ("n1",)), retain=True)
    node.step(0)
    msgs = received(agg)
    (stats,) = [m for m in msgs if isinstance(m, protocol.LabelStats)]
    assert (stats.node_id, stats.round_id, stats.model_tag) == ("n1", 1, parent_tag(provisional))
    assert stats.class_counts.tolist() == list(range(10)) and stats.response_sums.shape == (10, 8)
    assert TOPICS.labels("n1") in broker.retained  # an aggregator restart still sees them
    assert node.labels_provisional and trainer.label_calls == [1]
    assert len([m for m in msgs if isinstance(m, protocol.NodeMetrics)]) == 1
    # The same provisional model again (retained, after a reconnect): no second pass.
    agg.send(TOPICS.global_model, GlobalModel(1, provisional, ("n1",)), retain=True)
    node.step(0)
    assert trainer.label_calls == [1]
    final = noted(
        new_model(
            provisional.weights, provisional.thetas, NetworkParams(), node_id="aggregator",
            images_seen=7, seed=0, labels=np.full(8, 3),
        ),
        protocol.LABELS_FEDERATED,
    )  # fmt: skip
    agg.send(TOPICS.global_model, GlobalModel(1, final, ("n1",)), retain=True)
    node.step(0)
    installed = load_model(tmp_path / "n1" / "global.estdp")
    assert installed.labels.tolist() == [3] * 8 and not node.labels_provisional
    assert node.installed_round == 1 and node.pending_labels is None
    done = [e for e in events if e["event"] == "installed"]
    assert [(e["labels"], e["replaced"]) for e in done] == [
        ("provisional", False),
        ("federated", True),
    ]
    (again,) = [m for m in received(agg) if isinstance(m, protocol.NodeMetrics)]
    assert again.round_id == 1  # metrics reported again, for the final model
    # A provisional copy arriving after the final one changes nothing.
    agg.send(TOPICS.global_model, GlobalModel(1, provisional, ("n1",)))
    node.step(0)
    assert load_model(tmp_path / "n1" / "global.estdp").labels.tolist() == [3] * 8


def _label_stats_for(agg_side, tmp_path: Path, notes: dict[str, str]):
    """A node past round 1's announcement gets a provisional global model with ``notes``;
    returns its trainer, its events and the LabelStats it answered with."""
    broker, agg = agg_side
    trainer = Trainer()
    node, events = make_node(broker, tmp_path, trainer)
    announce(agg, 1)
    node.step(0)
    received(agg)
    provisional = with_labels_note(model(8, 0.2, "aggregator"), protocol.LABELS_PROVISIONAL, notes)
    agg.send(TOPICS.global_model, GlobalModel(1, provisional, ("n1",)), retain=True)
    node.step(0)
    (stats,) = [m for m in received(agg) if isinstance(m, protocol.LabelStats)]
    assert stats.model_tag == parent_tag(provisional)
    return trainer, events, stats


def test_a_calibration_request_sends_the_thresholds_and_stats_measured_under_them(
    agg_side, tmp_path: Path
) -> None:
    trainer, events, stats = _label_stats_for(agg_side, tmp_path, {protocol.CALIBRATE_NOTE: "100"})
    assert trainer.calibrate_calls == [(100, 1)]
    assert stats.calibration_images == 40
    np.testing.assert_array_equal(stats.thetas, np.full(8, 2.5))
    np.testing.assert_array_equal(trainer.measured_thetas, np.full(8, 2.5, np.float32))
    # What the node installed is the aggregator's model, not its own thresholds.
    np.testing.assert_array_equal(load_model(tmp_path / "n1" / "global.estdp").thetas, 0.0)
    (sent,) = [e for e in events if e["event"] == "label_stats_sent"]
    assert sent["calibration_images"] == 40


def test_without_a_calibration_request_the_thresholds_stay_off_the_wire(
    agg_side, tmp_path: Path
) -> None:
    trainer, _, stats = _label_stats_for(agg_side, tmp_path, {})
    assert stats.thetas is None and stats.calibration_images == 0
    assert not hasattr(trainer, "calibrate_calls")


def test_a_restarted_node_resends_its_label_stats_without_measuring_again(
    agg_side, tmp_path: Path
) -> None:
    broker, agg = agg_side
    trainer = Trainer()
    node, _ = make_node(broker, tmp_path, trainer)
    provisional = noted(model(8, 0.2, "aggregator"), protocol.LABELS_PROVISIONAL)
    agg.send(TOPICS.global_model, GlobalModel(1, provisional, ("n1",)), retain=True)
    node.step(0)
    assert trainer.label_calls == [1]
    node.channel.transport.abort()
    received(agg)
    del broker.retained[TOPICS.labels("n1")]  # as if the broker lost it
    again, _ = make_node(broker, tmp_path, trainer)  # same state directory
    assert again.labels_provisional and again.pending_labels is not None
    assert any(isinstance(m, protocol.LabelStats) for m in received(agg))  # re-sent on start
    again.step(0)  # the retained provisional model arrives again
    assert trainer.label_calls == [1]


def test_a_late_node_installs_the_final_model_without_measuring(agg_side, tmp_path: Path) -> None:
    broker, agg = agg_side
    trainer = Trainer()
    final = noted(model(8, 0.2, "aggregator"), protocol.LABELS_FEDERATED)
    agg.send(TOPICS.global_model, GlobalModel(1, final, ("n1",)), retain=True)
    node, _ = make_node(broker, tmp_path, trainer)
    node.step(0)
    assert node.installed_round == 1 and not node.labels_provisional
    assert getattr(trainer, "label_calls", []) == []
    assert not any(isinstance(m, protocol.LabelStats) for m in received(agg))


def test_a_trainer_without_label_stats_answers_nothing_and_the_node_keeps_serving(
    agg_side, tmp_path: Path
) -> None:
    broker, agg = agg_side

    class OldTrainer:  # the Trainer interface before federated labels
        def train(self, announcement, n_neurons, start, progress):
            return TrainOutcome(model(n_neurons), {})

        def evaluate(self, m):
            return {"accuracy": 0.5}

    node, _ = make_node(broker, tmp_path, OldTrainer())
    provisional = noted(model(8, 0.2, "aggregator"), protocol.LABELS_PROVISIONAL)
    agg.send(TOPICS.global_model, GlobalModel(1, provisional, ("n1",)), retain=True)
    node.step(0)
    assert node.installed_round == 1 and node.pending_labels is None
    msgs = received(agg)
    assert not any(isinstance(m, protocol.LabelStats) for m in msgs)
    assert any(isinstance(m, protocol.NodeMetrics) for m in msgs)  # evaluated all the same
