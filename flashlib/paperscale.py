"""Paper scale: OPT 6.7B's geometry as a real Hugging Face model on this disk (paper Tables 2 and 3, Fig 1).

OPT 6.7B's weights cannot be installed here, but its I/O is a matter of shapes and byte counts and
its compute a matter of matrix sizes, both of which we reproduce exactly: ``build_model`` makes an
``OPTForCausalLM`` from OPT 6.7B's configuration (32 layers, d_model 4096, d_ffn 16384) on the
meta device, so the whole model is never in DRAM, and every method runs it through the same code
as the small models, inside ``generate()``:

* the sparse rows (+predictor, +windowing, +bundling) through ``SparseEngine`` with the active-set
  policy "trace": each token's set comes from ``traces.generate_trace`` at the paper preset
  (calibrated to Table 6, App. B.1, C.1, Fig 12), the matrices are sized on a second draw (seed +
  1), and synthetic low-rank predictors (Table 4's ranks) run for their cost and their DRAM;
* naive, hybrid and the page cache through ``streaming.StreamingBaseline`` (O_DIRECT or mmap).

Weights (synthetic, fp16 on disk: Table 2's bytes, 13.3 GB):
1. Flash files (``ensure_flash_files``): the FFN in the bundled and the separate layout (8.6 GB
   each), written layer by layer through ``layout.write_flash_file``: random bits shaped into fp16
   values of magnitude ~1/sqrt(d_model) (``ffn_layer``).
2. The stream file (``ensure_stream_file``): every other weight (attention, embeddings, norms,
   biases; 4.7 GB), one aligned group per layer (``streaming.write_stream_file``), values tiled from
   a pool of such random fp16 values (norms are 1 and 0). The engine and hybrid load what they keep
   resident from it into the compute dtype (bf16 or fp32); naive and the page cache read it every
   token. Files are reused while their manifests match and a spot check of re-generated values passes.

The outputs are not meaningful text (random weights; active sets from a trace, not from the
weights, so the sparse FFN sums the trace's neurons only). What is measured is real: every read
(O_DIRECT, 32 threads), the window, the DRAM matrices, the conversion of loaded bundles, and the
compute at the true sizes (attention over the KV cache, predictors, sparse FFN, LM head).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import costmodel, layout, paper, paths
from .config import ENGINE, FLASH_FILE_PRESETS, TRACE_PRESETS, EngineConfig, PaperScaleConfig, StoreConfig, \
    TraceConfig, smoke_mode
from .store import ChecksumError, FlashStore
from .traces import Trace, generate_trace, prediction_statistics, trace_statistics

LAYOUTS = ("bundled", "separate")
METHOD_NAMES = ("naive", "hybrid", "predictor", "windowing", "bundling")   # Table 2's rows, in order
DENSE_METHODS = ("naive", "hybrid", "pagecache")
GENERATOR = "random-bits-fp16-v1"      # recorded in the manifest: another generator = another file
STREAM_GENERATOR = "pool-fp16-v1"
FILE_DTYPE = "float16"                 # Table 2 is 16 bit: 13.3 GB per naive token
POOL_VALUES = 1 << 24                  # random fp16 values tiled into every non-FFN weight (32 MB)


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


def ensure_flash_files(cfg: PaperScaleConfig, smoke: bool | None = None, progress: bool = True,
                       layouts=LAYOUTS) -> pd.DataFrame:
    """The layouts' files for ``cfg`` (default both): reused when ``check_flash_file`` passes, else (re)written.

    Written layer by layer (one layer, 268 MB at paper scale, in memory at a time), fsynced,
    evicted from the page cache. Returns layout | path | file_gb | action | seconds | check.
    """
    rows = []
    for lay, path in flash_paths(cfg, smoke).items():
        if lay not in layouts:
            continue
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


# --- the non-FFN weights: the stream file -------------------------------------------------------

def _exponent(cfg: PaperScaleConfig) -> int:
    return max(1, 14 - round(math.log2(cfg.d_model) / 2))       # 8 at d_model 4096: |w| in [2^-7, 2^-6)


@functools.lru_cache(maxsize=2)
def _pool(seed: int, exponent: int) -> np.ndarray:
    """``POOL_VALUES`` random fp16 values, random sign and mantissa, exponent fixed (as ``ffn_layer``)."""
    bits = np.frombuffer(np.random.default_rng([seed, 7]).bytes(POOL_VALUES * 2), np.uint16)
    return ((bits & np.uint16(0x83FF)) | np.uint16(exponent << 10)).view(np.float16)


def synthetic_values(cfg: PaperScaleConfig, name: str, shape) -> np.ndarray:
    """Values of one non-FFN weight, fp16 (deterministic per seed and name): layer norms 1 / 0, the fc1
    bias ``ffn_bias``, everything else tiled from the pool from an offset set by the name."""
    n = int(np.prod(shape))
    if "layer_norm" in name:
        return np.full(shape, 1.0 if name.endswith("weight") else 0.0, np.float16)
    if name.endswith("fc1.bias"):
        return ffn_bias(cfg, int(name.split(".layers.")[1].split(".")[0]))
    pool = _pool(cfg.weight_seed, _exponent(cfg))
    out, pos, i = np.empty(n, np.float16), 0, zlib.crc32(name.encode()) % POOL_VALUES
    while pos < n:
        take = min(n - pos, POOL_VALUES - i)
        out[pos:pos + take] = pool[i:i + take]
        pos, i = pos + take, 0
    return out.reshape(shape)


def stream_path(cfg: PaperScaleConfig, smoke: bool | None = None) -> Path:
    return flash_folder(cfg, smoke) / "stream-float16.bin"


def check_stream_file(cfg: PaperScaleConfig, smoke: bool | None = None, verify: str | None = None) -> list[str]:
    """Why the stream file cannot be reused for ``cfg`` (empty: it can): its manifest must name this
    generator and hold this model's groups; "spot" also re-generates the last layer's values."""
    from .streaming import read_stream_manifest, stream_groups
    verify = verify or cfg.verify
    path = stream_path(cfg, smoke)
    try:
        m = read_stream_manifest(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        return [str(e)]
    want = {"model_name": f"{weights_name(cfg)}/{STREAM_GENERATOR}", "dtype": FILE_DTYPE}
    problems = [f"manifest {k}={m.get(k)!r}, want {v!r}" for k, v in want.items() if m.get(k) != v]
    groups = stream_groups(meta_model(cfg), set(ffn_weight_names(cfg)))
    shapes = {g: [(n, list(p.shape)) for n, p in ps] for g, ps in groups.items()}
    if {g: [(e["name"], e["shape"]) for e in v["params"]] for g, v in m["groups"].items()} != shapes:
        problems.append("its groups are not this geometry's")
    if problems or verify == "manifest":
        return problems
    last = f"layer {cfg.n_layers - 1}"
    g = m["groups"][last]
    with open(path, "rb") as f:
        f.seek(g["offset"])
        raw = np.frombuffer(f.read(g["nbytes"]), np.uint8)
    for e in g["params"]:
        want_v = synthetic_values(cfg, e["name"], e["shape"]).reshape(-1).view(np.uint8)
        if not np.array_equal(raw[e["offset"]:e["offset"] + want_v.size], want_v):
            problems.append(f"{e['name']}: values differ from the synthetic weights")
    return problems


def ensure_stream_file(cfg: PaperScaleConfig, smoke: bool | None = None, progress: bool = True) -> dict:
    """The non-FFN weights on disk (written once, ~4.7 GB at full size); returns what was done."""
    from .streaming import stream_groups, write_stream_file
    t0, path = time.perf_counter(), stream_path(cfg, smoke)
    problems = check_stream_file(cfg, smoke)
    if problems:
        model = meta_model(cfg)
        groups = stream_groups(model, set(ffn_weight_names(cfg)))
        need = sum(p.numel() for ps in groups.values() for _, p in ps) * np.dtype(FILE_DTYPE).itemsize
        _check_free_space(path, need)
        write_stream_file(groups, path, FILE_DTYPE, values=lambda name, shape: synthetic_values(cfg, name, shape),
                          info={"model_name": f"{weights_name(cfg)}/{STREAM_GENERATOR}"}, progress=progress)
    action = "reused" if not problems else "written" if "missing" in problems[0] else "rewritten: " + "; ".join(problems)
    return {"layout": "stream (non-FFN)", "path": str(path), "file_gb": path.stat().st_size / 1e9, "action": action,
            "seconds": time.perf_counter() - t0,
            "check": f"{cfg.verify} check passed" if action == "reused" else "written by this run"}


def ensure_files(cfg: PaperScaleConfig, smoke: bool | None = None, progress: bool = True) -> pd.DataFrame:
    """Every weight file of the geometry: both flash layouts and the stream file (one row each)."""
    flash = ensure_flash_files(cfg, smoke, progress)
    return pd.concat([flash, pd.DataFrame([ensure_stream_file(cfg, smoke, progress)])], ignore_index=True)


# --- the model ---------------------------------------------------------------------------------

def opt_config(cfg: PaperScaleConfig):
    """OPT 6.7B's configuration at this geometry (pre-LN, ReLU, learned positions, tied LM head)."""
    from transformers import OPTConfig
    return OPTConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, ffn_dim=cfg.d_ffn,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     max_position_embeddings=cfg.max_positions - 2, word_embed_proj_dim=cfg.d_model,
                     do_layer_norm_before=True, activation_function="relu", dropout=0.0, attention_dropout=0.0,
                     tie_word_embeddings=True, bos_token_id=2, eos_token_id=2, pad_token_id=1)


def meta_model(cfg: PaperScaleConfig, dtype: str = FILE_DTYPE):
    """The geometry's ``OPTForCausalLM`` with every weight on the meta device (no memory at all)."""
    from transformers import OPTForCausalLM
    with torch.device("meta"):
        model = OPTForCausalLM(opt_config(cfg)).to(getattr(torch, dtype))
    model._flashlib_fingerprint = hashlib.sha256(f"{weights_name(cfg)}/{dtype}".encode()).hexdigest()[:16]
    return model.eval()


def ffn_weight_names(cfg: PaperScaleConfig) -> list[str]:
    """The FFN matrices of the geometry (they live in the flash files only)."""
    return [f"model.decoder.layers.{l}.{fc}.weight" for l in range(cfg.n_layers) for fc in ("fc1", "fc2")]


def build_model(cfg: PaperScaleConfig, dtype: str = "bfloat16", resident: bool = True, progress: bool = False,
                device: str = "cpu"):
    """The geometry as a model in ``dtype``: FFN weights on meta (flash only); with ``resident`` every other
    weight is loaded from the stream file (the engine's resident part), else left on meta for the
    dense streaming path to bind."""
    from .streaming import load_groups, read_stream_manifest
    model = meta_model(cfg, dtype)
    if resident:
        path = stream_path(cfg)
        load_groups(model, path, list(read_stream_manifest(path)["groups"]), getattr(torch, dtype), progress,
                    device=device)
    return model


def synthetic_predictors(cfg: PaperScaleConfig, dtype: str = "bfloat16"):
    """Low-rank predictors of Table 4's ranks (128; the last 4 layers 1024) with synthetic weights: under
    the trace policy they run for their cost and their DRAM (2.35% of the model), their sets unused."""
    from .config import MaskRule
    from .predictor import PredictorMeta, Predictors
    from .streaming import set_parameter
    meta = PredictorMeta(weights_name(cfg), "opt", cfg.n_layers, cfg.d_model, cfg.d_ffn,
                         ranks=dict(enumerate(predictor_ranks(cfg))), label_rule=MaskRule(),
                         thresholds={l: 0.0 for l in range(cfg.n_layers)})
    with torch.device("meta"):
        preds = Predictors(meta)
    for name, p in list(preds.named_parameters()):
        values = torch.from_numpy(synthetic_values(cfg, f"predictor.{name}", tuple(p.shape)))
        set_parameter(preds, [name], values.to(getattr(torch, dtype)))
    return preds.eval()


# --- traces and runners ------------------------------------------------------------------------

def trace_config(cfg: PaperScaleConfig, seed: int | None = None) -> TraceConfig:
    """The paper preset of ``traces`` at this geometry and length (identical to it at full scale)."""
    return dataclasses.replace(TRACE_PRESETS["paper"], n_layers=cfg.n_layers, d_ffn=cfg.d_ffn,
                               n_tokens=cfg.n_tokens, seed=cfg.trace_seed if seed is None else seed)


def traces(cfg: PaperScaleConfig) -> tuple[Trace, Trace]:
    """(the run's trace, the sizing trace: another draw, seed + 1)."""
    return (generate_trace(trace_config(cfg), progress=False),
            generate_trace(trace_config(cfg, cfg.trace_seed + 1), progress=False))


def span(cfg: PaperScaleConfig, method: str) -> int:
    """Trace tokens one generate call uses: prompt + new tokens."""
    return cfg.prompt_tokens + (cfg.dense_new_tokens if method in DENSE_METHODS else cfg.new_tokens)


def engine_config(method: str, cfg: PaperScaleConfig, dtype: str) -> EngineConfig:
    """The engine setting of one sparse Table 2 row at paper scale (policy "trace", fp16 flash file)."""
    k = 0 if method == "predictor" else cfg.window_k
    return dataclasses.replace(
        ENGINE, policy="trace", layout="bundled" if method == "bundling" else "separate",
        dram_budget=cfg.dram_fraction, window_k=k, max_window_k=max(1, cfg.window_k), capacity=cfg.capacity,
        capacity_margin=cfg.capacity_margin, read_buffer_rows=cfg.read_buffer_rows, flash_dtype=FILE_DTYPE,
        compute_dtype=dtype, flash_preset=cfg.flash_preset, verify=False, io_threads=cfg.io_threads)


def build_runner(method: str, cfg: PaperScaleConfig, dtype: str = "bfloat16", *, trace_start: int = 0,
                 device: str = "cpu", progress: bool = False):
    """One method at paper scale: "naive" | "hybrid" | "pagecache" (dense streaming, direct or mmap, at
    half the model in DRAM for hybrid and, through its cgroup limit, the page cache) or "predictor" |
    "windowing" | "bundling" (the engine, trace policy; the trace from token ``trace_start`` on)."""
    from .engine import SparseEngine
    from .streaming import StreamingBaseline, WeightFiles
    files = flash_paths(cfg)
    name = f"paper:{weights_name(cfg)}"
    if method in DENSE_METHODS:
        model = build_model(cfg, dtype, resident=False)
        return StreamingBaseline(model, name, cfg.dram_fraction if method == "hybrid" else 0.0,
                                 source="mmap" if method == "pagecache" else "direct",
                                 files=WeightFiles(files["bundled"], stream_path(cfg)),
                                 store_config=StoreConfig(n_threads=cfg.io_threads),
                                 chunk_bytes=cfg.stream_chunk_bytes, device=device, progress=progress)
    if method not in METHOD_NAMES:
        raise ValueError(f"paper-scale method must be one of {METHOD_NAMES + ('pagecache',)}, got {method!r}")
    run, sizing = traces(cfg)
    n = span(cfg, method)
    if trace_start + n > run.predicted.shape[0]:
        raise ValueError(f"trace tokens {trace_start}..{trace_start + n} are past the trace's {cfg.n_tokens}")
    ecfg = dataclasses.replace(engine_config(method, cfg, dtype), device=device)
    return SparseEngine(build_model(cfg, dtype, resident=True, progress=progress, device=device), name, ecfg,
                        predictors=synthetic_predictors(cfg, dtype), flash_path=files[ecfg.layout],
                        trace=run.predicted[trace_start:trace_start + n].copy(), sizing_trace=sizing.predicted)


def prompt_ids(cfg: PaperScaleConfig, rep: int) -> list[int]:
    """A prompt of random token ids (seeded per repeat): the weights are random, so is the text."""
    return np.random.default_rng([cfg.weight_seed, rep]).integers(3, cfg.vocab_size, cfg.prompt_tokens).tolist()


# --- the cost model and the disk ---------------------------------------------------------------

def activation_stats(trace: Trace, k: int) -> costmodel.ActivationStats:
    """Predicted share, new share per token and window share of the trace's predicted sets (App. C.1's 10%, 2.4%, 24%)."""
    return costmodel.ActivationStats.from_curve(trace_statistics(trace.predicted, ks=(1, k)).curve, k)


def table2_costmodel(cfg: PaperScaleConfig, trace: Trace, profile: costmodel.DeviceProfile | None = None) -> pd.DataFrame:
    """Table 2 computed by ``costmodel.table2`` for this geometry, the trace's statistics and a device."""
    df = costmodel.table2(model_bytes(cfg), activation_stats(trace, cfg.window_k),
                          profile or costmodel.measured_profile())
    df.insert(0, "method", list(METHOD_NAMES))
    return df


def disk_report(cfg: PaperScaleConfig, smoke: bool | None = None) -> dict:
    """Bytes of the weight files (both flash layouts and the stream file) on disk and the free space now."""
    files = [*flash_paths(cfg, smoke).values(), stream_path(cfg, smoke)]
    on_disk = sum(p.stat().st_size for p in files if p.exists())
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
    predictors (``bench.predictors_for``, trained once if missing), on sequences of
    ``seq_len`` tokens from the test split of every corpus domain.
    """
    from . import bench, predictor, sparsity
    from .config import CORPUS
    from .models import ffn_adapter, load_model
    model, tok = load_model(model_name, progress=False)
    adapter = ffn_adapter(model)
    seq_len = min(seq_len, getattr(model.config, "max_position_embeddings", seq_len))
    preds = bench.predictors_for(model_name, model, tok, progress=progress)
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




# --- notebook 09: every method side by side, each in its memory-limited worker ------------------------

def variants(cfg: PaperScaleConfig) -> dict[str, tuple[str, str]]:
    """Worker name -> (method, compute dtype): Table 2's five rows and the page cache in bf16, plus naive
    and All in fp32 (the paper's CPU precision) for Table 3."""
    first = cfg.dtypes[0]
    out = {m: (m, first) for m in METHOD_NAMES}
    out["pagecache"] = ("pagecache", first)
    for dt in cfg.dtypes[1:]:
        out.update({f"naive-{_tag(dt)}": ("naive", dt), f"bundling-{_tag(dt)}": ("bundling", dt)})
    return out


def _tag(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)


def probe_chunks(cfg: PaperScaleConfig, store_config: StoreConfig = StoreConfig()) -> tuple[int, ...]:
    """Read sizes the methods issue: one vector (separate), one bundle, one coalesced dense read."""
    return (bundle_bytes(cfg) // 2, bundle_bytes(cfg), store_config.max_read_bytes)


def probe(cfg: PaperScaleConfig, rep: int) -> list[dict]:
    """Steady random-read throughput of the bundled file now (``iobench.run_ours``: the store's ReadPool)."""
    from .iobench import run_ours
    path = flash_paths(cfg)["bundled"]
    return [run_ours(path, c, cfg.io_threads, cfg.probe_seconds, seed=rep) for c in probe_chunks(cfg)]


def run_profile(probe_rows: pd.DataFrame) -> costmodel.DeviceProfile:
    """A device profile from the same-run probe (median per chunk size), for the drift-free computed column."""
    threads = int(probe_rows["threads"].iloc[0])
    med = probe_rows.groupby("chunk_bytes")["throughput_mbps"].median().sort_index()
    pts = tuple((int(c), float(v) * 1e6) for c, v in med.items())
    return costmodel.DeviceProfile("this machine, probed during the run", {threads: pts}, pts[-1][1] / 1e9,
                                   note=f"{len(probe_rows)} probes of the bundled flash file, {threads} threads")


def plan(cfg: PaperScaleConfig, progress: bool = True):
    """The workers' plan for notebook 09 (``workers.side_by_side``): one spec per variant, budgets of half
    the model in each dtype's bytes (naive: 0, its staging only), the page cache's mapped files, per
    repeat its own trace segment and random prompt, a throughput probe at the start of each repeat."""
    from .workers import Plan, Spec
    geometry = dataclasses.asdict(cfg)
    specs, budgets, mapped = {}, {}, {}
    for name, (method, dt) in variants(cfg).items():
        new = span(cfg, method) - cfg.prompt_tokens
        specs[name] = Spec(method, model="paper", new_tokens=new, threads=cfg.threads, io_threads=cfg.io_threads,
                           dtype=dt, geometry=geometry)
        model_b = sum(model_parts(cfg, np.dtype(dt).itemsize if dt != "bfloat16" else 2).values())
        budgets[name] = 0 if method == "naive" else int(cfg.dram_fraction * model_b)
        mapped[name] = [flash_paths(cfg)["bundled"], stream_path(cfg)] if method == "pagecache" else []
    stride = max(span(cfg, m) for m, _ in variants(cfg).values())
    if cfg.rounds * stride > cfg.n_tokens:
        raise ValueError(f"{cfg.rounds} rounds x {stride} tokens need a trace of {cfg.rounds * stride} tokens, "
                         f"the config has n_tokens={cfg.n_tokens}")
    p = Plan(specs, budgets, mapped, [prompt_ids(cfg, r) for r in range(cfg.rounds)], cfg.rounds,
             overhead_repeats=1, timeout_s=1800.0, limited_timeout_s=1800.0, poll_seconds=0.25,
             trace_starts={r: r * stride for r in range(cfg.rounds)},
             meta={"model": "OPT 6.7B geometry (synthetic weights)", "model_bytes": sum(model_parts(cfg).values()),
                   "n_layers": cfg.n_layers, "rounds": cfg.rounds})
    if cfg.probe_seconds > 0:
        p.probe = lambda rep: probe(cfg, rep)
    return p


def summary(result, profile: costmodel.DeviceProfile | None = None) -> pd.DataFrame:
    """Per variant: ``bench.breakdown`` of the limited runs' decode steps, the cost model's I/O for the same
    reads (this machine's throughput table; and ``io_ms_computed_now`` from the same-run probes), and each
    variant's memory limit, peak and failcnt."""
    from .bench import breakdown, computed_io
    s = breakdown(result.steps, result.info)
    now = run_profile(result.probe) if len(result.probe) else None
    s = computed_io(s, profile, now=now)
    mem = result.runs.groupby("method").agg(limit_bytes=("limit_bytes", "first"), peak_bytes=("peak_bytes", "max"),
                                            failcnt=("failcnt", "max"), oom_kills=("oom_kill", "sum"),
                                            status=("status", lambda x: "ok" if (x == "ok").all() else "; ".join(set(x))))
    order = {m: i for i, m in enumerate(variants_order(s["method"]))}
    return s.merge(mem, on="method", how="left").sort_values("method", key=lambda c: c.map(order)).reset_index(drop=True)


def variants_order(names) -> list[str]:
    """Table order: Table 2's rows, then the page cache, then the other precisions."""
    names = list(names)
    return [m for m in METHOD_NAMES if m in names] + [m for m in names if m not in METHOD_NAMES]


def drift(probe_rows: pd.DataFrame, profile: costmodel.DeviceProfile | None = None) -> pd.DataFrame:
    """Throughput now (the run's probes) beside the throughput table's: chunk_kib | table_mbps | probe_mbps | ratio."""
    profile = profile or costmodel.measured_profile()
    g = probe_rows.groupby(["chunk_bytes", "threads"])["throughput_mbps"].median().reset_index()
    g["table_mbps"] = [1e3 * profile.throughput_gbps(c, t) for c, t in zip(g["chunk_bytes"], g["threads"])]
    return pd.DataFrame({"chunk_kib": g["chunk_bytes"] / 1024, "threads": g["threads"], "table_mbps": g["table_mbps"],
                         "probe_mbps": g["throughput_mbps"], "probe_over_table": g["throughput_mbps"] / g["table_mbps"]})


def fig1_frame(t3: pd.DataFrame) -> pd.DataFrame:
    """Fig 1's bars from Table 3: source | method | io_ms | mem_ms | compute_ms (naive and All, paper and ours)."""
    keep = t3[t3["method"].isin(["Naive", "All"])].copy()
    keep["source"] = [("paper (M1 Max CPU, fp32)" if s.startswith("paper") else f"ours ({d})")
                      for s, d in zip(keep["source"], keep["dtype"])]
    return keep[["source", "method", "io_ms", "mem_ms", "compute_ms"]].reset_index(drop=True)


def acceptance(s: pd.DataFrame, cfg: PaperScaleConfig) -> pd.DataFrame:
    """The one-engine checks: check | target | ours | paper | ok (``s``: ``summary``)."""
    r = s.set_index("method")
    io, tot, mem = r["io_ms_median"], r["total_ms_median"], r["mem_ms_median"]
    p = {row[1]: row for row in paper.TABLE3_ROWS if row[0] == "OPT 6.7B" and row[2] == "CPU"}
    tag = _tag(cfg.dtypes[0])
    rows = [(f"I/O naive / All ({tag})", ">= 20", io["naive"] / io["bundling"], 2196 / 87,
             io["naive"] / io["bundling"] >= 20),
            (f"memory management share of All ({tag})", "<= 0.10", mem["bundling"] / tot["bundling"],
             p["All"][4] / p["All"][6], mem["bundling"] / tot["bundling"] <= 0.10),
            (f"All total per token, {tag} (ms)", "<= 1000" if tag == "bf16" else "reported", tot["bundling"],
             p["All"][6], tot["bundling"] <= 1000 or tag != "bf16")]
    for m in [m for m in r.index if m.startswith("bundling-")]:
        t = m.split("-", 1)[1]
        rows.append((f"All total per token, {t} (ms)", "<= 1000" if t == "bf16" else "reported", tot[m],
                     p["All"][6], tot[m] <= 1000 or t != "bf16"))
    for m, row in r.iterrows():
        ok = row["status"] == "ok" and row["oom_kills"] == 0
        rows.append((f"{m}: completes under its cgroup limit (peak / limit GB)", "no OOM kill",
                     f"{row['peak_bytes'] / 1e9:.2f} / {row['limit_bytes'] / 1e9:.2f}", np.nan, ok))
    return pd.DataFrame(rows, columns=["check", "target", "ours", "paper", "ok"])


def paper_vs_ours_rows(t2: pd.DataFrame, t3: pd.DataFrame, s: pd.DataFrame, cfg: PaperScaleConfig,
                       disk: dict) -> list[tuple]:
    """(quantity, paper, ours, note) rows for ``plotting.paper_vs_ours``."""
    t = t2.set_index("method")
    r = s.set_index("method")
    mb = model_bytes(cfg)
    rows = [("model bytes (fp16)", "13.4 GB", f"{mb.total_bytes / 1e9:.2f} GB",
             f"OPTForCausalLM of OPT 6.7B's configuration, synthetic weights: {cfg.n_layers} layers x "
             f"{cfg.d_ffn} neurons, d_model {cfg.d_model}"),
            ("FFN share of the model", f"{paper.FFN_SHARE_OPT67B:.2%}", f"{mb.ffn_share:.2%}", "public OPT 6.7B config")]
    for m, label in (("naive", "naive"), ("hybrid", "hybrid"), ("predictor", "+predictor"),
                     ("windowing", "+windowing"), ("bundling", "+bundling")):
        if m not in t.index:
            continue
        x = t.loc[m]
        rows.append((f"Table 2 {label}: flash->DRAM per token", f"{x['paper_flash_gb']} GB",
                     f"{x['flash_to_dram_mb'] / 1e3:.3f} GB", f"{x['chunk_bytes'] / 1024:.0f} KiB reads"))
        rows.append((f"Table 2 {label}: I/O latency", f"{x['paper_io_ms']} ms ({x['paper_gbps']} GB/s)",
                     f"{x['io_ms']:.0f} ms ({x['throughput_gbps']:.2f} GB/s)",
                     f"measured in generate(), median of {int(x['tokens'])} tokens; cost model {x['io_ms_computed']:.0f} ms"))
    rows.append(("I/O naive / all techniques", f"{2196 / 87:.1f}x", f"{t.loc['naive', 'io_ms'] / t.loc['bundling', 'io_ms']:.1f}x",
                 "acceptance >= 20x"))
    rows.append(("I/O gain of bundling (+windowing -> +bundling)", f"{164 / 87:.2f}x",
                 f"{t.loc['windowing', 'io_ms'] / t.loc['bundling', 'io_ms']:.2f}x", "same window, bundled vs separate file"))
    ours = t3[t3["source"] == "ours"].set_index("variant")
    for v in [v for v in ours.index if ours.loc[v, "method"] in ("Naive", "All")]:
        o = ours.loc[v]
        pr = next(x for x in paper.TABLE3_ROWS if x[:3] == ("OPT 6.7B", o["method"], "CPU"))
        rows.append((f"Table 3 OPT 6.7B CPU {o['method']} ({o['dtype']}): io / mem / compute / total ms",
                     " / ".join(map(str, pr[3:])),
                     " / ".join(f"{o[c]:.0f}" for c in ("io_ms", "mem_ms", "compute_ms", "total_ms")),
                     f"paper: M1 Max fp32; ours: {cfg.threads} torch threads on 2 cores"))
    b = r.loc["bundling"]
    rows += [("window at half the model", f"k={paper.WINDOW_K_OPT}, 24% of the FFN resident",
              f"k={int(b['window_k'])} shrunk to {b['window_share']:.1%} of the FFN (mean), "
              f"{int(b['shrunk'])} shrinks", "capacity 'budget': the matrices hold what half the model leaves"),
             ("I/O mode", "F_NOCACHE / DirectIO", str(b["io_mode"]), "page cache bypassed (the page cache row: mmap)"),
             ("weight files on disk", "-", f"{disk['flash_files_gb']:.1f} GB", "bundled + separate layouts + stream file")]
    if "pagecache" in r.index:
        pc = r.loc["pagecache"]
        rows.append(("page cache (mmap) under half the model + its own memory", "not compared",
                     f"{pc['total_ms_median']:.0f} ms/token = {pc['total_ms_median'] / b['total_ms_median']:.1f}x All",
                     f"limit {pc['limit_bytes'] / 1e9:.1f} GB, failcnt {pc['failcnt']}"))
    return rows


def what_to_notice(s: pd.DataFrame, acc: pd.DataFrame, cfg: PaperScaleConfig) -> str:
    """The closing sentences of notebook 09, computed from this run's numbers."""
    r = s.set_index("method")
    b, n, w = r.loc["bundling"], r.loc["naive"], r.loc["windowing"]
    p = {row[1]: row for row in paper.TABLE3_ROWS if row[0] == "OPT 6.7B" and row[2] == "CPU"}
    tag = _tag(cfg.dtypes[0])
    lines = [f"* I/O per token: naive {n['io_ms_median']:.0f} ms -> all techniques {b['io_ms_median']:.0f} ms = "
             f"{n['io_ms_median'] / b['io_ms_median']:.1f}x (paper {2196 / 87:.1f}x), reading "
             f"{b['bytes_per_token'] / 1e6:.0f} MB instead of {n['bytes_per_token'] / 1e9:.1f} GB, in "
             f"{b['chunk_bytes'] / 1024:.0f} KiB reads at {b['throughput_gbps']:.2f} GB/s (naive: "
             f"{n['throughput_gbps']:.2f} GB/s).",
             f"* Bundling: +windowing {w['io_ms_median']:.0f} ms -> +bundling {b['io_ms_median']:.0f} ms = "
             f"{w['io_ms_median'] / b['io_ms_median']:.2f}x (paper {164 / 87:.2f}x): the same neurons in half the reads.",
             f"* Half the model holds the resident part and {b['window_share']:.1%} of the FFN: the window of "
             f"k={int(b['window_k'])} shrinks on every layer and token ({b['shrunk'] / max(1, b['tokens']):.0f} "
             f"shrinks per token; the paper's k=5 window holds 24% at ~52%), so it loads "
             f"{b['new_share_per_token']:.1%} of the FFN per token (paper 2.4%).",
             f"* Total per token ({tag}): naive {n['total_ms_median']:.0f} ms -> All {b['total_ms_median']:.0f} ms = "
             f"{n['total_ms_median'] / b['total_ms_median']:.2f}x (paper {p['Naive'][6]} -> {p['All'][6]} ms = "
             f"{paper.CPU_SPEEDUP_OPT:.2f}x); compute {b['compute_ms_median']:.0f} ms of it (attention and the LM head "
             f"read the 4.7 GB resident part every token), memory management {b['mem_ms_median']:.0f} ms = "
             f"{b['mem_ms_median'] / b['total_ms_median']:.1%} (paper {p['All'][4] / p['All'][6]:.1%})."]
    for m in [m for m in r.index if m.startswith("bundling-")]:
        lines.append(f"* All in {m.split('-', 1)[1]}: {r.loc[m, 'total_ms_median']:.0f} ms per token (compute "
                     f"{r.loc[m, 'compute_ms_median']:.0f} ms; the paper's M1 Max CPU, fp32: {p['All'][6]} ms).")
    if "pagecache" in r.index:
        pc = r.loc["pagecache"]
        lines.append(f"* The page cache under the same limit takes {pc['total_ms_median']:.0f} ms per token = "
                     f"{pc['total_ms_median'] / b['total_ms_median']:.1f}x All, reading {pc['bytes_per_token'] / 1e9:.1f} GB "
                     f"per token through page faults: the kernel cannot keep what the next token needs.")
    failed = acc[~acc["ok"].astype(bool)]["check"].tolist()
    lines.append("* Every check holds." if not failed else "* Checks that do not hold in this run: " + "; ".join(failed)
                 + " (the table above has the numbers).")
    return "\n".join(lines)
