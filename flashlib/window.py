"""Sliding window of active neurons over the last k tokens (paper sec 3.1 "windowing", Fig 4; App. C.1).

Pure set logic, no I/O and no weights: for each new token a layer's ``SlidingWindow`` says which
neuron ids to load (not resident yet) and which to evict (left the window), and counts hits,
misses and resident neurons. ``aggregated_usage_curve`` measures the same quantities on a whole
trace for many k at once (Fig 4a: s_agg(k) and the new neurons per token).

Window semantics (the paper is ambiguous, see paper-facts "Version map" and §3.4):
``k`` counts the tokens whose active sets are resident *after* ``update``, the current token
included::

    R_t = A_t | A_{t-1} | ... | A_{t-k+1}          (A_t: active/predicted ids of token t)
    update(A_t):  evict = R_{t-1} - R_t,   load = A_t - R_{t-1}

Eviction is decided when the new token's prediction is known, as paper sec 3.3 describes ("find
the neurons to evict from last_k_active and the current prediction"), so all k previous tokens'
neurons are reused and the resident set never holds more than k tokens' union (evict first,
then load). The paper's OPT setting, "memory for the past 5 tokens" (v1 and the Fig 4b caption:
k = 5; the v3 appendix's "k = 4" reads as 4 previous tokens plus the current one), is ``k = 5``
here (``paper.WINDOW_K_OPT``). In steady state the resident share is s_agg(k) and the share
loaded per token is s_agg(k+1) - s_agg(k), the paper's window increment.
``k = 0`` means no window (Table 2's predictor-only row): nothing is kept between tokens and
every token loads its whole active set; its load and evict sets may overlap (evict first).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd


def as_mask(active, d_ffn: int) -> np.ndarray:
    """Bool mask ``[d_ffn]`` from a mask (numpy/torch bool) or from neuron ids (any int sequence)."""
    a = active.detach().cpu().numpy() if hasattr(active, "detach") else np.asarray(active)
    if a.dtype == np.bool_:
        if a.shape != (d_ffn,):
            raise ValueError(f"active mask has shape {a.shape}, expected ({d_ffn},)")
        return a
    ids = a.astype(np.int64, copy=False).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= d_ffn):
        raise ValueError(f"active ids must lie in [0, {d_ffn}); got [{ids.min()}, {ids.max()}]")
    m = np.zeros(d_ffn, dtype=bool)
    m[ids] = True
    return m


_NO_IDS = np.zeros(0, dtype=np.int64)


def kernels():
    """``flashlib.kernels``, imported on first use: numba and LLVM (~100 MB of libraries) load only
    in processes that run the window or the matrix, never in the baselines' memory-limited workers."""
    from . import kernels as k
    return k


def as_ids(active, d_ffn: int) -> np.ndarray:
    """Sorted unique int64 ids ``[n]`` from a mask ``[d_ffn]`` (numpy/torch bool) or from ids."""
    if type(active) is np.ndarray and active.dtype == np.bool_ and active.shape == (d_ffn,):
        return np.flatnonzero(active)                # the engine's form: one call
    a = active.detach().cpu().numpy() if hasattr(active, "detach") else np.asarray(active)
    if a.dtype == np.bool_:
        if a.shape != (d_ffn,):
            raise ValueError(f"active mask has shape {a.shape}, expected ({d_ffn},)")
        return np.flatnonzero(a)
    ids = np.unique(a.astype(np.int64, copy=False).reshape(-1))
    if ids.size and (ids[0] < 0 or ids[-1] >= d_ffn):
        raise ValueError(f"active ids must lie in [0, {d_ffn}); got [{ids[0]}, {ids[-1]}]")
    return ids


class WindowStep(NamedTuple):
    """What one token asks of one layer. Ids are sorted int64 arrays."""

    load: np.ndarray      # [n_load] ids to read from flash and insert
    evict: np.ndarray     # [n_evict] ids to delete from DRAM (apply before inserting)
    n_active: int         # |A_t|
    n_hits: int           # active ids already resident before the step (not loaded)
    n_resident: int       # |R_t| after the step


@dataclass
class WindowStats:
    """Running counters of one layer's window (the paper's "2.4% new per token" is loaded / tokens)."""

    tokens: int = 0
    loaded: int = 0           # neurons loaded (= misses)
    evicted: int = 0
    hits: int = 0             # active neurons found resident
    peak_resident: int = 0
    resident_sum: int = 0     # sum over tokens of |R_t| (mean = resident_sum / tokens)

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.loaded
        return self.hits / asked if asked else float("nan")


@dataclass
class SlidingWindow:
    """One layer's window: a ring of the last k tokens' active ids and a per-neuron count.

    ``count[i]`` = how many of the buffered tokens have neuron i active, so resident = count > 0.
    An update touches only the ids of the new token and of the token leaving the window
    (O(|A_t| + |A_{t-k}|) work, no pass over all d_ffn neurons): load = the new ids not resident,
    evict = the leaving ids whose count drops to zero and that the new token does not use.
    """

    d_ffn: int
    k: int
    stats: WindowStats = field(init=False)

    def __post_init__(self):
        if self.k < 0 or self.d_ffn <= 0:
            raise ValueError(f"need k >= 0 and d_ffn > 0, got k={self.k}, d_ffn={self.d_ffn}")
        if self.k > np.iinfo(np.uint16).max:
            raise ValueError(f"k={self.k} is too large (max {np.iinfo(np.uint16).max})")
        self.reset()

    def reset(self) -> None:
        """Empty window and zeroed counters (a new sequence)."""
        self._ring: list = [_NO_IDS] * max(self.k, 1)                      # [k] sorted id arrays
        self._count = np.zeros(self.d_ffn, dtype=np.uint16)                # [d_ffn]
        self._resident = np.zeros(self.d_ffn, dtype=bool)                  # [d_ffn] = count > 0
        self._n_resident = 0
        self._pos = 0
        self._filled = 0
        self.stats = WindowStats()

    @property
    def resident_mask(self) -> np.ndarray:
        """Read-only view ``[d_ffn]`` of R_t (live: the next update changes it; copy it to keep it)."""
        v = self._resident.view()
        v.flags.writeable = False
        return v

    def resident_ids(self) -> np.ndarray:
        return np.flatnonzero(self._resident)

    @property
    def n_resident(self) -> int:
        return self._n_resident

    def update(self, active) -> WindowStep:
        """Advance by one token with active set ``active`` (mask ``[d_ffn]`` or ids)."""
        ids = as_ids(active, self.d_ffn)
        res = self._resident
        if self.k == 0:
            evict = self._ring[0]                            # the previous token's set, all of it
            n_hits = 0
            load = ids
            res[evict] = False
            res[ids] = True
            self._ring[0] = ids
            self._n_resident = ids.size
        else:                                                # one compiled call (kernels.py)
            full = self._filled == self.k                    # then token t-k leaves the window
            load, evict = kernels().window_advance(ids, self._ring[self._pos], full, self._count, res)
            self._filled += not full
            self._ring[self._pos] = ids
            self._pos = (self._pos + 1) % self.k
            n_hits = ids.size - load.size
            self._n_resident += load.size - evict.size
        n_res = self._n_resident
        s = self.stats
        s.tokens += 1
        s.loaded += load.size
        s.evicted += evict.size
        s.hits += n_hits
        s.peak_resident = max(s.peak_resident, n_res)
        s.resident_sum += n_res
        return WindowStep(load, evict, ids.size, n_hits, n_res)

    def shrink_to_fit(self, capacity: int) -> np.ndarray:
        """Forget the oldest buffered tokens until at most ``capacity`` neurons stay resident.

        For a token whose window outgrows its DRAM matrix (the paper shrinks Persimmon's window
        on the fly the same way, App. C.3); call it right after ``update``. Returns the sorted
        ids that are no longer resident: they were resident before this token (never the current
        token's neurons), so the caller deletes them together with ``WindowStep.evict`` before
        inserting ``WindowStep.load``.
        The window grows back to k tokens as new tokens arrive. Raises ValueError when the
        current token's active set alone exceeds ``capacity``.
        """
        current = self._ring[0] if self.k == 0 else self._ring[(self._pos - 1) % self.k] \
            if self._filled else _NO_IDS
        if current.size > capacity:                 # checked first: nothing changes on error
            raise ValueError(f"the current token alone has {current.size} active neurons, more than "
                             f"the capacity of {capacity} rows; truncate the active set first")
        dropped = []
        while self._n_resident > capacity and self._filled > 1:
            oldest = (self._pos - self._filled) % self.k
            old, self._ring[oldest] = self._ring[oldest], _NO_IDS
            self._count[old] -= 1
            gone = old[self._count[old] == 0]
            self._resident[gone] = False
            self._n_resident -= gone.size
            self._filled -= 1
            dropped.append(gone)
        out = np.sort(np.concatenate(dropped)) if dropped else _NO_IDS
        self.stats.evicted += out.size
        self.stats.resident_sum -= out.size        # peak_resident keeps the demand before shrinking
        return out


# --- whole-trace curves (Fig 4a) -----------------------------------------------------------


@dataclass(frozen=True)
class UsageCurve:
    """s_agg(k), new neurons per token and peak resident count, per layer and window k.

    s_agg[l, j]: share of layer l's neurons active in at least one of ks[j] consecutive tokens,
    averaged over every full window of the trace (= the window's mean resident share).
    new_per_token[l, j]: share of neurons active at token t but in none of the ks[j] tokens
    before it, averaged over t >= ks[j] (= what ``SlidingWindow(k)`` loads per token).
    peak_resident[l, j]: the largest such union in neurons (the paper's Req_i, which sizes the
    preallocated DRAM matrix). Same definitions as ``sparsity.aggregated_usage``.
    """

    ks: np.ndarray              # [K]
    s_agg: np.ndarray           # [L, K] share of d_ffn
    new_per_token: np.ndarray   # [L, K] share of d_ffn (nan where the trace is not longer than k)
    peak_resident: np.ndarray   # [L, K] neurons
    d_ffn: int

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: layer | k | s_agg | new_per_token | peak_resident."""
        L, K = self.s_agg.shape
        return pd.DataFrame({
            "layer": np.repeat(np.arange(L), K), "k": np.tile(self.ks, L),
            "s_agg": self.s_agg.reshape(-1), "new_per_token": self.new_per_token.reshape(-1),
            "peak_resident": self.peak_resident.reshape(-1)})


def as_trace(masks) -> np.ndarray:
    """``[T, L, d]`` bool numpy view of a ``[T, d]`` or ``[T, L, d]`` trace (numpy or torch), checked."""
    m = masks.detach().cpu().numpy() if hasattr(masks, "detach") else np.asarray(masks)
    if m.dtype != np.bool_:
        raise TypeError(f"trace must be boolean, got dtype {m.dtype}")
    if m.ndim == 2:
        m = m[:, None, :]
    if m.ndim != 3:
        raise ValueError(f"trace must be [tokens, d_ffn] or [tokens, n_layers, d_ffn], got {m.shape}")
    return m


def _window_ks(ks, T: int) -> np.ndarray:
    ks = np.asarray(sorted(set(int(k) for k in ks)))
    if ks.size == 0 or ks[0] < 1 or ks[-1] > T:
        raise ValueError(f"every window k must be in 1..T={T}, got {ks.tolist()}")
    return ks


def _scan(m: np.ndarray, kmax: int) -> tuple[np.ndarray, np.ndarray]:
    """One pass over a ``[T, L, d]`` trace: union[t, l, k] = |A_{t-k+1..t}| for k = 0..kmax and
    new[t, l, g] = neurons active at t whose previous activation is g or more tokens back."""
    T, L, d = m.shape
    nb = kmax + 2                                          # buckets 0..kmax, kmax+1 = "older"
    last = np.full((L, d), -nb, dtype=np.int64)            # "never" = older than any window
    age_hist = np.zeros((L, nb), dtype=np.int64)           # neurons per age (tokens since last active)
    age_hist[:, -1] = d
    union = np.zeros((T, L, kmax + 1), dtype=np.int64)     # union[t, l, k] = |A_{t-k+1..t}|
    new = np.zeros((T, L, nb), dtype=np.int64)             # new[t, l, g] = #active at t with gap >= g
    for t in range(T):
        li, ni = np.nonzero(m[t])                          # active entries only: O(|A_t|) work
        gap = np.minimum(t - last[li, ni], kmax + 1)       # tokens since the previous activation
        g = np.bincount(li * nb + gap, minlength=L * nb).reshape(L, nb)
        new[t] = g[:, ::-1].cumsum(axis=1)[:, ::-1]
        last[li, ni] = t
        # every age grows by one; the active neurons (gap g, age g-1 before) restart at age 0
        aged = np.empty_like(age_hist)
        aged[:, 0] = g.sum(axis=1)
        aged[:, 1:kmax + 1] = age_hist[:, :kmax] - g[:, 1:kmax + 1]
        aged[:, -1] = age_hist[:, -2] + age_hist[:, -1] - g[:, -1]
        age_hist = aged
        union[t, :, 1:] = age_hist[:, :kmax].cumsum(axis=1)  # #age < k for k = 1..kmax
    return union, new


def resident_sizes(masks, ks) -> dict[int, np.ndarray]:
    """k -> the resident set of a window of k tokens at every full window of the trace ``[T - k + 1, L]``.

    The distribution behind ``peak_resident`` (its maximum): a quantile of it sizes a matrix that
    holds the window on most tokens instead of on the worst one (``EngineConfig.capacity_quantile``).
    """
    m = as_trace(masks)
    ks = _window_ks(ks, m.shape[0])
    union, _ = _scan(m, int(ks[-1]))
    return {int(k): union[k - 1:, :, k] for k in ks}


def aggregated_usage_curve(masks, ks=(1, 2, 3, 4, 5, 6, 8, 10)) -> UsageCurve:
    """s_agg(k), new-per-token(k) and peak resident for every k in ``ks``, in one pass over tokens.

    ``masks``: one token stream, bool ``[T, d_ffn]`` or ``[T, n_layers, d_ffn]``. Per token it
    keeps each neuron's last active time: the union of the last k tokens is {age < k}, and the
    neurons a window of k must load are the active ones whose previous activation is more than
    k tokens back, so one histogram per token serves all k. Cost O(T * L * d_ffn) for the
    scan of the masks, plus work proportional to the active entries.
    """
    m = as_trace(masks)
    T, L, d = m.shape
    ks = _window_ks(ks, T)
    union, new = _scan(m, int(ks[-1]))
    s_agg = np.stack([union[k - 1:, :, k].mean(axis=0) for k in ks], axis=1) / d
    peak = np.stack([union[k - 1:, :, k].max(axis=0) for k in ks], axis=1)
    # a window of k misses a neuron iff its previous activation is more than k tokens back
    new_pt = np.stack([new[k:, :, k + 1].mean(axis=0) if k < T else np.full(L, np.nan)
                       for k in ks], axis=1) / d
    return UsageCurve(ks, s_agg, new_pt, peak, d)


def window_capacity(masks, k: int) -> np.ndarray:
    """Rows each layer's DRAM matrix needs for window ``k`` on this trace (paper sec 3.3 Req_i), ``[L]``.

    The peak of |R_t| = the largest union of k consecutive active sets (``k = 0``: the largest
    single active set). Size the matrices with a trace that resembles the workload, and keep a margin.
    """
    m = as_trace(masks)
    if k == 0:
        return m.sum(axis=2).max(axis=0)
    return aggregated_usage_curve(m, ks=(min(k, m.shape[0]),)).peak_resident[:, 0]
