"""The three phases of the Diehl & Cook protocol as one call each: train, assign labels, test.

These tie the engine (trainer, inference, labels) to the model container so that the CLI,
the node daemon and the simulator all run the same code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_node import inference, labels, native_kernels, trainer
from estdp.backend import Backend, to_host
from estdp.errors import ConfigError
from estdp.lineage import CLASS_COUNTS_NOTE, PARENT_NOTE, format_class_counts, parent_tag
from estdp.model import SubModel, new_model
from estdp.params import NetworkParams

log = logging.getLogger(__name__)

N_CLASSES = 10


@dataclass(frozen=True)
class Evaluation:
    """Accuracy of a model on a labelled set, by both classification schemes."""

    n_images: int
    all_activity: float
    proportion_weighting: float
    seconds: float

    def to_dict(self) -> dict[str, float | int]:
        return {
            "n_images": self.n_images,
            "accuracy_all_activity": self.all_activity,
            "accuracy_proportion_weighting": self.proportion_weighting,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class TrainingRun:
    model: SubModel
    train_seconds: float
    label_seconds: float


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(images.shape[0], -1)


def train_model(
    images: np.ndarray,
    image_labels: np.ndarray,
    n_neurons: int,
    params: NetworkParams,
    backend: Backend,
    *,
    seed: int = 0,
    node_id: str = "local",
    start: SubModel | None = None,
    progress: Callable[[int], None] | None = None,
    round_id: int = 0,
    prefetch: bool = False,
) -> TrainingRun:
    """Train on ``images`` (one pass), then assign labels from a frozen pass over them.

    ``start`` continues from an existing model (e.g. the global model of a round); its
    size then fixes ``n_neurons``. ``prefetch``: on the NumPy backend, draw and prepare
    the next images' inputs in a second process when that gains
    (:mod:`edge_node.prefetch`; the same result either way).
    """
    if images.shape[0] != image_labels.shape[0]:
        raise ConfigError(f"{images.shape[0]} images but {image_labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise ConfigError("no training images")
    rng = np.random.default_rng(seed)
    if start is not None:
        if start.params != params:
            log.info("continuing from a model trained with other parameters; using the model's")
            params = start.params
        weights, thetas = start.weights.copy(), start.thetas.copy()
        n_neurons = start.n_neurons
        seen_before = start.provenance.images_seen
    else:
        if n_neurons < 1:
            raise ConfigError(f"--neurons must be >= 1, got {n_neurons}")
        weights, thetas = trainer.init_weights(n_neurons, params, rng)
        seen_before = 0
    flat = _flat(images)
    t0 = time.perf_counter()
    weights, thetas = _learn(weights, thetas, flat, params, backend, rng, progress, prefetch)
    train_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    counts = spike_counts(weights, thetas, flat, params, backend, seed=seed + 1)
    neuron_labels, class_rates = labels.assign_labels(counts, image_labels, N_CLASSES)
    label_seconds = time.perf_counter() - t1
    model = new_model(
        weights,
        thetas,
        params,
        node_id=node_id,
        images_seen=seen_before + int(images.shape[0]),
        seed=seed,
        labels=neuron_labels,
        class_rates=class_rates,
        round=round_id,
        notes=lineage_notes(image_labels, start),
    )
    return TrainingRun(model=model, train_seconds=train_seconds, label_seconds=label_seconds)


def _learn(
    weights: np.ndarray,
    thetas: np.ndarray,
    flat: np.ndarray,
    params: NetworkParams,
    backend: Backend,
    rng: np.random.Generator,
    progress: Callable[[int], None] | None = None,
    prefetch: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One pass of STDP over ``flat`` on ``backend``: (weights, thetas) on the host."""
    if backend.is_gpu:
        from edge_node.cuda_train import train_images_cuda

        weights, thetas, _ = train_images_cuda(
            weights, thetas, flat, params, rng=rng, progress=progress
        )
        return to_host(weights), to_host(thetas)
    result = trainer.train(
        weights,
        thetas,
        flat,
        params,
        rng=rng,
        progress=progress,
        native=backend.is_native,
        prefetch=prefetch,
    )
    return result.weights, result.thetas


def calibrate_thetas(
    model: SubModel, images: np.ndarray, backend: Backend, *, seed: int = 0
) -> np.ndarray:
    """The thresholds of ``model`` after a thresholds-only pass over ``images``.

    The network runs as in training but with both learning rates at zero, so the weights
    stay as they are and only the adaptive thresholds move: each neuron's theta grows by
    ``theta_plus`` per spike it wins *in this population*. A merged model holds neurons
    whose thresholds were set by different amounts of different data; this pass puts
    them on one footing (docs/merge.md).

    Returns
    -------
    numpy.ndarray
        (N,) float64 thresholds; ``model`` is not modified.
    """
    if images.shape[0] == 0:
        return np.asarray(model.thetas, dtype=np.float64).copy()
    frozen = model.params.replace(nu_pre=0.0, nu_post=0.0)
    _, thetas = _learn(
        model.weights.copy(),
        model.thetas.copy(),
        _flat(images),
        frozen,
        backend,
        np.random.default_rng(seed),
    )
    return np.asarray(thetas, dtype=np.float64)


def lineage_notes(image_labels: np.ndarray, start: SubModel | None) -> dict[str, str]:
    """Provenance notes of a trained model: the per-class counts of the images its labels
    come from and, when it continued a model, that model's tag (see :mod:`estdp.lineage`)."""
    notes = {CLASS_COUNTS_NOTE: format_class_counts(np.bincount(image_labels, minlength=N_CLASSES))}
    if start is not None:
        notes[PARENT_NOTE] = parent_tag(start)
    return notes


def spike_counts(
    weights: np.ndarray,
    thetas: np.ndarray,
    images: np.ndarray,
    params: NetworkParams,
    backend: Backend,
    *,
    seed: int = 0,
) -> np.ndarray:
    """Spike counts (n_images, n_neurons) with frozen weights, batched, on ``backend``."""
    rng = np.random.default_rng(seed)
    flat = _flat(images)
    if backend.is_gpu:
        from edge_node.cuda_infer import spike_counts_cuda

        return to_host(spike_counts_cuda(weights, thetas, flat, params, rng=rng))
    if backend.is_native:
        return native_kernels.spike_counts(weights, thetas, flat, params, rng=rng)
    return to_host(inference.spike_counts(weights, thetas, flat, params, rng=rng))


def evaluate_model(
    model: SubModel,
    images: np.ndarray,
    image_labels: np.ndarray,
    backend: Backend,
    *,
    seed: int = 0,
) -> Evaluation:
    """Accuracy of ``model`` (its own neuron labels) on a labelled set, both schemes."""
    if images.shape[0] != image_labels.shape[0]:
        raise ConfigError(f"{images.shape[0]} images but {image_labels.shape[0]} labels")
    t0 = time.perf_counter()
    counts = spike_counts(model.weights, model.thetas, images, model.params, backend, seed=seed)
    return score_counts(counts, image_labels, model, seconds=time.perf_counter() - t0)


def score_counts(
    counts: np.ndarray, image_labels: np.ndarray, model: SubModel, *, seconds: float = 0.0
) -> Evaluation:
    """Both accuracies from spike counts already simulated for ``model``."""
    all_act = labels.predict_all_activity(counts, model.labels, N_CLASSES)
    prop = labels.predict_proportion_weighting(counts, model.labels, model.class_rates, N_CLASSES)
    n = int(image_labels.shape[0])
    return Evaluation(
        n_images=n,
        all_activity=float(np.mean(all_act == image_labels)) if n else 0.0,
        proportion_weighting=float(np.mean(prop == image_labels)) if n else 0.0,
        seconds=seconds,
    )
