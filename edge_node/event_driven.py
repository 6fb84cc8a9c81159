"""Event-driven training of one presentation: the fast NumPy path.

It computes exactly what :func:`edge_node.reference.run_image` computes (up to float64
rounding, ~1e-12 mV), but it does not step through time. Its cost is set by the number of
excitatory threshold crossings (about 25 per image), not by ``T x N``. The full argument
is in docs/engine.md; the equations it rests on follow.

Scaled potentials
-----------------
With ``u = v - v_rest`` and a neuron neither reset nor refractory in ``[a, t]``,
``u[t] = d^(t-a+1) u[a-1] + sum_{s=a..t} d^(t-s) J[s]`` (``J``: its input). Multiplying
by ``d^-t`` removes the leak: ``U[t] = d^-t u[t] = U[a-1] + sum_{s=a..t} d^-s J[s]``, a
plain cumulative sum. The threshold becomes ``Th[t] = d^-t (c + theta[t])`` with
``c = v_thresh - v_rest`` and ``theta[t] = theta' g^(t+1)``; a reset at ``t_r`` adds
``theta_plus g^-(t_r+1)`` to ``theta'`` and sets ``U[t_r] = d^-t_r (v_reset - v_rest)``,
which stays constant while the neuron is refractory (pure leak).

Inhibition
----------
A spike at ``t`` inhibits every other neuron at ``t + 2``. Its own neuron is refractory
then (refractory period >= 2), so every neuron that integrates at all receives the same
inhibition: ``H[t] = inh_strength * sum_{tau <= t} d^-tau n_spikes[tau - 2]``, common to
the whole layer.

Neurons whose weights have not changed in this image
----------------------------------------------------
Only the column of a neuron that spiked in this image changes (its post-synaptic trace is
zero otherwise, so neither depression nor potentiation touches it). For every other
neuron, with ``Z[t] = sum_{s<=t} d^-s S[s-1]`` (the scaled cumulative input) and
``M[t] = Z[t] @ W``, ``U[t] = M[t] - H[t] + off`` once it is out of refractoriness, with
``off = 0`` for a neuron never reset and
``off = d^-t_r u_reset - M[t_g - 1] + H[t_g - 1]`` for one last reset at ``t_r`` whose
input is gated until ``t_g = t_r + refrac + 1``. ``Z`` grows with ``t`` and ``W >= 0``,
so ``M`` at the end of a block of 16 steps bounds ``M`` over the block; one small product
``Z[block ends] @ W`` (float32, with a relative safety factor) rules most neurons out of
most blocks, and only the remaining candidates are evaluated exactly (float64).

Neurons that spiked ("dirty")
-----------------------------
After its last spike ``t_p`` the post-synaptic trace of neuron j is ``lam^(s - t_p)``, so
its weight from pixel k after step ``s`` is
``w_k(s) = max(w_min, w_k(t_p) - nu_pre lam^-t_p sum_{t_p < s' <= s} lam^s' S_k[s'])``
(depression only decreases it, so clipping at ``w_max`` is idle and clipping at
``w_min`` once is the same as clipping every step). With the depression integral
``D[t] = sum_{s<t} lam^s S[s]``, computed once per presentation, that weight before the
clip is ``A_k - r D_k[t]`` with the anchor ``A = w(t_p) + r D[t_p + 1]`` and
``r = nu_pre lam^-t_p``, so the input at step t is ``S[t-1].A - r S[t-1].D[t]``: one
product per window while no weight reaches ``w_min``, and nothing to carry between
windows.

The loop
--------
From step ``a``, evaluate a window ``[a, e]`` (16 steps from step 0, 32 after an event,
doubling to 64 while nothing happens) for the dirty neurons and the candidates, as
*leads*: ``lead = U + H - threshold``, so that a neuron integrating at step s crosses
when ``lead[s] >= H[s]``. A
dirty neuron gated until step q integrates its input ``I`` from its reset value on, so
``lead[s] = U_reset + sum_{q..s} I + H[q - 1] - Th[s]`` for ``s >= q`` and ``-inf``
before. Each crossing is an event, handled in time order:
reset every neuron above threshold, pick the one that spikes, apply its STDP
(potentiation by the input traces, depression by the input spikes of that step),
recompute the leads of the neurons that crossed (the spiker's from its new input), add
the inhibition landing at ``t + 2`` to the window's ``H`` (and to the lead of a dirty
neuron still gated then, whose ``H[q - 1]`` it raises), and scan on. A crossing of a
non-dirty neuron ends the window; the next starts after it.

float64 is used for everything that decides a threshold crossing; float32 only for the
conservative bounds.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from edge_node.encoding import Presentation
from edge_node.network import decays, pick_winner
from estdp.params import NetworkParams

BLOCK = 16  # steps per block of the coarse bounds
WINDOW = 32  # look-ahead after an event, in steps
FIRST_WINDOW = 16  # look-ahead from step 0: the first spike comes within 6-12 steps
MAX_WINDOW = 64  # look-ahead cap while nothing happens
CHUNK = 32  # rows of exact potentials computed at once for candidates
_SAFETY = 1e-3  # relative slack on float32 bounds: > (T + blocks + K) * 2**-24, with room
_MARGIN = 1e-6  # absolute slack (scaled mV) on bounds against float64 rounding

# The ufunc methods themselves: the ndarray methods and np.cumsum wrap them in Python,
# which costs more than the work on arrays of a few hundred elements, called ~1,000
# times per image.
_accumulate = np.add.accumulate
_add = np.add.reduce
_max = np.maximum.reduce
_min = np.minimum.reduce
_dot = np.dot  # ~0.3 us less per call than matmul (@) on these small operands


class StepScalars(NamedTuple):
    """Per-step constants as Python floats, for the event loop, which reads them one at
    a time: a list item and arithmetic on it cost less than a NumPy scalar's."""

    theta_increment: list[float]  # theta_plus g^-(t+1): theta' added by a reset at t
    reset_u: list[float]  # d^-t u_reset: scaled potential after a reset at t
    rate: list[float]  # nu_pre lam^-t: depression rate of a spike at t
    inhibition: list[float]  # (T+2) inh_strength d^-t: inhibition landing at t
    cdneg: list[float]  # c d^-t
    rth: list[float]  # g^(t+1) d^-t

    def restart_lead(self, reset: int, t: int, h: float, theta: float) -> float:
        """``U + H - Th`` at step ``t`` of a neuron reset at ``reset`` and gated since,
        with ``H[t] = h`` and its ``theta'``: where its lead starts when the gate opens."""
        return (self.reset_u[reset] + h) - (self.cdneg[t] + theta * self.rth[t])


class Tables(NamedTuple):
    """Per-parameter-set constants of the event-driven path (see :func:`tables`)."""

    steps: int
    dneg: np.ndarray  # (T+2,) d^-t
    # (T+2,) the steps of the scaled threshold Th[t] = c d^-t + theta' rth[t] from t-1
    # to t (t = 0 from the formula's t = -1): its c and theta' parts
    cd_step: np.ndarray
    rth_step: np.ndarray
    # (T, 3) [-rth, -c d^-t, 1] (rth = g^(t+1) d^-t): times [theta', 1, off], lead - M
    th_basis: np.ndarray
    laminv: np.ndarray  # (T,) lam^-t
    nu_post_lampow: np.ndarray  # (T,) nu_post lam^t: potentiation per unit of lam^-s trace
    nu_pre: float
    g_total: float  # g^T
    blocks: np.ndarray  # (nb, T) float32, row b sums d^-s Ss[s] over block b
    block_start_rth: np.ndarray  # (nb,) rth at block starts
    block_end_rth: np.ndarray  # (nb,) rth at block ends
    block_cdneg: np.ndarray  # (nb,) cdneg at block starts
    # (n_chunks, CHUNK, CHUNK) lower-triangular (diagonal included), column s of chunk c
    # scaled by lam^s for the chunk's steps s: cumulative sums as products.
    tri_lam: np.ndarray
    tri: np.ndarray  # (CHUNK, CHUNK) lower-triangular ones
    ones: np.ndarray  # (T+2,)
    at: StepScalars


def tables(params: NetworkParams) -> Tables:
    """Precompute the constants of the event-driven path for ``params``."""
    dec = decays(params)
    steps = params.time_steps
    t = np.arange(steps + 2, dtype=np.float64)
    dneg = np.exp(t * (params.dt / params.tc_v))
    c = params.v_thresh - params.v_rest
    rth = np.exp((t[:steps] + 1) * math.log(dec.theta)) * dneg[:steps]
    t_from = np.arange(-1, steps + 2, dtype=np.float64)
    dneg_from = np.exp(t_from * (params.dt / params.tc_v))
    rth_from = np.exp((t_from + 1) * math.log(dec.theta)) * dneg_from
    n_blocks = -(-steps // BLOCK)
    blocks = np.zeros((n_blocks, steps), dtype=np.float32)
    rows = np.arange(steps)
    blocks[rows // BLOCK, rows] = dneg[:steps]
    starts = np.arange(n_blocks) * BLOCK
    ends = np.minimum(starts + BLOCK - 1, steps - 1)
    lampow = np.exp(-t[:steps] * (params.dt / params.tc_trace))
    laminv = np.exp(t[:steps] * (params.dt / params.tc_trace))
    ginv = np.exp(-(t[:steps] + 1) * math.log(dec.theta))
    u_reset = params.v_reset - params.v_rest
    at = StepScalars(
        theta_increment=(params.theta_plus * ginv).tolist(),
        reset_u=(dneg[:steps] * u_reset).tolist(),
        rate=(params.nu_pre * laminv).tolist(),
        inhibition=(params.inh_strength * dneg).tolist(),
        cdneg=(c * dneg[:steps]).tolist(),
        rth=rth.tolist(),
    )
    return Tables(
        steps=steps,
        dneg=dneg,
        cd_step=c * np.diff(dneg_from),
        rth_step=np.diff(rth_from),
        th_basis=np.stack((-rth, -c * dneg[:steps], np.ones(steps)), axis=1),
        laminv=laminv,
        nu_post_lampow=params.nu_post * lampow,
        nu_pre=params.nu_pre,
        g_total=dec.theta**steps,
        blocks=blocks,
        block_start_rth=rth[starts],
        block_end_rth=rth[ends],
        block_cdneg=c * dneg[starts],
        tri_lam=_scaled_triangles(lampow),
        tri=np.tril(np.ones((CHUNK, CHUNK))),
        ones=np.ones(steps + 2),
        at=at,
    )


def _scaled_triangles(scale: np.ndarray) -> np.ndarray:
    n_chunks = -(-scale.size // CHUNK)
    padded = np.zeros(n_chunks * CHUNK)
    padded[: scale.size] = scale
    return np.tril(np.ones((CHUNK, CHUNK))) * padded.reshape(n_chunks, 1, CHUNK)


def supported(params: NetworkParams, thetas: np.ndarray) -> bool:
    """Whether the event-driven path is exact for these parameters and thresholds.

    It needs: a refractory period of at least 2 steps (a neuron never receives its own
    inhibition), non-negative inhibition and weights (potentials bounded by the block
    ends), and a reset potential below every threshold (no crossing while refractory).
    """
    c = params.v_thresh - params.v_rest
    lowest = c + min(0.0, float(_min(thetas))) if thetas.size else c
    return (
        params.refrac >= 2
        and params.inh_strength >= 0.0
        and params.w_min >= 0.0
        and lowest > max(params.v_reset - params.v_rest, 0.0)
    )


class _Dirty:
    """The neurons that spiked in this presentation; their columns are followed exactly.

    Row ``i`` of each array is neuron ``index[i]``; the arrays are views of buffers that
    grow on demand. Weights are kept as anchors: before the ``w_min`` clip, the weight
    that drives step ``t`` is ``anchor - rate * D[t]`` (``D``: :attr:`_Inputs.dep`), so
    nothing needs updating while a neuron does not spike. A row of :attr:`augmented`,
    ``[anchor, rate, theta', 1]``, times a row of :attr:`Prepared.drive` is that
    neuron's scaled input at that step less the step of its threshold.
    """

    def __init__(self, k: int, capacity: int = 8) -> None:
        self.index: list[int] = []  # neuron ids
        self.gate: list[int] = []  # first step whose input is not gated
        self._rows = np.zeros((capacity, k + 3))
        self._lead = np.zeros(capacity)
        self._view(0)

    def _view(self, n: int) -> None:
        k = self._rows.shape[1] - 3
        self.augmented = self._rows[:n]  # (nd, K + 3) [anchor, rate, theta', 1]
        self.anchor = self._rows[:n, :k]  # (nd, K) weights + rate * D[t], for any t
        self.rate = self._rows[:n, k]  # nu_pre lam^-t_p: depression per unit of lam^s S[s]
        self.theta = self._rows[:n, k + 1]  # theta' (mirror of the layer's array)
        # U + H - Th at the step before the next window (a gated row: from its reset)
        self.lead = self._lead[:n]

    def add(self, j: int, w: np.ndarray, rate: float, lead: float, theta: float, gate: int) -> None:
        n = len(self.index)
        if n == self._rows.shape[0]:
            self._rows = np.concatenate((self._rows, np.zeros_like(self._rows)))
            self._lead = np.concatenate((self._lead, np.zeros_like(self._lead)))
        k = self._rows.shape[1] - 3
        self._rows[n, :k] = w
        self._rows[n, k:] = (rate, theta, 1.0)
        self._lead[n] = lead
        self.index.append(j)
        self.gate.append(gate)
        self._view(n + 1)


class _Bounds:
    """Block bounds of the neurons whose columns are unchanged (see module docstring).

    ``lead[b, j]`` bounds ``U_j[t] - Th_j[t] + H[t]`` over block ``b``; neuron j can
    cross in block ``b`` only if ``lead[b, j] >= H`` at the start of the range looked at.
    ``-inf`` marks a dirty neuron, or a reset one whose offset is not known yet. Blocks
    are rows, so that every reduction runs along contiguous memory.
    """

    def __init__(self, m_blocks: np.ndarray, theta_p: np.ndarray, tab: Tables) -> None:
        self.tab = tab
        self.m_lead = m_blocks - tab.block_cdneg[:, None]  # (nb, N)
        self.lead = self.m_lead - self._theta_low(theta_p)
        self._refresh()

    def _refresh(self) -> None:
        self.best = _max(self.lead, axis=1)
        self.best_after = np.maximum.accumulate(self.best[::-1])[::-1]  # max over b' >= b

    def _theta_low(self, theta_p: np.ndarray) -> np.ndarray:
        low = np.multiply.outer(self.tab.block_start_rth, theta_p)
        if theta_p.size and _min(theta_p) < 0.0:  # a negative theta grows towards 0
            low = np.minimum(low, np.multiply.outer(self.tab.block_end_rth, theta_p))
        return low

    def drop(self, cols: list[int]) -> None:
        """Stop bounding ``cols`` (now dirty, or reset with an offset still unknown)."""
        self.lead[:, cols] = -np.inf
        self._refresh()

    def update(self, cols: list[int], off: np.ndarray, theta_p: np.ndarray) -> None:
        lead = self.m_lead[:, cols] - self._theta_low(theta_p[cols])
        lead += off[cols]
        self.lead[:, cols] = lead
        self._refresh()

    def can_cross(self, b0: int, b1: int, h: float) -> bool:
        limit = h - _MARGIN
        return self.best_after[b0] >= limit and _max(self.best[b0 : b1 + 1]) >= limit

    def candidates(self, b0: int, b1: int, h: float) -> np.ndarray:
        return (_max(self.lead[b0 : b1 + 1], axis=0) >= h - _MARGIN).nonzero()[0]


class Prepared(NamedTuple):
    """The per-presentation arrays that depend on the input spikes alone (:func:`prepare`)."""

    dep: np.ndarray  # (T+1, K) D[t] = sum_{s<t} lam^s S[s], the depression integral
    change: np.ndarray  # (T, K) STDP change of the weights of a neuron spiking at t
    # (T+2, K+3) [d^-t S[t-1], -d^-t S[t-1].D[t], -rth_step[t], -cd_step[t]]: times a
    # row of _Dirty.augmented, a dirty neuron's scaled input at t less its threshold's step
    drive: np.ndarray
    z_blocks: np.ndarray  # (nb, K) float32 Z at block ends: sum_{s <= end} d^-s S[s-1]
    z_first: np.ndarray  # (min(CHUNK, T), K + 3) _chunk_z of the first chunk (every image's)


def prepare(spikes: np.ndarray, tab: Tables) -> Prepared:
    """Everything :func:`present` needs from the (T, K) input spikes alone.

    It does not depend on the weights, so it can be computed ahead, in another process
    (:mod:`edge_node.prefetch`); :func:`present` computes it itself when not given it.
    """
    steps = tab.steps
    k = spikes.shape[1]
    n_chunks = tab.tri_lam.shape[0]
    padded = np.zeros((max(steps + 2, n_chunks * CHUNK + 1), k))
    padded[1 : steps + 1] = spikes
    shifted = padded[: steps + 2]
    # D within chunks of CHUNK steps by one product each with the triangle scaled by
    # lam^s (a cumsum down the columns of a C-ordered array is several times slower,
    # and so is scaling its rows), then chunk offsets.
    buf = np.zeros((n_chunks * CHUNK + 1, k))
    terms = buf[1:].reshape(n_chunks, CHUNK, k)
    np.matmul(tab.tri_lam, padded[1 : n_chunks * CHUNK + 1].reshape(n_chunks, CHUNK, k), out=terms)
    if n_chunks > 1:
        terms[1:] += _accumulate(terms[:-1, -1], axis=0)[:, None]
    dep = buf[: steps + 1]
    # A spike at t potentiates by the input traces after step t, lam^t max_{s<=t}
    # lam^-s S[s] (a spike sets its trace to 1), and depresses by that step's input
    # spikes (its own trace is 1 then): the same row for every neuron spiking at t.
    change = _cumulative_max(shifted[1 : steps + 1] * tab.laminv[:, None])
    change *= tab.nu_post_lampow[:, None]
    change -= shifted[1 : steps + 1] * tab.nu_pre
    drive = np.empty((steps + 2, k + 3))
    # Through the transposes the scale runs along contiguous rows: ~25% faster in NumPy 2.4
    np.multiply(shifted.T, tab.dneg, out=drive[:, :k].T)
    np.einsum("tk,tk->t", drive[: steps + 1, :k], dep, out=drive[: steps + 1, k])
    drive[: steps + 1, k] *= -1.0
    drive[steps + 1, k] = 0.0
    np.negative(tab.rth_step, out=drive[:, k + 1])
    np.negative(tab.cd_step, out=drive[:, k + 2])
    z_blocks = _accumulate(tab.blocks @ shifted[:steps].astype(np.float32), axis=0)
    return Prepared(dep, change, drive, z_blocks, _chunk_z(drive, tab, 0))


def _cumulative_max(x: np.ndarray) -> np.ndarray:
    """``np.maximum.accumulate(x, axis=0)`` by doubling: after the pass of shift ``s``,
    row t holds the maximum of rows ``t - 2s + 1 .. t``. ``log2(rows)`` whole-array
    maxima (exact, as any maximum is) take a third of the time of NumPy's accumulate down
    the columns. ``x`` is overwritten; the result may be ``x`` or a new array.
    """
    other = np.empty_like(x)
    shift = 1
    while shift < x.shape[0]:
        other[:shift] = x[:shift]
        np.maximum(x[shift:], x[:-shift], out=other[shift:])
        x, other = other, x
        shift *= 2
    return x


def _chunk_z(drive: np.ndarray, tab: Tables, c: int) -> np.ndarray:
    """Exact ``Z`` over chunk ``c`` of CHUNK steps beside ``tab.th_basis``: (rows, K + 3),
    so that its product with a column of :attr:`_Inputs.w_aug` is that neuron's lead
    less H; ``drive``: :attr:`Prepared.drive`, whose first K columns are ``d^-t S[t-1]``."""
    lo = c * CHUNK
    hi = min(lo + CHUNK, tab.steps)
    k = drive.shape[1] - 3
    z = np.empty((hi - lo, k + 3))
    np.matmul(tab.tri[: hi - lo, : hi - lo], drive[lo:hi, :k], out=z[:, :k])
    if lo:
        z[:, :k] += tab.ones[:lo] @ drive[:lo, :k]  # Z[lo - 1]
    z[:, k:] = tab.th_basis[lo:hi]
    return z


class _Inputs:
    """Per-presentation input arrays shared by the helpers of :func:`present`.

    Everything the dirty neurons need from the input spikes alone is computed once per
    presentation (:class:`Prepared`), so that a window costs slices, not products.
    The neurons that have not spiked are followed through :attr:`w_aug`, whose last
    three rows are the layer's ``theta'``, ones and offsets, updated in place: times
    a row of ``[Z, th_basis]`` (:func:`_chunk_z`), a column is that neuron's lead
    less H, ``M + off - Th``.
    """

    def __init__(
        self,
        prepared: Prepared,
        active: np.ndarray,
        weights: np.ndarray,
        thetas: np.ndarray,
        tab: Tables,
    ) -> None:
        self.tab = tab
        self.drive = prepared.drive
        self.dep = prepared.dep
        self.change = prepared.change
        k = active.size
        self.w_aug = np.empty((k + 3, weights.shape[1]))
        # mode="clip": with the default, take() buffers its output (the indices are valid)
        np.take(weights, active, axis=0, out=self.w_aug[:k], mode="clip")
        self.w_aug[k] = thetas
        self.w_aug[k + 1 :] = ((1.0,), (0.0,))
        self.w_active = self.w_aug[:k]  # (K, N) weights at the start of the presentation
        self.theta_p = self.w_aug[k]  # theta' of the layer: theta[t] = theta' g^(t+1)
        self.off = self.w_aug[k + 2]  # offsets of U = M - H + off (module docstring)
        self._z_chunks: dict[int, np.ndarray] = {0: prepared.z_first}

    def z(self, t: int) -> np.ndarray:
        """Exact ``Z[t] = sum_{s<=t} d^-s S[s-1]`` (K,)."""
        return self.tab.ones[: t + 1] @ self.drive[: t + 1, :-3]

    def lead_rows(self, a: int, end: int) -> np.ndarray:
        """``M + off - Th`` over ``a..end`` (rows, N), every neuron, in one product;
        ``a`` and ``end`` must lie in one chunk of ``CHUNK`` steps."""
        lo = a // CHUNK * CHUNK
        return _dot(self._z_chunk(a // CHUNK)[a - lo : end - lo + 1], self.w_aug)

    def lead_cols(self, a: int, end: int, cols: np.ndarray) -> np.ndarray:
        """``M + off - Th`` over ``a..end`` (rows, len(cols)) of the neurons ``cols``."""
        lo = a // CHUNK * CHUNK
        return _dot(self._z_chunk(a // CHUNK)[a - lo : end - lo + 1], self.w_aug[:, cols])

    def _z_chunk(self, c: int) -> np.ndarray:
        """:func:`_chunk_z` of chunk ``c``, cached (chunk 0 made by :func:`prepare`)."""
        z = self._z_chunks.get(c)
        if z is None:
            z = self._z_chunks[c] = _chunk_z(self.drive, self.tab, c)
        return z

    def m_at(self, t: int, cols: list[int]) -> np.ndarray:
        """Exact ``M[t]`` of the neurons ``cols`` (start-of-presentation weights)."""
        z = self._z_chunks.get(t // CHUNK)
        z_t = z[t % CHUNK, :-3] if z is not None else self.z(t)
        return _dot(z_t, self.w_active[:, cols])


def present(
    weights: np.ndarray,
    weights32: np.ndarray,
    thetas: np.ndarray,
    presentation: Presentation,
    params: NetworkParams,
    tab: Tables,
    prepared: Prepared | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train on one presentation, event by event.

    Parameters
    ----------
    weights
        (n_input, N) float64 working weights, already clipped to [w_min, w_max]. The
        columns of the neurons that spike are updated IN PLACE (the caller owns it);
        no normalisation is done here.
    weights32
        float32 copy of ``weights`` used for bounds; updated in place alongside.
    thetas
        (N,) float64 thresholds before the presentation (not modified).
    presentation
        Input spikes (active pixels only) and tie-break uniforms.
    params
        Network parameters; :func:`supported` must hold.
    tab
        ``tables(params)``.
    prepared
        ``prepare(presentation.spikes, tab)`` when computed ahead; computed here if None.

    Returns
    -------
    tuple
        ``(thetas, counts, changed)``: thresholds after the presentation, (N,) int32
        excitatory spike counts, and the ids of the columns that were updated.
    """
    steps = tab.steps
    active = presentation.active
    n = weights.shape[1]
    k = active.size
    counts = np.zeros(n, dtype=np.int32)
    if k == 0:
        return thetas * tab.g_total, counts, np.zeros(0, dtype=np.int64)

    if prepared is None:
        prepared = prepare(presentation.spikes, tab)
    inputs = _Inputs(prepared, active, weights, thetas, tab)
    dep_all = inputs.dep
    drive_in = prepared.drive
    stdp_change = inputs.change
    # M at block ends, an upper bound of M over each block (float32 plus slack).
    m_blocks = _dot(prepared.z_blocks, np.take(weights32, active, axis=0, mode="clip"))
    m_blocks = np.multiply(m_blocks, 1.0 + _SAFETY, dtype=np.float64)

    theta_p = inputs.theta_p  # theta[t] = theta' g^(t+1)
    off = inputs.off
    bounds = _Bounds(m_blocks, theta_p, tab)
    pending: dict[int, tuple[int, float]] = {}  # reset, not dirty: neuron -> (gate, U)
    dirty = _Dirty(k)
    hinc = np.zeros(steps + 3)  # scaled inhibition landing at each step
    h_before = 0.0  # H[a-1]
    w_min, w_max = params.w_min, params.w_max
    refrac = params.refrac
    at = tab.at
    no_cand = np.zeros(0, dtype=np.int64)
    everyone = np.arange(n)
    a = 0
    window = FIRST_WINDOW
    no_gate = steps + refrac + 1  # later than any gate
    next_gate = no_gate  # the first gate of the pending neurons
    while a < steps:
        if next_gate <= a:
            _open_gates(pending, a, off, theta_p, bounds, inputs, h_before)
            next_gate = min((g for g, _ in pending.values()), default=no_gate)
        end = min(a + window, next_gate, steps) - 1
        h_at_a = h_before + hinc[a]
        b0, b1 = a // BLOCK, end // BLOCK
        if not bounds.can_cross(b0, b1, h_at_a):
            cand = no_cand
        elif a < CHUNK and not h_at_a:
            cand = everyone  # before the first spike most neurons are: skip the selection
            # up to the first inhibition's landing, after which most are not
            landing = hinc[a + 1 : end + 1].nonzero()[0]
            if landing.size:
                end = a + int(landing[0])
        else:
            cand = bounds.candidates(b0, b1, h_at_a)
        nd = len(dirty.index)
        if cand.size:
            end = min(end, (a // CHUNK + 1) * CHUNK - 1)
        elif not nd:
            if not pending and bounds.best_after[b0] < h_at_a - _MARGIN:
                break  # nothing can cross for the rest of the presentation
            h_before += float(_add(hinc[a : end + 1]))
            a = end + 1
            window = min(2 * window, MAX_WINDOW)
            continue
        rows = end - a + 1
        # hw[i] = H[a + i]: a neuron integrating at a + i crosses when lead[i] >= hw[i].
        hw = _accumulate(hinc[a : end + 1])
        hw += h_before
        if cand.size:
            # lead = U + H - threshold of the candidates, exact, (rows, n_cand); their
            # inputs do not change in this window (a crossing of theirs ends it).
            if cand is everyone:
                lead_c = inputs.lead_rows(a, end)
            else:
                lead_c = inputs.lead_cols(a, end, cand)
            best = best_c = _max(lead_c, axis=1)
        if nd:
            s_win = drive_in[a : end + 1, :k]  # d^-s S[s-1]
            lowest = dirty.anchor - np.multiply.outer(dirty.rate, dep_all[end])
            if _min(lowest, axis=None) >= w_min:
                # No weight reaches w_min in the window, so the clip is idle and the
                # input is linear in the depression, S.anchor - rate * S.D: the drive
                # (scaled input less the threshold's step) is one product.
                drive = _dot(dirty.augmented, drive_in[a : end + 1].T)
            else:
                w_now = np.multiply.outer(dirty.rate, dep_all[a : end + 1])  # (nd, rows, K)
                np.subtract(dirty.anchor[:, None, :], w_now, out=w_now)
                np.maximum(w_now, w_min, out=w_now)
                drive = np.matmul(w_now[:, :, None, :], s_win[:, :, None])[:, :, 0, 0]
                drive -= np.multiply.outer(dirty.theta, tab.rth_step[a : end + 1])
                drive -= tab.cd_step[a : end + 1]
            # lead = U + H - threshold of the dirty neurons, a cumulative sum of the drive
            # from the lead at a - 1, -inf while gated: a row gated until q starts from its
            # reset value, H[q - 1] and Th[q - 1].
            drive[:, 0] += dirty.lead
            lead_d = _accumulate(drive, axis=1)
            for row, gate in enumerate(dirty.gate):
                if gate > a:
                    q = gate - a
                    if q < rows:
                        start = at.restart_lead(
                            gate - refrac - 1, gate - 1, hw[q - 1], dirty.theta[row]
                        )
                        lead_d[row, q:] += start - lead_d[row, q - 1]
                    lead_d[row, :q] = -np.inf
            best_d = _max(lead_d, axis=0)
            best = np.maximum(best_c, best_d) if cand.size else best_d

        # Events inside the window, in time order.
        pos = 0
        stop = rows
        new_dirty: list[tuple[int, np.ndarray | None, float]] = []  # (id, anchor, rate)
        while pos < stop:
            hits = best[pos:stop] >= hw[pos:stop]
            i = int(hits.argmax())
            if not hits[i]:
                break
            first = pos + i
            t = a + first
            h_first = hw[first]
            above_c = (
                cand[lead_c[first] >= h_first].tolist()
                if cand.size and best_c[first] >= h_first
                else []
            )
            # a few dirty rows: a Python comparison costs less than three NumPy calls
            above_d = (
                [row for row, lead in enumerate(lead_d[:, first].tolist()) if lead >= h_first]
                if nd and best_d[first] >= h_first
                else []
            )
            ids = above_c + [dirty.index[row] for row in above_d]
            if len(ids) > 1:
                ids.sort()
            if not params.one_spike or len(ids) == 1:
                winners = ids
            else:
                winners = [pick_winner(ids, presentation.choices[t])]
            increment = at.theta_increment[t]
            for j in ids:
                theta_p[j] += increment
            reset_u = at.reset_u[t]
            gate = t + refrac + 1
            # STDP of each spiking neuron: depression by this step's input spikes (its
            # trace is now 1), potentiation by the input traces, one clip.
            change = stdp_change[t]
            rate = at.rate[t]
            for j in winners:
                counts[j] += 1
            tail = first + 1
            for j in above_c:
                anchor = None
                if j in winners:
                    w_new = inputs.w_active[:, j] + change
                    np.minimum(w_new, w_max, out=w_new)  # the floor: see below
                    anchor = w_new + rate * dep_all[t + 1]
                else:
                    pending[j] = (gate, reset_u)
                    next_gate = min(next_gate, gate)
                new_dirty.append((j, anchor, rate))
                off[j] = -np.inf
            if above_c:
                bounds.drop(above_c)
                stop = tail  # the window ends here; the next one starts from t + 1
            # Inhibition lands at t + 2 on every neuron integrating then, through H; a
            # dirty neuron gated past t + 2 integrates from H[gate - 1], which it raises.
            leads_changed = bool(above_d)
            if t + 2 < steps:
                inh = at.inhibition[t + 2] * len(winners)
                hinc[t + 2] += inh
                if first + 2 < stop:
                    hw[first + 2 : stop] += inh
                    for row, g in enumerate(dirty.gate):
                        if g > t + 2 and g - a < stop:
                            lead_d[row, g - a : stop] += inh
                            leads_changed = True
            for row in above_d:
                j = dirty.index[row]
                dirty.theta[row] += increment
                dirty.gate[row] = gate
                q = gate - a
                last = a + stop - 1
                if j not in winners:  # its input stands; the step of its threshold grew
                    if q < stop:
                        drive[row, q:stop] -= increment * tab.rth_step[gate : last + 1]
                else:
                    anchor = dirty.anchor[row]
                    w_new = dep_all[t] * -dirty.rate[row]
                    w_new += anchor
                    np.maximum(w_new, w_min, out=w_new)  # weights after step t-1
                    w_new += change
                    # No floor here: every later use of these weights takes
                    # max(w_min, A - r D[s]) first, which makes this clip the reference's
                    # clip(w + change, w_min, w_max) (w_min <= w_max).
                    np.minimum(w_new, w_max, out=w_new)
                    # From step t + 1 its weights are w_new - rate (D[s] - D[t + 1]).
                    np.multiply(dep_all[t + 1], rate, out=anchor)
                    anchor += w_new
                    dirty.rate[row] = rate
                    if q < stop:  # its drive once the gate opens, to the window's end
                        out = drive[row, q:stop]
                        if _min(anchor - rate * dep_all[last]) >= w_min:  # no clip: linear
                            _dot(drive_in[gate : last + 1], dirty.augmented[row], out=out)
                        else:
                            w_row = dep_all[gate : last + 1] * -rate
                            w_row += anchor
                            np.maximum(w_row, w_min, out=w_row)
                            np.einsum("tk,tk->t", w_row, s_win[q:stop], out=out)
                            out -= dirty.theta[row] * tab.rth_step[gate : last + 1]
                            out -= tab.cd_step[gate : last + 1]
                if tail < stop:
                    lead_row = lead_d[row]
                    if q < stop:
                        lead = _accumulate(drive[row, q:stop], out=lead_row[q:stop])
                        lead += at.restart_lead(t, gate - 1, hw[q - 1], dirty.theta[row])
                    lead_row[tail : min(q, stop)] = -np.inf
            if leads_changed and tail < stop:
                np.maximum.reduce(lead_d[:, tail:stop], axis=0, out=best_d[tail:stop])
                if cand.size:
                    np.maximum(best_c[tail:stop], best_d[tail:stop], out=best[tail:stop])
            pos = tail

        # Carry the state over to step a + stop.
        last = stop - 1
        te = a + last
        if nd:
            dirty.lead[:] = lead_d[:, last]
            for row, g in enumerate(dirty.gate):
                if g > te:  # still refractory: from its reset value
                    dirty.lead[row] = at.restart_lead(
                        g - refrac - 1, te, hw[last], dirty.theta[row]
                    )
        for j, anchor, rate in new_dirty:
            if anchor is not None:
                lead = at.restart_lead(te, te, hw[last], theta_p[j])
                dirty.add(j, anchor, rate, lead, theta_p[j], a + stop + refrac)
        h_before = float(hw[last])
        window = WINDOW if stop < rows or pos > 0 else min(2 * window, MAX_WINDOW)
        a += stop

    # Weights after the last step: depression runs on to the end of the presentation.
    if dirty.index:
        wlin = dirty.anchor - np.multiply.outer(dirty.rate, dep_all[steps])
        final = np.maximum(w_min, wlin).T
        cols = np.array(dirty.index)
        where = np.ix_(active, cols)
        weights[where] = final
        weights32[where] = final
    return theta_p * tab.g_total, counts, np.array(dirty.index, dtype=np.int64)


def _open_gates(
    pending: dict[int, tuple[int, float]],
    a: int,
    off: np.ndarray,
    theta_p: np.ndarray,
    bounds: _Bounds,
    inputs: _Inputs,
    h_before: float,
) -> None:
    """Fix the offset of reset neurons whose input is no longer gated from step ``a``.

    ``off = U_reset - M[a-1] + H[a-1]``, so that ``U[t] = M[t] - H[t] + off`` for t >= a.
    """
    ready = [j for j, (gate, _) in pending.items() if gate <= a]
    m_prev = inputs.m_at(a - 1, ready)
    for j, m in zip(ready, m_prev.tolist(), strict=True):
        _, base = pending.pop(j)
        off[j] = base - m + h_before
    bounds.update(ready, off, theta_p)
