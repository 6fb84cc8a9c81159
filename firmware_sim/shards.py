"""Each simulated board's own data directory: its shard written as MNIST-format IDX files.

A board "captures" its data: the simulator writes the board's shard of the training pool
as ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (raw IDX, in the order the
board streams them) into the board's directory, and links the shared test files beside
them. The node daemon then reads ``--data <its dir>`` as any board would read its local
storage: no index list crosses the process boundary, and every partition scheme looks the
same to the node.

IDX layout (LeCun): magic ``0x00 0x00 <type 0x08 = uint8> <ndim>``, then ``ndim``
big-endian uint32 sizes, then the data in C order.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
_UINT8 = 0x08


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 array as a raw IDX file (scratch data: no fsync, no atomic rename)."""
    data = np.ascontiguousarray(array, dtype=np.uint8)
    if not 1 <= data.ndim <= 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got {data.ndim}")
    header = struct.pack(">BBBB", 0, 0, _UINT8, data.ndim)
    header += struct.pack(f">{data.ndim}I", *data.shape)
    path = Path(path)
    with open(path, "wb") as handle:
        handle.write(header)
        handle.write(data.tobytes())
    return path


def write_test_set(directory: str | Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write the test images and labels once, for every board to link to."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / TEST_IMAGES, images)
    write_idx(directory / TEST_LABELS, labels)
    return directory


def write_shard(
    directory: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    test_dir: str | Path | None = None,
) -> Path:
    """Write one board's shard as IDX files; link the test files of ``test_dir`` beside it."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / TRAIN_IMAGES, images)
    write_idx(directory / TRAIN_LABELS, labels)
    if test_dir is not None:
        for name in (TEST_IMAGES, TEST_LABELS):
            link = directory / name
            if link.is_symlink() or link.exists():
                link.unlink()
            os.symlink(os.path.relpath(Path(test_dir) / name, directory), link)
    return directory
