"""No data races in the CUDA kernels: ThreadSanitizer over the CPU emulation.

On the emulation a CUDA thread is a std::thread and a barrier a std::barrier, so
ThreadSanitizer sees exactly the ordering the kernels rely on: two threads touching the
same shared or global memory without a barrier between them is reported, whichever order
they happened to run in. A control kernel with a missing barrier must be reported, so that
the check can fail.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "support" / "race_check.py"
REPO = Path(__file__).resolve().parents[2]


def _emulation_builds() -> bool:
    spec = importlib.util.spec_from_file_location(
        "estdp_test_cuda_emu", SCRIPT.with_name("cuda_emu.py")
    )
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module.available()


def _libtsan() -> str | None:
    if shutil.which("g++") is None or not _emulation_builds():
        return None
    path = subprocess.run(
        ["g++", "-print-file-name=libtsan.so"], capture_output=True, text=True
    ).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.slow
def test_kernels_have_no_data_races() -> None:
    libtsan = _libtsan()
    if libtsan is None:
        pytest.skip("g++ with ThreadSanitizer (libtsan) is needed")
    env = dict(os.environ, ESTDP_CUDA_EMU_TSAN="1", LD_PRELOAD=libtsan)
    env["TSAN_OPTIONS"] = "halt_on_error=0 report_signal_unsafe=0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=240
    )
    output = result.stdout + result.stderr
    assert "control" in result.stdout, output[-4000:]
    ours, control = output.split("control", 1)
    assert "one_spike=False" in ours, output[-4000:]
    assert "ThreadSanitizer" not in ours, ours[-6000:]
    assert "WARNING: ThreadSanitizer: data race" in control, control[-4000:]
