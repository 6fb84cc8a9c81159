"""Drawing and preparing the inputs of the next images in a second process.

The event-driven trainer spends about a quarter of each image on work that depends on the
input spikes alone: drawing them (:func:`edge_node.encoding.draw_presentation`) and the
tables of :func:`edge_node.event_driven.prepare`. On a machine with a second core, a
worker process (``python -m edge_node.prefetch``) does that for the next images while the
trainer runs the current one. They meet in a ring of ``SLOTS`` slots of a memory-mapped
file in /dev/shm: the worker fills slot ``n % SLOTS`` for image n once the trainer has
released it, and says so over its stdout; the trainer releases a slot with one byte on
the worker's stdin.

The worker consumes the generator exactly as the trainer would (one draw per image, in
order) and hands its final state back, so a seed gives the same spikes, weights and
generator state with or without it. That holds only while an image is never presented
again, so presets with re-presentations (the paper preset) run without it
(:func:`usable`).

The worker is a fresh interpreter rather than a ``multiprocessing`` child: a spawned
child re-imports the caller's ``__main__``, which breaks scripts without a main guard,
and a forked one is unsafe beside the threads of MQTT clients and BLAS.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from edge_node import event_driven
from edge_node.encoding import Presentation, draw_presentation
from estdp.backend import usable_cpus
from estdp.errors import EstdpError
from estdp.params import NetworkParams

log = logging.getLogger(__name__)

SLOTS = 4  # images prepared ahead, at most
MIN_IMAGES = 2000  # fewer: starting the worker (~0.3 s) costs about what it saves
_HEADER = struct.Struct("<I")  # length of each pickled message on the worker's stdout


class PrefetchError(EstdpError):
    """The worker process failed or went away."""


def usable(params: NetworkParams, n_images: int) -> bool:
    """Whether a run of ``n_images`` can use the worker and gains from it."""
    no_represent = params.min_spikes == 0 or params.max_presentations == 1
    return no_represent and n_images >= MIN_IMAGES and usable_cpus() >= 2


class _Layout:
    """Where each array of one image lies in a slot (sized for ``K = n_input``)."""

    def __init__(self, params: NetworkParams) -> None:
        steps = params.time_steps
        n_blocks = -(-steps // event_driven.BLOCK)
        shapes: dict[str, tuple[type, Callable[[int], tuple[int, ...]]]] = {
            "active": (np.int64, lambda k: (k,)),
            "choices": (np.float64, lambda k: (steps,)),
            "spikes": (np.bool_, lambda k: (steps, k)),
            "dep": (np.float64, lambda k: (steps + 1, k)),
            "change": (np.float64, lambda k: (steps, k)),
            "drive": (np.float64, lambda k: (steps + 2, k + 3)),
            "z_blocks": (np.float32, lambda k: (n_blocks, k)),
            "z_first": (np.float64, lambda k: (min(event_driven.CHUNK, steps), k + 3)),
        }
        self.shapes = shapes
        self.offsets: dict[str, int] = {}
        size = 0
        for name, (dtype, shape) in shapes.items():
            size = -(-size // 64) * 64  # aligned for vector loads
            self.offsets[name] = size
            size += int(np.prod(shape(params.n_input))) * np.dtype(dtype).itemsize
        self.slot_bytes = -(-size // 4096) * 4096

    def views(self, mapped: np.ndarray, slot: int, k: int) -> dict[str, np.ndarray]:
        """The arrays of ``slot`` for ``k`` active pixels; ``mapped``: :func:`mapped`."""
        base = slot * self.slot_bytes
        views = {}
        for name, (dtype, shape) in self.shapes.items():
            start = base + self.offsets[name]
            dims = shape(k)
            size = math.prod(dims) * np.dtype(dtype).itemsize  # np.prod: ~10 us on a tuple
            views[name] = mapped[start : start + size].view(dtype).reshape(dims)
        return views


def mapped(buf: mmap.mmap) -> np.ndarray:
    """The whole mapping as bytes, for :meth:`_Layout.views`.

    np.frombuffer holds the mapping's buffer while this array or any view cut from it
    lives, so closing the mapping under them fails (BufferError) and it is unmapped when
    the last of them goes; np.ndarray(buffer=...) lets go of it at once, which left an
    item kept past the stream pointing at unmapped memory. Views are cut from one such
    array rather than made by np.frombuffer each (~6 us apiece on a large mapping).
    """
    return np.frombuffer(buf, dtype=np.uint8)


def _send(stream: BinaryIO, message: object) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _read(stream: BinaryIO) -> object:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (length,) = _HEADER.unpack(header)
    payload = stream.read(length)
    if len(payload) < length:
        raise EOFError
    return pickle.loads(payload)


def _work(source: BinaryIO, sink: BinaryIO) -> None:
    """The worker: draw and prepare every image in order, then send the rng state."""
    # Ctrl-C reaches the whole process group; the trainer handles it and closes the
    # pipes, which ends the worker (EOF on stdin or a broken pipe on stdout).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from edge_node.trainer import one_blas_thread

        path, images, params, rng = pickle.load(source)
        layout = _Layout(params)
        tab = event_driven.tables(params)
        # The mapping is never closed: views of it may live to the end, and so does the
        # worker.
        with open(path, "r+b") as file, one_blas_thread():
            whole = mapped(mmap.mmap(file.fileno(), 0))
            _send(sink, "ready")
            for n, image in enumerate(images):
                drawn = draw_presentation(image, params, rng)
                prepared = event_driven.prepare(drawn.spikes, tab)
                if n >= SLOTS and not source.read(1):  # the trainer is done with n - SLOTS
                    return  # the trainer went away
                slot = layout.views(whole, n % SLOTS, drawn.active.size)
                slot["active"][...] = drawn.active
                slot["choices"][...] = drawn.choices
                slot["spikes"][...] = drawn.spikes
                for name, array in prepared._asdict().items():
                    slot[name][...] = array
                _send(sink, drawn.active.size)
        _send(sink, ("done", rng.bit_generator.state))
    except BrokenPipeError:
        return  # the trainer went away
    except BaseException:  # noqa: BLE001 - reported to the trainer, which raises it
        with contextlib.suppress(BrokenPipeError):
            _send(sink, ("error", traceback.format_exc()))


def start(images: np.ndarray, params: NetworkParams, rng: np.random.Generator) -> Prefetcher | None:
    """A started :class:`Prefetcher`, or None (logged) when the worker cannot start, for
    example with /dev/shm too small for its slots: the caller then draws in process."""
    prefetcher = Prefetcher(images, params, rng)
    try:
        return prefetcher.__enter__()
    except (PrefetchError, OSError) as exc:
        log.warning("input prefetch unavailable, drawing the inputs in this process: %s", exc)
        return None


class Prefetcher:
    """Iterate over ``(presentation, prepared)`` for each image, made by a worker.

    Use as a context manager around the iteration. When the iteration ends cleanly the
    generator ``rng`` is left in the state the in-process draws would have left it. An
    item's arrays are valid until the next item is asked for (its slot is then reused).
    """

    def __init__(self, images: np.ndarray, params: NetworkParams, rng: np.random.Generator):
        self.images = images
        self.params = params
        self.rng = rng
        self.layout = _Layout(params)
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf: mmap.mmap | None = None
        self._mapped: np.ndarray | None = None
        self._stdin = -1  # the worker's stdin, written unbuffered once started
        # (slot, k) -> the item's views, cut once: ~20 us an image otherwise
        self._items: dict[tuple[int, int], tuple[Presentation, event_driven.Prepared]] = {}

    def __enter__(self) -> Prefetcher:
        if self._proc is None:  # entered once: start() may have started it already
            try:
                self._start()
            except BaseException:
                self.__exit__(None, None, None)
                raise
            log.info("inputs drawn and prepared by a second process (pid %s)", self._proc.pid)
        return self

    def _start(self) -> None:
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.NamedTemporaryFile(prefix="estdp-prefetch-", dir=shm) as file:
            size = self.layout.slot_bytes * SLOTS
            file.truncate(size)
            if hasattr(os, "posix_fallocate"):  # a full /dev/shm fails here, not on a write
                os.posix_fallocate(file.fileno(), 0, size)
            self._buf = mmap.mmap(file.fileno(), 0)
            self._mapped = mapped(self._buf)
            env = dict(os.environ)
            root = str(Path(__file__).resolve().parents[1])  # works from a source tree too
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "edge_node.prefetch"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
            with contextlib.suppress(BrokenPipeError):  # it failed: the read below says how
                pickle.dump((file.name, self.images, self.params, self.rng), self._proc.stdin)
                self._proc.stdin.flush()
            self._stdin = self._proc.stdin.fileno()  # the start-up message is flushed
            ready = self._receive()  # the worker has mapped the file: its name may go
            if ready != "ready":
                raise PrefetchError(f"input prefetch worker sent {ready!r} at the start")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            for stream in (self._proc.stdin, self._proc.stdout):
                with contextlib.suppress(OSError):
                    stream.close()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._mapped = None
        self._items.clear()
        if self._buf is not None:
            # BufferError: the caller still holds the last item; unmapped when it lets go.
            with contextlib.suppress(BufferError):
                self._buf.close()

    def __iter__(self) -> Iterator[tuple[Presentation, event_driven.Prepared]]:
        for n in range(len(self.images)):
            if n:
                self._release()  # image n - 1 is done with
            k = self._receive()
            if not isinstance(k, int):
                raise PrefetchError(f"input prefetch worker sent {k!r} for image {n}")
            item = self._items.get((n % SLOTS, k))
            if item is None:  # views of a slot for k pixels: the same every time
                slot = self.layout.views(self._mapped, n % SLOTS, k)
                drawn = Presentation(slot.pop("active"), slot.pop("spikes"), slot.pop("choices"))
                item = self._items[n % SLOTS, k] = (drawn, event_driven.Prepared(**slot))
            yield item
        message = self._receive()
        if not (isinstance(message, tuple) and message[0] == "done"):
            raise PrefetchError(f"input prefetch worker sent {message!r} at the end")
        self.rng.bit_generator.state = message[1]

    def _release(self) -> None:
        with contextlib.suppress(OSError):  # it died: the next read says how
            os.write(self._stdin, b"r")  # unbuffered: one system call, no flush

    def _receive(self) -> object:
        try:
            message = _read(self._proc.stdout)
        except EOFError:
            code = self._proc.wait()
            raise PrefetchError(f"input prefetch worker exited (code {code})") from None
        if isinstance(message, tuple) and message[0] == "error":
            raise PrefetchError(f"input prefetch worker failed:\n{message[1]}")
        return message


if __name__ == "__main__":
    _work(sys.stdin.buffer, sys.stdout.buffer)
