"""The model container: a trained (sub-)model and its provenance.

A :class:`SubModel` is what an edge node trains, what travels over MQTT and what the
aggregator merges. Arrays are host (NumPy) arrays:

- ``weights``: (n_input, n_neurons) float32, input->excitatory weights (column j is neuron j)
- ``thetas``: (n_neurons,) float32, adaptive-threshold offsets in mV
- ``labels``: (n_neurons,) int16, assigned class of each neuron, -1 when unassigned
- ``class_rates``: (n_classes, n_neurons) float32, mean spike count of each neuron per class
  over the images its labels were assigned from (zeros when unassigned)
- ``origin_node`` / ``origin_index``: (n_neurons,) int32; for neuron j, the index into
  ``provenance.sources`` of the node it was trained on and its index in that node's model
  (a fresh model has one source, itself, and origin_index = arange(n))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from estdp.params import NetworkParams

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Provenance:
    """Where a model came from."""

    node_id: str  # the node (or "aggregator") that produced this model
    images_seen: int  # training images seen (summed over sources for a merged model)
    seed: int
    sources: tuple[str, ...] = ()  # node ids that neurons originate from (see origin_node)
    round: int = 0  # federated round the model belongs to (0 = standalone training)
    format_version: int = FORMAT_VERSION
    created_unix: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)  # e.g. merge metric, rule, target


@dataclass(frozen=True)
class SubModel:
    """A trained Diehl & Cook network: weights, thresholds, labels and provenance."""

    weights: np.ndarray
    thetas: np.ndarray
    labels: np.ndarray
    class_rates: np.ndarray
    params: NetworkParams
    provenance: Provenance
    origin_node: np.ndarray
    origin_index: np.ndarray

    @property
    def n_neurons(self) -> int:
        return int(self.weights.shape[1])

    @property
    def n_input(self) -> int:
        return int(self.weights.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.class_rates.shape[0])
