"""Reference simulator: the per-step loop of :mod:`edge_node.network`, written plainly.

This is the definition the fast paths are tested against (the event-driven trainer in
:mod:`edge_node.event_driven`, the batched inference, the CUDA kernels). It favours
being obviously right over speed: every step touches the whole weight matrix, so keep
it to small networks or few images.

One step (``u = v - v_rest``, decays ``d``, ``lam``, ``g``; see :mod:`edge_node.network`)::

    I        = S[t-1] @ W                       feed-forward, previous step's spikes
    inh_j    = -inh_strength * (sum(s[t-2]) - s_j[t-2])
    v        = d (v - v_rest) + v_rest;  theta *= g      (theta only when learning)
    v       += (refrac <= 0) * (I + inh)
    refrac  -= 1
    above    = v >= v_thresh + theta
    v[above] = v_reset;  refrac[above] = refrac_steps;  theta[above] += theta_plus
    s        = one-hot(pick_winner(above, choice))       (one_spike), else above
    x_in     = lam x_in;  x_in[S[t]] = 1;  x_exc = lam x_exc;  x_exc[s] = 1
    W        = clip(W - nu_pre outer(S[t], x_exc) + nu_post outer(x_in, s), w_min, w_max)

The state is float64 throughout so that other implementations can be compared spike for
spike (threshold crossings are decided to ~1e-12 mV instead of ~1e-5 mV in float32).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from edge_node.encoding import draw_presentation
from edge_node.network import decays, normalise_columns, pick_winner, rest_decay
from estdp.params import NetworkParams


class NetworkState(NamedTuple):
    """State of the network between two steps (all arrays are owned by the state)."""

    v: np.ndarray  # (N,) float64 membrane potential, mV
    refrac: np.ndarray  # (N,) int64 refractory steps left
    theta: np.ndarray  # (N,) float64 adaptive threshold offset, mV
    x_in: np.ndarray  # (n_input,) float64 presynaptic traces
    x_exc: np.ndarray  # (N,) float64 postsynaptic traces
    in_prev: np.ndarray  # (n_input,) bool input spikes of step t-1
    exc_prev: np.ndarray  # (N,) bool excitatory spikes of step t-1
    exc_prev2: np.ndarray  # (N,) bool excitatory spikes of step t-2
    weights: np.ndarray  # (n_input, N) float64 input->excitatory weights


class StepInput(NamedTuple):
    """What one step consumes from outside."""

    spikes: np.ndarray  # (n_input,) bool input spikes of this step
    choice: float  # uniform on [0, 1): the one-spike tie-break of this step


class ImageResult(NamedTuple):
    """Outcome of one presentation."""

    weights: np.ndarray  # (n_input, N) float64, normalised when learning
    thetas: np.ndarray  # (N,) float64
    spikes: np.ndarray  # (T, N) bool excitatory spikes


def reset_state(weights: np.ndarray, thetas: np.ndarray, params: NetworkParams) -> NetworkState:
    """The state at the start of a presentation: everything at rest but ``theta`` and ``W``.

    Parameters
    ----------
    weights
        (n_input, N) weights; copied to float64.
    thetas
        (N,) adaptive thresholds; copied to float64.
    params
        Network parameters.
    """
    n_input, n = weights.shape
    return NetworkState(
        v=np.full(n, params.v_rest, dtype=np.float64),
        refrac=np.zeros(n, dtype=np.int64),
        theta=np.array(thetas, dtype=np.float64),
        x_in=np.zeros(n_input, dtype=np.float64),
        x_exc=np.zeros(n, dtype=np.float64),
        in_prev=np.zeros(n_input, dtype=bool),
        exc_prev=np.zeros(n, dtype=bool),
        exc_prev2=np.zeros(n, dtype=bool),
        weights=np.array(weights, dtype=np.float64),
    )


def step(
    inputs: StepInput, state: NetworkState, params: NetworkParams, *, learning: bool = True
) -> tuple[np.ndarray, NetworkState]:
    """Advance the network by one step.

    Parameters
    ----------
    inputs
        Input spikes of this step and its tie-break uniform.
    state
        State after the previous step; not modified.
    params
        Network parameters.
    learning
        Apply STDP and let ``theta`` decay and grow.

    Returns
    -------
    tuple
        ``(spikes, new_state)``: (N,) bool excitatory spikes of this step.
    """
    dec = decays(params)
    w = state.weights
    # 1. currents from the previous steps' spikes
    feed = state.in_prev.astype(np.float64) @ w
    n_inh = np.count_nonzero(state.exc_prev2)
    inhibition = -params.inh_strength * (n_inh - state.exc_prev2.astype(np.float64))
    # 2. leak
    v = dec.v * (state.v - params.v_rest) + params.v_rest
    theta = state.theta * dec.theta if learning else state.theta.copy()
    # 3. integrate, gated while refractory
    v = v + (state.refrac <= 0) * (feed + inhibition)
    # 4.-6. refractory count-down, threshold, reset
    refrac = state.refrac - 1
    above = v >= params.v_thresh + theta
    refrac = np.where(above, params.refrac, refrac)
    v = np.where(above, params.v_reset, v)
    if learning:
        theta = theta + params.theta_plus * above
    # 7. at most one spike per step
    spikes = above.copy()
    if params.one_spike and above.any():
        spikes[:] = False
        spikes[pick_winner(np.flatnonzero(above), inputs.choice)] = True
    # 8. traces are set to 1 on a spike
    x_in = np.where(inputs.spikes, 1.0, dec.trace * state.x_in)
    x_exc = np.where(spikes, 1.0, dec.trace * state.x_exc)
    # 9. STDP: depression on input spikes, potentiation on excitatory spikes, one clip
    if learning:
        w = w - params.nu_pre * np.outer(inputs.spikes, x_exc)
        w = w + params.nu_post * np.outer(x_in, spikes)
        w = np.clip(w, params.w_min, params.w_max)
    new_state = NetworkState(
        v=v,
        refrac=refrac,
        theta=theta,
        x_in=x_in,
        x_exc=x_exc,
        in_prev=np.array(inputs.spikes, dtype=bool),
        exc_prev=spikes,
        exc_prev2=state.exc_prev,
        weights=w,
    )
    return spikes, new_state


def run_image(
    weights: np.ndarray,
    thetas: np.ndarray,
    spikes: np.ndarray,
    choices: np.ndarray,
    params: NetworkParams,
    *,
    learning: bool = True,
) -> ImageResult:
    """Present one spike train: reset, ``T`` steps, then normalise when learning.

    Parameters
    ----------
    weights, thetas
        Network parameters before the presentation; not modified.
    spikes
        (T, n_input) bool input spike train.
    choices
        (T,) tie-break uniforms.
    params
        Network parameters.
    learning
        Train (STDP, threshold adaptation, normalisation) or only simulate.
    """
    state = reset_state(weights, thetas, params)
    out = np.zeros((spikes.shape[0], weights.shape[1]), dtype=bool)
    for t in range(spikes.shape[0]):
        out[t], state = step(
            StepInput(spikes[t], float(choices[t])), state, params, learning=learning
        )
    w = normalise_columns(state.weights, params.norm) if learning else state.weights
    return ImageResult(weights=w, thetas=state.theta, spikes=out)


def train_reference(
    weights: np.ndarray,
    thetas: np.ndarray,
    images: np.ndarray,
    params: NetworkParams,
    *,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train on ``images`` with the reference step; the slow twin of ``trainer.train``.

    Consumes ``rng`` exactly as :func:`edge_node.trainer.train` does, including the
    paper preset's re-presentations.

    Returns
    -------
    tuple
        ``(weights float64, thetas float64, spike_counts (n, N) int32)``; the counts are
        those of each image's last presentation.
    """
    flat = np.asarray(images).reshape(len(images), -1)
    w = np.array(weights, dtype=np.float64)
    th = np.array(thetas, dtype=np.float64)
    counts = np.zeros((flat.shape[0], w.shape[1]), dtype=np.int32)
    for n, image in enumerate(flat):
        intensity = params.intensity
        for presentation in range(params.max_presentations):
            drawn = draw_presentation(image, params, rng, intensity)
            result = run_image(w, th, drawn.dense(w.shape[0]), drawn.choices, params)
            w, th = result.weights, rest_decay(result.thetas, params)
            counts[n] = result.spikes.sum(axis=0)
            if counts[n].sum() >= params.min_spikes or presentation + 1 == params.max_presentations:
                break
            intensity += params.intensity_boost
    return w, th, counts
