"""Label assignment and the two classification schemes of Diehl & Cook (2015).

As BindsNET's ``bindsnet.evaluation`` (``assign_labels``, ``all_activity``,
``proportion_weighting``), on spike counts summed over the presentation:

- class rate of neuron j for class c: ``r[c, j] = mean_{n: y_n = c} counts[n, j]``
  (0 for a class with no image);
- proportions: ``p[c, j] = r[c, j] / sum_c' r[c', j]`` (0 for a neuron that never fired);
- label of neuron j: ``argmax_c r[c, j]`` (the same as the argmax of ``p``); a neuron that
  never fired gets -1 here (BindsNET assigns it class 0, which only adds noise);
- all activity: ``score[n, c] = sum_{j: label_j = c} counts[n, j] / #{j: label_j = c}``;
- proportion weighting: ``score[n, c] = sum_{j: label_j = c} p[c, j] counts[n, j] /
  #{j: label_j = c}``;
- prediction: ``argmax_c score[n, c]``, the lowest class on a tie (a class with no
  neuron scores 0).
"""

from __future__ import annotations

import numpy as np

from estdp.errors import ConfigError


def assign_labels(
    spike_counts: np.ndarray, labels: np.ndarray, n_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Assign each neuron the class it responds to most, on average.

    Parameters
    ----------
    spike_counts
        (n, N) spike counts of N neurons on n images.
    labels
        (n,) integer class of each image, in ``[0, n_classes)``.
    n_classes
        Number of classes.

    Returns
    -------
    tuple
        ``(neuron_labels, class_rates)``: (N,) int16 class of each neuron (-1 when it never
        fired) and (n_classes, N) float32 mean spike count per class.
    """
    return labels_from_sums(*class_sums(spike_counts, labels, n_classes))


def class_sums(
    spike_counts: np.ndarray, labels: np.ndarray, n_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Images per class and each neuron's spike counts summed per class.

    Kept apart from their quotient so that sums from several nodes pool exactly
    (:mod:`aggregator.federated_labels`).

    Returns
    -------
    tuple
        ``(per_class (n_classes,) int64, sums (n_classes, N) float64)``.

    Raises
    ------
    ConfigError
        The shapes disagree or a label is out of range.
    """
    counts, labels = _check(spike_counts, labels, n_classes)
    sums = np.zeros((n_classes, counts.shape[1]))
    np.add.at(sums, labels, counts)
    return np.bincount(labels, minlength=n_classes).astype(np.int64), sums


def labels_from_sums(per_class: np.ndarray, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and class rates from per-class image counts (C,) and response sums (C, N).

    ``rates = sums / per_class`` (0 for a class without images); each neuron gets the class
    of its highest rate, the lowest on a tie, or -1 when it never fired.

    Returns
    -------
    tuple
        ``(neuron_labels (N,) int16, class_rates (C, N) float32)``.
    """
    per_class = np.asarray(per_class, dtype=np.float64)
    rates = np.asarray(sums, dtype=np.float64) / np.maximum(per_class, 1.0)[:, None]
    neuron_labels = np.where(rates.max(axis=0) > 0.0, rates.argmax(axis=0), -1)
    return neuron_labels.astype(np.int16), rates.astype(np.float32)


def predict_all_activity(
    spike_counts: np.ndarray, neuron_labels: np.ndarray, n_classes: int = 10
) -> np.ndarray:
    """Predict the class whose neurons fired most on average ("all activity").

    Parameters
    ----------
    spike_counts
        (n, N) spike counts.
    neuron_labels
        (N,) class of each neuron, -1 for unassigned neurons (ignored).
    n_classes
        Number of classes.

    Returns
    -------
    numpy.ndarray
        (n,) int64 predicted classes.
    """
    members = _membership(neuron_labels, spike_counts, n_classes)
    return _argmax(np.asarray(spike_counts, dtype=np.float64) @ members)


def predict_proportion_weighting(
    spike_counts: np.ndarray,
    neuron_labels: np.ndarray,
    class_rates: np.ndarray,
    n_classes: int = 10,
) -> np.ndarray:
    """Predict with each neuron's spikes weighted by its class proportion.

    Parameters
    ----------
    spike_counts
        (n, N) spike counts.
    neuron_labels
        (N,) class of each neuron, -1 for unassigned neurons (ignored).
    class_rates
        (n_classes, N) mean spike count of each neuron per class (from
        :func:`assign_labels`).
    n_classes
        Number of classes.

    Returns
    -------
    numpy.ndarray
        (n,) int64 predicted classes.
    """
    rates = np.asarray(class_rates, dtype=np.float64)
    if rates.shape != (n_classes, np.shape(neuron_labels)[0]):
        raise ConfigError(
            f"class_rates must be ({n_classes}, {np.shape(neuron_labels)[0]}), got {rates.shape}"
        )
    totals = rates.sum(axis=0)
    proportions = np.divide(rates, totals, out=np.zeros_like(rates), where=totals > 0.0)
    members = _membership(neuron_labels, spike_counts, n_classes) * proportions.T
    return _argmax(np.asarray(spike_counts, dtype=np.float64) @ members)


def _check(
    spike_counts: np.ndarray, labels: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    counts = np.asarray(spike_counts, dtype=np.float64)
    labels = np.asarray(labels)
    if counts.ndim != 2 or labels.shape != (counts.shape[0],):
        raise ConfigError(
            f"spike counts (n, N) and labels (n,) do not match: {counts.shape} and {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ConfigError(
            f"labels must lie in [0, {n_classes}), got {labels.min()}..{labels.max()}"
        )
    return counts, labels.astype(np.int64)


def _membership(neuron_labels: np.ndarray, spike_counts: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, n_classes) matrix: 1 / (neurons of class c) where neuron j has class c."""
    neuron_labels = np.asarray(neuron_labels)
    if np.ndim(spike_counts) != 2 or neuron_labels.shape != (np.shape(spike_counts)[1],):
        raise ConfigError(
            f"spike counts (n, N) and neuron labels (N,) do not match: "
            f"{np.shape(spike_counts)} and {neuron_labels.shape}"
        )
    members = (neuron_labels[:, None] == np.arange(n_classes)).astype(np.float64)
    sizes = members.sum(axis=0)
    return members / np.maximum(sizes, 1.0)


def _argmax(scores: np.ndarray) -> np.ndarray:
    return scores.argmax(axis=1).astype(np.int64)
