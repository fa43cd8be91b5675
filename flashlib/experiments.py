"""One function per figure of the engine notebooks (paper Tables 2, 3, 5; Figs 1, 4, 5, 6, 7, 8, 12).

Each function returns a tidy DataFrame; notebooks plot and save them. Latency comparisons use the
side-by-side protocol of ``flashlib.bench`` (one process, methods alternating, flash files evicted
before every run, medians) and its tables.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from . import paper, sparsity
from .bench import (METHODS, breakdown, build_runner, engine_config, fit_context, paper_budget, predictors_for,
                    prompt_ids, run_side_by_side, runner_info)
from .config import ENGINE, BenchConfig, TraceConfig, bench_config
from .dram import NaiveNeuronMatrix, NeuronMatrix, dram_bytes_moved
from .engine import SparseEngine, calibration_batches, calibration_trace
from .flashffn import ActiveSets
from .models import ffn_adapter, load_model
from .window import SlidingWindow, aggregated_usage_curve


def latency_benchmark(model_name: str, methods=METHODS, cfg: BenchConfig | None = None, *, flash_root=None,
                      progress: bool = True, **engine_overrides) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tables 2/3 measured: every method side by side on ``cfg.repeats`` held-out prompts.

    Returns (raw step rows, per-method info). Methods: naive, hybrid, predictor, windowing,
    bundling, and "preallocated"/"naive-matrix" (bundling with either DRAM matrix, Fig 6).
    """
    cfg = cfg or bench_config()
    torch.set_num_threads(cfg.threads)
    model, tok = load_model(model_name, progress=progress)
    cfg = fit_context(cfg, model)
    needs_pred = any(m not in ("naive", "hybrid") for m in methods)
    preds = predictors_for(model_name, model, tok, progress) if needs_pred else None
    del model
    budget, why = cfg.dram_budget, ""
    if budget == "paper":
        budget, why = paper_budget(model_name, tokenizer=tok, predictors=preds, k=cfg.window_k, flash_root=flash_root)
    runners = {}
    try:
        for m in methods:
            base, extra = {"preallocated": ("bundling", {"preallocated": True}),
                           "naive-matrix": ("bundling", {"preallocated": False})}.get(m, (m, {}))
            runners[m] = build_runner(base, model_name, budget, tokenizer=tok, predictors=preds,
                                      flash_root=flash_root, io_threads=cfg.io_threads, **{**engine_overrides, **extra})
        prompts = [prompt_ids(tok, cfg.prompt_tokens, cfg.domain, i) for i in range(cfg.repeats)]
        raw = run_side_by_side(runners, prompts, cfg.new_tokens, cfg.repeats, progress)
        info = pd.DataFrame([runner_info(m, r) for m, r in runners.items()]).assign(
            budget_note=why, prompt_tokens=cfg.prompt_tokens, new_tokens=cfg.new_tokens)
    finally:
        for r in runners.values():
            r.close()
    return raw, info


# --- Fig 8: latency vs generation length ---------------------------------------------------

def generation_length(model_name: str, n_tokens: int, *, dram_budget=None, prompt_tokens: int = 16,
                      repeats: int = 3, flash_root=None, progress: bool = True, **overrides) -> pd.DataFrame:
    """Per-token latency of the full engine over long generations (Fig 8), greedy and nucleus (p=0.9)
    alternating, ``repeats`` prompts each, capped at the model's context.

    One row per (sampling, rep, token): io_ms | mem_ms | compute_ms | total_ms | bytes_read.
    """
    model, tok = load_model(model_name, progress=False)
    preds = predictors_for(model_name, model, tok, progress)
    cfg = engine_config("bundling", ENGINE.dram_budget if dram_budget is None else dram_budget, **overrides)
    ctx = getattr(model.config, "max_position_embeddings", None) or (prompt_tokens + n_tokens)
    n = min(n_tokens, ctx - prompt_tokens)
    frames = []
    with SparseEngine(model, model_name, cfg, predictors=preds, tokenizer=tok, flash_root=flash_root) as e:
        for rep in range(repeats):
            for sampling, kw in (("greedy", {}), ("nucleus p=0.9", dict(do_sample=True, top_p=0.9))):
                torch.manual_seed(rep)
                r = e.generate(prompt_ids(tok, prompt_tokens, index=rep), max_new_tokens=n, min_new_tokens=n, **kw)
                d = r.decode_stats().reset_index(drop=True)
                frames.append(d.assign(token=np.arange(1, len(d) + 1), sampling=sampling, rep=rep))
    return pd.concat(frames, ignore_index=True)


# --- Fig 4 / Fig 7: windowing --------------------------------------------------------------

def usage_curve(model_name: str, policy: str = "predictor", max_k: int = 16, progress: bool = True) -> pd.DataFrame:
    """Fig 4a on our model: s_agg(k), new neurons per token and peak rows per layer and k, from the
    engine's calibration trace (predicted or true active sets on the train split)."""
    model, tok = load_model(model_name, progress=False)
    preds = predictors_for(model_name, model, tok, progress) if policy == "predictor" else None
    a = ffn_adapter(model)
    trace = calibration_trace(model, a, ActiveSets(policy, a, preds), calibration_batches(
        tok, ENGINE, getattr(model.config, "max_position_embeddings", None)))
    ks = tuple(range(1, min(max_k, trace.shape[1] - 1) + 1))
    frames = [aggregated_usage_curve(seq, ks=ks).to_frame().assign(seq=i) for i, seq in enumerate(trace)]
    df = pd.concat(frames).groupby(["layer", "k"], as_index=False).agg(
        s_agg=("s_agg", "mean"), new_per_token=("new_per_token", "mean"), peak_resident=("peak_resident", "max"))
    return df.assign(policy=policy)


def window_sweep(model_name: str, ks, cfg: BenchConfig | None = None, *, flash_root=None,
                 progress: bool = True) -> pd.DataFrame:
    """Fig 4b / Fig 7: the full engine at each window k (unbounded budget), side by side.

    One row per (k, run): k | dram_bytes | dram_share | bytes_per_token | io/mem/compute/total ms.
    """
    cfg = cfg or bench_config()
    torch.set_num_threads(cfg.threads)
    model, tok = load_model(model_name, progress=False)
    cfg = fit_context(cfg, model)
    preds = predictors_for(model_name, model, tok, progress)
    runners = {f"k={k}": build_runner("bundling", model_name, None, tokenizer=tok, predictors=preds,
                                      flash_root=flash_root, io_threads=cfg.io_threads, window_k=int(k)) for k in ks}
    try:
        prompts = [prompt_ids(tok, cfg.prompt_tokens, cfg.domain, i) for i in range(cfg.repeats)]
        raw = run_side_by_side(runners, prompts, cfg.new_tokens, cfg.repeats, progress)
        info = pd.DataFrame([{**runner_info(m, r), "k": r.sizing.k} for m, r in runners.items()])
    finally:
        for r in runners.values():
            r.close()
    s = breakdown(raw, info)
    s["dram_share"] = s["dram_bytes"] / s["model_bytes"]
    return s.sort_values("k").reset_index(drop=True)


# --- Fig 5 / sec 3.2: bundling and the co-activation ("closest friend") idea -------------------

def friend_analysis(model_name: str, max_tokens: int = 8192, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Fig 12 and sec 3.2 on our model: closest-friend shares per layer, how many neurons share one
    closest friend (in-degree), and the bytes a 'bundle each neuron with its closest friend' layout
    would read per token versus plain bundles, over true active sets of the held-out split."""
    model, tok = load_model(model_name, progress=False)
    a = ffn_adapter(model)
    seq = min(256, getattr(model.config, "max_position_embeddings", 256))
    batches = [b for bs in sparsity.domain_batches(tok, ("news", "shakespeare", "code"), "test", seq, 4,
                                                   max_tokens // 3).values() for b in bs]
    trace = sparsity.record_masks(model, a, batches, progress=progress)
    friends, indeg, cost = [], [], []
    for layer in trace.layers:
        m = trace.flat(layer)
        counts = sparsity.coactivation_counts(m)
        shares, keep = sparsity.closest_friend_shares(counts, min_activations=max(2, m.shape[0] // 1000))
        friends.append(sparsity.friend_summary(shares, (1, 3, 7)).assign(layer=layer))
        c = counts.clone()
        c.fill_diagonal_(-1)
        best = c.argmax(dim=1)                                  # each neuron's closest friend
        best = torch.where(counts.diagonal() > 0, best, torch.arange(a.d_ffn))
        deg = torch.bincount(best, minlength=a.d_ffn).sort(descending=True).values
        indeg.append(pd.DataFrame({"layer": layer, "rank": np.arange(1, 11), "neurons": deg[:10].numpy(),
                                   "share": deg[:10].numpy() / a.d_ffn}))
        cost.append(friend_bundle_cost(m.numpy(), best.numpy()).assign(layer=layer))
    return {"friends": pd.concat(friends, ignore_index=True), "in_degree": pd.concat(indeg, ignore_index=True),
            "cost": pd.concat(cost, ignore_index=True)}


def friend_bundle_cost(masks: np.ndarray, friend: np.ndarray) -> pd.DataFrame:
    """Neurons read per token when neuron i's bundle also carries its closest friend's (2x bytes per read):
    every active neuron is read with its friend, so a hub that is everyone's friend is read once per
    active neuron. Compared with plain bundles (one read per active neuron). masks ``[T, d_ffn]``."""
    active = masks.sum(axis=1)                                       # plain: |A_t| bundles per token
    friend_active = masks[:, friend] & masks                         # the friend was needed anyway
    hubs_loaded = np.array([np.bincount(friend[m], minlength=masks.shape[1]).max() if m.any() else 0
                            for m in masks])
    return pd.DataFrame([{"plain_vectors_per_token": 2 * active.mean(),
                          "friend_vectors_per_token": 4 * active.mean(),
                          "useful_friend_share": friend_active.sum() / max(1, active.sum()),
                          "max_copies_of_one_neuron": hubs_loaded.mean()}])


def bundling_comparison(model_name: str, cfg: BenchConfig | None = None, *, flash_root=None,
                        progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fig 5 / Table 2 rows 4-5: the same engine (same window) reading separate vs bundled files."""
    return latency_benchmark(model_name, ("windowing", "bundling"), cfg, flash_root=flash_root, progress=progress)


# --- Fig 6: preallocated vs naive DRAM matrix ------------------------------------------------

def matrix_microbench(trace_cfg: TraceConfig, d_model: int, k: int = paper.WINDOW_K_OPT, layer: int = -1,
                      dtype=torch.float16, repeats: int = 3, progress: bool = True) -> pd.DataFrame:
    """Fig 6 at paper scale: one layer's window on a synthetic paper-calibrated trace (``traces``),
    driving three matrices with the same evictions and loads (rows are random, no I/O), in an
    order rotated per repeat: "preallocated" (the paper: ``delete`` then ``insert``), "one-pass"
    (``NeuronMatrix.update``, what the engine runs) and "naive" (``NaiveNeuronMatrix``).

    Returns one row per (matrix, repeat, token): matrix | rep | token | ms | rows | evicted | loaded | bytes_moved.
    """
    from .traces import generate_trace
    from .window import window_capacity
    tr = generate_trace(trace_cfg, progress=False)
    masks = tr.predicted[:, layer]                                     # [T, d_ffn]
    cap = int(window_capacity(masks, k)[0])
    gen = torch.Generator().manual_seed(trace_cfg.seed)
    out = []
    variants = [("preallocated", NeuronMatrix), ("one-pass", NeuronMatrix), ("naive", NaiveNeuronMatrix)]
    for rep in range(repeats):
        for name, cls in variants[rep % 3:] + variants[:rep % 3]:
            m, w = cls(cap, d_model, trace_cfg.d_ffn, dtype=dtype), SlidingWindow(trace_cfg.d_ffn, k)
            for t in range(masks.shape[0]):
                step = w.update(masks[t])
                new = torch.randn(step.load.size, 2 * d_model, generator=gen).to(dtype)   # "read" bundles, untimed
                n_res = m.num_used
                t0 = time.perf_counter()
                if name == "one-pass":
                    m.update(step.evict, step.load, new)
                else:
                    m.delete(step.evict)
                    m.insert(step.load, new)
                ms = 1e3 * (time.perf_counter() - t0)
                out.append({"matrix": name, "rep": rep, "token": t,
                            "ms": ms, "rows": m.num_used, "evicted": step.evict.size, "loaded": step.load.size,
                            "bytes_moved": dram_bytes_moved(n_res, step.evict.size, step.load.size, m.bytes_per_row,
                                                            naive=name == "naive", one_pass=name == "one-pass")})
    return pd.DataFrame(out)
