"""The blocked Manhattan-distance kernel: nvcc build, CPU emulation and (marked gpu) a GPU."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from aggregator.cuda_similarity import MANHATTAN_SOURCE, manhattan_cuda, manhattan_reference
from edge_node.cuda_common import NVCC_OPTIONS
from estdp.backend import gpu_available, to_host
from estdp.errors import BackendUnavailable, ConfigError


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_source_compiles_for_orin_and_sm90() -> None:
    gencode = []
    for arch in ("87", "90"):
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    result = subprocess.run(
        ["nvcc", "-fatbin", *NVCC_OPTIONS, "-Werror", "all-warnings", *gencode]
        + ["-o", "/dev/null", "-x", "cu", "-"],
        input=MANHATTAN_SOURCE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_the_slides_example_gives_0_4(xp) -> None:
    # Weight 1 = [[0.1, 0.2], [0.3, 0.4]], weight 2 = [[0.2, 0.3], [0.1, 0.4]], flattened.
    x = np.array([[0.1, 0.2], [0.2, 0.3], [0.3, 0.1], [0.4, 0.4]], dtype=np.float32)
    d = to_host(manhattan_cuda(xp.asarray(x)))
    np.testing.assert_allclose(d, [[0.0, 0.4], [0.4, 0.0]], atol=1e-6)


@pytest.mark.parametrize(("k", "a", "b"), [(1, 1, 1), (17, 65, 3), (40, 70, 130), (33, 128, 64)])
def test_matches_the_reference_on_ragged_tiles(xp, k: int, a: int, b: int) -> None:
    rng = np.random.default_rng(k + a + b)
    x = rng.random((k, a), dtype=np.float32)
    y = rng.random((k, b), dtype=np.float32)
    d = to_host(manhattan_cuda(xp.asarray(x), xp.asarray(y)))
    assert d.shape == (a, b) and d.dtype == np.float32
    np.testing.assert_allclose(d, manhattan_reference(x, y), rtol=2e-6, atol=1e-6)


def test_column_slices_are_read_in_place_and_out_is_filled(xp) -> None:
    rng = np.random.default_rng(0)
    w = xp.asarray(rng.random((50, 200), dtype=np.float32))
    out = xp.full((40, 70), -1.0, dtype=np.float32)
    got = manhattan_cuda(w[:, 10:50], w[:, 120:190], out=out)
    assert got is out
    host = to_host(w)
    np.testing.assert_allclose(
        to_host(out), manhattan_reference(host[:, 10:50], host[:, 120:190]), rtol=2e-6
    )


def test_self_distances_are_symmetric_with_zero_diagonal(xp) -> None:
    x = np.random.default_rng(1).random((30, 90)).astype(np.float64)  # cast to float32
    d = to_host(manhattan_cuda(xp.asarray(x)))
    assert d.dtype == np.float32
    np.testing.assert_array_equal(np.diag(d), 0.0)
    np.testing.assert_allclose(d, d.T, rtol=1e-6)


def test_empty_inputs(xp) -> None:
    assert to_host(manhattan_cuda(xp.zeros((5, 0), np.float32))).shape == (0, 0)
    d = to_host(manhattan_cuda(xp.zeros((0, 3), np.float32), xp.zeros((0, 2), np.float32)))
    np.testing.assert_array_equal(d, np.zeros((3, 2)))


def test_refusals(xp) -> None:
    x = xp.zeros((4, 3), np.float32)
    with pytest.raises(ConfigError, match="same number of inputs"):
        manhattan_cuda(x, xp.zeros((5, 3), np.float32))
    with pytest.raises(ConfigError, match="x must be a 2-D"):
        manhattan_cuda(xp.zeros(4, np.float32))
    with pytest.raises(ConfigError, match=r"out must have shape \(3, 3\)"):
        manhattan_cuda(x, out=xp.zeros((3, 4), np.float32))
    with pytest.raises(ConfigError, match="out must be float32"):
        manhattan_cuda(x, out=xp.zeros((3, 3), np.float64))


@pytest.mark.gpu
def test_a_model_sized_block_on_the_gpu() -> None:
    if not gpu_available():
        pytest.skip("no CUDA GPU usable through CuPy (estdp.backend.gpu_available() is False)")
    import cupy

    rng = np.random.default_rng(2)
    w = rng.random((784, 500), dtype=np.float32) * 0.3
    d = to_host(manhattan_cuda(cupy.asarray(w)))
    ref = manhattan_reference(w[:, :64], w)
    np.testing.assert_allclose(d[:64], ref, rtol=1e-5)


@pytest.mark.skipif(gpu_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_the_cause_is_reported() -> None:
    with pytest.raises(BackendUnavailable, match="CUDA kernels cannot run"):
        manhattan_cuda(np.zeros((3, 2), np.float32))
