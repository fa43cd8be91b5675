"""Beyond the paper (paper-facts §4 items 6 and 10; App. B): predictors trained on one text domain, tested on others.

The paper trains its low-rank predictors on C4 (10k samples) and reports their accuracy on C4
only; the predictor's accuracy and the fixed training data are among its stated limitations. A
deployed model sees other text. This module trains the same recipe twice, with the same token
budget: on one domain only ("news-only") and on every domain ("mixed", the reference), then
evaluates both on the held-out split of every domain (news, Shakespeare, Python code):

* classifier metrics per layer (``predictor.evaluate_predictors``): recall, false-negative rate,
  predicted and true density;
* quality with the predictor in the loop (``quality.domain_quality``): perplexity against dense;
* what a shift costs in I/O: bytes loaded per token without a window (predicted density x d_ffn x
  bundle bytes, summed over layers) and with the sliding window (new neurons per token,
  ``window.aggregated_usage_curve`` over each held-out sequence's predicted sets).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch

from .config import (CORPUS, PREDICTOR_PRESETS, ROBUSTNESS_PRESETS, PredictorConfig, QualityConfig,
                     RobustnessConfig, smoke_mode)
from .predictor import Predictors, collect_ffn_inputs, evaluate_predictors, fit_predictors, predictor_path
from .quality import domain_quality, predictor_masker
from .sparsity import active_mask, default_mask_rule, domain_batches, down_norms
from .window import aggregated_usage_curve


def robustness_config(model_name: str, smoke: bool | None = None) -> RobustnessConfig:
    """The model's preset (``ROBUSTNESS_PRESETS``), or the tiny one in smoke mode."""
    if smoke_mode() if smoke is None else smoke:
        return ROBUSTNESS_PRESETS["smollm2-smoke" if model_name == "smollm2" else "smoke"]
    return ROBUSTNESS_PRESETS.get(model_name, ROBUSTNESS_PRESETS["relu-opt"])


def base_recipe(model_name: str, gated: bool, smoke: bool | None = None) -> PredictorConfig:
    """The model's predictor recipe, the one ``bench.predictors_for`` trains."""
    if smoke_mode() if smoke is None else smoke:
        return PREDICTOR_PRESETS["smollm2-smoke" if gated else "smoke"]
    return PREDICTOR_PRESETS.get(model_name, PREDICTOR_PRESETS["relu-opt"])


def label_of(domains) -> str:
    return "mixed" if tuple(domains) == tuple(CORPUS.domains) else "+".join(domains) + "-only"


def train_variants(model_name: str, model, tokenizer, adapter, rcfg: RobustnessConfig, smoke: bool | None = None,
                   progress: bool = True) -> dict[str, Predictors]:
    """``{label: predictors}`` for the single-domain and the mixed training sets, same recipe otherwise.

    A variant identical to the engine's own predictors (same recipe, every layer) shares its cached
    file; the others are cached beside it with a tag (``predictor_path(model, "robust-<label>")``).
    """
    base = base_recipe(model_name, adapter.gated, smoke)
    recipe = dataclasses.replace(base, **dict(rcfg.predictor_overrides))
    layers = list(range(0, adapter.n_layers, rcfg.layer_stride))
    rule = default_mask_rule(adapter)
    out = {}
    for domains in (tuple(rcfg.train_domains), tuple(CORPUS.domains)):
        cfg = dataclasses.replace(recipe, domains=domains)
        label = label_of(domains)
        shared = cfg == base and len(layers) == adapter.n_layers
        path = predictor_path(model_name, "" if shared else f"robust-{label}", smoke)
        out[label], _ = fit_predictors(model_name, model, tokenizer, cfg, rule, layers=layers, path=path,
                                       progress=progress)
    return out


def eval_batches(tokenizer, model, rcfg: RobustnessConfig) -> dict[str, list[torch.Tensor]]:
    """``{domain: [batch, seq_len] batches}`` of each domain's held-out split, seq_len capped at the context."""
    ctx = getattr(model.config, "max_position_embeddings", None) or rcfg.seq_len
    return domain_batches(tokenizer, rcfg.eval_domains, rcfg.split, min(rcfg.seq_len, ctx), rcfg.batch_size,
                          rcfg.max_tokens)


def classifier_table(variants: dict[str, Predictors], adapter, inputs: dict[str, dict[int, torch.Tensor]]
                     ) -> pd.DataFrame:
    """predictor | domain | layer | recall | fn_rate | precision | predicted_density | true_density | ratio."""
    frames = [evaluate_predictors(p, adapter, inputs[d]).assign(predictor=label, domain=d)
              for label, p in variants.items() for d in inputs]
    cols = ["predictor", "domain", "layer", "rank", "recall", "fn_rate", "precision", "fp_rate",
            "predicted_density", "true_density", "ratio"]
    return pd.concat(frames, ignore_index=True)[cols]


def sequence_masks(flat: torch.Tensor, seq_len: int) -> np.ndarray:
    """``[n_tokens, d_ffn]`` masks in recording order -> ``[n_seq, seq_len, d_ffn]`` bool numpy."""
    return flat.reshape(-1, seq_len, flat.shape[-1]).cpu().numpy()


def predicted_masks(predictors: Predictors, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The predictor's active set ``[n_tokens, d_ffn]`` for FFN inputs x ``[n_tokens, d_model]``."""
    with torch.no_grad():
        return torch.cat([predictors.mask(layer, part) for part in x.split(4096)])


def true_masks(adapter, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The true active set ``[n_tokens, d_ffn]`` (the model's own rule) for FFN inputs x."""
    rule = default_mask_rule(adapter)
    norm = down_norms(adapter, layer) if rule.weight_by_down_norm else None
    with torch.no_grad():
        return torch.cat([active_mask(adapter.activation(layer, part.float()), rule, norm) for part in x.split(4096)])


def window_shares(masks: np.ndarray, k: int) -> tuple[float, float]:
    """(new, resident): mean share of d_ffn that a sliding window of k loads per token, and holds (s_agg(k)),
    over ``[n_seq, T, d_ffn]`` masks (each sequence starts empty; tokens before the window has filled are
    left out, as in App. C.1). A dense predicted set loads little per token only because its window holds
    nearly every neuron: read both."""
    curves = [aggregated_usage_curve(seq, ks=(k,)) for seq in masks]
    return (float(np.nanmean([c.new_per_token[0, 0] for c in curves])),
            float(np.mean([c.s_agg[0, 0] for c in curves])))


def window_new_share(masks: np.ndarray, k: int) -> float:
    """The per-token load share of ``window_shares``."""
    return window_shares(masks, k)[0]


def bundle_bytes(adapter, dtype: torch.dtype) -> int:
    """One neuron's bundle: its vectors (up, down; gate for gated FFNs) of d_model values each."""
    return len(adapter.vector_names) * adapter.d_model * torch.empty((), dtype=dtype).element_size()


def load_cost(variants: dict[str, Predictors], adapter, inputs: dict[str, dict[int, torch.Tensor]], seq_len: int,
              k: int, dtype: torch.dtype) -> pd.DataFrame:
    """Per (predictor, domain, layer): share of the FFN loaded per token without a window (the predicted
    density) and with a window of k (new neurons per token), for each predictor and for the true active
    sets ("oracle": what a perfect predictor would load); bytes = share x d_ffn x bundle bytes."""
    bb = bundle_bytes(adapter, dtype)
    rows = []
    sets = {**{label: (lambda l, x, p=p: predicted_masks(p, l, x)) for label, p in variants.items()},
            "oracle": lambda l, x: true_masks(adapter, l, x)}
    layers = sorted(next(iter(variants.values())).layers)
    for domain, per_layer in inputs.items():
        for label, fn in sets.items():
            for layer in layers:
                m = fn(layer, per_layer[layer])
                seqs = sequence_masks(m, seq_len)
                density = float(m.float().mean())
                new, held = window_shares(seqs, k)
                rows.append({"predictor": label, "domain": domain, "layer": layer, "density": density,
                             "new_share_window": new, "resident_share_window": held,
                             "bytes_no_window": density * adapter.d_ffn * bb,
                             "bytes_window": new * adapter.d_ffn * bb})
    return pd.DataFrame(rows).assign(window_k=k, bundle_bytes=bb)


def cost_per_token(cost: pd.DataFrame) -> pd.DataFrame:
    """Bytes loaded per token summed over the evaluated layers: predictor | domain | kb_no_window | kb_window,
    and the shift cost: each domain's bytes relative to the news (in-domain) value of the same predictor."""
    g = cost.groupby(["predictor", "domain"], sort=False)
    out = pd.DataFrame({"kb_no_window": g["bytes_no_window"].sum() / 1e3,
                        "kb_window": g["bytes_window"].sum() / 1e3}).reset_index()
    if "resident_share_window" in cost:
        out["window_share"] = g["resident_share_window"].mean().values      # share of the FFN the window holds
    ref = out[out["domain"] == "news"].set_index("predictor")
    for c in ("kb_no_window", "kb_window"):
        out[f"{c}_vs_news"] = out[c] / out["predictor"].map(ref[c])
    return out


@dataclasses.dataclass
class RobustnessResult:
    """``classifier``: per layer metrics; ``quality``: perplexity vs dense per domain; ``cost``: per layer
    load shares and bytes; ``summary``: one row per (predictor, domain)."""

    model: str
    classifier: pd.DataFrame
    quality: pd.DataFrame
    cost: pd.DataFrame
    summary: pd.DataFrame
    config: RobustnessConfig


def summarize(classifier: pd.DataFrame, quality: pd.DataFrame, cost: pd.DataFrame) -> pd.DataFrame:
    """predictor | domain | recall | fn_rate | predicted_density | true_density | ppl | ppl_ratio | agreement |
    kb_no_window | kb_window (+ relative to news): layer means of the classifier, the quality and the cost."""
    c = classifier.groupby(["predictor", "domain"], sort=False)[
        ["recall", "fn_rate", "predicted_density", "true_density", "ratio"]].mean().reset_index()
    q = quality[quality["method"] != "dense"].rename(columns={"method": "predictor"})[
        ["predictor", "domain", "ppl", "ppl_ratio", "agreement"]]
    dense = quality[quality["method"] == "dense"][["domain", "ppl"]].rename(columns={"ppl": "dense_ppl"})
    out = c.merge(q, on=["predictor", "domain"]).merge(dense, on="domain")
    return out.merge(cost_per_token(cost), on=["predictor", "domain"], how="left")


def run(model_name: str, rcfg: RobustnessConfig | None = None, *, smoke: bool | None = None,
        progress: bool = True) -> RobustnessResult:
    """Train both variants, evaluate on every domain's held-out split; everything one call."""
    from .models import ffn_adapter, load_model
    model, tok = load_model(model_name, progress=progress)
    adapter = ffn_adapter(model)
    rcfg = rcfg or robustness_config(model_name, smoke)
    variants = train_variants(model_name, model, tok, adapter, rcfg, smoke, progress)
    batches = eval_batches(tok, model, rcfg)
    layers = next(iter(variants.values())).layers
    inputs = {d: collect_ffn_inputs(model, adapter, b, layers, progress=progress) for d, b in batches.items()}
    seq_len = batches[rcfg.eval_domains[0]][0].shape[1]
    classifier = classifier_table(variants, adapter, inputs)
    qcfg = QualityConfig(domains=tuple(rcfg.eval_domains), split=rcfg.split, seq_len=seq_len,
                         batch_size=rcfg.batch_size, max_tokens=rcfg.max_tokens)
    quality = domain_quality(model, adapter, tok, {k: predictor_masker(p) for k, p in variants.items()}, qcfg,
                             progress=progress)
    dtype = next(model.parameters()).dtype
    cost = load_cost(variants, adapter, inputs, seq_len, rcfg.window_k, dtype)
    return RobustnessResult(model_name, classifier, quality, cost, summarize(classifier, quality, cost), rcfg)


def plot_per_layer(results: list[RobustnessResult], metrics=("recall", "predicted_density")):
    """One row per model; per metric, one panel per predictor set, a line per evaluation domain."""
    import matplotlib.pyplot as plt
    labels = list(dict.fromkeys(results[0].classifier["predictor"]))
    panels = [(m, p) for m in metrics for p in labels]
    fig, axes = plt.subplots(len(results), len(panels), figsize=(3.3 * len(panels), 2.9 * len(results)),
                             squeeze=False)
    colors = {"news": "#1f77b4", "shakespeare": "#d62728", "code": "#2ca02c"}
    for row, res in zip(axes, results):
        for ax, (metric, label) in zip(row, panels):
            c = res.classifier[res.classifier["predictor"] == label]
            for domain, g in c.groupby("domain", sort=False):
                ax.plot(g["layer"], g[metric], marker="o", ms=3, color=colors.get(domain), label=domain)
                if metric == "predicted_density":
                    ax.plot(g["layer"], g["true_density"], color=colors.get(domain), ls=":", lw=1)
            ax.set(title=f"{res.model}, {label}: {metric.replace('_', ' ')}", xlabel="layer")
            ax.title.set_fontsize(8.5)
        for metric in metrics:                  # the predictor sets of one metric share the y range
            pair = [ax for ax, (m, _) in zip(row, panels) if m == metric]
            lo, hi = min(ax.get_ylim()[0] for ax in pair), max(ax.get_ylim()[1] for ax in pair)
            for ax in pair:
                ax.set_ylim(lo, hi)
        row[0].legend(fontsize=7, title="evaluated on", title_fontsize=7)
    if "predicted_density" in metrics:
        fig.text(0.99, 0.01, "dotted: true density", ha="right", fontsize=7, color="0.4")
    return fig


def paper_vs_ours_rows(results: list[RobustnessResult]) -> list[tuple]:
    """The robustness lines of the closing table: (quantity, paper, ours, note)."""
    from . import paper
    rows = [("predictor training / evaluation text", "C4 train (10k samples) / C4 validation; never another domain",
             "one domain (news) vs all three, same recipe and token budget; tested on news, Shakespeare, code",
             "the paper lists predictor accuracy and fixed training data among its limits (paper-facts §4)")]
    for res in results:
        s = res.summary
        single = [p for p in s["predictor"].unique() if p != "mixed"][0]
        one = s[s["predictor"] == single].set_index("domain")
        mixed = s[s["predictor"] == "mixed"].set_index("domain")
        doms = list(one.index)
        fmt = lambda frame, col, f: "; ".join(f"{d} {f(frame.loc[d, col])}" for d in doms)   # noqa: E731
        rows += [
            (f"{res.model}: false negatives ({single})", f"{paper.PREDICTOR_FN_RATE:.0%} (App. C.1, C4)",
             fmt(one, "fn_rate", lambda v: f"{v:.1%}"), f"mixed: {fmt(mixed, 'fn_rate', lambda v: f'{v:.1%}')}"),
            (f"{res.model}: predicted / true density ({single})", f"~{paper.PREDICTED_OVER_ACTIVE:.0f}x (App. B.1)",
             fmt(one, "ratio", lambda v: f"{v:.2f}x"), f"mixed: {fmt(mixed, 'ratio', lambda v: f'{v:.2f}x')}"),
            (f"{res.model}: perplexity / dense ({single})", "small change (Fig 11, no numbers)",
             fmt(one, "ppl_ratio", lambda v: f"{v:.3f}"), f"mixed: {fmt(mixed, 'ppl_ratio', lambda v: f'{v:.3f}')}"),
            (f"{res.model}: kB loaded per token, window k={res.config.window_k} ({single})", "not studied",
             fmt(one, "kb_window", lambda v: f"{v:.1f}"), f"mixed: {fmt(mixed, 'kb_window', lambda v: f'{v:.1f}')}"),
            (f"{res.model}: share of the FFN the window holds ({single})",
             f"{paper.WINDOW_CACHE_SHARE_OF_FFN:.0%} (App. C.1, OPT 6.7B)",
             fmt(one, "window_share", lambda v: f"{v:.0%}"), f"mixed: {fmt(mixed, 'window_share', lambda v: f'{v:.0%}')}"),
        ]
    return rows
