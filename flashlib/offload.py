"""Beyond the paper (peers.md sec 7, items 2-3): the baselines users pick instead, page cache and accelerate disk offload.

What users run when a model does not fit is either the OS page cache (weights memory-mapped,
llama.cpp's way: ``StreamingBaseline(source="mmap")``, the same dense streaming path as the naive
row, with the kernel deciding what stays cached) or **Hugging Face accelerate disk offload**:
``from_pretrained(device_map="auto", max_memory=..., offload_folder=...)``; modules that do not fit
are loaded from disk before every forward (``accelerate_model``). Both only behave like a
memory-constrained device under a real memory limit, so ``plan`` builds notebook 10's side-by-side
of flashlib, the page cache and accelerate for ``workers.side_by_side``: every method in its own
cgroup-limited worker process (budget + its measured own memory), alternating, starting cold.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import torch

from . import models, paper
from .cgroup import KernelIO, evict_files, files_resident
from .clock import Counters, TokenClock, install_step_hooks, run_generate
from .config import ENGINE, RELU_OPT_PRESETS, OffloadConfig, offload_config, relu_opt_preset
from .engine import default_flash_root, flash_file, parse_budget
from .workers import Plan, Spec, command, run_in_group

METHODS = ("flashlib", "pagecache", "accelerate")
BASE = {"flashlib": "bundling", "pagecache": "pagecache", "accelerate": "accelerate"}


# --- checkpoints -------------------------------------------------------------------------------

def checkpoint_tensor_bytes(files) -> int:
    """Bytes of the tensors stored in safetensors ``files`` (headers excluded): the model's bytes as the
    engine counts them (every parameter once, tied weights once), read from the headers alone."""
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            _, header = _safetensors_header(fh)
        total += sum(t["data_offsets"][1] - t["data_offsets"][0] for t in header.values())
    return total


def _safetensors_header(f) -> tuple[int, dict]:
    """(header length, tensor entries) of an open safetensors file: 8-byte little-endian length, JSON."""
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return n, header


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of a Hugging Face checkpoint folder (single file or sharded index)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{folder} has no model.safetensors (or index); the page-cache baseline maps "
                                "safetensors checkpoints only")
    return [single]


# --- accelerate disk offload ----------------------------------------------------------------------

def accelerate_model(folder: Path, budget_bytes: int, offload_folder: Path):
    """``from_pretrained(device_map="auto", max_memory={"cpu": budget}, offload_folder=...)``: what a
    user of Hugging Face accelerate runs on a CPU-only machine; what does not fit goes to "disk".

    Returns (model, device map summary): bytes placed on "cpu" and on "disk" by accelerate's policy.
    """
    from transformers import AutoModelForCausalLM
    offload_folder = Path(offload_folder)
    offload_folder.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": int(budget_bytes)},
                                                 offload_folder=str(offload_folder), local_files_only=True,
                                                 dtype=torch.float32)
    return model.eval(), device_map_bytes(model)


def device_map_bytes(model) -> dict:
    """Bytes of parameters per device in ``model.hf_device_map`` (tied weights once)."""
    dmap = getattr(model, "hf_device_map", {"": "cpu"})
    out: dict[str, int] = {}
    for name, p in model.named_parameters():            # tied weights once
        prefix = max((k for k in dmap if k == "" or name == k or name.startswith(k + ".")), key=len, default="")
        dev = str(dmap.get(prefix, "cpu"))
        out[dev] = out.get(dev, 0) + p.numel() * p.element_size()
    return {"cpu_bytes": out.get("cpu", 0), "disk_bytes": out.get("disk", 0), "device_map": {k: str(v) for k, v in dmap.items()}}


def offload_files(offload_folder: Path) -> list[Path]:
    """Every file accelerate keeps in an offload folder (.dat arrays and its index)."""
    return sorted(p for p in Path(offload_folder).rglob("*") if p.is_file())


class HookedRunner:
    """accelerate's model with the engine's per-step clock (``TokenClock``, bytes and faults from the
    kernel: ``cgroup.KernelIO``), the ``run_generate`` interface, and the files whose pages it reads
    (evicted before each run)."""

    source, io_mode = "accelerate", "page cache (accelerate offload)"

    def __init__(self, model, files, budget_bytes: int, placement: dict):
        self.model, self.files, self.device = model, [Path(f) for f in files], torch.device("cpu")
        self.dtype = next(model.parameters()).dtype
        self.budget_bytes, self.placement = budget_bytes, placement
        self.model_bytes = placement["cpu_bytes"] + placement["disk_bytes"]
        self.counters = Counters()
        self.clock = TokenClock(self.counters, self.bytes_resident, refresh=KernelIO())
        self._hooks = install_step_hooks(model, lambda n, past: self.clock.begin(n, past == 0), self.clock.forward_done)
        self.resident_at_start = float("nan")

    def bytes_resident(self) -> int:
        """Bytes of the weight files in the page cache now (accelerate's "cpu" weights are mapped too)."""
        return int(files_resident(self.files) * sum(os.path.getsize(f) for f in self.files))

    def before_run(self) -> None:
        self.resident_at_start = evict_files(self.files)

    def recover(self) -> None:
        pass

    def generate(self, input_ids, **kw):
        return run_generate(self, input_ids, kw)


def accelerate_runner(folder: Path, budget_bytes: int, offload_folder: Path) -> HookedRunner:
    model, placement = accelerate_model(folder, budget_bytes, offload_folder)
    return HookedRunner(model, checkpoint_files(folder) + offload_files(offload_folder), budget_bytes, placement)


# --- notebook 10's side by side: flashlib vs page cache vs accelerate -----------------------------------

def model_folder(model_name: str) -> Path:
    """Checkpoint folder of a model name (building the offline caches if needed)."""
    if model_name == "smollm2":
        return models.smollm2_dir(progress=False)
    if model_name in ("relu-opt", "relu-opt-smoke"):
        cfg = RELU_OPT_PRESETS["smoke"] if model_name == "relu-opt-smoke" else relu_opt_preset()
        return models.relu_opt_dir(cfg, progress=False)
    path = Path(model_name).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{model_name!r}: the offload baselines need a local checkpoint folder "
                                "(config.json + model.safetensors), or 'relu-opt' / 'smollm2'")
    return path


def offload_root(model_name: str, flash_root=None) -> Path:
    """Folder of this module's files for a model (under the flash folder: the disk being measured)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)
    return Path(flash_root or default_flash_root()) / "offload" / slug


CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


def private_checkpoint(src: Path, dest: Path) -> Path:
    """A copy of a checkpoint folder (config + safetensors) that only the baselines' workers open.

    Another process that has the model loaded (transformers 5 keeps ``from_pretrained`` weights as
    populated mappings of the checkpoint) pins its pages in the page cache, where no eviction can reach
    them and where they are charged to that process: a baseline reading them would get free hits.
    """
    dest.mkdir(parents=True, exist_ok=True)
    names = [n for n in CHECKPOINT_FILES if (Path(src) / n).exists()] + [f.name for f in checkpoint_files(src)]
    for name in names:
        a, b = Path(src) / name, dest / name
        if not b.exists() or b.stat().st_size != a.stat().st_size or b.stat().st_mtime < a.stat().st_mtime:
            tmp = b.with_name(f".{name}.tmp-{os.getpid()}")
            shutil.copyfile(a, tmp)
            os.replace(tmp, b)
    return dest


def plan(model_name: str = "relu-opt", cfg: OffloadConfig | None = None, *, flash_root=None,
         progress: bool = True) -> Plan:
    """The workers' plan: the engine's budget (``bench.paper_budget`` for "paper"), predictors, flash and
    stream files and accelerate's offload folder made once, prompts (held-out split) cut so prompt +
    new tokens fit the model's context; every method at the budget, the baselines also at
    ``cfg.baseline_fractions`` of the model (e.g. "pagecache@0.5")."""
    from . import layout
    from .bench import paper_budget, predictors_for, prompt_ids
    from .models import ffn_adapter, load_model
    from .streaming import WeightFiles, stream_file, stream_groups
    cfg = cfg or offload_config()
    folder = private_checkpoint(model_folder(model_name), offload_root(model_name, flash_root) / "checkpoint")
    model, tok = load_model(model_name, progress=progress)
    model_bytes = checkpoint_tensor_bytes(checkpoint_files(folder))      # = the engine's model bytes
    preds = predictors_for(model_name, model, tok, progress) if "flashlib" in cfg.methods else None
    ctx = getattr(model.config, "max_position_embeddings", None) or (cfg.prompt_tokens + cfg.new_tokens)
    a, dtype = ffn_adapter(model), str(next(model.parameters()).dtype).removeprefix("torch.")
    files = WeightFiles(flash_file(model, a, model_name, "bundled", dtype, flash_root, ENGINE.flash_preset),
                        stream_file(model, stream_groups(model, layout.ffn_weight_names(model, a)), model_name, dtype,
                                    flash_root))
    del model
    prompt_n = min(cfg.prompt_tokens, ctx // 2)
    new_n = min(cfg.new_tokens, ctx - prompt_n)
    if cfg.dram_budget == "paper":
        budget, note = paper_budget(model_name, tokenizer=tok, predictors=preds, k=cfg.window_k, flash_root=flash_root)
    else:
        budget = parse_budget(cfg.dram_budget, model_bytes, 0, 0)
        note = f"budget {cfg.dram_budget!r} = {budget} B"
    offload = offload_root(model_name, flash_root) / f"accelerate-{int(budget)}"
    common = dict(model=model_name, new_tokens=new_n, threads=cfg.threads, io_threads=cfg.io_threads,
                  flash_root=None if flash_root is None else str(flash_root), folder=str(folder),
                  offload_folder=str(offload))
    specs, budgets = {}, {}
    for m in cfg.methods:
        specs[m], budgets[m] = Spec(BASE[m], budget=int(budget), **common), int(budget)
    for frac in cfg.baseline_fractions:
        b = int(frac * model_bytes)
        for m in (m for m in cfg.methods if m != "flashlib" and b != budget):
            specs[f"{m}@{frac:g}"], budgets[f"{m}@{frac:g}"] = Spec(BASE[m], budget=b, **{**common,
                                                                  "offload_folder": str(offload.with_name(f"accelerate-{b}"))}), b
    prompts = [prompt_ids(tok, prompt_n, cfg.domain, i)[0].tolist() for i in range(cfg.repeats)]
    for name, spec in specs.items():          # accelerate writes its offload folder once, outside any timing
        if spec.method == "accelerate":
            init = Spec("accelerate", budget=spec.budget, prompt_ids=tuple(prompts[0]),
                        **{**common, "new_tokens": 1, "offload_folder": spec.offload_folder})
            run = run_in_group(command(init), None, name="accelerate-init", timeout=cfg.worker_timeout_s,
                               poll_seconds=1.0)
            if run.result is None:
                raise RuntimeError(f"accelerate (initial) worker failed: {run.stderr_tail}")
    mapped = {n: (files.paths if s.method == "pagecache" else
                  checkpoint_files(folder) + offload_files(Path(s.offload_folder)) if s.method == "accelerate" else [])
              for n, s in specs.items()}
    meta = {"model": model_name, "budget_bytes": int(budget), "budget_note": note, "model_bytes": model_bytes,
            "prompt_tokens": prompt_n, "new_tokens": new_n, "repeats": cfg.repeats, "threads": cfg.threads}
    return Plan(specs, budgets, mapped, prompts, cfg.repeats, cfg.overhead_repeats, cfg.worker_timeout_s,
                cfg.limited_timeout_s, cfg.poll_seconds, meta=meta)


def _ms(summary: pd.DataFrame, method: str) -> float:
    row = summary.loc[summary["method"] == method, "ms_per_token_median"]
    return float(row.iloc[0]) if len(row) else float("nan")


def paper_vs_ours_rows(summary: pd.DataFrame | None, meta: dict | None, why_missing: str | None = None) -> list[tuple]:
    """The baselines' lines of the closing table: (quantity, paper, ours, note)."""
    rows = [("baselines", "naive / hybrid loaders; OS caching disabled on purpose (paper-facts §4, item 10)",
             "also mmap + page cache (llama.cpp-style) and accelerate disk offload; every method, the engine "
             "included, under a cgroup-v1 memory limit = DRAM budget + the worker's own measured memory", "new")]
    if summary is None:
        return rows + [("flashlib vs page cache / accelerate", "not measured", "not run", why_missing or "")]
    fl = _ms(summary, "flashlib")
    st = summary.set_index("method")
    rows.append(("DRAM budget (ReLU OPT)", f"~{paper.DRAM_BUDGET_FRACTION:.0%} of the model",
                 f"{meta['budget_bytes'] / meta['model_bytes']:.0%} ({meta['budget_bytes'] / 1e6:.1f} MB)",
                 meta.get("budget_note", "")))
    f = st.loc["flashlib"]
    rows.append(("flashlib under its limit", "-", f"{f['status']}: peak {f['peak_mb']:.1f} MB of {f['limit_mb']:.1f} MB, "
                 f"failcnt {f['failcnt_min']}", "limit = budget + its own memory measured without its weights"))
    for m, target in (("pagecache", 3), ("accelerate", 10)):
        if m in st.index:
            rows.append((f"flashlib speed-up over {m} (ms/token, median)", "not measured",
                         f"{_ms(summary, m) / fl:.1f}x ({_ms(summary, m):.1f} vs {fl:.1f} ms)",
                         f"acceptance >= {target}x; failcnt {st.loc[m, 'failcnt_min']}: the limit reclaimed pages"))
    for m in [m for m in st.index if "@" in m]:
        ok = st.loc[m, "status"] == "ok"
        rows.append((f"{m} (the paper's half of the model)", "-",
                     f"{_ms(summary, m):.1f} ms/token ({_ms(summary, m) / fl:.1f}x flashlib's)" if ok
                     else st.loc[m, "status"], "the baselines at exactly half, where the engine's budget differs"))
    return rows
