"""The side-by-side protocol (design sec 5; paper Tables 2, 3, 5): one runner factory, alternating runs, one set of tables.

Every method of every tier is a configuration of one of two paths: the sparse engine
(``SparseEngine``: +predictor, +windowing, +bundling) or dense streaming (``StreamingBaseline``:
naive, hybrid, the page cache; "dense" keeps every weight in DRAM as a reference). ``build_runner``
makes any of them for a model name ("relu-opt", "smollm2", a Hugging Face id or folder), and
``paperscale.build_runner`` for OPT 6.7B's geometry. Comparisons alternate the methods (A B C ...,
rotated each repeat: ``alternate``), in one process (``run_side_by_side``) or in memory-limited
worker processes (``workers.side_by_side``); both produce the clock's step rows, which
``breakdown`` turns into per-method medians and ``table2`` / ``table3`` into the paper's tables.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import costmodel, paper, predictor, sparsity
from .clock import EngineError
from .config import ENGINE, PREDICTOR_PRESETS, BenchConfig, EngineConfig, StoreConfig, smoke_mode
from .engine import SparseEngine
from .models import ffn_adapter, load_model
from .streaming import StreamingBaseline

# Table 2's rows, in order: (method, hybrid, predictor, windowing, bundling)
METHODS = ("naive", "hybrid", "predictor", "windowing", "bundling")
TABLE2_FLAGS = {"naive": (False, False, False, False), "hybrid": (True, False, False, False),
                "predictor": (True, True, False, False), "windowing": (True, True, True, False),
                "bundling": (True, True, True, True)}
SPARSE = ("predictor", "windowing", "bundling")
LABELS = {"naive": "Naive", "hybrid": "Hybrid", "predictor": "+predictor", "windowing": "+windowing",
          "bundling": "All", "dense": "Dense in DRAM", "pagecache": "Page cache (mmap)",
          "accelerate": "accelerate offload"}


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


def build_runner(method: str, model_name: str, dram_budget, *, tokenizer=None, predictors=None, flash_root=None,
                 io_threads: int = ENGINE.io_threads, model=None, device: str = ENGINE.device,
                 compute_dtype: str | None = None, **engine_overrides):
    """A fresh model (or ``model``) wrapped for one method: ``StreamingBaseline`` (naive, hybrid, pagecache,
    dense) or ``SparseEngine`` (predictor, windowing, bundling).

    "pagecache" maps the model's weight files and lets the kernel's page cache serve them (its
    budget is the cgroup limit of its worker, ``flashlib.workers``). "dense" is a reference, not a
    paper row: every weight resident in DRAM, nothing read per token, the whole FFN computed,
    timed by the same hooks; the sparse engine can go below it, as its FFN multiplies only the
    resident rows. ``device`` and ``compute_dtype`` (e.g. "cuda", "bfloat16") apply to every method.
    """
    if model is None:
        model, _ = load_model(model_name, progress=False)
    store = StoreConfig(n_threads=io_threads)
    if method == "dense":
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        runner = StreamingBaseline(model, model_name, 2 * nbytes, flash_root=flash_root, store_config=store,
                                   device=device, dtype=compute_dtype)
        if runner.streamed_layers or runner.buffers:
            raise EngineError(f"dense reference of {model_name}: some weights would stream ({runner.report()})")
        return runner
    if method in ("naive", "hybrid", "pagecache"):
        return StreamingBaseline(model, model_name, dram_budget if method == "hybrid" else 0.0,
                                 source="mmap" if method == "pagecache" else "direct", flash_root=flash_root,
                                 store_config=store, device=device, dtype=compute_dtype)
    if method not in SPARSE:
        raise ValueError(f"method must be one of {METHODS + ('pagecache', 'dense')}, got {method!r}")
    cfg = engine_config(method, dram_budget, io_threads=io_threads, device=device, compute_dtype=compute_dtype,
                        **engine_overrides)
    return SparseEngine(model, model_name, cfg, predictors=predictors, tokenizer=tokenizer, flash_root=flash_root)


def alternate(names: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, name) in the order a side-by-side comparison runs them: A B C, then B C A, ..."""
    names = list(names)
    return [(rep, name) for rep in range(repeats)
            for name in names[rep % len(names):] + names[:rep % len(names)]]


def run_side_by_side(runners: dict, prompts: list[torch.Tensor], new_tokens: int, repeats: int,
                     progress: bool = True) -> pd.DataFrame:
    """Every runner on every prompt in one process, alternating (``alternate``); all step rows.

    Columns: method | rep | (TokenClock columns). The decode steps carry the per-token numbers.
    """
    frames = []
    for rep, name in tqdm(alternate(list(runners), repeats), desc="side by side", disable=not progress):
        r = runners[name].generate(prompts[rep % len(prompts)], max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        frames.append(r.stats.assign(method=name, rep=rep))
    return pd.concat(frames, ignore_index=True)


def runner_info(name: str, runner, base: str | None = None) -> dict:
    """What each method holds and reads: DRAM bytes, window k, layout, compute dtype (for Tables 2 and 3)."""
    common = {"method": name, "base_method": base or name, "model_bytes": runner.model_bytes,
              "dtype": str(runner.dtype).removeprefix("torch.")}
    if isinstance(runner, SparseEngine):
        a = runner.adapter
        return {**common, "dram_bytes": runner.budget.used_bytes, "budget_bytes": runner.budget.budget_bytes,
                "window_k": runner.sizing.k, "layout": runner.config.layout, "io_mode": runner.store.io_mode,
                "resident_weight_bytes": runner.budget.resident_bytes, "bytes_per_row": runner.bytes_per_row,
                "ffn_neurons": a.n_layers * a.d_ffn, "matrix_rows": sum(runner.sizing.capacities),
                "row_bytes": runner.store.manifest["row_bytes"]}        # one read unit: bundle or vector
    return {**common, "dram_bytes": runner.bytes_resident(), "budget_bytes": runner.budget_bytes,
            "window_k": np.nan, "layout": runner.source, "io_mode": runner.io_mode}


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


# --- summaries: Tables 2, 3, 5 -----------------------------------------------------------

def per_token(raw: pd.DataFrame) -> pd.DataFrame:
    """Decode steps only (one token each): the per-token numbers of Tables 2, 3, 5."""
    return raw[raw["phase"] == "decode"]


def breakdown(raw: pd.DataFrame, info: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per method: median and mean +- std of io/mem/compute/total ms per token, bytes and reads per token."""
    d = per_token(raw)
    g = d.groupby("method", sort=False)
    cols = ("io_ms", "mem_ms", "compute_ms", "total_ms")
    out = pd.DataFrame({
        **{f"{c}_median": g[c].median() for c in cols}, **{f"{c}_mean": g[c].mean() for c in cols},
        **{f"{c}_std": g[c].std() for c in cols}, "forward_ms_median": g["forward_ms"].median(),
        "bytes_per_token": g["bytes_read"].mean(), "reads_per_token": g["reads"].mean(),
        "neurons_per_token": g["neurons_loaded"].mean(), "tokens": g.size(),
        "bytes_resident_mean": g["bytes_resident"].mean(),
        "shrunk": g["shrunk"].sum(), "truncated": g["truncated"].sum()}).reset_index()
    out["chunk_bytes"] = out["bytes_per_token"] / out["reads_per_token"].replace(0, np.nan)
    out["throughput_gbps"] = out["bytes_per_token"] / (out["io_ms_median"] * 1e6)
    if info is not None:
        out = out.merge(info.drop_duplicates("method"), on="method", how="left")
        if "ffn_neurons" in out:      # engine rows: FFN shares of the window (App. C.1: 24% held, 2.4% new)
            out["new_share_per_token"] = out["neurons_per_token"] / out["ffn_neurons"]
            out["window_share"] = (out["bytes_resident_mean"] - out["resident_weight_bytes"]) \
                / out["bytes_per_row"] / out["ffn_neurons"]
    return out


def computed_io(summary: pd.DataFrame, profile: costmodel.DeviceProfile | None = None,
                now: costmodel.DeviceProfile | None = None, threads: int = costmodel.COSTMODEL.threads) -> pd.DataFrame:
    """The cost model's I/O per token for the same reads (the paper's Table 2 method): bytes per token
    over the throughput at the run's mean read size and ``threads``; ``profile`` defaults to the
    throughput benchmark's table (notebook 02), ``now`` (optional) is a probe taken during the run."""
    profile = profile or costmodel.measured_profile()
    out = summary.copy()
    for col, prof in (("io_ms_computed", profile), ("io_ms_computed_now", now)):
        if prof is not None:
            out[col] = [prof.io_ms(b, c if np.isfinite(c) else None, threads)
                        for b, c in zip(out["bytes_per_token"], out["chunk_bytes"])]
    out["throughput_gbps_computed"] = out["bytes_per_token"] / (out["io_ms_computed"] * 1e6)
    return out


def table2(summary: pd.DataFrame) -> pd.DataFrame:
    """Table 2 (I/O ablation) ours, real and computed, beside the paper's rows (rows named as METHODS)."""
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
                     "io_ms_computed_now": s.get("io_ms_computed_now", np.nan), "tokens": s["tokens"],
                     "paper_dram_gb": ref.loc[i, "dram_gb"], "paper_flash_gb": ref.loc[i, "flash_to_dram_gb"],
                     "paper_gbps": ref.loc[i, "throughput_gbps"], "paper_io_ms": ref.loc[i, "io_ms"]})
    return pd.DataFrame(rows)


def table3(summary: pd.DataFrame, model_label: str) -> pd.DataFrame:
    """Table 3/5 (per-token I/O, memory management, compute, total) ours beside the paper's OPT CPU rows."""
    cols = ("io_ms", "mem_ms", "compute_ms", "total_ms")
    rows = []
    for _, s in summary.iterrows():
        base = s.get("base_method", s["method"])
        base = s["method"] if not isinstance(base, str) else base
        rows.append({"model": model_label, "method": LABELS.get(base, base), "variant": s["method"],
                     "dtype": s.get("dtype", ""), "source": "ours", **{c: s[f"{c}_median"] for c in cols},
                     **{f"{c}_std": s[f"{c}_std"] for c in cols}, "tokens": s["tokens"]})
    for r in paper.TABLE3_ROWS:
        if r[0] == "OPT 6.7B" and r[2] == "CPU":
            rows.append({"model": r[0], "method": r[1], "variant": "", "dtype": "float32",
                         "source": "paper (M1 Max CPU)", **dict(zip(cols, r[3:]))})
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
