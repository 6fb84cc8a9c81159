"""Board data directories: IDX files that a standard IDX reader parses back."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from firmware_sim import shards as S


def _read_idx(path):
    data = path.read_bytes()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    assert zero == 0 and dtype == 0x08
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data[4 + 4 * ndim :], dtype=np.uint8).reshape(shape)


def test_shard_directory_round_trips_and_links_the_test_set(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7).astype(np.uint8)
    test = S.write_test_set(tmp_path / "test", images[:3], labels[:3])
    node = S.write_shard(tmp_path / "node-1", images, labels, test)
    assert np.array_equal(_read_idx(node / S.TRAIN_IMAGES), images)
    assert np.array_equal(_read_idx(node / S.TRAIN_LABELS), labels)
    assert (node / S.TEST_IMAGES).is_symlink()
    assert np.array_equal(_read_idx(node / S.TEST_LABELS), labels[:3])
    # Writing again (a restarted run) replaces the links instead of failing.
    S.write_shard(tmp_path / "node-1", images[:2], labels[:2], test)
    assert _read_idx(node / S.TRAIN_IMAGES).shape == (2, 28, 28)


def test_mismatched_counts_are_refused(tmp_path):
    with pytest.raises(ValueError):
        S.write_shard(tmp_path, np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.uint8))
