"""The aggregator daemon with nodes over the in-memory transport: rounds and their faults."""

from __future__ import annotations

import logging
from pathlib import Path

import msgpack
import numpy as np
import pytest

from aggregator.daemon import AggregatorConfig, AggregatorDaemon, report_metrics
from aggregator.state import AggregatorState
from edge_node.daemon import NodeConfig, NodeDaemon
from estdp import protocol
from estdp.arrays import encode_array
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
        cfg.setdefault("calibrate_images", 0)  # the calibration tests turn it on
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

    def event(self, kind: str) -> dict:
        """The first event of ``kind`` (StopIteration when there is none)."""
        return next(e for e in self.events if e["event"] == kind)


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
    merged = fleet.event("global")
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
    merged = fleet.event("global")
    assert merged["contains"] == ["n0", "n1"] and "deadline" in merged["reason"]


def test_below_quorum_at_the_deadline_it_waits_then_merges_on_the_last_needed(fleet: Fleet) -> None:
    fleet.step(nodes=["n0", "n1"])
    fleet.clock.now += 601
    fleet.step(2, nodes=[])
    assert "waiting_for_quorum" in fleet.kinds() and not fleet.agg.done
    fleet.step(nodes=["n2"])
    assert "global" in fleet.kinds()  # merged; the labelling waits for n0 and n1 too
    fleet.step()
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
    merged = fleet.event("global")
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


# ---- federated labels: the labelling phase ----------------------------------------------


def expected_pool(fleet: Fleet, model, nodes: list[str]):
    """What the aggregator should pool: the fake trainers' statistics of ``model``."""
    from aggregator.federated_labels import pool

    return pool([fleet.trainers[n].label_stats(model, 1) for n in nodes])


def test_a_round_ends_with_every_node_holding_the_relabelled_global(
    tmp_path: Path, fake_trainer, merge_fn
) -> None:
    fleet = Fleet(tmp_path, fake_trainer, merge_fn, rounds=2)
    fleet.step(1)  # train, publish, merge: the provisional global model is out
    provisional = protocol.decode_global(fleet.agg.state.global_payload(1)).model
    assert protocol.global_labels(provisional) == protocol.LABELS_PROVISIONAL
    assert fleet.agg.state.current.phase == "labelling" and not fleet.agg.done
    fleet.step(6)
    assert fleet.agg.done
    kinds = fleet.kinds()
    # Round 2 is announced only once round 1's labels are in.
    first_labelled = kinds.index("relabelled")
    assert kinds.index("labelling") < first_labelled
    assert [e["round"] for e in fleet.events if e["event"] == "round_open"] == [1, 2]
    round_two = next(i for i, e in enumerate(fleet.events) if e.get("round") == 2)
    assert first_labelled < round_two
    relabelled = fleet.events[first_labelled]
    assert relabelled["nodes"] == ["n0", "n1", "n2"] and relabelled["round"] == 1
    want = expected_pool(fleet, provisional, ["n0", "n1", "n2"])
    assert relabelled["images"] == want.images
    final = protocol.decode_global(fleet.agg.state.global_payload(1))
    assert protocol.global_labels(final.model) == protocol.LABELS_FEDERATED
    np.testing.assert_array_equal(final.model.labels, want.labels)
    np.testing.assert_array_equal(final.model.weights, provisional.weights)  # same weights
    assert final.metrics["label_nodes"] == 3 and final.metrics["label_images"] == want.images
    assert final.contains == ("n0", "n1", "n2")
    # Every node installed it in place of the provisional one, and trained round 2 from it.
    for nid, trainer in fleet.trainers.items():
        assert trainer.label_calls[0] == (1, protocol.LABELS_PROVISIONAL), nid
        np.testing.assert_array_equal(trainer.starts[1].labels, want.labels)
    assert all(node.installed_round == 2 for node in fleet.nodes.values())
    assert all(not node.labels_provisional for node in fleet.nodes.values())


def test_nodes_install_the_final_model_atomically_and_report_metrics_again(
    fleet: Fleet, tmp_path: Path
) -> None:
    reports = channel(fleet.broker, "observer")
    reports.transport.subscribe(f"{TOPICS.root}/nodes/+/metrics")
    fleet.step()
    assert fleet.agg.done
    final = protocol.decode_global(fleet.agg.state.global_payload(1)).model
    for nid in fleet.nodes:
        installed = load_model(tmp_path / nid / "global.estdp")
        assert protocol.global_labels(installed) == protocol.LABELS_FEDERATED
        np.testing.assert_array_equal(installed.labels, final.labels)
    metrics = [r.message for r in reports.poll_batch(0)]
    # Once for the provisional model, once for the final one.
    assert sorted(m.node_id for m in metrics) == ["n0", "n0", "n1", "n1", "n2", "n2"]


def test_a_node_that_never_sends_stats_meets_the_label_deadline(fleet: Fleet) -> None:
    fleet.trainers["n2"].labels = False  # n2 cannot measure: it sends none
    fleet.step()
    assert not fleet.agg.done and fleet.agg.state.label_reporters() == ["n0", "n1"]
    fleet.clock.now += 121  # --label-deadline 120 by default
    fleet.step()
    assert fleet.agg.done
    relabelled = fleet.event("relabelled")
    assert relabelled["nodes"] == ["n0", "n1"]
    assert "label deadline" in relabelled["reason"] and "n2" in relabelled["reason"]
    # n2 still installs the final model (from the others' statistics).
    assert not fleet.nodes["n2"].labels_provisional and fleet.nodes["n2"].installed_round == 1


def test_no_stats_at_the_label_deadline_keeps_the_labels_and_says_so(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    for trainer in fleet.trainers.values():
        trainer.labels = False
    fleet.step()
    provisional = protocol.decode_global(fleet.agg.state.global_payload(1)).model
    fleet.clock.now += 121
    fleet.step()
    assert fleet.agg.done and "labels_kept" in fleet.kinds()
    assert "keeps the sub-models' labels" in caplog.text
    final = protocol.decode_global(fleet.agg.state.global_payload(1))
    assert protocol.global_labels(final.model) == protocol.LABELS_KEPT
    np.testing.assert_array_equal(final.model.labels, provisional.labels)
    assert final.metrics["label_nodes"] == 0
    assert all(not node.labels_provisional for node in fleet.nodes.values())


def test_an_aggregator_restart_mid_labelling_keeps_the_stats_and_the_deadline(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.step(1)  # merged: labelling
    fleet.step(1, nodes=["n0"])  # n0's statistics are stored
    assert fleet.agg.state.label_reporters() == ["n0"]
    deadline = fleet.agg.state.current.label_deadline_unix
    fleet.agg.channel.transport.abort()  # killed
    fleet.agg = None
    fleet.step(1, nodes=["n1"])  # sent while no aggregator listens (retained)
    fleet.clock.now += 60
    fleet.agg = fleet.new_aggregator()
    resumed = fleet.event("resumed")
    assert resumed["phase"] == "labelling" and resumed["labels_from"] == ["n0"]
    assert fleet.agg.state.current.label_deadline_unix == deadline  # not restarted
    fleet.step()
    assert fleet.agg.done
    relabelled = fleet.event("relabelled")
    assert relabelled["nodes"] == ["n0", "n1", "n2"]
    assert all(node.installed_round == 1 for node in fleet.nodes.values())
    assert all(not node.labels_provisional for node in fleet.nodes.values())


def test_bad_label_stats_are_rejected_and_the_daemon_keeps_serving(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aggregator.daemon")
    fleet.step(1)  # labelling, no statistics yet
    current = fleet.agg.state.current
    session, tag = current.announcement.session, current.model_tag
    counts = np.full(10, 5, np.int64)
    good = np.ones((10, 12))

    def stats(node: str, **kw) -> protocol.LabelStats:
        fields = {
            "node_id": node,
            "round_id": 1,
            "model_tag": tag,
            "class_counts": counts,
            "response_sums": good,
            "session": session,
            **kw,
        }
        return protocol.LabelStats(**fields)

    rogue = channel(fleet.broker, "rogue")
    rogue.send(TOPICS.labels("n0"), stats("n1"))  # n1's statistics on n0's topic
    rogue.send(TOPICS.labels("n5"), stats("n5", response_sums=np.ones((10, 7))))  # 7 neurons
    rogue.send(TOPICS.labels("n6"), stats("n6", model_tag="ffffffffffffffff"))  # other model
    rogue.send(TOPICS.labels("n7"), stats("n7", round_id=7))  # no such round
    rogue.send(TOPICS.labels("n8"), stats("n8", session="0123456789abcdef"))  # another run
    body = msgpack.unpackb(protocol.encode(stats("n9")), raw=False)
    body["body"]["response_sums"] = encode_array(-good)
    rogue.transport.publish(TOPICS.labels("n9"), msgpack.packb(body, use_bin_type=True))
    body["body"]["response_sums"] = encode_array(good * np.inf)
    rogue.transport.publish(TOPICS.labels("n10"), msgpack.packb(body, use_bin_type=True))
    rogue.transport.publish(TOPICS.labels("n11"), b"\x93garbage")
    fleet.step(1, nodes=[])
    rejected = [e["reason"] for e in fleet.events if e["event"] == "rejected"]
    assert any("arrived on" in r for r in rejected)
    assert any("(10, 7)" in r for r in rejected)
    assert any("ffffffffffffffff" in r for r in rejected)
    assert any("round 7, which is not being labelled" in r for r in rejected)
    assert "another session" in caplog.text
    assert "negative sum" in caplog.text and "NaN or inf" in caplog.text
    assert "not valid msgpack" in caplog.text
    assert fleet.agg.state.label_reporters() == []  # none of them counts
    fleet.step()
    assert fleet.agg.done  # still serving
    assert fleet.event("relabelled")["nodes"] == ["n0", "n1", "n2"]


def test_labels_kept_skips_the_labelling_phase(tmp_path: Path, fake_trainer, merge_fn) -> None:
    fleet = Fleet(tmp_path, fake_trainer, merge_fn, labels="kept")
    fleet.step(1)
    assert fleet.agg.done and fleet.agg.state.current.phase == "merged"
    assert "labelling" not in fleet.kinds()
    assert fleet.event("global")["labels"] == "kept"
    fleet.step()
    assert all(t.label_calls == [] for t in fleet.trainers.values())
    installed = load_model(tmp_path / "n0" / "global.estdp")
    assert protocol.global_labels(installed) == protocol.LABELS_KEPT
    with pytest.raises(ConfigError, match="--labels"):
        AggregatorConfig(nodes=2, target=5, labels="guessed")
    with pytest.raises(ConfigError, match="--label-deadline"):
        AggregatorConfig(nodes=2, target=5, label_deadline_s=0)


def test_labelling_state_survives_reload(tmp_path: Path) -> None:
    state = AggregatorState(tmp_path)
    ann = protocol.RoundAnnouncement(2, 10, 20, "mse", 123.0, 3, 2, session="00ff")
    state.open_round(ann)
    from estdp.model import new_model
    from estdp.params import NetworkParams

    model = new_model(
        np.ones((784, 4), np.float32), np.zeros(4, np.float32), NetworkParams(),
        node_id="aggregator", images_seen=1, seed=0,
    )  # fmt: skip
    payload = protocol.encode(protocol.GlobalModel(2, model, ("n1",), session="00ff"))
    state.mark_labelling(payload, model, ("n1",), "0123456789abcdef", 456.0)
    stats = protocol.LabelStats(
        "n1", 2, "0123456789abcdef", np.ones(10, np.int64), np.ones((10, 4)), "00ff"
    )
    assert state.add_label_stats("n1", protocol.encode(stats))
    assert not state.add_label_stats("n1", b"again")  # the first one counts
    again = AggregatorState(tmp_path)
    cur = again.current
    assert (cur.phase, cur.model_tag, cur.label_deadline_unix) == (
        "labelling",
        "0123456789abcdef",
        456.0,
    )
    assert again.label_reporters() == ["n1"] and again.summary()["labels_from"] == ["n1"]
    np.testing.assert_array_equal(again.load_label_stats()["n1"].response_sums, np.ones((10, 4)))


# ---- threshold calibration: the calibrating phase before the labelling ------------------


def expected_thetas(fleet: Fleet, merged: np.ndarray, nodes: list[str]) -> np.ndarray:
    """The image-weighted average of what the fake trainers of ``nodes`` calibrate."""
    from aggregator.calibration import requested

    total, images = 0.0, 0
    for nid in nodes:
        fresh = type(fleet.trainers[nid])(nid)
        fresh.shard = fleet.trainers[nid].shard
        provisional = protocol.decode_global(fleet.provisional_payload).model
        assert provisional.provenance.notes["calibrate"] == "40"
        thetas, used = fresh.calibrate(requested(provisional, 40), 40, 1)
        np.testing.assert_array_equal(provisional.thetas, merged)
        total, images = total + used * thetas, images + used
    return total / images


def test_a_calibrated_round_averages_the_nodes_thresholds_then_labels_on_them(
    tmp_path: Path, fake_trainer, merge_fn
) -> None:
    fleet = Fleet(tmp_path, fake_trainer, merge_fn, calibrate_images=40)
    fleet.trainers["n1"].shard = 10  # n1 has 10 images to calibrate on, the others 40
    fleet.step(1)  # merged: the provisional model asks for a calibration
    current = fleet.agg.state.current
    assert current.phase == "calibrating" and not fleet.agg.done
    fleet.provisional_payload = fleet.agg.state.global_payload(1)
    first = protocol.decode_global(fleet.provisional_payload).model
    assert protocol.requested_calibration(first) == 40
    deadline = current.label_deadline_unix
    fleet.step()
    assert fleet.agg.done
    kinds = fleet.kinds()
    assert kinds.index("calibrating") < kinds.index("calibrated") < kinds.index("labelling")
    assert kinds.index("labelling") < kinds.index("relabelled")
    calibrated_event = fleet.event("calibrated")
    assert calibrated_event["nodes"] == ["n0", "n1", "n2"] and calibrated_event["images"] == 90
    final = protocol.decode_global(fleet.agg.state.global_payload(1))
    want = expected_thetas(fleet, first.thetas, ["n0", "n1", "n2"])
    np.testing.assert_allclose(final.model.thetas, want, rtol=1e-6)
    assert not np.allclose(final.model.thetas, first.thetas)  # they did move
    np.testing.assert_array_equal(final.model.weights, first.weights)
    notes = final.model.provenance.notes
    assert notes["calibrated"] == "90/3" and "calibrate" not in notes
    assert protocol.global_labels(final.model) == protocol.LABELS_FEDERATED
    assert final.metrics["calibration_images"] == 90 and final.metrics["calibration_nodes"] == 3
    assert fleet.agg.state.current.label_deadline_unix >= deadline  # its own deadline
    for nid, trainer in fleet.trainers.items():
        assert trainer.calibrate_calls == [(1, 40)], nid
        # Second answer: plain statistics on the model with the averaged thresholds.
        np.testing.assert_array_equal(trainer.thetas_measured[-1], final.model.thetas)
        installed = load_model(tmp_path / nid / "global.estdp")
        np.testing.assert_array_equal(installed.thetas, final.model.thetas)
    assert all(not node.labels_provisional for node in fleet.nodes.values())


def test_only_a_merge_that_pruned_is_calibrated_not_an_average(
    tmp_path: Path, fake_trainer, merge_fn
) -> None:
    fleet = Fleet(tmp_path, fake_trainer, merge_fn, calibrate_images=40, rounds=2)
    for trainer in fleet.trainers.values():
        trainer.lineage = True  # round 2's updates continue round 1's model: averaged
    fleet.step(12)
    assert fleet.agg.done
    phases = [(e["event"], e["round"]) for e in fleet.events if e["event"] in PHASE_EVENTS]
    assert phases == [("calibrating", 1), ("calibrated", 1), ("labelling", 1), ("labelling", 2)]
    for trainer in fleet.trainers.values():
        assert trainer.calibrate_calls == [(1, 40)]
    final = protocol.decode_global(fleet.agg.state.global_payload(2)).model
    assert "calibrated" not in final.provenance.notes and "calibrate" not in final.provenance.notes


PHASE_EVENTS = ("calibrating", "calibrated", "labelling")


def test_a_node_that_misses_the_calibration_deadline_is_left_out_of_the_average(
    tmp_path: Path, fake_trainer, merge_fn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aggregator.daemon")
    fleet = Fleet(tmp_path, fake_trainer, merge_fn, calibrate_images=40)
    fleet.step(1)
    fleet.provisional_payload = fleet.agg.state.global_payload(1)
    first = protocol.decode_global(fleet.provisional_payload).model
    fleet.step(3, nodes=["n0", "n1"])  # n2 is slow: it has not answered by the deadline
    assert fleet.agg.state.current.phase == "calibrating"
    fleet.clock.now += 121
    fleet.step(1, nodes=[])
    assert fleet.agg.state.current.phase == "labelling"
    calibrated_event = fleet.event("calibrated")
    assert calibrated_event["nodes"] == ["n0", "n1"] and "n2" in calibrated_event["reason"]
    fleet.step()  # n2 answers the calibration late (ignored), then labels the new model
    assert fleet.agg.done
    assert "ignoring the calibration of round 1 from n2" in caplog.text
    final = protocol.decode_global(fleet.agg.state.global_payload(1)).model
    np.testing.assert_allclose(
        final.thetas, expected_thetas(fleet, first.thetas, ["n0", "n1"]), rtol=1e-6
    )
    relabelled = fleet.event("relabelled")
    assert relabelled["nodes"] == ["n0", "n1", "n2"]  # n2's plain statistics count
    assert final.provenance.notes["calibrated"] == "80/2"


def test_nodes_that_run_no_calibration_pass_still_get_federated_labels(
    tmp_path: Path, fake_trainer, merge_fn, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = Fleet(tmp_path, fake_trainer, merge_fn, calibrate_images=40)
    for trainer in fleet.trainers.values():
        trainer.calibrate = None  # a node of before the calibration: plain statistics
    fleet.step(1)
    first = protocol.decode_global(fleet.agg.state.global_payload(1)).model
    fleet.step()
    assert fleet.agg.done and "calibrated" not in fleet.kinds()
    assert "no node calibrated the thresholds" in caplog.text
    final = protocol.decode_global(fleet.agg.state.global_payload(1)).model
    assert protocol.global_labels(final) == protocol.LABELS_FEDERATED
    np.testing.assert_array_equal(final.thetas, first.thetas)
    assert "calibrate" not in final.provenance.notes
    assert "calibrated" not in final.provenance.notes
    relabelled = fleet.event("relabelled")
    assert relabelled["nodes"] == ["n0", "n1", "n2"]


def test_bad_calibrations_are_rejected_and_the_round_completes(
    tmp_path: Path, fake_trainer, merge_fn, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = Fleet(tmp_path, fake_trainer, merge_fn, calibrate_images=40)
    fleet.step(1)
    current = fleet.agg.state.current
    counts, sums = np.full(10, 5, np.int64), np.ones((10, 12))

    def stats(node: str, thetas, images: int = 40) -> protocol.LabelStats:
        return protocol.LabelStats(
            node, 1, current.model_tag, counts, sums, current.announcement.session,
            thetas=np.asarray(thetas, np.float64), calibration_images=images,
        )  # fmt: skip

    rogue = channel(fleet.broker, "rogue")
    rogue.send(TOPICS.labels("n5"), stats("n5", np.r_[np.ones(11), -3.0]))
    rogue.send(TOPICS.labels("n6"), stats("n6", np.ones(12), images=0))
    body = msgpack.unpackb(protocol.encode(stats("n7", np.ones(12))), raw=False)
    body["body"]["thetas"] = encode_array(np.r_[np.ones(11), np.nan])
    rogue.transport.publish(TOPICS.labels("n7"), msgpack.packb(body, use_bin_type=True))
    body["body"]["thetas"] = encode_array(np.ones(7))  # 7 thresholds for 12 neurons
    rogue.transport.publish(TOPICS.labels("n8"), msgpack.packb(body, use_bin_type=True))
    fleet.step(1, nodes=[])
    rejected = [e["reason"] for e in fleet.events if e["event"] == "rejected"]
    assert any("calibration from n5" in r and "negative" in r for r in rejected)
    assert any("calibration from n6: 0 calibration images" in r for r in rejected)
    assert "NaN or inf" in caplog.text and "(7,)" in caplog.text  # refused when decoded
    assert fleet.agg.state.label_reporters() == []
    fleet.step()
    assert fleet.agg.done
    assert fleet.event("calibrated")["nodes"] == ["n0", "n1", "n2"]


def test_an_aggregator_restart_mid_calibration_keeps_the_thresholds_and_the_deadline(
    tmp_path: Path, fake_trainer, merge_fn
) -> None:
    fleet = Fleet(tmp_path, fake_trainer, merge_fn, calibrate_images=40)
    fleet.step(1)
    fleet.step(1, nodes=["n0"])
    assert fleet.agg.state.label_reporters() == ["n0"]
    deadline = fleet.agg.state.current.label_deadline_unix
    fleet.agg.channel.transport.abort()
    fleet.agg = None
    fleet.step(1, nodes=["n1"])  # retained while no aggregator listens
    fleet.clock.now += 60
    fleet.agg = fleet.new_aggregator()
    resumed = fleet.event("resumed")
    assert resumed["phase"] == "calibrating" and resumed["labels_from"] == ["n0"]
    assert fleet.agg.state.current.label_deadline_unix == deadline
    fleet.step()
    assert fleet.agg.done
    assert fleet.event("calibrated")["nodes"] == ["n0", "n1", "n2"]
    assert all(t.calibrate_calls == [(1, 40)] for t in fleet.trainers.values())  # once each


def test_negative_calibrate_images_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--calibrate-images"):
        AggregatorConfig(nodes=2, target=5, calibrate_images=-1)
