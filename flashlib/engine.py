"""Sparse inference engine (paper sec 3 and Table 3): flash-backed FFNs inside Hugging Face ``generate()``.

Every FFN of the model is swapped (``adapter.replace_ffn``) for a ``SparseFFN`` that, per token
and layer, runs the paper's loop::

    active set (all | oracle | predictor on the FFN input x)
      -> SlidingWindow.update          which neurons to load / evict (window k)
      -> FlashStore.read(load)         O_DIRECT reads into a preallocated aligned buffer
      -> NeuronMatrix.update(evict, load)  the new bundles (+ up-projection bias) fill the evicted
                                       rows, then append; the last rows fill what is left (Fig 6)
      -> y = matrix.ffn(x)             over ALL resident rows (zeros add nothing for ReLU)

A prompt of T tokens is processed one token at a time inside the module, so prefill and decode
share one code path and the window advances per token. Batch size 1 only (the paper's setting).
The DRAM budget (``DramBudget``) holds the resident part (embeddings, attention, norms, biases,
predictors, the read buffer) and the per-layer matrices, sized (Req_i) from a calibration trace
on the training split; a budget that cannot hold them is refused before any flash read. A forward
pre/post hook on the model times every step: io_ms (inside reads), mem_ms (window logic +
matrix update), compute_ms (everything else: predictor, FFN, attention, sampling).
There is no fallback to dense compute: a failed or short read stops generation with an error.
"""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import layout, paths
from .config import ENGINE, FLASH_FILE_PRESETS, CORPUS, EngineConfig, StoreConfig, smoke_mode
from .dram import DramBudget, DramBudgetError, NaiveNeuronMatrix, NeuronMatrix, capacity_for_window
from .models import ffn_adapter
from .sparsity import active_mask, default_mask_rule, down_norms, run_with_ffn_inputs, topk_mask
from .store import FlashFileError, FlashStore
from .window import SlidingWindow, resident_sizes

POLICIES = ("all", "oracle", "predictor")


class EngineError(RuntimeError):
    """Generation cannot go on (a failed flash read, bad input); never answered by dense compute."""


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C (or any KeyboardInterrupt) during generation; the engine was reset and stays usable."""


# --- per-step timing (shared with baselines.py) -----------------------------------------------

@dataclass
class Counters:
    """Cumulative work of one runner; a step's row is the difference of two snapshots."""

    io_s: float = 0.0            # wall time inside flash reads
    mem_s: float = 0.0           # window logic + DRAM matrix update (evict + load)
    bytes_read: int = 0
    reads: int = 0               # preadv calls
    neurons_loaded: int = 0
    neurons_evicted: int = 0
    shrunk: int = 0              # (token, layer) pairs whose window was shrunk to fit the matrix
    truncated: int = 0           # (token, layer) pairs whose active set alone exceeded the matrix

    def snapshot(self) -> dict:
        return dict(self.__dict__)            # flat fields: a dict copy (asdict's recursion cost ~0.5 ms/step)


class TokenClock:
    """Marks step boundaries with model forward pre/post hooks and keeps one row per step.

    A step is one forward call (prefill: the prompt's T tokens; decode: one token). Its total
    runs from its forward's start to the next forward's start (so sampling and the generate
    loop count as compute), or to ``finish()``.
    """

    def __init__(self, counters: Counters, resident_bytes):
        self.counters, self.resident_bytes = counters, resident_bytes
        self.rows: list[dict] = []
        self._open: dict | None = None
        self._fwd_end = None

    def begin(self, n_tokens: int, new_sequence: bool) -> None:
        now = time.perf_counter()
        self._close(self._fwd_end if new_sequence else now)
        phase = "prefill" if new_sequence else "decode"
        self._open = {"t0": now, "snap": self.counters.snapshot(), "n_tokens": n_tokens, "phase": phase}

    def forward_done(self) -> None:
        self._fwd_end = time.perf_counter()
        if self._open is not None:
            self._open["forward_s"] = self._fwd_end - self._open["t0"]

    def finish(self) -> None:
        self._close(time.perf_counter())

    def _close(self, t_end) -> None:
        o, self._open = self._open, None
        if o is None or t_end is None:
            return
        now = self.counters.snapshot()
        d = {k: now[k] - o["snap"][k] for k in now}
        total = 1e3 * (t_end - o["t0"])
        io, mem = 1e3 * d.pop("io_s"), 1e3 * d.pop("mem_s")
        self.rows.append({"step": len(self.rows), "phase": o["phase"], "n_tokens": o["n_tokens"],
                          "io_ms": io, "mem_ms": mem, "compute_ms": total - io - mem, "total_ms": total,
                          "forward_ms": 1e3 * o.get("forward_s", t_end - o["t0"]), **d,
                          "bytes_resident": int(self.resident_bytes())})

    def frame(self, since: int = 0) -> pd.DataFrame:
        """Tidy per-step table: step | phase | n_tokens | io_ms | mem_ms | compute_ms | total_ms | ...."""
        return pd.DataFrame(self.rows[since:])


def install_step_hooks(model, on_begin, on_end) -> list:
    """Forward pre/post hooks on the top-level model; ``on_begin(n_tokens, new_sequence)``.

    Refuses batch sizes above 1 (the paper's setting, and what the window assumes).
    """
    def pre(module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x.shape[0] != 1:
            raise EngineError(f"flashlib runs batch size 1 (the paper's setting); got a batch of {x.shape[0]} "
                              "sequences: generate them one at a time")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        try:
            past = 0 if cache is None else int(cache.get_seq_length())
        except (AttributeError, TypeError):
            past = 0
        on_begin(int(x.shape[1]), past == 0)

    return [model.register_forward_pre_hook(pre, with_kwargs=True),
            model.register_forward_hook(lambda module, args, out: on_end())]


@dataclass
class GenerationResult:
    tokens: torch.Tensor          # [1, prompt + new] token ids
    stats: pd.DataFrame           # one row per step (TokenClock.frame)

    def decode_stats(self) -> pd.DataFrame:
        return self.stats[self.stats["phase"] == "decode"]


def run_generate(runner, input_ids: torch.Tensor, gen_kwargs: dict) -> GenerationResult:
    """``model.generate`` under inference_mode with the runner's clock; clear errors, no fallback."""
    ids = torch.as_tensor(input_ids).reshape(1, -1) if torch.as_tensor(input_ids).dim() == 1 else input_ids
    if ids.shape[0] != 1:
        raise EngineError(f"batch size 1 only (the paper's setting); got {ids.shape[0]} sequences")
    kw = {"attention_mask": torch.ones_like(ids), "pad_token_id": runner.model.config.eos_token_id,
          "do_sample": False, **gen_kwargs}
    n0 = len(runner.clock.rows)
    runner.before_run()
    try:
        with torch.inference_mode():
            out = runner.model.generate(ids.to(runner.device), **kw)
    except KeyboardInterrupt:
        runner.recover()
        raise GenerationInterrupted(
            f"generation interrupted after {len(runner.clock.rows) - n0} steps; the runner was reset "
            "(partial timings are in its clock) and can generate again") from None
    finally:
        runner.clock.finish()
    return GenerationResult(out.cpu(), runner.clock.frame(since=n0))


# --- model bytes, budgets, artifacts --------------------------------------------------------

def unique_parameters(model) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and buffer-free weight, tied weights once."""
    seen, out = set(), []
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen and p.numel():
            continue
        seen.add(p.data_ptr())
        out.append((name, p))
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def resident_parts(model, adapter, ffn_names: set[str]) -> dict[str, int]:
    """Bytes of everything that stays in DRAM (all but the FFN matrices), by part."""
    parts: dict[str, int] = {}
    for name, p in unique_parameters(model):
        if name in ffn_names:
            continue
        kind = ("embeddings" if ("embed" in name or "lm_head" in name) else "attention" if "self_attn" in name
                else "ffn biases" if re.search(r"\.(fc1|fc2|mlp\.\w+)\.bias$", name)
                else "norms" if "norm" in name else "other")
        parts[kind] = parts.get(kind, 0) + _nbytes(p)
    return parts


def parse_budget(spec, model_bytes: int, resident_weights: int, ffn_bytes: int) -> int | None:
    """Budget in bytes from a spec: None | fraction of the model (<= 1) | bytes (> 1) | "64MiB" |
    "ffn:0.24" (the resident weights plus that share of the FFN: the paper's composition on a
    model whose FFN share differs from OPT 6.7B's 64.6%)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s.startswith("ffn:"):
            return int(resident_weights + float(s[4:]) * ffn_bytes)
        m = re.fullmatch(r"([0-9.]+)\s*(b|kb|mb|gb|kib|mib|gib)?", s)
        if not m:
            raise ValueError(f"DRAM budget {spec!r}: expected a fraction of the model (0.5), bytes "
                             "(123456, 64MiB, 1.5GB) or 'ffn:SHARE'")
        unit = {None: 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
        if m.group(2) is None and float(m.group(1)) <= 1:
            return parse_budget(float(m.group(1)), model_bytes, resident_weights, ffn_bytes)
        return int(float(m.group(1)) * unit[m.group(2)])
    if spec <= 0:
        raise ValueError(f"DRAM budget must be positive, got {spec}")
    return int(spec * model_bytes) if spec <= 1 else int(spec)


def model_fingerprint(model) -> str:
    """SHA-256 of every weight (names, shapes, bytes): flash files are cached per fingerprint."""
    fp = getattr(model, "_flashlib_fingerprint", None)
    if fp is None:
        h = hashlib.sha256()
        for name, p in unique_parameters(model):
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        fp = model._flashlib_fingerprint = h.hexdigest()[:16]
    return fp


def default_flash_root() -> Path:
    """Engine artifacts: ``flash_dir()/engine``, or a throw-away folder under build/ in smoke mode."""
    return paths.BUILD / "smoke" / "flash" if smoke_mode() else paths.flash_dir() / "engine"


def flash_file(model, adapter, model_name: str, layout_name: str, dtype: str,
               root: Path | None = None, preset: str = ENGINE.flash_preset, progress: bool = False) -> Path:
    """The model's FFN flash file in ``layout_name``/``dtype`` (written once per weights fingerprint)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)
    path = Path(root or default_flash_root()) / f"{slug}-{model_fingerprint(model)}" / \
        f"ffn-{layout_name}-{dtype}-{preset}.safetensors"
    if not layout.manifest_path(path).exists():
        layout.write_flash_file(layout.source_from_adapter(adapter, model_name), path, layout=layout_name,
                                dtype=dtype, config=FLASH_FILE_PRESETS[preset], progress=progress)
    return path


def slot_bytes(adapter, layout_name: str, dtype: str, preset: str) -> int:
    """Bytes one neuron occupies in the read buffer (what ``FlashStore.slot_bytes`` will be)."""
    align = FLASH_FILE_PRESETS[preset].row_alignment
    vec = adapter.d_model * np.dtype(dtype).itemsize
    n = len(adapter.vector_names)
    return layout.round_up(n * vec, align) if layout_name == "bundled" else n * layout.round_up(vec, align)


# --- active sets and window sizing ----------------------------------------------------------

class ActiveSets:
    """The policy's active set of one token x ``[1, d_model]`` -> (mask [d_ffn] bool numpy, scores)."""

    def __init__(self, policy: str, adapter, predictors=None, density: float | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if policy == "predictor" and predictors is None:
            raise ValueError("policy 'predictor' needs predictors (flashlib.predictor.fit_predictors)")
        self.policy, self.adapter, self.predictors, self.density = policy, adapter, predictors, density
        self.rule = default_mask_rule(adapter)
        self.norms = ({l: down_norms(adapter, l) for l in range(adapter.n_layers)}
                      if policy == "oracle" and self.rule.weight_by_down_norm else {})
        self.has = set(predictors.layers) if predictors is not None else set()
        self._all = torch.ones(adapter.d_ffn, dtype=torch.bool)

    def batch(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Masks ``[n, d_ffn]`` and scores for FFN inputs ``[n, d_model]`` (scores rank who to keep)."""
        if self.policy == "all" or (self.policy == "predictor" and layer not in self.has):
            return self._all.expand(x.shape[0], -1), None
        if self.policy == "oracle":
            act = self.adapter.activation(layer, x)
            return active_mask(act, self.rule, self.norms.get(layer)), act.abs()
        z = self.predictors.logits(layer, x)
        if self.density is not None:
            return topk_mask(z, self.density), z
        return z > self.predictors.meta.thresholds.get(layer, 0.0), z


def calibration_batches(tokenizer, cfg: EngineConfig, max_positions: int | None) -> list[torch.Tensor]:
    """``[1, T]`` sequences from the train split of every corpus domain (``cfg.calibration_tokens`` in all)."""
    from .sparsity import domain_batches
    seq_len = min(cfg.calibration_seq_len, max_positions or cfg.calibration_seq_len)
    per_domain = max(seq_len, cfg.calibration_tokens // len(CORPUS.domains))
    found = domain_batches(tokenizer, CORPUS.domains, "train", seq_len, 1, per_domain)
    return [b for bs in found.values() for b in bs]


def calibration_trace(model, adapter, active: ActiveSets, batches: list[torch.Tensor]) -> np.ndarray:
    """Active masks ``[n_seq, T, n_layers, d_ffn]`` of the policy over ``batches`` (dense forward)."""
    per_layer: dict[int, list[torch.Tensor]] = {l: [] for l in range(adapter.n_layers)}

    def keep(layer, x, shape):
        mask, _ = active.batch(layer, x.reshape(-1, x.shape[-1]))
        per_layer[layer].append(mask.reshape(*shape, -1).cpu())

    run_with_ffn_inputs(model, adapter, batches, range(adapter.n_layers), keep, progress=False,
                        desc="calibrate window")
    return torch.stack([torch.cat(per_layer[l]) for l in range(adapter.n_layers)], dim=2).numpy()


def peak_rows(trace: np.ndarray, max_k: int, quantile: float = 1.0) -> np.ndarray:
    """Rows each layer's matrix must hold for every window k = 0..max_k ``[max_k + 1, n_layers]``.

    ``quantile`` 1.0: the largest resident set seen (the paper's Req_i). Below 1: the union of k
    tokens that ``quantile`` of the trace's windows fit in, but never less than the largest single
    active set (row k=0, always the peak): a token whose window outgrows the matrix then drops the
    older tokens' neurons (``SlidingWindow.shrink_to_fit``), never its own active set.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"capacity quantile must be in (0, 1], got {quantile}")
    n_seq, T, L, d = trace.shape
    ks = tuple(range(1, min(max_k, T) + 1))
    peaks = np.zeros((len(ks) + 1, L), dtype=np.int64)
    peaks[0] = trace.sum(axis=3).max(axis=(0, 1))
    sizes = [resident_sizes(seq, ks) for seq in trace]           # per sequence: k -> [T - k + 1, L]
    for k in ks:                                                 # quantile 1.0 ("higher") is the maximum
        q = np.quantile(np.concatenate([s[k] for s in sizes]), quantile, axis=0, method="higher")
        peaks[k] = np.maximum(q.astype(np.int64), peaks[0])
    return peaks


@dataclass(frozen=True)
class Sizing:
    """The budget decision: window k, rows per layer, and the bytes of every k that was considered."""

    k: int
    capacities: tuple              # [n_layers] rows of each layer's matrix
    buffer_rows: int               # read buffer: the largest single active set (k=0 rows) or fewer
    budget_bytes: int
    table: pd.DataFrame            # k | matrix_rows | matrix_bytes | buffer_bytes | need_bytes | fits


def size_window(peaks: np.ndarray | None, d_ffn: int, n_layers: int, resident: int, row_bytes: int,
                slot: int, budget: int | None, k: int | None, margin: float, model_bytes: int | None = None,
                buffer_rows: int | None = None) -> Sizing:
    """Largest k (or the given one) whose matrices + read buffer + resident part fit ``budget``.

    ``peaks`` None means every neuron is active (policy "all"): d_ffn rows per layer, k = 1.
    ``buffer_rows`` None: the read buffer holds the largest single active set (+ margin); fewer
    rows make larger loads go in rounds (``SparseEngine.token``). With a byte budget, what the
    chosen window leaves of it grows the buffer (never past the largest single active set): fewer
    rounds at no cost to the window (SmolLM2 at 90%: 845 rows instead of 128, 232 vs 285 ms per
    token side by side). ``table`` lists the needs with the smallest buffer.
    Refuses (DramBudgetError naming the minimum) before anything is allocated or read.
    """
    if peaks is None:
        peaks = np.full((2, n_layers), d_ffn)
        k = 1 if k is None else k
    rows = []
    largest = max(capacity_for_window(int(p), d_ffn, margin) for p in peaks[0])
    if buffer_rows is not None and buffer_rows < 1:
        raise ValueError(f"read buffer needs at least one row, got {buffer_rows}")
    buffer_rows = largest if buffer_rows is None else min(int(buffer_rows), largest)
    b = buffer_rows * slot                    # larger loads are read in rounds (SparseEngine.token)
    for kk in range(peaks.shape[0]):
        caps = [capacity_for_window(int(p), d_ffn, margin) for p in peaks[kk]]
        m = sum(caps) * row_bytes
        rows.append({"k": kk, "matrix_rows": sum(caps), "matrix_bytes": m, "buffer_bytes": b,
                     "need_bytes": resident + m + b, "capacities": tuple(caps)})
    table = pd.DataFrame(rows)
    budget_b = int(table["need_bytes"].max() if budget is None else budget)
    table["fits"] = table["need_bytes"] <= budget_b
    if k is not None and k >= len(rows):
        raise ValueError(f"window k={k} exceeds the calibration trace (max k {len(rows) - 1}); "
                         "raise calibration_seq_len or max_window_k")
    need_min = int(table["need_bytes"].iloc[0 if k is None else k])
    if need_min > budget_b:
        raise DramBudgetError(
            f"DRAM budget {budget_b} B cannot hold the resident part ({resident} B) plus the window"
            f"{'' if k is None else f' k={k}'} (matrices + read buffer): minimum budget is {need_min} B "
            f"(window k={0 if k is None else k}{f', {need_min / model_bytes:.1%} of the model' if model_bytes else ''}); "
            f"nothing was read. Raise --dram-budget"
            f"{' or use a smaller window k' if k else ''}")
    if k is None:
        k = int(table.loc[table["fits"], "k"].max())
    if budget is not None:                    # the budget the window leaves grows the read buffer
        spare = budget_b - int(table.loc[k, "need_bytes"])
        buffer_rows = min(largest, buffer_rows + spare // slot)
    return Sizing(k, table.loc[k, "capacities"], buffer_rows, budget_b, table.drop(columns=["capacities"]))


# --- the sparse FFN module and the engine -------------------------------------------------

class SparseFFN(nn.Module):
    """The whole FFN x ``[..., d_model]`` -> y ``[..., d_model]`` of one layer, from the DRAM matrix."""

    def __init__(self, engine: "SparseEngine", layer: int):
        super().__init__()
        self.__dict__["engine"] = engine          # not a submodule: keeps state_dict() empty
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])           # [n_tokens, d_model]; batch 1, so rows are tokens
        if x2.shape[0] == 1:
            return self.engine.token(self.layer, x2).view(x.shape)
        return torch.cat([self.engine.token(self.layer, x2[t:t + 1]) for t in range(x2.shape[0])]).view(x.shape)


@dataclass
class LayerState:
    window: SlidingWindow
    matrix: NeuronMatrix | NaiveNeuronMatrix
    capacity: int
    act: nn.Module                     # the layer's activation (ReLU for OPT, SiLU for the gate)
    bias: torch.Tensor | None          # [d_ffn] up-projection bias (resident), per-row scalar
    out_bias: torch.Tensor | None      # [d_model]

    def __post_init__(self):           # CPU: gather the loaded neurons' biases with one numpy call
        b = self.bias
        self.bias_rows = (b.numpy() if b is not None and b.device.type == "cpu" and b.dtype != torch.bfloat16
                          else b)


class SparseEngine:
    """A model whose FFNs stream from flash (see the module docstring). Use as a context manager.

    ``engine.generate(ids, max_new_tokens=...)`` returns a ``GenerationResult`` whose ``stats`` is
    the per-step breakdown; ``engine.model.generate`` also works and is timed by the same hooks.
    The engine owns ``model``: unless the policy is "oracle" (which keeps a dense reference
    outside the budget), the model's dense FFN weights are dropped once the flash file exists.
    """

    def __init__(self, model, model_name: str, config: EngineConfig = ENGINE, *, predictors=None,
                 tokenizer=None, calibration: list[torch.Tensor] | None = None, flash_root=None,
                 progress: bool = False):
        cfg = self.config = config
        if cfg.layout not in layout.LAYOUTS:
            raise ValueError(f"layout must be one of {layout.LAYOUTS}, got {cfg.layout!r}")
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError("device 'cuda' asked for but torch.cuda.is_available() is False")
        self.model, self.model_name = model.eval().to(self.device), model_name
        self.adapter = a = ffn_adapter(model)
        self.dtype = next(model.parameters()).dtype
        self.flash_dtype = cfg.flash_dtype or str(self.dtype).removeprefix("torch.")
        self.active = ActiveSets(cfg.policy, a, predictors.to(self.device) if predictors is not None else None,
                                 cfg.density)
        ffn_names = layout.ffn_weight_names(model, a)
        self._size(ffn_names, predictors, tokenizer, calibration)       # refuses before any flash I/O
        self.flash_path = flash_file(model, a, model_name, cfg.layout, self.flash_dtype, flash_root,
                                     cfg.flash_preset, progress)        # written once per weights fingerprint
        self.store = self._open_store()
        self._install(ffn_names)
        self.counters = Counters()
        self.clock = TokenClock(self.counters, self.bytes_resident)
        self._hooks = install_step_hooks(model, self._begin, self.clock.forward_done)
        self._reading = False

    # -- setup helpers
    def _size(self, ffn_names: set, predictors, tokenizer, calibration) -> None:
        """Register the resident part, size every layer's matrix (Req_i) and the window k, or refuse."""
        model, a, cfg = self.model, self.adapter, self.config
        self.parts = resident_parts(model, a, ffn_names)
        if predictors is not None and cfg.policy == "predictor":
            self.parts["predictors"] = sum(_nbytes(p) for p in predictors.parameters())
        self.model_bytes = sum(_nbytes(p) for _, p in unique_parameters(model))
        self.ffn_bytes = self.model_bytes - sum(v for k, v in self.parts.items() if k != "predictors")
        resident = sum(self.parts.values())
        self.bytes_per_row = (len(a.vector_names) * a.d_model + (a.neuron_bias(0) is not None)) \
            * torch.empty((), dtype=self.dtype).element_size()
        slot = slot_bytes(a, cfg.layout, self.flash_dtype, cfg.flash_preset)
        budget = parse_budget(cfg.dram_budget, self.model_bytes, resident, self.ffn_bytes)
        peaks = None
        if cfg.policy != "all":
            if calibration is None:
                if tokenizer is None:
                    raise ValueError("sizing the window needs calibration token batches or a tokenizer")
                calibration = calibration_batches(tokenizer, cfg, getattr(model.config, "max_position_embeddings", None))
            trace = calibration_trace(model, a, self.active, [b.to(self.device) for b in calibration])
            peaks = peak_rows(trace, cfg.max_window_k, cfg.capacity_quantile)
        self.sizing = size_window(peaks, a.d_ffn, a.n_layers, resident, self.bytes_per_row, slot, budget,
                                  cfg.window_k, cfg.capacity_margin, self.model_bytes, cfg.read_buffer_rows)
        self.budget = DramBudget(self.sizing.budget_bytes)
        for name, nbytes in self.parts.items():
            self.budget.add_resident(name, nbytes)
        self.budget.add_resident("read buffer", self.sizing.buffer_rows * slot)
        self.budget.reserve_matrices(self.sizing.capacities, self.bytes_per_row)

    def _install(self, ffn_names: set) -> None:
        """Preallocate buffer and matrices, swap the SparseFFNs in, drop the dense FFN weights."""
        model, a, cfg = self.model, self.adapter, self.config
        self.buffer = self.store.new_buffer(self.sizing.buffer_rows)
        if self.device.type == "cuda":        # page-lock the read buffer: host-to-device copies go by DMA
            torch.cuda.cudart().cudaHostRegister(self.buffer.address, self.buffer.nbytes, 0)
        self._rows_view = self._buffer_rows()
        acts = [getattr(a.layers[l], "activation_fn", None) or a.layers[l].mlp.act_fn for l in range(a.n_layers)]
        self.layers = [self._layer_state(l, self.sizing.capacities[l], acts[l]) for l in range(a.n_layers)]
        # CPU, preallocated: the buffer's integer-word view, made once (NeuronMatrix.update_words)
        m0 = self.layers[0].matrix
        self._rows_words = m0.words_of(self._rows_view) if isinstance(m0, NeuronMatrix) \
            and self._rows_view is not None else None
        dense_modules = [(model.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]) for n in ffn_names]
        for l in range(a.n_layers):
            a.replace_ffn(l, SparseFFN(self, l))
        if cfg.free_dense and cfg.policy != "oracle":
            for mod, attr in dense_modules:
                setattr(mod, attr, nn.Parameter(torch.empty(0, dtype=self.dtype), requires_grad=False))

    def _open_store(self) -> FlashStore:
        store = FlashStore(self.flash_path, StoreConfig(n_threads=self.config.io_threads, io_mode="auto"))
        if self.config.verify:
            try:
                store.verify()
            except Exception:
                store.close()
                raise
        store.evict()
        return store

    def _buffer_rows(self) -> torch.Tensor | None:
        """``[capacity, bundle_width]`` torch view of the read buffer when its vectors are adjacent."""
        try:
            return self.buffer.bundles(torch=True)
        except ValueError:                    # separate layout with padded rows: gathered per read
            return None

    def _layer_state(self, layer: int, capacity: int, act) -> LayerState:
        a, cfg = self.adapter, self.config
        bias, out_bias = a.neuron_bias(layer), a.output_bias(layer)
        cls = NeuronMatrix if cfg.preallocated else NaiveNeuronMatrix
        matrix = cls(capacity, a.d_model, a.d_ffn, a.vector_names, ("bias",) if bias is not None else (),
                     dtype=self.dtype, device=self.device)
        k = self.sizing.k
        return LayerState(SlidingWindow(a.d_ffn, k), matrix, capacity, act,
                          None if bias is None else bias.detach(), None if out_bias is None else out_bias.detach())

    # -- the per-token loop
    def token(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """One token ``x [1, d_model]`` through layer ``layer``'s flash-backed FFN -> ``[1, d_model]``."""
        st, c = self.layers[layer], self.counters
        mask_t, score = self.active.batch(layer, x)
        mask = mask_t[0].cpu().numpy()
        n_active = np.count_nonzero(mask)
        if n_active > st.capacity:            # never exceed the matrix: keep the highest scores
            keep = torch.where(mask_t[0], score[0], torch.finfo(score.dtype).min).topk(st.capacity).indices
            mask = np.zeros_like(mask)
            mask[keep.cpu().numpy()] = True
            c.truncated += 1
        t0 = time.perf_counter()
        step = st.window.update(mask)
        evict = step.evict
        if step.n_resident > st.capacity:
            evict = np.union1d(evict, st.window.shrink_to_fit(st.capacity))
            c.shrunk += 1
        io = 0.0
        n, cap = step.load.size, self.buffer.capacity
        if n == 0 and evict.size:
            st.matrix.delete(evict)
        for s in range(0, n, cap):            # a load larger than the read buffer goes in rounds
            ids = step.load[s:s + cap]
            t_r = time.perf_counter()
            self._read(layer, ids)
            t_i = time.perf_counter()
            io += t_i - t_r
            bias = None if st.bias is None else {"bias": st.bias_rows[ids] if isinstance(st.bias_rows, np.ndarray)
                                                 else st.bias[torch.from_numpy(ids).to(st.bias.device)]}
            # evict and load in one pass: the new bundles fill the evicted rows (dram.NeuronMatrix.update)
            if self._rows_words is not None:
                st.matrix.update_words(evict if s == 0 else evict[:0], ids, self._rows_words[:ids.size], bias)
            else:
                st.matrix.update(evict if s == 0 else evict[:0], ids, self._loaded_rows(ids.size), bias)
        t3 = time.perf_counter()
        c.io_s += io
        c.mem_s += t3 - t0 - io
        c.neurons_loaded += n
        c.neurons_evicted += evict.size
        return st.matrix.ffn(x, st.act, st.out_bias).to(x.dtype)

    def _read(self, layer: int, ids: np.ndarray) -> None:
        self._reading = True
        before = self.store.counters.reads
        try:
            self.counters.bytes_read += self.store.read(layer, ids, self.buffer)
        except FlashFileError as e:
            raise EngineError(f"flash read of layer {layer} ({ids.size} neurons) from {self.flash_path} "
                              f"failed: {e}. Generation stops (no dense fallback); rewrite the flash file "
                              "or delete it so the engine writes it again") from e
        self.counters.reads += self.store.counters.reads - before
        self._reading = False

    def _loaded_rows(self, n: int) -> torch.Tensor:
        if self._rows_view is not None:
            return self._rows_view[:n]
        vecs = self.buffer.vectors(n, torch=True)
        return torch.cat([vecs[name] for name in self.adapter.vector_names], dim=1)

    # -- sequences, recovery, accounting
    def _begin(self, n_tokens: int, new_sequence: bool) -> None:
        if new_sequence:
            self.reset_sequence()
        self.clock.begin(n_tokens, new_sequence)

    def reset_sequence(self) -> None:
        """Empty every window and matrix (a new sequence starts with nothing cached)."""
        if self._reading:                     # a read was interrupted: its pool batch may still run
            self.recover()
        for st in self.layers:
            st.window.reset()
            st.matrix.delete(st.matrix.resident_ids())

    def recover(self) -> None:
        """After an interruption: reopen the store (drains the interrupted read), empty the caches."""
        self.store.close()
        self.store = self._open_store()
        self._reading = False
        self.reset_sequence()

    def before_run(self) -> None:
        """Cold-cache protocol: drop the flash file from the page cache (reads are O_DIRECT anyway)."""
        self.store.evict()

    def bytes_resident(self) -> int:
        """DRAM held now: resident weights + read buffer + the matrices' filled rows."""
        return self.budget.resident_bytes + sum(st.matrix.bytes_resident for st in self.layers)

    def generate(self, input_ids, **gen_kwargs) -> GenerationResult:
        """``model.generate`` (greedy unless ``do_sample=True``) with the per-step breakdown."""
        return run_generate(self, input_ids, gen_kwargs)

    def layer_report(self) -> pd.DataFrame:
        """Per layer: matrix rows, resident rows now, and the window's counters."""
        return pd.DataFrame([{"layer": l, "capacity": st.capacity, "num_used": st.matrix.num_used,
                              "tokens": st.window.stats.tokens, "loaded": st.window.stats.loaded,
                              "hit_rate": st.window.stats.hit_rate, "peak_resident": st.window.stats.peak_resident}
                             for l, st in enumerate(self.layers)])

    def close(self) -> None:
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []
        if self.device.type == "cuda" and getattr(self, "buffer", None) is not None:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.address)
            self.buffer = None
        if getattr(self, "store", None) is not None:
            self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
