"""Dense streaming (paper sec 4 "Baselines", Tables 2 and 3), and the page-cache baseline: what is not resident is read every token.

``StreamingBaseline(model, name, budget)`` keeps the weight groups that fit ``budget`` resident,
in the paper's order (embeddings and output head, then each layer's attention and norms, then
whole FFN layers), and streams every other group on every forward step from the model's on-disk
copy (``WeightFiles``: the bundled FFN flash file and the stream file of the non-FFN weights):

* ``source="direct"`` (the paper's naive and hybrid rows): O_DIRECT reads in large chunks into
  aligned staging buffers (the parameters of a streamed group are views of them);
* ``source="mmap"`` (the page-cache baseline, llama.cpp-style): the files are mapped lazily, a
  group is "read" by touching its pages (each fault served by the page cache or the disk, timed as
  I/O; bytes and faults from the kernel) and computed from the mapping. Its worker's cgroup limit
  decides what stays cached (``flashlib.workers``).

FFN layers stream in chunks of ``chunk_bytes`` (the FFN is a sum over neurons:
y = sum_c act(x @ up_c.T + b_c) @ down_c). When the files' dtype differs from the compute dtype
(paper scale: fp16 on disk, bf16 or fp32 compute), streamed bytes are converted into compute
buffers, counted as compute (the paper's naive row has no memory management). Budget 0 is the
paper's *naive* row (the whole model read per token); half the model is *hybrid*. The KV cache
stays in DRAM as in the paper. The clock is the engine's (``flashlib.clock``).
"""
from __future__ import annotations

import json
import mmap
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from . import layout
from .cgroup import KernelIO, evict_files, files_resident
from .clock import Counters, EngineError, GenerationResult, TokenClock, install_step_hooks, run_generate
from .config import ENGINE, StoreConfig
from .dram import DramBudgetError, convert_into
from .engine import (_nbytes, check_flash_file, default_flash_root, flash_file, model_fingerprint,
                     parse_budget, resident_parts, to_device, unique_parameters)
from .models import ffn_adapter
from .store import IO_BUFFERED, AlignedBuffer, FlashFileError, FlashStore, ReadPool, evict_from_page_cache, \
    open_for_reads

STREAM_FORMAT = "flashlib-stream"
STREAM_VERSION = 2          # 2: the manifest records the storage dtype of every parameter
STREAM_ALIGN = 4096         # group offsets and lengths (O_DIRECT)
PARAM_ALIGN = 64            # parameter offsets inside a group
CHUNK_BYTES = 1 << 20       # one read: the same cap as StoreConfig.max_read_bytes
SOURCES = ("direct", "mmap")


# --- the stream file: every non-FFN weight, one aligned region per group ------------------------

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


def _group_plan(params, itemsize: int) -> tuple[list[dict], int]:
    entries, off = [], 0
    for name, p in params:
        entries.append({"name": name, "offset": off, "shape": list(p.shape)})
        off = layout.round_up(off + p.numel() * itemsize, PARAM_ALIGN)
    return entries, layout.round_up(max(off, 1), STREAM_ALIGN)


def write_stream_file(groups: dict, path: Path, dtype: str, values=None, info: dict | None = None,
                      progress: bool = False) -> dict:
    """Write the non-FFN weights in ``dtype``, one aligned region per group, and the manifest ``<path>.json``.

    ``values(name, shape) -> array`` gives each parameter's values (default: the parameter itself,
    converted); a synthetic model passes its generator, so its weights never sit in DRAM at once.
    ``info`` goes into the manifest (e.g. the generator's name, checked before reuse).
    """
    path, np_dtype = Path(path), np.dtype(dtype)
    manifest, offset = {"format": STREAM_FORMAT, "version": STREAM_VERSION, "dtype": dtype, **(info or {}),
                        "groups": {}}, 0
    with layout.atomic_file(path) as f:
        for gname, params in tqdm(groups.items(), desc=f"write {path.name}", disable=not progress):
            entries, nbytes = _group_plan(params, np_dtype.itemsize)
            buf = np.zeros(nbytes, dtype=np.uint8)
            for e, (name, p) in zip(entries, params):
                a = (values(name, tuple(p.shape)) if values is not None
                     else p.detach().to(device="cpu", dtype=getattr(torch, dtype)).numpy())
                raw = np.ascontiguousarray(a, dtype=np_dtype).reshape(-1).view(np.uint8)
                buf[e["offset"]:e["offset"] + raw.size] = raw
            f.write(buf.data)
            manifest["groups"][gname] = {"offset": offset, "nbytes": nbytes, "params": entries}
            offset += nbytes
    evict_from_page_cache(path)
    layout.write_json_atomic(manifest, layout.manifest_path(path))
    return manifest


def read_stream_manifest(path: Path) -> dict:
    """The stream file's manifest, checked: format, version, and the file's length."""
    mpath = layout.manifest_path(path)
    if not Path(path).exists() or not mpath.exists():
        raise FileNotFoundError(f"stream file {path} or its manifest {mpath.name} is missing")
    m = json.loads(mpath.read_text())
    if m.get("format") != STREAM_FORMAT or m.get("version") != STREAM_VERSION:
        raise FlashFileError(f"{mpath}: format {m.get('format')!r} version {m.get('version')!r}, this flashlib reads "
                             f"{STREAM_FORMAT!r} version {STREAM_VERSION}: delete it so it is written again")
    end = max((g["offset"] + g["nbytes"] for g in m["groups"].values()), default=0)
    if os.path.getsize(path) < end:
        raise FlashFileError(f"{path} is truncated: {os.path.getsize(path)} bytes, its manifest needs {end}; "
                             "delete it so it is written again")
    return m


def stream_file(model, groups: dict, model_name: str, dtype: str, root=None) -> Path:
    """The aligned non-FFN copy of this model in ``dtype`` (written once per weights fingerprint)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)
    path = Path(root or default_flash_root()) / f"{slug}-{model_fingerprint(model)}" / f"stream-{dtype}.bin"
    if not layout.manifest_path(path).exists():
        write_stream_file(groups, path, dtype)
    return path


@dataclass(frozen=True)
class WeightFiles:
    """Every weight of a model on disk: the bundled FFN flash file and the stream file of the rest."""

    flash: Path
    stream: Path

    @property
    def paths(self) -> list[Path]:
        return [Path(self.flash), Path(self.stream)]


def _aliases(model) -> dict[int, list[str]]:
    """Every name of each parameter object (tied weights have several)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def set_parameter(model, names: list[str], tensor: torch.Tensor) -> None:
    """Make ``tensor`` the parameter under every one of ``names`` (a meta parameter cannot take ``.data``)."""
    p = nn.Parameter(tensor, requires_grad=False)
    for name in names:
        mod, attr = name.rsplit(".", 1) if "." in name else ("", name)
        setattr(model.get_submodule(mod), attr, p)


def load_groups(model, path: Path, names, dtype: torch.dtype, progress: bool = False,
                n_threads: int = StoreConfig.n_threads, device="cpu") -> int:
    """Read the stream file's groups ``names`` (O_DIRECT, 1 MiB reads over ``n_threads``) into fresh
    tensors of ``dtype`` and make them the model's parameters (tied names kept tied). Returns the
    bytes read. For models built on the meta device (paper scale: 4.7 GB in ~5 s here)."""
    m = read_stream_manifest(path)
    file_dtype, aliases = getattr(torch, m["dtype"]), _aliases(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    names = list(names)
    reader = StreamReader(path, n_threads)
    buf = AlignedBuffer(1, max((m["groups"][g]["nbytes"] for g in names), default=1))
    total = 0
    try:
        for gname in tqdm(names, desc=f"load {Path(path).name}", disable=not progress):
            g = m["groups"][gname]
            total += reader.group(g, buf)
            for e in g["params"]:
                n = int(np.prod(e["shape"]))
                stored = torch.frombuffer(buf.memoryview, dtype=file_dtype, count=n, offset=e["offset"]).view(e["shape"])
                t = torch.empty(e["shape"], dtype=dtype, device=device)
                convert_into(t, stored)
                set_parameter(model, aliases[id(params[e["name"]])], t)
    finally:
        reader.close()
    return total


# --- dense FFN compute -------------------------------------------------------------------------

def dense_ffn(x: torch.Tensor, vecs: dict, bias, out_bias, act, gated: bool) -> torch.Tensor:
    """Dense FFN from ``[n_neurons, d_model]`` (strided) vector views: x ``[n, d_model]`` -> ``[n, d_model]``."""
    pre = x @ vecs["up"].T
    if bias is not None:
        pre = pre + bias
    h = act(x @ vecs["gate"].T) * pre if gated else act(pre)
    y = h @ vecs["down"]
    return y if out_bias is None else y + out_bias


class ResidentFFN(nn.Module):
    """A whole FFN layer held in DRAM, loaded once from the flash file (models whose FFN lives only on flash)."""

    def __init__(self, vecs: dict, act, bias, out_bias, gated: bool):
        super().__init__()
        self.vecs, self.act, self.bias, self.out_bias, self.gated = vecs, act, bias, out_bias, gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        return dense_ffn(x2.to(self.vecs["up"].dtype), self.vecs, self.bias, self.out_bias, self.act,
                         self.gated).to(x.dtype).view(x.shape)


class StreamedFFN(nn.Module):
    """One FFN layer read whole from the flash file while it computes, ``runner.chunk_rows`` neurons at a time."""

    def __init__(self, runner: "StreamingBaseline", layer: int, act, bias, out_bias):
        super().__init__()
        self.__dict__["runner"] = runner
        self.layer, self.act, self.bias, self.out_bias = layer, act, bias, out_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, x2 = self.runner, x.reshape(-1, x.shape[-1])
        y = None
        for s in range(0, r.adapter.d_ffn, r.chunk_rows):
            vecs = r.ffn_chunk(self.layer, s)
            n = vecs["up"].shape[0]
            part = dense_ffn(x2, vecs, None if self.bias is None else self.bias[s:s + n], None, self.act,
                             r.adapter.gated)
            y = part if y is None else y + part
        y = y if self.out_bias is None else y + self.out_bias
        return y.view(x.shape)


# --- where streamed bytes come from -------------------------------------------------------------

class StreamReader:
    """O_DIRECT reads of the stream file's groups through a ``ReadPool`` (buffered + fadvise where refused)."""

    def __init__(self, path: Path, n_threads: int):
        self.path = path
        self.fd, self.mode = open_for_reads(path, "auto", probe=((0, STREAM_ALIGN, 0),))
        self.pool = ReadPool(self.fd, n_threads, drop_after_read=self.mode == IO_BUFFERED)

    def group(self, g: dict, dest: AlignedBuffer) -> int:
        """A group into ``dest`` (1 MiB reads over the pool's threads); returns the bytes read."""
        reads = [(g["offset"] + s, [dest.memoryview[s:min(s + CHUNK_BYTES, g["nbytes"])]],
                  min(CHUNK_BYTES, g["nbytes"] - s)) for s in range(0, g["nbytes"], CHUNK_BYTES)]
        return self.pool.run(reads)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            os.close(self.fd)
            self.pool = None


class _Direct:
    """O_DIRECT reads: the flash file through ``FlashStore``, the stream file through a ``StreamReader``."""

    def __init__(self, files: WeightFiles, store_config: StoreConfig):
        self.files, self.store_config = files, store_config
        self.store = FlashStore(files.flash, store_config)
        self.stream = StreamReader(files.stream, store_config.n_threads)
        self.mode = self.stream.mode

    def group(self, g: dict, dest: AlignedBuffer) -> int:
        return self.stream.group(g, dest)

    def close(self) -> None:
        self.stream.close()
        self.store.close()


class _Mapped:
    """Lazy private mappings of both files: nothing is read until a page is touched."""

    def __init__(self, files: WeightFiles):
        self.files = files
        self.maps = {}
        for key, p in (("flash", files.flash), ("stream", files.stream)):
            with open(p, "rb") as f:
                self.maps[key] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)   # MAP_PRIVATE, never written
        self.arrays = {k: np.frombuffer(m, dtype=np.uint8) for k, m in self.maps.items()}
        self.mode = "mmap (page cache)"

    @staticmethod
    def touch(region: np.ndarray) -> None:
        """Read one byte of every 4 KiB page of ``region`` (and its last byte): each page is faulted in
        from disk unless the page cache holds it (the kernel's fault read-around reads more around a miss)."""
        if region.size:
            np.add.reduce(region[::4096], dtype=np.uint64)
            int(region[-1])

    def close(self) -> None:
        self.arrays = {}
        for m in self.maps.values():
            try:
                m.close()
            except BufferError:          # views still alive: the mapping goes with them
                pass
        self.maps = {}


# --- the runner ---------------------------------------------------------------------------------

class StreamingBaseline:
    """The naive (budget 0), hybrid (half the model) and page-cache (``source="mmap"``) rows.

    ``files``: the model's ``WeightFiles`` (default: written from the model itself, in its dtype;
    a model built on the meta device, such as paper scale's, must pass them). Meta parameters of
    resident groups are loaded from the files at construction. ``dtype`` (e.g. "bfloat16"): the compute
    dtype, the files keep the model's own (converted as they stream). ``device`` "cuda": resident groups
    and the compute copies of streamed bytes live on the GPU (reads still land in host buffers,
    page-locked); the page cache (``source="mmap"``) is a host baseline only.
    """

    def __init__(self, model, model_name: str, dram_budget=0.0, *, source: str = "direct",
                 files: WeightFiles | None = None, flash_root=None, store_config: StoreConfig = StoreConfig(),
                 chunk_bytes: int = CHUNK_BYTES, device: str = "cpu", dtype: str | None = None,
                 progress: bool = False):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        self.device = torch.device(device)
        if self.device.type != "cpu" and source == "mmap":
            raise ValueError("the page-cache baseline (source 'mmap') runs on the CPU only")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError("device 'cuda' asked for but torch.cuda.is_available() is False")
        self.model, self.model_name, self.source = model.eval(), model_name, source
        self.adapter = a = ffn_adapter(model)
        own = str(next(model.parameters()).dtype).removeprefix("torch.")
        ffn_names = layout.ffn_weight_names(model, a)
        self.files = files or WeightFiles(      # in the model's own dtype; computed in ``dtype``
            flash_file(model, a, model_name, "bundled", own, flash_root, ENGINE.flash_preset, progress),
            stream_file(model, stream_groups(model, ffn_names), model_name, own, flash_root))
        if dtype is not None and dtype != own:
            model.to(getattr(torch, dtype))
        self.dtype = next(model.parameters()).dtype
        groups = stream_groups(model, ffn_names)
        self.manifest = read_stream_manifest(self.files.stream)
        storage = self.manifest["dtype"]
        check_flash_file(self.files.flash, a, "bundled", storage)
        self.storage_dtype = getattr(torch, storage)
        self.converts = self.storage_dtype != self.dtype or self.device.type != "cpu"
        self.model_bytes = sum(_nbytes(p) for _, p in unique_parameters(model))
        sizes = {g: sum(_nbytes(p) for _, p in ps) for g, ps in groups.items()}
        sizes.update({f"ffn {l}": sum(_nbytes(v) for v in a.neuron_vectors(l).values()) for l in range(a.n_layers)})
        ffn_bytes = sum(v for g, v in sizes.items() if g.startswith("ffn"))
        resident_w = sum(resident_parts(model, a, ffn_names).values())
        budget = 0 if dram_budget in (0, 0.0, None) else parse_budget(dram_budget, self.model_bytes, resident_w,
                                                                       ffn_bytes)
        stride = layout.read_manifest(self.files.flash)["row_stride"]
        self.chunk_rows = max(1, min(a.d_ffn, chunk_bytes // stride))     # FFN neurons per streamed chunk
        staging = self._staging_bytes(groups, stride)
        self.resident_groups = chosen = self._choose_resident(sizes, budget, staging)
        streams = {"globals": "globals" in sizes and "globals" not in chosen,
                   "layer": any(g.startswith("layer") and g not in chosen for g in sizes),
                   "ffn": any(g.startswith("ffn") and g not in chosen for g in sizes)}
        need = sum(sizes[g] for g in chosen) + sum(staging[k] for k, on in streams.items() if on)
        if budget > 0 and need > budget:
            raise DramBudgetError(f"DRAM budget {budget} B cannot hold the hybrid baseline's read buffers and "
                                  f"resident groups: minimum budget is {need} B; nothing was read")
        self.budget_bytes, self.group_bytes = budget, sizes
        self.streamed_layers = [l for l in range(a.n_layers) if f"ffn {l}" not in chosen]
        self.store_config = store_config
        self._open_source()
        meta_resident = [g for g in groups if g in chosen and any(p.is_meta for _, p in groups[g])]
        if meta_resident:
            load_groups(model, self.files.stream, meta_resident, self.dtype, progress, device=self.device)
        if self.device.type != "cpu":         # the resident groups and whole resident FFN layers
            keep = [n for g in chosen if g in groups for n, _ in groups[g]]
            keep += [n for n in ffn_names if int(re.search(r"\.layers\.(\d+)\.", f".{n}").group(1))
                     not in self.streamed_layers]
            to_device(model, self.device, keep)
        self.buffers: dict[str, AlignedBuffer] = {}
        self._bind_streamed([g for g in groups if g not in chosen], groups)
        self._install_ffn(ffn_names)
        self._pinned = []
        if self.device.type == "cuda":        # page-lock the host buffers: host-to-device copies go by DMA
            for b in {id(b): b for b in [*self.buffers.values(), getattr(self, "ffn_buffer", None)] if b}.values():
                torch.cuda.cudart().cudaHostRegister(b.address, b.nbytes, 0)
                self._pinned.append(b)
        self.counters = Counters()
        self.clock = TokenClock(self.counters, self.bytes_resident, refresh=KernelIO() if source == "mmap" else None)
        self._hooks = install_step_hooks(model, lambda n, past: self.clock.begin(n, past == 0), self.clock.forward_done)
        for g in self.streamed_groups:
            mod = model if g == "globals" else a.layers[int(g.split()[-1])]
            self._hooks.append(mod.register_forward_pre_hook(lambda *_, g=g: self.fetch_group(g)))

    # -- sizes and the resident choice
    def _staging_bytes(self, groups: dict, stride: int) -> dict:
        """DRAM the streamed groups need while they are used: staging in the file dtype (direct reads) and
        compute-dtype copies (another dtype); the page cache's mapping is the kernel's, not counted here."""
        per = 0 if self.source == "mmap" else 1
        ratio = (_itemsize(self.dtype) / _itemsize(self.storage_dtype)) if self.converts else 0
        plan = {g: _group_plan(ps, _itemsize(self.storage_dtype))[1] for g, ps in groups.items()}
        layer = max((v for g, v in plan.items() if g != "globals"), default=0)
        width = len(self.adapter.vector_names) * self.adapter.d_model
        return {"globals": int(plan.get("globals", 0) * (per + ratio)), "layer": int(layer * (per + ratio)),
                "ffn": self.chunk_rows * (per * stride + (width * _itemsize(self.dtype) if self.converts else 0))}

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
            after = chosen | {g}                   # staging is reserved only for what would still stream
            reserve = (staging["layer"] * any(x not in after for x in layers)
                       + staging["ffn"] * any(x not in after for x in ffn)
                       + staging["globals"] * ("globals" in sizes and "globals" not in after))
            if used + sizes[g] + reserve <= budget:
                chosen.add(g)
                used += sizes[g]
        return chosen

    # -- binding: streamed parameters are views of staging buffers or of the mapping
    def _open_source(self) -> None:
        self.src = _Mapped(self.files) if self.source == "mmap" else _Direct(self.files, self.store_config)
        self.io_mode = self.src.mode if self.source == "mmap" else self.src.store.io_mode
        self._reading = False

    def _bind_streamed(self, names: list[str], groups: dict) -> None:
        """Point every parameter of a streamed group at memory its fetch fills (or at the mapping).

        Same dtype: the parameters are views of the staging buffer (direct) or of the mapping (mmap).
        Another dtype: views of a compute-dtype buffer that ``fetch_group`` converts into.
        """
        self.streamed_groups = names
        aliases, isz = _aliases(self.model), _itemsize(self.storage_dtype)
        layer_names = [g for g in names if g != "globals"]
        shared_raw = shared_conv = None
        if layer_names:                         # the streamed layers share one staging buffer (and one copy)
            nb = max(self.manifest["groups"][g]["nbytes"] for g in layer_names)
            shared_raw = AlignedBuffer(1, nb) if self.source == "direct" else None
            shared_conv = torch.empty(nb // isz, dtype=self.dtype, device=self.device) if self.converts else None
        self._staged = {}
        for g in names:
            info = self.manifest["groups"][g]
            raw = None
            if self.source == "direct":
                raw = self.buffers[g] = AlignedBuffer(1, info["nbytes"]) if g == "globals" else shared_raw
            conv = None
            if self.converts:
                conv = torch.empty(info["nbytes"] // isz, dtype=self.dtype, device=self.device) if g == "globals" \
                    else shared_conv
            pairs = []
            for e, (name, p) in zip(info["params"], groups[g]):
                if e["name"] != name:
                    raise EngineError(f"{self.files.stream}: group {g} lists {e['name']}, model has {name}; "
                                      "delete the stream file so it is written again")
                n = int(np.prod(e["shape"]))
                stored = (torch.frombuffer(raw.memoryview, dtype=self.storage_dtype, count=n, offset=e["offset"])
                          if raw is not None else
                          torch.frombuffer(self.src.maps["stream"], dtype=self.storage_dtype, count=n,
                                           offset=info["offset"] + e["offset"])).view(e["shape"])
                param = stored if conv is None else conv[e["offset"] // isz:][:n].view(e["shape"])
                if conv is not None:
                    pairs.append((param, stored))
                set_parameter(self.model, aliases[id(p)], param)
            self._staged[g] = pairs

    def _install_ffn(self, ffn_names: set) -> None:
        a = self.adapter
        acts = [getattr(a.layers[l], "activation_fn", None) or a.layers[l].mlp.act_fn for l in range(a.n_layers)]
        fm = layout.read_manifest(self.files.flash)
        self._ffn_layout = fm
        width = len(a.vector_names) * a.d_model
        if self.source == "direct":
            self.ffn_buffer = self.src.store.new_buffer(self.chunk_rows)
        self._ffn_conv = torch.empty(self.chunk_rows, width, dtype=self.dtype, device=self.device) \
            if self.converts else None
        self._all_ids = np.arange(a.d_ffn)
        for l in range(a.n_layers):
            bias, ob = a.neuron_bias(l), a.output_bias(l)
            bias = None if bias is None else bias.detach().to(self.device)
            ob = None if ob is None else ob.detach().to(self.device)
            if l in self.streamed_layers:
                a.replace_ffn(l, StreamedFFN(self, l, acts[l], bias, ob))
            elif any(v.is_meta for v in a.neuron_vectors(l).values()):   # resident, but only on flash
                a.replace_ffn(l, ResidentFFN(self._load_ffn_layer(l), acts[l], bias, ob, a.gated))
        for n in ffn_names:
            layer = int(re.search(r"\.layers\.(\d+)\.", f".{n}").group(1))
            if layer in self.streamed_layers or a.neuron_vectors(layer)["up"].is_meta:
                mod, attr = n.rsplit(".", 1)
                setattr(self.model.get_submodule(mod), attr,
                        nn.Parameter(torch.empty(0, dtype=self.dtype), requires_grad=False))

    def _load_ffn_layer(self, layer: int) -> dict:
        """A whole FFN layer from the flash file, in the compute dtype: {name: [d_ffn, d_model]}."""
        with FlashStore(self.files.flash, self.store_config) as store:
            buf = store.new_buffer(self.adapter.d_ffn)
            store.read(layer, self._all_ids, buf)
            return {k: v.to(self.device, self.dtype).clone() for k, v in buf.vectors(torch=True).items()}

    # -- reads
    def fetch_group(self, gname: str) -> None:
        """A streamed non-FFN group's bytes, then (another dtype) its compute copy."""
        info = self.manifest["groups"][gname]
        if self.source == "direct":
            self._timed(lambda: self.src.group(info, self.buffers[gname]), f"{self.files.stream} ({gname})")
            self.counters.reads += -(-info["nbytes"] // CHUNK_BYTES)
        else:
            region = self.src.arrays["stream"][info["offset"]:info["offset"] + info["nbytes"]]
            self._timed(lambda: self.src.touch(region), f"{self.files.stream} ({gname})")
        for param, stored in self._staged[gname]:
            convert_into(param, stored)

    def ffn_chunk(self, layer: int, start: int) -> dict:
        """Neurons ``start .. start + chunk_rows`` of an FFN layer: {name: [n, d_model]} in the compute dtype."""
        a, n = self.adapter, min(self.chunk_rows, self.adapter.d_ffn - start)
        if self.source == "direct":
            ids = self._all_ids[start:start + n]
            before = self.src.store.counters.reads
            self._timed(lambda: self.src.store.read(layer, ids, self.ffn_buffer), f"{self.files.flash} (FFN layer {layer})")
            self.counters.reads += self.src.store.counters.reads - before
            rows = self.ffn_buffer.rows(n, torch=True)
        else:
            fm = self._ffn_layout
            off = fm["layers"][layer]["tensors"]["bundles"]["offset"] + start * fm["row_stride"]
            region = self.src.arrays["flash"][off:off + n * fm["row_stride"]]
            self._timed(lambda: self.src.touch(region), f"{self.files.flash} (FFN layer {layer})")
            rows = torch.frombuffer(self.src.maps["flash"], dtype=self.storage_dtype,
                                    count=region.size // _itemsize(self.storage_dtype), offset=off).view(n, -1)
        self.counters.neurons_loaded += n
        width = len(a.vector_names) * a.d_model
        if self.converts:
            convert_into(self._ffn_conv[:n], rows[:, :width])
            rows = self._ffn_conv[:n]
        return {name: rows[:, k * a.d_model:(k + 1) * a.d_model] for k, name in enumerate(a.vector_names)}

    def _timed(self, fn, what: str) -> None:
        self._reading = True
        t0 = time.perf_counter()
        try:
            nbytes = fn()
        except (FlashFileError, OSError) as e:
            raise EngineError(f"read of {what} failed: {e}; generation stops (no fallback)") from e
        self.counters.io_s += time.perf_counter() - t0
        if self.source == "direct":
            self.counters.bytes_read += nbytes
        self._reading = False

    # -- runner interface (see clock.run_generate)
    def before_run(self) -> None:
        """Cold-cache protocol: the weight files leave the page cache (and this process's mappings)."""
        self.resident_at_start = evict_files(self.files.paths)

    def recover(self) -> None:
        self.src.close()
        self._open_source()

    def bytes_resident(self) -> int:
        """Resident groups plus the staging buffers (the model's DRAM between tokens; the page cache
        of the mapped files is the kernel's and shows in the worker's cgroup)."""
        staging = sum({id(b): b.nbytes for b in self.buffers.values()}.values())
        if self.source == "direct" and self.streamed_layers:
            staging += self.ffn_buffer.nbytes
        conv = {id(p.untyped_storage()): p.untyped_storage().nbytes() for pairs in self._staged.values()
                for p, _ in pairs}
        extra = 0 if self._ffn_conv is None else _nbytes(self._ffn_conv)
        return sum(self.group_bytes[g] for g in self.resident_groups) + staging + sum(conv.values()) + extra

    def pages_cached(self) -> float:
        """Share of the weight files in the page cache now (mincore)."""
        return files_resident(self.files.paths)

    def generate(self, input_ids, **gen_kwargs) -> GenerationResult:
        return run_generate(self, input_ids, gen_kwargs)

    def report(self) -> pd.DataFrame:
        """group | bytes | resident."""
        return pd.DataFrame([{"group": g, "bytes": b, "resident": g in self.resident_groups}
                             for g, b in self.group_bytes.items()])

    def close(self) -> None:
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []
        for b in getattr(self, "_pinned", []):
            torch.cuda.cudart().cudaHostUnregister(b.address)
        self._pinned = []
        if getattr(self, "src", None) is not None:
            self.src.close()
            self.src = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
