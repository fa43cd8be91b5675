"""Sparse inference engine (paper sec 3 and Table 3): flash-backed FFNs inside Hugging Face ``generate()``.

``SparseEngine(model, name, config)`` sizes the DRAM budget, writes (or opens) the model's FFN
flash file, and swaps every FFN (``adapter.replace_ffn``) for a ``flashffn.SparseFFN``: the one
per-token sparse path (active set -> window -> O_DIRECT reads -> DRAM matrix -> FFN over the
resident rows; see ``flashlib.flashffn``). The same engine runs every tier: SmolLM2, the ReLU OPT,
and OPT 6.7B's geometry as a real ``OPTForCausalLM`` with synthetic weights
(``flashlib.paperscale``: FFN weights never in DRAM, active sets from a calibrated trace).

The DRAM budget (``DramBudget``) holds the resident part (embeddings, attention, norms, biases,
predictors, the read buffer) and the per-layer matrices, sized (Req_i) from a calibration trace;
a budget that cannot hold them is refused before any flash read. Compute runs in the model's
dtype or ``EngineConfig.compute_dtype`` (bf16 is fast here: AMX); the flash file keeps its own
dtype (fp16 at paper scale: Table 2's bytes) and loaded bundles are converted on insert.
The step clock (``flashlib.clock``) splits each step into io_ms (inside reads), mem_ms (window
logic, row conversion, matrix update) and compute_ms (everything else).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import layout, paths
from .clock import EngineError, GenerationResult, TokenClock, install_step_hooks, run_generate
from .config import ENGINE, FLASH_FILE_PRESETS, CORPUS, EngineConfig, StoreConfig, smoke_mode
from .dram import CONVERT_ELEMS, DramBudget, DramBudgetError, NaiveNeuronMatrix, NeuronMatrix, capacity_for_window
from .flashffn import ActiveSets, FlashFFN, LayerState, LoadedRows, SparseFFN, conversion
from .models import ffn_adapter
from .sparsity import run_with_ffn_inputs
from .store import FlashStore
from .window import SlidingWindow, resident_sizes

CAPACITY_MODES = ("window", "budget")


# --- model bytes, budgets, artifacts --------------------------------------------------------

def unique_parameters(model) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter, tied weights once (meta tensors, which have no storage,
    by identity: the paper-scale model's FFN weights live only on flash)."""
    seen, out = set(), []
    for name, p in model.named_parameters(remove_duplicate=False):
        key = ("meta", id(p)) if p.is_meta else (p.device, p.data_ptr())
        if key in seen and p.numel():
            continue
        seen.add(key)
        out.append((name, p))
    return out


def to_device(model, device, names=None) -> None:
    """Move the model's materialised parameters (only ``names``, if given) and its buffers to ``device``;
    meta parameters (weights that live only on flash) stay where they are."""
    params = dict(model.named_parameters(remove_duplicate=False))
    by_id: dict[int, list[str]] = {}
    for n, p in params.items():
        by_id.setdefault(id(p), []).append(n)
    wanted = None if names is None else set(names)
    for ns in by_id.values():
        p = params[ns[0]]
        if p.is_meta or p.device == torch.device(device) or (wanted is not None and not wanted & set(ns)):
            continue
        moved = nn.Parameter(p.detach().to(device), requires_grad=False)
        for n in ns:
            mod, attr = n.rsplit(".", 1) if "." in n else ("", n)
            setattr(model.get_submodule(mod), attr, moved)
    for mod in model.modules():
        for k, b in list(mod._buffers.items()):
            if b is not None and not b.is_meta:
                mod._buffers[k] = b.to(device)


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
    """The model's FFN flash file in ``layout_name``/``dtype`` (written once per weights fingerprint
    from the model's own FFN weights; a model whose FFN lives only on flash passes its file to the
    engine instead, see ``check_flash_file``)."""
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


def check_flash_file(path: Path, adapter, layout_name: str, dtype: str) -> Path:
    """An existing flash file for this model (e.g. paper scale's, written layer by layer from the
    synthetic generator): its manifest must match the model's geometry, the layout and the dtype."""
    path = Path(path)
    mpath = layout.manifest_path(path)
    if not mpath.exists():
        raise FileNotFoundError(f"flash file {path} or its manifest {mpath.name} does not exist")
    m = json.loads(mpath.read_text())
    want = {"layout": layout_name, "dtype": dtype, "n_layers": adapter.n_layers, "d_model": adapter.d_model,
            "d_ffn": adapter.d_ffn, "vector_names": list(adapter.vector_names)}
    bad = [f"{k}={m.get(k)!r} (the model needs {v!r})" for k, v in want.items() if m.get(k) != v]
    if bad:
        raise ValueError(f"flash file {path} does not fit this model: manifest " + ", ".join(bad)
                         + "; write it for this model or pass the right file")
    return path


# --- active sets and window sizing ----------------------------------------------------------

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

    ``trace``: bool ``[n_seq, T, n_layers, d_ffn]``.
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
                buffer_rows: int | None = None, capacity: str = "window") -> Sizing:
    """Window k and the rows of every layer's matrix that fit ``budget`` with the read buffer and
    the resident part.

    ``capacity`` "window": the largest k (or the given one) whose Req_i (``peaks`` + margin) fit.
    "budget" (k must be given): the matrices take what the budget affords, up to Req_i of k and
    never below one token's largest set (k=0 row); where a token's window outgrows its matrix the
    window shrinks (``SlidingWindow.shrink_to_fit``), as the paper does for Persimmon, Phi-2 and
    Llama 2 (App. C: window shrunk, or no new caching, past a memory limit).
    ``peaks`` None means every neuron is active (policy "all"): d_ffn rows per layer, k = 1.
    ``buffer_rows`` None: the read buffer holds the largest single active set (+ margin); fewer
    rows make larger loads go in rounds (``FlashFFN.token``). With a byte budget, what the matrices
    leave of it grows the buffer (never past the largest single active set): fewer rounds at no
    cost to the window. ``slot``: read-buffer bytes per row (conversion rows included).
    ``table`` lists the needs with the smallest buffer.
    Refuses (DramBudgetError naming the minimum) before anything is allocated or read.
    """
    if capacity not in CAPACITY_MODES:
        raise ValueError(f"capacity must be one of {CAPACITY_MODES}, got {capacity!r}")
    if capacity == "budget" and k is None:
        raise ValueError("capacity 'budget' sizes the matrices for a given window: set window_k")
    if peaks is None:
        peaks = np.full((2, n_layers), d_ffn)
        k = 1 if k is None else k
    rows = []
    largest = max(capacity_for_window(int(p), d_ffn, margin) for p in peaks[0])
    if buffer_rows is not None and buffer_rows < 1:
        raise ValueError(f"read buffer needs at least one row, got {buffer_rows}")
    buffer_rows = largest if buffer_rows is None else min(int(buffer_rows), largest)
    b = buffer_rows * slot                    # larger loads are read in rounds (FlashFFN.token)
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
    need_min = int(table["need_bytes"].iloc[0 if k is None or capacity == "budget" else k])
    if need_min > budget_b:
        raise DramBudgetError(
            f"DRAM budget {budget_b} B cannot hold the resident part ({resident} B) plus the window"
            f"{'' if k is None else f' k={k}'} (matrices + read buffer): minimum budget is {need_min} B "
            f"(window k={0 if k is None or capacity == 'budget' else k}"
            f"{f', {need_min / model_bytes:.1%} of the model' if model_bytes else ''}); "
            f"nothing was read. Raise --dram-budget"
            f"{' or use a smaller window k' if k else ''}")
    if k is None:
        k = int(table.loc[table["fits"], "k"].max())
    caps = table.loc[k, "capacities"]
    if capacity == "budget" and not table.loc[k, "fits"]:
        caps = _fill(table.loc[0, "capacities"], caps, (budget_b - resident - b) // row_bytes)
    if budget is not None:                    # what the matrices leave of the budget grows the read buffer
        spare = budget_b - resident - sum(caps) * row_bytes - b
        buffer_rows = min(largest, buffer_rows + spare // slot)
    return Sizing(k, tuple(caps), buffer_rows, budget_b, table.drop(columns=["capacities"]))


def _fill(floor, want, total: int) -> list[int]:
    """Rows per layer between ``floor`` and ``want`` that sum to at most ``total``: each layer gets
    the same share of what it wants above its floor."""
    floor, want = np.asarray(floor, np.int64), np.asarray(want, np.int64)
    s = (total - floor.sum()) / max(1, (want - floor).sum())
    return [int(x) for x in floor + np.floor((want - floor) * min(1.0, max(0.0, s))).astype(np.int64)]


# --- the engine -------------------------------------------------------------------------------

class SparseEngine:
    """A model whose FFNs stream from flash (see the module docstring). Use as a context manager.

    ``engine.generate(ids, max_new_tokens=...)`` returns a ``GenerationResult`` whose ``stats`` is
    the per-step breakdown; ``engine.model.generate`` also works and is timed by the same hooks.
    The engine owns ``model``: unless the policy is "oracle" (which keeps a dense reference
    outside the budget), the model's dense FFN weights are dropped once the flash file exists.

    ``flash_path``: an existing flash file of this model (checked against its geometry) instead
    of one written from the model's FFN weights: paper scale, whose FFN is never in DRAM.
    ``trace`` / ``sizing_trace``: the "trace" policy's active sets ``[T, n_layers, d_ffn]`` (bool)
    for the run and for sizing the matrices (another draw of the generator, as the paper sizes
    Req_i on other text than it measures).
    """

    def __init__(self, model, model_name: str, config: EngineConfig = ENGINE, *, predictors=None,
                 tokenizer=None, calibration: list[torch.Tensor] | None = None, flash_root=None,
                 flash_path=None, trace: np.ndarray | None = None, sizing_trace: np.ndarray | None = None,
                 progress: bool = False):
        cfg = self.config = config
        if cfg.layout not in layout.LAYOUTS:
            raise ValueError(f"layout must be one of {layout.LAYOUTS}, got {cfg.layout!r}")
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError("device 'cuda' asked for but torch.cuda.is_available() is False")
        self.model_dtype = next(model.parameters()).dtype
        self.dtype = getattr(torch, cfg.compute_dtype) if cfg.compute_dtype else self.model_dtype
        model = model.eval() if self.dtype == self.model_dtype else model.eval().to(self.dtype)
        if self.device.type != "cpu":
            to_device(model, self.device)
        self.model, self.model_name = model, model_name
        self.adapter = a = ffn_adapter(model)
        self.flash_dtype = cfg.flash_dtype or str(self.model_dtype).removeprefix("torch.")
        self.active = ActiveSets(cfg.policy, a, predictors.to(self.device) if predictors is not None else None,
                                 cfg.density, trace)
        ffn_names = layout.ffn_weight_names(model, a)
        self._size(ffn_names, predictors, tokenizer, calibration, sizing_trace)    # refuses before any flash I/O
        self.flash_path = (check_flash_file(flash_path, a, cfg.layout, self.flash_dtype) if flash_path is not None
                           else flash_file(model, a, model_name, cfg.layout, self.flash_dtype, flash_root,
                                           cfg.flash_preset, progress))       # written once per weights fingerprint
        self.store = self._open_store()
        self.flash = self._install(ffn_names)
        self.counters = self.flash.counters
        self.clock = TokenClock(self.counters, self.bytes_resident)
        self.step_start = 0                  # sequence position of the current step's first token
        self._hooks = install_step_hooks(model, self._begin, self.clock.forward_done)

    # -- setup helpers
    def _size(self, ffn_names: set, predictors, tokenizer, calibration, sizing_trace) -> None:
        """Register the resident part, size every layer's matrix (Req_i) and the window k, or refuse."""
        model, a, cfg = self.model, self.adapter, self.config
        self.parts = resident_parts(model, a, ffn_names)
        if predictors is not None and cfg.policy in ("predictor", "trace"):
            self.parts["predictors"] = sum(_nbytes(p) for p in predictors.parameters())
        self.model_bytes = sum(_nbytes(p) for _, p in unique_parameters(model))
        self.ffn_bytes = self.model_bytes - sum(v for k, v in self.parts.items() if k != "predictors")
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        width = len(a.vector_names) * a.d_model
        self.bytes_per_row = (width + (a.neuron_bias(0) is not None)) * itemsize
        slot = slot_bytes(a, cfg.layout, self.flash_dtype, cfg.flash_preset)
        self.conversion = conversion(self.flash_dtype, self.dtype, cfg.preallocated, self.device)
        if self.conversion == "convert":      # loaded bundles are cast into rows of the compute dtype first
            slot += width * itemsize
            if itemsize < 4 and np.dtype(self.flash_dtype).itemsize < 4:     # via an fp32 scratch
                self.parts["conversion scratch"] = min(CONVERT_ELEMS, a.d_ffn * width) * 4
        resident = sum(self.parts.values())
        budget = parse_budget(cfg.dram_budget, self.model_bytes, resident, self.ffn_bytes)
        peaks = None
        if cfg.policy == "trace":
            if sizing_trace is None:
                raise ValueError("policy 'trace' needs a sizing_trace [T, n_layers, d_ffn] to size the matrices")
            peaks = peak_rows(np.asarray(sizing_trace)[None], cfg.max_window_k, cfg.capacity_quantile)
        elif cfg.policy != "all":
            if calibration is None:
                if tokenizer is None:
                    raise ValueError("sizing the window needs calibration token batches or a tokenizer")
                calibration = calibration_batches(tokenizer, cfg, getattr(model.config, "max_position_embeddings", None))
            trace = calibration_trace(model, a, self.active, [b.to(self.device) for b in calibration])
            peaks = peak_rows(trace, cfg.max_window_k, cfg.capacity_quantile)
        self.sizing = size_window(peaks, a.d_ffn, a.n_layers, resident, self.bytes_per_row, slot, budget,
                                  cfg.window_k, cfg.capacity_margin, self.model_bytes, cfg.read_buffer_rows,
                                  cfg.capacity)
        self.budget = DramBudget(self.sizing.budget_bytes)
        for name, nbytes in self.parts.items():
            self.budget.add_resident(name, nbytes)
        self.budget.add_resident("read buffer", self.sizing.buffer_rows * slot)
        self.budget.reserve_matrices(self.sizing.capacities, self.bytes_per_row)

    def _install(self, ffn_names: set) -> FlashFFN:
        """Preallocate buffer and matrices, swap the SparseFFNs in, drop the dense FFN weights."""
        model, a, cfg = self.model, self.adapter, self.config
        self.buffer = self.store.new_buffer(self.sizing.buffer_rows)
        if self.device.type == "cuda":        # page-lock the read buffer: host-to-device copies go by DMA
            torch.cuda.cudart().cudaHostRegister(self.buffer.address, self.buffer.nbytes, 0)
        acts = [getattr(a.layers[l], "activation_fn", None) or a.layers[l].mlp.act_fn for l in range(a.n_layers)]
        layers = [self._layer_state(l, self.sizing.capacities[l], acts[l]) for l in range(a.n_layers)]
        rows = LoadedRows(self.buffer, a.vector_names, layers[0].matrix, self.dtype, self.device, self.conversion)
        dense_modules = [(model.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]) for n in ffn_names]
        for l in range(a.n_layers):
            a.replace_ffn(l, SparseFFN(self, l))
        if cfg.free_dense and cfg.policy != "oracle":
            for mod, attr in dense_modules:
                setattr(mod, attr, nn.Parameter(torch.empty(0, dtype=self.dtype), requires_grad=False))
        return FlashFFN(self.store, self.buffer, layers, self.active, rows)

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

    def _layer_state(self, layer: int, capacity: int, act) -> LayerState:
        a, cfg = self.adapter, self.config
        bias, out_bias = a.neuron_bias(layer), a.output_bias(layer)
        cls = NeuronMatrix if cfg.preallocated else NaiveNeuronMatrix
        matrix = cls(capacity, a.d_model, a.d_ffn, a.vector_names, ("bias",) if bias is not None else (),
                     dtype=self.dtype, device=self.device)
        return LayerState(SlidingWindow(a.d_ffn, self.sizing.k), matrix, capacity, act,
                          None if bias is None else bias.detach(), None if out_bias is None else out_bias.detach())

    # -- sequences, recovery, accounting
    def _begin(self, n_tokens: int, past: int) -> None:
        if past == 0:
            self.reset_sequence()
        self.step_start = past
        self.clock.begin(n_tokens, past == 0)

    def reset_sequence(self) -> None:
        """Empty every window and matrix (a new sequence starts with nothing cached)."""
        if self.flash.reading:                # a read was interrupted: its pool batch may still run
            self.recover()
        self.flash.reset()

    def recover(self) -> None:
        """After an interruption: reopen the store (drains the interrupted read), empty the caches."""
        self.store.close()
        self.store = self.flash.store = self._open_store()
        self.flash.reading = False
        self.flash.reset()

    def before_run(self) -> None:
        """Cold-cache protocol: drop the flash file from the page cache (reads are O_DIRECT anyway)."""
        self.store.evict()

    def bytes_resident(self) -> int:
        """DRAM held now: resident weights + read buffer + the matrices' filled rows."""
        return self.budget.resident_bytes + self.flash.bytes_resident()

    def weight_bytes_held(self) -> int:
        """Bytes of every weight tensor this process holds for the engine, counted from the tensors:
        the model's materialised parameters, the matrices at capacity, the read buffer and the
        conversion rows (what a memory-limited worker subtracts to find its own overhead)."""
        params = sum(_nbytes(p) for _, p in unique_parameters(self.model) if not p.is_meta)
        preds = self.active.predictors
        params += 0 if preds is None else sum(_nbytes(p) for p in preds.parameters())
        mats = sum(st.matrix.bytes_capacity for st in self.flash.layers)
        return params + mats + self.buffer.nbytes + self.flash.loaded.extra_bytes()

    def generate(self, input_ids, **gen_kwargs) -> GenerationResult:
        """``model.generate`` (greedy unless ``do_sample=True``) with the per-step breakdown."""
        return run_generate(self, input_ids, gen_kwargs)

    def layer_report(self) -> pd.DataFrame:
        """Per layer: matrix rows, resident rows now, and the window's counters."""
        return pd.DataFrame([{"layer": l, "capacity": st.capacity, "num_used": st.matrix.num_used,
                              "tokens": st.window.stats.tokens, "loaded": st.window.stats.loaded,
                              "hit_rate": st.window.stats.hit_rate, "peak_resident": st.window.stats.peak_resident}
                             for l, st in enumerate(self.flash.layers)])

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
