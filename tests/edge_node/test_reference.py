"""The per-step reference on hand-made inputs: each mechanism in isolation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_node.network import decays
from edge_node.reference import StepInput, reset_state, run_image, step
from estdp.params import BINDSNET

P = BINDSNET
DEC = decays(P)
NO_INPUT = StepInput(np.zeros(2, dtype=bool), 0.0)


def _state(n_input=2, n=2, weights=None, **fields):
    w = np.zeros((n_input, n)) if weights is None else np.asarray(weights, dtype=np.float64)
    state = reset_state(w, np.zeros(n), P)
    return state._replace(**{k: np.asarray(v) for k, v in fields.items()})


def _run(state, inputs, learning=True, params=P):
    spikes = []
    for item in inputs:
        s, state = step(item, state, params, learning=learning)
        spikes.append(s)
    return np.array(spikes), state


def test_membrane_decays_towards_rest():
    state = _state(v=[-55.0, -65.0])
    _, after = step(NO_INPUT, state, P)
    assert after.v[0] == pytest.approx(-65.0 + 10.0 * math.exp(-1 / 100))
    assert after.v[1] == -65.0


def test_input_current_arrives_one_step_late():
    w = [[2.0, 0.0], [0.0, 0.0]]
    state = _state(weights=w)
    fire = StepInput(np.array([True, False]), 0.0)
    _, s1 = step(fire, state, P, learning=False)
    assert s1.v[0] == -65.0  # the spike of step t drives step t+1
    _, s2 = step(NO_INPUT, s1, P, learning=False)
    assert s2.v[0] == pytest.approx(-63.0)


def test_crossing_resets_and_starts_refractory_period():
    state = _state(v=[-52.5, -65.0], weights=[[1.0, 0.0], [0.0, 0.0]], in_prev=[True, False])
    spikes, after = step(NO_INPUT, state, P, learning=False)
    assert spikes.tolist() == [True, False]
    assert after.v[0] == P.v_reset
    assert after.refrac[0] == P.refrac


def test_input_is_gated_for_exactly_the_refractory_period():
    # Neuron 0 fires at step 0; then a constant input of 1 mV per step arrives.
    w = [[1.0, 0.0], [0.0, 0.0]]
    state = _state(weights=w)
    drive = StepInput(np.array([True, False]), 0.0)
    _, state = step(NO_INPUT, state._replace(v=np.array([-51.0, -65.0])), P, learning=False)
    assert state.refrac[0] == P.refrac
    v = [state.v[0]]
    for _ in range(P.refrac + 2):
        _, state = step(drive, state, P, learning=False)
        v.append(state.v[0])
    leak = [P.v_rest + DEC.v * (x - P.v_rest) for x in v[:-1]]
    gained = np.array(v[1:]) - np.array(leak)
    # steps 1..refrac gated (the first step has no input spike yet anyway), then +1 mV
    assert np.allclose(gained[: P.refrac], 0.0)
    assert np.allclose(gained[P.refrac :], 1.0)


def test_threshold_adapts_on_crossing_and_decays_while_learning():
    state = _state(v=[-45.0, -65.0], theta=[1.0, 2.0])
    spikes, after = step(NO_INPUT, state, P)
    assert spikes[0]
    assert after.theta[0] == pytest.approx(1.0 * DEC.theta + P.theta_plus)
    assert after.theta[1] == pytest.approx(2.0 * DEC.theta)
    assert after.theta[1] < 2.0
    spikes, frozen = step(NO_INPUT, state, P, learning=False)
    assert spikes[0]
    assert frozen.theta.tolist() == [1.0, 2.0]


def test_stdp_potentiation_for_pre_then_post():
    # Pre spike at step 0, post spike at step 3: w += nu_post * lam^3.
    w0 = 0.5
    state = _state(weights=[[w0, 0.0], [0.0, 0.0]])
    pre = StepInput(np.array([True, False]), 0.0)
    _, state = step(pre, state, P)
    _, state = step(NO_INPUT, state, P)
    _, state = step(NO_INPUT, state, P)
    state = state._replace(v=np.array([-51.0, -65.0]))  # fires at the next step
    spikes, state = step(NO_INPUT, state, P)
    assert spikes[0]
    assert state.weights[0, 0] == pytest.approx(w0 + P.nu_post * DEC.trace**3)
    assert state.weights[1, 0] == 0.0  # no presynaptic trace, no change


def test_stdp_depression_for_post_then_pre():
    # Post spike at step 0, pre spike at step 2: w -= nu_pre * lam^2.
    w0 = 0.5
    state = _state(weights=[[w0, 0.0], [0.0, 0.0]], v=[-51.0, -65.0])
    spikes, state = step(NO_INPUT, state, P)
    assert spikes[0]
    _, state = step(NO_INPUT, state, P)
    pre = StepInput(np.array([True, False]), 0.0)
    _, state = step(pre, state, P)
    assert state.weights[0, 0] == pytest.approx(w0 - P.nu_pre * DEC.trace**2)
    assert state.weights[0, 1] == 0.0  # neuron 1 never fired: its trace is 0


def test_weights_are_clipped_to_bounds():
    w = [[1.2, -0.3], [0.5, 0.5]]
    _, state = step(NO_INPUT, _state(weights=w), P)
    assert state.weights.tolist() == [[1.0, 0.0], [0.5, 0.5]]
    _, frozen = step(NO_INPUT, _state(weights=w), P, learning=False)
    assert frozen.weights.tolist() == w


def test_one_spike_picks_by_the_tie_break_and_resets_all():
    n = 4
    state = reset_state(np.zeros((1, n)), np.zeros(n), P)._replace(
        v=np.array([-51.0, -65.0, -51.0, -51.0])
    )
    for choice, expected in ((0.0, 0), (0.4, 2), (0.99, 3)):
        spikes, after = step(StepInput(np.zeros(1, dtype=bool), choice), state, P)
        assert np.flatnonzero(spikes).tolist() == [expected]
        assert after.v.tolist() == [P.v_reset, P.v_rest, P.v_reset, P.v_reset]
        assert (after.theta > 0).tolist() == [True, False, True, True]  # all above adapt


def test_without_one_spike_all_neurons_above_threshold_spike():
    params = P.replace(one_spike=False)
    state = reset_state(np.zeros((1, 3)), np.zeros(3), params)._replace(
        v=np.array([-51.0, -65.0, -51.0])
    )
    spikes, _ = step(StepInput(np.zeros(1, dtype=bool), 0.5), state, params)
    assert spikes.tolist() == [True, False, True]


def test_inhibition_arrives_two_steps_after_a_spike_and_spares_the_spiker():
    n = 3
    state = reset_state(np.zeros((1, n)), np.zeros(n), P)._replace(
        v=np.array([-51.0, -60.0, -60.0])
    )
    silent = StepInput(np.zeros(1, dtype=bool), 0.0)
    spikes, s0 = step(silent, state, P, learning=False)
    assert spikes.tolist() == [True, False, False]
    _, s1 = step(silent, s0, P, learning=False)
    _, s2 = step(silent, s1, P, learning=False)
    leak1 = P.v_rest + DEC.v * (s0.v[1] - P.v_rest)
    assert s1.v[1] == pytest.approx(leak1)  # nothing yet at t+1
    leak2 = P.v_rest + DEC.v * (s1.v[1] - P.v_rest)
    assert s2.v[1] == pytest.approx(leak2 - P.inh_strength)  # -120 at t+2
    assert s2.v[0] == pytest.approx(P.v_rest + DEC.v * (s1.v[0] - P.v_rest))  # spiker spared


def test_run_image_normalises_columns_after_learning():
    rng = np.random.default_rng(0)
    w = rng.random((6, 3)) * 0.3
    spikes = rng.random((20, 6)) < 0.3
    result = run_image(w, np.zeros(3), spikes, rng.random(20), P.replace(time_steps=20))
    assert np.allclose(result.weights.sum(axis=0), P.norm)
    frozen = run_image(w, np.zeros(3), spikes, rng.random(20), P, learning=False)
    assert np.array_equal(frozen.weights, w)
