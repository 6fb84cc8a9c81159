"""IDX reading (every corrupt case), directory resolution and the verified download."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import logging
import struct
import threading

import numpy as np
import pytest

from estdp import datasets
from estdp.datasets import DatasetSource, load_mnist, read_idx_images, read_idx_labels
from estdp.errors import ConfigError, DataError

NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SIZES = {"train": 9, "test": 4}


def idx_images(images: np.ndarray, magic: int = 2051) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">4I", magic, n, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    return struct.pack(">2I", magic, labels.shape[0]) + labels.astype(np.uint8).tobytes()


def make_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(
        np.uint8
    )


DATA = {split: make_split(n, seed) for seed, (split, n) in enumerate(SIZES.items())}


def write_dataset(directory, *, gz: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split, (image_name, label_name) in NAMES.items():
        images, labels = DATA[split]
        for name, blob in ((image_name, idx_images(images)), (label_name, idx_labels(labels))):
            if gz:
                (directory / (name + ".gz")).write_bytes(gzip.compress(blob, mtime=0))
            else:
                (directory / name).write_bytes(blob)


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No test sees the user's real data settings or cache."""
    monkeypatch.delenv("ESTDP_DATA", raising=False)
    monkeypatch.delenv("ESTDP_MNIST_MIRRORS", raising=False)
    monkeypatch.delenv("ESTDP_FASHION_MNIST_MIRRORS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


# --- reading a directory -----------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_reads_raw_and_gzip(tmp_path, gz):
    write_dataset(tmp_path / "d", gz=gz)
    for split in ("train", "test"):
        images, labels = load_mnist(split, tmp_path / "d")
        assert images.dtype == np.uint8 and images.shape == (SIZES[split], 28, 28)
        assert labels.dtype == np.uint8 and labels.shape == (SIZES[split],)
        np.testing.assert_array_equal(images, DATA[split][0])
        np.testing.assert_array_equal(labels, DATA[split][1])
        assert images.flags.writeable


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(("offset", "limit"), [(0, 3), (2, 4), (5, None), (8, 1), (3, 0)])
def test_offset_and_limit(tmp_path, gz, offset, limit):
    write_dataset(tmp_path, gz=gz)
    images, labels = load_mnist("train", tmp_path, offset=offset, limit=limit)
    stop = None if limit is None else offset + limit
    np.testing.assert_array_equal(images, DATA["train"][0][offset:stop])
    np.testing.assert_array_equal(labels, DATA["train"][1][offset:stop])


def test_limit_past_the_end_is_clipped_with_a_warning(tmp_path, caplog):
    write_dataset(tmp_path, gz=True)
    with caplog.at_level(logging.WARNING, logger="estdp.datasets"):
        images, labels = load_mnist("train", tmp_path, offset=6, limit=10)
    assert images.shape[0] == labels.shape[0] == 3
    assert "only 3 available" in caplog.text


def test_offset_past_the_end(tmp_path):
    write_dataset(tmp_path, gz=False)
    with pytest.raises(DataError, match="offset 9 is past the end of its 9 images"):
        load_mnist("train", tmp_path, offset=9)


def test_raw_file_is_preferred_to_gz(tmp_path):
    write_dataset(tmp_path, gz=True)
    images, labels = DATA["test"]
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_images(255 - images))
    got, _ = load_mnist("test", tmp_path)
    np.testing.assert_array_equal(got, 255 - images)


def test_estdp_data_is_used_when_no_dir_is_given(tmp_path, monkeypatch):
    write_dataset(tmp_path / "env", gz=False)
    monkeypatch.setenv("ESTDP_DATA", str(tmp_path / "env"))
    _, labels = load_mnist("t10k", download=False)
    np.testing.assert_array_equal(labels, DATA["test"][1])
    # an explicit directory wins over the variable
    with pytest.raises(DataError, match="other.*does not exist"):
        load_mnist("test", tmp_path / "other")


def test_fashion_mnist_reads_the_same_file_names(tmp_path):
    write_dataset(tmp_path, gz=True)
    images, _ = load_mnist("test", tmp_path, kind="fashion-mnist")
    assert images.shape == (4, 28, 28)


def test_missing_file_is_named(tmp_path):
    write_dataset(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"no t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte\.gz"):
        load_mnist("test", tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "validation"}, "unknown split"),
        ({"kind": "cifar10"}, "unknown dataset"),
        ({"offset": -1}, "offset must be >= 0"),
        ({"limit": -5}, "limit must be >= 0"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        load_mnist(data_dir=tmp_path, **kwargs)


# --- every corrupt case ------------------------------------------------------------------

IMAGES, LABELS = DATA["test"]
GOOD_IMAGES = idx_images(IMAGES)
GOOD_LABELS = idx_labels(LABELS)


def corrupt(which: str, blob: bytes):
    images = blob if which == "images" else GOOD_IMAGES
    labels = blob if which == "labels" else GOOD_LABELS
    return images, labels


CORRUPT_CASES = {
    "image magic": (
        corrupt("images", idx_images(IMAGES, magic=2049)),
        "images",
        "wrong magic number 2049 \\(expected 2051",
    ),
    "label magic": (
        corrupt("labels", idx_labels(LABELS, magic=2051)),
        "labels",
        "wrong magic number 2051 \\(expected 2049",
    ),
    "image size": (
        corrupt("images", idx_images(IMAGES[:, :27, :])),
        "images",
        "27x28, expected 28x28",
    ),
    "image header": (
        corrupt("images", GOOD_IMAGES[:10]),
        "images",
        "truncated header \\(10 of 16 bytes\\)",
    ),
    "label header": (corrupt("labels", GOOD_LABELS[:3]), "labels", "truncated header"),
    "image payload": (corrupt("images", GOOD_IMAGES[:-100]), "images", "truncated"),
    "label payload": (corrupt("labels", GOOD_LABELS[:-1]), "labels", "truncated"),
    "image trailing": (
        corrupt("images", GOOD_IMAGES + b"\0\0\0"),
        "images",
        "3 unexpected trailing bytes",
    ),
    "label trailing": (
        corrupt("labels", GOOD_LABELS + b"\0"),
        "labels",
        "1 unexpected trailing bytes",
    ),
    "count": (
        corrupt("labels", idx_labels(LABELS[:3])),
        "images",
        "has 4 images but .* has 3 labels",
    ),
    "label range": (
        corrupt("labels", idx_labels(np.array([1, 2, 12, 3]))),
        "labels",
        "label 12 at index 2 is out of range 0..9",
    ),
}


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", CORRUPT_CASES)
def test_corrupt_files_give_one_clear_error(tmp_path, case, gz):
    (images, labels), named, match = CORRUPT_CASES[case]
    for name, blob in zip(NAMES["test"], (images, labels), strict=True):
        path = tmp_path / (name + ".gz" if gz else name)
        path.write_bytes(gzip.compress(blob) if gz else blob)
    with pytest.raises(DataError, match=match) as info:
        load_mnist("test", tmp_path, limit=2)
    index = 0 if named == "images" else 1
    assert NAMES["test"][index] in str(info.value), "the message must name the file"


def test_bad_gzip(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match=f"{path}: not a valid gzip file"):
        read_idx_labels(path)


def test_truncated_gzip_stream(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(GOOD_IMAGES)[:-200])
    with pytest.raises(DataError, match=f"{path}: truncated gzip data"):
        read_idx_images(path)


def test_gzip_crc_error_is_caught_even_when_only_a_prefix_is_wanted(tmp_path):
    blob = bytearray(gzip.compress(GOOD_IMAGES))
    blob[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="not a valid gzip file"):
        read_idx_images(path, limit=1)


def test_missing_file_for_the_reader(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_idx_labels(tmp_path / "absent")


# --- the shared real MNIST -----------------------------------------------------------------


def test_real_mnist_test_split(mnist_dir):
    images, labels = load_mnist("test", mnist_dir)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    np.testing.assert_array_equal(labels[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
    assert 30 < images.mean() < 36


def test_real_mnist_train_labels_and_a_slice(mnist_dir):
    labels = read_idx_labels(mnist_dir / "train-labels-idx1-ubyte.gz")
    counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), counts)
    images, part = load_mnist("train", mnist_dir, offset=59990, limit=100)
    assert images.shape == (10, 28, 28)
    np.testing.assert_array_equal(part, labels[59990:])


# --- download ----------------------------------------------------------------------------


def gz_files() -> dict[str, bytes]:
    files = {}
    for split, (image_name, label_name) in NAMES.items():
        images, labels = DATA[split]
        files[image_name + ".gz"] = gzip.compress(idx_images(images), mtime=0)
        files[label_name + ".gz"] = gzip.compress(idx_labels(labels), mtime=0)
    return files


FILES = gz_files()
HASHES = {name: hashlib.sha256(blob).hexdigest() for name, blob in FILES.items()}


@pytest.fixture
def mirror(tmp_path):
    """A directory serving the four .gz files, as a file:// base URL."""
    root = tmp_path / "mirror"
    root.mkdir()
    for name, blob in FILES.items():
        (root / name).write_bytes(blob)
    return root


def use_source(monkeypatch, *mirrors: str) -> None:
    source = DatasetSource("mnist", tuple(mirrors), HASHES, "ESTDP_MNIST_MIRRORS")
    monkeypatch.setitem(datasets.SOURCES, "mnist", source)


def cache(tmp_path):
    return tmp_path / "cache" / "ensemble-stdp" / "mnist"


def test_download_verifies_and_caches(tmp_path, monkeypatch, mirror):
    use_source(monkeypatch, mirror.as_uri() + "/")
    images, labels = load_mnist("test")
    np.testing.assert_array_equal(images, DATA["test"][0])
    assert sorted(p.name for p in cache(tmp_path).iterdir()) == sorted(FILES)
    # Cached now: no mirror is needed, even for the other split.
    use_source(monkeypatch, (tmp_path / "gone").as_uri())
    _, train_labels = load_mnist("train", download=False)
    np.testing.assert_array_equal(train_labels, DATA["train"][1])


def test_falls_back_to_the_next_mirror(tmp_path, monkeypatch, mirror):
    use_source(monkeypatch, (tmp_path / "empty").as_uri(), mirror.as_uri())
    images, _ = load_mnist("test")
    assert images.shape == (4, 28, 28)


def test_mirrors_from_the_environment(tmp_path, monkeypatch, mirror):
    use_source(monkeypatch, "https://unreachable.invalid/")
    monkeypatch.setenv("ESTDP_MNIST_MIRRORS", f"{(tmp_path / 'empty').as_uri()}, {mirror.as_uri()}")
    _, labels = load_mnist("test")
    np.testing.assert_array_equal(labels, DATA["test"][1])


def test_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch, mirror):
    tampered = bytearray(FILES["train-images-idx3-ubyte.gz"])
    tampered[100] ^= 1
    (mirror / "train-images-idx3-ubyte.gz").write_bytes(bytes(tampered))
    use_source(monkeypatch, mirror.as_uri())
    with pytest.raises(DataError) as info:
        load_mnist("train")
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message and "SHA-256 mismatch" in message
    assert mirror.as_uri() in message and "--data" in message and "ESTDP_DATA" in message
    assert list(cache(tmp_path).iterdir()) == [], "no partial or unverified file may stay"


def test_no_mirror_answers(tmp_path, monkeypatch):
    use_source(monkeypatch, (tmp_path / "a").as_uri(), (tmp_path / "b").as_uri())
    with pytest.raises(DataError, match="cannot download .*tried .*/a/.*; .*/b/") as info:
        load_mnist("test")
    assert "--data DIR or set ESTDP_DATA" in str(info.value)
    assert list(cache(tmp_path).iterdir()) == []


def test_download_off_with_empty_cache(monkeypatch):
    use_source(monkeypatch, "https://unreachable.invalid/")
    with pytest.raises(DataError, match="not in the cache and downloading is off"):
        load_mnist("test", download=False)


def test_cached_file_damaged_later(tmp_path, monkeypatch, mirror):
    use_source(monkeypatch, mirror.as_uri())
    load_mnist("test")
    path = cache(tmp_path) / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(DataError, match="does not match the published .* delete the file"):
        load_mnist("test")


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the name http.server calls
        kind, _, name = self.path.strip("/").partition("/")
        blob = FILES.get(name)
        if blob is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(blob)))
        self.end_headers()
        # "/cut/...": promise the whole file, send half, hang up.
        self.wfile.write(blob[: len(blob) // 2] if kind == "cut" else blob)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def http_base():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_truncated_download_then_good_mirror(tmp_path, monkeypatch, http_base):
    names = ["t10k-labels-idx1-ubyte.gz"]
    source = DatasetSource("mnist", (), HASHES, "ESTDP_MNIST_MIRRORS")
    with pytest.raises(DataError, match="truncated") as info:
        datasets.download_files(names, tmp_path / "c", source, mirrors=[f"{http_base}/cut/"])
    assert f"{http_base}/cut/t10k-labels-idx1-ubyte.gz" in str(info.value)
    assert list((tmp_path / "c").iterdir()) == []
    datasets.download_files(
        names, tmp_path / "c", source, mirrors=[f"{http_base}/cut/", f"{http_base}/ok/"]
    )
    assert (tmp_path / "c" / names[0]).read_bytes() == FILES[names[0]]


def test_http_404_is_reported(tmp_path, http_base):
    source = DatasetSource("mnist", (), {"x.gz": "0" * 64}, "ESTDP_MNIST_MIRRORS")
    with pytest.raises(DataError, match="HTTP 404"):
        datasets.download_files(["x.gz"], tmp_path, source, mirrors=[http_base])


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize(("stream", "shown"), [(_Terminal(), True), (io.StringIO(), False)])
def test_progress_only_on_a_terminal(tmp_path, mirror, stream, shown):
    source = DatasetSource("mnist", (mirror.as_uri(),), HASHES, "ESTDP_MNIST_MIRRORS")
    datasets.download_files(["t10k-labels-idx1-ubyte.gz"], tmp_path / "c", source, progress=stream)
    assert ("downloading t10k-labels-idx1-ubyte.gz: 100%" in stream.getvalue()) is shown


def test_published_checksum_tables_are_complete():
    for kind, source in datasets.SOURCES.items():
        assert source.kind == kind and source.mirrors
        assert sorted(source.sha256) == sorted(n + ".gz" for pair in NAMES.values() for n in pair)
        for digest in source.sha256.values():
            assert len(digest) == 64 and set(digest) <= set("0123456789abcdef")
    mnist = datasets.SOURCES["mnist"]
    assert mnist.mirrors[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert mnist.sha256["t10k-labels-idx1-ubyte.gz"].startswith("f7ae60f92e00ec6d")
