"""Atomic writes: the destination is the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import stat

import pytest

from estdp import atomic
from estdp.atomic import atomic_open, atomic_write_bytes, atomic_write_text, temp_prefix


def leftovers(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(temp_prefix(path)))


def test_writes_new_file_with_normal_permissions(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert leftovers(target) == []
    # mkstemp makes 0600 files; the result must look like any file open() creates.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_replaces_existing_file_and_keeps_its_mode(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_text(target, "new ünïcode")
    assert target.read_text(encoding="utf-8") == "new ünïcode"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert leftovers(target) == []


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_failure_midway_keeps_old_file_and_removes_temp(tmp_path, exc_type):
    target = tmp_path / "model.estdp"
    target.write_bytes(b"old content")
    with pytest.raises(exc_type), atomic_open(target) as handle:
        handle.write(b"half of the new")
        assert leftovers(target), "the data should go to a temporary file first"
        raise exc_type("boom")
    assert target.read_bytes() == b"old content"
    assert leftovers(target) == []


def test_failing_rename_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "model.estdp"
    target.write_bytes(b"old")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(PermissionError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert leftovers(target) == []


def test_failing_fsync_creates_nothing(tmp_path, monkeypatch):
    target = tmp_path / "fresh.bin"

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"data")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_raises_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "nope" / "out.bin", b"x")
    assert list(tmp_path.iterdir()) == []


def test_explicit_mode(tmp_path):
    target = tmp_path / "secret"
    atomic_write_bytes(target, b"k", mode=0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
