"""Atomic file writes: readers see the old file or the new one, never a partial one.

The data goes to a temporary file in the destination's directory (so that the final
rename stays on one file system), is flushed and fsync'ed, and then replaces the
destination with ``os.replace``, which POSIX and Windows both perform atomically. The
directory is fsync'ed afterwards (where the platform allows) so that the rename itself
survives a power cut. If anything fails before the rename, the temporary file is removed
and the destination is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "temp_prefix"]


def _default_mode() -> int:
    # mkstemp creates files 0600; a normal open() would give 0666 minus the umask. The
    # umask can only be read by setting it, so read it once, at import.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_DEFAULT_MODE = _default_mode()


def temp_prefix(path: str | os.PathLike[str]) -> str:
    """The name prefix of the temporary files written on the way to ``path``.

    Hidden (leading dot) so that directory listings and globs such as ``*.estdp`` skip
    them; tests use it to check that nothing is left behind.
    """
    return f".{Path(path).name}."


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the data is safe
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[BinaryIO]:
    """Open a binary file whose content replaces ``path`` only when the block succeeds.

    Parameters
    ----------
    path
        Destination file. Its directory must exist.
    mode
        Permission bits of the new file; default: those of the file being replaced, else
        0666 minus the umask (what ``open`` would give).

    Yields
    ------
    BinaryIO
        A file open for writing. If the block raises, the temporary file is removed, the
        destination keeps its old content (or stays absent), and the exception propagates.

    Examples
    --------
    >>> with atomic_open("model.estdp") as f:  # doctest: +SKIP
    ...     f.write(payload)
    """
    dest = Path(path)
    directory = dest.parent
    if mode is None:
        try:
            mode = os.stat(dest).st_mode & 0o7777
        except OSError:
            mode = _DEFAULT_MODE
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=temp_prefix(dest), suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        # BaseException too: a KeyboardInterrupt mid-write must not leave a temp file.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(directory)


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes | bytearray | memoryview, *, mode: int | None = None
) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`).

    Raises
    ------
    OSError
        The directory is missing or not writable, the disk is full, ...; ``path`` is
        unchanged and no temporary file is left.
    """
    with atomic_open(path, mode=mode) as handle:
        handle.write(data)


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", mode: int | None = None
) -> None:
    """Write ``text`` to ``path`` atomically, encoded with ``encoding``."""
    atomic_write_bytes(path, text.encode(encoding), mode=mode)
