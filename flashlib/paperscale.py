"""Paper scale: OPT 6.7B's geometry on this machine's disk (paper sec 4.2 Table 2, sec 5 Table 3, Fig 1).

OPT 6.7B cannot run here, but its I/O is a matter of shapes and byte counts, which we reproduce
exactly, and its compute is a matter of matrix sizes, which we run at the true size:

1. Flash files (``ensure_flash_files``): synthetic fp16 FFN weights with OPT 6.7B's shapes
   (32 layers x 16384 neurons, d_model 4096: a vector is 8 KiB, a bundle 16 KiB), streamed layer by
   layer through ``layout.write_flash_file`` in the bundled and the separate layout (8.6 GB each),
   and reused while their manifests match and a spot check of re-generated rows passes. Weights
   are random bits shaped into fp16 values of magnitude ~1/sqrt(d_model) (``ffn_layer``): drawing
   N(0, 1) values, as ``layout.synthetic_layers`` does, takes ~10 s per layer on this machine (over
   10 minutes for both files); random bits take a fraction of a second.
2. Traces: ``traces.generate_trace`` at the paper preset gives every token's predicted set per
   layer; a second trace (seed + 1) sizes the DRAM matrices (the paper's Req_i), as the paper
   sizes them on other text than it measures.
3. Replay (``replay``): per token and layer, the engine's machinery, in the order of a real layer:
   attention -> predictor (synthetic low rank; the set itself comes from the trace) ->
   ``SlidingWindow.update`` -> ``FlashStore.read`` (O_DIRECT, 32 threads, file evicted before
   every block) -> ``NeuronMatrix.update`` (evict + load in one pass) -> sparse FFN over the
   resident rows (restricted to the token's predicted set); after the last layer the tied LM head.
   Naive and hybrid read densely (1 MiB reads over 32 threads) and run the dense FFN.

What is synthetic, and why the timings still hold:
- Resident (non-FFN) weights: the paper keeps attention and embeddings in DRAM (35% of the model).
  We hold synthetic attention weights for ``resident_copies`` layers and cycle through them, so
  compute runs at the true size every layer (two fp32 copies, 537 MB, exceed the CPU's 300 MiB
  L3, so a reused copy is not served from cache) while DRAM holds 2 layers' worth, not 32.
  Predictor weights (rank 128 / 1024) are one copy per rank. The KV cache is per layer.
- The naive baseline reads the non-FFN bytes from flash every token too: we read the same number
  of bytes, in the same 1 MiB chunks, from another layer of the bundled file (stand-in bytes: the
  same I/O, other content) instead of writing a 4.7 GB attention file that nothing else needs.
- Hybrid keeps the non-FFN part and the last neurons of every layer resident and streams the
  first ``hybrid_stream_rows`` neurons of each layer, so that half of the model's bytes stream.
- Precision: the flash file is fp16 (Table 2's 16-bit bytes: 13.4 GB per naive token, 16 KiB
  bundles); DRAM copies and compute are fp32 (``dram_dtype``), like the paper's CPU runs. Insert
  converts each loaded bundle to fp32 (counted as memory management; exact, fp16 is a subset of
  fp32); naive and hybrid convert the rows they stream before the dense FFN (counted as compute).
  fp16 compute is not an option on this CPU: torch's fp16 matrix-vector product is 5-9x slower
  than fp32 here. Table 2's DRAM column counts 16-bit bytes, as the paper's does; the process's
  real peak (fp32 matrices) is reported beside it.

Methods alternate block by block: each round runs every method once (rotated order) on the same
trace tokens, each block starting from an empty window with ``max(k, 1)`` untimed warm-up tokens.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import costmodel, layout, paper, paths
from .config import (FLASH_FILE_PRESETS, TRACE_PRESETS, PaperScaleConfig, StoreConfig, TraceConfig,
                     smoke_mode)
from .dram import DramBudget, NeuronMatrix, capacity_for_window
from .store import ChecksumError, FlashStore
from .traces import torch_threads
from .traces import Trace, generate_trace, prediction_statistics, trace_statistics
from .window import SlidingWindow, window_capacity

LAYOUTS = ("bundled", "separate")
METHOD_NAMES = ("naive", "hybrid", "predictor", "windowing", "bundling")   # Table 2's rows, in order
GENERATOR = "random-bits-fp16-v1"      # recorded in the manifest: another generator = another file
FILE_DTYPE = "float16"                 # Table 2 is 16 bit: 13.4 GB per naive token


# --- geometry and bytes ------------------------------------------------------------------------

def predictor_ranks(cfg: PaperScaleConfig) -> list[int]:
    """Rank of each layer's low-rank predictor (Table 4: 128, the last 4 layers 1024)."""
    first_sensitive = cfg.n_layers - cfg.predictor_sensitive_layers
    return [cfg.predictor_rank_sensitive if l >= first_sensitive else cfg.predictor_rank
            for l in range(cfg.n_layers)]


def model_parts(cfg: PaperScaleConfig, itemsize: int = 2) -> dict[str, int]:
    """Bytes of each part of an OPT model of this geometry (fp16: 13.3 GB for OPT 6.7B, Table 2's 13.4).

    Per layer: q, k, v, o (4 d^2 + 4 d biases), fc1 + fc2 (2 d d_ffn + d_ffn + d biases), two
    layer norms (4 d); plus token and position embeddings (the LM head is tied) and a final norm.
    """
    L, d, f = cfg.n_layers, cfg.d_model, cfg.d_ffn
    return {"ffn": L * 2 * d * f * itemsize,
            "attention": L * 4 * d * d * itemsize,
            "embeddings": (cfg.vocab_size + cfg.max_positions) * d * itemsize,
            "norms and biases": (L * (4 * d + f + d + 4 * d) + 2 * d) * itemsize}


def predictor_bytes(cfg: PaperScaleConfig, itemsize: int = 2) -> int:
    """All predictors: d_model x r + r x d_ffn + d_ffn per layer (2.35% of OPT 6.7B; App. C.1 says 1.25%)."""
    return sum(cfg.d_model * r + r * cfg.d_ffn + cfg.d_ffn for r in predictor_ranks(cfg)) * itemsize


def model_bytes(cfg: PaperScaleConfig) -> costmodel.ModelBytes:
    """The cost model's view of this geometry at fp16 (FFN share 64.5%; the paper's is 64.62%)."""
    parts = model_parts(cfg)
    total = sum(parts.values())
    return costmodel.ModelBytes(f"OPT 6.7B geometry, {cfg.n_layers} layers (synthetic)", total,
                                parts["ffn"] / total, predictor_bytes(cfg) / total,
                                cfg.d_model * np.dtype(FILE_DTYPE).itemsize, 2)


def bundle_bytes(cfg: PaperScaleConfig) -> int:
    """One neuron's up and down vectors on flash: 2 x d_model x 2 B = 16 KiB at paper scale."""
    return 2 * cfg.d_model * np.dtype(FILE_DTYPE).itemsize


def nonffn_rows(cfg: PaperScaleConfig) -> int:
    """Bundle-sized rows per layer that carry the layer's share of the non-FFN bytes (naive reads)."""
    parts = model_parts(cfg)
    return math.ceil((sum(parts.values()) - parts["ffn"]) / cfg.n_layers / bundle_bytes(cfg))


def hybrid_stream_rows(cfg: PaperScaleConfig) -> int:
    """Neurons per layer that hybrid streams: (1 - dram_fraction) of the model's bytes, all from the FFN."""
    total = sum(model_parts(cfg).values())
    rows = round((1 - cfg.dram_fraction) * total / (cfg.n_layers * bundle_bytes(cfg)))
    return int(min(max(rows, 0), cfg.d_ffn))


# --- synthetic weights and the flash files -------------------------------------------------------

def weights_name(cfg: PaperScaleConfig) -> str:
    """Model name recorded in the manifest; a file is reused only when it matches."""
    return f"opt67b-geometry/{GENERATOR}/seed{cfg.weight_seed}"


def ffn_layer(cfg: PaperScaleConfig, layer: int) -> dict[str, np.ndarray]:
    """Synthetic fp16 ``{"up", "down"}: [d_ffn, d_model]`` of one layer (deterministic per seed and layer).

    Random sign and mantissa, fixed exponent: |w| in [2^e, 2^(e+1)) with 2^(e+1) ~ 1/sqrt(d_model),
    so x @ up.T stays O(1) for a normalised x. Cheap (random bytes and two bit operations).
    """
    rng = np.random.default_rng([cfg.weight_seed, layer])
    exponent = max(1, 14 - round(math.log2(cfg.d_model) / 2))       # 8 at d_model 4096: [2^-7, 2^-6)
    out = {}
    for name in ("up", "down"):
        bits = np.frombuffer(rng.bytes(cfg.d_ffn * cfg.d_model * 2), np.uint16).reshape(cfg.d_ffn, cfg.d_model)
        out[name] = ((bits & np.uint16(0x83FF)) | np.uint16(exponent << 10)).view(np.float16)
    return out


def ffn_bias(cfg: PaperScaleConfig, layer: int) -> np.ndarray:
    """Synthetic fc1 bias ``[d_ffn]`` fp16 (resident, as in the paper's matrix; N(0, 0.01^2))."""
    rng = np.random.default_rng([cfg.weight_seed, layer, 1])
    return (0.01 * rng.standard_normal(cfg.d_ffn, np.float32)).astype(np.float16)


def flash_folder(cfg: PaperScaleConfig, smoke: bool | None = None) -> Path:
    """``paths.flash_dir() / cfg.folder``; in smoke mode a throw-away folder under build/."""
    smoke = smoke_mode() if smoke is None else smoke
    return (paths.BUILD / "smoke" / "flash" if smoke else paths.flash_dir()) / cfg.folder


def flash_paths(cfg: PaperScaleConfig, smoke: bool | None = None) -> dict[str, Path]:
    return {lay: flash_folder(cfg, smoke) / f"ffn-{lay}.safetensors" for lay in LAYOUTS}


def file_bytes(cfg: PaperScaleConfig, lay: str) -> int:
    """Size of one layout's file (the writer's own plan, header included)."""
    src = layout.source_from_arrays(iter(()), name=weights_name(cfg), n_layers=cfg.n_layers,
                                    d_model=cfg.d_model, d_ffn=cfg.d_ffn)
    return layout.plan_file(src, lay, FILE_DTYPE, FLASH_FILE_PRESETS[cfg.flash_preset])["file_bytes"]


def check_flash_file(path: Path, cfg: PaperScaleConfig, lay: str, verify: str | None = None) -> list[str]:
    """Why ``path`` cannot be reused for ``cfg`` (empty list: it can).

    Always: the manifest's model name (generator and seed), layout, dtype, geometry and row
    alignment, and the file's length. ``verify``: "manifest" nothing more; "spot" re-generates the
    first and last layers and compares 66 rows read back through FlashStore; "full" re-hashes
    every layer against the manifest's checksums (reads the whole file).
    """
    verify = verify or cfg.verify
    if verify not in ("manifest", "spot", "full"):
        raise ValueError(f"verify must be 'manifest', 'spot' or 'full', got {verify!r}")
    if not path.exists() or not layout.manifest_path(path).exists():
        return ["missing"]
    m = json.loads(layout.manifest_path(path).read_text())
    want = {"model_name": weights_name(cfg), "layout": lay, "dtype": FILE_DTYPE, "n_layers": cfg.n_layers,
            "d_model": cfg.d_model, "d_ffn": cfg.d_ffn, "vector_names": ["up", "down"],
            "row_alignment": FLASH_FILE_PRESETS[cfg.flash_preset].row_alignment}
    problems = [f"manifest {k}={m.get(k)!r}, want {v!r}" for k, v in want.items() if m.get(k) != v]
    if not problems and path.stat().st_size != m.get("file_bytes"):
        problems.append(f"{path.stat().st_size} bytes on disk, manifest says {m.get('file_bytes')}")
    if problems or verify == "manifest":
        return problems
    with FlashStore(path) as store:
        if verify == "full":
            try:
                store.verify(progress=True)
            except ChecksumError as e:
                problems.append(str(e))
            return problems
        ids = np.unique(np.r_[0, cfg.d_ffn - 1, np.random.default_rng(0).integers(0, cfg.d_ffn, 64)])
        buf = store.new_buffer(ids.size)
        for layer in sorted({0, cfg.n_layers - 1}):
            store.read(layer, ids, buf)
            ref, got = ffn_layer(cfg, layer), buf.vectors(ids.size)
            if any(not np.array_equal(got[v].view(np.uint16), ref[v][ids].view(np.uint16)) for v in ref):
                problems.append(f"layer {layer}: rows differ from the synthetic weights")
    return problems


def _check_free_space(path: Path, need: int) -> None:
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free + (path.stat().st_size if path.exists() else 0)
    if free < need + (1 << 30):
        raise OSError(f"writing {path} needs {need / 1e9:.1f} GB (+1 GB slack) but {folder} has "
                      f"{free / 1e9:.1f} GB free: free some space (`make clean-flash` removes data/flash) "
                      "or point FLASHLIB_FLASH_DIR at a larger disk")


def ensure_flash_files(cfg: PaperScaleConfig, smoke: bool | None = None, progress: bool = True) -> pd.DataFrame:
    """Both layouts' files for ``cfg``: reused when ``check_flash_file`` passes, else (re)written.

    Written layer by layer (one layer, 268 MB at paper scale, in memory at a time), fsynced,
    evicted from the page cache. Returns layout | path | file_gb | action | seconds | check.
    """
    rows = []
    for lay, path in flash_paths(cfg, smoke).items():
        t0 = time.perf_counter()
        problems = check_flash_file(path, cfg, lay)
        action = "reused"
        if problems:
            _check_free_space(path, file_bytes(cfg, lay))
            src = layout.source_from_arrays((ffn_layer(cfg, l) for l in range(cfg.n_layers)),
                                            name=weights_name(cfg), n_layers=cfg.n_layers,
                                            d_model=cfg.d_model, d_ffn=cfg.d_ffn)
            layout.write_flash_file(src, path, layout=lay, dtype=FILE_DTYPE,
                                    config=FLASH_FILE_PRESETS[cfg.flash_preset], progress=progress)
            action = "written" if problems == ["missing"] else "rewritten: " + "; ".join(problems)
        rows.append({"layout": lay, "path": str(path), "file_gb": path.stat().st_size / 1e9, "action": action,
                     "seconds": time.perf_counter() - t0,
                     "check": f"{cfg.verify} check passed" if action == "reused" else "written by this run"})
    return pd.DataFrame(rows)


# --- traces and matrix sizes ------------------------------------------------------------------------

def trace_config(cfg: PaperScaleConfig, seed: int | None = None) -> TraceConfig:
    """The paper preset of ``traces`` at this geometry and length (identical to it at full scale)."""
    return dataclasses.replace(TRACE_PRESETS["paper"], n_layers=cfg.n_layers, d_ffn=cfg.d_ffn,
                               n_tokens=cfg.n_tokens, seed=cfg.trace_seed if seed is None else seed)


def matrix_rows(cfg: PaperScaleConfig, progress: bool = True) -> dict[int, np.ndarray]:
    """Rows each layer's DRAM matrix needs for window 0 and ``window_k`` ``{k: [n_layers]}`` (Req_i).

    Sized on a second trace (seed + 1, same length) plus ``capacity_margin``; a token that needs more
    in the replay shrinks its window (``SlidingWindow.shrink_to_fit``) and is counted.
    """
    sizing = generate_trace(trace_config(cfg, cfg.trace_seed + 1), progress=progress).predicted
    return {k: np.array([capacity_for_window(int(p), cfg.d_ffn, cfg.capacity_margin)
                         for p in window_capacity(sizing, k)]) for k in sorted({0, cfg.window_k})}


# --- resident weights and compute ---------------------------------------------------------------------

def _uniform(shape, scale: float, dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32).uniform_(-scale, scale, generator=gen).to(dtype)


class ResidentCompute:
    """Synthetic resident weights and every compute step of a token (attention, predictor, FFN, LM head).

    ``x`` vectors are fp32 ``[d_model]``; matrix products run in ``cfg.dram_dtype``. Only the cost
    matters here: the values are random (see the module docstring for what is shared).
    """

    def __init__(self, cfg: PaperScaleConfig, hybrid_resident_rows: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.cfg, self.dtype = cfg, getattr(torch, cfg.dram_dtype)
        d, f, c = cfg.d_model, cfg.d_ffn, cfg.resident_copies
        s = d ** -0.5
        self.attn = [_uniform((4 * d, d), s, self.dtype, g) for _ in range(c)]   # rows: q | k | v | o
        kv_len = cfg.prompt_tokens + cfg.n_tokens
        self.kv = [_uniform((2, kv_len, d), 1.0, self.dtype, g) for _ in range(cfg.n_layers)]
        self.pred = {r: (_uniform((r, d), s, self.dtype, g), _uniform((f, r), r ** -0.5, self.dtype, g))
                     for r in sorted(set(predictor_ranks(cfg)))}                 # A [r, d], B [d_ffn, r]
        self.ranks = predictor_ranks(cfg)
        self.lm_head = _uniform((cfg.vocab_size, d), s, self.dtype, g) if cfg.lm_head else None
        self.bias = [torch.from_numpy(ffn_bias(cfg, l)).to(self.dtype) for l in range(cfg.n_layers)]
        n = hybrid_resident_rows
        self.hybrid_rows = [_uniform((n, 2 * d), s, self.dtype, g) for _ in range(c)] if n else []
        self.x0 = torch.randn(d, generator=g)                                    # the token's embedding
        self._stage: torch.Tensor | None = None     # [d_ffn, 2 d_model] dram-dtype copy of streamed rows

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, h.shape).to(self.dtype)

    def attention(self, layer: int, h: torch.Tensor, pos: int) -> torch.Tensor:
        """One token's self-attention at position ``pos``: q/k/v/o projections and softmax over the KV cache."""
        d, H = self.cfg.d_model, self.cfg.n_heads
        w = self.attn[layer % len(self.attn)]
        q, k, v = (w[: 3 * d] @ self.norm(h)).view(3, d)
        kv = self.kv[layer]
        kv[0, pos], kv[1, pos] = k, v
        keys, vals = kv[0, : pos + 1].view(pos + 1, H, d // H), kv[1, : pos + 1].view(pos + 1, H, d // H)
        scores = torch.einsum("nhd,hd->hn", keys, q.view(H, d // H)).float() * (d // H) ** -0.5
        ctx = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1).to(self.dtype), vals).reshape(d)
        return (w[3 * d:] @ ctx).float()

    def predictor(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The low-rank predictor's cost (d_model -> r -> d_ffn, sigmoid > 0.5); the replay's set comes from the trace."""
        a, b = self.pred[self.ranks[layer]]
        return (b @ (a @ self.norm(h))) > 0

    def sparse_ffn(self, matrix: NeuronMatrix, h: torch.Tensor, active: np.ndarray) -> torch.Tensor:
        """FFN over every resident row (paper sec 3.3), restricted to the ``active`` ids (exact zeros for ReLU)."""
        return matrix.ffn(self.norm(h), act=torch.relu, only=active).float()

    def dense_ffn(self, rows: torch.Tensor, bias: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """relu(x @ up.T + b) @ down over bundles ``rows [n, 2 d_model]`` (naive and hybrid); rows in
        another dtype (the read buffer's fp16) are first converted into a preallocated staging matrix."""
        d = self.cfg.d_model
        if rows.dtype != self.dtype:
            if self._stage is None:
                self._stage = torch.empty(self.cfg.d_ffn, 2 * d, dtype=self.dtype)
            rows = self._stage[: rows.shape[0]].copy_(rows)
        x = self.norm(h)
        return (torch.relu(rows[:, :d] @ x + bias) @ rows[:, d:]).float()

    def logits(self, h: torch.Tensor) -> torch.Tensor | None:
        return None if self.lm_head is None else self.lm_head @ self.norm(h)


# --- methods and the replay -----------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """One row of Table 2: how a token gets its FFN weights."""

    name: str
    kind: str            # "dense" (naive, hybrid) or "sparse"
    layout: str          # flash file it reads
    k: int | None        # sparse: window (0 = none)
    flags: tuple         # hybrid, predictor, windowing, bundling

    @property
    def warmup(self) -> int:
        """Untimed tokens at the start of a block: the window fills up (dense methods keep no state)."""
        return 0 if self.kind == "dense" else max(self.k, 1)


def methods(cfg: PaperScaleConfig) -> tuple[Method, ...]:
    """Table 2's five rows: naive, hybrid, +predictor (k=0, separate), +windowing (k, separate), +bundling."""
    k = cfg.window_k
    return (Method("naive", "dense", "bundled", None, (False, False, False, False)),
            Method("hybrid", "dense", "bundled", None, (True, False, False, False)),
            Method("predictor", "sparse", "separate", 0, (True, True, False, False)),
            Method("windowing", "sparse", "separate", k, (True, True, True, False)),
            Method("bundling", "sparse", "bundled", k, (True, True, True, True)))


@dataclass
class _Tally:
    """One token's time split and work (seconds and counts)."""

    io_s: float = 0.0
    mem_s: float = 0.0
    loaded: int = 0
    evicted: int = 0
    shrunk: int = 0
    truncated: int = 0


class Replayer:
    """Drives the window, the DRAM matrices and the flash stores from a trace (one method at a time).

    One ``NeuronMatrix`` per layer is allocated once, with the largest capacity any sparse method
    needs, and emptied (``delete`` of every resident row) at the start of each block; the
    capacity each method is allowed is its own (``capacities[k]``). One aligned read buffer of
    ``d_ffn`` slots serves every read (both layouts have the same slot size when rows are unpadded).
    """

    def __init__(self, cfg: PaperScaleConfig, trace: Trace, capacities: dict[int, np.ndarray],
                 files: dict[str, Path], store_config: StoreConfig = StoreConfig(), io_mode: str | None = None):
        self.cfg, self.trace, self.capacities = cfg, trace, capacities
        if trace.predicted.shape[1:] != (cfg.n_layers, cfg.d_ffn):
            raise ValueError(f"trace is {trace.predicted.shape[1:]} (layers, d_ffn); the config wants "
                             f"({cfg.n_layers}, {cfg.d_ffn})")
        self.stores = {lay: FlashStore(files[lay], store_config, io_mode=io_mode) for lay in LAYOUTS}
        vec = cfg.d_model * np.dtype(FILE_DTYPE).itemsize
        if {s.slot_bytes for s in self.stores.values()} != {2 * vec} or self.stores["separate"].row_stride != vec:
            raise ValueError("the paper-scale replay needs unpadded rows (a row_alignment that divides "
                             f"d_model x 2 B = {vec} B); choose another flash_preset")
        self.buf = self.stores["bundled"].new_buffer(cfg.d_ffn)
        dt = getattr(torch, cfg.dram_dtype)
        alloc = np.max(np.stack(list(capacities.values())), axis=0)
        self.matrices = [NeuronMatrix(int(alloc[l]), cfg.d_model, cfg.d_ffn, ("up", "down"), ("bias",), dtype=dt)
                         for l in range(cfg.n_layers)]
        self.n_stream = hybrid_stream_rows(cfg)
        self.compute = ResidentCompute(cfg, cfg.d_ffn - self.n_stream)
        self.io_mode = self.stores["bundled"].io_mode

    def close(self) -> None:
        for s in self.stores.values():
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- one block of tokens --
    def block(self, m: Method, start: int, n_timed: int) -> list[dict]:
        """Run ``m`` on trace tokens ``start ..`` from an empty state: warm-up, then ``n_timed`` timed tokens."""
        for s in self.stores.values():
            s.evict()
        wins = None
        if m.kind == "sparse":
            wins = [SlidingWindow(self.cfg.d_ffn, m.k) for _ in range(self.cfg.n_layers)]
            for mat in self.matrices:
                mat.delete(mat.resident_ids())
        rows = []
        for i in range(m.warmup + n_timed):
            t, timed = start + i, i >= m.warmup
            row = self._sparse_token(m, wins, t, timed) if wins else self._dense_token(m, t)
            if timed:
                rows.append({"method": m.name, "token": t, **row})
        return rows

    def _io_totals(self) -> np.ndarray:
        c = [s.counters for s in self.stores.values()]
        return np.array([sum(x.reads for x in c), sum(x.bytes_read for x in c), sum(x.neurons for x in c),
                         sum(x.io_seconds for x in c)], dtype=np.float64)

    def _row(self, t0: float, cpu0: float, io0: np.ndarray, tally: _Tally, sparse: bool) -> dict:
        total = time.perf_counter() - t0
        reads, nbytes, neurons, pool_s = self._io_totals() - io0
        return {"io_ms": 1e3 * tally.io_s, "io_pool_ms": 1e3 * pool_s, "mem_ms": 1e3 * tally.mem_s,
                "compute_ms": 1e3 * (total - tally.io_s - tally.mem_s), "total_ms": 1e3 * total,
                "cpu_ms": 1e3 * (time.process_time() - cpu0), "load1": os.getloadavg()[0],
                "bytes_read": int(nbytes), "reads": int(reads), "neurons_read": int(neurons),
                "neurons_loaded": tally.loaded, "neurons_evicted": tally.evicted, "shrunk": tally.shrunk,
                "truncated": tally.truncated,
                "rows_resident": sum(mat.num_used for mat in self.matrices) if sparse else 0}

    def _read(self, store: FlashStore, layer: int, ids: np.ndarray, tally: _Tally) -> None:
        t = time.perf_counter()
        store.read(layer, ids, self.buf)
        tally.io_s += time.perf_counter() - t

    def _sparse_token(self, m: Method, wins: list, t: int, timed: bool) -> dict:
        """Per layer: attention, predictor | window | read | update (evict + load) | sparse FFN; then the LM head."""
        cfg, comp, store = self.cfg, self.compute, self.stores[m.layout]
        tally, io0, cpu0, t0 = _Tally(), self._io_totals(), time.process_time(), time.perf_counter()
        h = comp.x0.clone()
        for l in range(cfg.n_layers):
            if timed:
                h = h + comp.attention(l, h, cfg.prompt_tokens + t)
                comp.predictor(l, h)
            tm = time.perf_counter()
            active = np.flatnonzero(self.trace.predicted[t, l])              # [n_active] predicted ids
            cap = int(self.capacities[m.k][l])
            if active.size > cap:                                            # the token alone overflows
                active, tally.truncated = active[:cap], tally.truncated + 1
            win, mat = wins[l], self.matrices[l]
            step = win.update(active)
            gone = step.evict
            if step.n_resident > cap:
                gone = np.union1d(gone, win.shrink_to_fit(cap))     # sorted: the compiled update takes it
                tally.shrunk += 1
            tally.mem_s += time.perf_counter() - tm
            self._read(store, l, step.load, tally)
            tm = time.perf_counter()
            ids = torch.from_numpy(step.load)            # evict + load in one pass, as the engine does
            mat.update(gone, step.load, self.buf.bundles(step.load.size, torch=True), {"bias": comp.bias[l][ids]})
            tally.mem_s += time.perf_counter() - tm
            tally.loaded += step.load.size
            tally.evicted += gone.size
            if timed:
                h = h + comp.sparse_ffn(mat, h, active)
        if timed:
            comp.logits(h)
        return self._row(t0, cpu0, io0, tally, sparse=True)

    def _dense_token(self, m: Method, t: int) -> dict:
        """Naive: read the layer's non-FFN (stand-in) bytes and its whole FFN; hybrid: stream n_stream neurons."""
        cfg, comp = self.cfg, self.compute
        bundled = self.stores["bundled"]
        tally, io0, cpu0, t0 = _Tally(), self._io_totals(), time.process_time(), time.perf_counter()
        n = cfg.d_ffn if m.name == "naive" else self.n_stream
        ids = np.arange(n)
        h = comp.x0.clone()
        for l in range(cfg.n_layers):
            if m.name == "naive":
                self._read_standin(bundled, l, tally)
            h = h + comp.attention(l, h, cfg.prompt_tokens + t)
            self._read(bundled, l, ids, tally)
            rows = self.buf.bundles(n, torch=True)
            h = h + comp.dense_ffn(rows, comp.bias[l][:n], h)
            if n < cfg.d_ffn:                                                 # hybrid: the resident neurons
                h = h + comp.dense_ffn(comp.hybrid_rows[l % len(comp.hybrid_rows)], comp.bias[l][n:], h)
            tally.loaded += n
        comp.logits(h)
        return self._row(t0, cpu0, io0, tally, sparse=False)

    def _read_standin(self, store: FlashStore, layer: int, tally: _Tally) -> None:
        """Read ``nonffn_rows`` bundle-sized rows, in 1 MiB reads, from the layer half the model away (wrapping).

        Half the model away, the region was last read ~16 layers (6 GB) earlier. The bundled file
        is used because its dense reads cost no planning (one buffer per 1 MiB read; the separate
        layout scatters each read into 2 x 64 row views, which costs Python time)."""
        left, l = nonffn_rows(self.cfg), layer + self.cfg.n_layers // 2
        while left > 0:
            n = min(left, self.cfg.d_ffn)
            self._read(store, l % self.cfg.n_layers, np.arange(n), tally)
            left, l = left - n, l + 1


@dataclass
class ReplayResult:
    raw: pd.DataFrame          # one row per timed token: method | round | order | token | io_ms | ... (Replayer._row)
    info: pd.DataFrame         # one row per method: layout | k | flags | capacity rows | DRAM bytes
    probe: pd.DataFrame        # same-run throughput: round | chunk_bytes | threads | throughput_mbps
    meta: dict = field(default_factory=dict)   # io_mode, wall_s, peak_rss_bytes, page cache after


def probe_chunks(cfg: PaperScaleConfig, store_config: StoreConfig = StoreConfig()) -> tuple[int, ...]:
    """Read sizes the replay issues: one vector (separate), one bundle, one coalesced dense read."""
    return (bundle_bytes(cfg) // 2, bundle_bytes(cfg), store_config.max_read_bytes)


def probe_throughput(path: Path, chunks, threads: int, seconds: float, seed: int = 0) -> list[dict]:
    """Steady random-read throughput of ``path`` now (``iobench.run_ours``: the store's ReadPool)."""
    from .iobench import run_ours
    return [run_ours(path, c, threads, seconds, seed=seed) for c in chunks]


def run_profile(probe: pd.DataFrame) -> costmodel.DeviceProfile:
    """A device profile from the same-run probe (median per chunk size), for the drift-free computed column."""
    threads = int(probe["threads"].iloc[0])
    med = probe.groupby("chunk_bytes")["throughput_mbps"].median().sort_index()
    pts = tuple((int(c), float(v) * 1e6) for c, v in med.items())
    return costmodel.DeviceProfile("this machine, probed during the replay", {threads: pts}, pts[-1][1] / 1e9,
                                   note=f"{len(probe)} probes of the bundled flash file, {threads} threads")


def block_schedule(cfg: PaperScaleConfig, ms: tuple[Method, ...]) -> list[tuple[int, int, Method, int, int]]:
    """(round, order, method, first token, timed tokens) of every block; round r rotates the order by r."""
    span = max(m.warmup + (cfg.sparse_tokens if m.kind == "sparse" else cfg.dense_tokens) for m in ms)
    if cfg.rounds * span > cfg.n_tokens:
        raise ValueError(f"{cfg.rounds} rounds x {span} tokens per block need a trace of {cfg.rounds * span} "
                         f"tokens, the config has n_tokens={cfg.n_tokens}")
    out = []
    for r in range(cfg.rounds):
        for i in range(len(ms)):
            m = ms[(i + r) % len(ms)]
            out.append((r, i, m, r * span, cfg.sparse_tokens if m.kind == "sparse" else cfg.dense_tokens))
    return out


def replay(cfg: PaperScaleConfig, trace: Trace, capacities: dict[int, np.ndarray], files: dict[str, Path],
           ms: tuple[Method, ...] | None = None, progress: bool = True, io_mode: str | None = None) -> ReplayResult:
    """Every method, block by block in rotated rounds (``block_schedule``), one process, one trace."""
    ms = ms or methods(cfg)
    schedule = block_schedule(cfg, ms)
    store_config = StoreConfig()
    t0 = time.perf_counter()
    rows, probes = [], []
    with torch.inference_mode(), torch_threads(cfg.threads), \
            Replayer(cfg, trace, capacities, files, store_config, io_mode=io_mode) as rep:
        for r, order, m, start, n in tqdm(schedule, desc="paper-scale replay", disable=not progress):
            if order == 0 and cfg.probe_seconds > 0:        # each round starts with a throughput probe
                probes += [{"round": r, **p} for p in probe_throughput(
                    files["bundled"], probe_chunks(cfg, store_config), store_config.n_threads,
                    cfg.probe_seconds, seed=r)]
            rows += [{"round": r, "order": order, **row} for row in rep.block(m, start, n)]
        after = {lay: s.resident_fraction() for lay, s in rep.stores.items()}
        io_mode_used = rep.io_mode
        mats_gb = sum(mat.bytes_capacity for mat in rep.matrices) / 1e9
    meta = {"io_mode": io_mode_used, "wall_s": time.perf_counter() - t0, "page_cache_after": after,
            "peak_rss_bytes": peak_rss_bytes(), "matrices_allocated_gb": mats_gb}
    return ReplayResult(pd.DataFrame(rows), method_info(cfg, ms, capacities), pd.DataFrame(probes), meta)


def method_info(cfg: PaperScaleConfig, ms, capacities: dict[int, np.ndarray]) -> pd.DataFrame:
    """Per method: layout, k, Table 2 flags and DRAM bytes at 16 bit, Table 2's accounting (DramBudget:
    the resident part + the reserved matrices; the replay's fp32 copies hold twice the matrix bytes)."""
    parts, total = model_parts(cfg), sum(model_parts(cfg).values())
    row_bytes = bundle_bytes(cfg) + np.dtype(FILE_DTYPE).itemsize      # bundle + bias, 16 bit like Table 2
    rows = []
    for m in ms:
        resident, reserved = 0, 0
        if m.name == "hybrid":
            resident = reserved = total - cfg.n_layers * hybrid_stream_rows(cfg) * bundle_bytes(cfg)
        elif m.kind == "sparse":
            budget = DramBudget(total)
            for name, nbytes in parts.items():
                if name != "ffn":
                    budget.add_resident(name, nbytes)
            budget.add_resident("predictors", predictor_bytes(cfg))
            budget.reserve_matrices(capacities[m.k], row_bytes)
            resident, reserved = budget.resident_bytes, budget.used_bytes
        rows.append({"method": m.name, "layout": m.layout, "k": m.k,
                     **dict(zip(("hybrid", "predictor", "windowing", "bundling"), m.flags)),
                     "resident_bytes": resident, "reserved_bytes": reserved, "row_bytes": row_bytes,
                     "capacity_rows": int(np.sum(capacities[m.k])) if m.kind == "sparse" else 0,
                     "model_bytes": total})
    return pd.DataFrame(rows)


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- tables: Table 2, Table 3, Fig 1 ---------------------------------------------------------------

def breakdown(result: ReplayResult) -> pd.DataFrame:
    """Per method: medians (and mean, std) per token of io/mem/compute/total ms, bytes, reads, neurons.

    ``cpu_share``: process CPU time (all threads) / wall time; ``load1``: the machine's 1-minute load
    average during the method's tokens (2 cores: a load of 20 leaves each process a fraction of one).
    """
    d = result.raw
    g = d.groupby("method", sort=False)
    cols = ("io_ms", "io_pool_ms", "mem_ms", "compute_ms", "total_ms")
    out = pd.DataFrame({**{f"{c}_median": g[c].median() for c in cols},
                        **{f"{c}_mean": g[c].mean() for c in cols},
                        **{f"{c}_std": g[c].std() for c in cols},
                        "cpu_share": g["cpu_ms"].sum() / g["total_ms"].sum(), "load1": g["load1"].median(),
                        "bytes_per_token": g["bytes_read"].mean(), "reads_per_token": g["reads"].mean(),
                        "neurons_per_token": g["neurons_loaded"].mean(), "rows_resident": g["rows_resident"].mean(),
                        "tokens": g.size(), "shrunk": g["shrunk"].sum(), "truncated": g["truncated"].sum()}
                       ).reset_index()
    out = out.merge(result.info, on="method")
    out["chunk_bytes"] = out["bytes_per_token"] / out["reads_per_token"]
    out["throughput_gbps"] = out["bytes_per_token"] / (out["io_ms_median"] * 1e6)
    # Table 2's DRAM: what stays resident between tokens (k = 0 keeps nothing; its rows are transient)
    windowed = out["k"].fillna(0) > 0
    out["dram_bytes"] = np.where(windowed, out["resident_bytes"] + out["rows_resident"] * out["row_bytes"],
                                 out["resident_bytes"])
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    return out.sort_values("method", key=lambda s: s.map(order)).reset_index(drop=True)


def drift(probe: pd.DataFrame, profile: costmodel.DeviceProfile | None = None) -> pd.DataFrame:
    """Throughput now (the replay's probes) beside the throughput table's: chunk_kib | table_mbps | probe_mbps | ratio."""
    profile = profile or costmodel.measured_profile()
    g = probe.groupby(["chunk_bytes", "threads"])["throughput_mbps"].median().reset_index()
    g["table_mbps"] = [1e3 * profile.throughput_gbps(c, t) for c, t in zip(g["chunk_bytes"], g["threads"])]
    return pd.DataFrame({"chunk_kib": g["chunk_bytes"] / 1024, "threads": g["threads"], "table_mbps": g["table_mbps"],
                         "probe_mbps": g["throughput_mbps"], "probe_over_table": g["throughput_mbps"] / g["table_mbps"]})


def table2(summary: pd.DataFrame, profile: costmodel.DeviceProfile | None = None,
           now: costmodel.DeviceProfile | None = None, threads: int = costmodel.COSTMODEL.threads) -> pd.DataFrame:
    """Table 2 measured on this disk beside the cost model for the same reads and the paper's row.

    ``io_ms_computed``: the replay's bytes per token / the profile's throughput at the replay's mean
    read size (1 MiB for the dense rows, ~8 or ~16 KiB for the sparse ones) and ``threads``;
    ``profile`` defaults to the throughput benchmark's table (figures/02_flash_throughput.csv).
    ``io_ms_computed_now``: the same with ``now`` (``run_profile`` of the replay's own probes).
    """
    profile = profile or costmodel.measured_profile()
    ref = pd.DataFrame(paper.TABLE2_ROWS, columns=paper.TABLE2_COLUMNS)
    rows = []
    for _, s in summary.iterrows():
        i = METHOD_NAMES.index(s["method"])                          # the paper's row of this method
        comp = profile.io_ms(s["bytes_per_token"], s["chunk_bytes"], threads)
        rows.append({"method": s["method"], "hybrid": s["hybrid"], "predictor": s["predictor"],
                     "windowing": s["windowing"], "bundling": s["bundling"],
                     "dram_gb": s["dram_bytes"] / 1e9, "flash_to_dram_gb": s["bytes_per_token"] / 1e9,
                     "chunk_kib": s["chunk_bytes"] / 1024, "throughput_gbps": s["throughput_gbps"],
                     "io_ms": s["io_ms_median"], "io_pool_ms": s["io_pool_ms_median"],
                     "io_ms_computed": comp, "computed_over_measured": comp / s["io_ms_median"],
                     "io_ms_computed_now": (now.io_ms(s["bytes_per_token"], s["chunk_bytes"], threads)
                                            if now is not None else np.nan),
                     "tokens": s["tokens"], "paper_dram_gb": ref.loc[i, "dram_gb"],
                     "paper_flash_gb": ref.loc[i, "flash_to_dram_gb"],
                     "paper_gbps": ref.loc[i, "throughput_gbps"], "paper_io_ms": ref.loc[i, "io_ms"]})
    return pd.DataFrame(rows)


def activation_stats(trace: Trace, k: int) -> costmodel.ActivationStats:
    """Predicted share, new share per token and window share of the trace's predicted sets (App. C.1's 10%, 2.4%, 24%)."""
    return costmodel.ActivationStats.from_curve(trace_statistics(trace.predicted, ks=(1, k)).curve, k)


def table2_costmodel(cfg: PaperScaleConfig, trace: Trace, profile: costmodel.DeviceProfile | None = None) -> pd.DataFrame:
    """Table 2 computed by ``costmodel.table2`` for this geometry, the trace's statistics and a device."""
    df = costmodel.table2(model_bytes(cfg), activation_stats(trace, cfg.window_k),
                          profile or costmodel.measured_profile())
    df.insert(0, "method", [m.name for m in methods(cfg)])
    return df


def table3(summary: pd.DataFrame) -> pd.DataFrame:
    """Table 3's CPU rows for OPT 6.7B beside ours (median ms per token): method | source | io | mem | compute | total."""
    label = {"naive": "Naive", "hybrid": "Hybrid", "predictor": "+predictor", "windowing": "+windowing",
             "bundling": "All"}
    rows = [{"method": label[s["method"]], "source": "ours (this machine, synthetic OPT 6.7B geometry)",
             **{c: s[f"{c}_median"] for c in ("io_ms", "mem_ms", "compute_ms", "total_ms")}}
            for _, s in summary.iterrows()]
    rows += [{"method": r[1], "source": "paper (M1 Max CPU)",
              **dict(zip(("io_ms", "mem_ms", "compute_ms", "total_ms"), r[3:]))}
             for r in paper.TABLE3_ROWS if r[0] == "OPT 6.7B" and r[2] == "CPU"]
    return pd.DataFrame(rows)


def fig1_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """Fig 1's bars: source | method | io_ms | mem_ms | compute_ms (naive and all techniques, paper and ours)."""
    t3 = table3(summary)
    keep = t3[t3["method"].isin(["Naive", "All"])].copy()
    keep["source"] = np.where(keep["source"].str.startswith("paper"), "paper (M1 Max CPU)", "ours (this machine)")
    return keep[["source", "method", "io_ms", "mem_ms", "compute_ms"]].reset_index(drop=True)


def plot_fig1(frame: pd.DataFrame):
    """Stacked bars of per-token latency (I/O, memory management, compute), one panel per source (Fig 1 style)."""
    import matplotlib.pyplot as plt
    colors = {"io_ms": "#1f77b4", "mem_ms": "#ff7f0e", "compute_ms": "#2ca02c"}
    names = {"io_ms": "flash I/O", "mem_ms": "memory management", "compute_ms": "compute"}
    sources = sorted(dict.fromkeys(frame["source"]), key=lambda x: not x.startswith("paper"))
    fig, axes = plt.subplots(1, len(sources), figsize=(4.2 * len(sources) + 1.6, 4.0), squeeze=False)
    for ax, src in zip(axes[0], sources):
        d = frame[frame["source"] == src].reset_index(drop=True)
        bottom = np.zeros(len(d))
        for c in ("io_ms", "mem_ms", "compute_ms"):
            ax.bar(d["method"], d[c], bottom=bottom, color=colors[c], label=names[c], width=0.6)
            bottom += d[c].to_numpy()
        for x, tot in enumerate(bottom):
            ax.text(x, tot, f"{tot:,.0f} ms", ha="center", va="bottom", fontsize=8)
        ax.set_title(src, fontsize=10)
        ax.set_ylabel("latency per token (ms)")
        ax.margins(y=0.12)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.suptitle("OPT 6.7B, half the model in DRAM: naive vs all techniques (paper Fig 1 style)", fontsize=10)
    return fig


def acceptance(t2: pd.DataFrame) -> pd.DataFrame:
    """The issue's checks: check | target | ours | paper | ok."""
    s = t2.set_index("method")
    io = s["io_ms"]
    rows = [("I/O naive / all techniques", ">= 20x", io["naive"] / io["bundling"], 2196 / 87),
            ("I/O +windowing / +bundling (bundling alone)", ">= 1.4x", io["windowing"] / io["bundling"], 164 / 87)]
    out = [{"check": c, "target": t, "ours": v, "paper": p, "ok": v >= float(t.strip(">= x"))} for c, t, v, p in rows]
    for col, what in (("io_ms_computed", "throughput table 02"), ("io_ms_computed_now", "same-run probe")):
        for m, r in s.iterrows():
            if np.isfinite(r[col]):
                ratio = r[col] / r["io_ms"]
                out.append({"check": f"computed ({what}) / measured I/O, {m}", "target": "0.75 .. 1.25",
                            "ours": ratio, "paper": np.nan, "ok": bool(0.75 <= ratio <= 1.25)})
    return pd.DataFrame(out)


def disk_report(cfg: PaperScaleConfig, smoke: bool | None = None) -> dict:
    """Bytes of the flash files on disk and the file system's free space now."""
    files = flash_paths(cfg, smoke)
    on_disk = sum(p.stat().st_size for p in files.values() if p.exists())
    usage = shutil.disk_usage(flash_folder(cfg, smoke))
    return {"flash_files_gb": on_disk / 1e9, "disk_free_gb": usage.free / 1e9, "disk_total_gb": usage.total / 1e9}


# --- the same statistics on our ReLU OPT's measured traces --------------------------------------------

def relu_opt_available(model_name: str = "relu-opt") -> bool:
    """True when the trained ReLU OPT of this run's preset is cached (nothing is trained here)."""
    from .config import RELU_OPT_PRESETS, relu_opt_preset
    from .models import CACHE_MARKER
    cfg = RELU_OPT_PRESETS["smoke"] if model_name == "relu-opt-smoke" else relu_opt_preset()
    return (paths.models_dir() / cfg.name / CACHE_MARKER).exists()


def measured_trace(model_name: str = "relu-opt", max_tokens: int = 4096, seq_len: int = 256,
                   progress: bool = True) -> dict[str, np.ndarray]:
    """True and predicted masks of a real model on held-out text: ``{"active", "predicted"}: [n_seq, T, L, d_ffn]``.

    Masks come from ``predictor.layer_labels`` (the model's own ReLU zeros) and its cached low-rank
    predictors (``experiments.predictors_for``, trained once if missing), on sequences of
    ``seq_len`` tokens from the test split of every corpus domain.
    """
    from . import experiments, predictor, sparsity
    from .config import CORPUS
    from .models import ffn_adapter, load_model
    model, tok = load_model(model_name, progress=False)
    adapter = ffn_adapter(model)
    seq_len = min(seq_len, getattr(model.config, "max_position_embeddings", seq_len))
    preds = experiments.predictors_for(model_name, model, tok, progress=progress)
    per = max(seq_len, max_tokens // len(CORPUS.domains))
    batches = [b for bs in sparsity.domain_batches(tok, CORPUS.domains, "test", seq_len, 1, per).values()
               for b in bs]
    inputs = predictor.collect_ffn_inputs(model, adapter, batches, progress=progress)
    rule = sparsity.default_mask_rule(adapter)
    n_seq = len(batches)
    act, pred = [], []
    with torch.no_grad():
        for l in range(adapter.n_layers):
            a = predictor.layer_labels(adapter, l, inputs[l], rule)                     # [n_tokens, d_ffn]
            p = preds.mask(l, inputs[l]) if l in preds.layers else torch.ones_like(a)   # no predictor: all
            act.append(a.reshape(n_seq, seq_len, -1))
            pred.append(p.reshape(n_seq, seq_len, -1))
    return {"active": torch.stack(act, dim=2).numpy(), "predicted": torch.stack(pred, dim=2).numpy()}


def _seq_stats(masks: np.ndarray, ks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Active share [L], s_agg [L, K], new per token [L, K], averaged over sequences ``masks [n_seq, T, L, d]``."""
    st = [trace_statistics(seq, ks=ks) for seq in masks]
    return (np.mean([s.active_share for s in st], axis=0), np.mean([s.curve.s_agg for s in st], axis=0),
            np.nanmean([s.curve.new_per_token for s in st], axis=0))


def compare_traces(trace: Trace, measured: dict[str, np.ndarray], k: int,
                   ks=(1, 2, 3, 4, 5, 6, 8, 10)) -> dict[str, pd.DataFrame]:
    """The synthetic paper-scale trace beside a measured one: the same statistics, side by side.

    ``overall``: statistic | paper | synthetic | measured (absolute shares, and shape ratios that do
    not depend on the overall density: s_agg(k)/s_agg(1), new(k)/s_agg(1), last/first layer).
    ``curve``: source | k | s_agg | new_per_token | s_agg_over_s1 (predicted sets, Fig 4a).
    ``per_layer``: source | depth (0 first .. 1 last layer) | active_share | predicted_share.
    """
    ks = tuple(sorted(set(ks) | {1, k}))
    syn = {"active": trace.active[None], "predicted": trace.predicted[None]}
    out_curve, out_layer, overall = [], [], {}
    for name, tr in (("synthetic", syn), ("measured", measured)):
        a_share, _, _ = _seq_stats(tr["active"], (1,))
        p_share, s_agg, new = _seq_stats(tr["predicted"], ks)
        errs = prediction_statistics(tr["active"].reshape(-1, *tr["active"].shape[2:]),
                                     tr["predicted"].reshape(-1, *tr["predicted"].shape[2:]))
        s1, sk, nk = s_agg[:, ks.index(1)].mean(), s_agg[:, ks.index(k)].mean(), np.nanmean(new[:, ks.index(k)])
        overall[name] = [a_share.mean(), a_share[-1] / a_share[0], errs["predicted_over_active"], errs["fn_rate"],
                         s1, sk, nk, sk / s1, nk / s1]
        for j, kk in enumerate(ks):
            out_curve.append({"source": name, "k": kk, "s_agg": s_agg[:, j].mean(),
                              "new_per_token": np.nanmean(new[:, j]), "s_agg_over_s1": s_agg[:, j].mean() / s1})
        depth = np.linspace(0, 1, a_share.size) if a_share.size > 1 else np.array([0.5])
        out_layer += [{"source": name, "depth": x, "active_share": a, "predicted_share": p}
                      for x, a, p in zip(depth, a_share, p_share)]
    stats = ["active share (mean over layers)", "active share, last / first layer", "predicted / active",
             "false negatives (share of active)", "s_agg(1) of predicted (= predicted share)",
             f"s_agg({k}): window cache share", f"new share per token, k={k}", f"s_agg({k}) / s_agg(1)",
             f"new(k={k}) / s_agg(1)"]
    P = paper
    ref = [P.TABLE6_MEAN_ACTIVE_PCT / 100, P.TABLE6_ACTIVE_PCT[32] / P.TABLE6_ACTIVE_PCT[1], P.PREDICTED_OVER_ACTIVE,
           P.PREDICTOR_FN_RATE, P.PREDICTED_SHARE_PER_TOKEN, P.WINDOW_CACHE_SHARE_OF_FFN, P.NEW_SHARE_PER_TOKEN,
           P.WINDOW_CACHE_SHARE_OF_FFN / P.PREDICTED_SHARE_PER_TOKEN, P.NEW_SHARE_PER_TOKEN / P.PREDICTED_SHARE_PER_TOKEN]
    return {"overall": pd.DataFrame({"statistic": stats, "paper": ref, "synthetic": overall["synthetic"],
                                     "measured": overall["measured"]}),
            "curve": pd.DataFrame(out_curve), "per_layer": pd.DataFrame(out_layer)}


# --- the closing table ----------------------------------------------------------------------------------

def paper_vs_ours_rows(t2: pd.DataFrame, t3: pd.DataFrame, cfg: PaperScaleConfig, meta: dict,
                       disk: dict) -> list[tuple]:
    """(quantity, paper, ours, note) rows for ``plotting.paper_vs_ours``."""
    s = t2.set_index("method")
    ours3 = t3[t3["source"].str.startswith("ours")].set_index("method")
    mb = model_bytes(cfg)
    rows = [("model bytes (fp16)", "13.4 GB", f"{mb.total_bytes / 1e9:.2f} GB",
             f"synthetic weights, {cfg.n_layers} layers x {cfg.d_ffn} neurons, d_model {cfg.d_model}"),
            ("FFN share of the model", f"{paper.FFN_SHARE_OPT67B:.2%}", f"{mb.ffn_share:.2%}", "public OPT 6.7B config")]
    for m, label in (("naive", "naive"), ("hybrid", "hybrid"), ("predictor", "+predictor"),
                     ("windowing", "+windowing"), ("bundling", "+bundling")):
        r = s.loc[m]
        rows.append((f"Table 2 {label}: flash->DRAM per token", f"{r['paper_flash_gb']} GB",
                     f"{r['flash_to_dram_gb']:.3f} GB", f"{r['chunk_kib']:.0f} KiB reads"))
        rows.append((f"Table 2 {label}: I/O latency", f"{r['paper_io_ms']} ms ({r['paper_gbps']} GB/s)",
                     f"{r['io_ms']:.0f} ms ({r['throughput_gbps']:.2f} GB/s)",
                     f"measured, median of {int(r['tokens'])} tokens; cost model {r['io_ms_computed']:.0f} ms"))
    rows += [("I/O naive / all techniques", f"{2196 / 87:.1f}x", f"{s.loc['naive', 'io_ms'] / s.loc['bundling', 'io_ms']:.1f}x",
              "acceptance >= 20x"),
             ("I/O gain of bundling (+windowing -> +bundling)", f"{164 / 87:.2f}x",
              f"{s.loc['windowing', 'io_ms'] / s.loc['bundling', 'io_ms']:.2f}x", "acceptance >= 1.4x")]
    for m in ("Naive", "All"):
        r = ours3.loc[m]
        p = next(x for x in paper.TABLE3_ROWS if x[:3] == ("OPT 6.7B", m, "CPU"))
        rows.append((f"Table 3 OPT 6.7B CPU {m}: io / mem / compute / total ms", " / ".join(map(str, p[3:])),
                     " / ".join(f"{r[c]:.0f}" for c in ("io_ms", "mem_ms", "compute_ms", "total_ms")),
                     "paper: M1 Max fp32; ours: 1 thread on 2 shared cores, fp32, synthetic weights"))
    rows += [("I/O mode", "F_NOCACHE / DirectIO", meta.get("io_mode", "?"), "page cache bypassed"),
             ("peak DRAM of the replay process", "-", f"{meta.get('peak_rss_bytes', 0) / 1e9:.1f} GB", "ru_maxrss"),
             ("flash files on disk", "-", f"{disk['flash_files_gb']:.1f} GB", "bundled + separate layouts")]
    return rows
