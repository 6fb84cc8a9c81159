"""Run the kernels once on the CPU emulation built with ThreadSanitizer (see cuda_emu.py).

    ESTDP_CUDA_EMU_TSAN=1 LD_PRELOAD=$(g++ -print-file-name=libtsan.so) python race_check.py

Covers every phase of every kernel: training with one spike and with all above-threshold
neurons firing, re-presentations and normalisation, inference, the spike packing and the
Manhattan tiles; then a control kernel that lacks a barrier, which must be reported.
Prints ``control`` just before the control launch.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"estdp_test_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


RACY = r"""
extern "C" __global__ void racy(int* out, const int n) {
    extern __shared__ __align__(16) unsigned char smem[];
    int* s = (int*)smem;
    s[threadIdx.x] = threadIdx.x;
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x] + n;   // no barrier before the read
}
"""


def main() -> int:
    emu = _load("cuda_emu")
    assert emu.SANITIZE, "set ESTDP_CUDA_EMU_TSAN=1"
    from aggregator.cuda_similarity import manhattan_cuda
    from edge_node import cuda_common, cuda_encode
    from edge_node.cuda_infer import launch_infer
    from edge_node.cuda_train import launch_train
    from estdp.params import NetworkParams

    emulator = emu.Emulator(emu.all_sources())
    cuda_common.device_xp = lambda: np
    cuda_common.get_kernel = emulator.get_kernel
    rng = np.random.default_rng(0)
    base = NetworkParams(n_input=70, time_steps=12, intensity=1000.0, norm=40.0, min_spikes=6)
    for one_spike in (True, False):
        params = base.replace(one_spike=one_spike)
        bits = cuda_encode.pack_spike_bits(rng.random((2, 2, 12, 70)) < 0.15)
        choices = rng.random((2, 2, 12))
        w = (rng.random((70, 40)) * 0.3).astype(np.float32)
        th = np.zeros(40, np.float32)
        counts, shown = np.zeros((2, 40), np.int32), np.zeros(2, np.int32)
        launch_train(w, th, bits, choices, counts, shown, params, threads=32)
        launch_infer(w, th, bits, choices, params, threads=32)
        print(f"one_spike={one_spike}: {int(counts.sum())} spikes", flush=True)
    images = rng.integers(0, 256, (2, 70)).astype(np.uint8)
    cuda_encode.draw_device_spikes(images, base, 2, np.random.RandomState(1), np)
    manhattan_cuda(rng.random((20, 70), dtype=np.float32))
    print("control", flush=True)
    control = emu.Emulator([RACY]).get_kernel(RACY, "racy")
    control((1,), (64,), (np.zeros(64, np.int32), np.int32(0)), shared_mem=256)
    return 0


if __name__ == "__main__":
    sys.exit(main())
