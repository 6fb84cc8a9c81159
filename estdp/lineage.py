"""What a trained model records, in its provenance notes, about the data and model it
came from.

- ``class_counts``: ``"n0,n1,..."``, the labelled images per class its labels and class
  rates were assigned from (so that rates measured on different nodes can be pooled);
- ``continued_from``: :func:`parent_tag` of the model its training started from, when it
  continued one (a round's global model), so that the aggregator knows which updates are
  siblings (:mod:`aggregator.average`).
"""

from __future__ import annotations

import hashlib

import numpy as np

from estdp.model import SubModel

PARENT_NOTE = "continued_from"
CLASS_COUNTS_NOTE = "class_counts"


def parent_tag(model: SubModel) -> str:
    """A short digest of ``model``'s weights and thresholds, naming it as a parent."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(model.weights, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(model.thetas, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def format_class_counts(counts: np.ndarray) -> str:
    """Per-class image counts as the note ``"n0,n1,..."``."""
    return ",".join(str(int(c)) for c in np.asarray(counts).ravel())


def class_counts(model: SubModel) -> np.ndarray | None:
    """The per-class image counts a model's class rates come from, or None if unknown."""
    text = model.provenance.notes.get(CLASS_COUNTS_NOTE)
    if not text:
        return None
    try:
        counts = np.array([int(part) for part in text.split(",")], dtype=np.int64)
    except ValueError:
        return None
    if counts.shape != (model.n_classes,) or (counts < 0).any():
        return None
    return counts


__all__ = ["CLASS_COUNTS_NOTE", "PARENT_NOTE", "class_counts", "format_class_counts", "parent_tag"]
