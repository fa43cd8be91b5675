"""One function per figure and table of the engine notebooks (paper Tables 2, 3, 5; Figs 1, 4, 5, 6, 7, 8, 12).

Each function returns a tidy DataFrame; notebooks plot and save them. Latency comparisons are
measured side by side in one process, alternating the methods (A B C ..., then rotated) with
the flash files evicted before every run, and summarised by medians; the cost-model column
divides the same bytes by this machine's measured throughput (``costmodel.measured_profile``).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import costmodel, paper, predictor, sparsity
from .baselines import StreamingBaseline
from .config import (ENGINE, PREDICTOR_PRESETS, BenchConfig, EngineConfig, StoreConfig, TraceConfig,
                     bench_config, smoke_mode)
from .dram import NaiveNeuronMatrix, NeuronMatrix, dram_bytes_moved
from .engine import ActiveSets, EngineError, SparseEngine, calibration_batches, calibration_trace
from .models import ffn_adapter, load_model
from .window import SlidingWindow, aggregated_usage_curve

# Table 2's rows, in order: (method, hybrid, predictor, windowing, bundling)
METHODS = ("naive", "hybrid", "predictor", "windowing", "bundling")
TABLE2_FLAGS = {"naive": (False, False, False, False), "hybrid": (True, False, False, False),
                "predictor": (True, True, False, False), "windowing": (True, True, True, False),
                "bundling": (True, True, True, True)}


# --- models, predictors, prompts, runners --------------------------------------------------

def predictors_for(model_name: str, model, tokenizer, progress: bool = True):
    """The model's low-rank predictors (trained once and cached by ``predictor.fit_predictors``).

    Preset: "smoke" in smoke mode, else the model's own (``PREDICTOR_PRESETS``). A cached file
    older than the model's checkpoint is retrained (the weights may have changed).
    """
    cfg = PREDICTOR_PRESETS["smoke" if smoke_mode() else model_name if model_name in PREDICTOR_PRESETS
                            else "relu-opt"]
    path = predictor.predictor_path(model_name)
    src = Path(getattr(model, "name_or_path", "") or "") / "model.safetensors"
    stale = path.exists() and src.exists() and src.stat().st_mtime > path.stat().st_mtime
    rule = sparsity.default_mask_rule(ffn_adapter(model))
    preds, _ = predictor.fit_predictors(model_name, model, tokenizer, cfg, rule, path=path, retrain=stale,
                                        progress=progress)
    return preds


def fit_context(cfg: BenchConfig, model) -> BenchConfig:
    """Shorten the prompt so prompt + new tokens fit the model's learned positions (our ReLU OPT: 128)."""
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx is None or cfg.prompt_tokens + cfg.new_tokens <= ctx:
        return cfg
    if cfg.new_tokens >= ctx:
        raise ValueError(f"{cfg.new_tokens} new tokens do not fit the model's context of {ctx} positions")
    return dataclasses.replace(cfg, prompt_tokens=ctx - cfg.new_tokens)


def prompt_ids(tokenizer, n_tokens: int, domain: str = "news", index: int = 0) -> torch.Tensor:
    """``[1, n_tokens]`` prompt: the ``index``-th window of the held-out (test) split of ``domain``."""
    from .corpus import load_tokens
    ids = load_tokens(domain, "test", tokenizer)
    start = (index * 7919 * n_tokens) % max(1, len(ids) - n_tokens)
    return torch.from_numpy(ids[start:start + n_tokens].astype(np.int64)).reshape(1, -1)


def engine_config(method: str, dram_budget, **overrides) -> EngineConfig:
    """The engine setting of one Table 2 row (predictor: k=0 + separate; +windowing; +bundling)."""
    base = {"predictor": dict(window_k=0, layout="separate"), "windowing": dict(layout="separate"),
            "bundling": dict(layout="bundled")}[method]
    return dataclasses.replace(ENGINE, dram_budget=dram_budget, **{**base, **overrides})


def build_runner(method: str, model_name: str, dram_budget, *, tokenizer, predictors=None, flash_root=None,
                 io_threads: int = ENGINE.io_threads, **engine_overrides):
    """A fresh model wrapped for one method: ``StreamingBaseline`` (naive, hybrid, dense) or ``SparseEngine``.

    "dense" is a reference, not a paper row: every weight resident in DRAM, nothing read per
    token, the whole FFN computed, timed by the same hooks. It bounds what any dense-compute method
    (naive, hybrid) can reach; the sparse engine can go below it, as its FFN multiplies only the
    resident rows.
    """
    model, _ = load_model(model_name, progress=False)
    if method == "dense":
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        runner = StreamingBaseline(model, model_name, 2 * nbytes, flash_root=flash_root,
                                   store_config=StoreConfig(n_threads=io_threads))
        if runner.streamed_layers or runner.buffers:
            raise EngineError(f"dense reference of {model_name}: some weights would stream ({runner.report()})")
        return runner
    if method in ("naive", "hybrid"):
        return StreamingBaseline(model, model_name, 0.0 if method == "naive" else dram_budget, flash_root=flash_root,
                                 store_config=StoreConfig(n_threads=io_threads))
    cfg = engine_config(method, dram_budget, io_threads=io_threads, **engine_overrides)
    return SparseEngine(model, model_name, cfg, predictors=predictors, tokenizer=tokenizer, flash_root=flash_root)


def run_side_by_side(runners: dict, prompts: list[torch.Tensor], new_tokens: int, repeats: int,
                     progress: bool = True) -> pd.DataFrame:
    """Every runner on every prompt, methods alternating and rotated each repeat; all step rows.

    Columns: method | rep | (TokenClock columns). The decode steps carry the per-token numbers.
    """
    names, frames = list(runners), []
    bar = tqdm(total=repeats * len(names), desc="side by side", disable=not progress)
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            r = runners[name].generate(prompts[rep % len(prompts)], max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens)
            frames.append(r.stats.assign(method=name, rep=rep))
            bar.update()
    bar.close()
    return pd.concat(frames, ignore_index=True)


def runner_info(name: str, runner) -> dict:
    """What each method holds and reads: DRAM bytes, window k, layout (for Table 2)."""
    if isinstance(runner, SparseEngine):
        a = runner.adapter
        return {"method": name, "dram_bytes": runner.budget.used_bytes, "budget_bytes": runner.budget.budget_bytes,
                "window_k": runner.sizing.k, "layout": runner.config.layout, "model_bytes": runner.model_bytes,
                "io_mode": runner.store.io_mode, "resident_weight_bytes": runner.budget.resident_bytes,
                "bytes_per_row": runner.bytes_per_row, "ffn_neurons": a.n_layers * a.d_ffn,
                "matrix_rows": sum(runner.sizing.capacities),
                "row_bytes": runner.store.manifest["row_bytes"]}        # one read unit: bundle or vector
    return {"method": name, "dram_bytes": runner.bytes_resident(), "budget_bytes": runner.budget_bytes,
            "window_k": np.nan, "layout": "dense", "model_bytes": runner.model_bytes,
            "io_mode": runner.stream_mode}


def paper_budget(model_name: str, *, tokenizer, predictors, k: int, flash_root=None) -> tuple[int, str]:
    """The paper's setting on our model: half the model's bytes if that holds the engine at window k
    (paper: k=5 fits in ~52% of OPT 6.7B), else exactly what window k needs. Returns (bytes, why)."""
    probe = build_runner("bundling", model_name, None, tokenizer=tokenizer, predictors=predictors,
                         flash_root=flash_root, window_k=k, verify=False)
    probe.close()
    need, half = int(probe.sizing.table.loc[k, "need_bytes"]), probe.model_bytes // 2
    if need <= half:
        return half, f"half the model ({half} B) holds window k={k} ({need} B)"
    return need, (f"half the model ({half} B) cannot hold the resident part ({probe.budget.resident_bytes} B) "
                  f"plus window k={k}; budget = what k={k} needs: {need} B = {need / probe.model_bytes:.0%} "
                  f"of the model")


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


# --- summaries: Tables 2, 3, 5 -----------------------------------------------------------

def per_token(raw: pd.DataFrame) -> pd.DataFrame:
    """Decode steps only (one token each): the per-token numbers of Tables 2, 3, 5."""
    return raw[raw["phase"] == "decode"]


def breakdown(raw: pd.DataFrame, info: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per method: median and mean +- std of io/mem/compute/total ms per token, bytes and reads per token."""
    d = per_token(raw)
    g = d.groupby("method", sort=False)
    out = pd.DataFrame({
        **{f"{c}_median": g[c].median() for c in ("io_ms", "mem_ms", "compute_ms", "total_ms")},
        **{f"{c}_mean": g[c].mean() for c in ("io_ms", "mem_ms", "compute_ms", "total_ms")},
        **{f"{c}_std": g[c].std() for c in ("io_ms", "mem_ms", "compute_ms", "total_ms")},
        "forward_ms_median": g["forward_ms"].median(),
        "bytes_per_token": g["bytes_read"].mean(), "reads_per_token": g["reads"].mean(),
        "neurons_per_token": g["neurons_loaded"].mean(), "tokens": g.size(),
        "bytes_resident_mean": g["bytes_resident"].mean(),
        "shrunk": g["shrunk"].sum(), "truncated": g["truncated"].sum()}).reset_index()
    out["chunk_bytes"] = out["bytes_per_token"] / out["reads_per_token"].replace(0, np.nan)
    out["throughput_gbps"] = out["bytes_per_token"] / (out["io_ms_median"] * 1e6)
    if info is not None:
        out = out.merge(info, on="method", how="left")
        if "ffn_neurons" in out:      # engine rows: FFN shares of the window (App. C.1: 24% held, 2.4% new)
            out["new_share_per_token"] = out["neurons_per_token"] / out["ffn_neurons"]
            out["window_share"] = (out["bytes_resident_mean"] - out["resident_weight_bytes"]) \
                / out["bytes_per_row"] / out["ffn_neurons"]
    return out


def computed_io(summary: pd.DataFrame, profile: costmodel.DeviceProfile | None = None) -> pd.DataFrame:
    """The cost model's I/O per token for the same bytes: dense rows at the profile's sequential
    throughput, sparse rows at throughput(mean read size, 32 threads) (the paper's Table 2 method)."""
    profile = profile or costmodel.measured_profile()
    out = summary.copy()
    dense = out["method"].isin(["naive", "hybrid"])
    out["io_ms_computed"] = [profile.io_ms(b, None if is_dense or not np.isfinite(c) else c)
                             for b, c, is_dense in zip(out["bytes_per_token"], out["chunk_bytes"], dense)]
    out["throughput_gbps_computed"] = out["bytes_per_token"] / (out["io_ms_computed"] * 1e6)
    return out


def table2(summary: pd.DataFrame) -> pd.DataFrame:
    """Table 2 (I/O ablation) ours, real and computed, beside the paper's rows."""
    ref = pd.DataFrame(paper.TABLE2_ROWS, columns=paper.TABLE2_COLUMNS)
    rows = []
    for i, m in enumerate(METHODS):
        s = summary[summary["method"] == m]
        if s.empty:
            continue
        s = s.iloc[0]
        rows.append({"method": m, **dict(zip(("hybrid", "predictor", "windowing", "bundling"), TABLE2_FLAGS[m])),
                     "dram_mb": s["dram_bytes"] / 1e6, "dram_share": s["dram_bytes"] / s["model_bytes"],
                     "flash_to_dram_mb": s["bytes_per_token"] / 1e6, "chunk_bytes": s["chunk_bytes"],
                     "throughput_gbps": s["throughput_gbps"], "io_ms": s["io_ms_median"],
                     "io_ms_computed": s.get("io_ms_computed", np.nan),
                     "paper_dram_gb": ref.loc[i, "dram_gb"], "paper_flash_gb": ref.loc[i, "flash_to_dram_gb"],
                     "paper_gbps": ref.loc[i, "throughput_gbps"], "paper_io_ms": ref.loc[i, "io_ms"]})
    return pd.DataFrame(rows)


def table3(summary: pd.DataFrame, model_label: str) -> pd.DataFrame:
    """Table 3/5 (per-token I/O, memory management, compute, total) ours beside the paper's OPT CPU rows."""
    names = {"naive": "Naive", "hybrid": "Hybrid", "predictor": "+predictor", "windowing": "+windowing",
             "bundling": "All", "dense": "Dense in DRAM"}
    rows = [{"model": model_label, "method": names.get(s["method"], s["method"]), "source": "ours",
             **{c: s[f"{c}_median"] for c in ("io_ms", "mem_ms", "compute_ms", "total_ms")},
             **{f"{c}_std": s[f"{c}_std"] for c in ("io_ms", "mem_ms", "compute_ms", "total_ms")}}
            for _, s in summary.iterrows()]
    for r in paper.TABLE3_ROWS:
        if r[0] == "OPT 6.7B" and r[2] == "CPU":
            rows.append({"model": r[0], "method": r[1], "source": "paper (M1 Max CPU)",
                         **dict(zip(("io_ms", "mem_ms", "compute_ms", "total_ms"), r[3:]))})
    return pd.DataFrame(rows)


def ratios(summary: pd.DataFrame, fast: str = "bundling", slow: str = "naive") -> dict:
    """The acceptance ratios: total and I/O speed-up of ``fast`` over ``slow``, memory-management share,
    and the bound common work puts on the total ratio (slow total / fast non-I/O, non-mem time).

    With a "dense" row (every weight in DRAM): its ms per token, the bound it sets on a dense-compute
    method (slow total / dense total: naive with free I/O) and the engine's total minus dense's
    (negative where the sparse FFN saves more compute than the engine's I/O and bookkeeping cost).
    """
    s = summary.set_index("method")
    f, b = s.loc[fast], s.loc[slow]
    out = {"total_speedup": b["total_ms_median"] / f["total_ms_median"],
           "io_speedup": b["io_ms_median"] / f["io_ms_median"],
           "mem_share": f["mem_ms_median"] / f["total_ms_median"],
           "total_speedup_bound": b["total_ms_median"] / f["compute_ms_median"],
           "paper_total_speedup": paper.CPU_SPEEDUP_OPT, "paper_mem_share": paper.MEM_MANAGEMENT_SHARE_CPU}
    if "dense" in s.index:
        d = s.loc["dense", "total_ms_median"]
        out.update(dense_total_ms=d, total_speedup_dense_bound=b["total_ms_median"] / d,
                   above_dense_ms=f["total_ms_median"] - d)
    return out


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
