"""MNIST-format datasets (MNIST, Fashion-MNIST): IDX files, read from a directory or a
verified download cache.

Where the files come from, in order:

1. the ``data_dir`` argument (the CLI's ``--data``), else
2. ``$ESTDP_DATA``, else
3. the user cache ``${XDG_CACHE_HOME:-~/.cache}/ensemble-stdp/<kind>/``, where the four
   published ``.gz`` files are downloaded when missing and checked against their
   published SHA-256 on download and on every use.

Files in a directory the user names are not hash-checked (users may bring their own
rebuild of a set) but are validated as strictly as any other. Each file may be raw or
gzip-compressed (``name`` or ``name.gz``).

IDX layout (big-endian), as LeCun's MNIST page defines it::

    magic  u32   0x00000803 = 2051 (images, 3 dims) or 0x00000801 = 2049 (labels, 1 dim);
                 the third byte 0x08 says unsigned bytes, the fourth the number of dims
    dims   u32 x ndim
    data   u8 x prod(dims), row-major

A file is read as a stream: only the requested images are kept in memory, yet the whole
file is read to the end, so that a truncated file, trailing bytes or a bad gzip CRC are
always caught. Every problem is one :class:`~estdp.errors.DataError` naming the file.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import logging
import os
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np

from estdp.atomic import atomic_open
from estdp.errors import ConfigError, DataError

__all__ = [
    "KINDS",
    "SOURCES",
    "SPLITS",
    "DatasetSource",
    "cache_dir",
    "download_files",
    "load_mnist",
    "read_idx_images",
    "read_idx_labels",
]

log = logging.getLogger(__name__)

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
IMAGE_SHAPE = (28, 28)
N_CLASSES = 10
SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SPLIT_ALIASES = {"t10k": "test"}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset is published: mirror base URLs and the SHA-256 of each ``.gz``."""

    kind: str
    mirrors: tuple[str, ...]
    sha256: Mapping[str, str]
    mirrors_env: str  # environment variable that replaces ``mirrors``


# SHA-256 of the published .gz files, from tensorflow_datasets' url_checksums
# (mnist.txt, fashion_mnist.txt) and cross-checked against independent download
# scripts that pin the same digests. The copies in ../shared/data/mnist are NOT
# byte-identical .gz files (their digests differ), which is fine: a user-named
# directory is never hash-checked.
SOURCES: dict[str, DatasetSource] = {
    "mnist": DatasetSource(
        kind="mnist",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        sha256={
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
        mirrors_env="ESTDP_MNIST_MIRRORS",
    ),
    "fashion-mnist": DatasetSource(
        kind="fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        sha256={
            "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
        mirrors_env="ESTDP_FASHION_MNIST_MIRRORS",
    ),
}
KINDS = tuple(SOURCES)

_HINT = "put the four IDX files (raw or .gz) in a directory and pass --data DIR or set ESTDP_DATA"


# ---------------------------------------------------------------------------------------
# Loading


def load_mnist(
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    kind: str = "mnist",
    *,
    download: bool = True,
    limit: int | None = None,
    offset: int = 0,
    mirrors: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split of an MNIST-format dataset.

    Parameters
    ----------
    split
        ``"train"`` or ``"test"`` (alias ``"t10k"``).
    data_dir
        Directory with the IDX files; default ``$ESTDP_DATA``, else the download cache.
    kind
        ``"mnist"`` or ``"fashion-mnist"``: which files to download (and which cache).
    download
        Download missing files into the cache; when false a missing file is an error.
    limit
        At most this many images (fewer when the split ends first; a warning is logged).
    offset
        Index of the first image.
    mirrors
        Base URLs to download from, replacing the published mirrors (and the
        ``ESTDP_MNIST_MIRRORS`` / ``ESTDP_FASHION_MNIST_MIRRORS`` variables).

    Returns
    -------
    images : numpy.ndarray
        uint8, (n, 28, 28).
    labels : numpy.ndarray
        uint8, (n,), values 0..9.

    Raises
    ------
    ConfigError
        Unknown split or kind, negative limit or offset.
    DataError
        A file is missing, corrupt or inconsistent, an offset past the end, or a download
        failed; the message names the file and the problem.
    """
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose train or test")
    source = _source(kind)
    if offset < 0:
        raise ConfigError(f"offset must be >= 0, got {offset}")
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    image_name, label_name = SPLITS[split]

    user_dir = _user_data_dir(data_dir)
    if user_dir is not None:
        if not user_dir.is_dir():
            raise DataError(f"{user_dir}: data directory does not exist")
        image_path = _find_idx(user_dir, image_name)
        label_path = _find_idx(user_dir, label_name)
    else:
        directory = cache_dir(kind)
        missing = [
            name + ".gz"
            for pair in SPLITS.values()
            for name in pair
            if not (directory / (name + ".gz")).is_file()
        ]
        if missing:
            if not download:
                raise DataError(
                    f"{directory}: {', '.join(missing)} not in the cache and downloading "
                    f"is off; {_HINT}"
                )
            download_files(missing, directory, source, mirrors=mirrors)
        image_path = directory / (image_name + ".gz")
        label_path = directory / (label_name + ".gz")
        for path in (image_path, label_path):
            _verify_cached(path, source.sha256[path.name])

    labels = read_idx_labels(label_path)
    images, n_images = _read_images(image_path, offset, limit)
    if n_images != labels.shape[0]:
        raise DataError(
            f"{image_path} has {n_images} images but {label_path} has {labels.shape[0]} labels"
        )
    if limit is not None and images.shape[0] < limit:
        log.warning(
            "%s: %d images requested from offset %d, only %d available",
            split,
            limit,
            offset,
            images.shape[0],
        )
    return images, labels[offset : offset + images.shape[0]].copy()


def _source(kind: str) -> DatasetSource:
    if kind not in SOURCES:
        raise ConfigError(f"unknown dataset {kind!r}; choose one of {', '.join(KINDS)}")
    return SOURCES[kind]


def _user_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("ESTDP_DATA", "")
    return Path(env).expanduser() if env else None


def cache_dir(kind: str = "mnist") -> Path:
    """The download cache of ``kind``: ``${XDG_CACHE_HOME:-~/.cache}/ensemble-stdp/<kind>``."""
    _source(kind)
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "ensemble-stdp" / kind


def _find_idx(directory: Path, name: str) -> Path:
    # The raw file first: it needs no decompression and allows seeking.
    for candidate in (directory / name, directory / (name + ".gz")):
        if candidate.is_file():
            return candidate
    raise DataError(f"{directory}: no {name} or {name}.gz ({_HINT})")


def _verify_cached(path: Path, expected: str) -> None:
    actual = _sha256_file(path)
    if actual != expected:
        raise DataError(
            f"{path}: SHA-256 {actual} does not match the published {expected}; "
            "delete the file to download it again"
        )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# IDX parsing


def read_idx_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """All labels of an IDX label file (raw or .gz), uint8 (n,), each checked to be 0..9.

    Raises
    ------
    DataError
        Wrong magic or dimensions, truncated, trailing bytes, bad gzip, or a label > 9.
    """
    path = Path(path)
    with _idx_stream(path) as stream:
        (n,) = _read_header(stream, path, LABEL_MAGIC, 1)
        labels = np.empty(n, np.uint8)
        _read_exact(stream, path, labels, 8)
        _expect_end(stream, path, 8 + n)
    if n and int(labels.max()) >= N_CLASSES:
        index = int(np.argmax(labels >= N_CLASSES))
        raise DataError(
            f"{path}: label {labels[index]} at index {index} is out of range 0..{N_CLASSES - 1}"
        )
    return labels


def read_idx_images(
    path: str | os.PathLike[str], *, offset: int = 0, limit: int | None = None
) -> np.ndarray:
    """Images ``offset`` .. ``offset + limit`` of an IDX image file, uint8 (n, 28, 28).

    The whole file is read (and checked) but only the requested images are kept.

    Raises
    ------
    DataError
        Wrong magic or dimensions, truncated, trailing bytes, bad gzip, offset past the end.
    """
    return _read_images(Path(path), offset, limit)[0]


def _read_images(path: Path, offset: int, limit: int | None) -> tuple[np.ndarray, int]:
    with _idx_stream(path) as stream:
        n, rows, cols = _read_header(stream, path, IMAGE_MAGIC, 3)
        if (rows, cols) != IMAGE_SHAPE:
            raise DataError(f"{path}: images are {rows}x{cols}, expected 28x28")
        if offset >= n and not (offset == 0 and n == 0):
            raise DataError(f"{path}: offset {offset} is past the end of its {n} images")
        stop = n if limit is None else min(n, offset + limit)
        per_image = rows * cols
        header = 16
        _skip(stream, path, offset * per_image, header)
        images = np.empty((stop - offset, rows, cols), np.uint8)
        _read_exact(stream, path, images, header + offset * per_image)
        _expect_end(stream, path, header + n * per_image)
    return images, n


@contextlib.contextmanager
def _idx_stream(path: Path) -> Iterator[BinaryIO]:
    """Open ``path`` (gzip when it ends in .gz) and turn every read failure into DataError."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed below, after the gzip layer
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
    try:
        yield stream
    except EOFError:
        # gzip's way of saying the compressed stream stops early
        raise DataError(f"{path}: truncated gzip data") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: not a valid gzip file ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: read error: {exc.strerror or exc}") from None
    finally:
        if stream is not raw:
            stream.close()
        raw.close()


def _read_header(stream: BinaryIO, path: Path, magic: int, ndim: int) -> tuple[int, ...]:
    size = 4 * (1 + ndim)
    header = stream.read(size)
    if len(header) < size:
        raise DataError(f"{path}: truncated header ({len(header)} of {size} bytes)")
    values = np.frombuffer(header, dtype=">u4").astype(np.int64)
    if int(values[0]) != magic:
        kind = "image" if magic == IMAGE_MAGIC else "label"
        raise DataError(
            f"{path}: wrong magic number {int(values[0])} (expected {magic} for an IDX {kind} file)"
        )
    return tuple(int(v) for v in values[1:])


def _read_exact(stream: BinaryIO, path: Path, out: np.ndarray, at: int) -> None:
    """Fill ``out`` from the stream; ``at`` is the file position, for the message."""
    if out.size == 0:
        return
    view = memoryview(out).cast("B")
    filled = 0
    while filled < len(view):
        got = stream.readinto(view[filled:])
        if not got:
            raise DataError(
                f"{path}: truncated: data ends at byte {at + filled}, "
                f"expected at least {at + len(view)}"
            )
        filled += got


def _skip(stream: BinaryIO, path: Path, nbytes: int, at: int) -> None:
    if nbytes == 0:
        return
    if not isinstance(stream, gzip.GzipFile):
        stream.seek(nbytes, io.SEEK_CUR)  # a short file shows up in the next read
        return
    scratch = bytearray(min(nbytes, _CHUNK))
    left = nbytes
    while left:
        got = stream.readinto(memoryview(scratch)[: min(left, len(scratch))])
        if not got:
            raise DataError(
                f"{path}: truncated: data ends at byte {at + nbytes - left}, "
                f"expected at least {at + nbytes}"
            )
        left -= got


def _expect_end(stream: BinaryIO, path: Path, expected: int) -> None:
    """The file (uncompressed) must end exactly at byte ``expected``."""
    if not isinstance(stream, gzip.GzipFile):
        end = os.fstat(stream.fileno()).st_size
    else:
        # Read to the end: the only way to learn the size, and what checks the CRC.
        end = stream.tell()
        scratch = bytearray(_CHUNK)
        while got := stream.readinto(scratch):
            end += got
    if end < expected:
        raise DataError(f"{path}: truncated: {end} bytes, expected {expected}")
    if end > expected:
        raise DataError(f"{path}: {end - expected} unexpected trailing bytes after the data")


# ---------------------------------------------------------------------------------------
# Download


class _MirrorFailed(Exception):
    """One mirror did not deliver a good file; the reason is the message."""


def download_files(
    names: Sequence[str],
    directory: str | os.PathLike[str],
    source: DatasetSource,
    *,
    mirrors: Sequence[str] | None = None,
    progress: TextIO | None = None,
    timeout: float = 60.0,
) -> None:
    """Download ``names`` (e.g. ``"t10k-labels-idx1-ubyte.gz"``) into ``directory``.

    Each file streams into a temporary file beside its destination while its SHA-256 is
    computed; only a file whose digest matches ``source.sha256`` is renamed into place.
    Mirrors are tried in order: ``mirrors``, else ``$<source.mirrors_env>`` (comma or
    space separated), else ``source.mirrors``.

    Parameters
    ----------
    progress
        Stream for a progress line, drawn only when it is a terminal (default stderr).
    timeout
        Seconds to wait for a mirror to answer or send more data.

    Raises
    ------
    DataError
        A file could not be fetched intact from any mirror (the message lists the
        mirrors and what went wrong with each), or ``directory`` cannot be created.
        No partial file is ever left behind.
    """
    directory = Path(directory)
    bases = _mirrors(source, mirrors)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{directory}: cannot create the data cache: {exc.strerror}") from None
    stream = sys.stderr if progress is None else progress
    for name in names:
        expected = source.sha256.get(name)
        if expected is None:
            raise DataError(f"{name}: no known SHA-256 for {source.kind}; {_HINT}")
        failures = []
        for base in bases:
            url = base.rstrip("/") + "/" + name
            try:
                _fetch(url, directory / name, expected, stream, timeout)
                break
            except _MirrorFailed as exc:
                failures.append(f"{url} ({exc})")
        else:
            raise DataError(
                f"cannot download {name} for {source.kind}: tried {'; '.join(failures)}; {_HINT}"
            )


def _mirrors(source: DatasetSource, mirrors: Sequence[str] | None) -> tuple[str, ...]:
    if mirrors is None:
        env = os.environ.get(source.mirrors_env, "")
        mirrors = env.replace(",", " ").split() or source.mirrors
    bases = tuple(m for m in mirrors if m)
    if not bases:
        raise DataError(f"no download mirrors for {source.kind}; {_HINT}")
    return bases


def _fetch(url: str, dest: Path, expected: str, stream: TextIO, timeout: float) -> None:
    show = _is_terminal(stream)
    drawn = False
    log.info("downloading %s", url)
    try:
        with atomic_open(dest) as handle, urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            digest = hashlib.sha256()
            got = 0
            while chunk := resp.read(_CHUNK // 4):
                handle.write(chunk)
                digest.update(chunk)
                got += len(chunk)
                if show:
                    _draw(stream, dest.name, got, total)
                    drawn = True
            if total is not None and got != total:
                raise _MirrorFailed(f"truncated: {got} of {total} bytes")
            actual = digest.hexdigest()
            if actual != expected:
                raise _MirrorFailed(f"SHA-256 mismatch: got {actual}, expected {expected}")
    except _MirrorFailed:
        raise
    except urllib.error.HTTPError as exc:
        raise _MirrorFailed(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _MirrorFailed(str(exc.reason)) from None
    except http.client.IncompleteRead as exc:
        raise _MirrorFailed(
            f"truncated: connection closed after {len(exc.partial)} bytes"
        ) from None
    except (http.client.HTTPException, OSError, ValueError) as exc:
        raise _MirrorFailed(f"{type(exc).__name__}: {exc}") from None
    finally:
        if drawn:
            stream.write("\n")
            stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


def _draw(stream: TextIO, name: str, got: int, total: int | None) -> None:
    if total:
        text = f"downloading {name}: {100 * got / total:3.0f}% of {total / 1e6:.1f} MB"
    else:
        text = f"downloading {name}: {got / 1e6:.1f} MB"
    stream.write("\r" + text + "\033[K")
    stream.flush()
