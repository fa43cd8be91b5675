"""Row-column bundling on disk (paper sec 3.2, Fig 5): the offline writer of the flash file.

Neuron i of an FFN layer needs its up-projection column and down-projection row (and, for gated
FFNs, its gate column). The *bundled* layout stores them next to each other, so one read of
``n_vectors * d_model`` values fetches the whole neuron; the *separate* layout keeps one matrix
after another (all up rows, then all down rows) for the ablation.

Container: a valid safetensors file. Bundled: one 2-D tensor per layer, ``layers.{l}.bundles``
``[d_ffn, row_stride / itemsize]``, row i = ``[gate_i | up_i | down_i | zero padding]``.
Separate: one tensor per vector kind per layer, ``layers.{l}.{up,down,...}``. The JSON header is
padded with spaces (allowed by the format) so the tensor data starts on ``alignment``; every row
starts on ``row_alignment`` because the row stride is rounded up to it (padding columns are zero
and live *inside* the tensor, since safetensors forbids gaps between tensors).

A JSON manifest next to the file (``<file>.json``) records geometry, offsets and a checksum per
layer; ``store.FlashStore`` reads it. Biases and all non-FFN weights are resident: they go to a
plain safetensors file (``write_resident``). The reader lives in store.py; the two modules
share only the file format below.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .config import FlashFileConfig

FORMAT = "flashlib-ffn-flash"
FORMAT_VERSION = 1                      # the reader refuses any other version
LAYOUTS = ("bundled", "separate")
DTYPES = {"float16": "F16", "float32": "F32"}  # numpy name -> safetensors dtype code


# --- sources: where the per-layer neuron vectors come from ---------------------------------

@dataclass(frozen=True)
class LayerSource:
    """Geometry plus a one-shot stream of layers; each layer is ``{vector_name: [d_ffn, d_model]}``.

    The geometry is known up front because the safetensors header (offsets of every tensor)
    is written before the first layer; layers are then streamed, so a paper-scale model never
    has to be in memory at once.
    """

    name: str
    family: str
    n_layers: int
    d_model: int
    d_ffn: int
    vector_names: tuple
    layers: Iterable  # of dict[str, np.ndarray | torch.Tensor], n_layers of them, in order


def source_from_adapter(adapter, name: str) -> LayerSource:
    """Stream a Hugging Face model's FFN through the FFN adapter (flashlib.models.ffn_adapter)."""
    return LayerSource(name=name, family=adapter.family, n_layers=adapter.n_layers,
                       d_model=adapter.d_model, d_ffn=adapter.d_ffn,
                       vector_names=tuple(adapter.vector_names),
                       layers=(adapter.neuron_vectors(i) for i in range(adapter.n_layers)))


def source_from_arrays(layers: Iterable, *, name: str, n_layers: int, d_model: int, d_ffn: int,
                       vector_names=("up", "down"), family: str = "synthetic") -> LayerSource:
    """Stream plain per-layer arrays (e.g. a generator of synthetic OPT-6.7B-geometry layers)."""
    return LayerSource(name=name, family=family, n_layers=n_layers, d_model=d_model, d_ffn=d_ffn,
                       vector_names=tuple(vector_names), layers=layers)


# --- geometry of the file ------------------------------------------------------------------

def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def manifest_path(flash_path) -> Path:
    """The manifest that belongs to a flash file: ``model.safetensors`` -> ``model.json``."""
    return Path(flash_path).with_suffix(".json")


def plan_file(source: LayerSource, layout: str, dtype: str, config: FlashFileConfig) -> dict:
    """Compute every offset of the file (the manifest minus checksums) before writing a byte."""
    _check_plan_inputs(source, layout, dtype, config)
    itemsize = np.dtype(dtype).itemsize
    n_vec = len(source.vector_names)
    row_bytes = (n_vec if layout == "bundled" else 1) * source.d_model * itemsize
    row_stride = round_up(row_bytes, config.row_alignment)          # bytes per row incl. padding
    kinds = ("bundles",) if layout == "bundled" else source.vector_names
    matrix_bytes = source.d_ffn * row_stride
    header = {"__metadata__": {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                               "layout": layout, "model": source.name}}
    rel = 0
    for layer in range(source.n_layers):
        for kind in kinds:
            header[f"layers.{layer}.{kind}"] = {
                "dtype": DTYPES[dtype], "shape": [source.d_ffn, row_stride // itemsize],
                "data_offsets": [rel, rel + matrix_bytes]}
            rel += matrix_bytes
    header_bytes = _padded_header(header, math.lcm(config.alignment, config.row_alignment))
    data_offset = 8 + len(header_bytes)
    layers = []
    for layer in range(source.n_layers):
        start = data_offset + layer * len(kinds) * matrix_bytes
        layers.append({"index": layer, "offset": start, "nbytes": len(kinds) * matrix_bytes,
                       "tensors": {k: {"name": f"layers.{layer}.{k}",
                                       "offset": start + j * matrix_bytes}
                                   for j, k in enumerate(kinds)},
                       "checksum": None})
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model_name": source.name,
        "family": source.family, "dtype": dtype, "layout": layout,
        "n_layers": source.n_layers, "d_model": source.d_model, "d_ffn": source.d_ffn,
        "vector_names": list(source.vector_names),
        "bundle_width": n_vec * source.d_model,           # values per neuron, all vectors
        "alignment": config.alignment, "row_alignment": config.row_alignment,
        "row_bytes": row_bytes, "row_stride": row_stride, "row_padding": row_stride - row_bytes,
        "matrix_bytes": matrix_bytes, "data_offset": data_offset,
        "file_bytes": data_offset + rel, "checksum_algorithm": config.checksum,
        "layers": layers, "_header_bytes": header_bytes,
    }


def _check_plan_inputs(source: LayerSource, layout: str, dtype: str, config: FlashFileConfig):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    for name in ("alignment", "row_alignment"):
        v = getattr(config, name)
        if v < 4 or v & (v - 1):
            raise ValueError(f"FlashFileConfig.{name} must be a power of two >= 4, got {v}")
    if min(source.n_layers, source.d_model, source.d_ffn) < 1 or not source.vector_names:
        raise ValueError(f"empty geometry for {source.name!r}: n_layers={source.n_layers}, "
                         f"d_model={source.d_model}, d_ffn={source.d_ffn}, "
                         f"vector_names={source.vector_names}")
    hashlib.new(config.checksum)  # raises ValueError for an unknown algorithm


def _padded_header(header: dict, alignment: int) -> bytes:
    """JSON header followed by spaces so that 8 + len(header) is a multiple of ``alignment``."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * ((-(8 + len(raw))) % alignment)


# --- packing one layer ---------------------------------------------------------------------

def _as_numpy(x, dtype: str, what: str) -> np.ndarray:
    """Convert one vector matrix to the file dtype (torch rounds exactly like numpy: RNE)."""
    if hasattr(x, "detach"):  # torch.Tensor: convert in torch, then share memory with numpy
        import torch
        x = x.detach().to(device="cpu", dtype=getattr(torch, dtype)).numpy()
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"{what}: expected a float array, got dtype {x.dtype}")
    return x.astype(dtype, copy=False)


def pack_layer(vectors: dict, plan: dict, layer: int) -> list[np.ndarray]:
    """The layer's tensors as written: bundled -> [d_ffn, stride] with [v0|v1|..|pad] rows;
    separate -> one [d_ffn, stride] matrix per vector kind."""
    names, d, d_ffn = plan["vector_names"], plan["d_model"], plan["d_ffn"]
    if set(vectors) != set(names):
        raise ValueError(f"layer {layer} of {plan['model_name']!r}: expected vectors {names}, "
                         f"got {sorted(vectors)}")
    stride_elems = plan["row_stride"] // np.dtype(plan["dtype"]).itemsize
    arrays = {}
    for name in names:
        a = _as_numpy(vectors[name], plan["dtype"], f"layer {layer} vector {name!r}")
        if a.shape != (d_ffn, d):
            raise ValueError(f"layer {layer} vector {name!r} of {plan['model_name']!r} has shape "
                             f"{tuple(a.shape)}, expected (d_ffn, d_model) = ({d_ffn}, {d})")
        arrays[name] = a
    if plan["layout"] == "bundled":
        out = np.zeros((d_ffn, stride_elems), plan["dtype"])      # [d_ffn, stride] incl. padding
        for k, name in enumerate(names):
            out[:, k * d:(k + 1) * d] = arrays[name]
        return [out]
    outs = []
    for name in names:
        m = np.zeros((d_ffn, stride_elems), plan["dtype"])
        m[:, :d] = arrays[name]
        outs.append(m)
    return outs


# --- atomic files --------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a binary file object on a temporary name; on success fsync and rename it to
    ``path`` (readers never see a half-written file); on error remove the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _evict(path: Path) -> None:
    """Drop the (clean, fsynced) file from the page cache so the first reads are cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_json_atomic(obj, path: Path) -> None:
    with atomic_file(path) as f:
        f.write(json.dumps(obj, indent=1).encode())


# --- the writer ----------------------------------------------------------------------------

def write_flash_file(source: LayerSource, path, *, layout: str = "bundled", dtype: str = "float16",
                     config: FlashFileConfig = FlashFileConfig(), progress: bool = True) -> Path:
    """Write ``source``'s FFN weights to ``path`` (safetensors) and its manifest ``<path>.json``.

    The old manifest is removed first and the new one written last, so a manifest on disk always
    describes a complete file. Returns ``path``.
    """
    path = Path(path)
    plan = plan_file(source, layout, dtype, config)
    header_bytes = plan.pop("_header_bytes")
    manifest_path(path).unlink(missing_ok=True)
    layers_seen = 0
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        bar = tqdm(total=plan["file_bytes"] - plan["data_offset"], unit="B", unit_scale=True,
                   desc=f"write {path.name} ({layout}, {dtype})", disable=not progress)
        for layer, vectors in enumerate(source.layers):
            if layer >= plan["n_layers"]:
                raise ValueError(f"{source.name!r}: the layer stream yields more than "
                                 f"n_layers={plan['n_layers']} layers")
            digest = hashlib.new(plan["checksum_algorithm"])
            for tensor in pack_layer(vectors, plan, layer):
                f.write(tensor.data)
                digest.update(tensor.data)
                bar.update(tensor.nbytes)
            plan["layers"][layer]["checksum"] = digest.hexdigest()
            layers_seen += 1
        bar.close()
        if layers_seen != plan["n_layers"]:
            raise ValueError(f"{source.name!r}: the layer stream ended after {layers_seen} layers, "
                             f"expected n_layers={plan['n_layers']}")
    _evict(path)
    plan["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    plan["file_name"] = path.name
    write_json_atomic(plan, manifest_path(path))
    return path


def read_manifest(flash_path) -> dict:
    """Load the manifest of a flash file (no validation; FlashStore does that)."""
    p = manifest_path(flash_path)
    if not p.exists():
        raise FileNotFoundError(f"no manifest {p} for flash file {flash_path}; "
                                "write the file with flashlib.layout.write_flash_file")
    return json.loads(p.read_text())


# --- resident weights (attention, embeddings, norms, FFN biases) ---------------------------

# Parameter-name suffixes of the FFN weight matrices, per adapter family: the fallback when the
# adapter returns copies instead of views of the parameters.
FFN_WEIGHT_SUFFIXES = {
    "opt": ("fc1.weight", "fc2.weight"),
    "llama": ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"),
}


def ffn_weight_names(model, adapter) -> set[str]:
    """Names in ``model.state_dict()`` of the FFN matrices that the flash file holds."""
    state = model.state_dict()
    expected = adapter.n_layers * len(adapter.vector_names)
    ptrs = {v.data_ptr() for i in range(adapter.n_layers)
            for v in adapter.neuron_vectors(i).values()}
    names = {k for k, t in state.items() if t.dim() == 2 and t.data_ptr() in ptrs}
    if len(names) != expected:
        suffixes = FFN_WEIGHT_SUFFIXES.get(adapter.family, ())
        names = {k for k in state if k.endswith(suffixes)}
    if len(names) != expected:
        raise ValueError(f"could not identify the {expected} FFN weight matrices of a "
                         f"{adapter.family!r} model (found {len(names)}); extend "
                         "layout.FFN_WEIGHT_SUFFIXES for this family")
    return names


def write_resident(model, adapter, path, *, dtype: str | None = None) -> Path:
    """Save every weight that is not in the flash file (plain safetensors, atomic).

    Tied weights (e.g. lm_head = embed_tokens) are saved once; the alias is recorded in the
    metadata and restored by ``load_resident``. ``dtype`` casts floating tensors (None: keep).
    """
    import torch
    from safetensors.torch import save

    skip = ffn_weight_names(model, adapter)
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        if name in skip:
            continue
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(getattr(torch, dtype))
        tensors[name] = t.contiguous()
    meta = {"format": "flashlib-resident", "ffn_in_flash": json.dumps(sorted(skip)),
            "aliases": json.dumps(aliases)}
    with atomic_file(Path(path)) as f:
        f.write(save(tensors, metadata=meta))
    return Path(path)


def load_resident(path) -> dict:
    """The resident state dict (tied aliases restored); load with ``strict=False``."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, target in aliases.items():
        out[alias] = out[target]
    return out


def write_model(model, adapter, out_dir, *, name: str, layouts=("bundled",), dtype="float16",
                config: FlashFileConfig = FlashFileConfig(), progress: bool = True) -> dict:
    """Convert a model: one flash file per layout plus the resident weights. Returns the paths
    as ``{"bundled": ..., "separate": ..., "resident": ...}``."""
    out_dir = Path(out_dir)
    out = {layout: write_flash_file(source_from_adapter(adapter, name),
                                      out_dir / f"{name}.ffn-{layout}.safetensors",
                                      layout=layout, dtype=dtype, config=config, progress=progress)
             for layout in layouts}
    out["resident"] = write_resident(model, adapter, out_dir / f"{name}.resident.safetensors",
                                     dtype=dtype)
    return out


def synthetic_layers(n_layers: int, d_model: int, d_ffn: int, vector_names=("up", "down"),
                     seed: int = 0, dtype: str = "float16") -> Iterator[dict]:
    """Deterministic random layers (N(0, 1/d_model)) for tests and the paper-scale tier."""
    for layer in range(n_layers):
        rng = np.random.default_rng([seed, layer])
        yield {name: (rng.standard_normal((d_ffn, d_model), np.float32)
                      / np.sqrt(d_model)).astype(dtype)
               for name in vector_names}

