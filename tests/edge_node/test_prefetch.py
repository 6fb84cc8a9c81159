"""The input prefetch worker: the same training as in process, and failures that say so."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node import prefetch, trainer
from estdp.params import BINDSNET, PAPER


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for img in images:
        r, c = rng.integers(6, 16, size=2)
        img[r : r + 10, c : c + 10] = rng.integers(0, 256, size=(10, 10))
    images[3] = 0  # a blank image: no active pixel at all
    return images


@pytest.fixture
def eager(monkeypatch):
    """Use the worker for any run, on any machine."""
    monkeypatch.setattr(prefetch, "MIN_IMAGES", 1)
    monkeypatch.setattr(prefetch, "usable_cpus", lambda: 2)


def test_prefetched_training_equals_in_process(eager):
    w, th = trainer.init_weights(16, BINDSNET, np.random.default_rng(1))
    images = _images(3 * prefetch.SLOTS + 5)  # wraps around the ring of slots
    rng_in, rng_ahead = np.random.default_rng(2), np.random.default_rng(2)
    seen = []
    plain = trainer.train(w, th, images, BINDSNET, rng=rng_in)
    ahead = trainer.train(
        w, th, images, BINDSNET, rng=rng_ahead, prefetch=True, progress=seen.append
    )
    assert plain.spike_counts.sum() > 0
    assert np.array_equal(plain.spike_counts, ahead.spike_counts)
    assert np.array_equal(plain.weights, ahead.weights)
    assert np.array_equal(plain.thetas, ahead.thetas)
    assert seen == list(range(1, len(images) + 1))
    assert rng_in.random() == rng_ahead.random()  # the generator handed back as consumed


def test_stream_items_are_the_in_process_draws(eager):
    from edge_node import event_driven
    from edge_node.encoding import draw_presentation

    images = _images(prefetch.SLOTS + 2, seed=3).reshape(-1, 784)
    tab = event_driven.tables(BINDSNET)
    rng = np.random.default_rng(4)
    with prefetch.Prefetcher(images, BINDSNET, np.random.default_rng(4)) as stream:
        for image, (drawn, prepared) in zip(images, stream, strict=True):
            expected = draw_presentation(image, BINDSNET, rng)
            assert np.array_equal(drawn.active, expected.active)
            assert np.array_equal(drawn.spikes, expected.spikes)
            assert np.array_equal(drawn.choices, expected.choices)
            for name, array in event_driven.prepare(expected.spikes, tab)._asdict().items():
                assert np.array_equal(getattr(prepared, name), array), name


def test_an_item_kept_after_the_stream_ends_stays_readable(eager):
    # Its arrays keep the mapping alive (np.frombuffer), instead of pointing at memory
    # unmapped when the stream closed.
    images = _images(prefetch.SLOTS + 1, seed=5).reshape(-1, 784)
    with prefetch.Prefetcher(images, BINDSNET, np.random.default_rng(6)) as stream:
        for item in stream:
            drawn, prepared = item
        copies = drawn.spikes.copy(), prepared.dep.copy()
    assert stream._buf.closed is False  # the views hold it: unmapped when they go
    assert np.array_equal(drawn.spikes, copies[0]) and np.array_equal(prepared.dep, copies[1])
    del drawn, prepared, item


def test_usable_only_without_re_presentations_and_for_long_runs(monkeypatch):
    monkeypatch.setattr(prefetch, "usable_cpus", lambda: 2)
    assert prefetch.usable(BINDSNET, prefetch.MIN_IMAGES)
    assert not prefetch.usable(BINDSNET, prefetch.MIN_IMAGES - 1)
    assert not prefetch.usable(PAPER, 10 * prefetch.MIN_IMAGES)  # re-presents on few spikes
    assert prefetch.usable(PAPER.replace(max_presentations=1), prefetch.MIN_IMAGES)
    monkeypatch.setattr(prefetch, "usable_cpus", lambda: 1)
    assert not prefetch.usable(BINDSNET, 10 * prefetch.MIN_IMAGES)


def test_paper_preset_stays_in_process(eager, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the worker must not be used with re-presentations")

    monkeypatch.setattr(prefetch, "Prefetcher", refuse)
    w, th = trainer.init_weights(8, PAPER, np.random.default_rng(5))
    result = trainer.train(w, th, _images(4), PAPER, rng=np.random.default_rng(6), prefetch=True)
    assert result.images_seen == 4


class _Unloadable:
    """Pickles in the trainer, fails to unpickle in the worker."""

    def __len__(self):
        return 3

    def __reduce__(self):
        return (int, ("not a number",))


def test_a_failing_worker_raises_with_its_traceback():
    unloadable = prefetch.Prefetcher(_Unloadable(), BINDSNET, np.random.default_rng(0))
    with pytest.raises(prefetch.PrefetchError, match="ValueError") as caught, unloadable:
        pass
    assert unloadable._proc.poll() is not None
    assert "input prefetch worker failed" in str(caught.value)


def test_leaving_the_stream_early_stops_the_worker(eager):
    images = _images(3 * prefetch.SLOTS).reshape(-1, 784)
    with prefetch.Prefetcher(images, BINDSNET, np.random.default_rng(0)) as stream:
        next(iter(stream))
        process = stream._proc
    assert process.poll() is not None  # ended, not left behind


def test_a_worker_that_cannot_start_leaves_training_in_process(eager, monkeypatch, caplog):
    def no_room(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prefetch.Prefetcher, "_start", no_room)
    w, th = trainer.init_weights(8, BINDSNET, np.random.default_rng(7))
    images = _images(6)
    plain = trainer.train(w, th, images, BINDSNET, rng=np.random.default_rng(8))
    with caplog.at_level("WARNING", logger="edge_node.prefetch"):
        ahead = trainer.train(w, th, images, BINDSNET, rng=np.random.default_rng(8), prefetch=True)
    assert np.array_equal(plain.weights, ahead.weights)
    assert "input prefetch unavailable" in caplog.text and "No space left" in caplog.text
