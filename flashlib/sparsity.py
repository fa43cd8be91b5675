"""FFN activation sparsity (paper sec 3.1 and App. C.5: Fig 9a, Table 6; Fig 4a: s_agg(k); App. D: co-activation).

Activations are read through the FFN adapter (``flashlib.models``): a forward pre-hook on
``adapter.ffn_input_module(layer)`` sees the FFN input x, and ``adapter.activation(layer, x)``
gives the neuron activations that multiply the down vectors. A recording keeps only boolean
active masks ``[n_seq, seq_len, d_ffn]`` per layer (one byte per neuron and token), never the
floats, so tens of thousands of tokens fit in memory.

Which neurons are "active" is a ``MaskRule`` (config.py): exact zeros for ReLU (OPT); for gated
FFNs (SmolLM2), where nothing is exactly zero, a threshold, a per-token top-k, or the fewest
neurons holding a share of the mass, all on each neuron's output contribution |act_i| * ||down_i||.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .config import GATED_MASK, RELU_MASK, MaskRule
from .corpus import load_tokens
from .window import aggregated_usage_curve

# --- token batches and hooks ------------------------------------------------------------


def token_batches(tokens, seq_len: int, batch_size: int, max_tokens: int | None = None,
                  spread: bool = False) -> list[torch.Tensor]:
    """Cut a 1-D token stream into ``[batch, seq_len]`` LongTensors of whole sequences.

    At most ``max_tokens`` tokens (rounded down to whole sequences; at least one sequence):
    the first ones, or with ``spread`` sequences evenly spaced over the whole stream (so a
    budget samples every part of a corpus, not only its first documents). The tail shorter
    than ``seq_len`` is dropped, so no batch needs padding.
    """
    ids = torch.from_numpy(np.asarray(tokens).astype(np.int64).reshape(-1))
    n_all = ids.numel() // seq_len
    if n_all == 0:
        raise ValueError(f"token stream of {ids.numel()} tokens is shorter than seq_len={seq_len}")
    n_seq = n_all if max_tokens is None else min(n_all, max(1, max_tokens // seq_len))
    seqs = ids[: n_all * seq_len].view(n_all, seq_len)
    if spread and n_seq < n_all:
        seqs = seqs[torch.linspace(0, n_all - 1, n_seq).round().long()]
    return list(seqs[:n_seq].split(batch_size))


def fit_seq_len(model, seq_len: int) -> int:
    """``seq_len`` capped at the model's context (``max_position_embeddings``), so no batch overflows it."""
    return min(seq_len, getattr(model.config, "max_position_embeddings", None) or seq_len)


def domain_batches(tokenizer, domains: Iterable[str], split: str, seq_len: int, batch_size: int,
                   max_tokens: int) -> dict[str, list[torch.Tensor]]:
    """``{domain: batches}`` of one corpus split, ``max_tokens`` per domain spread over the split."""
    return {d: token_batches(load_tokens(d, split, tokenizer), seq_len, batch_size, max_tokens, spread=True)
            for d in domains}


def _first_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    return next(iter(kwargs.values()))


@contextlib.contextmanager
def ffn_input_hooks(adapter, layers: Iterable[int], fn: Callable[[int, torch.Tensor], None]):
    """While active, ``fn(layer, x)`` sees each listed layer's FFN input x ``[..., d_model]``."""
    handles = []
    for layer in layers:
        def hook(module, args, kwargs, layer=layer):
            fn(layer, _first_arg(args, kwargs))
        handles.append(adapter.ffn_input_module(layer).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_with_ffn_inputs(model, adapter, batches: list[torch.Tensor], layers: Iterable[int],
                        fn: Callable[[int, torch.Tensor, torch.Size], None], progress: bool = True,
                        desc: str = "forward") -> None:
    """Forward every batch (no KV cache, no grad) and call ``fn(layer, x, ids.shape)`` on each FFN input.

    x arrives as the module sees it (OPT flattens it to ``[batch*seq, d_model]``); ``ids.shape``
    = ``(batch, seq_len)`` lets ``fn`` restore the sequence structure.
    """
    current: list[torch.Size] = []
    with ffn_input_hooks(adapter, layers, lambda layer, x: fn(layer, x, current[-1])):
        with torch.inference_mode():
            for ids in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
                current.append(ids.shape)
                model(input_ids=ids, use_cache=False)


# --- active masks -----------------------------------------------------------------------


def default_mask_rule(adapter) -> MaskRule:
    """Exact zeros for ReLU FFNs; top-k on the output contribution for gated (SwiGLU) FFNs."""
    return GATED_MASK if adapter.gated else RELU_MASK


def down_norms(adapter, layer: int) -> torch.Tensor:
    """||down_i|| for every neuron of a layer ``[d_ffn]``: scales |act_i| to neuron i's output norm."""
    with torch.no_grad():
        return adapter.neuron_vectors(layer)["down"].float().norm(dim=1)


def neuron_scores(act: torch.Tensor, rule: MaskRule, down_norm: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Contribution score ``[..., d_ffn]``: |act_i|, times ||down_i|| if the rule asks for it."""
    score = act.abs()
    if rule.weight_by_down_norm:
        if down_norm is None:
            raise ValueError("MaskRule.weight_by_down_norm needs down_norm (sparsity.down_norms)")
        score = score * down_norm
    return score


def active_mask(act: torch.Tensor, rule: MaskRule, down_norm: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Boolean mask ``[..., d_ffn]`` of the neurons the rule calls active for each token."""
    if rule.kind == "nonzero":
        return act != 0
    score = neuron_scores(act, rule, down_norm)
    if rule.kind == "threshold":
        return score > rule.threshold
    if rule.kind == "topk":
        return topk_mask(score, rule.density)
    if rule.kind == "mass":
        return mass_mask(score, rule.mass)
    raise ValueError(f"MaskRule.kind must be 'nonzero', 'threshold', 'topk' or 'mass', got {rule.kind!r}")


def mass_mask(score: torch.Tensor, mass: float) -> torch.Tensor:
    """Per-token mask of the fewest largest scores whose sum reaches ``mass`` of the token's total."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    values, idx = score.sort(dim=-1, descending=True, stable=True)
    before = values.cumsum(dim=-1) - values                 # mass held by the larger scores
    keep_sorted = before < mass * values.sum(dim=-1, keepdim=True)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, keep_sorted)


def topk_mask(score: torch.Tensor, density: float) -> torch.Tensor:
    """Per-token mask of the ``round(density * d_ffn)`` largest scores (at least one)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    k = max(1, round(density * score.shape[-1]))
    idx = score.topk(k, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)


# --- recording --------------------------------------------------------------------------


@dataclass
class ActivationTrace:
    """Active masks recorded over whole sequences: ``masks[layer]`` is ``[n_seq, seq_len, d_ffn]`` bool."""

    masks: dict[int, torch.Tensor]
    rule: MaskRule

    @property
    def layers(self) -> list[int]:
        return sorted(self.masks)

    @property
    def n_tokens(self) -> int:
        m = self.masks[self.layers[0]]
        return m.shape[0] * m.shape[1]

    def flat(self, layer: int) -> torch.Tensor:
        """``[n_tokens, d_ffn]`` view of one layer (token order kept)."""
        m = self.masks[layer]
        return m.reshape(-1, m.shape[-1])


def record_masks(model, adapter, batches: list[torch.Tensor], rule: MaskRule | None = None,
                 layers: Iterable[int] | None = None, progress: bool = True) -> ActivationTrace:
    """Run the model over ``batches`` and keep each layer's active mask (bool, not floats)."""
    rule = rule or default_mask_rule(adapter)
    layers = list(range(adapter.n_layers) if layers is None else layers)
    norms = {l: down_norms(adapter, l) for l in layers} if rule.weight_by_down_norm else {}
    chunks: dict[int, list[torch.Tensor]] = {l: [] for l in layers}

    def keep(layer: int, x: torch.Tensor, shape: torch.Size) -> None:
        act = adapter.activation(layer, x)
        chunks[layer].append(active_mask(act, rule, norms.get(layer)).reshape(*shape, -1))

    run_with_ffn_inputs(model, adapter, batches, layers, keep, progress, desc="record masks")
    return ActivationTrace({l: torch.cat(c) for l, c in chunks.items()}, rule)


# --- statistics -------------------------------------------------------------------------


def layer_sparsity(trace: ActivationTrace) -> pd.DataFrame:
    """Per layer: mean share of active neurons per token (Fig 9a, Table 6), its spread, and 1 - that."""
    rows = []
    for layer in trace.layers:
        per_token = trace.flat(layer).float().mean(dim=1)   # [n_tokens]
        rows.append({"layer": layer, "active_fraction": per_token.mean().item(),
                     "active_std": per_token.std().item() if per_token.numel() > 1 else 0.0,
                     "sparsity": 1.0 - per_token.mean().item()})
    return pd.DataFrame(rows)


def neuron_frequency(trace: ActivationTrace, layer: int) -> torch.Tensor:
    """Share of tokens on which each neuron is active ``[d_ffn]``."""
    return trace.flat(layer).float().mean(dim=0)


def aggregated_usage(masks: torch.Tensor, windows: Iterable[int]) -> pd.DataFrame:
    """s_agg(k) and new neurons per token for each window k (paper Fig 4a, sec 3.1), one layer.

    ``masks`` is ``[n_seq, seq_len, d_ffn]`` bool (or ``[seq_len, d_ffn]`` for one sequence).
    s_agg(k): share of neurons active in at least one of k consecutive tokens, averaged over
    every full window inside a sequence. new_per_token(k): share of neurons active at token t
    but in none of the k tokens before it (what a window of the last k tokens loads), averaged
    over t >= k. Windows never cross a sequence boundary. The per-sequence curves come from
    ``window.aggregated_usage_curve`` (one definition for the whole package).
    """
    m = masks if masks.dim() == 3 else masks.unsqueeze(0)
    df = trace_aggregated_usage(ActivationTrace({0: m}, RELU_MASK), windows)
    return df.drop(columns=["layer"])


def trace_aggregated_usage(trace: ActivationTrace, windows: Iterable[int]) -> pd.DataFrame:
    """``aggregated_usage`` for every layer of a trace: layer | k | s_agg | new_per_token | peak_resident.

    Sequences have equal length, so the mean of the per-sequence curves is the mean over all
    windows; peak_resident is the largest union of k tokens seen in any sequence (Req_i).
    """
    layers = trace.layers
    stacked = torch.stack([trace.masks[l] for l in layers], dim=2).numpy()   # [n_seq, T, L, d]
    curves = [aggregated_usage_curve(seq, ks=tuple(windows)) for seq in stacked]
    ks = curves[0].ks
    s_agg = np.mean([c.s_agg for c in curves], axis=0)                       # [L, K]
    new = np.mean([c.new_per_token for c in curves], axis=0)
    peak = np.max([c.peak_resident for c in curves], axis=0)
    return pd.DataFrame({"layer": np.repeat(layers, len(ks)), "k": np.tile(ks, len(layers)),
                         "s_agg": s_agg.reshape(-1), "new_per_token": new.reshape(-1),
                         "peak_resident": peak.reshape(-1)})


def coactivation_counts(mask: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``counts[i, j]`` = tokens on which neurons i and j are both active ``[d_ffn, d_ffn]`` (float64).

    ``mask`` is ``[n_tokens, d_ffn]`` bool; the diagonal holds each neuron's activation count.
    """
    d_ffn = mask.shape[-1]
    counts = torch.zeros(d_ffn, d_ffn, dtype=torch.float64)
    for part in mask.reshape(-1, d_ffn).split(chunk):
        f = part.float()
        counts += (f.T @ f).double()     # exact: each chunk's counts are below 2**24
    return counts


def closest_friend_shares(counts: torch.Tensor, min_activations: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fig 12: for each neuron, the share of its activations on which its j-th closest friend fires.

    Returns ``(shares [n_kept, d_ffn - 1], neuron_ids [n_kept])``: row r is sorted descending, so
    column j-1 is the j-th closest friend (the friend with the j-th most co-activations).
    Neurons active fewer than ``min_activations`` times are left out (their shares are noise).
    """
    own = counts.diagonal()
    keep = torch.nonzero(own >= max(1, min_activations)).flatten()
    c = counts[keep].clone()
    c[torch.arange(keep.numel()), keep] = -1.0          # a neuron is not its own friend
    shares = c.sort(dim=1, descending=True).values[:, :-1] / own[keep, None]
    return shares, keep


def friend_summary(shares: torch.Tensor, friends: Iterable[int]) -> pd.DataFrame:
    """Mean and median share for the listed friend ranks (1 = closest), as in Fig 12 b-d."""
    rows = [{"friend": j, "mean_share": shares[:, j - 1].mean().item(),
             "median_share": shares[:, j - 1].median().item(),
             "n_neurons": shares.shape[0]} for j in friends]
    return pd.DataFrame(rows)

