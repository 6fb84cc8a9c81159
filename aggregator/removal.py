"""Neuron removal: walk the ranked pairs and drop one neuron of each (slides, step 4).

Pairs ``(i, j)``, ``i < j`` in concatenation order, arrive most alike first (see
:mod:`aggregator.similarity` for the order). The walk keeps a set of live neurons and,
for each pair:

- when both neurons are alive, removes one of them, chosen by the *rule*;
- when either is already gone, skips the pair (its similarity says nothing about the
  neurons that remain);

and stops after ``r = n - target`` removals.

Rules, each a *strength* per neuron; the weaker neuron of a pair goes, and on equal
strength the later one (``j``) goes:

- ``later``: no strength; always drop ``j`` (the seed's behaviour: keep the neuron seen first).
- ``activity``: strength = mean response over the classes (``class_rates.mean(0)``,
  spikes per image): drop the neuron that responds less. Without label statistics (all
  zeros) this is ``later``.
- ``theta``: strength = the adaptive threshold ``theta``, which grows with every spike in
  training: drop the neuron that fired less while learning.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from estdp.errors import ConfigError

RULES = ("later", "activity", "theta")
# The default of every entry point (merge(), estdp merge, the aggregator, simulate):
# measured on trained IID sub-models it kept 0.1-1.0 points more than ``later`` (5 x 100
# -> 300: 88.13% vs 87.74%; 2 x 250 -> 300: 89.88% vs 88.93%). Under non-IID shards
# (Dirichlet 0.5) ``later`` was better (81.06% vs 79.80%); see docs/results.md.
DEFAULT_RULE = "activity"


def check_rule(rule: str) -> str:
    """``rule`` when it is one of :data:`RULES`, else :class:`ConfigError`."""
    if rule not in RULES:
        raise ConfigError(f"unknown removal rule {rule!r}; choose one of {', '.join(RULES)}")
    return rule


def rule_strength(rule: str, thetas: np.ndarray, class_rates: np.ndarray) -> np.ndarray | None:
    """Per-neuron strength of ``rule`` (``None`` for ``later``).

    Parameters
    ----------
    rule
        One of :data:`RULES`.
    thetas
        (n,) adaptive thresholds of the concatenated model.
    class_rates
        (C, n) mean spike counts per class.

    Returns
    -------
    ndarray or None
        (n,) float64; the weaker neuron of a pair is removed.
    """
    check_rule(rule)
    if rule == "later":
        return None
    if rule == "theta":
        return np.asarray(thetas, dtype=np.float64)
    return np.asarray(class_rates, dtype=np.float64).mean(axis=0)


@dataclass(frozen=True)
class WalkResult:
    """What a walk did: the neurons it removed, in order, and the pairs it looked at."""

    removed: np.ndarray  # (removals,) int64, in the order they were removed
    consumed: int  # pairs taken from the stream, skipped ones included
    complete: bool  # True when it made all the removals asked for


def walk(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    n: int,
    n_remove: int,
    strength: np.ndarray | None = None,
) -> WalkResult:
    """Remove ``n_remove`` neurons, walking ranked pairs (see the module docstring).

    Parameters
    ----------
    pairs
        Chunks ``(rows, cols)`` of pairs ``i < j``, most alike first.
    n
        Number of neurons.
    n_remove
        Removals to make; 0 makes none and reads nothing.
    strength
        (n,) per-neuron strength of the rule, or ``None`` to always drop ``j``.

    Returns
    -------
    WalkResult
        ``complete`` is False when the pairs ran out first.
    """
    removed: list[int] = []
    consumed = 0
    if n_remove <= 0:
        return WalkResult(np.zeros(0, np.int64), 0, True)
    alive = bytearray(b"\x01") * n
    s = None if strength is None else np.asarray(strength, dtype=np.float64).tolist()
    append = removed.append
    for rows, cols in pairs:
        # Plain Python ints and a bytearray: this loop runs once per pair looked at.
        for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
            consumed += 1
            if alive[i] and alive[j]:
                loser = i if s is not None and s[i] < s[j] else j
                alive[loser] = 0
                append(loser)
                if len(removed) == n_remove:
                    return WalkResult(np.asarray(removed, np.int64), consumed, True)
    return WalkResult(np.asarray(removed, np.int64), consumed, False)


__all__ = ["DEFAULT_RULE", "RULES", "WalkResult", "check_rule", "rule_strength", "walk"]
