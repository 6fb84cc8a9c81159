"""Every CUDA source of edge_node compiles with nvcc for Jetson Orin (sm_87) and sm_90.

CuPy compiles the same text with NVRTC at run time; nvcc catches the same syntax and type
errors ahead of time on machines without a GPU. The sources include no headers, and the
options match :data:`edge_node.cuda_common.NVCC_OPTIONS`; warnings are errors. The float64
build of the training kernel stands for both float64 builds (the sources share their
constructs).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from edge_node.cuda_common import NVCC_OPTIONS
from edge_node.cuda_encode import PACK_SOURCE
from edge_node.cuda_infer import INFER_SOURCE
from edge_node.cuda_train import TRAIN_SOURCE

ARCHS = ("sm_87", "sm_90")


def nvcc_compile(source: str, real: str = "float") -> subprocess.CompletedProcess:
    """Compile ``source`` for both architectures into a fat binary that is thrown away."""
    gencode = []
    for arch in ARCHS:
        gencode += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
    cmd = ["nvcc", "-fatbin", *NVCC_OPTIONS, f"-DREAL={real}", "-Werror", "all-warnings"]
    return subprocess.run(
        [*cmd, *gencode, "-o", "/dev/null", "-x", "cu", "-"],
        input=source,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize(
    ("source", "real"),
    [
        pytest.param(TRAIN_SOURCE, "float", id="train-float"),
        pytest.param(TRAIN_SOURCE, "double", id="train-double"),
        pytest.param(INFER_SOURCE, "float", id="infer-float"),
        pytest.param(PACK_SOURCE, "float", id="pack"),
    ],
)
def test_source_compiles_for_orin_and_sm90(source: str, real: str) -> None:
    result = nvcc_compile(source, real)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_nvcc_rejects_a_broken_source() -> None:
    # The check above must be able to fail: a kernel using an undeclared name does not build.
    broken = 'extern "C" __global__ void k(float* x) { x[0] = undeclared; }'
    assert nvcc_compile(broken).returncode != 0
