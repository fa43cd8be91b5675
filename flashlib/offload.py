"""Beyond the paper (peers.md sec 7, items 2-3): the baselines users pick instead, page cache (mmap) and accelerate disk offload.

The paper compares its engine with loaders that read the whole model from flash every token.
What users actually run when a model does not fit is either

* **the OS page cache**: weights memory-mapped from a safetensors checkpoint (llama.cpp's default;
  transformers 5 loads that way too), so pages fault in from disk and the kernel evicts what no
  longer fits (``mmap_model``: a lazy mapping, so a run can start cold), or
* **Hugging Face accelerate disk offload**: ``device_map="auto"`` with ``max_memory`` and an
  ``offload_folder``; modules that do not fit are loaded from disk before every forward
  (``accelerate_model``).

Both run inside ``generate()`` with the engine's per-step clock (``HookedRunner``, ``FaultClock``).

Both only *behave* like a memory-constrained device when the memory is really limited: page cache
counts as memory, and an unlimited kernel simply keeps the whole model cached. So each worker runs
as its own process in a cgroup-v1 memory child group (``MemoryGroup``; io-measurements.md sec 4)
whose ``memory.limit_in_bytes`` is the DRAM budget plus that worker's own non-weight memory
(Python, torch, activations), measured in the same worker with its weight files pre-cached outside
the group (pages already cached are charged to whoever loaded them). Weight files start evicted
(``posix_fadvise(DONTNEED)``, checked with ``mincore``). The engine runs in an accounting-only group:
it enforces its budget in-process and its O_DIRECT reads leave no page cache.

``side_by_side`` alternates the three workers (A B C, rotated each repeat) and ``summarize`` gives
the tidy table; ``paper_scale_side_by_side`` does the page-cache baseline at OPT 6.7B geometry beside
the engine's paper-scale replay. Workers: ``python -m flashlib.offload worker --method ...``.
"""
from __future__ import annotations

import dataclasses
import json
import errno
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .config import OffloadConfig, PaperScaleOffloadConfig, offload_config, paper_scale_offload_config
from .engine import Counters, TokenClock, install_step_hooks, run_generate
from .store import evict_from_page_cache, resident_fraction
from .traces import torch_threads

RESULT_MARK = "FLASHLIB_RESULT "          # the worker's JSON line on stdout starts with this
GROUP_PREFIX = "flashlib-"                # child cgroups we create (and may remove)
METHODS = ("flashlib", "pagecache", "accelerate")


# --- cgroup-v1 memory groups (io-measurements.md sec 4 and its appendix) -----------------------

class CgroupUnavailable(RuntimeError):
    """No writable cgroup-v1 memory hierarchy here (not root, v2-only, or not mounted)."""


def memory_mount() -> Path:
    """Mount point of the cgroup-v1 hierarchy that carries the memory controller (/proc/mounts)."""
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 4 and fields[2] == "cgroup" and "memory" in fields[3].split(","):
                return Path(fields[1])
    raise CgroupUnavailable("no cgroup-v1 memory hierarchy in /proc/mounts (a v2-only machine would need "
                            "memory.max in a v2 child group, which flashlib does not drive)")


def own_memory_cgroup() -> Path:
    """This process's cgroup in the v1 memory hierarchy (from /proc/self/cgroup)."""
    root = memory_mount()
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, rel = line.strip().split(":", 2)
            if "memory" in controllers.split(","):
                return root / rel.lstrip("/")
    raise CgroupUnavailable("/proc/self/cgroup names no v1 memory cgroup")


def cgroup_unavailable_reason() -> str | None:
    """None when memory child groups can be made here, else why not (tests skip with this message)."""
    try:
        probe = own_memory_cgroup() / f"{GROUP_PREFIX}probe-{os.getpid()}"
        probe.mkdir()
        try:
            (probe / "memory.limit_in_bytes").write_text(str(1 << 30))
        finally:
            probe.rmdir()
    except CgroupUnavailable as e:
        return str(e)
    except OSError as e:
        return f"cannot create a cgroup-v1 memory child group ({e}); needs root and a writable hierarchy"
    return None


def _read_kv(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


class MemoryGroup:
    """A child of our own memory cgroup: optional limit, a pre-exec hook that moves a child process in
    between fork and exec (no race), usage readings, and removal. Use as a context manager.

    ``limit_bytes`` None: an accounting-only group (no limit; its peak usage is still measured).
    """

    def __init__(self, limit_bytes: int | None = None, name: str | None = None):
        parent = own_memory_cgroup()
        self.path = parent / f"{GROUP_PREFIX}{name or 'g'}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
        try:
            self.path.mkdir()
        except OSError as e:
            raise CgroupUnavailable(f"cannot create {self.path} ({e})") from e
        self.limit_bytes = limit_bytes
        if limit_bytes is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))

    def enter(self) -> None:
        """``subprocess`` ``preexec_fn``: runs in the child after fork, before exec."""
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    def read(self, name: str) -> int:
        return int((self.path / f"memory.{name}").read_text())

    def stat(self) -> dict[str, int]:
        return _read_kv(self.path / "memory.stat")

    def report(self) -> dict:
        """Limit, peak usage, failcnt (times usage hit the limit: reclaim), OOM kills, and memory.stat."""
        oom = _read_kv(self.path / "memory.oom_control")
        stat = self.stat()
        return {"limit_bytes": self.limit_bytes, "max_usage_bytes": self.read("max_usage_in_bytes"),
                "failcnt": self.read("failcnt"), "oom_kill": oom.get("oom_kill", 0),
                "under_oom": oom.get("under_oom", 0), "cache_bytes_after": stat.get("cache", 0)}

    def remove(self) -> None:
        """Uncharge what is left (force_empty) and remove the group; the tasks must have exited."""
        if not self.path.exists():
            return
        try:
            (self.path / "memory.force_empty").write_text("0")
        except OSError:
            pass
        for _ in range(50):                     # an exiting child can linger for a few ms
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"could not remove {self.path}: tasks {(self.path / 'cgroup.procs').read_text()!r}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def own_group_usage(reset: bool = False) -> dict:
    """Inside a worker: this process's group's peak and failcnt so far; ``reset`` restarts both from now
    (so the parent's final reading covers generation only, not model loading)."""
    g = own_memory_cgroup()
    out = {"max_usage_bytes": int((g / "memory.max_usage_in_bytes").read_text()),
           "failcnt": int((g / "memory.failcnt").read_text())}
    if reset:
        (g / "memory.max_usage_in_bytes").write_text("0")
        (g / "memory.failcnt").write_text("0")
    return out


@dataclass
class WorkerRun:
    """One worker process: its result JSON, the group's report, and the parent's memory samples."""

    returncode: int
    result: dict | None           # the worker's JSON (None if it died)
    group: dict                   # MemoryGroup.report() after exit
    samples: pd.DataFrame         # t (s since start) | usage | rss | cache | mapped_file
    wall_s: float
    stderr_tail: str
    timed_out: bool = False       # killed after ``timeout`` seconds


def run_in_group(cmd: list[str], limit_bytes: int | None, *, name: str = "worker", timeout: float = 1800,
                 poll_seconds: float = 0.05) -> WorkerRun:
    """Run ``cmd`` in a fresh memory group (limited or accounting-only), sampling usage while it runs."""
    samples: list[tuple] = []
    with MemoryGroup(limit_bytes, name) as g:
        t0 = time.time()
        proc = subprocess.Popen(cmd, preexec_fn=g.enter, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        done = threading.Event()

        def poll():
            while not done.is_set():
                try:
                    s = g.stat()
                    samples.append((time.time(), g.read("usage_in_bytes"), s.get("rss", 0), s.get("cache", 0),
                                    s.get("mapped_file", 0)))
                except OSError:
                    pass
                done.wait(poll_seconds)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            timed_out = True
        finally:
            done.set()
            poller.join()
        wall = time.time() - t0
        report = g.report()
    result = next((json.loads(line[len(RESULT_MARK):]) for line in out.splitlines()[::-1]
                   if line.startswith(RESULT_MARK)), None)
    frame = pd.DataFrame(samples, columns=["time", "usage", "rss", "cache", "mapped_file"])
    return WorkerRun(proc.returncode, result, report, frame, wall, err[-3000:], timed_out)


# --- reading the kernel's I/O counters inside a worker -------------------------------------------

def proc_read_bytes() -> int:
    """Bytes this process caused to be fetched from storage (/proc/self/io read_bytes: page-cache
    misses with their readahead, and O_DIRECT reads; cache hits count nothing)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def major_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


class FaultClock(TokenClock):
    """TokenClock whose ``bytes_read`` and ``reads`` come from the kernel: bytes fetched from storage
    (page-cache misses) and major page faults. For runners whose I/O hides inside page faults."""

    def __init__(self, counters: Counters, resident_bytes):
        super().__init__(counters, resident_bytes)
        self._base = (proc_read_bytes(), major_faults())

    def _close(self, t_end) -> None:
        self.counters.bytes_read = proc_read_bytes() - self._base[0]
        self.counters.reads = major_faults() - self._base[1]
        super()._close(t_end)


def files_resident(files) -> float:
    """Share of the files' bytes in the page cache now (mincore), size-weighted."""
    sizes = [os.path.getsize(f) for f in files]
    return float(sum(resident_fraction(f) * s for f, s in zip(files, sizes)) / max(1, sum(sizes)))


def unmap_file_pages(files) -> int:
    """Drop this process's page-table entries for every private, read-only-used mapping of ``files``
    (``madvise(MADV_DONTNEED)``; the next touch faults the page in again), so ``posix_fadvise`` can then
    evict them: a page mapped by a process stays cached. Returns the bytes of mappings dropped.

    Only for mappings nothing has written to (a written private page would be lost): model weights.
    """
    import ctypes
    names = {str(Path(f).resolve()) for f in files}
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    with open("/proc/self/maps") as fh:
        spans = [line.split() for line in fh]
    for parts in spans:
        if len(parts) >= 6 and parts[5] in names:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if libc.madvise(ctypes.c_void_p(lo), hi - lo, 4) != 0:       # MADV_DONTNEED
                err = ctypes.get_errno()
                if err == errno.ENOMEM:      # unmapped since /proc/self/maps was read (a freed tensor): no pages left
                    continue
                raise OSError(err, f"madvise(MADV_DONTNEED) on a mapping of {parts[5]} failed")
            dropped += hi - lo
    return dropped


def evict_files(files) -> float:
    """Unmap this process's pages of the files, flush and ``posix_fadvise(DONTNEED)`` them; returns the share still
    resident (mincore) afterwards (pages another process maps cannot be evicted)."""
    unmap_file_pages(files)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)                       # dirty pages cannot be dropped
        finally:
            os.close(fd)
        evict_from_page_cache(f)
    return files_resident(files)


def precache_files(files) -> float:
    """Read every file once (into the page cache, charged to the calling process's group)."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    return files_resident(files)


# --- loading: mmap-backed weights, accelerate offload ---------------------------------------------

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


def _in_file_mapping(t: torch.Tensor, path: Path) -> bool:
    """Whether tensor ``t``'s memory lies in a mapping of ``path`` (/proc/self/maps)."""
    ptr, name = t.data_ptr(), str(Path(path).resolve())
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= ptr < hi:
                return line.rstrip().endswith(name)
    return False


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def lazy_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of one lazy private mapping of it: no byte is read
    until something touches it. (``safetensors.torch.load_file``'s mmap backend pre-faults the whole file,
    and transformers' ``from_pretrained`` keeps those populated mappings, so neither can start cold: a
    mapped page cannot be evicted.) Format: 8-byte little-endian header length, JSON header, data."""
    import mmap
    with open(path, "rb") as f:
        n, header = _safetensors_header(f)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)      # MAP_PRIVATE; nothing writes to it
    base, out = 8 + n, {}
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, not supported by the lazy loader")
        lo, hi = info["data_offsets"]
        count = (hi - lo) // torch.empty((), dtype=dtype).element_size()
        t = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + lo) if count else torch.empty(0, dtype=dtype)
        out[name] = t.view(info["shape"])
    return out


def mmap_model(folder: Path):
    """A causal LM whose weights are views of lazily mmap'd safetensors files: every page comes from the
    page cache when a forward first touches it (llama.cpp's loading, in PyTorch).

    The model is built without weights (``init_empty_weights``), then ``load_state_dict(assign=True)``
    adopts the mapped tensors (``lazy_safetensors``; checked against /proc/self/maps); tied weights are
    re-tied. Returns (model, files).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    files = checkpoint_files(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    state = {}
    for f in files:
        part = lazy_safetensors(f)
        if part and not _in_file_mapping(next(iter(part.values())), f):
            raise RuntimeError(f"the tensors of {f} are not views of its mapping")
        state.update(part)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"{folder}: no weights for {missing[:5]} after mapping {[f.name for f in files]}")
    return model.eval(), files


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
    """A model with the engine's per-step clock (``TokenClock`` fed by the kernel: ``FaultClock``), the
    ``run_generate`` interface, and the files whose pages it reads (evicted before each run)."""

    def __init__(self, model, files):
        self.model, self.files, self.device = model, [Path(f) for f in files], torch.device("cpu")
        self.counters = Counters()
        self.clock = FaultClock(self.counters, lambda: files_resident(self.files) *
                                sum(os.path.getsize(f) for f in self.files))
        self._hooks = install_step_hooks(model, self.clock.begin, self.clock.forward_done)
        self.evict = True
        self.resident_at_start = float("nan")

    def before_run(self) -> None:
        self.resident_at_start = evict_files(self.files) if self.evict else files_resident(self.files)

    def recover(self) -> None:
        pass

    def generate(self, input_ids, **kw):
        return run_generate(self, input_ids, kw)


# --- workers (one process per run; ``python -m flashlib.offload worker ...``) ------------------------

def materialize(model) -> int:
    """Copy every parameter that is a view of a file mapping (transformers 5 loads that way) into its own
    memory, tied weights once; returns the bytes copied. The engine's resident part is then DRAM."""
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


def _flashlib_runner(args):
    """The engine (bundling row: predictor + window + bundles, O_DIRECT) at ``args.budget`` bytes."""
    from .experiments import build_runner, predictors_for
    from .models import load_model
    model, tok = load_model(args.model, progress=False)
    preds = predictors_for(args.model, model, tok, progress=False)
    del model
    runner = build_runner("bundling", args.model, int(args.budget), tokenizer=tok, predictors=preds,
                          flash_root=args.flash_root, io_threads=args.io_threads)
    materialize(runner.model)            # its resident part lives in DRAM, as in the paper (not in a mapping)
    src = Path(getattr(runner.model, "name_or_path", "") or ".")
    if (src / "config.json").exists():
        evict_files(checkpoint_files(src))
    info = {"budget_bytes": runner.budget.budget_bytes, "dram_used_bytes": runner.budget.used_bytes,
            "window_k": runner.sizing.k, "io_mode": runner.store.io_mode, "model_bytes": runner.model_bytes}
    return runner, [runner.flash_path], info


def _pagecache_runner(args):
    model, files = mmap_model(args.folder)
    runner = HookedRunner(model, files)
    return runner, files, {"model_bytes": checkpoint_tensor_bytes(files)}


def _accelerate_runner(args):
    model, placement = accelerate_model(args.folder, int(args.budget), args.offload_folder)
    files = checkpoint_files(args.folder) + offload_files(args.offload_folder)
    runner = HookedRunner(model, files)
    return runner, files, {"budget_bytes": int(args.budget), **placement}


RUNNERS = {"flashlib": _flashlib_runner, "pagecache": _pagecache_runner, "accelerate": _accelerate_runner}


def release_free_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the kernel (glibc ``malloc_trim``), so a
    worker's memory after setup is what it holds, not what setup once needed."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker_main(args) -> dict:
    """Build one method's runner, start cold, generate ``args.new_tokens`` greedy tokens, report."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runner, files, info = RUNNERS[args.method](args)
    if hasattr(runner, "evict"):
        runner.evict = not args.no_evict
    ids = torch.tensor([[int(x) for x in args.prompt_ids.split(",")]])
    release_free_memory()                # what setup freed (e.g. a second model load) goes back to the OS
    setup_s = time.perf_counter() - t0
    setup_group = own_group_usage(reset=True) if args.reset_peak else None
    io0, f0, t_start = proc_read_bytes(), major_faults(), time.time()
    r = runner.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    t_end = time.time()
    resident = getattr(runner, "resident_at_start", None)
    if resident is None:                 # the engine evicts its flash file in before_run
        resident = files_resident(files)
    out = {"method": args.method, "tokens": r.tokens[0].tolist(), "prompt_len": ids.shape[1],
           "steps": r.stats.to_dict("records"), "setup_s": setup_s, "t_start": t_start, "t_end": t_end,
           "disk_read_bytes": proc_read_bytes() - io0, "major_faults": major_faults() - f0,
           "resident_at_start": resident, "files": [str(f) for f in files], "setup_group": setup_group,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **info}
    if hasattr(runner, "close"):
        runner.close()
    return out


def worker_command(method: str, *, model: str, folder: Path | None, prompt_ids, new_tokens: int, threads: int,
                   budget: int | None = None, offload_folder: Path | None = None, io_threads: int = 32,
                   flash_root=None, no_evict: bool = False, reset_peak: bool = True) -> list[str]:
    """The worker's command line (``python -m flashlib.offload worker``)."""
    cmd = [sys.executable, "-m", "flashlib.offload", "worker", "--method", method, "--model", model,
           "--prompt-ids", ",".join(str(int(x)) for x in prompt_ids), "--new-tokens", str(new_tokens),
           "--threads", str(threads), "--io-threads", str(io_threads)]
    for flag, value in (("--folder", folder), ("--budget", budget), ("--offload-folder", offload_folder),
                        ("--flash-root", flash_root)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + (["--no-evict"] if no_evict else []) + (["--reset-peak"] if reset_peak else [])


# --- the side-by-side benchmark (ReLU OPT and friends) -------------------------------------------------

def model_folder(model_name: str) -> Path:
    """Checkpoint folder of a model name (building the offline caches if needed)."""
    from . import models
    from .config import RELU_OPT_PRESETS, relu_opt_preset
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
    from .engine import default_flash_root
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


@dataclass
class BenchPlan:
    """Everything the workers share: model, budget, prompts, folders."""

    model_name: str
    folder: Path
    budget_bytes: int
    budget_note: str
    model_bytes: int
    prompts: list[list[int]]
    new_tokens: int
    offload_folder: Path
    cfg: OffloadConfig
    flash_root: Path | None = None


def prepare(model_name: str, cfg: OffloadConfig, flash_root=None, progress: bool = True) -> BenchPlan:
    """Resolve the budget (the engine's, ``experiments.paper_budget`` for "paper"), cache predictors and
    flash files, and cut the prompts (held-out split) so prompt + new tokens fit the model's context."""
    from .engine import parse_budget
    from .experiments import paper_budget, predictors_for, prompt_ids
    from .models import load_model
    folder = private_checkpoint(model_folder(model_name), offload_root(model_name, flash_root) / "checkpoint")
    model, tok = load_model(model_name, progress=progress)
    model_bytes = checkpoint_tensor_bytes(checkpoint_files(folder))      # = the engine's model bytes
    preds = predictors_for(model_name, model, tok, progress) if "flashlib" in cfg.methods else None
    ctx = getattr(model.config, "max_position_embeddings", None) or (cfg.prompt_tokens + cfg.new_tokens)
    del model
    prompt_n = min(cfg.prompt_tokens, ctx // 2)
    new_n = min(cfg.new_tokens, ctx - prompt_n)
    if cfg.dram_budget == "paper":
        budget, note = paper_budget(model_name, tokenizer=tok, predictors=preds, k=cfg.window_k, flash_root=flash_root)
    else:
        budget = parse_budget(cfg.dram_budget, model_bytes, 0, 0)
        note = f"budget {cfg.dram_budget!r} = {budget} B"
    prompts = [prompt_ids(tok, prompt_n, cfg.domain, i)[0].tolist() for i in range(cfg.repeats)]
    return BenchPlan(model_name, folder, int(budget), note, model_bytes, prompts, new_n,
                     offload_root(model_name, flash_root) / f"accelerate-{int(budget)}", cfg, flash_root)


def _command(plan: BenchPlan, method: str, rep: int, budget: int | None = None, **kw) -> list[str]:
    return worker_command(method, model=plan.model_name, folder=plan.folder, prompt_ids=plan.prompts[rep % len(plan.prompts)],
                          new_tokens=plan.new_tokens, threads=plan.cfg.threads, budget=budget or plan.budget_bytes,
                          offload_folder=plan.offload_folder, io_threads=plan.cfg.io_threads,
                          flash_root=plan.flash_root, **kw)


def _check(run: WorkerRun, what: str) -> dict:
    if run.result is None:
        raise RuntimeError(f"{what} worker failed (rc {run.returncode}, group {run.group}): {run.stderr_tail}")
    return run.result


def non_weight_bytes(run: WorkerRun) -> int:
    """A pre-cached run's own memory: its group's peak (setup or generation). The weight pages were cached
    by the parent and stay charged to it (even accelerate's "cpu" modules are views of the mapped
    checkpoint in transformers 5, not copies), so what the group counts is everything but the weights."""
    return int(max(run.group["max_usage_bytes"], (run.result.get("setup_group") or {}).get("max_usage_bytes", 0)))


def measure_overhead(plan: BenchPlan, method: str, progress: bool = True) -> pd.DataFrame:
    """The worker's non-weight memory, ``cfg.overhead_repeats`` times: the same worker and prompt with its
    weight files pre-cached by this (parent) process, in an accounting-only group."""
    rows = []
    for i in range(plan.cfg.overhead_repeats):
        files = checkpoint_files(plan.folder) + (offload_files(plan.offload_folder) if method == "accelerate" else [])
        cached = precache_files(files)
        run = run_in_group(_command(plan, method, i, no_evict=True), None, name=f"overhead-{method}",
                           timeout=plan.cfg.worker_timeout_s, poll_seconds=plan.cfg.poll_seconds)
        res = _check(run, f"{method} (overhead)")
        rows.append({"method": method, "repeat": i, "overhead_bytes": non_weight_bytes(run),
                     "group_peak_bytes": run.group["max_usage_bytes"],
                     "setup_peak_bytes": (res.get("setup_group") or {}).get("max_usage_bytes"),
                     "cpu_weight_bytes": res.get("cpu_bytes", 0), "resident_before": cached,
                     "disk_read_bytes": res["disk_read_bytes"]})
        if progress:
            print(f"[offload] overhead {method} #{i}: {rows[-1]['overhead_bytes'] / 2**20:.1f} MiB "
                  f"(disk read during generation {res['disk_read_bytes'] / 1e6:.2f} MB)", flush=True)
    evict_files(checkpoint_files(plan.folder) + offload_files(plan.offload_folder))
    return pd.DataFrame(rows)


@dataclass
class OffloadResult:
    """``steps``: every worker's per-step rows (method | rep | step | phase | total_ms | ...);
    ``runs``: one row per worker run (limit, peak, failcnt, tokens); ``overhead``: the pre-cached runs;
    ``samples``: the groups' memory over time; ``meta``: budget and model."""

    steps: pd.DataFrame
    runs: pd.DataFrame
    overhead: pd.DataFrame
    samples: pd.DataFrame
    meta: dict = field(default_factory=dict)


def _ensure_accelerate_folder(plan: BenchPlan) -> None:
    """Let accelerate write its offload folder once (outside any timing) so every run finds the same files."""
    if "accelerate" in plan.cfg.methods:
        run = run_in_group(_command(plan, "accelerate", 0, reset_peak=False), None, name="accelerate-init",
                           timeout=plan.cfg.worker_timeout_s, poll_seconds=1.0)
        _check(run, "accelerate (initial)")


def variants(plan: BenchPlan) -> dict[str, tuple[str, int]]:
    """Worker name -> (method, budget bytes): every method at the plan's budget, and the baselines also at
    ``cfg.baseline_fractions`` of the model (e.g. "pagecache@0.5": the paper's half, where the engine may
    not fit because its resident part alone is larger)."""
    out = {m: (m, plan.budget_bytes) for m in plan.cfg.methods}
    for frac in plan.cfg.baseline_fractions:
        budget = int(frac * plan.model_bytes)
        if budget != plan.budget_bytes:
            out.update({f"{m}@{frac:g}": (m, budget) for m in plan.cfg.methods if m != "flashlib"})
    return out


def _run_row(name: str, method: str, rep: int, budget: int, limit, overhead, run: WorkerRun, res: dict,
             new_tokens: int) -> dict:
    """One run's memory and I/O record (group report, the sample at the generation-phase peak)."""
    s, res = run.samples, res or {}
    gen = s[(s["time"] >= res.get("t_start", np.inf)) & (s["time"] <= res.get("t_end", -np.inf))]
    at_peak = gen.loc[gen["usage"].idxmax()] if len(gen) else pd.Series(dtype=float)
    status = "ok" if run.result is not None else \
        f"OOM-killed under the limit (rc {run.returncode})" if run.group["oom_kill"] else \
        f"did not finish {new_tokens} tokens in {run.wall_s:.0f} s under the limit (killed)" if run.timed_out else \
        f"failed (rc {run.returncode})"
    return {"method": name, "base_method": method, "rep": rep, "status": status, "limit_bytes": limit,
            "overhead_bytes": overhead, "budget_bytes": budget, "peak_bytes": run.group["max_usage_bytes"],
            "failcnt": run.group["failcnt"], "oom_kill": run.group["oom_kill"],
            "setup_peak_bytes": (res.get("setup_group") or {}).get("max_usage_bytes"),
            "rss_at_peak": at_peak.get("rss"), "cache_at_peak": at_peak.get("cache"),
            "resident_at_start": res.get("resident_at_start"), "disk_read_bytes": res.get("disk_read_bytes"),
            "major_faults": res.get("major_faults"), "new_tokens": new_tokens, "tokens": res.get("tokens"),
            "setup_s": res.get("setup_s"), "wall_s": run.wall_s,
            **{k: res.get(k) for k in ("window_k", "dram_used_bytes", "io_mode", "cpu_bytes", "disk_bytes")}}


def side_by_side(model_name: str = "relu-opt", cfg: OffloadConfig | None = None, *, flash_root=None,
                 progress: bool = True) -> OffloadResult:
    """flashlib vs page cache vs accelerate at one DRAM budget, alternating workers (A B C, rotated).

    Page cache and accelerate run under limit = budget + their measured non-weight memory; the engine
    in an accounting-only group. Raises ``CgroupUnavailable`` where no memory group can be made.
    """
    cfg = cfg or offload_config()
    why = cgroup_unavailable_reason()
    if why:
        raise CgroupUnavailable(why)
    plan = prepare(model_name, cfg, flash_root, progress)
    _ensure_accelerate_folder(plan)
    overhead = pd.concat([measure_overhead(plan, m, progress) for m in cfg.methods if m != "flashlib"],
                         ignore_index=True)
    extra = overhead.groupby("method")["overhead_bytes"].max().to_dict()     # the larger: never starve a worker
    steps, runs, samples = [], [], []
    workers = variants(plan)
    names = list(workers)
    for rep in range(cfg.repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            method, budget = workers[name]
            limit = None if method == "flashlib" else budget + int(extra[method])
            evict_files(checkpoint_files(plan.folder) + offload_files(plan.offload_folder))
            run = run_in_group(_command(plan, method, rep, budget=budget), limit, name=method,
                               timeout=cfg.worker_timeout_s if limit is None else cfg.limited_timeout_s,
                               poll_seconds=cfg.poll_seconds)
            if run.result is None and not (limit is not None and (run.group["oom_kill"] or run.timed_out)):
                _check(run, name)                  # a crash is an error; an OOM kill or thrashing under the limit is a result
            res = run.result
            runs.append(_run_row(name, method, rep, budget, limit, extra.get(method), run, res, plan.new_tokens))
            t0 = res["t_start"] if res else run.samples["time"].min()
            samples.append(run.samples.assign(t=run.samples["time"] - t0, method=name, rep=rep))
            if res:
                steps.append(pd.DataFrame(res["steps"]).assign(method=name, rep=rep))
            if progress:
                d = steps[-1][steps[-1]["phase"] == "decode"]["total_ms"] if res else pd.Series([np.nan])
                print(f"[offload] rep {rep} {name}: {runs[-1]['status']}, {d.median():.1f} ms/token, peak "
                      f"{run.group['max_usage_bytes'] / 2**20:.1f} MiB, failcnt {run.group['failcnt']}", flush=True)
    meta = {"model": model_name, "budget_bytes": plan.budget_bytes, "budget_note": plan.budget_note,
            "model_bytes": plan.model_bytes, "prompt_tokens": len(plan.prompts[0]), "new_tokens": plan.new_tokens,
            "repeats": cfg.repeats, "threads": cfg.threads}
    return OffloadResult(pd.concat(steps, ignore_index=True), pd.DataFrame(runs), overhead,
                         pd.concat(samples, ignore_index=True), meta)


def summarize(result: OffloadResult) -> pd.DataFrame:
    """One row per worker: median (p10, p90) ms per decoded token, memory (budget, limit, peak, page cache
    at the peak, failcnt), MB read from disk per token, status, and how many times slower than flashlib."""
    d = result.steps[result.steps["phase"] == "decode"]
    g = d.groupby("method", sort=False)
    runs = result.runs.groupby("method", sort=False)
    out = pd.DataFrame({
        "base_method": runs["base_method"].first(), "runs": runs.size(),
        "status": runs["status"].agg(lambda s: "ok" if (s == "ok").all() else "; ".join(sorted(set(s)))),
        "budget_mb": runs["budget_bytes"].first() / 1e6, "limit_mb": runs["limit_bytes"].first() / 1e6,
        "overhead_mb": runs["overhead_bytes"].first() / 1e6, "peak_mb": runs["peak_bytes"].max() / 1e6,
        "cache_at_peak_mb": runs["cache_at_peak"].median() / 1e6, "failcnt_min": runs["failcnt"].min(),
        "oom_kills": runs["oom_kill"].sum()})
    out = out.join(pd.DataFrame({
        "ms_per_token_median": g["total_ms"].median(), "ms_per_token_p10": g["total_ms"].quantile(0.1),
        "ms_per_token_p90": g["total_ms"].quantile(0.9), "tokens": g.size(),
        "read_mb_per_token": g["bytes_read"].mean() / 1e6})).reset_index()
    if "flashlib" in set(out["method"]):
        ref = out.loc[out["method"] == "flashlib", "ms_per_token_median"].item()
        out["flashlib_speedup"] = out["ms_per_token_median"] / ref
    return out


def same_tokens(result: OffloadResult) -> pd.DataFrame:
    """Whether every method generated the same greedy tokens as the others on the same prompt (per rep)."""
    r = result.runs[result.runs["status"] == "ok"]
    rows = []
    for rep, grp in r.groupby("rep"):
        toks = {m: tuple(t) for m, t in zip(grp["method"], grp["tokens"])}
        ref = toks.get("pagecache") or next(iter(toks.values()))
        rows += [{"rep": rep, "method": m, "same_as_pagecache": t == ref} for m, t in toks.items()]
    return pd.DataFrame(rows)


# --- paper geometry: the page-cache baseline at OPT 6.7B's shapes -----------------------------------

def _touch(region: np.ndarray) -> None:
    """Read one byte of every 4 KiB page of ``region`` (uint8): each page is faulted in from disk
    unless it is in the page cache (the kernel's fault read-around reads more around each miss)."""
    np.add.reduce(region[::4096], dtype=np.uint64)


def naive_regions(cfg) -> tuple[dict[str, Path], list[tuple[tuple[int, int], tuple[int, int]]]]:
    """The paper-scale flash files and, per layer, the (offset, bytes) the naive row reads: its share of the
    non-FFN bytes (from the separate file) and its FFN bundles (bundled file, ``[d_ffn, 2 d_model]`` fp16)."""
    from . import layout
    from .paperscale import bundle_bytes, flash_paths, nonffn_rows
    files = flash_paths(cfg)
    mb, ms = layout.read_manifest(files["bundled"]), layout.read_manifest(files["separate"])
    if mb["row_padding"]:
        raise ValueError(f"{files['bundled']} has padded rows; the dense view needs row_alignment dividing the bundle")
    standin = nonffn_rows(cfg) * bundle_bytes(cfg)
    if ms["data_offset"] + cfg.n_layers * standin > os.path.getsize(files["separate"]):
        raise ValueError("the separate file is too small to stand in for the non-FFN bytes")
    spans = [((ms["data_offset"] + l * standin, standin), (mb["data_offset"] + l * mb["matrix_bytes"], mb["matrix_bytes"]))
             for l in range(cfg.n_layers)]
    return files, spans


def precache_ranges(path: Path, ranges) -> None:
    """Read ``(offset, bytes)`` ranges of a file into the page cache (charged to the calling process's group)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, n in ranges:
            for o in range(off, off + n, 1 << 24):
                os.pread(fd, min(1 << 24, off + n - o), o)
    finally:
        os.close(fd)


class PaperScalePageCache:
    """The naive row's bytes and compute at OPT 6.7B geometry, with the bytes paged in through mmap.

    Per token and layer, like ``paperscale.Replayer._dense_token`` for "naive": the layer's share of
    the non-FFN bytes (``nonffn_rows`` bundle-sized rows; taken from the *separate* file so that no
    byte stands in for two things), attention, the layer's whole FFN (``[d_ffn, 2 d_model]`` fp16
    bundles of the bundled file) and the dense FFN computed from the mapped rows, then the LM head.
    ``io_ms`` is the time to page the bytes in (one byte per page touched), ``compute_ms`` the rest.
    ``same_layer``: every layer maps layer 0's bytes (the overhead run: same memory and compute; with layer 0
    pre-cached by the parent it reads nothing and its group counts only the worker's own memory).
    """

    def __init__(self, cfg, same_layer: bool = False):
        from .paperscale import ResidentCompute
        self.cfg, self.same_layer = cfg, same_layer
        self.files, self.spans = naive_regions(cfg)
        # copy-on-write private mappings (writable for torch, never written): pages come from the page cache
        self.maps = {k: np.memmap(p, dtype=np.uint8, mode="c") for k, p in self.files.items()}
        self.compute = ResidentCompute(cfg, 0)

    def regions(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(non-FFN stand-in bytes, FFN bytes) of a layer, as uint8 views of the mappings."""
        l = 0 if self.same_layer else layer
        return tuple(self.maps[f][o:o + n] for f, (o, n) in zip(("separate", "bundled"), self.spans[l]))

    def token(self, t: int) -> dict:
        cfg, comp = self.cfg, self.compute
        io, r0, f0, t0 = 0.0, proc_read_bytes(), major_faults(), time.perf_counter()
        h = comp.x0.clone()
        for l in range(cfg.n_layers):
            standin, ffn = self.regions(l)
            ti = time.perf_counter()
            _touch(standin)
            io += time.perf_counter() - ti
            h = h + comp.attention(l, h, cfg.prompt_tokens + t)
            ti = time.perf_counter()
            _touch(ffn)
            io += time.perf_counter() - ti
            rows = torch.from_numpy(ffn.view(np.float16).view(np.ndarray)).view(cfg.d_ffn, 2 * cfg.d_model)
            h = h + comp.dense_ffn(rows, comp.bias[l], h)
        comp.logits(h)
        total = time.perf_counter() - t0
        return {"token": t, "io_ms": 1e3 * io, "mem_ms": 0.0, "compute_ms": 1e3 * (total - io), "total_ms": 1e3 * total,
                "bytes_read": proc_read_bytes() - r0, "reads": major_faults() - f0}


def paperscale_pagecache_rows(cfg, start: int, tokens: int, *, same_layer: bool = False, evict: bool = True,
                              reset_peak: bool = False) -> tuple[list[dict], dict]:
    """The page-cache worker's work at geometry ``cfg``: ``tokens`` tokens from trace position ``start``."""
    pc = PaperScalePageCache(cfg, same_layer=same_layer)
    files = list(pc.files.values())
    resident = evict_files(files) if evict else files_resident(files)
    release_free_memory()
    setup = own_group_usage(reset=True) if reset_peak else None
    with torch.inference_mode(), torch_threads(cfg.threads):
        rows = [pc.token(start + i) for i in range(tokens)]
    return rows, {"resident_at_start": resident, "setup_group": setup, "files": [str(f) for f in files]}


def paperscale_engine_rows(cfg, start: int, engine_methods, *, reset_peak: bool = False) -> tuple[list[dict], dict]:
    """The engine's paper-scale replay (``paperscale.Replayer``) for the named Table 2 rows, one block each."""
    from .paperscale import Replayer, flash_paths, matrix_rows, methods, trace_config
    from .traces import generate_trace
    trace = generate_trace(trace_config(cfg), progress=False)
    caps = matrix_rows(cfg, progress=False)
    wanted = [m for m in methods(cfg) if m.name in engine_methods]
    rows = []
    with torch.inference_mode(), torch_threads(cfg.threads), Replayer(cfg, trace, caps, flash_paths(cfg)) as rep:
        release_free_memory()
        setup = own_group_usage(reset=True) if reset_peak else None
        for m in wanted:
            rows += rep.block(m, start, cfg.sparse_tokens if m.kind == "sparse" else cfg.dense_tokens)
        io_mode = rep.io_mode
    return rows, {"setup_group": setup, "io_mode": io_mode}


def paperscale_worker_main(args) -> dict:
    from .config import paper_scale_config
    cfg, t0, t_start = paper_scale_config(), time.perf_counter(), time.time()
    if args.method == "pagecache":
        rows, info = paperscale_pagecache_rows(cfg, args.start, args.tokens, same_layer=args.same_layer,
                                               evict=not args.no_evict, reset_peak=args.reset_peak)
    else:
        rows, info = paperscale_engine_rows(cfg, args.start, args.engine_methods.split(","), reset_peak=args.reset_peak)
    return {"method": args.method, "rows": rows, "t_start": t_start, "t_end": time.time(),
            "wall_s": time.perf_counter() - t0, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            **info}


def _paperscale_command(method: str, start: int, tokens: int = 1, *, engine_methods: str = "bundling",
                        same_layer: bool = False, no_evict: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "flashlib.offload", "paperscale-worker", "--method", method, "--start", str(start),
           "--tokens", str(tokens), "--engine-methods", engine_methods, "--reset-peak"]
    return cmd + (["--same-layer"] if same_layer else []) + (["--no-evict"] if no_evict else [])


def paper_scale_side_by_side(cfg: PaperScaleOffloadConfig | None = None, *, engine_methods=("bundling", "naive"),
                             progress: bool = True) -> OffloadResult:
    """At OPT 6.7B geometry: the engine's replay (``engine_methods`` of Table 2, O_DIRECT) and the page-cache
    baseline under limit = ``dram_fraction`` x model bytes (fp16) + the worker's measured overhead, alternating.

    The flash files must exist (``paperscale.ensure_flash_files``, notebook 09). The overhead run maps
    every layer onto layer 0's bytes, pre-cached, so it has the same memory and compute but reads ~nothing.
    """
    from .config import paper_scale_config
    from .paperscale import flash_paths, model_parts
    cfg = cfg or paper_scale_offload_config()
    why = cgroup_unavailable_reason()
    if why:
        raise CgroupUnavailable(why)
    pcfg = paper_scale_config()
    missing = [str(p) for p in flash_paths(pcfg).values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"paper-scale flash files missing: {missing}; run notebook 09 "
                                "(paperscale.ensure_flash_files) first")
    model_bytes = sum(model_parts(pcfg).values())
    budget = int(cfg.dram_fraction * model_bytes)
    files, spans = naive_regions(pcfg)
    for name, span in zip(("separate", "bundled"), spans[0]):
        precache_ranges(files[name], [span])                 # layer 0's bytes, charged to this process
    ov = run_in_group(_paperscale_command("pagecache", 0, 1, same_layer=True, no_evict=True), None,
                      name="ps-overhead", poll_seconds=0.5)
    res = _check(ov, "paper-scale page cache (overhead)")
    overhead = max(ov.group["max_usage_bytes"], (res.get("setup_group") or {}).get("max_usage_bytes", 0))
    if progress:
        print(f"[offload] paper-scale page-cache overhead {overhead / 2**30:.2f} GiB "
              f"(read {sum(r['bytes_read'] for r in res['rows']) / 1e6:.0f} MB)", flush=True)
    steps, runs, samples = [], [], []
    order = ["engine", "pagecache"]
    for rnd in range(cfg.rounds):
        for name in order[rnd % 2:] + order[:rnd % 2]:
            limit = budget + overhead if name == "pagecache" else None
            start = rnd * (cfg.pagecache_tokens + pcfg.window_k + pcfg.sparse_tokens)
            cmd = _paperscale_command(name, start, cfg.pagecache_tokens, engine_methods=",".join(engine_methods))
            run = run_in_group(cmd, limit, name=f"ps-{name}", poll_seconds=0.25)
            res = _check(run, f"paper-scale {name}")
            d = pd.DataFrame(res["rows"])
            if name == "pagecache":
                d = d.assign(method="pagecache")
            steps.append(d.assign(round=rnd, worker=name))
            samples.append(run.samples.assign(t=run.samples["time"] - res["t_start"], worker=name, round=rnd))
            runs.append({"worker": name, "round": rnd, "limit_bytes": limit, "budget_bytes": budget,
                         "overhead_bytes": overhead if name == "pagecache" else None,
                         "peak_bytes": run.group["max_usage_bytes"], "failcnt": run.group["failcnt"],
                         "oom_kill": run.group["oom_kill"], "resident_at_start": res.get("resident_at_start"),
                         "peak_rss_bytes": res["peak_rss_bytes"], "wall_s": run.wall_s, "io_mode": res.get("io_mode")})
            if progress:
                print(f"[offload] paper scale round {rnd} {name}: "
                      + ", ".join(f"{m} {g['total_ms'].median():.0f} ms" for m, g in d.groupby("method"))
                      + f"; peak {run.group['max_usage_bytes'] / 2**30:.2f} GiB, failcnt {run.group['failcnt']}",
                      flush=True)
    meta = {"model": "OPT 6.7B geometry (synthetic weights)", "budget_bytes": budget, "model_bytes": model_bytes,
            "overhead_bytes": overhead, "n_layers": pcfg.n_layers, "rounds": cfg.rounds}
    return OffloadResult(pd.concat(steps, ignore_index=True), pd.DataFrame(runs), pd.DataFrame(
        [{"method": "pagecache", "overhead_bytes": overhead, "group_peak_bytes": ov.group["max_usage_bytes"]}]),
        pd.concat(samples, ignore_index=True), meta)


def summarize_paper_scale(result: OffloadResult) -> pd.DataFrame:
    """Per method at paper geometry: median io/compute/total ms per token, GB read per token, memory."""
    d = result.steps
    g = d.groupby("method", sort=False)
    out = pd.DataFrame({**{f"{c}_median": g[c].median() for c in ("io_ms", "mem_ms", "compute_ms", "total_ms")},
                        "gb_read_per_token": g["bytes_read"].mean() / 1e9, "tokens": g.size()}).reset_index()
    runs = result.runs.groupby("worker")
    mem = {"pagecache": runs.get_group("pagecache"), "engine": runs.get_group("engine")}
    out["worker"] = np.where(out["method"] == "pagecache", "pagecache", "engine")
    out["limit_gb"] = [mem[w]["limit_bytes"].iloc[0] / 1e9 if w == "pagecache" else np.nan for w in out["worker"]]
    out["peak_gb"] = [mem[w]["peak_bytes"].max() / 1e9 for w in out["worker"]]
    out["failcnt_min"] = [mem[w]["failcnt"].min() for w in out["worker"]]
    ref = out.loc[out["method"] == "bundling", "total_ms_median"]
    if len(ref):
        out["bundling_speedup"] = out["total_ms_median"] / ref.item()
    return out


# --- paper vs ours -------------------------------------------------------------------------------

def _ms(summary: pd.DataFrame, method: str) -> float:
    row = summary.loc[summary["method"] == method, "ms_per_token_median"]
    return float(row.iloc[0]) if len(row) else float("nan")


def paper_vs_ours_rows(summary: pd.DataFrame | None, meta: dict | None, paper_scale: pd.DataFrame | None = None,
                       why_missing: str | None = None) -> list[tuple]:
    """The baselines' lines of the closing table: (quantity, paper, ours, note)."""
    from . import paper
    rows = [("baselines", "naive / hybrid loaders; OS caching disabled on purpose (paper-facts §4, item 10)",
             "also mmap + page cache (llama.cpp-style) and accelerate disk offload, each under a cgroup-v1 "
             "memory limit = DRAM budget + the worker's own measured memory", "new")]
    if summary is None:
        return rows + [("flashlib vs page cache / accelerate", "not measured", "not run", why_missing or "")]
    fl = _ms(summary, "flashlib")
    st = summary.set_index("method")
    rows.append(("DRAM budget (ReLU OPT)", f"~{paper.DRAM_BUDGET_FRACTION:.0%} of the model",
                 f"{meta['budget_bytes'] / meta['model_bytes']:.0%} ({meta['budget_bytes'] / 1e6:.1f} MB)",
                 meta.get("budget_note", "")))
    for m, target in (("pagecache", 3), ("accelerate", 10)):
        if m in st.index:
            rows.append((f"flashlib speed-up over {m} (ms/token, median)", "not measured",
                         f"{_ms(summary, m) / fl:.1f}x ({_ms(summary, m):.1f} vs {fl:.1f} ms)",
                         f"acceptance >= {target}x; failcnt {st.loc[m, 'failcnt_min']}: the limit reclaimed pages"))
    for m in [m for m in st.index if "@" in m]:
        ok = st.loc[m, "status"] == "ok"
        rows.append((f"{m} (the paper's half of the model)", "-",
                     f"{_ms(summary, m):.1f} ms/token ({_ms(summary, m) / fl:.1f}x flashlib's)" if ok
                     else st.loc[m, "status"],
                     "the engine cannot run at 50% of this model: its resident part plus the window k=5 is larger"))
    if paper_scale is not None and len(paper_scale):
        ps = paper_scale.set_index("method")
        naive = f"; O_DIRECT naive {ps.loc['naive', 'total_ms_median']:.0f} ms" if "naive" in ps.index else ""
        rows.append(("OPT 6.7B geometry: page cache vs engine (ms/token)",
                     f"naive {paper.TABLE3_ROWS[0][-1]} vs All {paper.TABLE3_ROWS[1][-1]} ms "
                     f"({paper.CPU_SPEEDUP_OPT:.2f}x, M1 Max CPU)",
                     f"page cache {ps.loc['pagecache', 'total_ms_median']:.0f} vs engine "
                     f"{ps.loc['bundling', 'total_ms_median']:.0f} ms = {ps.loc['pagecache', 'bundling_speedup']:.1f}x"
                     + naive, f"page cache limited to {ps.loc['pagecache', 'limit_gb']:.1f} GB (half the model + "
                     "its own memory); accelerate cannot run at this geometry here (no 13 GB fp16 checkpoint, "
                     "CPU fp16 matmuls 5-9x slower than fp32)"))
    return rows


# --- command line -------------------------------------------------------------------------------

def _parser():
    import argparse
    ap = argparse.ArgumentParser(prog="python -m flashlib.offload", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="one run of one method (prints a JSON result line)")
    w.add_argument("--method", choices=METHODS, required=True)
    w.add_argument("--model", default="relu-opt")
    w.add_argument("--folder", type=Path, default=None, help="checkpoint folder (page cache, accelerate)")
    w.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    w.add_argument("--new-tokens", type=int, default=8)
    w.add_argument("--threads", type=int, default=1)
    w.add_argument("--io-threads", type=int, default=32)
    w.add_argument("--budget", type=int, default=None, help="DRAM budget in bytes (flashlib, accelerate)")
    w.add_argument("--offload-folder", type=Path, default=None)
    w.add_argument("--flash-root", default=None)
    w.add_argument("--no-evict", action="store_true", help="keep the weight files' cached pages (overhead runs)")
    w.add_argument("--reset-peak", action="store_true", help="restart the group's peak/failcnt after setup")
    p = sub.add_parser("paperscale-worker", help="one run at OPT 6.7B geometry (page cache or the engine replay)")
    p.add_argument("--method", choices=("pagecache", "engine"), required=True)
    p.add_argument("--start", type=int, default=0, help="first trace token")
    p.add_argument("--tokens", type=int, default=1, help="page cache: tokens to run")
    p.add_argument("--engine-methods", default="bundling", help="engine: Table 2 rows, comma-separated")
    p.add_argument("--same-layer", action="store_true", help="map every layer onto layer 0 (overhead run)")
    p.add_argument("--no-evict", action="store_true")
    p.add_argument("--reset-peak", action="store_true")
    b = sub.add_parser("bench", help="flashlib vs page cache vs accelerate, side by side, under cgroup limits")
    b.add_argument("--model", default="relu-opt")
    b.add_argument("--repeats", type=int, default=None)
    b.add_argument("--paper-scale", action="store_true", help="also the page-cache baseline at OPT 6.7B geometry")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "worker":
        print(RESULT_MARK + json.dumps(worker_main(args), default=float), flush=True)
    elif args.command == "paperscale-worker":
        print(RESULT_MARK + json.dumps(paperscale_worker_main(args), default=float), flush=True)
    else:
        cfg = offload_config()
        if args.repeats:
            cfg = dataclasses.replace(cfg, repeats=args.repeats)
        pd.set_option("display.width", 200)
        try:
            res = side_by_side(args.model, cfg)
        except CgroupUnavailable as e:
            print(f"[offload] skipped: {e}", file=sys.stderr)
            return 0
        print(summarize(res).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        if args.paper_scale:
            print(summarize_paper_scale(paper_scale_side_by_side()).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
