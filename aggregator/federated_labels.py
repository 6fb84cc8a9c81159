"""Federated label assignment: the global model's labels from every node's labelled data.

A merged model keeps each neuron's label and class rates from the node that trained it,
measured on that node's shard alone; on skewed (non-IID) shards a neuron's label then
reflects which classes its node happened to see. The aggregator holds no data, so the
nodes measure instead: each runs the global model frozen on its labelled images and sends
two sums (``estdp.protocol.LabelStats``, computed by ``edge_node.daemon.label_statistics``)::

    n_k[c]       images of class c on node k
    S_k[c, j]    neuron j's spike counts summed over node k's images of class c

Pooled, these are exactly what :func:`edge_node.labels.assign_labels` would compute on
the union of the nodes' images, with the same conventions::

    rates[c, j] = sum_k S_k[c, j] / sum_k n_k[c]     (0 for a class no node has)
    label[j]    = argmax_c rates[c, j]               (-1 for a neuron that never fired;
                                                      the lowest class on a tie)

Per-class counts matter: averaging the nodes' own rates would weigh a node with 3 images
of a class like one with 3,000. Pure functions; the daemon (``aggregator.daemon``)
collects the statistics and publishes the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from edge_node.labels import labels_from_sums
from estdp.errors import MergeError
from estdp.lineage import CLASS_COUNTS_NOTE, format_class_counts
from estdp.model import SubModel, validate_model, with_notes
from estdp.protocol import LABEL_STATES, LABELS_FEDERATED, LABELS_NOTE


class PooledLabels(NamedTuple):
    """Labels and class rates pooled from several nodes' label statistics."""

    labels: np.ndarray  # (N,) int16, -1 for a neuron that never fired
    class_rates: np.ndarray  # (C, N) float32, mean spike count per class
    class_counts: np.ndarray  # (C,) int64, images per class over all nodes
    nodes: int  # statistics pooled
    images: int  # images behind them


def pool(stats: Sequence[tuple[np.ndarray, np.ndarray]]) -> PooledLabels:
    """Pool per-node ``(class_counts (C,), response_sums (C, N))`` into labels.

    Parameters
    ----------
    stats
        One pair per node, all of the same ``C`` and ``N``.

    Returns
    -------
    PooledLabels

    Raises
    ------
    MergeError
        No statistics, shapes that disagree, or negative or non-finite values.
    """
    if not stats:
        raise MergeError("no label statistics to pool")
    first_counts, first_sums = (np.asarray(a) for a in stats[0])
    if first_counts.ndim != 1 or first_sums.shape[:1] != first_counts.shape or first_sums.ndim != 2:
        raise MergeError(
            f"label statistics need counts (C,) and sums (C, N); got {first_counts.shape} "
            f"and {first_sums.shape}"
        )
    n_classes, n_neurons = first_sums.shape
    per_class = np.zeros(n_classes, np.int64)
    sums = np.zeros((n_classes, n_neurons), np.float64)
    for k, (counts_k, sums_k) in enumerate(stats):
        counts_k = np.asarray(counts_k)
        sums_k = np.asarray(sums_k, dtype=np.float64)
        if counts_k.shape != (n_classes,) or sums_k.shape != (n_classes, n_neurons):
            raise MergeError(
                f"label statistics {k} have shapes {counts_k.shape} and {sums_k.shape}; "
                f"expected ({n_classes},) and ({n_classes}, {n_neurons})"
            )
        if (counts_k < 0).any() or not np.isfinite(sums_k).all() or (sums_k < 0).any():
            raise MergeError(f"label statistics {k} hold negative or non-finite values")
        per_class += counts_k.astype(np.int64)
        sums += sums_k
    labels, rates = labels_from_sums(per_class, sums)  # as assign_labels on all the images
    return PooledLabels(
        labels=labels,
        class_rates=rates,
        class_counts=per_class,
        nodes=len(stats),
        images=int(per_class.sum()),
    )


def with_labels_note(model: SubModel, state: str, extra: dict[str, str] | None = None) -> SubModel:
    """``model`` with its provenance note ``labels`` set to ``state`` (and ``extra`` notes)."""
    if state not in LABEL_STATES:
        raise ValueError(f"labels state must be one of {', '.join(LABEL_STATES)}, got {state!r}")
    notes = {**model.provenance.notes, **(extra or {}), LABELS_NOTE: state}
    return with_notes(model, notes)


def relabel(model: SubModel, pooled: PooledLabels) -> SubModel:
    """``model`` with the pooled labels and class rates (same weights and thresholds),
    noted ``labels=federated`` with the pooled per-class counts.

    Raises
    ------
    MergeError
        The pooled statistics do not fit the model (classes or neurons).
    """
    want = (model.n_classes, model.n_neurons)
    if pooled.class_rates.shape != want:
        raise MergeError(
            f"label statistics for {pooled.class_rates.shape[1]} neurons and "
            f"{pooled.class_rates.shape[0]} classes do not fit a model of {want[1]} neurons "
            f"and {want[0]} classes"
        )
    relabelled = dataclasses.replace(
        model, labels=pooled.labels.copy(), class_rates=pooled.class_rates.copy()
    )
    relabelled = with_labels_note(
        relabelled,
        LABELS_FEDERATED,
        {CLASS_COUNTS_NOTE: format_class_counts(pooled.class_counts)},
    )
    validate_model(relabelled, error=MergeError)
    return relabelled


__all__ = ["PooledLabels", "pool", "relabel", "with_labels_note"]
