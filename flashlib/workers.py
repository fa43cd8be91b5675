"""One method, one process, under a memory limit (design sec 5): the worker and the limited side-by-side benchmark.

Memory limits only mean something for a whole process, and page cache counts as memory, so every
run of these benchmarks is a fresh worker process (``python -m flashlib.workers SPEC``) in its own
cgroup-v1 memory group (``flashlib.cgroup``), for every method alike (the engine, naive, hybrid,
the page cache, accelerate) and every tier (the ReLU OPT, SmolLM2, OPT 6.7B's geometry):

1. **Overhead**: per method, an accounting-only run, its mapped weight files pre-cached by the
   parent (pages are charged to whoever loaded them), gives the worker's own memory during
   generation: the group's peak minus the weight tensors the worker holds (engine: resident
   weights, predictors, matrices at capacity, read buffer; streaming: resident groups and staging).
2. **Limited runs**: after its setup (loading, calibration, which a deployment does offline) the
   worker sets its own group's ``memory.limit_in_bytes`` to max(budget, weight bytes) + overhead,
   restarts the group's peak and failcnt, starts cold and generates; methods alternate
   (``bench.alternate``). A run that is OOM-killed or does not finish in time under its limit is a
   result ("did not finish"), not an error. Workers that read with O_DIRECT (their weights are
   anonymous memory, so they cannot use spare room as cache) get ``Plan.slack_bytes`` more: the
   same worker's own memory varies by a few MB from run to run (shared-library pages are charged
   to whichever group faults them in first; 3 MB seen), and with none to spare that is an OOM kill.
   Workers whose weights come through the page cache get no slack: spare room would be cache.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .cgroup import (RESULT_MARK, CgroupUnavailable, WorkerRun, cgroup_unavailable_reason, evict_files,
                     files_resident, major_faults, own_group_usage, own_memory_cgroup, precache_files,
                     proc_read_bytes, release_free_memory, run_in_group)

SPARSE = ("predictor", "windowing", "bundling")
MAPPED = ("pagecache", "accelerate")      # methods whose weights arrive through the page cache


@dataclass(frozen=True)
class Spec:
    """One worker run, as JSON on its command line."""

    method: str                     # naive | hybrid | predictor | windowing | bundling | dense | pagecache | accelerate
    model: str = "relu-opt"         # relu-opt | smollm2 | a checkpoint folder | "paper" (with ``geometry``)
    budget: float | int | str | None = None   # DRAM budget of the engine and hybrid (bytes or a fraction)
    prompt_ids: tuple = ()
    new_tokens: int = 8
    threads: int = 1                # torch threads
    io_threads: int = 32
    dtype: str | None = None        # paper: compute dtype ("bfloat16" | "float32")
    geometry: dict | None = None    # paper: PaperScaleConfig fields
    trace_start: int = 0            # paper: first trace token of this run
    flash_root: str | None = None
    folder: str | None = None       # accelerate: the checkpoint folder it loads (a private copy)
    offload_folder: str | None = None
    evict: bool = True              # start cold (False: overhead runs keep the parent's pre-cached pages)
    limit_bytes: int | None = None  # the worker's own group limit, set after setup
    in_group: bool = True           # the worker runs in a child memory group (reads and resets its counters)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        d = json.loads(text)
        d["prompt_ids"] = tuple(d.get("prompt_ids", ()))
        return cls(**d)


def command(spec: Spec) -> list[str]:
    return [sys.executable, "-m", "flashlib.workers", spec.to_json()]


# --- building one runner -------------------------------------------------------------------------

def materialize(model) -> int:
    """Copy every parameter into its own memory, tied weights once (transformers 5 loads them as views of a
    file mapping); returns the bytes copied. A runner's resident part is then DRAM, not page cache."""
    copies: dict[int, torch.Tensor] = {}
    done: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        if p.numel() and id(p) not in done:
            done.add(id(p))
            key = p.data_ptr()
            if key not in copies:
                copies[key] = p.data.clone()
            p.data = copies[key]
    return sum(t.numel() * t.element_size() for t in copies.values())


def paper_config(spec: Spec):
    from .config import PaperScaleConfig
    g = {k: tuple(v) if isinstance(v, list) else v for k, v in (spec.geometry or {}).items()}
    return PaperScaleConfig(**g)


def build(spec: Spec):
    """The runner of ``spec`` and the files it reads through the page cache."""
    from . import bench, offload
    from .models import load_model
    if spec.model == "paper":
        from . import paperscale
        runner = paperscale.build_runner(spec.method, paper_config(spec), spec.dtype or "bfloat16",
                                         trace_start=spec.trace_start)
    elif spec.method == "accelerate":
        runner = offload.accelerate_runner(Path(spec.folder), int(spec.budget), Path(spec.offload_folder))
    else:
        model, tok = load_model(spec.model, progress=False)
        materialize(model)                 # the resident part lives in DRAM, as in the paper (not in a mapping)
        src = Path(getattr(model, "name_or_path", "") or ".")
        if (src / "config.json").exists():
            evict_files(offload.checkpoint_files(src))
        preds = bench.predictors_for(spec.model, model, tok, progress=False) if spec.method in SPARSE else None
        runner = bench.build_runner(spec.method, spec.model, spec.budget, tokenizer=tok, predictors=preds,
                                    flash_root=spec.flash_root, io_threads=spec.io_threads, model=model)
    return runner, mapped_files(runner)


def mapped_files(runner) -> list[Path]:
    """The files whose pages a runner reads through the page cache (none for O_DIRECT readers)."""
    from .streaming import StreamingBaseline
    if isinstance(runner, StreamingBaseline):
        return runner.files.paths if runner.source == "mmap" else []
    return [Path(f) for f in getattr(runner, "files", [])]


def weight_bytes(runner) -> int:
    """Weight memory a runner holds in its own (anonymous) memory, counted from its tensors."""
    from .engine import SparseEngine
    from .streaming import StreamingBaseline
    if isinstance(runner, SparseEngine):
        return runner.weight_bytes_held()
    if isinstance(runner, StreamingBaseline):
        return runner.bytes_resident()
    return 0                                # accelerate: its "cpu" weights are views of the mapped checkpoint


def set_own_limit(limit_bytes: int) -> None:
    """This process's memory group gets a limit (the kernel reclaims page cache to meet it, or refuses)."""
    (own_memory_cgroup() / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))


def run(spec: Spec) -> dict:
    """Build, (limit,) start cold, generate ``spec.new_tokens`` greedy tokens, report."""
    from .bench import runner_info
    torch.set_num_threads(spec.threads)
    t0 = time.perf_counter()
    runner, files = build(spec)
    ids = torch.tensor([list(spec.prompt_ids)])
    release_free_memory()                # what setup freed goes back to the OS
    setup_s, held = time.perf_counter() - t0, weight_bytes(runner)
    info = runner_info(spec.method, runner)
    out = {"method": spec.method, "status": "ok", "setup_s": setup_s, "weight_bytes": held, "info": info,
           "files": [str(f) for f in files]}
    if spec.limit_bytes is not None:
        try:
            set_own_limit(spec.limit_bytes)
        except OSError as e:
            return {**out, "status": f"holds more than its limit after setup ({e.strerror})"}
    setup_group = own_group_usage(reset=True) if spec.in_group else None
    io0, f0, t_start = proc_read_bytes(), major_faults(), time.time()
    if not spec.evict:                   # overhead runs: keep the parent's pre-cached pages
        runner.before_run = lambda: None
    r = runner.generate(ids, max_new_tokens=spec.new_tokens, min_new_tokens=spec.new_tokens)
    t_end = time.time()
    resident = getattr(runner, "resident_at_start", None)
    out.update({"tokens": r.tokens[0].tolist(), "prompt_len": ids.shape[1], "steps": r.stats.to_dict("records"),
                "t_start": t_start, "t_end": t_end, "disk_read_bytes": proc_read_bytes() - io0,
                "major_faults": major_faults() - f0,
                "resident_at_start": files_resident(files) if resident is None and files else resident,
                "setup_group": setup_group,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    if hasattr(runner, "close"):
        runner.close()
    return out


# --- the limited side-by-side benchmark ------------------------------------------------------------

@dataclass
class Plan:
    """What the workers share: one spec per variant (name -> Spec without prompt or limit), prompts, and
    per variant the DRAM budget its limit grants and the files it maps (pre-cached for its overhead run)."""

    specs: dict[str, Spec]
    budgets: dict[str, int]
    mapped: dict[str, list[Path]]
    prompts: list[list[int]]
    repeats: int
    overhead_repeats: int = 1
    timeout_s: float = 1800.0          # an accounting-only run
    limited_timeout_s: float = 1800.0  # a run under its limit (may thrash)
    poll_seconds: float = 0.05
    slack_bytes: int = 16 << 20       # O_DIRECT workers only (module docstring)
    trace_starts: dict[int, int] = field(default_factory=dict)   # paper: repeat -> first trace token
    probe: object = None               # callable(repeat) -> list of dicts: a throughput probe per repeat
    meta: dict = field(default_factory=dict)


@dataclass
class Result:
    """``steps``: every run's per-step rows (method | rep | step | phase | total_ms | ...); ``runs``: one row
    per limited run (limit, peak, failcnt, status); ``overhead``: the accounting-only runs; ``info``: what
    each variant holds (``bench.runner_info``); ``samples``: the groups' memory over time; ``probe``:
    same-run throughput probes."""

    steps: pd.DataFrame
    runs: pd.DataFrame
    overhead: pd.DataFrame
    info: pd.DataFrame
    samples: pd.DataFrame
    probe: pd.DataFrame
    meta: dict = field(default_factory=dict)


def _failed(run: WorkerRun, what: str) -> RuntimeError:
    return RuntimeError(f"{what} worker failed (rc {run.returncode}, group {run.group}): {run.stderr_tail}")


def measure_overhead(plan: Plan, name: str, progress: bool = True) -> pd.DataFrame:
    """A variant's own (non-weight) memory, ``plan.overhead_repeats`` times: accounting-only runs with its
    mapped files pre-cached by this (parent) process; overhead = generation peak - weight bytes held."""
    rows = []
    for i in range(plan.overhead_repeats):
        cached = precache_files(plan.mapped[name]) if plan.mapped[name] else float("nan")
        spec = dataclasses.replace(plan.specs[name], prompt_ids=tuple(plan.prompts[i % len(plan.prompts)]),
                                   evict=False, trace_start=plan.trace_starts.get(i, 0))
        run = run_in_group(command(spec), None, name=f"overhead-{name}", timeout=plan.timeout_s,
                           poll_seconds=plan.poll_seconds)
        if run.result is None or run.result["status"] != "ok":
            raise _failed(run, f"{name} (overhead)")
        res = run.result
        peak = run.group["max_usage_bytes"]
        rows.append({"method": name, "repeat": i, "overhead_bytes": max(0, peak - res["weight_bytes"]),
                     "group_peak_bytes": peak, "weight_bytes": res["weight_bytes"], "resident_before": cached,
                     "setup_peak_bytes": (res.get("setup_group") or {}).get("max_usage_bytes"),
                     "disk_read_bytes": res["disk_read_bytes"], "setup_s": res["setup_s"]})
        if progress:
            print(f"[workers] overhead {name} #{i}: {rows[-1]['overhead_bytes'] / 2**20:.1f} MiB "
                  f"(peak {peak / 2**20:.1f} MiB - weights {res['weight_bytes'] / 2**20:.1f} MiB)", flush=True)
        if plan.mapped[name]:
            evict_files(plan.mapped[name])
    return pd.DataFrame(rows)


def _status(run: WorkerRun, new_tokens: int) -> str:
    if run.result is not None:
        return run.result["status"]
    if run.group["oom_kill"]:
        return f"OOM-killed under the limit (rc {run.returncode})"
    if run.timed_out:
        return f"did not finish {new_tokens} tokens in {run.wall_s:.0f} s under the limit (killed)"
    return f"failed (rc {run.returncode})"


def _run_row(name: str, spec: Spec, rep: int, budget: int, limit: int, overhead: int, run: WorkerRun) -> dict:
    """One limited run's memory and I/O record (group report, the sample at the generation-phase peak)."""
    s, res = run.samples, run.result or {}
    gen = s[(s["time"] >= res.get("t_start", np.inf)) & (s["time"] <= res.get("t_end", -np.inf))]
    at_peak = gen.loc[gen["usage"].idxmax()] if len(gen) else pd.Series(dtype=float)
    info = res.get("info", {})
    return {"method": name, "base_method": spec.method, "dtype": info.get("dtype", spec.dtype), "rep": rep,
            "status": _status(run, spec.new_tokens), "limit_bytes": limit, "overhead_bytes": overhead,
            "budget_bytes": budget, "weight_bytes": res.get("weight_bytes"), "peak_bytes": run.group["max_usage_bytes"],
            "failcnt": run.group["failcnt"], "oom_kill": run.group["oom_kill"],
            "setup_peak_bytes": (res.get("setup_group") or {}).get("max_usage_bytes"),
            "rss_at_peak": at_peak.get("rss"), "cache_at_peak": at_peak.get("cache"),
            "resident_at_start": res.get("resident_at_start"), "disk_read_bytes": res.get("disk_read_bytes"),
            "major_faults": res.get("major_faults"), "new_tokens": spec.new_tokens, "tokens": res.get("tokens"),
            "setup_s": res.get("setup_s"), "wall_s": run.wall_s, "peak_rss_bytes": res.get("peak_rss_bytes"),
            "window_k": info.get("window_k"), "io_mode": info.get("io_mode")}


def side_by_side(plan: Plan, progress: bool = True) -> Result:
    """Every variant under its limit, alternating (``bench.alternate``), after measuring each one's overhead.

    Raises ``CgroupUnavailable`` where no memory group can be made.
    """
    from .bench import alternate
    why = cgroup_unavailable_reason()
    if why:
        raise CgroupUnavailable(why)
    overhead = pd.concat([measure_overhead(plan, n, progress) for n in plan.specs], ignore_index=True)
    extra = overhead.groupby("method")["overhead_bytes"].max().to_dict()     # the larger: never starve a worker
    held = overhead.groupby("method")["weight_bytes"].max().to_dict()
    steps, runs, samples, infos, probes = [], [], [], {}, []
    for rep, name in alternate(list(plan.specs), plan.repeats):
        if plan.probe is not None and name == list(plan.specs)[rep % len(plan.specs)]:   # first of a repeat
            probes += [{"rep": rep, **p} for p in plan.probe(rep)]
        limit = max(plan.budgets[name], int(held[name])) + int(extra[name]) + (0 if plan.mapped[name] else plan.slack_bytes)
        spec = dataclasses.replace(plan.specs[name], prompt_ids=tuple(plan.prompts[rep % len(plan.prompts)]),
                                   limit_bytes=limit, trace_start=plan.trace_starts.get(rep, 0))
        if plan.mapped[name]:
            evict_files(plan.mapped[name])
        run = run_in_group(command(spec), None, name=name, timeout=plan.limited_timeout_s,
                           poll_seconds=plan.poll_seconds)
        if run.result is None and not (run.group["oom_kill"] or run.timed_out):
            raise _failed(run, name)           # a crash is an error; an OOM kill or thrashing is a result
        res = run.result
        runs.append(_run_row(name, spec, rep, plan.budgets[name], limit, int(extra[name]), run))
        t0 = res["t_start"] if res and "t_start" in res else run.samples["time"].min()
        samples.append(run.samples.assign(t=run.samples["time"] - t0, method=name, rep=rep))
        if res and "steps" in res:
            steps.append(pd.DataFrame(res["steps"]).assign(method=name, rep=rep))
            infos[name] = {**res["info"], "method": name, "base_method": spec.method}
        if progress:
            d = steps[-1][steps[-1]["phase"] == "decode"]["total_ms"] if res and "steps" in res else pd.Series([np.nan])
            print(f"[workers] rep {rep} {name}: {runs[-1]['status']}, {d.median():.1f} ms/token, peak "
                  f"{run.group['max_usage_bytes'] / 2**20:.1f} MiB of {limit / 2**20:.1f}, failcnt "
                  f"{run.group['failcnt']}", flush=True)
    empty = pd.DataFrame(columns=["method", "rep", "phase", "total_ms"])
    return Result(pd.concat(steps, ignore_index=True) if steps else empty, pd.DataFrame(runs), overhead,
                  pd.DataFrame(list(infos.values())), pd.concat(samples, ignore_index=True), pd.DataFrame(probes),
                  dict(plan.meta))


def summarize(result: Result, reference: str | None = None) -> pd.DataFrame:
    """One row per variant: median (p10, p90) ms per decoded token, memory (budget, limit, peak, page cache at
    the peak, failcnt), MB read per token, status, and how many times slower than ``reference``."""
    d = result.steps[result.steps["phase"] == "decode"]
    g = d.groupby("method", sort=False)
    runs = result.runs.groupby("method", sort=False)
    out = pd.DataFrame({
        "base_method": runs["base_method"].first(), "dtype": runs["dtype"].first(), "runs": runs.size(),
        "status": runs["status"].agg(lambda s: "ok" if (s == "ok").all() else "; ".join(sorted(set(s)))),
        "budget_mb": runs["budget_bytes"].first() / 1e6, "limit_mb": runs["limit_bytes"].first() / 1e6,
        "overhead_mb": runs["overhead_bytes"].first() / 1e6, "weight_mb": runs["weight_bytes"].max() / 1e6,
        "peak_mb": runs["peak_bytes"].max() / 1e6, "cache_at_peak_mb": runs["cache_at_peak"].median() / 1e6,
        "failcnt_min": runs["failcnt"].min(), "oom_kills": runs["oom_kill"].sum()})
    if len(d):
        out = out.join(pd.DataFrame({
            "ms_per_token_median": g["total_ms"].median(), "ms_per_token_p10": g["total_ms"].quantile(0.1),
            "ms_per_token_p90": g["total_ms"].quantile(0.9), "tokens": g.size(),
            "read_mb_per_token": g["bytes_read"].mean() / 1e6}))
    out = out.reset_index()
    if reference is not None and reference in set(out["method"]) and "ms_per_token_median" in out:
        ref = out.loc[out["method"] == reference, "ms_per_token_median"].item()
        out[f"{reference}_speedup"] = out["ms_per_token_median"] / ref
    return out


def same_tokens(result: Result, reference: str) -> pd.DataFrame:
    """Whether every run generated the same greedy tokens as ``reference`` on the same prompt (per rep)."""
    r = result.runs[result.runs["status"] == "ok"]
    rows = []
    for rep, grp in r.groupby("rep"):
        toks = {m: tuple(t) for m, t in zip(grp["method"], grp["tokens"])}
        ref = toks.get(reference) or next(iter(toks.values()))
        rows += [{"rep": rep, "method": m, f"same_as_{reference}": t == ref} for m, t in toks.items()]
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m flashlib.workers SPEC_JSON  (see flashlib.workers.Spec)", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(RESULT_MARK + json.dumps(run(Spec.from_json(argv[0])), default=float), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
