r"""Manhattan distances between neurons on the GPU, as a tiled "GEMM" with ``|a - b|``.

For two blocks of neurons given by their input weight columns, ``X`` (K, A) and
``Y`` (K, B)::

    D[a, b] = sum_k |X[k, a] - Y[k, b]|

(the seed's Manhattan distance: the sum, not the mean, of absolute differences). Each
thread block computes a 64 x 64 tile of ``D``: it stages 16 rows of the 64 columns of
``X`` and of ``Y`` in shared memory per round, and each of its 256 threads accumulates a
4 x 4 sub-tile in registers, in the order k = 0, 1, ... (float32). The tile's columns are
interleaved across threads (thread ``tx`` owns columns ``tx, tx+16, tx+32, tx+48``), so
the shared-memory reads of a warp fall on distinct banks or broadcast.

The columns may be a slice of a larger C-ordered matrix (``W[:, a0:a1]``): the kernel
takes the row stride, so blocks of a model are compared without copies.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_node import cuda_common
from estdp.errors import ConfigError

MANHATTAN_SOURCE = r"""
#define TILE 64     // outputs per block along each side
#define KSTEP 16    // rows of X and Y staged per round
#define SIDE 16     // threads per block along each side; each owns TILE / SIDE = 4 outputs

extern "C" __global__ void __launch_bounds__(256) manhattan_tiles(
    const float* __restrict__ x, const long long ldx,   // (k, a), row stride ldx
    const float* __restrict__ y, const long long ldy,   // (k, b), row stride ldy
    float* __restrict__ out, const long long ldo,       // (a, b), row stride ldo
    const int k, const int a, const int b)
{
    extern __shared__ __align__(16) unsigned char smem[];
    float* xs = (float*)smem;               // [KSTEP][TILE]
    float* ys = xs + KSTEP * TILE;          // [KSTEP][TILE]
    const int tx = threadIdx.x % SIDE;
    const int ty = threadIdx.x / SIDE;
    const int a0 = blockIdx.y * TILE;
    const int b0 = blockIdx.x * TILE;

    float acc[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;

    for (int k0 = 0; k0 < k; k0 += KSTEP) {
        // 256 threads stage 16 x 64 values of each operand, 4 each, along contiguous columns.
        for (int e = threadIdx.x; e < KSTEP * TILE; e += blockDim.x) {
            const int kk = e / TILE;
            const int col = e % TILE;
            const int row = k0 + kk;
            xs[e] = (row < k && a0 + col < a) ? x[(long long)row * ldx + a0 + col] : 0.0f;
            ys[e] = (row < k && b0 + col < b) ? y[(long long)row * ldy + b0 + col] : 0.0f;
        }
        __syncthreads();
        const int kmax = k - k0 < KSTEP ? k - k0 : KSTEP;
        for (int kk = 0; kk < kmax; ++kk) {
            float xv[4], yv[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) xv[r] = xs[kk * TILE + ty + SIDE * r];
#pragma unroll
            for (int c = 0; c < 4; ++c) yv[c] = ys[kk * TILE + tx + SIDE * c];
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[r][c] += fabsf(xv[r] - yv[c]);
        }
        __syncthreads();   // the next round overwrites the staged rows
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int ia = a0 + ty + SIDE * r;
        if (ia >= a) continue;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int ib = b0 + tx + SIDE * c;
            if (ib < b) out[(long long)ia * ldo + ib] = acc[r][c];
        }
    }
}
"""

TILE = 64
KSTEP = 16
THREADS = 256
SHARED_BYTES = 2 * KSTEP * TILE * 4


def _columns(name: str, array: Any, xp: Any) -> Any:
    """``array`` as float32 (K, n) with unit column stride (a C-ordered slice is kept)."""
    shape = getattr(array, "shape", None)
    if shape is None or len(shape) != 2:
        raise ConfigError(f"{name} must be a 2-D (inputs, neurons) array, got shape {shape}")
    arr = xp.asarray(array)
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    if arr.strides[1] != 4 or arr.strides[0] % 4 or arr.strides[0] < 4 * max(1, arr.shape[1]):
        arr = xp.ascontiguousarray(arr)
    return arr


def manhattan_cuda(x: Any, y: Any = None, *, out: Any = None) -> Any:
    """Manhattan distance between every column of ``x`` and every column of ``y``.

    Parameters
    ----------
    x
        (K, A) input weights of A neurons (one column each); CuPy or NumPy, cast to
        float32. A column slice of a C-ordered matrix is used in place.
    y
        (K, B) weights of B neurons; ``x`` itself when omitted.
    out
        Optional (A, B) float32 C-ordered device array to write into.

    Returns
    -------
    array
        (A, B) float32 device array, ``D[a, b] = sum_k |x[k, a] - y[k, b]|``. NaN in the
        weights propagates; callers that must refuse NaN check before.
    """
    xp = cuda_common.device_xp()
    xs = _columns("x", x, xp)
    ys = xs if y is None else _columns("y", y, xp)
    if xs.shape[0] != ys.shape[0]:
        raise ConfigError(
            f"x and y must have the same number of inputs (rows), got {xs.shape[0]} and {ys.shape[0]}"
        )
    k, a, b = int(xs.shape[0]), int(xs.shape[1]), int(ys.shape[1])
    if out is None:
        out = xp.empty((a, b), dtype=np.float32)
    else:
        cuda_common.require_array(xp, "out", out, np.float32, (a, b))
    if a == 0 or b == 0:
        return out
    if k == 0:
        out[...] = 0
        return out
    kernel = cuda_common.get_kernel(MANHATTAN_SOURCE, "manhattan_tiles")
    kernel(
        (-(-b // TILE), -(-a // TILE)),
        (THREADS,),
        (
            xs,
            np.int64(xs.strides[0] // 4),
            ys,
            np.int64(ys.strides[0] // 4),
            out,
            np.int64(b),
            np.int32(k),
            np.int32(a),
            np.int32(b),
        ),
        shared_mem=SHARED_BYTES,
    )
    return out


def manhattan_reference(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """The NumPy twin of :func:`manhattan_cuda` (float64 accumulation), for small inputs."""
    x64 = np.asarray(x, dtype=np.float64)
    y64 = x64 if y is None else np.asarray(y, dtype=np.float64)
    return np.abs(x64[:, :, None] - y64[:, None, :]).sum(axis=0)
