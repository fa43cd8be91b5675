"""Naive and hybrid baselines (paper sec 4 "Baselines", Tables 2 and 3): weights read from flash every token.

``StreamingBaseline(model, name, budget)`` keeps the weight groups that fit ``budget`` resident,
in the paper's order (embeddings and output head, then each layer's attention and norms, then
whole FFN layers), and streams every other group from disk on every forward step:

* non-FFN groups from an aligned copy of those weights on the same disk (``write_stream_file``),
  read with O_DIRECT in large chunks straight into the memory the model's parameters point at
  (the parameters are views of an aligned buffer; all streamed layers share one buffer);
* FFN layers from the model's flash file through ``FlashStore`` in large coalesced reads (the
  whole layer), computed densely from the buffer.

Budget 0 is the paper's *naive* row (nothing resident, the whole model read per token); half
the model is *hybrid* (non-FFN weights plus as many whole FFN layers as fit). The KV cache
stays in DRAM as in the paper. Timing and the per-step table are the engine's (``TokenClock``).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import layout
from .config import ENGINE, StoreConfig
from .engine import (Counters, EngineError, GenerationResult, TokenClock, _nbytes, default_flash_root,
                     flash_file, install_step_hooks, model_fingerprint, parse_budget, resident_parts,
                     run_generate, slot_bytes, unique_parameters)
from .dram import DramBudgetError
from .models import ffn_adapter
from .store import IO_BUFFERED, AlignedBuffer, FlashFileError, FlashStore, ReadPool, evict_from_page_cache, \
    open_for_reads

STREAM_FORMAT = "flashlib-stream"
STREAM_ALIGN = 4096         # group offsets and lengths (O_DIRECT)
PARAM_ALIGN = 64            # parameter offsets inside a group
CHUNK_BYTES = 1 << 20       # one read: the same cap as StoreConfig.max_read_bytes


def _group_of(name: str) -> str:
    m = re.search(r"\.layers\.(\d+)\.", f".{name}")
    return f"layer {int(m.group(1))}" if m else "globals"


def stream_groups(model, ffn_names: set[str]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Non-FFN parameters by group: "globals" (embeddings, head, final norm) and "layer l"."""
    groups: dict[str, list] = {}
    for name, p in unique_parameters(model):
        if name not in ffn_names and p.numel():
            groups.setdefault(_group_of(name), []).append((name, p))
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] != "globals", int(kv[0].split()[-1])
                                                       if kv[0] != "globals" else 0)))


def _group_plan(params) -> tuple[list[dict], int]:
    entries, off = [], 0
    for name, p in params:
        entries.append({"name": name, "offset": off, "shape": list(p.shape), "dtype": str(p.dtype)})
        off = layout.round_up(off + _nbytes(p), PARAM_ALIGN)
    return entries, layout.round_up(max(off, 1), STREAM_ALIGN)


def write_stream_file(groups: dict, path: Path) -> dict:
    """Write the non-FFN weights, one aligned region per group, and the manifest ``<path>.json``."""
    path = Path(path)
    manifest, offset = {"format": STREAM_FORMAT, "groups": {}}, 0
    with layout.atomic_file(path) as f:
        for gname, params in groups.items():
            entries, nbytes = _group_plan(params)
            buf = bytearray(nbytes)
            for e, (_, p) in zip(entries, params):
                raw = p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                buf[e["offset"]:e["offset"] + len(raw)] = raw
            f.write(buf)
            manifest["groups"][gname] = {"offset": offset, "nbytes": nbytes, "params": entries}
            offset += nbytes
    evict_from_page_cache(path)
    layout.write_json_atomic(manifest, layout.manifest_path(path))
    return manifest


def stream_file(model, groups: dict, model_name: str, root=None) -> tuple[Path, dict]:
    """The aligned non-FFN copy for this model (written once per weights fingerprint)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)
    path = Path(root or default_flash_root()) / f"{slug}-{model_fingerprint(model)}" / "stream.bin"
    mpath = layout.manifest_path(path)
    if mpath.exists():
        return path, json.loads(mpath.read_text())
    return path, write_stream_file(groups, path)


def dense_ffn(x: torch.Tensor, vecs: dict, bias, out_bias, act, gated: bool) -> torch.Tensor:
    """Dense FFN from ``[d_ffn, d_model]`` (strided) vector views: x ``[n, d_model]`` -> ``[n, d_model]``."""
    pre = x @ vecs["up"].T
    if bias is not None:
        pre = pre + bias
    h = act(x @ vecs["gate"].T) * pre if gated else act(pre)
    y = h @ vecs["down"]
    return y if out_bias is None else y + out_bias


class StreamedFFN(nn.Module):
    """One FFN layer read whole from the flash file while it computes (naive and hybrid rows).

    The FFN is a sum over neurons, so the layer streams in chunks of ``runner.chunk_rows``
    neurons through one staging buffer: y = sum_c act(x @ up_c.T + b_c) @ down_c (+ output bias).
    """

    def __init__(self, runner: "StreamingBaseline", layer: int, act, bias, out_bias):
        super().__init__()
        self.__dict__["runner"] = runner
        self.layer, self.act, self.bias, self.out_bias = layer, act, bias, out_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, x2 = self.runner, x.reshape(-1, x.shape[-1])
        y = None
        for s in range(0, r.adapter.d_ffn, r.chunk_rows):
            n = r.read_ffn(self.layer, s)
            vecs = {k: v[:n] for k, v in r.ffn_vectors.items()}
            part = dense_ffn(x2, vecs, None if self.bias is None else self.bias[s:s + n], None, self.act,
                             r.adapter.gated)
            y = part if y is None else y + part
        y = y if self.out_bias is None else y + self.out_bias
        return y.view(x.shape)


class StreamingBaseline:
    """The naive (budget 0) and hybrid (half the model) baselines; same interface as ``SparseEngine``."""

    def __init__(self, model, model_name: str, dram_budget=0.0, *, flash_root=None,
                 store_config: StoreConfig = StoreConfig(), chunk_bytes: int = CHUNK_BYTES, progress: bool = False):
        self.model, self.model_name = model.eval(), model_name
        self.device = torch.device("cpu")
        self.adapter = a = ffn_adapter(model)
        self.dtype = next(model.parameters()).dtype
        dtype = str(self.dtype).removeprefix("torch.")
        ffn_names = layout.ffn_weight_names(model, a)
        groups = stream_groups(model, ffn_names)
        self.model_bytes = sum(_nbytes(p) for _, p in unique_parameters(model))
        ffn_layer_bytes = [sum(_nbytes(v) for v in a.neuron_vectors(l).values()) for l in range(a.n_layers)]
        sizes = {g: sum(_nbytes(p) for _, p in ps) for g, ps in groups.items()}
        sizes.update({f"ffn {l}": b for l, b in enumerate(ffn_layer_bytes)})
        resident_w = sum(resident_parts(model, a, ffn_names).values())
        budget = 0 if dram_budget in (0, 0.0, None) else parse_budget(dram_budget, self.model_bytes, resident_w,
                                                                       sum(ffn_layer_bytes))
        slot = slot_bytes(a, "bundled", dtype, ENGINE.flash_preset)
        self.chunk_rows = max(1, min(a.d_ffn, chunk_bytes // slot))       # FFN neurons per streamed chunk
        staging = {"globals": _group_plan(groups["globals"])[1] if "globals" in groups else 0,
                   "layer": max((_group_plan(ps)[1] for g, ps in groups.items() if g != "globals"), default=0),
                   "ffn": self.chunk_rows * slot}
        self.resident_groups = chosen = self._choose_resident(sizes, budget, staging)
        need = sum(sizes[g] for g in chosen) + sum(
            staging[kind] for kind, streams in (("globals", "globals" in sizes and "globals" not in chosen),
                                                ("layer", any(g.startswith("layer") and g not in chosen for g in sizes)),
                                                ("ffn", any(g.startswith("ffn") and g not in chosen for g in sizes)))
            if streams)
        if budget > 0 and need > budget:
            raise DramBudgetError(f"DRAM budget {budget} B cannot hold the hybrid baseline's read buffers and "
                                  f"resident groups: minimum budget is {need} B; nothing was read")
        self.budget_bytes, self.group_bytes = budget, sizes
        # flash files, opened with O_DIRECT (verified once when written)
        self.flash_path = flash_file(model, a, model_name, "bundled", dtype, flash_root, ENGINE.flash_preset, progress)
        self.stream_path, self.manifest = stream_file(model, groups, model_name, flash_root)
        self.store_config = store_config
        self.streamed_layers = [l for l in range(a.n_layers) if f"ffn {l}" not in self.resident_groups]
        self._open_files()
        # streamed non-FFN groups: parameters become views of aligned buffers read before use
        self.buffers = {}
        layer_groups = [g for g in groups if g != "globals" and g not in self.resident_groups]
        if "globals" not in self.resident_groups:
            self.buffers["globals"] = self._bind("globals", groups["globals"], None)
        if layer_groups:
            shared = AlignedBuffer(1, max(self.manifest["groups"][g]["nbytes"] for g in layer_groups))
            for g in layer_groups:
                self.buffers[g] = self._bind(g, groups[g], shared)
        # streamed FFN layers: one shared buffer of a whole layer
        acts = [getattr(a.layers[l], "activation_fn", None) or a.layers[l].mlp.act_fn for l in range(a.n_layers)]
        if self.streamed_layers:
            self.ffn_buffer = self.store.new_buffer(self.chunk_rows)
            self.ffn_vectors = self.ffn_buffer.vectors(torch=True)
            self._all_ids = np.arange(a.d_ffn)
            dense = [(model.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]) for n in ffn_names
                     if int(re.search(r"\.layers\.(\d+)\.", f".{n}").group(1)) in self.streamed_layers]
            for l in self.streamed_layers:
                bias, ob = a.neuron_bias(l), a.output_bias(l)
                a.replace_ffn(l, StreamedFFN(self, l, acts[l], None if bias is None else bias.detach(),
                                             None if ob is None else ob.detach()))
            for mod, attr in dense:
                setattr(mod, attr, nn.Parameter(torch.empty(0, dtype=self.dtype), requires_grad=False))
        self.counters = Counters()
        self.clock = TokenClock(self.counters, self.bytes_resident)
        self._hooks = install_step_hooks(model, lambda n, new: self.clock.begin(n, new), self.clock.forward_done)
        if "globals" in self.buffers:
            self._hooks.append(model.register_forward_pre_hook(lambda *_: self.read_group("globals")))
        for g in layer_groups:
            layer = a.layers[int(g.split()[-1])]
            self._hooks.append(layer.register_forward_pre_hook(lambda *_, g=g: self.read_group(g)))

    @staticmethod
    def _choose_resident(sizes: dict, budget: int, staging: dict | None = None) -> set[str]:
        """Greedy in the paper's order: globals, attention of every layer, then whole FFN layers.

        ``staging`` (bytes of the read buffers: "globals", "layer", "ffn"; default: the groups'
        own sizes) is kept aside for what streams, so the resident part plus the buffers fit.
        """
        if budget <= 0:
            return set()
        ffn = [g for g in sizes if g.startswith("ffn")]
        layers = [g for g in sizes if g.startswith("layer")]
        staging = staging or {"globals": sizes.get("globals", 0), "layer": max((sizes[g] for g in layers), default=0),
                              "ffn": max((sizes[g] for g in ffn), default=0)}
        chosen, used = set(), 0
        for g in [g for g in sizes if not g.startswith("ffn")] + ffn:
            reserve = staging["layer"] + staging["ffn"] + (0 if "globals" in chosen or g == "globals"
                                                           else staging["globals"])
            if used + sizes[g] + reserve <= budget:
                chosen.add(g)
                used += sizes[g]
        return chosen

    def _open_files(self) -> None:
        self.store = FlashStore(self.flash_path, self.store_config) if self.streamed_layers else None
        self.stream_fd, self.stream_mode = open_for_reads(self.stream_path, "auto", probe=((0, STREAM_ALIGN, 0),))
        self.pool = ReadPool(self.stream_fd, self.store_config.n_threads,
                             drop_after_read=self.stream_mode == IO_BUFFERED)
        self._reading = False

    def _bind(self, gname: str, params, shared: AlignedBuffer | None) -> AlignedBuffer:
        """Point every parameter of a streamed group at its slot in an aligned buffer."""
        g = self.manifest["groups"][gname]
        buf = shared or AlignedBuffer(1, g["nbytes"])
        for e, (name, p) in zip(g["params"], params):
            if e["name"] != name:
                raise EngineError(f"{self.stream_path}: group {gname} lists {e['name']}, model has {name}; "
                                  "delete the stream file so it is written again")
            view = torch.frombuffer(buf.memoryview, dtype=p.dtype, count=p.numel(), offset=e["offset"])
            p.data = view.view(p.shape)
        return buf

    # -- reads
    def read_group(self, gname: str) -> None:
        """Read one non-FFN group from the stream file into its buffer (large O_DIRECT chunks)."""
        g, buf = self.manifest["groups"][gname], self.buffers[gname]
        reads = [(g["offset"] + s, [buf.memoryview[s:min(s + CHUNK_BYTES, g["nbytes"])]],
                  min(CHUNK_BYTES, g["nbytes"] - s)) for s in range(0, g["nbytes"], CHUNK_BYTES)]
        self._timed(lambda: self.pool.run(reads), len(reads), f"{self.stream_path} ({gname})")

    def read_ffn(self, layer: int, start: int) -> int:
        """Read neurons ``start .. start + chunk_rows`` of an FFN layer into the staging buffer."""
        ids = self._all_ids[start:start + self.chunk_rows]
        before = self.store.counters.reads
        self._timed(lambda: self.store.read(layer, ids, self.ffn_buffer), 0,
                    f"{self.flash_path} (FFN layer {layer})")
        self.counters.reads += self.store.counters.reads - before
        self.counters.neurons_loaded += ids.size
        return ids.size

    def _timed(self, fn, n_reads: int, what: str) -> None:
        self._reading = True
        t0 = time.perf_counter()
        try:
            nbytes = fn()
        except (FlashFileError, OSError) as e:
            raise EngineError(f"read of {what} failed: {e}; generation stops (no fallback)") from e
        self.counters.io_s += time.perf_counter() - t0
        self.counters.bytes_read += nbytes
        self.counters.reads += n_reads
        self._reading = False

    # -- runner interface (see engine.run_generate)
    def before_run(self) -> None:
        evict_from_page_cache(self.stream_path)
        evict_from_page_cache(self.flash_path)

    def recover(self) -> None:
        self.close_files()
        self._open_files()

    def bytes_resident(self) -> int:
        """Resident groups plus the staging buffers (the model's DRAM between tokens)."""
        staging = sum({id(b): b.nbytes for b in self.buffers.values()}.values())
        if self.streamed_layers:
            staging += self.ffn_buffer.nbytes
        return sum(self.group_bytes[g] for g in self.resident_groups) + staging

    def generate(self, input_ids, **gen_kwargs) -> GenerationResult:
        return run_generate(self, input_ids, gen_kwargs)

    def report(self) -> pd.DataFrame:
        """group | bytes | resident."""
        return pd.DataFrame([{"group": g, "bytes": b, "resident": g in self.resident_groups}
                             for g, b in self.group_bytes.items()])

    def close_files(self) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.close()
            os.close(self.stream_fd)
            self.pool = None
        if getattr(self, "store", None) is not None:
            self.store.close()

    def close(self) -> None:
        for h in getattr(self, "_hooks", []):
            h.remove()
        self.close_files()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
