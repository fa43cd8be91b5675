"""The GPU row of Table 3 (paper Tables 3 and 5): one prepared command for a GPU machine lent for a few minutes.

``python -m flashlib.gpubench --out DIR`` (``make gpu-bench`` here; on a lent machine, from the repository
root: ``PYTHONPATH=. python3 -m flashlib.gpubench --out $OUT``, carrying ``data/models/relu-opt`` and
``data/predictors``) measures, on that machine and in this order:

1. its disk: random O_DIRECT reads at 16 KiB and 1 MiB over 32 threads (notebook 02's probe,
   ``iobench.run_ours``) on a 1 GiB test file;
2. every small model cached there (the ReLU OPT; SmolLM2 if its checkpoint came along): naive, hybrid,
   All and dense in GPU memory, bf16 on CUDA, side by side in one process (``bench.run_side_by_side``);
3. OPT 6.7B's geometry (the bundled fp16 flash file and the stream file, written on that disk): naive and
   All at half the model, bf16 on the GPU, O_DIRECT, alternating.

It writes ``gpu_device.json`` (device, disk, commit) and one CSV per table into DIR, the GPU rows of
Tables 3 and 5 beside the paper's. Without CUDA it says so and exits 0, measuring and writing nothing:
CI and CPU machines skip it. The engine's and dense streaming's CUDA paths are the same code as on the
CPU (page-locked read buffers, matrices and compute copies on the device).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from . import bench, iobench, paper, paths, plotting
from .config import paper_scale_config
from .models import CACHE_MARKER

SMALL_MODELS = {"relu-opt": "relu-opt", "smollm2": "smollm2-135m"}     # name -> cache folder
SMALL_METHODS = ("naive", "hybrid", "bundling", "dense")
PROMPT = "The history of the city begins with a small settlement on the river, where"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m flashlib.gpubench", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the tables (created)")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: the smoke presets, a few tokens")
    ap.add_argument("--repeats", type=int, default=2, help="side-by-side repeats of the small models")
    ap.add_argument("--new-tokens", type=int, default=16, help="decode tokens per small-model run")
    ap.add_argument("--paper-rounds", type=int, default=2, help="rounds of naive vs All at paper geometry")
    ap.add_argument("--skip", action="append", default=[], choices=("disk", "small", "paper"),
                    help="leave a part out (repeatable)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a dry run of the same steps on this machine (tests the command without a GPU)")
    return ap


def device_info(device: str) -> dict:
    p = torch.cuda.get_device_properties(0) if device == "cuda" else None
    return {"device": p.name if p else "cpu (dry run)", "gpu_memory_gb": p.total_memory / 1e9 if p else 0.0,
            "torch": torch.__version__, "cuda": torch.version.cuda, "host": plotting.machine_description(),
            "commit": plotting.git_revision(), "date": time.strftime("%Y-%m-%d")}


def disk_probe(smoke: bool) -> pd.DataFrame:
    """Random-read throughput of this machine's disk where the flash files go (16 KiB and 1 MiB, 32 threads)."""
    path = paths.flash_dir() / "gpubench-probe.bin"
    iobench.make_test_file(path, (64 << 20) if smoke else (1 << 30), progress=False)
    try:
        return pd.DataFrame([iobench.run_ours(path, c, 32, 0.3 if smoke else 2.0) for c in (16 << 10, 1 << 20)])
    finally:
        path.unlink(missing_ok=True)


def small_model(name: str, repeats: int, new_tokens: int, device: str = "cuda") -> pd.DataFrame:
    """Naive, hybrid, All and dense on the GPU in bf16, side by side (the model and its predictors cached here)."""
    from .models import load_model
    model, tok = load_model(name, progress=False)
    preds = bench.predictors_for(name, model, tok, progress=False)
    budget, note = bench.paper_budget(name, tokenizer=tok, predictors=preds, k=5)
    del model
    runners = {m: bench.build_runner(m, name, budget, tokenizer=tok, predictors=preds, device=device,
                                     compute_dtype="bfloat16") for m in SMALL_METHODS}
    try:
        ids = tok(PROMPT, return_tensors="pt")["input_ids"]
        raw = bench.run_side_by_side(runners, [ids], new_tokens, repeats, progress=False)
        info = pd.DataFrame([bench.runner_info(m, r) for m, r in runners.items()])
    finally:
        for r in runners.values():
            r.close()
    return bench.breakdown(raw, info).assign(model=name, budget_note=note)


def paper_geometry(smoke: bool, rounds: int, device: str = "cuda") -> pd.DataFrame:
    """Naive vs All at OPT 6.7B's geometry, half the model, bf16 on the GPU, alternating."""
    from . import paperscale as ps
    cfg = dataclasses.replace(paper_scale_config(smoke), rounds=rounds)
    ps.ensure_flash_files(cfg, layouts=("bundled",), progress=False)
    ps.ensure_stream_file(cfg, progress=False)
    frames = []
    for rep, method in bench.alternate(["naive", "bundling"], rounds):
        with ps.build_runner(method, cfg, "bfloat16", trace_start=rep * ps.span(cfg, "bundling"),
                             device=device) as r:
            n = ps.span(cfg, method) - cfg.prompt_tokens
            out = r.generate(torch.tensor([ps.prompt_ids(cfg, rep)]), max_new_tokens=n, min_new_tokens=n)
            frames.append(out.stats.assign(method=method, rep=rep))
            info = bench.runner_info(method, r)
    return bench.breakdown(pd.concat(frames, ignore_index=True)).assign(dtype="bfloat16", window_k=info.get("window_k"))


def gpu_table3(summaries: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Ours on this GPU beside the paper's GPU rows (Table 3, RTX 4090; Table 5's standard deviations)."""
    cols = ("io_ms", "mem_ms", "compute_ms", "total_ms")
    rows = [{"source": f"ours: {label}", "method": bench.LABELS.get(m, m),
             **{c: s.loc[m, f"{c}_median"] for c in cols}}
            for label, df in summaries.items() for s in [df.set_index("method")] for m in s.index]
    rows += [{"source": "paper (RTX 4090, bf16)", "method": r[1], **dict(zip(cols, r[3:]))}
             for r in paper.TABLE3_ROWS if r[0] == "OPT 6.7B" and r[2].startswith("GPU")]
    return pd.DataFrame(rows)


def run(args) -> dict:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    meta = device_info(args.device)
    if "disk" not in args.skip:
        disk = disk_probe(args.smoke)
        disk.to_csv(out / "gpu_disk.csv", index=False)
        meta["disk_mbps"] = dict(zip(disk["chunk_bytes"].astype(str), disk["throughput_mbps"]))
    summaries = {}
    if "small" not in args.skip:
        models = {"relu-opt-smoke": "relu-opt-smoke"} if args.smoke else SMALL_MODELS
        cached = [n for n, folder in models.items() if (paths.models_dir() / folder / CACHE_MARKER).exists()]
        meta["small_models"] = {n: n in cached for n in models}
        for n in cached:
            summaries[n] = small_model(n, args.repeats, args.new_tokens, args.device)
            summaries[n].to_csv(out / f"gpu_{n}.csv", index=False)
    if "paper" not in args.skip:
        summaries["OPT 6.7B geometry"] = paper_geometry(args.smoke, args.paper_rounds, args.device)
        summaries["OPT 6.7B geometry"].to_csv(out / "gpu_paper_scale.csv", index=False)
    if summaries:
        gpu_table3(summaries).to_csv(out / "gpu_table3.csv", index=False)
    (out / "gpu_device.json").write_text(json.dumps(meta, indent=1, default=float))
    return meta


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("[gpubench] skipped: no CUDA device here (torch.cuda.is_available() is False); nothing was "
              "measured or written. Run it on a GPU machine (see flashlib/gpubench.py).", flush=True)
        return 0
    meta = run(args)
    print(f"[gpubench] {meta['device']}: tables in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
