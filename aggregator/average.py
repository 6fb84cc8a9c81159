r"""Merging sub-models that continued the same global model: neuron-wise averages.

From the second round on, every node starts from the global model of the round before
and trains it on its own data, so neuron ``j`` of every update descends from neuron ``j``
of that global model. Concatenating the K updates and pruning back would keep one of K
siblings and throw away what the others learnt (measured: 88.2% after 5 x 300 -> 300,
below each node's own 88.5-89.1%). Averaging the siblings keeps it all. With ``m_k`` the
labelled images node k learnt from in this round (the sum of its class counts) and
``n_k(c)`` those of class c::

    W[:, j]     = sum_k m_k W_k[:, j] / sum_k m_k
    theta[j]    = sum_k m_k theta_k[j] / sum_k m_k
    rate[c, j]  = sum_k n_k(c) rate_k[c, j] / sum_k n_k(c)       (0 when no node saw c)
    label[j]    = argmax_c rate[c, j]                             (-1 when all are 0)

Each ``rate_k`` is node k's mean response of the neurons to its images of each class, so
``rate`` is the mean response over every node's images of that class: the labels the
pooled data would give, without pooling it (per class counts matter under non-IID
shards, where one node may hold most images of a class). Columns of ``W`` keep their sum
(each ``W_k`` is normalised to the same ``norm``), so nothing is renormalised.

Which updates qualify: every one names, in its provenance notes, the same parent
(:func:`estdp.lineage.parent_tag` of the global model it continued), has that model's
neuron count, and carries its class counts (:data:`estdp.lineage.CLASS_COUNTS_NOTE`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edge_node.labels import labels_from_sums
from estdp.errors import MergeError
from estdp.lineage import CLASS_COUNTS_NOTE, PARENT_NOTE, class_counts, format_class_counts
from estdp.model import SubModel, new_model


def siblings(models: Sequence[SubModel]) -> bool:
    """Whether ``models`` all continued one parent and can be averaged (see module doc)."""
    if not models:
        return False
    first = models[0]
    parent = first.provenance.notes.get(PARENT_NOTE)
    if not parent:
        return False
    for model in models:
        if (
            model.provenance.notes.get(PARENT_NOTE) != parent
            or model.n_neurons != first.n_neurons
            or model.n_input != first.n_input
            or model.params != first.params
            or class_counts(model) is None
            or class_counts(model).sum() == 0
        ):
            return False
    return True


def average(
    models: Sequence[SubModel],
    *,
    node_id: str = "aggregator",
    round: int = 0,
    seed: int = 0,
    notes: Mapping[str, str] | None = None,
) -> SubModel:
    """Neuron-wise average of sibling updates, weighted by their images (module doc).

    Raises
    ------
    MergeError
        The models are not siblings (:func:`siblings`), or hold non-finite values.
    """
    if not siblings(models):
        raise MergeError(
            "models to average must all continue the same global model, with the same "
            "neurons, parameters and per-class image counts"
        )
    counts = np.stack([class_counts(m) for m in models]).astype(np.float64)  # (K, C)
    share = counts.sum(axis=1) / counts.sum()
    weights = sum(s * m.weights.astype(np.float64) for s, m in zip(share, models, strict=True))
    thetas = sum(s * m.thetas.astype(np.float64) for s, m in zip(share, models, strict=True))
    per_class = counts.sum(axis=0)  # (C,)
    rate_sums = sum(
        counts[k][:, None] * m.class_rates.astype(np.float64) for k, m in enumerate(models)
    )
    labels, rates = labels_from_sums(per_class, rate_sums)
    if not (np.isfinite(weights).all() and np.isfinite(thetas).all()):
        raise MergeError("averaged weights or thresholds are not finite")
    sources = tuple(m.provenance.node_id for m in models)
    merged = new_model(
        weights,
        thetas,
        models[0].params,
        node_id=node_id,
        # every update counts the parent's images too: count those once
        images_seen=int(models[0].provenance.images_seen - counts[0].sum() + counts.sum()),
        seed=seed,
        labels=labels,
        class_rates=rates,
        round=round,
        notes={
            "merge": "average",
            "averaged": ",".join(sources),
            CLASS_COUNTS_NOTE: format_class_counts(per_class),
            **dict(notes or {}),
        },
    )
    return merged


__all__ = ["average", "siblings"]
