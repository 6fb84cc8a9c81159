"""Rounds over a real MQTT broker: aggregator and nodes as threads, with faults.

The nodes train with a fast fake (tests/aggregator/conftest.py) so that these tests are
about the distributed system; tests/estdp/test_fleet_cli.py runs the real engine.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from aggregator.daemon import AggregatorConfig, AggregatorDaemon
from aggregator.state import AggregatorState
from edge_node.daemon import NodeConfig, NodeDaemon
from estdp.broker import EmbeddedBroker
from estdp.model import load_model
from estdp.protocol import Limits
from estdp.topics import Topics
from estdp.transport import TransportConfig, mqtt_transport, parse_broker_url
from estdp.transport.channel import Channel

pytestmark = pytest.mark.broker


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Harness:
    """Daemons in threads on one broker, each with its own paho client."""

    def __init__(self, url: str, tmp: Path, fake_trainer, merge_fn) -> None:
        self.url = url
        self.tmp = tmp
        self.fleet = f"t{uuid.uuid4().hex[:10]}"
        self.fake_trainer = fake_trainer
        self.merge_fn = merge_fn
        self.threads: list[tuple[threading.Thread, threading.Event, Channel]] = []
        self.events: list[dict] = []

    def channel(self, cid: str, will=None, limits: Limits | None = None) -> Channel:
        fields = parse_broker_url(self.url)
        cfg = TransportConfig(
            client_id=f"{self.fleet}-{cid}",
            will=will,
            reconnect_min_s=0.1,
            reconnect_max_s=0.5,
            **fields,
        )  # type: ignore[arg-type]
        transport = mqtt_transport(cfg)
        transport.connect(timeout=10)
        return Channel(transport, limits=limits or Limits())

    def _spawn(
        self, target: Callable[[threading.Event], object], stop: threading.Event, channel: Channel
    ) -> None:
        thread = threading.Thread(target=target, args=(stop,), daemon=True)
        thread.start()
        self.threads.append((thread, stop, channel))

    def aggregator(self, limits: Limits | None = None, **cfg) -> AggregatorDaemon:
        config = AggregatorConfig(
            **{"fleet": self.fleet, "neurons_per_node": 5, "target": 12, **cfg}
        )
        agg = AggregatorDaemon(
            config,
            self.channel("aggregator", limits=limits),
            AggregatorState(self.tmp / "agg"),
            self.merge_fn,
            events=self.events.append,
        )
        self._spawn(lambda stop: agg.run(stop, poll_s=0.05), threading.Event(), agg.channel)
        return agg

    def node(self, nid: str, seconds: float = 0.0) -> NodeDaemon:
        cfg = NodeConfig(nid, self.fleet, state_dir=self.tmp / nid)
        node = NodeDaemon(cfg, self.channel(nid, cfg.will()), self.fake_trainer(nid, seconds))
        self._spawn(lambda stop: node.run(poll_s=0.05), node.stop, node.channel)
        return node

    def kill(self, daemon: AggregatorDaemon | NodeDaemon) -> None:
        """Stop the thread, then drop the connection without a goodbye, as a crash would
        (the broker publishes the will)."""
        for thread, stop, channel in self.threads:
            if channel is daemon.channel:
                stop.set()
                thread.join(5)
                channel.transport.abort()  # type: ignore[attr-defined]

    def close(self) -> None:
        for thread, stop, channel in self.threads:
            stop.set()
            thread.join(10)
            channel.transport.close()
        # Leave nothing retained on a shared broker.
        cleaner = self.channel("cleaner")
        topics = Topics(self.fleet)
        cleaner.transport.subscribe(f"{topics.root}/#")
        time.sleep(0.2)
        for msg in iter(lambda: cleaner.transport.get(0.05), None):
            if msg.retain and msg.payload:
                cleaner.transport.publish(msg.topic, b"", retain=True)
        cleaner.transport.close()

    def globals_equal(self, nodes: list[NodeDaemon]) -> np.ndarray:
        weights = [load_model(n.global_path).weights for n in nodes]  # type: ignore[arg-type]
        for w in weights[1:]:
            np.testing.assert_array_equal(w, weights[0])
        return weights[0]

    def merged(self) -> dict:
        # Nodes may install the global model before the aggregator has logged it.
        wait_for(lambda: any(e["event"] == "global" for e in self.events), 5, "the merge event")
        return next(e for e in self.events if e["event"] == "global")


@pytest.fixture
def harness_for(tmp_path: Path, fake_trainer, merge_fn):
    made: list[Harness] = []

    def make(url: str) -> Harness:
        h = Harness(url, tmp_path, fake_trainer, merge_fn)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def test_full_round_three_nodes_all_hold_the_same_global_model(
    broker_url: str, harness_for
) -> None:
    h = harness_for(broker_url)
    agg = h.aggregator(nodes=3)
    nodes = [h.node(f"n{i}") for i in range(3)]
    wait_for(
        lambda: all(n.installed_round == 1 for n in nodes), 15, "every node to install round 1"
    )
    assert h.globals_equal(nodes).shape == (784, 12)
    assert h.merged()["contains"] == ["n0", "n1", "n2"]
    wait_for(lambda: agg.done, 5, "the aggregator to finish")


def test_a_round_with_the_real_merge(broker_url: str, harness_for) -> None:
    pytest.importorskip("aggregator.merge")
    from aggregator.daemon import default_merge

    h = harness_for(broker_url)
    h.merge_fn = default_merge
    h.aggregator(nodes=3, metric="cosine")
    nodes = [h.node(f"n{i}") for i in range(3)]
    wait_for(
        lambda: all(n.installed_round == 1 for n in nodes), 15, "every node to install round 1"
    )
    assert h.globals_equal(nodes).shape == (784, 12)
    merged = h.merged()
    assert merged["neurons"] == 12 and merged["contains"] == ["n0", "n1", "n2"]
    assert load_model(nodes[0].global_path).provenance.round == 1


def test_a_node_dies_mid_round_and_the_deadline_merges_the_rest(
    broker_url: str, harness_for
) -> None:
    h = harness_for(broker_url)
    agg = h.aggregator(nodes=3, min_nodes=2, deadline_s=2.0)
    fast = [h.node("n0"), h.node("n1")]
    doomed = h.node("n2", seconds=5.0)
    wait_for(lambda: agg.node_status.get("n2") == "training", 10, "n2 to start training")
    h.kill(doomed)
    wait_for(lambda: agg.node_status.get("n2") == "offline", 10, "n2's last will")
    wait_for(lambda: all(n.installed_round == 1 for n in fast), 15, "the deadline merge")
    assert h.merged()["contains"] == ["n0", "n1"] and "deadline" in h.merged()["reason"]
    h.globals_equal(fast)


def test_the_aggregator_is_killed_and_restarted_mid_round_and_loses_no_update(
    broker_url: str, harness_for
) -> None:
    h = harness_for(broker_url)
    agg = h.aggregator(nodes=3)
    nodes = [h.node("n0"), h.node("n1"), h.node("n2", seconds=1.0)]
    wait_for(lambda: len(agg.state.received()) == 2, 10, "two updates")
    h.kill(agg)
    wait_for(
        lambda: nodes[2].published_round == 1, 10, "n2's update, sent while no aggregator runs"
    )
    agg2 = h.aggregator(nodes=3)
    wait_for(lambda: all(n.installed_round == 1 for n in nodes), 15, "the resumed round")
    assert any(e["event"] == "resumed" for e in h.events)
    assert h.merged()["contains"] == ["n0", "n1", "n2"] and h.merged()["round"] == 1
    h.globals_equal(nodes)
    wait_for(lambda: agg2.done, 5, "the restarted aggregator to finish")


def test_a_broker_restart_mid_round_and_clients_reconnect(
    private_broker: EmbeddedBroker, harness_for
) -> None:
    h = harness_for(private_broker.url)
    agg = h.aggregator(nodes=3)
    nodes = [h.node("n0"), h.node("n1", seconds=1.5), h.node("n2", seconds=1.5)]
    wait_for(lambda: agg.state.received() == ["n0"], 10, "n0's update")
    private_broker.restart(down_s=0.3)  # loses every retained message: no persistence
    wait_for(lambda: all(n.installed_round == 1 for n in nodes), 20, "the round after the restart")
    assert h.merged()["contains"] == ["n0", "n1", "n2"]
    assert agg.channel.transport.connects >= 2
    h.globals_equal(nodes)


def test_garbage_and_oversized_payloads_are_rejected_and_the_round_completes(
    broker_url: str, harness_for, caplog: pytest.LogCaptureFixture
) -> None:
    h = harness_for(broker_url)
    agg = h.aggregator(nodes=2, limits=Limits(max_message_bytes=200_000))
    topics = Topics(h.fleet)
    rogue = h.channel("rogue")
    rogue.transport.publish(topics.update("n0"), b"\xde\xad\xbe\xef" * 10, wait=True)
    rogue.transport.publish(topics.update("n1"), bytes(300_000), wait=True)
    nodes = [h.node("n0"), h.node("n1")]
    wait_for(lambda: all(n.installed_round == 1 for n in nodes), 15, "the round")
    assert agg.channel.rejected >= 2
    assert "300000 bytes exceed the limit" in caplog.text and "not valid msgpack" in caplog.text
    rogue.transport.close()


def _labels_from_the_shards(final, images, labels, shards, backend):
    """What assign_labels gives on the spike counts of ``final`` over all the nodes' shards
    together, each node's label pass seeded as LocalTrainer seeds it in round 1 (node seed
    10 i, plus round, plus 1)."""
    from edge_node.labels import assign_labels
    from edge_node.workflow import spike_counts

    counts = np.concatenate(
        [
            spike_counts(
                final.weights, final.thetas, images[part], final.params, backend,
                seed=10 * i + 1 + 1,
            )
            for i, part in enumerate(shards.values())
        ]
    )  # fmt: skip
    return assign_labels(counts, np.concatenate([labels[part] for part in shards.values()]))


def test_federated_labels_with_the_real_engine_equal_labels_from_all_the_images(
    broker_url: str, harness_for, mnist_dir: Path
) -> None:
    """Three nodes train real (tiny) sub-models on 100 MNIST images each, the real merge
    prunes them, and the labelling phase re-assigns the global model's labels: every node
    ends with the same relabelled model, whose labels are what assign_labels gives on the
    three nodes' spike counts together (each node simulated with its own label-pass seed)."""
    from aggregator.daemon import default_merge
    from edge_node.daemon import LocalTrainer
    from estdp import protocol
    from estdp.backend import resolve_backend
    from estdp.datasets import load_mnist
    from estdp.params import BINDSNET

    backend = resolve_backend("auto")
    images, labels = load_mnist("train", mnist_dir, limit=300)
    h = harness_for(broker_url)
    h.merge_fn = default_merge
    agg = h.aggregator(nodes=3, target=15, neurons_per_node=8, labels="federated")
    shards = {f"n{i}": slice(100 * i, 100 * (i + 1)) for i in range(3)}
    nodes = []
    for i, (nid, part) in enumerate(shards.items()):
        trainer = LocalTrainer(
            images[part], labels[part], images[:0], labels[:0], BINDSNET, backend,
            node_id=nid, seed=10 * i,
        )  # fmt: skip
        cfg = NodeConfig(nid, h.fleet, state_dir=h.tmp / nid)
        node = NodeDaemon(cfg, h.channel(nid, cfg.will()), trainer)
        h._spawn(lambda stop, node=node: node.run(poll_s=0.05), node.stop, node.channel)
        nodes.append(node)
    wait_for(
        lambda: all(n.installed_round == 1 and not n.labels_provisional for n in nodes),
        60,
        "every node to install the relabelled global model",
    )
    wait_for(lambda: agg.done, 5, "the aggregator to finish")
    final = load_model(nodes[0].global_path)  # type: ignore[arg-type]
    assert protocol.global_labels(final) == protocol.LABELS_FEDERATED
    for node in nodes[1:]:
        again = load_model(node.global_path)  # type: ignore[arg-type]
        np.testing.assert_array_equal(again.labels, final.labels)
        np.testing.assert_array_equal(again.weights, final.weights)
    want_labels, want_rates = _labels_from_the_shards(final, images, labels, shards, backend)
    np.testing.assert_array_equal(final.labels, want_labels)
    np.testing.assert_allclose(final.class_rates, want_rates, rtol=1e-6)
    relabelled = next(e for e in h.events if e["event"] == "relabelled")
    assert relabelled["nodes"] == ["n0", "n1", "n2"] and relabelled["images"] == 300


def test_calibrated_thresholds_with_the_real_engine_are_the_nodes_weighted_average(
    broker_url: str, harness_for, mnist_dir: Path
) -> None:
    """Three nodes of unequal shards (60, 100, 140 images) train real sub-models, the real
    merge prunes them, each node runs the thresholds-only pass over up to 80 images, and
    the global model every node ends with has the image-weighted average of their
    thresholds (60, 80 and 80 images), its weights unchanged, and labels from statistics
    measured with those thresholds."""
    from aggregator.daemon import default_merge
    from edge_node.daemon import LocalTrainer
    from estdp import protocol
    from estdp.backend import resolve_backend
    from estdp.datasets import load_mnist
    from estdp.params import BINDSNET

    backend = resolve_backend("auto")
    images, labels = load_mnist("train", mnist_dir, limit=300)
    h = harness_for(broker_url)
    h.merge_fn = default_merge
    agg = h.aggregator(nodes=3, target=15, neurons_per_node=8, calibrate_images=80)
    shards = {"n0": slice(0, 60), "n1": slice(60, 160), "n2": slice(160, 300)}
    trainers, nodes = {}, []
    for i, (nid, part) in enumerate(shards.items()):
        trainers[nid] = LocalTrainer(
            images[part], labels[part], images[:0], labels[:0], BINDSNET, backend,
            node_id=nid, seed=10 * i,
        )  # fmt: skip
        cfg = NodeConfig(nid, h.fleet, state_dir=h.tmp / nid)
        node = NodeDaemon(cfg, h.channel(nid, cfg.will()), trainers[nid])
        h._spawn(lambda stop, node=node: node.run(poll_s=0.05), node.stop, node.channel)
        nodes.append(node)
    wait_for(
        lambda: all(n.installed_round == 1 and not n.labels_provisional for n in nodes),
        90,
        "every node to install the calibrated, relabelled global model",
    )
    wait_for(lambda: agg.done, 5, "the aggregator to finish")
    final = load_model(nodes[0].global_path)  # type: ignore[arg-type]
    for node in nodes[1:]:
        np.testing.assert_array_equal(load_model(node.global_path).thetas, final.thetas)  # type: ignore[arg-type]
    updates = agg.state.load_updates()
    merged, _ = default_merge([updates[n].model for n in sorted(updates)], 15, "mse", round_id=1)
    np.testing.assert_array_equal(final.weights, merged.weights)
    passes = [trainers[n].calibrate(merged, 80, 1) for n in shards]
    assert [used for _, used in passes] == [60, 80, 80]
    want = sum(used * thetas for thetas, used in passes) / 220
    np.testing.assert_allclose(final.thetas, want, rtol=1e-6)
    assert not np.allclose(final.thetas, merged.thetas)
    assert final.provenance.notes["calibrated"] == "220/3"
    assert protocol.global_labels(final) == protocol.LABELS_FEDERATED
    want_labels, _ = _labels_from_the_shards(final, images, labels, shards, backend)
    np.testing.assert_array_equal(final.labels, want_labels)
