"""Command line (paper sec 3 and Table 3): ``python -m flashlib generate | bench``.

``generate`` streams a model's continuation of a prompt through the sparse engine (FFNs read from
flash under a DRAM budget) and prints the per-token I/O / memory-management / compute breakdown.
``bench`` runs the side-by-side latency benchmark (naive, hybrid, +predictor, +windowing,
+bundling; what ``make bench`` runs) and prints Tables 2 and 3 with the paper's numbers beside ours.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import pandas as pd

from .config import ENGINE, bench_config

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _budget(text: str):
    """argparse type: a fraction of the model (0.5), bytes (123456, 64MiB) or 'ffn:SHARE'."""
    from .engine import parse_budget
    if text.lower() in ("none", "unbounded"):
        return None
    if text.lower() == "paper":        # bench: half the model if it holds window k=5, else what k=5 needs
        return "paper"
    try:
        parse_budget(text, 1000, 100, 500)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _buffer_rows(text: str) -> int | None:
    """``--read-buffer-rows``: a row count, or "max" (None: the largest single active set)."""
    return None if text == "max" else _positive_int(text)


def _window_k(text: str) -> int:
    v = int(text) if text.lstrip("-").isdigit() else None
    if v is None or v < 0:
        raise argparse.ArgumentTypeError(f"window k must be a whole number >= 0, got {text!r}")
    return v


def _share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {v}")
    return v


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m flashlib", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream a continuation through the sparse engine, with the breakdown")
    g.add_argument("--model", default="relu-opt", help="relu-opt | relu-opt-smoke | smollm2 | HF id or directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_positive_int, default=32)
    g.add_argument("--dram-budget", type=_budget, default=ENGINE.dram_budget,
                   help="fraction of the model (0.5), bytes (64MiB) or 'ffn:SHARE' (resident + share of FFN)")
    g.add_argument("--policy", choices=("predictor", "oracle", "all"), default=ENGINE.policy)
    g.add_argument("--window-k", type=_window_k, default=None, help="default: the largest that fits")
    g.add_argument("--layout", choices=("bundled", "separate"), default=ENGINE.layout)
    g.add_argument("--density", type=_share, default=None, help="predictor: keep this share per token (top-k)")
    g.add_argument("--capacity-quantile", type=_share, default=ENGINE.capacity_quantile,
                   help="1: matrices hold the largest window seen in calibration (paper); lower: the window on "
                        "this share of tokens, shrinking on the rest")
    g.add_argument("--read-buffer-rows", type=_buffer_rows, default=ENGINE.read_buffer_rows,
                   help=f"smallest read buffer in rows (default {ENGINE.read_buffer_rows}; what the window leaves "
                        "of the budget is added); larger loads are read in rounds; 'max': the largest single "
                        "active set, one round always")
    g.add_argument("--naive-matrix", action="store_true", help="realloc-and-copy DRAM matrix (Fig 6 ablation)")
    g.add_argument("--sample", action="store_true", help="nucleus sampling instead of greedy")
    g.add_argument("--top-p", type=_share, default=0.9)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=ENGINE.device, help="cpu or cuda")
    g.add_argument("--flash-root", default=None, help="folder for the flash files (default: data/flash/engine)")
    g.add_argument("--threads", type=_positive_int, default=bench_config().threads)
    b = sub.add_parser("bench", help="side-by-side latency benchmark: Tables 2 and 3 (make bench)")
    b.add_argument("--model", default="relu-opt")
    b.add_argument("--dram-budget", type=_budget, default=bench_config().dram_budget)
    b.add_argument("--prompt-tokens", type=_positive_int, default=bench_config().prompt_tokens)
    b.add_argument("--new-tokens", type=_positive_int, default=bench_config().new_tokens)
    b.add_argument("--repeats", type=_positive_int, default=bench_config().repeats)
    b.add_argument("--flash-root", default=None)
    b.add_argument("--iobench", action="store_true", help="also run the flash throughput grid (~8 min)")
    b.add_argument("--baselines", action="store_true",
                   help="also flashlib vs page cache vs accelerate disk offload under a cgroup memory limit "
                        "(notebook 10, section 1; a few minutes)")
    return ap


def cmd_generate(args) -> None:
    import torch
    from transformers import TextStreamer

    from .engine import SparseEngine
    from .bench import predictors_for
    from .models import load_model
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    preds = predictors_for(args.model, model, tok) if args.policy == "predictor" else None
    cfg = dataclasses.replace(ENGINE, policy=args.policy, dram_budget=args.dram_budget, window_k=args.window_k,
                              layout=args.layout, density=args.density, preallocated=not args.naive_matrix,
                              capacity_quantile=args.capacity_quantile, read_buffer_rows=args.read_buffer_rows,
                              device=args.device)
    ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    with SparseEngine(model, args.model, cfg, predictors=preds, tokenizer=tok, flash_root=args.flash_root) as e:
        print(f"[flashlib] {args.model}: DRAM budget {e.budget.budget_bytes / 1e6:.2f} MB "
              f"({e.budget.budget_bytes / e.model_bytes:.0%} of the model's {e.model_bytes / 1e6:.2f} MB), "
              f"window k={e.sizing.k}, {cfg.layout} flash file, I/O {e.store.io_mode}", flush=True)
        torch.manual_seed(args.seed)
        kw = dict(do_sample=True, top_p=args.top_p) if args.sample else {}
        r = e.generate(ids, max_new_tokens=args.max_new_tokens, streamer=TextStreamer(tok), **kw)
    cols = ["step", "phase", "n_tokens", "io_ms", "mem_ms", "compute_ms", "total_ms", "bytes_read", "reads",
            "neurons_loaded", "bytes_resident"]
    print(r.stats[cols].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    d = r.decode_stats()
    if len(d):
        print(f"[flashlib] per decoded token (median): io {d['io_ms'].median():.2f} ms, mem "
              f"{d['mem_ms'].median():.2f} ms, compute {d['compute_ms'].median():.2f} ms, total "
              f"{d['total_ms'].median():.2f} ms, {d['bytes_read'].mean() / 1e3:.1f} kB read")


def cmd_bench(args) -> None:
    from . import bench
    from . import experiments as ex
    cfg = dataclasses.replace(bench_config(), dram_budget=args.dram_budget, prompt_tokens=args.prompt_tokens,
                              new_tokens=args.new_tokens, repeats=args.repeats)
    raw, info = ex.latency_benchmark(args.model, bench.METHODS + ("dense",), cfg=cfg, flash_root=args.flash_root)
    summary = bench.breakdown(raw, info)
    try:
        summary = bench.computed_io(summary)
    except FileNotFoundError as e:
        print(f"[flashlib] no computed column: {e}")
    pd.set_option("display.width", 200)
    print(f"\nTable 2 (I/O per token; {args.model}; budget {args.dram_budget}; I/O {info['io_mode'].iloc[-1]}):")
    print(bench.table2(summary).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print("\nTable 3 (ms per token, medians over decoded tokens):")
    print(bench.table3(summary, args.model).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print("\nratios:", {k: round(float(v), 3) for k, v in bench.ratios(summary).items()})
    if args.baselines:
        from . import offload, workers
        from .cgroup import cgroup_unavailable_reason
        from .config import offload_config
        why = cgroup_unavailable_reason()
        if why:
            print(f"\n[flashlib] baselines skipped: {why}")
        else:
            plan = offload.plan(args.model, offload_config(), flash_root=args.flash_root)
            result = workers.side_by_side(plan)
            print(f"\nflashlib vs the page cache vs accelerate disk offload, each under a memory limit "
                  f"({result.meta['budget_note']}):")
            print(workers.summarize(result, "flashlib").to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.iobench:
        from . import iobench
        print(iobench.summarize(iobench.run_grid()).to_string(index=False))
    else:
        print("\nflash throughput vs chunk size and threads (Fig 2b): "
              "python -m flashlib.nbrun notebooks/02_flash_throughput.ipynb  (or `bench --iobench`, ~8 min)")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .dram import DramBudgetError
    from .clock import EngineError, GenerationInterrupted
    from .models import ModelNotAvailable
    try:
        (cmd_generate if args.command == "generate" else cmd_bench)(args)
    except GenerationInterrupted as e:
        print(f"\n[flashlib] {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModelNotAvailable as e:
        print(f"[flashlib] error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DramBudgetError, EngineError, FileNotFoundError, ValueError) as e:
        print(f"[flashlib] error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
