"""Synthetic paper-scale activation traces, calibrated to the paper's statistics (Table 6, App. B.1, C.1, Fig 12).

We cannot run OPT 6.7B here, so the paper-scale experiments (32 layers x 16384 neurons) use
per-token active sets from this explicit, seeded generator. It makes both the TRUE active set
(ReLU output > 0) and the PREDICTED set (what a low-rank predictor would mark) of every token
and layer, as bool masks ``[n_tokens, n_layers, d_ffn]``.

The model (every knob is a field of ``config.TraceConfig``):

1. Per-layer active share a_l: piecewise linear through Table 6's anchors (1.56% at layer 1,
   2.66% at layer 16, 5.36% at layer 32; other layer counts map linearly onto 1..32) plus a
   sine bump that vanishes at the anchors, scaled so the mean over layers is Table 6's 3.30%
   (linear interpolation alone gives 3.10%). Assumption: the shape between anchors (Fig 9a's
   bars were not recovered).
2. Neuron popularity (firing rate p_i): ``n_hubs`` near-always-on neurons with rates
   hub_top_rate * hub_decay**j (they are every neuron's "closest friends": Fig 12b/c says the
   closest friend co-fires >= 95% of the time and the 3rd one 86%), then a power-law (Zipf)
   body p ~ rank**-popularity_exponent, scaled so the layer's mean is a_l and capped at the
   smallest hub rate; ranks are shuffled over neuron ids. Assumption: neurons are independent
   given their rates, so co-activation structure comes only from popularity (App. D's power
   law), not from shared topics.
3. Temporal persistence: neuron i's pre-activation is x_i(t) = mu_i + z_i(t), z a stationary
   AR(1) Gaussian with lag-1 correlation ``persistence`` and mu_i = Phi^-1(p_i), so it fires
   (x > 0) with probability p_i and tends to stay on or off over neighbouring tokens.
4. Predictor: it sees x_i(t) + sigma * e_i(t) (e: AR(1) noise with lag-1 correlation
   ``predictor_noise_persistence``) and fires above -delta_l, with delta_l solved per layer
   so it marks ``predicted_over_active`` (App. B.1: ~3x) times the active share. Its errors
   therefore sit near the threshold (Fig 3a), giving ~5% false negatives and ~7% false positives
   of the inactive neurons (App. C.1) for sigma = 0.5.

``persistence`` and ``popularity_exponent`` were set by a grid search (persistence 0.85 / 0.87 /
0.89 x exponent 0.6 / 0.8 / 1.0, 32 x 4096 neurons, 256 tokens, 2 seeds) so that a window of
k = 5 tokens over the PREDICTED sets holds ~24% of the FFN and loads ~2.4% of it per token
(App. C.1): 0.87 / 0.8 gave 23.8% and 2.45% (persistence 0.85 gives 24.4% / 2.58%, 0.89 gives
23.3% / 2.30%; a larger exponent lowers both and the false negatives). The temporal structure
thus mixes a slow part (pre-activations, lag-1 correlation 0.87) and a fast one (the
predictor's independent noise), which makes s_agg(k) bend over as in Fig 4a.
``calibration_report`` shows every target beside what a trace achieves. ``trace_statistics``
works on any bool trace, so the same numbers can be measured on our ReLU OPT's recorded traces.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import paper
from .config import TRACE_CALIBRATION, TraceCalibration, TraceConfig
from .window import UsageCurve, as_trace, aggregated_usage_curve

_PAPER_LAYERS = 32   # Table 6 numbers layers 1..32


def paper_layer_position(n_layers: int) -> np.ndarray:
    """Where each of our layers sits on the paper's 1..32 layer axis ``[n_layers]``."""
    return np.linspace(1, _PAPER_LAYERS, n_layers) if n_layers > 1 else np.array([16.0])


def layer_active_share(n_layers: int) -> np.ndarray:
    """Target active share per layer ``[n_layers]`` (fractions), from Table 6 (see module docstring)."""
    anchors = sorted(paper.TABLE6_ACTIVE_PCT.items())
    xa = np.array([a[0] for a in anchors], dtype=float)
    ya = np.array([a[1] for a in anchors], dtype=float) / 100
    mean = paper.TABLE6_MEAN_ACTIVE_PCT / 100
    if n_layers == 1:
        return np.array([mean])
    x = paper_layer_position(n_layers)
    base = np.interp(x, xa, ya)
    seg = np.clip(np.searchsorted(xa, x, side="right") - 1, 0, len(xa) - 2)
    bump = np.sin(np.pi * (x - xa[seg]) / (xa[seg + 1] - xa[seg]))
    if bump.sum() < 1e-9:              # only anchor layers: the mean cannot be adjusted
        return base
    return base + bump * (mean * n_layers - base.sum()) / bump.sum()


def neuron_rates(d_ffn: int, mean_rate: float, cfg: TraceConfig) -> np.ndarray:
    """Firing rate of each popularity rank ``[d_ffn]`` (hubs, then a Zipf body), mean = ``mean_rate``."""
    n_hubs = min(cfg.n_hubs, d_ffn)
    hubs = cfg.hub_top_rate * cfg.hub_decay ** np.arange(n_hubs)
    cap = hubs[-1] if n_hubs else cfg.hub_top_rate
    body = np.arange(n_hubs + 1, d_ffn + 1, dtype=np.float64) ** -cfg.popularity_exponent
    if hubs.sum() > mean_rate * d_ffn:
        raise ValueError(f"the {n_hubs} hubs alone exceed a mean rate of {mean_rate:.4f} over "
                         f"d_ffn={d_ffn}; use fewer hubs or a larger d_ffn")
    # mean(min(A * body, cap)) is piecewise linear in A: with the m largest body rates capped,
    # A = (total - hubs - m * cap) / sum(body[m:]); take the smallest m that is consistent.
    rest = mean_rate * d_ffn - hubs.sum() - cap * np.arange(body.size + 1)       # [n_body + 1]
    suffix = np.concatenate([np.cumsum(body[::-1])[::-1], [0.0]])                # sum(body[m:])
    nxt = np.concatenate([body, [0.0]])                                          # body[m]
    with np.errstate(divide="ignore", invalid="ignore"):
        a = rest / suffix
        m = int(np.flatnonzero((a * nxt <= cap) & (rest >= 0))[0])
    if m == body.size:
        raise ValueError(f"mean rate {mean_rate:.4f} needs every neuron at the cap {cap:.3f}")
    return np.concatenate([hubs, np.minimum(a[m] * body, cap)])


def _predictor_offsets(mu: np.ndarray, targets: np.ndarray, noise_std: float) -> np.ndarray:
    """delta_l with mean_i Phi((mu_li + delta_l) / sqrt(1 + noise_std^2)) = targets_l, ``[L]``.

    Bisection on every layer at once (the mean is increasing in delta); Phi via erf, which is
    several times faster here than ``torch.special.ndtr``.
    """
    mu_t = torch.from_numpy(mu.astype(np.float64))                  # [L, d]
    target = torch.from_numpy(np.asarray(targets, dtype=np.float64))
    scale = float(np.sqrt(2.0 * (1.0 + noise_std ** 2)))
    lo = torch.full_like(target, -10.0)
    hi = torch.full_like(target, 20.0)
    for _ in range(48):                 # 30 / 2**48: far below float32 resolution
        mid = 0.5 * (lo + hi)
        rate = 0.5 * (1 + torch.erf((mu_t + mid[:, None]) / scale)).mean(dim=1)
        low = rate < target
        lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
    return (0.5 * (lo + hi)).numpy()


@dataclass(frozen=True)
class Trace:
    """A synthetic trace: what fires and what the predictor marks, per token, layer and neuron."""

    active: np.ndarray        # bool [n_tokens, n_layers, d_ffn]  true activations (ReLU > 0)
    predicted: np.ndarray     # bool [n_tokens, n_layers, d_ffn]  predictor positives
    layer_rate: np.ndarray    # [n_layers] target active share of each layer
    neuron_rate: np.ndarray   # float32 [n_layers, d_ffn] each neuron's firing probability p_i
    config: TraceConfig


@contextmanager
def torch_threads(n: int):
    """Run a block with ``n`` torch threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def generate_trace(cfg: TraceConfig, progress: bool = True) -> Trace:
    """Draw a trace from the model in the module docstring (deterministic for a given ``cfg.seed``).

    Memory: two bool masks of n_tokens * n_layers * d_ffn bytes (2 x 134 MB at paper scale for
    256 tokens) plus a few float32 ``[n_layers, d_ffn]`` state vectors. Random numbers come from
    a seeded ``torch.Generator`` (numpy's normal sampler is ~3x slower here). The per-token
    loop runs on one torch thread: its element-wise work on 2 MB vectors gains nothing from
    more, and on the busy 2-core build machine two threads made it 3x slower (paper scale,
    256 tokens: ~3 s CPU, one thread).
    """
    L, d, T = cfg.n_layers, cfg.d_ffn, cfg.n_tokens
    rng = np.random.default_rng(cfg.seed)
    rates = layer_active_share(L)
    neuron_rate = np.empty((L, d), dtype=np.float32)   # p_i: each neuron's firing probability
    mu = np.empty((L, d), dtype=np.float32)            # pre-activation offsets Phi^-1(p_i)
    for l in range(L):
        neuron_rate[l] = neuron_rates(d, rates[l], cfg)[rng.permutation(d)]
    mu[:] = torch.special.ndtri(torch.from_numpy(neuron_rate.astype(np.float64))).numpy()
    delta = _predictor_offsets(mu, cfg.predicted_over_active * rates, cfg.predictor_noise)
    delta = delta.astype(np.float32)[:, None]              # [L, 1] predictor threshold offsets
    active = np.empty((T, L, d), dtype=bool)
    predicted = np.empty((T, L, d), dtype=bool)
    with torch_threads(1):
        _run_chain(torch.from_numpy(mu), torch.from_numpy(delta), torch.from_numpy(active),
                   torch.from_numpy(predicted), cfg, progress)     # fills the masks in place
    return Trace(active, predicted, rates, neuron_rate, cfg)


def _run_chain(mu, delta, act, pred, cfg: TraceConfig, progress: bool) -> None:
    """Advance the AR(1) pre-activations z and predictor noise e token by token, writing the masks.

    ``mu [L, d]``, ``delta [L, 1]``; ``act``/``pred`` ``[T, L, d]`` bool tensors to fill.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    rho, rho_e = cfg.persistence, cfg.predictor_noise_persistence
    c, c_e = float(np.sqrt(1 - rho ** 2)), float(np.sqrt(1 - rho_e ** 2))
    L, d = mu.shape
    z = torch.randn((L, d), generator=g)       # stationary start: no burn-in needed
    e = torch.randn((L, d), generator=g)
    x = torch.empty((L, d))
    for t in tqdm(range(act.shape[0]), desc="synthetic trace", disable=not progress, leave=False):
        if t:
            z.mul_(rho).add_(torch.randn((L, d), generator=g), alpha=c)
            e.mul_(rho_e).add_(torch.randn((L, d), generator=g), alpha=c_e)
        torch.add(mu, z, out=x)
        torch.gt(x, 0, out=act[t])             # fires: pre-activation > 0
        x.add_(e, alpha=cfg.predictor_noise).add_(delta)
        torch.gt(x, 0, out=pred[t])            # predictor: noisy pre-activation > -delta


# --- statistics (shared with measured traces) ----------------------------------------------


@dataclass(frozen=True)
class TraceStats:
    """What ``trace_statistics`` measures on one bool trace ``[T, L, d]``."""

    active_share: np.ndarray      # [L] mean share of neurons active per token
    curve: UsageCurve             # s_agg(k), new per token(k), peak rows, per layer
    friend_shares: np.ndarray     # [L, n_friends] mean co-activation of the j-th closest friend (nan: not computed)
    friends: tuple

    def per_layer(self) -> pd.DataFrame:
        """layer | active_share | s_agg_k{k} | new_k{k} | friend_{j}."""
        df = pd.DataFrame({"layer": np.arange(self.active_share.size), "active_share": self.active_share})
        for j, k in enumerate(self.curve.ks):
            df[f"s_agg_k{k}"] = self.curve.s_agg[:, j]
            df[f"new_k{k}"] = self.curve.new_per_token[:, j]
        for j, f in enumerate(self.friends):
            df[f"friend_{f}"] = self.friend_shares[:, j]
        return df

    def overall(self, k: int) -> dict:
        """Whole-FFN shares (mean over layers: every layer has the same d_ffn) for window k."""
        j = list(self.curve.ks).index(k)
        return {"active_share": float(self.active_share.mean()),
                "s_agg": float(self.curve.s_agg[:, j].mean()),
                "new_per_token": float(np.nanmean(self.curve.new_per_token[:, j])),
                **{f"friend_{f}": float(np.nanmean(self.friend_shares[:, i]))
                   for i, f in enumerate(self.friends)}}


def closest_friend_shares(mask: np.ndarray, friends=(1, 3), sample: int = 512,
                          min_activations: int = 10, seed: int = 0) -> np.ndarray:
    """Mean share of a neuron's activations on which its j-th closest friend also fires (Fig 12).

    ``mask``: bool ``[T, d_ffn]`` of one layer. Uses up to ``sample`` random neurons active at
    least ``min_activations`` times (rarer ones give noisy shares); returns ``[len(friends)]``.
    """
    count = mask.sum(axis=0)
    cand = np.flatnonzero(count >= min_activations)
    if cand.size < 2:
        return np.full(len(friends), np.nan)
    pick = np.random.default_rng(seed).choice(cand, size=min(sample, cand.size), replace=False)
    f = torch.from_numpy(mask).to(torch.float32)                 # [T, d]; counts < 2^24: exact
    co = f[:, pick].T @ f                                        # [S, d] co-activation counts
    co[torch.arange(pick.size), torch.from_numpy(pick)] = -1     # a neuron is not its own friend
    top = co.topk(max(friends), dim=1).values.numpy() / count[pick][:, None]
    return top[:, [j - 1 for j in friends]].mean(axis=0)


def population_friend_shares(neuron_rate: np.ndarray, friends=(1, 3)) -> np.ndarray:
    """Fig 12's friend shares implied by the generator itself (infinitely long trace), ``[len(friends)]``.

    Neurons are independent given their rates, so neuron i's j-th closest friend co-fires with
    it at the j-th largest rate among the other neurons; averaged over all neurons of all layers.
    """
    r = np.atleast_2d(neuron_rate)
    top = -np.sort(-r, axis=1)[:, : max(friends) + 1]             # [L, j_max + 1]
    out = []
    for j in friends:
        # the j top neurons see the (j+1)-th rate; every other neuron sees the j-th
        share = ((r.shape[1] - j) * top[:, j - 1] + j * top[:, j]) / r.shape[1]
        out.append(float(share.mean()))
    return np.array(out)


def trace_statistics(masks, ks=(1, 2, 3, 4, 5, 6, 8, 10), friends=(), friend_sample: int = 512,
                     min_friend_activations: int = 10, friend_layers=None) -> TraceStats:
    """Active share, s_agg(k), new per token(k) and (optionally) closest-friend shares of a trace.

    ``masks``: bool ``[T, d_ffn]`` or ``[T, n_layers, d_ffn]`` (numpy or torch), one token stream.
    ``friends``: closest-friend ranks to measure (Fig 12; e.g. (1, 3)) on ``friend_layers``
    (default all; the others stay nan). Short traces overestimate friend shares: a neuron with
    few activations shares all of them with some popular neuron by chance.
    """
    m = as_trace(masks)
    ks = tuple(k for k in ks if k <= m.shape[0])
    curve = aggregated_usage_curve(m, ks)
    fr = np.full((m.shape[1], len(friends)), np.nan)
    if friends:
        for l in range(m.shape[1]) if friend_layers is None else friend_layers:
            fr[l] = closest_friend_shares(np.ascontiguousarray(m[:, l]), friends, friend_sample,
                                          min_friend_activations, seed=l)
    return TraceStats(m.mean(axis=(0, 2)), curve, fr, tuple(friends))


def prediction_statistics(active, predicted) -> dict:
    """Predictor errors over a whole trace: FN share of active, FP share of inactive, predicted/active."""
    a, p = as_trace(active), as_trace(predicted)
    if a.shape != p.shape:
        raise ValueError(f"active {a.shape} and predicted {p.shape} traces differ in shape")
    n_act, n_pred = int(a.sum()), int(p.sum())
    tp = int(np.logical_and(a, p).sum())
    return {"fn_rate": 1 - tp / max(n_act, 1), "fp_rate": (n_pred - tp) / max(a.size - n_act, 1),
            "predicted_share": n_pred / a.size, "predicted_over_active": n_pred / max(n_act, 1)}


# --- calibration ---------------------------------------------------------------------------


def calibration_report(trace: Trace, calib: TraceCalibration = TRACE_CALIBRATION) -> pd.DataFrame:
    """statistic | target | achieved | tolerance | ok | source: the paper's numbers vs this trace.

    ``kind`` says how ``ok`` is decided: "rel" |achieved - target| <= tolerance (relative
    tolerance times target), "abs" the same with an absolute tolerance, "min" achieved >=
    target - tolerance (the paper gives a lower bound), "info" not checked (ok is NA).
    Fig 12's friend shares are checked on the generator's own rates (an infinitely long trace);
    the values measured on this finite trace are shown as "info": they are biased upward.
    """
    k, L = calib.window_k, trace.config.n_layers
    friend_layers = np.unique(np.linspace(0, L - 1, min(calib.friend_layers, L)).round().astype(int))
    act = trace_statistics(trace.active, ks=(1,), friends=(1, 3), friend_sample=calib.friend_sample,
                           min_friend_activations=calib.min_friend_activations,
                           friend_layers=friend_layers)
    pred = trace_statistics(trace.predicted, ks=(k,)).overall(k)
    errs = prediction_statistics(trace.active, trace.predicted)
    pop = population_friend_shares(trace.neuron_rate, (1, 3))
    share, pos = act.active_share, paper_layer_position(L)
    rows = []

    def add(stat, target, achieved, tol, kind, source):
        t = tol * abs(target) if kind == "rel" else tol
        ok = {"rel": abs(achieved - target) <= t, "abs": abs(achieved - target) <= t,
              "min": achieved >= target - t, "info": pd.NA}[kind]
        rows.append({"statistic": stat, "target": target, "achieved": achieved, "tolerance": t,
                     "kind": kind, "ok": ok if ok is pd.NA else bool(ok), "source": source})

    for layer, pct in sorted(paper.TABLE6_ACTIVE_PCT.items()):
        hit = np.flatnonzero(np.isclose(pos, layer))
        if hit.size:
            add(f"active share, layer {layer}", pct / 100, float(share[hit[0]]), calib.active_rel_tol,
                "rel", "Table 6")
    add("active share, mean over layers", paper.TABLE6_MEAN_ACTIVE_PCT / 100, float(share.mean()),
        calib.active_rel_tol, "rel", "Table 6")
    add("predicted / active", paper.PREDICTED_OVER_ACTIVE, errs["predicted_over_active"],
        calib.ratio_rel_tol, "rel", "App. B.1")
    add("predicted share per token", paper.PREDICTED_SHARE_PER_TOKEN, errs["predicted_share"],
        calib.window_rel_tol, "rel", "App. C.1")
    add("false negatives (share of active)", paper.PREDICTOR_FN_RATE, errs["fn_rate"],
        calib.fn_abs_tol, "abs", "App. C.1")
    add("false positives (share of inactive)", paper.PREDICTOR_FP_RATE, errs["fp_rate"],
        calib.fn_abs_tol, "abs", "App. C.1")
    add(f"window cache share, k={k} (predicted)", paper.WINDOW_CACHE_SHARE_OF_FFN, pred["s_agg"],
        calib.window_rel_tol, "rel", "App. C.1")
    add(f"new share per token, k={k} (predicted)", paper.NEW_SHARE_PER_TOKEN, pred["new_per_token"],
        calib.window_rel_tol, "rel", "App. C.1")
    add("closest friend co-activation (generator)", paper.CLOSEST_FRIEND_COACTIVATION, pop[0],
        calib.friend_abs_tol, "min", "Fig 12b")
    add("3rd closest friend co-activation (generator)", paper.THIRD_FRIEND_COACTIVATION, pop[1],
        calib.friend_abs_tol, "abs", "Fig 12c")
    add(f"closest friend co-activation (this trace, {trace.config.n_tokens} tokens)",
        paper.CLOSEST_FRIEND_COACTIVATION, float(np.nanmean(act.friend_shares[:, 0])), np.nan,
        "info", "Fig 12b")
    add(f"3rd closest friend co-activation (this trace, {trace.config.n_tokens} tokens)",
        paper.THIRD_FRIEND_COACTIVATION, float(np.nanmean(act.friend_shares[:, 1])), np.nan,
        "info", "Fig 12c")
    return pd.DataFrame(rows)
