"""The CUDA inference kernel against its twins, on the CPU emulation and (marked gpu) a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node import cuda_encode, reference
from edge_node.cuda_infer import launch_infer, spike_counts_cuda
from edge_node.encoding import draw_presentation
from estdp.backend import to_host
from estdp.errors import ConfigError
from estdp.params import NetworkParams

SMALL = NetworkParams(n_input=80, time_steps=40, intensity=1000.0, norm=8.0)


def _model(params: NetworkParams, n: int, seed: int):
    rng = np.random.default_rng(seed)
    w = rng.random((params.n_input, n)) * 0.3
    return w * (params.norm / w.sum(axis=0)), rng.random(n) * 3.0, rng


@pytest.mark.parametrize(
    ("params", "n"),
    [
        pytest.param(SMALL, 70, id="one-spike"),
        pytest.param(SMALL.replace(n_input=75, one_spike=False, refrac=1), 40, id="all-above-fire"),
    ],
)
def test_float64_counts_follow_the_reference(xp, params: NetworkParams, n: int) -> None:
    w, th, rng = _model(params, n, seed=1)
    images = rng.integers(0, 256, (5, params.n_input)).astype(np.uint8)
    gen = np.random.default_rng(9)
    expected = np.array(
        [
            reference.run_image(
                w, th, d.dense(params.n_input), d.choices, params, learning=False
            ).spikes.sum(axis=0)
            for d in (draw_presentation(im, params, gen, params.intensity) for im in images)
        ]
    )
    got = spike_counts_cuda(
        w,
        th,
        images,
        params,
        rng=np.random.default_rng(9),
        draw="host",
        dtype=np.float64,
        batch_size=2,
        threads=32,
    )
    np.testing.assert_array_equal(to_host(got), expected)
    assert expected.sum() > 5 * len(images)


def test_float32_kernel_equals_the_twin_with_re_presentations(xp, twin) -> None:
    params = SMALL.replace(n_input=70, time_steps=30, min_spikes=12)
    w, th, rng = _model(params, 45, seed=2)
    w, th = w.astype(np.float32), th.astype(np.float32)
    bits = rng.random((4, 3, params.time_steps, params.n_input)) < 0.1
    bits[1, 0] = False  # silent: image 1 needs another presentation
    choices = rng.random((4, 3, params.time_steps))
    expected = twin.simulate(w, th, bits, choices, params, learning=False)
    got = launch_infer(
        xp.asarray(w),
        xp.asarray(th),
        xp.asarray(cuda_encode.pack_spike_bits(bits)),
        xp.asarray(choices),
        params,
        threads=64,
    )
    np.testing.assert_array_equal(to_host(got.shown), expected.shown)
    np.testing.assert_array_equal(to_host(got.counts), expected.counts)
    assert expected.shown[1] >= 2 and expected.counts.sum() > 0


def test_weights_and_thetas_are_not_modified(xp) -> None:
    w, th, rng = _model(SMALL, 20, seed=3)
    w32, th32 = xp.asarray(w.astype(np.float32)), xp.asarray(th.astype(np.float32))
    before = to_host(w32).copy(), to_host(th32).copy()
    images = rng.integers(0, 256, (3, 80)).astype(np.uint8)
    counts = spike_counts_cuda(w32, th32, images, SMALL, rng=np.random.default_rng(0), threads=32)
    assert to_host(counts).shape == (3, 20) and to_host(counts).dtype == np.int32
    np.testing.assert_array_equal(to_host(w32), before[0])
    np.testing.assert_array_equal(to_host(th32), before[1])


def test_host_draws_do_not_depend_on_the_batch_size(xp) -> None:
    w, th, rng = _model(SMALL, 16, seed=4)
    images = rng.integers(0, 256, (5, 80)).astype(np.uint8)
    runs = [
        to_host(
            spike_counts_cuda(
                w,
                th,
                images,
                SMALL,
                rng=np.random.default_rng(1),
                draw="host",
                batch_size=size,
                threads=32,
            )
        )
        for size in (1, 2, 5)
    ]
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])


def test_refusals(xp) -> None:
    w, th, rng = _model(SMALL, 8, seed=5)
    images = rng.integers(0, 256, (2, 80)).astype(np.uint8)
    call = dict(rng=np.random.default_rng(0), threads=32)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        spike_counts_cuda(w, th, images, SMALL, batch_size=0, **call)
    with pytest.raises(ConfigError, match="draw must be"):
        spike_counts_cuda(w, th, images, SMALL, draw="cpu", **call)
    with pytest.raises(ConfigError, match="at most 256 threads"):
        spike_counts_cuda(w, th, images, SMALL, **{**call, "threads": 512})
    with pytest.raises(ConfigError, match=r"weights must have shape \(80, N >= 1\)"):
        spike_counts_cuda(w[:-1], th, images, SMALL, **call)
    with pytest.raises(ConfigError, match=r"thetas must have shape \(8,\)"):
        spike_counts_cuda(w, th[:-1], images, SMALL, **call)
    with pytest.raises(ConfigError, match="float32 or float64"):
        spike_counts_cuda(w, th, images, SMALL, dtype=np.float16, **call)
    spikes = xp.zeros((2, 1, SMALL.time_steps, 3), dtype=np.uint32)
    with pytest.raises(ConfigError, match=r"choices must have shape \(2, 1, 40\)"):
        launch_infer(xp.asarray(w), xp.asarray(th), spikes, xp.zeros((2, 1, 39)), SMALL)
