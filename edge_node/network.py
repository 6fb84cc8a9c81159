"""The Diehl & Cook (2015) network as BindsNET simulates it: equations and shared helpers.

Every simulator of this project (the per-step reference, the event-driven trainer, the
batched inference and the CUDA kernels) implements the step below; this module holds
what they share. ``u = v - v_rest``; ``d = exp(-dt/tc_v)``, ``lam = exp(-dt/tc_trace)``,
``g = exp(-dt/tc_theta)``. Per presentation the state is reset (``v = v_rest``,
refractory counters 0, traces 0); ``theta`` and the weights ``W`` (n_input, N) carry over.
With input spikes ``S[t]`` (t = 0..T-1) and excitatory spikes ``s[t]``, step ``t`` is:

1. currents, from the previous steps' spikes (BindsNET computes every layer's input at
   the start of a step):
   ``I[t] = S[t-1] @ W`` (``W`` as left by step t-1's update; zero at t = 0) and
   ``inh_j[t] = -inh_strength * sum_{k != j} s_k[t-2]`` (see *Inhibition* below)
2. leak: ``v = d (v - v_rest) + v_rest``; when learning, ``theta *= g``
3. integrate, gated while refractory: ``v += (refrac <= 0) * (I[t] + inh[t])``
4. ``refrac -= 1``
5. ``above = v >= v_thresh + theta``
6. every neuron above threshold is reset: ``refrac = refrac_steps``, ``v = v_reset``,
   and, when learning, ``theta += theta_plus``
7. one spike (``one_spike``): when any neuron is above threshold, only one of them,
   ``pick_winner(above, choice[t])``, emits a spike; otherwise ``s = above``
8. traces (BindsNET's default ``traces_additive=False`` sets a trace to 1 on a spike):
   ``x_in = lam x_in; x_in[S[t]] = 1``;  ``x_exc = lam x_exc; x_exc[s[t]] = 1``
9. learning (pre-and-post STDP, BindsNET ``PostPre``), then one clip of all of ``W``:
   ``W -= nu_pre outer(S[t], x_exc)``;  ``W += nu_post outer(x_in, s[t])``;
   ``W = clip(W, w_min, w_max)``

After each presentation, when learning, every column is normalised to sum ``norm``:
``W[:, j] *= norm / sum_i W[i, j]`` (a zero sum counts as 1; BindsNET's
``Connection.normalize`` at the end of ``Network.run``). Without learning (inference)
there is no STDP and ``theta`` neither decays nor grows.

Inhibition
----------
BindsNET routes lateral inhibition through an inhibitory layer: excitatory neuron j
drives its partner with weight ``exc_strength`` = 22.5, and each inhibitory neuron
inhibits every excitatory neuron but its partner with ``-inh_strength`` = -120. The
inhibitory neurons are LIF with rest -60 mV, reset -45, threshold -40, refractory 2 ms,
time constant 10 ms, and receive nothing else. A partner therefore always fires exactly
once, one step after its excitatory neuron:

- at step t+1 its potential is at least rest (-60; it only ever receives positive input
  and resets above rest), and -60 + 22.5 = -37.5 >= -40, so it fires; it is never
  refractory then, because its excitatory neuron cannot fire twice within 3 steps
  (excitatory refractory period 5 >= 2);
- after firing it resets to -45 < -40 and decays towards -60 without further input, so
  it cannot fire again until its excitatory neuron fires again.

Its spike at t+1 reaches the excitatory layer as input at t+2. We simulate this as a
direct inhibition: an excitatory spike of neuron k at step t adds ``-inh_strength`` to
the input of every excitatory neuron j != k at step t+2, which gives the same excitatory
dynamics with no inhibitory state.

Tie-breaking
------------
BindsNET picks the single spiking neuron with ``torch.multinomial`` over the neurons
above threshold. Here the choice is a pre-drawn uniform ``c`` per step: the winner is
``above_sorted[floor(c * count)]``. It is uniform over the candidates, and it lets every
simulator consume the random stream identically (see :mod:`edge_node.encoding`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from estdp.params import NetworkParams


class Decays(NamedTuple):
    """Per-step decay factors of a parameter set."""

    v: float  # membrane, exp(-dt / tc_v)
    trace: float  # STDP traces, exp(-dt / tc_trace)
    theta: float  # adaptive threshold, exp(-dt / tc_theta)


def decays(params: NetworkParams) -> Decays:
    """The per-step decay factors of ``params``."""
    return Decays(
        v=math.exp(-params.dt / params.tc_v),
        trace=math.exp(-params.dt / params.tc_trace),
        theta=math.exp(-params.dt / params.tc_theta),
    )


def pick_winner(above: np.ndarray, choice: float) -> int:
    """The one neuron that spikes among those above threshold.

    Parameters
    ----------
    above
        Indices of the neurons above threshold, ascending, at least one.
    choice
        Uniform on [0, 1) drawn for this step.

    Returns
    -------
    int
        ``above[floor(choice * len(above))]``.
    """
    count = len(above)
    return int(above[min(int(choice * count), count - 1)])


def normalise_columns(weights: np.ndarray, norm: float) -> np.ndarray:
    """Scale each column of ``weights`` to sum ``norm`` (a column summing to 0 is kept).

    Parameters
    ----------
    weights
        (n_input, N) non-negative weights.
    norm
        Target column sum (78.4 in Diehl & Cook).

    Returns
    -------
    numpy.ndarray
        A new array of the same dtype, ``weights * norm / colsum`` with colsum 0 read as 1.
    """
    colsum = weights.sum(axis=0, dtype=np.float64)
    colsum[colsum == 0.0] = 1.0
    return (weights * (norm / colsum)).astype(weights.dtype, copy=False)


def rest_decay(thetas: np.ndarray, params: NetworkParams) -> np.ndarray:
    """Thresholds after the rest period that follows a training presentation.

    During ``rest_steps`` of silence the membrane and traces relax (and are reset before
    the next presentation anyway); only ``theta`` carries over, decaying by
    ``g ** rest_steps``. Nothing is simulated.
    """
    if params.rest_steps == 0:
        return thetas
    return thetas * decays(params).theta ** params.rest_steps
