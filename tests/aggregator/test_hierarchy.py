"""Hierarchical aggregation over the in-memory transport: two site aggregators in upstream
mode, each with its own nodes and fleet, and a root aggregator with K = 2 sites.

Stepped by hand with a fake clock, so that the corner cases (a restart while forwarded,
a root that merges without a site) are deterministic; tests/aggregator/test_hierarchy_broker.py
runs the same daemons over a real broker.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from aggregator.daemon import AggregatorConfig, AggregatorDaemon, UpstreamConfig
from aggregator.state import AggregatorState
from edge_node.daemon import NodeConfig, NodeDaemon
from estdp import protocol
from estdp.errors import ConfigError
from estdp.model import load_model
from estdp.topics import Topics
from estdp.transport.memory import MemoryBroker
from tests.aggregator.test_daemon import Clock, channel

ROOT = "root"
SITES = {"site-a": ("a0", "a1"), "site-b": ("b0", "b1", "b2")}


class Hierarchy:
    """A root aggregator, two site aggregators and their nodes on one memory broker."""

    def __init__(
        self, tmp: Path, fake_trainer, merge_fn, rounds: int = 1, site_deadline: float = 600.0
    ) -> None:
        self.site_deadline = site_deadline
        self.broker = MemoryBroker()
        self.clock = Clock()
        self.tmp = tmp
        self.merge_fn = merge_fn
        self.rounds = rounds
        self.events: dict[str, list[dict]] = {"root": [], **{s: [] for s in SITES}}
        self.root = self.new_root()
        self.sites = {site: self.new_site(site) for site in SITES}
        self.trainers = {n: fake_trainer(n) for nodes in SITES.values() for n in nodes}
        self.nodes = {n: self.new_node(site, n) for site, nodes in SITES.items() for n in nodes}

    def new_root(self) -> AggregatorDaemon:
        config = AggregatorConfig(
            nodes=len(SITES), target=8, neurons_per_node=6, fleet=ROOT, rounds=self.rounds
        )
        root = AggregatorDaemon(
            config,
            channel(self.broker, "aggregator"),
            AggregatorState(self.tmp / "root"),
            self.merge_fn,
            events=self.events["root"].append,
            clock=self.clock,
        )
        root.start()
        return root

    def new_site(self, site: str) -> AggregatorDaemon:
        upstream = UpstreamConfig(site_id=site, fleet=ROOT)
        config = AggregatorConfig(
            nodes=len(SITES[site]),
            target=6,
            neurons_per_node=4,
            fleet=site,
            rounds=self.rounds,
            deadline_s=self.site_deadline,
            upstream=upstream,
        )
        daemon = AggregatorDaemon(
            config,
            channel(self.broker, f"aggregator-{site}"),
            AggregatorState(self.tmp / site),
            self.merge_fn,
            events=self.events[site].append,
            clock=self.clock,
            upstream=channel(self.broker, site, upstream.will()),
        )
        daemon.start()
        return daemon

    def new_node(self, site: str, nid: str) -> NodeDaemon:
        cfg = NodeConfig(nid, site, state_dir=self.tmp / nid)
        node = NodeDaemon(
            cfg, channel(self.broker, nid, cfg.will()), self.trainers[nid], clock=self.clock
        )
        node.start()
        return node

    def step(self, times: int = 8, nodes: tuple[str, ...] | None = None) -> None:
        for _ in range(times):
            for nid, node in self.nodes.items():
                if nodes is None or nid in nodes:
                    node.step(0)
            for daemon in (*self.sites.values(), self.root):
                if daemon is not None:
                    daemon.step(0)

    def kinds(self, who: str) -> list[str]:
        return [e["event"] for e in self.events[who]]


@pytest.fixture
def hierarchy(tmp_path: Path, fake_trainer, merge_fn) -> Hierarchy:
    return Hierarchy(tmp_path, fake_trainer, merge_fn)


def test_the_root_model_contains_the_site_models_and_reaches_every_node(
    hierarchy: Hierarchy, tmp_path: Path
) -> None:
    h = hierarchy
    h.step()
    assert h.root.done and all(site.done for site in h.sites.values())
    root_global = next(e for e in h.events["root"] if e["event"] == "global")
    assert root_global["contains"] == ["site-a", "site-b"]
    # The root merged the site models, each the merge of its own nodes only.
    for site, nodes in SITES.items():
        forwarded = next(e for e in h.events[site] if e["event"] == "forwarded")
        assert forwarded["contains"] == list(nodes) and forwarded["root_round"] == 1
        site_model = load_model(tmp_path / site / "rounds" / "1" / "site.estdp")
        assert site_model.n_neurons == 6
        # What the root stored as this site's update is the site model, sent as node <site>.
        stored = protocol.decode_update(
            (tmp_path / "root" / "rounds" / "1" / "updates" / f"{site}.msg").read_bytes()
        )
        assert stored.node_id == site and stored.metrics["site_nodes"] == len(nodes)
        np.testing.assert_array_equal(stored.model.weights, site_model.weights)
    expected = load_model(tmp_path / "root" / "rounds" / "1" / "global.estdp")
    for nid, node in h.nodes.items():
        assert node.installed_round == 1, nid
        np.testing.assert_array_equal(load_model(node.global_path).weights, expected.weights)
    # Each site published the root's model under its own fleet's session.
    for daemon in h.sites.values():
        message = protocol.decode_global(daemon.state.global_payload(1))
        assert message.session == daemon.state.current.announcement.session
        assert message.contains == ("site-a", "site-b")
    # Labels: each site relayed the sum of its boards' statistics, and the root pooled them
    # into exactly the labels that pooling every board's statistics gives.
    from aggregator.federated_labels import pool

    relabelled = next(e for e in h.events["root"] if e["event"] == "relabelled")
    assert relabelled["nodes"] == ["site-a", "site-b"]
    for site, nodes in SITES.items():
        relayed = next(e for e in h.events[site] if e["event"] == "labels_relayed")
        assert relayed["nodes"] == list(nodes) and relayed["root_round"] == 1
    a0 = h.trainers["a0"]  # every board measured the provisional model first
    want = pool([h.trainers[n].label_stats(expected, 1) for n in h.trainers])
    assert a0.label_calls[0][1] == protocol.LABELS_PROVISIONAL
    assert relabelled["images"] == want.images
    np.testing.assert_array_equal(expected.labels, want.labels)
    assert protocol.global_labels(expected) == protocol.LABELS_FEDERATED
    for node in h.nodes.values():
        np.testing.assert_array_equal(load_model(node.global_path).labels, want.labels)
        assert message.metrics["root_round"] == 1.0
    # To the root, a site is a node: its status is tracked like one.
    assert h.root.node_status == {"site-a": "online", "site-b": "online"}


def test_two_rounds_follow_the_root_and_continue_from_its_model(
    tmp_path: Path, fake_trainer, merge_fn
) -> None:
    h = Hierarchy(tmp_path, fake_trainer, merge_fn, rounds=2)
    h.step(16)
    assert h.root.done and all(site.done for site in h.sites.values())
    assert [e["round"] for e in h.events["root"] if e["event"] == "global"] == [1, 2]
    assert all(node.installed_round == 2 for node in h.nodes.values())
    starts = h.trainers["b1"].starts
    # Round 2 starts from round 1's root model (8 neurons), not from the site model (6).
    assert starts[0] is None and starts[1].n_neurons == 8


def test_a_site_aggregator_restarted_after_forwarding_delivers_the_root_model(
    hierarchy: Hierarchy,
) -> None:
    h = hierarchy
    # site-b's nodes hold back: the root waits for site-b while site-a has forwarded.
    h.step(nodes=SITES["site-a"])
    assert h.sites["site-a"].state.current.phase == "forwarded"
    h.sites["site-a"].upstream.transport.abort()  # killed: the broker publishes its will
    h.sites["site-a"].channel.transport.abort()
    assert h.root.node_status.get("site-a") in (None, "online")
    h.sites["site-a"] = None  # type: ignore[assignment]
    h.step(1, nodes=())
    assert h.root.node_status["site-a"] == "offline"
    h.sites["site-a"] = h.new_site("site-a")  # same state directory
    assert "resumed" in h.kinds("site-a")
    h.step()
    assert h.root.done
    assert all(node.installed_round == 1 for node in h.nodes.values())
    assert next(e for e in h.events["root"] if e["event"] == "global")["contains"] == [
        "site-a",
        "site-b",
    ]


def test_a_site_the_root_merged_without_still_delivers_the_root_model(
    tmp_path: Path, fake_trainer, merge_fn
) -> None:
    h = Hierarchy(tmp_path, fake_trainer, merge_fn)
    # The root merges at its deadline with site-a alone.
    h.root.config = AggregatorConfig(nodes=2, target=8, neurons_per_node=6, fleet=ROOT, min_nodes=1)
    h.step(nodes=SITES["site-a"])
    h.clock.now += 601
    # Merge, pass the provisional model down, relay site-a's calibration, publish the
    # calibrated model, relay site-a's label statistics, pool.
    h.step(6, nodes=SITES["site-a"])
    assert h.root.done
    relabelled = next(e for e in h.events["root"] if e["event"] == "relabelled")
    assert relabelled["nodes"] == ["site-a"]
    assert next(e for e in h.events["root"] if e["event"] == "global")["contains"] == ["site-a"]
    # site-b never forwarded, but its nodes get the root's model all the same.
    assert h.sites["site-b"].done
    assert "root model (the root merged without us)" in [
        e.get("reason") for e in h.events["site-b"]
    ]
    h.step(2)
    assert all(h.nodes[n].installed_round == 1 for n in SITES["site-b"])
    # They trained nothing: the round they were asked for was over when they looked.
    assert all(h.nodes[n].published_round == 0 for n in SITES["site-b"])


@pytest.mark.parametrize("site_deadline", [100.0, 5000.0])
def test_a_site_round_never_outlasts_its_root_round(
    tmp_path: Path, fake_trainer, merge_fn, site_deadline: float
) -> None:
    h = Hierarchy(tmp_path, fake_trainer, merge_fn, site_deadline=site_deadline)
    h.step(1, nodes=())
    root_deadline = h.root.state.current.announcement.deadline_unix  # now + 600
    for site in h.sites.values():
        deadline = site.state.current.announcement.deadline_unix
        assert deadline == min(h.clock.now + site_deadline, root_deadline)
        assert site.state.current.upstream_round == 1


def test_upstream_mode_refuses_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must differ"):
        AggregatorConfig(nodes=1, target=5, fleet="lab", upstream=UpstreamConfig("s", "lab"))
    with pytest.raises(ConfigError, match="invalid site id"):
        UpstreamConfig("a/b", "lab")
    config = AggregatorConfig(nodes=1, target=5, fleet="s", upstream=UpstreamConfig("s", "lab"))
    broker = MemoryBroker()
    with pytest.raises(ConfigError, match="upstream"):
        AggregatorDaemon(config, channel(broker, "x"), AggregatorState(tmp_path))


def test_site_state_records_the_root_round_and_survives_reload(tmp_path: Path) -> None:
    state = AggregatorState(tmp_path)
    ann = protocol.RoundAnnouncement(3, 10, 20, "mse", 123.0, 3, 2)
    state.open_round(ann, "00ff00ff00ff00ff", 7)
    state.retarget("00ff00ff00ff00ff", 8)
    again = AggregatorState(tmp_path)
    assert (again.current.upstream_session, again.current.upstream_round) == (
        "00ff00ff00ff00ff",
        8,
    )
    assert again.summary()["upstream_round"] == 8
    # A flat aggregator's state has no upstream fields at all.
    flat = AggregatorState(tmp_path / "flat")
    flat.open_round(ann)
    assert "upstream" not in (tmp_path / "flat" / "state.json").read_text()
    assert Topics("root").update("site-a") == "estdp/root/nodes/site-a/update"


def test_an_open_site_round_follows_the_root_to_a_newer_round(hierarchy: Hierarchy) -> None:
    h = hierarchy
    h.step(1, nodes=())
    root_round = h.root.state.current.announcement
    # As if the root's model of round 1 was lost and the root has announced round 2.
    newer = protocol.RoundAnnouncement(
        2, 6, 8, "mse", root_round.deadline_unix, 2, 2, True, h.clock.now, root_round.session
    )
    channel(h.broker, "fake-root").send(Topics(ROOT).round, newer, retain=True)
    h.step(1, nodes=())
    site = h.sites["site-a"]
    assert site.state.current.phase == "open" and site.state.current.upstream_round == 2
    assert "retargeted" in h.kinds("site-a")
    # Its nodes' work now goes to root round 2 (which the real root, on round 1, ignores).
    h.step(nodes=SITES["site-a"])
    sent = protocol.decode_update(site.state.forwarded_payload())
    assert sent.round_id == 2 and sent.node_id == "site-a"


def test_a_root_asking_for_a_calibration_gets_it_through_its_sites(
    hierarchy: Hierarchy, tmp_path: Path
) -> None:
    """The sites pass the request down, average their boards' thresholds weighted by
    calibration images and relay them with the total: the root's average over sites is
    the average over every board, and the calibrated model goes down for the labels."""
    h = hierarchy
    asked = h.root.config.calibrate_images
    assert asked > 0
    h.step()
    assert h.root.done and all(site.done for site in h.sites.values())
    kinds = h.kinds("root")
    assert kinds.index("calibrating") < kinds.index("calibrated") < kinds.index("relabelled")
    assert all(t.calibrate_calls == [(1, asked)] for t in h.trainers.values())
    relayed = {
        site: next(e for e in h.events[site] if e["event"] == "labels_relayed") for site in SITES
    }
    assert {s: e["calibration_images"] for s, e in relayed.items()} == {
        site: 50 * len(nodes) for site, nodes in SITES.items()
    }
    final = load_model(tmp_path / "root" / "rounds" / "1" / "global.estdp")
    assert protocol.global_labels(final) == protocol.LABELS_FEDERATED
    assert final.provenance.notes["calibrated"] == "250/2"
    # Every board measured its first statistics with its own calibrated thresholds, and
    # their mean (equal images each) is what the root published.
    calibrated = np.mean([t.thetas_measured[0] for t in h.trainers.values()], axis=0)
    np.testing.assert_allclose(final.thetas, calibrated, rtol=1e-6)
    for nid, node in h.nodes.items():
        assert len(h.trainers[nid].thetas_measured) == 2  # calibrating, then labelling
        np.testing.assert_array_equal(h.trainers[nid].thetas_measured[1], final.thetas)
        installed = load_model(node.global_path)
        np.testing.assert_array_equal(installed.thetas, final.thetas)
        assert "calibrate" not in installed.provenance.notes


@pytest.mark.parametrize("relayed", [False, True])
def test_a_site_restarted_while_calibrating_relays_its_calibration(
    hierarchy: Hierarchy, tmp_path: Path, relayed: bool
) -> None:
    h = hierarchy
    # Merged at the root and passed down: the sites collect their calibrations; one step
    # more and they have relayed them (and the root has published the calibrated model).
    h.step(4 if relayed else 3)
    site = h.sites["site-a"]
    assert site.state.current.phase == "calibrating"
    assert (site.state.relayed_labels_payload() is not None) == relayed
    site.upstream.transport.abort()
    site.channel.transport.abort()
    h.sites["site-a"] = h.new_site("site-a")  # same state directory
    assert "resumed" in h.kinds("site-a")
    h.step()
    assert h.root.done and all(s.done for s in h.sites.values())
    assert "calibrated" in h.kinds("root")
    assert (tmp_path / "site-a" / "rounds" / "1" / "calibration-relayed.msg").exists()
    final = load_model(tmp_path / "root" / "rounds" / "1" / "global.estdp")
    assert final.provenance.notes["calibrated"] == "250/2"


def test_sites_pass_a_model_without_a_calibration_request_straight_to_labelling(
    tmp_path: Path, fake_trainer, merge_fn
) -> None:
    h = Hierarchy(tmp_path, fake_trainer, merge_fn)
    h.root.config = dataclasses.replace(h.root.config, calibrate_images=0)
    h.step()
    assert h.root.done and all(site.done for site in h.sites.values())
    assert "calibrating" not in h.kinds("root")
    assert all(t.calibrate_calls == [] for t in h.trainers.values())
    assert all("calibrating" not in h.kinds(site) for site in SITES)
    final = load_model(tmp_path / "root" / "rounds" / "1" / "global.estdp")
    assert protocol.global_labels(final) == protocol.LABELS_FEDERATED
    assert "calibrated" not in final.provenance.notes
