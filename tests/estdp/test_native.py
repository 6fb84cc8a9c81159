"""Building, caching and choosing the native C kernels."""

from __future__ import annotations

import os

import pytest

from estdp import backend, native
from estdp.errors import BackendUnavailable

needs_cc = pytest.mark.skipif(not native.usable()[0], reason="no working C compiler")

SOURCE = "int twice(int x) { return 2 * x; }\n"


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache and no library or compiler remembered by this process."""
    monkeypatch.setenv("ESTDP_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_LIBRARIES", {})
    monkeypatch.setattr(native, "_COMPILER", [])
    return tmp_path / "cache"


@needs_cc
def test_a_source_is_compiled_once_and_then_loaded_from_the_cache(fresh, monkeypatch):
    library = native.load(SOURCE)
    assert library.twice(21) == 42
    built = list(fresh.glob("kernels-*.so"))
    assert len(built) == 1
    assert not [p for p in fresh.iterdir() if p.name.startswith(".")]  # no temporary left

    monkeypatch.setattr(native, "_LIBRARIES", {})  # a new process: loads, does not build
    monkeypatch.setattr(native, "_build", lambda *a: pytest.fail("rebuilt a cached library"))
    assert native.load(SOURCE).twice(5) == 10


@needs_cc
def test_a_source_that_does_not_compile_is_reported(fresh):
    with pytest.raises(BackendUnavailable, match="failed to compile"):
        native.load("int broken( { return; }\n")
    assert not list(fresh.glob("*.so")) and not list(fresh.glob(".*"))


def test_a_missing_compiler_is_reported(fresh, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/estdp-cc")
    ok, why = native.usable()
    assert not ok and "no C compiler" in why
    with pytest.raises(BackendUnavailable, match="no C compiler"):
        native.load(SOURCE)


def test_asking_for_native_without_a_compiler_fails_with_the_cause(fresh, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/estdp-cc")
    with pytest.raises(BackendUnavailable, match="'native' requested but unavailable: no C"):
        backend.resolve_backend("native")
    if not backend.gpu_available():
        assert backend.resolve_backend("auto").name == "numpy"


@needs_cc
def test_auto_prefers_native_to_numpy_without_a_gpu():
    if backend.gpu_available():
        pytest.skip("a GPU is usable: auto picks cupy")
    chosen = backend.resolve_backend("auto")
    assert chosen.name == "native" and chosen.is_native and not chosen.is_gpu
    assert backend.resolve_backend("native").xp.__name__ == "numpy"


def test_the_cache_lives_in_the_user_cache_unless_overridden(monkeypatch, tmp_path):
    monkeypatch.delenv("ESTDP_NATIVE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.cache_dir() == tmp_path / "ensemble-stdp" / "native"
    monkeypatch.setenv("ESTDP_NATIVE_CACHE", os.fspath(tmp_path / "x"))
    assert native.cache_dir() == tmp_path / "x"
