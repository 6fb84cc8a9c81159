"""Data partitions: which training images each simulated node "captures".

Every partitioner is a pure function of a label array, a node count and a seed; it
returns one index array per node (indices into ``labels``), in the order the node
streams them. The shards are pairwise disjoint. Within a shard the order is shuffled,
because STDP learns from the stream in order and a class-sorted stream would let the
last class overwrite the others.

Schemes
-------
``iid``
    A seeded permutation of all indices cut into ``n_nodes`` near-equal parts.
``contiguous``
    Consecutive blocks in the original order (the seed's split of the first N images;
    MNIST's training order is already shuffled, so this is IID in practice).
``classes:C``
    Per-class shards (McMahan et al. 2017): indices sorted by class, cut into
    ``n_nodes * C`` equal shards, each node gets ``C`` of them at random, so it sees
    about ``C`` classes.
``dirichlet:ALPHA``
    Non-IID by class proportions: for every class ``k`` draw
    ``p_k ~ Dirichlet(alpha * 1_n)`` and give node ``i`` the share ``p_ki`` of the
    images of class ``k`` (rounded by cumulative sums so every image goes to exactly one
    node). Small ``alpha`` (0.1) gives nodes dominated by one or two classes; large
    ``alpha`` (100) approaches IID.
``unequal:SIGMA``
    IID content with unequal sizes: node shares ``s_i ∝ exp(sigma * z_i)``,
    ``z_i ~ N(0, 1)`` (log-normal), each node keeping at least one image.
``sizes:F1,F2,...``
    IID content with explicit size fractions (normalised to sum to 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from estdp.errors import ConfigError

SCHEMES = ("iid", "contiguous", "classes", "dirichlet", "unequal", "sizes")


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition scheme: its name and its one numeric argument (or fractions)."""

    scheme: str = "iid"
    value: float | None = None
    fractions: tuple[float, ...] = ()

    def __str__(self) -> str:
        if self.scheme == "sizes":
            return "sizes:" + ",".join(f"{f:g}" for f in self.fractions)
        if self.value is None:
            return self.scheme
        return f"{self.scheme}:{self.value:g}"


def parse_spec(text: str) -> PartitionSpec:
    """Parse ``iid``, ``contiguous``, ``classes:C``, ``dirichlet:A``, ``unequal:S``, ``sizes:F,...``.

    Raises
    ------
    ConfigError
        Unknown scheme, missing or invalid argument.
    """
    name, sep, arg = text.strip().partition(":")
    name = name.lower()
    if name not in SCHEMES:
        raise ConfigError(f"unknown partition {text!r}; choose one of {', '.join(SCHEMES)}")
    if name in ("iid", "contiguous"):
        if sep:
            raise ConfigError(f"partition {name!r} takes no argument, got {text!r}")
        return PartitionSpec(name)
    defaults = {"classes": "2", "dirichlet": "0.5", "unequal": "1.0"}
    if not arg:
        if name == "sizes":
            raise ConfigError("partition 'sizes' needs fractions, e.g. sizes:0.5,0.3,0.2")
        arg = defaults[name]
    if name == "sizes":
        try:
            fractions = tuple(float(part) for part in arg.split(","))
        except ValueError:
            raise ConfigError(f"partition sizes: bad fractions {arg!r}") from None
        if any(not f > 0 or not np.isfinite(f) for f in fractions):
            raise ConfigError(f"partition sizes: fractions must be > 0, got {arg!r}")
        return PartitionSpec(name, fractions=fractions)
    try:
        value = float(arg)
    except ValueError:
        raise ConfigError(f"partition {name}: expected a number, got {arg!r}") from None
    # sigma = 0 is a valid (equal-size) unequal split; the others need a positive value.
    lowest_ok = 0.0 if name == "unequal" else np.nextafter(0.0, 1.0)
    if not np.isfinite(value) or value < lowest_ok:
        bound = ">= 0" if name == "unequal" else "> 0"
        raise ConfigError(f"partition {name}: argument must be {bound}, got {arg!r}")
    if name == "classes" and not value.is_integer():
        raise ConfigError(f"partition classes: expected a whole number, got {arg!r}")
    return PartitionSpec(name, value)


def partition(
    labels: np.ndarray, n_nodes: int, spec: PartitionSpec | str, *, seed: int = 0
) -> list[np.ndarray]:
    """Split ``labels``' indices into ``n_nodes`` disjoint shards by ``spec``.

    Parameters
    ----------
    labels
        (n,) integer class labels of the pool to split.
    n_nodes
        Number of shards (>= 1).
    spec
        A :class:`PartitionSpec` or its text form (see :func:`parse_spec`).
    seed
        Seed of the partition; the same seed gives the same shards.

    Returns
    -------
    list of np.ndarray
        ``n_nodes`` int64 index arrays, pairwise disjoint.
    """
    if isinstance(spec, str):
        spec = parse_spec(spec)
    labels = _check(labels, n_nodes)
    if spec.scheme == "iid":
        return iid(labels, n_nodes, seed=seed)
    if spec.scheme == "contiguous":
        return contiguous(labels, n_nodes)
    if spec.scheme == "classes":
        return by_class(labels, n_nodes, classes_per_node=int(spec.value or 2), seed=seed)
    if spec.scheme == "dirichlet":
        return dirichlet(labels, n_nodes, alpha=float(spec.value or 0.5), seed=seed)
    if spec.scheme == "unequal":
        return unequal(labels, n_nodes, sigma=float(spec.value or 0.0), seed=seed)
    if len(spec.fractions) != n_nodes:
        raise ConfigError(f"partition sizes: {len(spec.fractions)} fractions for {n_nodes} nodes")
    return sized(labels, spec.fractions, seed=seed)


def _check(labels: np.ndarray, n_nodes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"labels must be integers, got {labels.dtype}")
    if n_nodes < 1:
        raise ConfigError(f"number of nodes must be >= 1, got {n_nodes}")
    if labels.shape[0] < n_nodes:
        raise ConfigError(f"{labels.shape[0]} images cannot be split over {n_nodes} nodes")
    return labels


def iid(labels: np.ndarray, n_nodes: int, *, seed: int = 0) -> list[np.ndarray]:
    """A seeded permutation cut into ``n_nodes`` near-equal shards."""
    labels = _check(labels, n_nodes)
    order = np.random.default_rng(seed).permutation(labels.shape[0])
    return [part.astype(np.int64) for part in np.array_split(order, n_nodes)]


def contiguous(labels: np.ndarray, n_nodes: int) -> list[np.ndarray]:
    """Consecutive near-equal blocks in the original order."""
    labels = _check(labels, n_nodes)
    return [part for part in np.array_split(np.arange(labels.shape[0], dtype=np.int64), n_nodes)]


def by_class(
    labels: np.ndarray, n_nodes: int, *, classes_per_node: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """Per-class shards: sort by class, cut into ``n_nodes * C`` shards, deal ``C`` per node."""
    labels = _check(labels, n_nodes)
    if classes_per_node < 1:
        raise ConfigError(f"classes per node must be >= 1, got {classes_per_node}")
    n_shards = n_nodes * classes_per_node
    if labels.shape[0] < n_shards:
        raise ConfigError(f"{labels.shape[0]} images cannot make {n_shards} class shards")
    rng = np.random.default_rng(seed)
    # Shuffle first so that ties within a class are broken at random, then sort stably.
    shuffled = rng.permutation(labels.shape[0])
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, n_shards)
    deal = rng.permutation(n_shards).reshape(n_nodes, classes_per_node)
    return [_shuffled(np.concatenate([shards[s] for s in row]), rng) for row in deal]


def dirichlet(
    labels: np.ndarray, n_nodes: int, *, alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Non-IID shards whose class proportions across nodes follow ``Dirichlet(alpha)``.

    A node left empty by the draw receives one image from the largest shard, so every
    node has data to train on.
    """
    labels = _check(labels, n_nodes)
    if not alpha > 0:
        raise ConfigError(f"dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_nodes)]
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        shares = rng.dirichlet(np.full(n_nodes, alpha))
        # Cumulative rounding: every image lands in exactly one node.
        cuts = np.round(np.cumsum(shares)[:-1] * members.shape[0]).astype(np.int64)
        for node, chunk in enumerate(np.split(members, cuts)):
            parts[node].append(chunk)
    shards = [np.concatenate(p).astype(np.int64) for p in parts]
    for node in range(n_nodes):
        if shards[node].shape[0] == 0:
            donor = int(np.argmax([s.shape[0] for s in shards]))
            shards[node], shards[donor] = shards[donor][-1:], shards[donor][:-1]
    return [_shuffled(s, rng) for s in shards]


def unequal(
    labels: np.ndarray, n_nodes: int, *, sigma: float = 1.0, seed: int = 0
) -> list[np.ndarray]:
    """IID shards with log-normal sizes (``sigma`` = 0 gives equal sizes)."""
    labels = _check(labels, n_nodes)
    if sigma < 0:
        raise ConfigError(f"unequal sigma must be >= 0, got {sigma}")
    rng = np.random.default_rng(seed)
    weights = np.exp(sigma * rng.standard_normal(n_nodes))
    return _split_by_fractions(labels.shape[0], weights / weights.sum(), rng)


def sized(labels: np.ndarray, fractions: tuple[float, ...], *, seed: int = 0) -> list[np.ndarray]:
    """IID shards with the given size fractions (normalised)."""
    labels = _check(labels, len(fractions))
    weights = np.asarray(fractions, dtype=np.float64)
    if np.any(~(weights > 0)):
        raise ConfigError(f"size fractions must be > 0, got {fractions}")
    rng = np.random.default_rng(seed)
    return _split_by_fractions(labels.shape[0], weights / weights.sum(), rng)


def _split_by_fractions(
    n: int, fractions: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    k = fractions.shape[0]
    # One image each first, the rest by the fractions, so no shard is empty.
    sizes = 1 + np.floor(fractions * (n - k)).astype(np.int64)
    sizes[np.argmax(fractions)] += n - sizes.sum()
    order = rng.permutation(n)
    return [part.astype(np.int64) for part in np.split(order, np.cumsum(sizes)[:-1])]


def _shuffled(indices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return indices[rng.permutation(indices.shape[0])].astype(np.int64)


def class_counts(labels: np.ndarray, shards: list[np.ndarray], n_classes: int = 10) -> np.ndarray:
    """(n_nodes, n_classes) number of images of each class in each shard."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[s], minlength=n_classes) for s in shards])
