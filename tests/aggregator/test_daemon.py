"""The aggregator daemon with nodes over the in-memory transport: rounds and their faults."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.daemon import AggregatorConfig, AggregatorDaemon, report_metrics
from aggregator.state import AggregatorState
from edge_node.daemon import NodeConfig, NodeDaemon
from estdp import protocol
from estdp.errors import ConfigError
from estdp.model import load_model
from estdp.topics import Topics
from estdp.transport.base import TransportConfig
from estdp.transport.channel import Channel
from estdp.transport.memory import MemoryBroker, MemoryTransport

FLEET = "mem"
TOPICS = Topics(FLEET)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def channel(broker: MemoryBroker, cid: str, will=None) -> Channel:
    t = MemoryTransport(broker, TransportConfig(client_id=cid, will=will))
    t.connect()
    return Channel(t)


class Fleet:
    """An aggregator and nodes on one memory broker, stepped in turn."""

    def __init__(self, tmp: Path, fake_trainer, merge_fn, n_nodes: int = 3, **cfg) -> None:
        self.broker = MemoryBroker()
        self.clock = Clock()
        self.tmp = tmp
        self.merge_fn = merge_fn
        self.config = AggregatorConfig(
            nodes=n_nodes, target=12, neurons_per_node=5, fleet=FLEET, **cfg
        )
        self.events: list[dict] = []
        self.agg = self.new_aggregator()
        self.trainers = {f"n{i}": fake_trainer(f"n{i}") for i in range(n_nodes)}
        self.nodes = {nid: self.new_node(nid) for nid in self.trainers}

    def new_aggregator(self) -> AggregatorDaemon:
        agg = AggregatorDaemon(
            self.config,
            channel(self.broker, "aggregator"),
            AggregatorState(self.tmp / "agg"),
            self.merge_fn,
            events=self.events.append,
            clock=self.clock,
        )
        agg.start()
        return agg

    def new_node(self, nid: str) -> NodeDaemon:
        cfg = NodeConfig(nid, FLEET, state_dir=self.tmp / nid)
        node = NodeDaemon(
            cfg, channel(self.broker, nid, cfg.will()), self.trainers[nid], clock=self.clock
        )
        node.start()
        return node

    def step(self, times: int = 4, nodes: list[str] | None = None) -> None:
        for _ in range(times):
            for nid, node in self.nodes.items():
                if nodes is None or nid in nodes:
                    node.step(0)
            if self.agg is not None:
                self.agg.step(0)

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]


@pytest.fixture
def fleet(tmp_path: Path, fake_trainer, merge_fn) -> Fleet:
    return Fleet(tmp_path, fake_trainer, merge_fn)


def test_a_full_round_ends_with_every_node_holding_the_same_global_model(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.step()
    assert fleet.agg.done and "global" in fleet.kinds()
    globals_ = [load_model(tmp_path / nid / "global.estdp") for nid in fleet.nodes]
    for g in globals_[1:]:
        np.testing.assert_array_equal(g.weights, globals_[0].weights)
    assert globals_[0].n_neurons == 12
    merged = next(e for e in fleet.events if e["event"] == "global")
    assert merged["contains"] == ["n0", "n1", "n2"] and merged["reason"] == "all nodes reported"
    state = AggregatorState(tmp_path / "agg")
    assert state.current.phase == "merged" and state.current.contains == ("n0", "n1", "n2")
    assert load_model(state.round_dir(1) / "global.estdp").n_neurons == 12
    assert all(node.installed_round == 1 for node in fleet.nodes.values())


def test_the_deadline_merges_the_nodes_that_reported(fleet: Fleet) -> None:
    fleet.config = AggregatorConfig(
        nodes=3, target=12, neurons_per_node=5, fleet=FLEET, min_nodes=2
    )
    fleet.agg.config = fleet.config
    fleet.step(nodes=["n0", "n1"])
    assert not fleet.agg.done
    fleet.clock.now += 601
    fleet.step(1, nodes=[])
    merged = next(e for e in fleet.events if e["event"] == "global")
    assert merged["contains"] == ["n0", "n1"] and "deadline" in merged["reason"]


def test_below_quorum_at_the_deadline_it_waits_then_merges_on_the_last_needed(fleet: Fleet) -> None:
    fleet.step(nodes=["n0", "n1"])
    fleet.clock.now += 601
    fleet.step(2, nodes=[])
    assert "waiting_for_quorum" in fleet.kinds() and not fleet.agg.done
    fleet.step(nodes=["n2"])
    assert fleet.agg.done


def test_an_aggregator_restart_loses_no_update(fleet: Fleet) -> None:
    fleet.step(nodes=["n0", "n1"])
    assert fleet.agg.state.received() == ["n0", "n1"]
    fleet.agg.channel.transport.abort()  # killed
    fleet.agg = None
    fleet.step(nodes=["n2"])  # n2's update arrives while no aggregator listens (retained)
    fleet.agg = fleet.new_aggregator()  # restarted on the same state directory
    fleet.step()
    assert "resumed" in fleet.kinds() and fleet.agg.done
    merged = next(e for e in fleet.events if e["event"] == "global")
    assert merged["contains"] == ["n0", "n1", "n2"] and merged["round"] == 1


def test_rounds_continue_from_the_global_model(tmp_path: Path, fake_trainer, merge_fn) -> None:
    fleet = Fleet(tmp_path, fake_trainer, merge_fn, rounds=2)
    fleet.step(6)
    assert fleet.agg.done
    assert [e["round"] for e in fleet.events if e["event"] == "global"] == [1, 2]
    trainer = fleet.trainers["n0"]
    assert trainer.starts[0] is None and trainer.starts[1].n_neurons == 12
    assert all(node.installed_round == 2 for node in fleet.nodes.values())


def test_spoofed_foreign_and_incompatible_updates_are_rejected(fleet: Fleet, caplog) -> None:
    fleet.step(1, nodes=["n0"])
    rogue = channel(fleet.broker, "rogue")
    good = protocol.decode_update(fleet.nodes["n0"].pending_update)
    spoof = protocol.SubModelUpdate("n1", 1, good.model, 50, session=good.session)
    rogue.send(TOPICS.update("n0"), spoof)  # n1's update on n0's topic
    other_params = good.model.__class__(
        **{**good.model.__dict__, "params": good.model.params.replace(tc_v=50.0)}
    )
    rogue.send(
        TOPICS.update("n5"),
        protocol.SubModelUpdate("n5", 1, other_params, 50, session=good.session),
    )
    rogue.send(
        TOPICS.update("n6"), protocol.SubModelUpdate("n6", 7, good.model, 50, session=good.session)
    )  # no such round
    rogue.transport.publish(TOPICS.update("n7"), b"\x93garbage", retain=True)
    fleet.step(1, nodes=[])
    rejected = [e["reason"] for e in fleet.events if e["event"] == "rejected"]
    assert any("arrived on" in r for r in rejected) and any(
        "parameters differ" in r for r in rejected
    )
    assert "not valid msgpack" in caplog.text
    assert fleet.agg.state.received() == ["n0"]
    fleet.step()
    assert fleet.agg.done  # still serving


def test_state_survives_reload_and_refuses_garbage(tmp_path: Path) -> None:
    state = AggregatorState(tmp_path)
    assert state.current is None and state.last_round_id == 0
    ann = protocol.RoundAnnouncement(4, 10, 20, "mse", 123.0, 3, 2)
    state.open_round(ann)
    assert state.add_update("n1", b"not a message") and not state.add_update("n1", b"again")
    again = AggregatorState(tmp_path)
    assert again.current.announcement == ann and again.received() == ["n1"]
    assert again.load_updates() == {}  # the damaged file is reported and skipped
    (tmp_path / "state.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot read"):
        AggregatorState(tmp_path)


def test_config_and_report_helpers() -> None:
    with pytest.raises(ConfigError):
        AggregatorConfig(nodes=2, target=5, min_nodes=3)
    with pytest.raises(ConfigError):
        AggregatorConfig(nodes=2, target=5, deadline_s=0)
    assert report_metrics({"a": 1, "b": "x", "c": float("nan"), "d": True}) == {"a": 1.0}
    nested = {"pairs": 6, "seconds": {"similarity": 0.5, "removal": 0.25}}
    assert report_metrics(nested) == {
        "pairs": 6.0,
        "seconds_similarity": 0.5,
        "seconds_removal": 0.25,
    }


def test_updates_retained_from_an_earlier_session_are_not_counted(fleet: Fleet) -> None:
    fleet.step(1, nodes=["n0"])
    good = protocol.decode_update(fleet.nodes["n0"].pending_update)
    old_run = protocol.SubModelUpdate("n1", 1, good.model, 50, session="0123456789abcdef")
    channel(fleet.broker, "n1-old").send(TOPICS.update("n1"), old_run, retain=True)
    fleet.step(1, nodes=[])
    assert fleet.agg.state.received() == ["n0"]  # round 1, but of another run
    fleet.step()
    assert fleet.agg.done and fleet.agg.state.received() == ["n0", "n1", "n2"]


def test_the_configured_removal_rule_reaches_the_merge(
    tmp_path: Path, fake_trainer, merge_fn
) -> None:
    seen: list[dict] = []

    def recording_merge(models, target, metric, **kw):
        seen.append(kw)
        return merge_fn(models, target, metric, **kw)

    fleet = Fleet(tmp_path, fake_trainer, recording_merge, rule="theta")
    fleet.step()
    assert fleet.agg.done and seen and seen[0]["rule"] == "theta"
    with pytest.raises(ConfigError, match="unknown removal rule"):
        AggregatorConfig(nodes=2, target=5, rule="random")
