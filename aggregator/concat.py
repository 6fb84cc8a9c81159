"""Concatenation of sub-models into one model (slides, step 2), and taking a subset of it.

For K models with weights ``W_k`` (d, n_k), the concatenated model has::

    W = [W_1 | W_2 | ... | W_K]      (d, n_1 + ... + n_K)
    theta, labels, origin_* = the per-neuron arrays joined in the same order
    class_rates = [R_1 | ... | R_K]  (C, n)

and its provenance lists every node a neuron comes from: ``sources`` is the union of the
inputs' sources in order of first appearance, and neuron ``j`` came from node
``sources[origin_node[j]]``, where it was neuron ``origin_index[j]``. A merged model
concatenated again keeps pointing at the original nodes. ``images_seen`` is the sum over
the inputs.

Inputs must agree on ``n_input``, on every network parameter and on the number of classes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import fields

import numpy as np

from estdp.errors import MergeError
from estdp.model import Provenance, SubModel, validate_model

AGGREGATOR_ID = "aggregator"


def _params_difference(a: SubModel, b: SubModel) -> str:
    diffs = [
        f"{f.name}={getattr(a.params, f.name)!r} vs {getattr(b.params, f.name)!r}"
        for f in fields(a.params)
        if getattr(a.params, f.name) != getattr(b.params, f.name)
    ]
    return ", ".join(diffs)


def concatenate(
    models: Sequence[SubModel],
    *,
    node_id: str = AGGREGATOR_ID,
    seed: int = 0,
    round: int | None = None,
    notes: Mapping[str, str] | None = None,
    created_unix: float | None = None,
) -> SubModel:
    """Join sub-models side by side, with the provenance of every neuron.

    Parameters
    ----------
    models
        One or more valid models with equal ``n_input``, parameters and class count.
    node_id, seed, notes
        Provenance of the result.
    round
        Federated round of the result (default: the largest round of the inputs).
    created_unix
        Creation time (default: now).

    Returns
    -------
    SubModel
        With ``n_neurons`` the sum of the inputs'.

    Raises
    ------
    MergeError
        No models, an invalid model, or inputs that disagree (the values are named).
    """
    if len(models) == 0:
        raise MergeError("no models to concatenate")
    for k, model in enumerate(models):
        if not isinstance(model, SubModel):
            raise MergeError(f"input {k} is a {type(model).__name__}, not a SubModel")
        try:
            validate_model(model, error=MergeError)
        except MergeError as exc:
            name = getattr(getattr(model, "provenance", None), "node_id", "?")
            raise MergeError(f"input {k} ({name!r}): {exc}") from None
    first = models[0]
    for k, model in enumerate(models[1:], start=1):
        if model.n_input != first.n_input:
            raise MergeError(
                f"input {k} ({model.provenance.node_id}) has n_input {model.n_input}, "
                f"input 0 ({first.provenance.node_id}) has {first.n_input}"
            )
        if model.params != first.params:
            raise MergeError(
                f"input {k} ({model.provenance.node_id}) was trained with other network "
                f"parameters than input 0: {_params_difference(model, first)}"
            )
        if model.n_classes != first.n_classes:
            raise MergeError(
                f"input {k} has {model.n_classes} classes, input 0 has {first.n_classes}"
            )

    sources: list[str] = []
    position: dict[str, int] = {}
    origin_node = []
    for model in models:
        # Map each input's own source indices into the union, in order of first appearance.
        local = np.empty(len(model.provenance.sources), dtype=np.int32)
        for s, name in enumerate(model.provenance.sources):
            if name not in position:
                position[name] = len(sources)
                sources.append(name)
            local[s] = position[name]
        origin_node.append(local[model.origin_node])

    merged = SubModel(
        weights=np.concatenate([m.weights for m in models], axis=1).astype(np.float32, copy=False),
        thetas=np.concatenate([m.thetas for m in models]).astype(np.float32, copy=False),
        labels=np.concatenate([m.labels for m in models]).astype(np.int16, copy=False),
        class_rates=np.concatenate([m.class_rates for m in models], axis=1).astype(
            np.float32, copy=False
        ),
        params=first.params,
        provenance=Provenance(
            node_id=node_id,
            images_seen=int(sum(int(m.provenance.images_seen) for m in models)),
            seed=int(seed),
            sources=tuple(sources),
            round=int(max(m.provenance.round for m in models) if round is None else round),
            created_unix=time.time() if created_unix is None else float(created_unix),
            notes=dict(notes or {}),
        ),
        origin_node=np.concatenate(origin_node).astype(np.int32, copy=False),
        origin_index=np.concatenate([m.origin_index for m in models]).astype(np.int32, copy=False),
    )
    validate_model(merged, error=MergeError)
    return merged


def take_neurons(
    model: SubModel,
    keep: np.ndarray,
    *,
    notes: Mapping[str, str] | None = None,
    labels: np.ndarray | None = None,
    class_rates: np.ndarray | None = None,
) -> SubModel:
    """The model restricted to neurons ``keep`` (in the order given), same provenance.

    ``labels`` and ``class_rates``, when given, replace the kept neurons' own (e.g. labels
    re-assigned from a calibration set). Sources no kept neuron comes from stay listed.
    """
    keep = np.asarray(keep, dtype=np.int64)
    if keep.ndim != 1 or (keep.size and (keep.min() < 0 or keep.max() >= model.n_neurons)):
        raise MergeError(f"neuron indices must lie in [0, {model.n_neurons})")
    if np.unique(keep).size != keep.size:
        raise MergeError("neuron indices to keep must be distinct")
    prov = model.provenance
    out = SubModel(
        weights=np.ascontiguousarray(model.weights[:, keep]),
        thetas=model.thetas[keep],
        labels=(model.labels[keep] if labels is None else np.asarray(labels)).astype(np.int16),
        class_rates=np.ascontiguousarray(
            model.class_rates[:, keep] if class_rates is None else class_rates, dtype=np.float32
        ),
        params=model.params,
        provenance=Provenance(
            node_id=prov.node_id,
            images_seen=prov.images_seen,
            seed=prov.seed,
            sources=prov.sources,
            round=prov.round,
            format_version=prov.format_version,
            created_unix=prov.created_unix,
            notes={**prov.notes, **dict(notes or {})},
        ),
        origin_node=model.origin_node[keep],
        origin_index=model.origin_index[keep],
    )
    validate_model(out, error=MergeError)
    return out


__all__ = ["AGGREGATOR_ID", "concatenate", "take_neurons"]
