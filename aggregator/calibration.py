r"""Threshold calibration: the merged model's adaptive thresholds, re-measured by the nodes.

A neuron's adaptive threshold ``theta`` grows by ``theta_plus`` at each of its spikes
(and decays slowly), so it records how many images its node showed it. Sub-models of
unequal shards (non-IID partitions) come with thresholds of unequal height, and after
a merge the neurons of the boards that saw most images hardly ever win the lateral
inhibition: the merged network runs on a fraction of its neurons (docs/merge.md,
"Threshold calibration"). The aggregator holds no images, so the nodes re-measure:

1. The merged model is published provisional with the note :data:`CALIBRATE_NOTE`
   (``calibrate=<N>``, images per node).
2. Node k runs a thresholds-only pass (STDP off, ``nu_pre = nu_post = 0``; only theta
   adapts) over ``m_k = min(N, its shard)`` of its images, starting from the merged
   model's weights and thresholds, and sends its thresholds ``theta_k`` with its label
   statistics (``LabelStats.thetas``, ``LabelStats.calibration_images``).
3. The aggregator averages them, weighted by the images behind them::

       theta[j] = sum_k m_k theta_k[j] / sum_k m_k

   and the labels are then assigned on the model with these thresholds (a second
   provisional model, labelled as usual: ``aggregator.federated_labels``).

Pure functions; the daemon (``aggregator.daemon``) collects the answers and publishes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from estdp.errors import MergeError
from estdp.model import SubModel, validate_model, with_notes
from estdp.protocol import CALIBRATE_NOTE, LabelStats

# Images per node of the pass, unless told otherwise (docs/merge.md, "Threshold
# calibration": measured on 5 x 100 IID and Dirichlet 0.5, and 2 x 250).
DEFAULT_IMAGES = 1500

# The final model's note: "<images>/<nodes>", the calibration behind its thresholds.
CALIBRATED_NOTE = "calibrated"


class AveragedThetas(NamedTuple):
    """Thresholds averaged from the nodes' calibration passes."""

    thetas: np.ndarray  # (N,) float64
    nodes: tuple[str, ...]  # the nodes averaged, sorted
    images: int  # calibration images behind them


def requested(model: SubModel, images: int) -> SubModel:
    """``model`` with the note asking each node for a thresholds-only pass over ``images``
    of its images (the model must be published provisional for the nodes to answer)."""
    if images < 1:
        raise ValueError(f"calibration images must be >= 1, got {images}")
    return with_notes(model, {**model.provenance.notes, CALIBRATE_NOTE: str(int(images))})


def without_request(model: SubModel) -> SubModel:
    """``model`` without the note asking for a calibration (``model`` itself if it has none)."""
    if CALIBRATE_NOTE not in model.provenance.notes:
        return model
    notes = {k: v for k, v in model.provenance.notes.items() if k != CALIBRATE_NOTE}
    return with_notes(model, notes)


def problem(stats: LabelStats, n_neurons: int) -> str:
    """Why ``stats`` cannot count as a calibration of a model of ``n_neurons`` neurons
    ("" if it can)."""
    if stats.thetas is None:
        return "no thresholds (the node ran no calibration pass)"
    thetas = np.asarray(stats.thetas)
    if thetas.shape != (n_neurons,):
        return f"thresholds of shape {thetas.shape} where the model has ({n_neurons},)"
    if not np.isfinite(thetas).all():
        return "thresholds hold NaN or inf"
    if (thetas < 0).any():
        return "thresholds hold negative values (theta only grows from >= 0)"
    if stats.calibration_images < 1:
        return f"{stats.calibration_images} calibration images"
    return ""


def average_thetas(stats: Mapping[str, LabelStats], n_neurons: int) -> AveragedThetas:
    """Average the nodes' calibrated thresholds, weighted by their calibration images.

    Parameters
    ----------
    stats
        Label statistics by node id; each must pass :func:`problem` (the daemon checks
        before it stores them).

    Raises
    ------
    MergeError
        No statistics, or some that do not pass :func:`problem`.
    """
    if not stats:
        raise MergeError("no calibrated thresholds to average")
    total = np.zeros(n_neurons, np.float64)
    images = 0
    for node, s in sorted(stats.items()):
        why = problem(s, n_neurons)
        if why:
            raise MergeError(f"calibration from {node}: {why}")
        total += s.calibration_images * np.asarray(s.thetas, np.float64)
        images += int(s.calibration_images)
    return AveragedThetas(total / images, tuple(sorted(stats)), images)


def calibrated(model: SubModel, averaged: AveragedThetas) -> SubModel:
    """``model`` with the averaged thresholds, the request note dropped and the note
    :data:`CALIBRATED_NOTE` (``<images>/<nodes>``) added. Weights and labels unchanged.

    Raises
    ------
    MergeError
        The thresholds do not fit the model.
    """
    if averaged.thetas.shape != (model.n_neurons,):
        raise MergeError(
            f"{averaged.thetas.shape[0]} thresholds for a model of {model.n_neurons} neurons"
        )
    notes = {**without_request(model).provenance.notes}
    notes[CALIBRATED_NOTE] = f"{averaged.images}/{len(averaged.nodes)}"
    out = with_notes(model, notes, thetas=averaged.thetas.astype(model.thetas.dtype))
    validate_model(out, error=MergeError)
    return out


__all__ = [
    "CALIBRATED_NOTE",
    "DEFAULT_IMAGES",
    "AveragedThetas",
    "average_thetas",
    "calibrated",
    "problem",
    "requested",
    "without_request",
]
