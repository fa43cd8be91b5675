"""Model quality with sparsity in the loop (paper sec 5 / App. B: Tables 1 and 4, Fig 11 perplexity).

A "sparse twin" of a model is a copy whose every FFN is replaced (``adapter.replace_ffn``) by a
``MaskedFFN`` that computes the dense FFN from the original model's weights and zeroes the
neurons a masker does not keep: the true active set (oracle), the predictor's set, or a top-k.
The original model stays untouched and serves as the dense reference; the twin holds no FFN
weights of its own.

Measured per text domain (held-out split): perplexity, and greedy-token agreement = the share
of positions where the twin's argmax next token equals the dense model's (teacher-forced on the
same text, so one forward pass of each model per batch serves every metric).
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import MaskRule, QualityConfig
from .models import ffn_adapter
from .sparsity import active_mask, domain_batches, down_norms, fit_seq_len

# masker(layer, x [..., d_model], act [..., d_ffn]) -> keep mask [..., d_ffn] (bool)
Masker = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class MaskedFFN(nn.Module):
    """Whole FFN x -> y ``[..., d_model]`` with a neuron mask in the loop; counts the share kept."""

    def __init__(self, adapter, layer: int):
        super().__init__()
        self.adapter, self.layer = adapter, layer               # the DENSE model's adapter
        self.down = adapter.neuron_vectors(layer)["down"]       # [d_ffn, d_model], shared, not copied
        self.out_bias = adapter.output_bias(layer)              # [d_model] or None
        self.masker: Masker | None = None
        self.kept = 0
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.adapter.activation(self.layer, x)            # [..., d_ffn]
        if self.masker is not None:
            keep = self.masker(self.layer, x, act)
            act = act * keep
            self.kept += int(keep.sum())
            self.seen += keep.numel()
        y = act @ self.down
        return y if self.out_bias is None else y + self.out_bias


class SparseTwin:
    """A copy of ``model`` whose FFNs are ``MaskedFFN``s reading the original weights.

    The copy shares every parameter and buffer with ``model`` (deepcopy with a memo), so it
    costs module objects, not weights; replacing its FFNs leaves ``model`` dense.
    """

    def __init__(self, model, adapter):
        shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        self.model = copy.deepcopy(model, memo=shared).eval()
        twin_adapter = ffn_adapter(self.model)
        self.ffns = [MaskedFFN(adapter, l) for l in range(adapter.n_layers)]
        for l, ffn in enumerate(self.ffns):
            twin_adapter.replace_ffn(l, ffn)

    def set_masker(self, masker: Masker | None) -> None:
        """Use ``masker`` in every layer (None: dense) and reset the kept-share counters."""
        for ffn in self.ffns:
            ffn.masker, ffn.kept, ffn.seen = masker, 0, 0

    def kept_share(self) -> float:
        """Share of (token, neuron) pairs kept since ``set_masker`` (nan when no masker ran)."""
        seen = sum(f.seen for f in self.ffns)
        return sum(f.kept for f in self.ffns) / seen if seen else float("nan")


# --- maskers ----------------------------------------------------------------------------


def oracle_masker(adapter, rule: MaskRule) -> Masker:
    """The true active set of each token (ReLU + "nonzero": identical to the dense model)."""
    norms = {l: down_norms(adapter, l) for l in range(adapter.n_layers)} if rule.weight_by_down_norm else {}
    return lambda layer, x, act: active_mask(act, rule, norms.get(layer))


def predictor_masker(predictors, density: float | None = None) -> Masker:
    """Keep the neurons the predictors flag (threshold, or per-token top-k at ``density``);
    layers without a predictor stay dense."""
    have = set(predictors.layers)

    def masker(layer, x, act):
        if layer not in have:
            return torch.ones_like(act, dtype=torch.bool)
        return predictors.mask(layer, x, density)
    return masker


# --- metrics ----------------------------------------------------------------------------


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted positions."""
    lp = logits[:, :-1].float()
    tgt = ids[:, 1:]
    nll = F.cross_entropy(lp.reshape(-1, lp.shape[-1]), tgt.reshape(-1), reduction="sum")
    return nll.item(), tgt.numel()


def perplexity(model, batches: list[torch.Tensor], progress: bool = True) -> float:
    """exp(mean next-token NLL) of a model over whole sequences (each sequence scored on its own)."""
    total, n = 0.0, 0
    with torch.inference_mode():
        for ids in tqdm(batches, desc="perplexity", disable=not progress, unit="batch"):
            s, c = _nll_sum(model(input_ids=ids, use_cache=False).logits, ids)
            total, n = total + s, n + c
    return float(torch.tensor(total / n).exp())


def compare_to_dense(model, twin: SparseTwin, maskers: dict[str, Masker | None],
                     batches: list[torch.Tensor], progress: bool = True, desc: str = "quality") -> pd.DataFrame:
    """Perplexity, greedy agreement with the dense model and kept share for each masker.

    One dense forward per batch is shared by all maskers. Rows: method | ppl | agreement |
    kept_share | tokens, with a first row "dense" (agreement 1 by definition).
    """
    stats = {name: {"nll": 0.0, "agree": 0, "kept": 0, "seen": 0} for name in ["dense", *maskers]}
    n_pos = 0
    with torch.inference_mode():
        for ids in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            dense = model(input_ids=ids, use_cache=False).logits
            s, c = _nll_sum(dense, ids)
            stats["dense"]["nll"] += s
            stats["dense"]["agree"] += c
            n_pos += c
            top_dense = dense[:, :-1].argmax(-1)
            for name, masker in maskers.items():
                twin.set_masker(masker)
                logits = twin.model(input_ids=ids, use_cache=False).logits
                s, _ = _nll_sum(logits, ids)
                st = stats[name]
                st["nll"] += s
                st["agree"] += int((logits[:, :-1].argmax(-1) == top_dense).sum())
                st["kept"] += sum(f.kept for f in twin.ffns)
                st["seen"] += sum(f.seen for f in twin.ffns)
    twin.set_masker(None)
    rows = [{"method": name, "ppl": float(torch.tensor(st["nll"] / n_pos).exp()),
             "agreement": st["agree"] / n_pos,
             "kept_share": st["kept"] / st["seen"] if st["seen"] else 1.0, "tokens": n_pos}
            for name, st in stats.items()]
    return pd.DataFrame(rows)


# --- experiment helpers (one call per notebook table) -----------------------------------


def domain_quality(model, adapter, tokenizer, maskers: dict[str, Masker | None], cfg: QualityConfig,
                   progress: bool = True) -> pd.DataFrame:
    """``compare_to_dense`` on the held-out split of every domain (Tables 1/4 analogue).

    Rows: domain | method | ppl | ppl_ratio (to dense, same domain) | agreement | kept_share | tokens.
    """
    twin = SparseTwin(model, adapter)
    frames = []
    for domain, batches in domain_batches(tokenizer, cfg.domains, cfg.split, fit_seq_len(model, cfg.seq_len),
                                          cfg.batch_size, cfg.max_tokens).items():
        df = compare_to_dense(model, twin, maskers, batches, progress, desc=f"quality {domain}")
        frames.append(df.assign(domain=domain, ppl_ratio=df.ppl / df.ppl[df.method == "dense"].item()))
    cols = ["domain", "method", "ppl", "ppl_ratio", "agreement", "kept_share", "tokens"]
    return pd.concat(frames, ignore_index=True)[cols]


def density_sweep(model, adapter, batches: list[torch.Tensor], densities, rule: MaskRule,
                  predictors: dict | None = None, progress: bool = True) -> pd.DataFrame:
    """Perplexity against the share of FFN neurons kept per token (gated FFNs, where density is a knob).

    For each density: "oracle" keeps the true top-k contributions (``rule`` with that density),
    and each entry of ``predictors`` ({method name: Predictors}) the top-k of its logits. Rows:
    method | density | ppl | ppl_ratio | agreement | kept_share | tokens, plus "dense" (density 1).
    """
    maskers: dict[str, Masker] = {}
    for d in densities:
        maskers[f"oracle@{d}"] = oracle_masker(adapter, dataclasses.replace(rule, kind="topk", density=d))
        for name, preds in (predictors or {}).items():
            maskers[f"{name}@{d}"] = predictor_masker(preds, density=d)
    df = compare_to_dense(model, SparseTwin(model, adapter), maskers, batches, progress, desc="density sweep")
    df["density"] = [1.0 if m == "dense" else float(m.split("@")[1]) for m in df.method]
    df["method"] = df.method.str.split("@").str[0]
    df["ppl_ratio"] = df.ppl / df.ppl[df.method == "dense"].item()
    return df[["method", "density", "ppl", "ppl_ratio", "agreement", "kept_share", "tokens"]]


def domain_density_sweep(model, adapter, tokenizer, cfg: QualityConfig, rule: MaskRule,
                         predictors: dict | None = None, progress: bool = True) -> pd.DataFrame:
    """``density_sweep`` on the held-out split of every domain of ``cfg``, with a ``domain`` column."""
    frames = [density_sweep(model, adapter, batches, cfg.densities, rule, predictors, progress).assign(domain=d)
              for d, batches in domain_batches(tokenizer, cfg.domains, cfg.split, fit_seq_len(model, cfg.seq_len),
                                               cfg.batch_size, cfg.max_tokens).items()]
    return pd.concat(frames, ignore_index=True)


def lowest_density_within(sweep: pd.DataFrame, method: str, tolerance: float) -> float:
    """Smallest swept density whose perplexity is within ``tolerance`` of dense in every domain
    of the sweep (the worst domain decides); nan if none."""
    worst = sweep[sweep.method == method].groupby("density").ppl_ratio.max()
    ok = worst[worst <= 1 + tolerance]
    return float(ok.index.min()) if len(ok) else float("nan")
