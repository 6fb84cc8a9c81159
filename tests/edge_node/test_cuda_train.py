"""The CUDA training kernel against its twins, on the CPU emulation and (marked gpu) a GPU.

Each comparison runs one body twice: with the kernels emulated on the CPU (NumPy arrays,
``tests/support/cuda_emu.py``) and with CuPy on a GPU when one is usable. The float64
kernel must follow :mod:`edge_node.reference` spike for spike from the same seed; the
float32 kernel must equal the float32 twin (``tests/support/stdp_twin.py``) bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_node import cuda_encode, cuda_train, reference
from edge_node.cuda_train import launch_train, train_images_cuda
from estdp.backend import gpu_available, to_host
from estdp.errors import BackendUnavailable, ConfigError
from estdp.params import NetworkParams

# Small networks with strong input so that a few dozen steps give plenty of spikes.
SMALL = NetworkParams(n_input=80, time_steps=40, intensity=1000.0, norm=8.0)


def _problem(params: NetworkParams, n: int, n_images: int, seed: int = 1, scale: float = 0.3):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_images, params.n_input)).astype(np.uint8)
    return images, rng.random((params.n_input, n)) * scale, rng.random(n) * 2.0


@pytest.mark.parametrize(
    ("params", "n", "threads"),
    [
        pytest.param(SMALL, 70, 64, id="more-neurons-than-threads"),
        pytest.param(
            SMALL.replace(n_input=75, one_spike=False, refrac=0), 40, 32, id="all-above-fire"
        ),
        pytest.param(
            NetworkParams(
                preset="paper",
                n_input=64,
                time_steps=30,
                rest_steps=20,
                intensity=40.0,
                intensity_boost=1500.0,
                min_spikes=5,
                max_presentations=3,
                norm=6.4,
                tc_theta=500.0,
            ),
            50,
            64,
            id="paper-re-presentation",
        ),
    ],
)
def test_float64_kernel_follows_the_reference_spike_for_spike(xp, params, n, threads) -> None:
    images, w0, th0 = _problem(params, n, 4)
    w_ref, th_ref, counts_ref = reference.train_reference(
        w0, th0, images, params, rng=np.random.default_rng(5)
    )
    got = train_images_cuda(
        w0,
        th0,
        images,
        params,
        rng=np.random.default_rng(5),
        draw="host",
        dtype=np.float64,
        threads=threads,
    )
    np.testing.assert_array_equal(to_host(got.counts), counts_ref)
    np.testing.assert_allclose(to_host(got.weights), w_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(to_host(got.thetas), th_ref, rtol=1e-12, atol=1e-13)
    assert counts_ref.sum() >= 5 * len(images)  # the comparison saw real activity
    if params.min_spikes:  # and re-presentations happened
        once = params.replace(max_presentations=1)
        _, _, counts_once = reference.train_reference(
            w0, th0, images, once, rng=np.random.default_rng(5)
        )
        assert (counts_once.sum(axis=1) < params.min_spikes).any()


def _random_inputs(params: NetworkParams, n_images: int, n_pres: int, density: float, seed: int):
    rng = np.random.default_rng(seed)
    bits = rng.random((n_images, n_pres, params.time_steps, params.n_input)) < density
    return bits, rng.random((n_images, n_pres, params.time_steps))


@pytest.mark.parametrize("one_spike", [True, False])
def test_float32_kernel_equals_the_float32_twin(xp, twin, one_spike: bool) -> None:
    params = SMALL.replace(n_input=90, time_steps=35, min_spikes=25, one_spike=one_spike, norm=60.0)
    bits, choices = _random_inputs(params, 3, 3, 0.12, seed=2)
    bits[0, 0] = False  # a silent first presentation forces a re-presentation
    _, w0, th0 = _problem(params, 45, 0, seed=3)
    w0 = w0.astype(np.float32)
    w0[:3, :4] = 1.5  # out of range: clipped on the first step, as the spec clips every step
    th0 = th0.astype(np.float32)
    expected = twin.simulate(w0, th0, bits, choices, params, learning=True)

    w, th = xp.asarray(w0), xp.asarray(th0)
    counts = xp.zeros((3, 45), dtype=np.int32)
    shown = xp.zeros(3, dtype=np.int32)
    spikes = xp.asarray(cuda_encode.pack_spike_bits(bits))
    launch_train(w, th, spikes, xp.asarray(choices), counts, shown, params, threads=32)
    np.testing.assert_array_equal(to_host(shown), expected.shown)
    np.testing.assert_array_equal(to_host(counts), expected.counts)
    np.testing.assert_array_equal(to_host(th), expected.thetas)
    np.testing.assert_array_equal(to_host(w), expected.weights)
    assert expected.shown[0] >= 2 and expected.counts.sum() > 0
    assert to_host(w).max() > params.w_max  # the last normalisation is left unclipped


def test_training_changes_weights_and_keeps_column_sums(xp) -> None:
    images, w0, th0 = _problem(SMALL, 30, 3, seed=4)
    got = train_images_cuda(
        w0, th0, images, SMALL, rng=np.random.default_rng(0), chunk=2, threads=32
    )
    w = to_host(got.weights)
    assert w.dtype == np.float32 and w.shape == (80, 30)
    np.testing.assert_allclose(w.sum(axis=0), SMALL.norm, rtol=1e-5)
    assert not np.allclose(w, w0 * (SMALL.norm / w0.sum(axis=0)))
    assert to_host(got.counts).shape == (3, 30) and to_host(got.counts).sum() > 0
    assert (to_host(got.thetas) >= th0.astype(np.float32) * 0.99).all()


def test_device_draws_are_reproducible(xp) -> None:
    images, w0, th0 = _problem(SMALL, 20, 2, seed=5)
    one = train_images_cuda(w0, th0, images, SMALL, rng=np.random.default_rng(7), threads=32)
    two = train_images_cuda(w0, th0, images, SMALL, rng=np.random.default_rng(7), threads=32)
    np.testing.assert_array_equal(to_host(one.weights), to_host(two.weights))
    np.testing.assert_array_equal(to_host(one.counts), to_host(two.counts))


def test_progress_reports_every_image(xp, monkeypatch) -> None:
    if xp is np:  # the emulation has no CUDA events; stand in for them
        monkeypatch.setattr(np, "cuda", _FakeCuda, raising=False)
    params = SMALL.replace(time_steps=10)
    images, w0, th0 = _problem(params, 10, 5, seed=6)
    seen: list[int] = []
    train_images_cuda(
        w0,
        th0,
        images,
        params,
        rng=np.random.default_rng(0),
        chunk=2,
        progress=seen.append,
        threads=32,
    )
    assert seen == [2, 4, 5]


class _FakeCuda:
    class Event:
        def record(self) -> None:
            pass

        def synchronize(self) -> None:
            pass


def test_launch_refuses_wrong_arrays(xp) -> None:
    w = xp.zeros((80, 8), dtype=np.float32)
    th = xp.zeros(8, dtype=np.float32)
    counts = xp.zeros((1, 8), dtype=np.int32)
    shown = xp.zeros(1, dtype=np.int32)
    spikes = xp.zeros((1, 1, SMALL.time_steps, 3), dtype=np.uint32)
    choices = xp.zeros((1, 1, SMALL.time_steps))

    def launch(**changes):
        args = dict(
            weights=w, thetas=th, spikes=spikes, choices=choices, counts=counts, shown=shown
        )
        args.update(changes)
        launch_train(params=SMALL, **{"threads": 32, **args})

    launch(threads=32)  # the baseline is accepted
    with pytest.raises(ConfigError, match="thetas must be float32, got float64"):
        launch(thetas=th.astype(np.float64))  # checked against the weights' dtype
    with pytest.raises(ConfigError, match="weights must be a (numpy|cupy) array"):
        launch(weights=[[0.0] * 8] * 80)
    with pytest.raises(ConfigError, match=r"weights must have shape \(80, \*\)"):
        launch(weights=xp.zeros((81, 8), dtype=np.float32))
    with pytest.raises(ConfigError, match="float32 or float64, not int32"):
        launch(weights=xp.zeros((80, 8), dtype=np.int32))
    with pytest.raises(ConfigError, match="C-contiguous"):
        launch(weights=xp.zeros((8, 80), dtype=np.float32).T)
    with pytest.raises(ConfigError, match=r"counts must have shape \(1, 8\)"):
        launch(counts=xp.zeros((1, 9), dtype=np.int32))
    with pytest.raises(ConfigError, match=r"spikes must have shape \(1, P >= 1, 40, 3\)"):
        launch(spikes=xp.zeros((1, 1, 40, 4), dtype=np.uint32))
    with pytest.raises(ConfigError, match=r"choices must have shape \(1, 1, 40\)"):
        launch(choices=xp.zeros((1, 2, 40)))
    with pytest.raises(ConfigError, match="multiple of 32"):
        launch_train(w, th, spikes, choices, counts, shown, SMALL, threads=48)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"v_rest": -50.0}, "v_rest < v_thresh"),
        ({"theta_plus": -0.1}, "theta_plus >= 0"),
        ({"n_input": 5000}, "at most 4096 inputs"),
    ],
)
def test_parameters_the_kernel_cannot_take_are_refused(changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        cuda_train.check_params(NetworkParams(**changes))


def test_wrapper_refusals_before_any_gpu_work(xp) -> None:
    images, w0, th0 = _problem(SMALL, 6, 1)
    with pytest.raises(ConfigError, match="draw must be"):
        train_images_cuda(w0, th0, images, SMALL, rng=np.random.default_rng(0), draw="gpu")
    with pytest.raises(ConfigError, match=r"images must have shape \(n_images, 80\)"):
        train_images_cuda(w0, th0, images[:, :-1], SMALL, rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="rng must be"):
        train_images_cuda(w0, th0, images, SMALL, rng="seed")
    with pytest.raises(ConfigError, match="thetas"):
        train_images_cuda(w0, th0[:-1], images, SMALL, rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="NaN or inf"):
        train_images_cuda(w0 * np.nan, th0, images, SMALL, rng=np.random.default_rng(0))


def test_shared_memory_layout_is_checked_by_the_kernel(xp, monkeypatch) -> None:
    # If the host's layout and the kernel's disagreed, the kernel would flag it in shown[0].
    monkeypatch.setattr(cuda_train, "shared_bytes", lambda n, n_in, size: 64)
    w = xp.zeros((80, 8), dtype=np.float32)
    shown = xp.zeros(1, dtype=np.int32)
    launch_train(
        w,
        xp.zeros(8, dtype=np.float32),
        xp.zeros((1, 1, 40, 3), dtype=np.uint32),
        xp.zeros((1, 1, 40)),
        xp.zeros((1, 8), dtype=np.int32),
        shown,
        SMALL,
        threads=32,
    )
    assert int(to_host(shown)[0]) == -1


@pytest.mark.skipif(gpu_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_the_cause_is_reported() -> None:
    images, w0, th0 = _problem(SMALL, 6, 1)
    with pytest.raises(BackendUnavailable, match="CUDA kernels cannot run"):
        train_images_cuda(w0, th0, images, SMALL, rng=np.random.default_rng(0))
